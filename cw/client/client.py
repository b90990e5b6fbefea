"""Clients: ``Client`` (futures), ``Executor`` (concurrent.futures) and ``ClientThread``.

All three sit on one ``_Connection``: a background I/O thread that owns the
DEALER socket, batches submissions, and completes futures as results arrive.
User threads only append to a queue and poke the I/O thread awake.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import fnmatch
import itertools
import logging
import os
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from typing import Any, Callable, Iterable, Iterator

import zmq

from .. import defaults
from .. import protocol as P
from ..discovery import ClusterDir, resolve_address
from ..errors import (
    AuthenticationError,
    JobCrashedError,
    JobError,
    MessageTooLargeError,
    NoMasterError,
    RemoteImportError,
    SerializationError,
    TimeoutError,
    WorkerLostError,
)
from ..serialize import (
    dumps_args,
    dumps_function,
    dumps_result,
    job_key,
    loads,
    rebuild_exception,
    runtime_versions,
)
from ..serialize import ship_modules as ship

log = logging.getLogger(__name__)

_OPTION_NAMES = ("key", "cache", "requires", "timeout", "max_retries")


class Future(cf.Future):
    """A ``concurrent.futures.Future`` that knows its job id.

    ``cancel()`` also cancels the job: dropped if still queued, killed if running.
    """

    def __init__(self, jobid: int, conn: _Connection | None = None):
        super().__init__()
        self.jobid = jobid
        self._conn = conn

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            conn.cancel(self.jobid)
        return True

    def __repr__(self) -> str:
        return f"<cw.Future job {self.jobid} {self._state.lower()}>"


class _Delivery:
    """A job's outcome handed straight to a callback: 56 bytes where a Future takes 1.5 KB."""

    __slots__ = ("jobid", "sink", "finished")

    def __init__(self, jobid: int, sink: Callable[[int, Any, bool], None]):
        self.jobid, self.sink, self.finished = jobid, sink, False

    def done(self) -> bool:
        return self.finished

    def set_running_or_notify_cancel(self) -> bool:
        return not self.finished

    def set_result(self, value: Any) -> None:
        self.finished = True
        self.sink(self.jobid, value, False)

    def set_exception(self, exc: BaseException) -> None:
        self.finished = True
        self.sink(self.jobid, exc, True)

    def cancel(self) -> bool:
        if self.finished:
            return False
        self.set_exception(cf.CancelledError(f"job {self.jobid} was cancelled"))
        return True


def _error_for(status: int, err: str, tb: str, blob: bytes) -> BaseException:
    if status == P.RAISED:
        return rebuild_exception(blob, err, tb)
    cls = {
        P.IMPORT: RemoteImportError,
        P.CRASHED: JobCrashedError,
        P.LOST: WorkerLostError,
        P.TIMEOUT: TimeoutError,
    }.get(status, JobError)
    return cls(err)


def _context(env: dict | None, env_from: Iterable[str] | None) -> dict:
    """What a job needs to run where the client stands: cwd, sys.path, named variables."""
    variables = dict(env or {})
    for pattern in env_from or ():
        variables.update({k: v for k, v in os.environ.items() if fnmatch.fnmatchcase(k, pattern)})
    return {
        "cwd": os.getcwd(),
        "path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path],
        "env": {str(k): str(v) for k, v in variables.items()},
    }


