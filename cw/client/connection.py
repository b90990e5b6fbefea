"""The client's connection: one I/O thread that owns the link to the master.

User threads pickle their jobs, append them to a queue and poke the I/O
thread through a socketpair; the I/O thread batches submissions, completes
futures as results arrive, and survives a broken link (master restarted,
network gone): it reconnects with backoff, says HELLO again with the same
session, asks for the results that finished meanwhile, and resends every
submission the master had not acknowledged.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures as cf
import itertools
import logging
import socket
import threading
import time
import uuid
import weakref
from typing import Callable

import zmq

from .. import defaults
from .. import protocol as P
from ..discovery import ClusterDir
from ..errors import (
    AuthenticationError,
    ClientError,
    NoMasterError,
    SerializationError,
    StoreReplacedError,
)
from ..link import Link, ask
from ..serialize import loads, runtime_versions
from .futures import Delivery, Future, error_for

log = logging.getLogger(__name__)

_open: weakref.WeakSet = weakref.WeakSet()  # connections not closed yet


@atexit.register
def _flush_at_exit() -> None:
    """A client left open at exit: what it submitted is committed at the master before
    the interpreter goes (its jobs run on; their results wait in the store)."""
    for conn in list(_open):
        conn.flush(defaults.EXIT_FLUSH)


class Connection:
    """The I/O thread and link shared by every client API (Client, Executor, ClientThread)."""

    def __init__(self, key: bytes, run: str | None, context: dict, cluster: ClusterDir | None,
                 explicit: str | None, connect_timeout: float, master_timeout: float,
                 unsatisfiable: float | None = defaults.UNSATISFIABLE_TIMEOUT):  # fmt: skip
        self.key, self.run, self.context = key, run, context
        self.unsatisfiable = unsatisfiable  # seconds jobs may wait for what no worker offers
        self.connect_timeout = connect_timeout
        self.session = uuid.uuid4().hex
        self.seq = itertools.count()
        # a submission: (seq, fn hash, fn blob, key, opts, args blob); scattered data: (seq, None, None, hash,
        # broadcast, blob)
        self.outq: collections.deque = collections.deque()  # for the I/O thread to send
        self.futures: dict[int, Future | Delivery] = {}
        self.unacked: dict[int, tuple] = {}
        self.unacked_bytes = 0
        self.space = threading.Condition()
        self.lock = threading.RLock()  # every future of this connection shares it
        self.cancels: list[int] = []
        self.welcomed = threading.Event()  # the first WELCOME
        self.error: BaseException | None = None
        self.closed = False
        self.master = "?"
        self.epoch: str | None = None  # the store our jobs are in (the first WELCOME's)
        self.store = "?"
        self.heartbeat = defaults.HEARTBEAT
        self.master_workers: int | None = None
        self.master_queued = 0
        self.sent_fns: set[str] = set()
        self.scattered: set[str] = set()  # hashes of the data this session scattered
        self.fetching: dict[int, Future | Delivery] = {}  # seq -> a finished job whose kept value we asked for
        self.fetches: list[int] = []  # to ask for
        self.traffic = {"sent": 0, "received": 0}  # bytes of blobs: submitted, and results received
        self.resend_below: int | None = None  # submissions under this seq may be a second copy
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_pending = False
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self.link = Link(self.ctx, self.poller, key, cluster, explicit, who="this client",
                         hello=self._hello, master_timeout=master_timeout)  # fmt: skip
        self.encrypt = self.link.encrypt
        self.thread = threading.Thread(target=self._run, name="cw-client-io", daemon=True)
        self.thread.start()
        _open.add(self)
        if not self.welcomed.wait(connect_timeout) and self.error is None:
            self.error = NoMasterError(
                f"no cw master answered at {self.address} within {connect_timeout:.0f} s (is it"
                " running? is the address reachable from here? does it encrypt, and we not, or"
                " the reverse?)"
            )
        if self.error is not None:
            err = self.error
            self.close()
            raise err

    @property
    def address(self) -> str:
        return self.link.address

    # -- called from user threads -------------------------------------------------
    def submit(self, fn_hash: str, fn_blob: bytes, args: bytes, key: str | None, opts: dict | None,
               sink: Callable | None = None, kill: bool = True) -> Future | Delivery:  # fmt: skip
        """Queue a job; its outcome goes to a new Future, or to ``sink`` when given.

        ``kill``: whether the future's ``cancel()`` kills a running job (see Future).
        """
        if self.error is not None:
            raise self.error
        if self.closed:
            raise ClientError("this client is closed: make a new one to submit more jobs")
        with self.space:
            while (len(self.unacked) >= defaults.MAX_UNACKED_JOBS
                   or self.unacked_bytes >= defaults.MAX_UNACKED_BYTES) and not self.closed:  # fmt: skip
                self.space.wait(1.0)  # backpressure: the master has not caught up
            seq = next(self.seq)
            fut = Future(seq, self, kill) if sink is None else Delivery(seq, sink)
            if sink is None:
                fut.key = key
            self.futures[seq] = fut
            sub = (seq, fn_hash, fn_blob, key, opts, args)
            self.unacked[seq] = sub
            self.unacked_bytes += len(args)
            self.outq.append(sub)
        self._wake()
        return fut

    def submit_many(self, fn_hash: str, fn_blob: bytes, blobs: list[bytes], keys: list | None,
                    opts: dict | None, kill: bool = True) -> list[Future]:  # fmt: skip
        """Queue many jobs of one function at once (one lock, one wake-up); their futures."""
        if self.error is not None:
            raise self.error
        if self.closed:
            raise ClientError("this client is closed: make a new one to submit more jobs")
        n = len(blobs)
        with self.space:
            while (len(self.unacked) + n > max(defaults.MAX_UNACKED_JOBS, n)
                   or self.unacked_bytes >= defaults.MAX_UNACKED_BYTES) and not self.closed:  # fmt: skip
                self.space.wait(1.0)  # backpressure: the master has not caught up
            first = next(self.seq)
            self.seq = itertools.count(first + n)
            futures = [Future(seq, self, kill) for seq in range(first, first + n)]
            if keys is not None:
                for f, k in zip(futures, keys):
                    f.key = k
            self.futures.update(zip(range(first, first + n), futures))
            subs = [(first + i, fn_hash, fn_blob, None if keys is None else keys[i], opts, blob)
                    for i, blob in enumerate(blobs)]  # fmt: skip
            self.unacked.update((sub[0], sub) for sub in subs)
            self.unacked_bytes += sum(map(len, blobs))
            self.outq.extend(subs)
        self._wake()
        return futures

    def output(self, seq: int, job: int | None = None) -> tuple[int | None, str | None, str | None]:
        """A finished job's (status, stdout, stderr), asked of the master (None while unfinished):
        by the id of the job that answered when known (a stored result's is an earlier job's)."""
        header = {"session": self.session, "seq": seq}
        if job is not None:
            header["job"] = job
        h = ask(self.address, self.key, P.OUTPUT, header, timeout=self.connect_timeout, encrypt=self.encrypt)
        return h.get("status"), h.get("stdout"), h.get("stderr")

    def scatter(self, data_hash: str, blob: bytes, broadcast: bool) -> None:
        """Send data once, to be named by its hash in any number of jobs' arguments."""
        if self.error is not None:
            raise self.error
        if self.closed:
            raise ClientError("this client is closed: make a new one to scatter data")
        with self.space:
            if data_hash in self.scattered and not broadcast:
                return
            self.scattered.add(data_hash)
            seq = next(self.seq)
            sub = (seq, None, None, data_hash, bool(broadcast), blob)
            self.unacked[seq] = sub
            self.unacked_bytes += len(blob)
            self.outq.append(sub)
        self._wake()

    def fetch(self, futures: list) -> None:
        """Ask the master for values it kept (inputs of other jobs); each future's ``_fill`` gets one."""
        with self.space:
            for f in futures:
                if f._seq not in self.fetching:
                    self.fetching[f._seq] = f
                    self.fetches.append(f._seq)
        self._wake()

    def cancel(self, seq: int) -> None:
        with self.space:
            self.futures.pop(seq, None)
            self.cancels.append(seq)
        self._wake()

    def _wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass

    def flush(self, timeout: float) -> bool:
        """Wait until the master has committed every submission; False on timeout."""
        deadline = time.monotonic() + timeout
        with self.space:
            while self.unacked and self.error is None and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("%d submissions not committed at the master after %.0f s", len(self.unacked), timeout)
                    return False
                self.space.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        """Close, once the master has committed what was submitted (up to EXIT_FLUSH s):
        the jobs run on at the master and land in the store. Pending futures are cancelled."""
        if self.closed:
            return
        if threading.current_thread() is not self.thread and self.thread.is_alive():
            self.flush(defaults.EXIT_FLUSH)
        _open.discard(self)
        self.closed = True
        self._wake()
        if threading.current_thread() is not self.thread:
            self.thread.join(5)
        with self.space:
            self.space.notify_all()
        for fut in list(self.futures.values()):
            fut._cancel(kill=True)
        self._wake_r.close()
        self._wake_w.close()

    # -- the I/O thread -----------------------------------------------------------
    def _hello(self) -> None:
        """(Re)introduce this session; after a break, ask for what finished meanwhile."""
        self.link.welcomed = False
        self.sent_fns = set()
        header = {"role": "client", "session": self.session, "run": self.run,
                  "context": self.context, "versions": runtime_versions()}  # fmt: skip
        if self.unsatisfiable != defaults.UNSATISFIABLE_TIMEOUT:
            header["unsatisfiable"] = self.unsatisfiable
        if self.welcomed.is_set():
            with self.space:
                header["waiting"] = [s for s in list(self.futures) if s not in self.unacked]
        self.link.send(P.HELLO, header)

    def _run(self) -> None:
        link = self.link
        try:
            self.poller.register(self._wake_r, zmq.POLLIN)
            link.connect()
            started = time.monotonic()
            idle_since = None
            while not self.closed and self.error is None:
                events = dict(self.poller.poll(250))
                if self._wake_r.fileno() in events or self._wake_r in events:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    self._wake_pending = False
                if link.readable(events):
                    self._read()
                if link.welcomed:
                    self._send_submissions()
                now = time.monotonic()
                if link.welcomed and now - link.last_sent >= self.heartbeat:
                    link.send(P.HEARTBEAT)  # a restarted master answers: say HELLO again
                if not self.welcomed.is_set() and now - started > self.connect_timeout:
                    break  # the constructor raises NoMasterError
                try:
                    link.keep_alive(now)
                except AuthenticationError as e:
                    self._refused(e)
                idle_since = self._watch_workers(now, idle_since)
        except BaseException as e:  # noqa: B036 - never die silently: fail every waiting future
            log.exception("cw client I/O thread failed")
            self.error = e if isinstance(e, Exception) else ClientError(f"the client's I/O thread died: {e!r}")
        finally:
            if self.error is not None:
                for fut in list(self.futures.values()):
                    if not fut.done():
                        fut.set_exception(self.error)
                self.futures.clear()
            try:
                if link.welcomed and self.error is None:
                    link.send(P.BYE)
                link.close()
            finally:
                self.ctx.term()

    def _watch_workers(self, now: float, since: float | None) -> float | None:
        """Warn (not fail) when jobs wait and the master has had no worker for a while."""
        if self.master_workers != 0 or not self.futures or not self.master_queued:
            return None
        if since is None:
            return now
        if now - since >= defaults.NO_WORKERS_WARNING:
            log.warning("%d jobs queued at master %s (%s), which has had no worker for %.0f s",
                        self.master_queued, self.master, self.address, now - since)  # fmt: skip
            return now
        return since

    def _send_submissions(self) -> None:
        q = self.outq
        while q:
            subs = [q.popleft() for _ in range(min(len(q), defaults.BATCH_JOBS))]
            new_fn = []  # each function's bytes travel with its first job on this link
            for s in subs:
                new_fn.append(s[1] is not None and s[1] not in self.sent_fns)
                self.sent_fns.add(s[1])
            sizes = [len(s[5]) + (len(s[2]) if first else 0) for s, first in zip(subs, new_fn)]
            for part in P.batches(sizes):
                batch = subs[part]
                fns = [(s[1], s[2]) for s, first in zip(batch, new_fn[part]) if first]
                header: dict = {"j": [(s[0], s[1], s[3], s[4]) for s in batch if s[1] is not None]}  # SubmitSpec rows
                if fns:
                    header["f"] = [h for h, _ in fns]
                data = [s for s in batch if s[1] is None]  # scattered: after the functions
                if data:
                    header["x"] = [(s[0], s[3], s[4]) for s in data]
                if self.resend_below is not None and batch[0][0] < self.resend_below:
                    header["resend"] = True
                blobs = [*(s[5] for s in batch if s[1] is not None), *(b for _, b in fns), *(s[5] for s in data)]
                self.link.send(P.SUBMIT, header, blobs)
                self.traffic["sent"] += sum(map(len, blobs))
        if self.fetches:
            with self.space:
                seqs, self.fetches = self.fetches, []
            if not self.link.send(P.NEED, {"s": seqs}):  # the connection just went
                with self.space:
                    self.fetches[:0] = seqs
        if self.cancels:
            with self.space:
                cancels, self.cancels = self.cancels, []
            if not self.link.send(P.CANCEL, {"s": cancels}):  # the connection just went
                with self.space:
                    self.cancels[:0] = cancels

    def _refused(self, e: AuthenticationError) -> None:
        self.error = e
        self.welcomed.set()

    def _welcome(self, h: dict) -> None:
        self.master = h.get("master") or "?"
        self.heartbeat = float(h.get("heartbeat") or defaults.HEARTBEAT)
        epoch, store = h.get("epoch"), h.get("store") or "?"
        if self.epoch is not None and epoch != self.epoch:
            self._store_replaced(epoch, store)
        self.epoch, self.store = epoch, store
        if self.welcomed.is_set():  # back after a break: resend what was not acknowledged
            with self.space:
                self.outq.clear()
                self.outq.extend(sorted(self.unacked.values()))
                self.resend_below = max(self.unacked, default=-1) + 1
                self.fetches = list(self.fetching)  # kept values asked of the last master: ask again
            log.warning("reconnected to master %s at %s; resending %d submissions",
                        self.master, self.address, len(self.outq))  # fmt: skip
        self.welcomed.set()

    def _read(self) -> None:
        try:
            for kind, h, blobs in self.link.recv():
                if kind == P.RESULT:
                    self.traffic["received"] += sum(map(len, blobs))
                    if "g" in h:
                        self._started(h["g"])
                    if "s" in h:
                        self._acked(h["s"])
                    self._results(h["r"], blobs, h.get("k"))
                elif kind == P.ACK:
                    if "g" in h:
                        self._started(h["g"])
                    self._acked(h["s"])
                elif kind == P.HEARTBEAT:
                    self.master_workers = h.get("workers")
                    self.master_queued = h.get("queued", 0)
                    for text in h.get("notices", ()):
                        log.warning("master %s: %s", self.master, text)
                elif kind == P.WELCOME:
                    self._welcome(h)
                elif kind == P.BYE:
                    if h.get("rehello"):  # the master restarted and does not know us yet
                        self._hello()
                    else:
                        (log.error if h.get("fatal") else log.warning)("master %s: %s", self.master, h.get("why"))
                        self.link.drop()
                        return
        except AuthenticationError as e:
            self._refused(e)

    def _store_replaced(self, epoch: str | None, store: str) -> None:
        """The master now serves another store: what we submitted was in the old one."""
        err = StoreReplacedError(
            f"the master at {self.address} now serves another store ({store}, epoch {epoch});"
            f" the jobs this client submitted were in the store it replaced ({self.store}, epoch"
            f" {self.epoch}) and are lost with it: submit them again"
        )
        log.error("%s", err)
        with self.space:
            futures, self.futures = list(self.futures.values()), {}
            self.unacked.clear()
            self.unacked_bytes = 0
            self.outq.clear()
            self.space.notify_all()
        for fut in futures:
            fut._settle(err, True)

    def _acked(self, seqs: list[int]) -> None:
        """The master committed these submissions: forget their bytes."""
        with self.space:
            for seq in seqs:
                sub = self.unacked.pop(seq, None)
                if sub is not None:
                    self.unacked_bytes -= len(sub[5])
            self.space.notify_all()

    def _started(self, seqs: list[int]) -> None:
        """Workers started these jobs: their futures are RUNNING."""
        futures = self.futures
        for seq in seqs:
            fut = futures.get(seq)
            if fut is not None:
                fut._started()

    def _results(self, rows: list, blobs: list[bytes], kept: list | None = None) -> None:
        """Complete futures. Nothing a payload does may stop this thread: a value or
        exception that cannot be rebuilt fails its own future, and the others go on.

        A value ``kept`` at the master (an input of other jobs) is fetched only when
        wanted: such a future completes now and asks for it in ``result()``; one with
        callbacks (they may read it on this thread) or a ClientThread's asks now."""
        futures = self.futures
        kept = set(kept) if kept else ()
        for row, blob in zip(rows, blobs):
            seq, status, err, tb = row[:4]  # a protocol.ClientResult
            job = row[4] if len(row) > 4 else None  # the store's id of the job that answered
            what = f"job {job}" if job is not None else "a job"
            if seq in kept:
                fut = futures.get(seq)
                if fut is None:
                    continue
                if job is not None and type(fut) is Future:
                    fut.jobid = job
                if isinstance(fut, Future) and not fut._done_callbacks:
                    del futures[seq]
                    fut._kept()
                else:
                    with self.space:
                        self.fetches.append(seq)
                continue
            waiter = self.fetching.pop(seq, None) if self.fetching else None
            fut = futures.pop(seq, None)
            if fut is None:
                if waiter is not None and isinstance(waiter, Future):
                    fut = waiter
                    if status == P.OK:
                        try:
                            fut._fill(loads(blob), False)
                        except BaseException as e:  # noqa: B036
                            fut._fill(SerializationError(f"cannot unpickle the result of {what}: {e!r}"), True)
                    elif status == P.CANCELLED:
                        fut._fill(cf.CancelledError(f"{what} was cancelled"), True)
                    else:
                        fut._fill(error_for(status, err, tb, blob, self.session), True)
                continue
            if job is not None and type(fut) is Future:
                fut.jobid = job  # a Future's number is the store's; a Delivery keeps its thread's
            if status == P.OK:
                try:
                    value = loads(blob)
                except BaseException as e:  # noqa: B036 - e.g. SystemExit from a __reduce__
                    fut._settle(SerializationError(f"cannot unpickle the result of {what}: {e!r}"), True)
                    continue
                fut._settle(value, False)
            elif status == P.CANCELLED:  # by another client API, or a retry of the run
                fut._settle(cf.CancelledError(f"{what} was cancelled"), True)
            else:
                fut._settle(error_for(status, err, tb, blob, self.session), True)