class _Connection:
    """The I/O thread and socket shared by every client API.

    The link to the master may break (master restarted, network gone): the
    I/O thread then reconnects with backoff, re-reading master.json, says
    HELLO again with the same session, asks for the results that finished
    meanwhile, and resends every submission the master had not acknowledged.
    """

    def __init__(self, address: str, key: bytes, run: str | None, context: dict,
                 cluster: ClusterDir | None, explicit: str | None,
                 connect_timeout: float, master_timeout: float):  # fmt: skip
        self.address, self.key, self.run, self.context = address, key, run, context
        self.cluster, self.explicit = cluster, explicit
        self.connect_timeout, self.master_timeout = connect_timeout, master_timeout
        self.session = uuid.uuid4().hex
        self.seq = itertools.count()
        self.outq: collections.deque = collections.deque()  # submissions for the I/O thread
        self.futures: dict[int, Future] = {}
        self.unacked: dict[int, tuple] = {}
        self.unacked_bytes = 0
        self.space = threading.Condition()
        self.cancels: list[int] = []
        self.welcomed = threading.Event()  # the first WELCOME
        self.linked = False  # the current connection has been welcomed
        self.error: BaseException | None = None
        self.closed = False
        self.bad = P.RateLimited(log, "dropped bad messages from the master")
        self.master_workers: int | None = None
        self.master_queued = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_pending = False
        self.ctx = zmq.Context()
        self.sock = None
        self.thread = threading.Thread(target=self._run, name="cw-client-io", daemon=True)
        self.thread.start()
        if not self.welcomed.wait(connect_timeout) and self.error is None:
            self.error = NoMasterError(
                f"no cw master answered at {address} within {connect_timeout:.0f} s "
                "(is it running? is the address reachable from here?)"
            )
        if self.error is not None:
            err = self.error
            self.close()
            raise err

    # -- called from user threads -------------------------------------------------
    def submit(self, fn_hash: str, fn_blob: bytes, args: bytes, key: str | None, opts: dict | None,
               sink: Callable | None = None) -> Future | _Delivery:  # fmt: skip
        """Queue a job; its outcome goes to a new Future, or to ``sink`` when given."""
        if self.error is not None:
            raise self.error
        if self.closed:
            raise RuntimeError("this client is closed")
        with self.space:
            while (len(self.unacked) >= defaults.MAX_UNACKED_JOBS
                   or self.unacked_bytes >= defaults.MAX_UNACKED_BYTES) and not self.closed:  # fmt: skip
                self.space.wait(1.0)  # backpressure: the master has not caught up
            seq = next(self.seq)
            fut = Future(seq, self) if sink is None else _Delivery(seq, sink)
            self.futures[seq] = fut
            sub = (seq, fn_hash, fn_blob, key, opts, args)
            self.unacked[seq] = sub
            self.unacked_bytes += len(args)
            self.outq.append(sub)
        self._wake()
        return fut

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

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._wake()
        if threading.current_thread() is not self.thread:
            self.thread.join(5)
        with self.space:
            self.space.notify_all()
        for fut in list(self.futures.values()):
            fut.cancel()
        self._wake_r.close()
        self._wake_w.close()

    # -- the I/O thread -----------------------------------------------------------
    def _connect(self) -> None:
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close(linger=0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(self.address)
        self.poller.register(self.sock, zmq.POLLIN)
        self._hello()

    def _hello(self) -> None:
        """(Re)introduce this session; after a break, ask for what finished meanwhile."""
        self.linked = False
        self.sent_fns: set[str] = set()
        header = {"role": "client", "session": self.session, "run": self.run,
                  "context": self.context, "versions": runtime_versions()}  # fmt: skip
        if self.welcomed.is_set():
            with self.space:
                header["waiting"] = [s for s in list(self.futures) if s not in self.unacked]
        self._send(P.HELLO, header)

    def _send(self, kind: bytes, header: Any = None, blobs=()) -> None:
        self.sock.send_multipart(P.pack(self.key, kind, header, blobs), copy=sum(map(len, blobs)) < 65536)
        self.last_sent = time.monotonic()

    last_sent = 0.0
    heartbeat = defaults.HEARTBEAT
    linked_once = False

    def _run(self) -> None:
        try:
            self.poller = zmq.Poller()
            self.poller.register(self._wake_r, zmq.POLLIN)
            self._connect()
            started = self.last_heard = time.monotonic()
            retry_at, backoff, idle_since = 0.0, 1.0, None
            while not self.closed and self.error is None:
                events = dict(self.poller.poll(250))
                if self._wake_r.fileno() in events or self._wake_r in events:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    self._wake_pending = False
                if self.sock in events:
                    self._read()
                    self.last_heard = time.monotonic()
                    backoff = 1.0
                if self.linked:
                    self._send_submissions()
                now = time.monotonic()
                if self.linked and now - self.last_sent >= self.heartbeat:
                    self._send(P.HEARTBEAT)  # a restarted master answers: say HELLO again
                if not self.welcomed.is_set():
                    if now - started > self.connect_timeout:
                        break  # the constructor raises NoMasterError
                elif now - self.last_heard > self.master_timeout and now >= retry_at:
                    self._reconnect(f"silent for {now - self.last_heard:.0f} s", backoff)
                    retry_at, backoff = now + backoff, min(2 * backoff, 30.0)
                idle_since = self._watch_workers(now, idle_since)
        except Exception as e:  # never die silently: fail every waiting future
            log.exception("cw client I/O thread failed")
            self.error = e
        finally:
            if self.error is not None:
                for fut in list(self.futures.values()):
                    if not fut.done():
                        fut.set_exception(self.error)
                self.futures.clear()
            try:
                if self.linked and self.error is None:
                    self._send(P.BYE)
                if self.sock is not None:
                    self.sock.close(linger=1000)
            finally:
                self.ctx.term()

    def _reconnect(self, why: str, backoff: float) -> None:
        if self.explicit is None and self.cluster is not None:  # the master may have moved
            self.address = resolve_address(None, self.cluster) or self.address
        log.warning("master %s (%s): reconnecting to %s, next try in %.0f s",
                    getattr(self, "master", "?"), why, self.address, backoff)  # fmt: skip
        self._connect()

    def _watch_workers(self, now: float, since: float | None) -> float | None:
        """Warn (not fail) when jobs wait and the master has had no worker for a while."""
        if self.master_workers != 0 or not self.futures or not self.master_queued:
            return None
        if since is None:
            return now
        if now - since >= defaults.NO_WORKERS_WARNING:
            log.warning("%d jobs queued at master %s (%s), which has had no worker for %.0f s",
                        self.master_queued, getattr(self, "master", "?"), self.address, now - since)  # fmt: skip
            return now
        return since

    def _send_submissions(self) -> None:
        q = self.outq
        while q:
            specs, args, fns, fn_blobs, size = [], [], [], [], 0
            while q and len(specs) < defaults.BATCH_JOBS:
                nxt = q[0]
                grow = len(nxt[5]) + (len(nxt[2]) if nxt[1] not in self.sent_fns else 0)
                if specs and size + grow > defaults.BATCH_BYTES:
                    break  # a message never outgrows what the master accepts
                seq, fn_hash, fn_blob, key, opts, a = q.popleft()
                if fn_hash not in self.sent_fns:
                    self.sent_fns.add(fn_hash)
                    fns.append(fn_hash)
                    fn_blobs.append(fn_blob)
                specs.append((seq, fn_hash, key, opts))
                args.append(a)
                size += grow
            header = {"j": specs}
            if fns:
                header["f"] = fns
            if self.resend_below is not None and specs[0][0] < self.resend_below:
                header["resend"] = True
            self._send(P.SUBMIT, header, [*args, *fn_blobs])
        if self.cancels:
            with self.space:
                cancels, self.cancels = self.cancels, []
            self._send(P.CANCEL, {"s": cancels})

    resend_below: int | None = None  # submissions under this seq may be a second copy

    def _welcome(self, h: dict) -> None:
        self.master = h.get("master")
        self.heartbeat = float(h.get("heartbeat") or defaults.HEARTBEAT)
        if self.welcomed.is_set():  # back after a break: resend what was not acknowledged
            with self.space:
                self.outq.clear()
                self.outq.extend(sorted(self.unacked.values()))
                self.resend_below = max(self.unacked, default=-1) + 1
            log.warning("reconnected to master %s at %s; resending %d submissions",
                        self.master, self.address, len(self.outq))  # fmt: skip
        self.linked = self.linked_once = True
        self.welcomed.set()

    def _read(self) -> None:
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                kind, h, blobs = P.unpack(self.key, frames)
            except Exception as e:
                why = P.is_reject(frames)
                if why is not None and self.linked_once:  # another master took the address
                    log.warning("master at %s rejects our key now (%s): looking for ours", self.address, why)
                    self.linked = False
                    self.last_heard = time.monotonic() - self.master_timeout - 1  # as if silent
                    return
                if why is not None:
                    self.error = AuthenticationError(
                        f"the master at {self.address} rejected our messages ({why}): this client's "
                        f"key is not the master's. Use the same CW_HOME/CW_CLUSTER (key file "
                        f"{self.cluster.key_path if self.cluster else '?'}) or CW_KEY as the master."
                    )
                    self.welcomed.set()
                    return
                self.bad(str(e))
                continue
            if kind == P.RESULT:
                if "s" in h:
                    self._acked(h["s"])
                self._results(h["r"], blobs)
            elif kind == P.ACK:
                self._acked(h["s"])
            elif kind == P.HEARTBEAT:
                self.master_workers = h.get("workers")
                self.master_queued = h.get("queued", 0)
                for text in h.get("notices", ()):
                    log.warning("master %s: %s", getattr(self, "master", "?"), text)
            elif kind == P.WELCOME:
                self._welcome(h)
            elif kind == P.BYE:
                if h.get("rehello"):  # the master restarted and does not know us yet
                    self._hello()
                else:
                    (log.error if h.get("fatal") else log.warning)("master %s: %s", getattr(self, "master", "?"), h.get("why"))
                    self.linked = False
                    self.last_heard = time.monotonic() - self.master_timeout - 1  # reconnect now

    def _acked(self, seqs: list[int]) -> None:
        """The master committed these submissions: forget their bytes."""
        with self.space:
            for seq in seqs:
                sub = self.unacked.pop(seq, None)
                if sub is not None:
                    self.unacked_bytes -= len(sub[5])
            self.space.notify_all()

    def _results(self, rows: list, blobs: list[bytes]) -> None:
        futures = self.futures
        for (seq, status, err, tb), blob in zip(rows, blobs):
            fut = futures.pop(seq, None)
            # RUNNING from here on: a user's cancel() can no longer race set_result()
            if fut is None or not fut.set_running_or_notify_cancel():
                continue
            if status == P.OK:
                try:
                    value = loads(blob)
                except Exception as e:
                    fut.set_exception(SerializationError(f"cannot unpickle the result of job {seq}: {e!r}"))
                    continue
                fut.set_result(value)
            elif status == P.CANCELLED:  # by another client API, or a retry of the run
                fut.set_exception(cf.CancelledError(f"job {seq} was cancelled"))
            else:
                fut.set_exception(_error_for(status, err, tb, blob))


class Client:
    """Futures on a cw cluster: ``submit``, ``map``, ``gather``, ``as_completed``.

    ``Client()`` finds the master through ``$CW_ADDRESS`` or master.json in the
    cluster directory; with none, it starts an embedded local cluster.
    ``Client(serial=True)`` runs every job in-process, in order, after the same
    serialization round trip a cluster would make.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        run: str | None = None,
        cluster: str | os.PathLike | None = None,
        serial: bool = False,
        n_workers: int | None = None,
        env: dict | None = None,
        env_from: Iterable[str] | None = None,
        ship_modules: Iterable[Any] = (),
        timeout: float | None = None,
        max_retries: int | None = None,
        connect_timeout: float = defaults.CONNECT_TIMEOUT,
        master_timeout: float = defaults.MASTER_TIMEOUT,
    ):
        self.run = run
        self.serial = serial
        self.defaults = {"t": timeout, "m": max_retries}
        self._local = None
        self._conn: _Connection | None = None
        if ship_modules:
            ship(ship_modules)
        if serial:
            return
        cdir = _cluster_dir(cluster)
        resolved = resolve_address(address, cdir)
        if resolved is None:
            from ..launchers.local import LocalCluster

            self._local = LocalCluster(n_workers=n_workers)
            cdir, resolved = self._local.cluster, self._local.address
        try:
            self._conn = _Connection(
                resolved, cdir.key(), run, _context(env, env_from), cdir, address,
                connect_timeout, master_timeout,
            )  # fmt: skip
        except BaseException:
            if self._local is not None:
                self._local.close()
            raise

    @property
    def address(self) -> str | None:
        return self._conn.address if self._conn else None

    def __repr__(self) -> str:
        where = "serial" if self.serial else self.address
        return f"<cw.Client {where} run={self.run!r}>"

    # -- submission ---------------------------------------------------------------
    def submit(self, fn: Callable, /, *args: Any, key: str | None = None, cache: bool = True,
               requires: dict | None = None, timeout: float | None = None,
               max_retries: int | None = None, **kwargs: Any) -> Future:  # fmt: skip
        """Run ``fn(*args, **kwargs)`` on the cluster; return its future at once.

        ``key``, ``cache``, ``requires``, ``timeout`` and ``max_retries`` are
        cw's own options and are not passed to ``fn`` (``Executor`` and
        ``ClientThread`` pass every keyword to the function).
        """
        return self._submit(fn, args, kwargs, key=key, cache=cache, requires=requires,
                            timeout=timeout, max_retries=max_retries)  # fmt: skip

    def _submit(self, fn: Callable, args: tuple, kwargs: dict, *, key: str | None = None,
                cache: bool = True, requires: dict | None = None, timeout: float | None = None,
                max_retries: int | None = None, sink: Callable | None = None) -> Future:  # fmt: skip
        fn_hash, fn_blob = dumps_function(fn)
        args_blob = dumps_args(args, kwargs)
        for what, blob in (("arguments", args_blob), ("function", fn_blob)):
            if len(blob) > defaults.MAX_MESSAGE:
                raise MessageTooLargeError(
                    f"the {what} of {getattr(fn, '__qualname__', fn)} pickle to {len(blob)} bytes, more"
                    f" than the largest message ({defaults.MAX_MESSAGE} bytes); put large data on the"
                    " shared filesystem and pass its path"
                )
        if self.serial:
            fut = self._run_serial(fn, args_blob)
            if sink is not None:
                exc = fut.exception()
                sink(fut.jobid, fut.result() if exc is None else exc, exc is not None)
            return fut
        if key is None and self.run is not None and cache:
            key = job_key(fn_hash, args_blob)
        opts = {}
        if not cache:
            opts["c"] = False
        if requires:
            opts["r"] = requires
        t = timeout if timeout is not None else self.defaults["t"]
        if t is not None:
            opts["t"] = float(t)
        m = max_retries if max_retries is not None else self.defaults["m"]
        if m is not None:
            opts["m"] = int(m)
        return self._conn.submit(fn_hash, fn_blob, args_blob, key, opts or None, sink)

    _serial_seq = itertools.count()

    def _run_serial(self, fn: Callable, args_blob: bytes) -> Future:
        """Run now, in this process: the function itself (so a debugger's breakpoints
        hold), on unpickled copies of the arguments, as a worker would get them."""
        fut = Future(next(self._serial_seq))
        args, kwargs = loads(args_blob)
        try:
            value = loads(dumps_result(fn(*args, **kwargs)))
        except Exception as e:
            fut.set_exception(e)
        else:
            fut.set_result(value)
        return fut

    def map(self, fn: Callable, *iterables: Iterable, **options: Any) -> list[Future]:
        """Submit ``fn`` over the zipped iterables; a list of futures, in order."""
        return [self.submit(fn, *args, **options) for args in zip(*iterables)]

    def gather(self, futures: Iterable[cf.Future], timeout: float | None = None) -> list:
        """Results of the futures, in order; raises the first job exception met."""
        futures = list(futures)
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for f in futures:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                out.append(f.result(left))
            except cf.TimeoutError:
                raise TimeoutError(f"gather: {len(futures) - len(out)} jobs unfinished after {timeout} s") from None
        return out

    def cancel(self, futures: Iterable[cf.Future] | cf.Future) -> int:
        """Cancel jobs: queued ones are dropped, running ones killed. How many were cancelled."""
        if isinstance(futures, cf.Future):
            futures = [futures]
        return sum(bool(f.cancel()) for f in futures)

    def status(self) -> dict:
        """The master's view: workers, queued and running jobs."""
        if self._conn is None:
            return {"serial": True}
        from ..link import query_status

        return query_status(self._conn.address, self._conn.key)

    # -- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        """Disconnect; futures still pending are cancelled. Stops an embedded cluster."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._local is not None:
            self._local.close()
            self._local = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _cluster_dir(cluster: str | os.PathLike | None) -> ClusterDir:
    if cluster is None:
        return ClusterDir()
    c = os.fspath(cluster)
    return ClusterDir(path=c) if os.sep in c else ClusterDir(name=c)


def as_completed(futures: Iterable[cf.Future], timeout: float | None = None) -> Iterator[cf.Future]:
    """Futures in the order they finish (``concurrent.futures.as_completed``)."""
    try:
        yield from cf.as_completed(futures, timeout)
    except cf.TimeoutError as e:
        raise TimeoutError(str(e)) from None


class Executor(cf.Executor):
    """A ``concurrent.futures.Executor`` on a cw cluster.

    Code written for ``ProcessPoolExecutor`` runs on cw by changing one line.
    Takes the same arguments as ``Client``.
    """

    def __init__(self, max_workers: int | str | None = None, address: str | None = None, **kwargs: Any):
        """``max_workers`` (as for ProcessPoolExecutor) sizes an embedded local
        cluster; a cluster's size is its own business. An address may come first."""
        if isinstance(max_workers, str):
            max_workers, address = None, max_workers
        if max_workers is not None and "n_workers" not in kwargs:
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            kwargs["n_workers"] = max_workers
        self.client = Client(address, **kwargs)
        self._futures: set[cf.Future] = set()
        self._shutdown = False

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        fut = self.client._submit(fn, args, kwargs)  # every keyword is the function's, as in the pool
        self._futures.add(fut)
        fut.add_done_callback(self._futures.discard)
        return fut

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> Iterator:  # fmt: skip
        """Like ``Executor.map``: results in order; jobs are submitted at once."""
        futures = [self.submit(fn, *args) for args in zip(*iterables)]
        deadline = None if timeout is None else time.monotonic() + timeout

        def results() -> Iterator:
            try:
                for f in futures:
                    yield f.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
            finally:
                for f in futures:
                    f.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        if cancel_futures:
            for f in list(self._futures):
                f.cancel()
        if wait:
            cf.wait(list(self._futures))
        self.client.close()


class ClientThread(threading.Thread):
    """The original Cluster-Workers API: ``callback(jobid, result)`` as jobs finish.

    ``start()`` connects, ``submit(func, *args, **kwargs)`` returns a job id at
    once, ``wait()`` blocks until every submitted job has called back,
    ``stop()`` disconnects. Callbacks run on this thread, one at a time. A job
    that failed calls back with its exception as the result, unless an
    ``error_callback(jobid, exception)`` is given.
    """

    def __init__(self, callback: Callable[[int, Any], None], host: str | None = None,
                 port: int | None = None, *, error_callback: Callable | None = None,
                 **client_kwargs: Any):  # fmt: skip
        super().__init__(name="cw-callbacks", daemon=True)
        self.callback, self.error_callback = callback, error_callback
        self.address = f"{host}:{port}" if host and port else host
        self.client_kwargs = client_kwargs
        self.client: Client | None = None
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._outstanding = 0
        self._idle = threading.Condition()

    def start(self) -> None:
        self.client = Client(self.address, **self.client_kwargs)
        super().start()

    def submit(self, func: Callable, /, *args: Any, **kwargs: Any) -> int:
        if self.client is None:
            raise RuntimeError("call start() before submit()")
        with self._idle:
            self._outstanding += 1
        try:
            return self.client._submit(func, args, kwargs, sink=self._deliver).jobid
        except BaseException:
            with self._idle:
                self._outstanding -= 1
            raise

    def _deliver(self, jobid: int, value: Any, failed: bool) -> None:
        self._done.put((jobid, value, failed))

    def run(self) -> None:
        while True:
            item = self._done.get()
            if item is None:
                return
            jobid, value, failed = item
            try:
                if failed and self.error_callback is not None:
                    self.error_callback(jobid, value)
                else:
                    self.callback(jobid, value)
            except Exception:
                log.error("callback for job %s raised:\n%s", jobid, traceback.format_exc())
            finally:
                with self._idle:
                    self._outstanding -= 1
                    self._idle.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted job has called back; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    def stop(self) -> None:
        """Disconnect; the callback thread ends after the callbacks already due."""
        self._done.put(None)
        if self.client is not None:
            self.client.close()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(10)
