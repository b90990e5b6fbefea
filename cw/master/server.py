"""The master's loop: read, commit, then answer. One thread, one ROUTER socket.

Each turn of the loop drains what has arrived (up to ``MASTER_TURN``
messages), writes it to the store in one transaction and commits; only then
are workers given tasks (placed by :class:`~cw.master.policy.Policy`) and
clients answered: acknowledgements and results reach a client after their
commit. What the master does for clients is in :mod:`cw.master.clients`, for
workers in :mod:`cw.master.workers`; this module owns the socket, the turn,
the timers and the status document.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import socket
import threading
import time
from typing import Any, Deque, Sequence

import zmq

from .. import defaults, system, trace
from .. import protocol as P
from ..discovery import ClusterDir, advertised_host, master_info, pid_alive
from ..errors import ConfigError, ProtocolError, StoreConflict, StoreError
from ..link import RateLimited, recv_routed, send_frames
from ..store import Outcome, Store
from .clients import ClientHandlers, Session, refusal
from .door import Door
from .graph import GraphHandlers
from .policy import Job, Policy, Worker
from .status import StatusReport, stderr_tail
from .workers import WorkerHandlers

log = logging.getLogger(__name__)
_POLLIN, _EVENTS_OPT = int(zmq.POLLIN), int(zmq.EVENTS)  # plain ints: an enum's & costs microseconds


class Master(ClientHandlers, WorkerHandlers, GraphHandlers, StatusReport):
    """A master on one cluster directory: its lock, key, store and published address."""

    def __init__(
        self,
        cluster: ClusterDir,
        bind: str = "*",
        port: int | None = None,
        host: str | None = None,
        interface: str | None = None,
        heartbeat: float = defaults.HEARTBEAT,
        worker_timeout: float = defaults.WORKER_TIMEOUT,
        max_message: int = defaults.MAX_MESSAGE,
        queue_window: int = defaults.QUEUE_WINDOW,
        publish: bool = True,
        watch_pid: int | None = None,
        encrypt: bool = False,
        max_connections: int = defaults.MAX_CONNECTIONS,
    ):
        self.cluster = cluster
        if not cluster.lock():
            info = cluster.read_master() or {}
            raise ConfigError(
                f"a master is already running on {cluster.path} "
                f"(pid {info.get('pid', '?')} on {info.get('host', '?')}, {info.get('address', '?')})"
            )
        self.key = cluster.key(create=True)
        if encrypt:
            cluster.set_encrypted()  # workers and clients of this cluster follow
        self.encrypt = cluster.encrypted()
        try:  # checked (sound, writable) before anything is bound or published
            self.store = Store(cluster.store_path)
        except BaseException:
            cluster.unlock()
            raise
        self.heartbeat, self.worker_timeout = heartbeat, worker_timeout
        self.bad = RateLimited(log, "dropped unverifiable messages")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message + defaults.HEADER_ROOM)
        # outbound: never dropped (flow control is by credit and acknowledgements, and a
        # peer without a session gets a few rate-limited replies at most); inbound: a
        # connection that sends faster than we read waits (backpressure, never drops)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, defaults.PEER_QUEUE)
        # the gate (ZAP), the connection count and the sessions: before anyone can connect
        self.door = Door(self.ctx, self.sock, self.key, self.encrypt, self.bad, max_connections)
        self.door.epoch = self.store.epoch
        self.channels = self.door.channels  # routing id -> live session
        self.port = self._bind(bind, port)
        self.host = advertised_host(host, interface)
        self.address = bind if bind.startswith("ipc://") else f"tcp://{self.host}:{self.port}"
        # the idle time after which a session is forgotten: peers heartbeat every heartbeat
        self.session_idle = max(defaults.SESSION_IDLE, 10 * heartbeat, 3 * worker_timeout)
        self._next_expiry = 0.0
        self.publish = publish
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self.policy = Policy(window=queue_window)
        self.sessions: dict[str, Session] = {}
        self.peers: dict[bytes, Session | Worker] = {}  # routing id -> who speaks on it
        self.functions: dict[str, bytes] = {}
        self.watch_pid = watch_pid
        self.backlog_from: int | None = 0  # first job id known only to the store
        self.backlog = 0  # how many jobs wait in the store only
        self.stopping = threading.Event()
        self._dirty: set[Session] = set()
        self._warned: set[tuple[str, str]] = set()
        self._unmet: dict[str, float] = {}  # requirement no worker offers -> when clients were warned
        self._compat: dict[tuple[str, str], str | None] = {}  # (session, worker) -> why not
        self.post_mortems: dict[str, str] = {}  # worker id -> what the batch system said
        self._pm_queue: queue.SimpleQueue = queue.SimpleQueue()
        self.started = time.time()
        self.done = self.failed = self.submitted = 0
        self.failures: Deque[dict] = collections.deque(maxlen=defaults.STATUS_FAILURES)
        self.counts: Deque[tuple] = collections.deque(maxlen=defaults.STATUS_SAMPLES)  # (t, in, out)
        self.failure: StoreError | None = None  # why the store failed; the master then stops
        self.release = False  # large payloads passed: hand freed memory back to the system
        self._released = 0.0
        self._graph_init()
        # after a crash: the workers that were connected may hold jobs, or their results; give
        # out no job until they are back (or worker_timeout passed), so that none runs twice
        self.expected = set(self.store.connected_workers())
        self.expect_until = time.monotonic() + worker_timeout
        self._load_backlog()
        if self.backlog_from is not None:
            self.backlog = self.store.count_pending(self.backlog_from - 1)
        if self.policy.jobs:
            log.warning("recovered %d unfinished jobs from %s", len(self.policy.jobs) + self.backlog,
                        self.store.path)  # fmt: skip

    def _bind(self, bind: str, port: int | None) -> int:
        if bind.startswith(("ipc://", "tcp://", "inproc://")):
            self.sock.bind(bind)
            ep = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
            return int(ep.rsplit(":", 1)[1]) if ep.startswith("tcp://") else 0
        if port is None:
            try:
                self.sock.bind(f"tcp://{bind}:{defaults.PORT}")
                return defaults.PORT
            except zmq.ZMQError:
                log.info("port %d is taken, binding a random port", defaults.PORT)
                port = 0
        if port == 0:
            return self.sock.bind_to_random_port(f"tcp://{bind}")
        self.sock.bind(f"tcp://{bind}:{port}")
        return port

    # -- the loop ----------------------------------------------------------------
    def serve(self) -> None:
        if self.publish:
            self.cluster.publish(master_info(self.address, self.host, self.port, self.store.path))
        log.info("master %s listening on %s%s; published %s", self.id, self.address,
                 " (encrypted: CurveZMQ)" if self.encrypt else "", self.cluster.master_json)  # fmt: skip
        poller = zmq.Poller()
        sock = self.sock
        for s in (sock, self.door.monitor, self.door.zap):
            poller.register(s, zmq.POLLIN)
        noblock = int(zmq.NOBLOCK)
        next_timer = 0.0
        try:
            while not self.stopping.is_set():
                events = poller.poll(10 if self._dirty else 100)
                if events:
                    if len(events) > 1 or events[0][0] is not sock:
                        self.door.service()
                    n = 0
                    # asking is cheaper than the exception of an empty socket
                    while n < defaults.MASTER_TURN and sock.getsockopt(_EVENTS_OPT) & _POLLIN:
                        try:
                            frames = recv_routed(sock, noblock)
                        except zmq.Again:
                            break
                        except Exception as e:  # MemoryError above all: drop it, keep serving
                            self._unreadable(e)
                            continue
                        self._handle(frames)
                        n += 1
                        if self.stopping.is_set():
                            break
                self._end_turn()
                now = time.monotonic()
                if now >= next_timer:
                    self._timers(now)
                    next_timer = now + min(self.heartbeat, self.worker_timeout) / 4
                if self.release and now - self._released >= 1.0:
                    system.release_memory()
                    self.release, self._released = False, now
        finally:
            self.close()
        if self.failure is not None:
            raise self.failure

    def _unreadable(self, e: Exception) -> None:
        """A message could not even be received (no memory for it): skip what is left of it."""
        self.bad(f"a message could not be received: {e!r}")
        try:
            while self.sock.getsockopt(zmq.RCVMORE):
                self.sock.recv(zmq.NOBLOCK, copy=False)
        except Exception:
            pass

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        if self.failure is None:
            for ident in list(self.peers):
                self._send(ident, P.BYE, {"why": "master shutting down"})
        try:
            self.store.close(failed=self.failure is not None)
        except StoreError as e:
            log.error("closing the store: %s", e)
        finally:
            if self.publish:
                self.cluster.unpublish(os.getpid())
            self.door.close()
            self.sock.close(linger=2000 if self.failure is not None else 500)  # a failure's BYE must get out
            self.ctx.term()
            self.cluster.unlock()
            log.info("master %s stopped", self.id)

    def _send(self, ident: bytes, kind: bytes, header: Any = None, blobs: Sequence[bytes] = ()) -> None:
        ch = self.channels.get(ident)
        if ch is None:  # its session is over: nobody could read it
            return
        frames = ch.pack(kind, header, blobs)
        send_frames(self.sock, [ident, *frames], 0, sum(map(len, blobs)) < defaults.ZERO_COPY_BYTES)

    def _handle(self, frames: list[bytes]) -> None:
        ident = frames[0]
        ch = self.channels.get(ident)
        got = failed = None
        try:
            if ch is not None:
                try:
                    got = ch.unpack(frames, 1, None, True)  # large blobs keep their digests
                except ProtocolError as e:
                    failed = e
            if got is None:  # a handshake, or a stranger: the door decides
                got = self.door.stranger(ident, frames, failed)
                if got is None:
                    return
        except ProtocolError as e:
            self.bad(f"from peer {ident.hex()}: {e}")
            return
        except Exception as e:  # no message may stop the loop (MemoryError included)
            self.bad(f"from peer {ident.hex()}: cannot verify it: {e!r}")
            return
        kind, header, blobs = got
        peer = self.peers.get(ident)
        try:
            if kind == P.HELLO:
                if header.get("role") == "worker":
                    self._worker_hello(ident, header)
                else:
                    self._client_hello(ident, header)
            elif kind == P.STATUS:  # any key holder may ask; no HELLO needed
                self._send(ident, P.STATUS, self.status())
            elif kind == P.RETRY:
                self._send(ident, P.STATUS, {"retried": self._retry(str(header["run"]))})
            elif kind == P.OUTPUT:  # read-only; any key holder may ask
                self._send(ident, P.STATUS, self._output(header))
            elif kind in (P.PAUSE, P.RESUME) and not isinstance(peer, Worker):  # any key holder; no HELLO needed
                self._send(ident, P.STATUS, self._control(kind, header))
            elif peer is None:  # its session is live, but it has not said HELLO (or we forgot it)
                if kind == P.BYE:  # the end of a one-shot request
                    self.door.forget(ident)
                else:  # what it sends meanwhile (results too) does not count: HELLO again
                    self._send(ident, P.BYE, {"why": "unknown peer, say HELLO", "rehello": True})
            elif isinstance(peer, Worker):
                self._from_worker(peer, kind, header, blobs)
            else:
                self._from_client(peer, kind, header, blobs)
        except StoreConflict as e:
            log.error("refused a %s message from %r: %s", kind.decode(), peer or ident.hex(), e)
        except StoreError as e:  # disk full, I/O error: the store is unusable
            self._store_failed(e)
        except Exception:
            # signed by a key holder: a message of another version of cw, or a bug here
            log.exception("cannot handle a %s message from %r", kind.decode(), peer or ident.hex())

    # -- jobs ----------------------------------------------------------------------
    def _enqueue(self, job: Job, front: bool = False) -> None:
        # a nested job goes first: its parent waits for it (depth first keeps few parents waiting)
        self.policy.enqueue(job, front or job.parent is not None)
        if job.session is not None:
            job.session.jobs[job.seq] = job

    def _requeue(self, job: Job) -> None:
        job.worker = job.started_at = None
        job.queued_at = time.time()
        self._enqueue(job, front=True)

    def _finish(self, job: Job, status: int, blob: bytes, err, tb, wid, runtime, store=True,
                stdout=None, stderr=None) -> Outcome:  # fmt: skip
        """Record a job's outcome and queue it for its client (sent after the commit).

        Its start is not stored when it ran: the store reads it as finish minus runtime.
        """
        self.policy.forget(job)
        self.done += 1
        now = time.time()
        outcome = (job.id, status, blob, err, tb, wid, runtime, now, job.queued_at,
                   job.started_at if runtime is None else None, stdout, stderr)  # an Outcome row
        if store:
            self.store.add_results([outcome])
        kept = self._graph_finished(job, status, blob, err, tb)  # an input of other jobs: its value stays
        s = job.session
        if status and status != P.CANCELLED:  # failed
            self.failed += 1
            self.failures.append(self._failure(job, status, err, wid, now))
            if stderr:  # the client's exception carries the last lines of the job's stderr
                tb = (tb or "") + stderr_tail(job.id, stderr)
            if s is not None:
                s.failed += 1
        elif s is not None:
            s.done += 1  # done, or cancelled
        if s is not None:
            s.jobs.pop(job.seq, None)
            s.finished(job.seq, job.id)
            s.results.append((job.seq, status, err, tb, job.id))  # a ClientResult row
            if kept:
                s.kept.add(job.seq)
                s.blobs.append(b"")
            else:
                s.blobs.append(blob)
            self._dirty.add(s)
        if job.followers:  # submissions of the same run, function and key attached to it
            self.store.add_aliases([(fs.id, fseq, job.id) for fs, fseq in job.followers])
            for fs, fseq in job.followers:
                fs.jobs.pop(fseq, None)
                fs.finished(fseq, job.id)
                fs.acks.append(fseq)  # never acknowledged before: it rides with its result
                fs.results.append((fseq, status, err, tb, job.id))
                if kept:
                    fs.kept.add(fseq)
                fs.blobs.append(b"" if kept else blob)
                self._dirty.add(fs)
        return outcome

    def _load_backlog(self) -> None:
        """Refill the in-memory window from jobs that so far live only in the store."""
        want = self.policy.room() if self.backlog_from is not None else 0
        if not want:
            return
        rows = self.store.pending(self.backlog_from - 1, want)
        taken = 0
        edges = self.store.graph_of([r.id for r in rows])
        for row in rows:
            if row.id not in self.policy.jobs and row.id not in self.held:  # (a job attached to is taken in early)
                self._take(row, edges)
                taken += 1
        if len(rows) == want:
            self.backlog_from = rows[-1].id + 1
            self.backlog = max(0, self.backlog - taken)
        else:
            self.backlog_from, self.backlog = None, 0

    def _take(self, row, edges: tuple | None = None) -> Job:
        """A stored job (a QueuedJob) into the queue, with its session: held instead while
        its inputs have no result (``edges``: the store's graph_of, read here if not given).
        One whose options no policy can read (stored by a master that did not check them)
        fails alone."""
        bad = refusal(row)
        job = Job(row.id, self._session(row.session), row.seq, row.fn, row.args, None if bad else row.requires,
                  row.timeout, row.max_retries, row.attempts, row.output_limit, row.key)  # fmt: skip
        if bad:
            self._finish(job, P.FAILED, b"", bad, "", None, None)
            return job
        inputs, uses = edges if edges is not None else self.store.graph_of([row.id])
        job.inputs, job.refs = inputs.get(row.id), uses.get(row.id)
        self._admit(job)
        return job

    # -- end of a turn: commit, then put workers to work, then answer -------------
    def _end_turn(self) -> None:
        try:
            if self.store.commit():
                trace.mark("committed")
            if self.backlog_from is not None:
                self._load_backlog()
        except StoreError as e:
            self._store_failed(e)
            return
        if self.broadcasts:
            self._broadcast()
        if self.policy.workers and self.policy.jobs and not self._awaiting_workers():
            self._dispatch()
        if self._dirty:
            self._answer_clients()

    def _store_failed(self, e: StoreError) -> None:
        """The store failed (disk full, I/O error, damaged, read-only, moved): nothing of
        this turn counts, and the master stops serving.

        Nothing committed is lost. Submissions of this turn are not acknowledged
        (clients resend them to the next master), results of this turn are
        dropped (their jobs run again), and the master exits with an error: it
        must not promise what it cannot keep. Clients and workers are told why.
        """
        if self.failure is not None:
            return
        self.failure = e
        log.critical("%s. The master stops; clients keep their jobs and wait for the next one", e)
        e.reported = True
        try:
            self.store.rollback()
        except StoreError:
            pass
        why = f"the master stopped: {e}"
        for ident, peer in list(self.peers.items()):
            self._send(ident, P.BYE, {"why": why, "fatal": True} if isinstance(peer, Session) else {"why": why})
        for s in self.sessions.values():
            s.acks, s.started, s.results, s.blobs = [], [], [], []
        self._dirty = set()
        self.stop()

    def _check_store_file(self) -> None:
        """The store file removed or replaced under us: save what we hold, then stop."""
        why = self.store.moved()
        if why is None:
            return
        try:
            why += f"; what it held is saved in {self.store.rescue()}"
        except StoreError as e:
            why += f"; saving what it held failed: {e}"
        self._store_failed(StoreError(why, "moved"))

    # -- timers ------------------------------------------------------------------
    def _timers(self, now: float) -> None:
        self.counts.append((now, self.submitted, self.done))
        self._check_workers(now)
        if now >= self._next_expiry:  # sessions silent for a minute are gone
            self._next_expiry = now + 1.0
            for ident in self.door.expire(now, self.session_idle):
                peer = self.peers.pop(ident, None)
                if isinstance(peer, Session) and peer.ident == ident:
                    peer.ident = None
        queued = self.policy.waiting() + self.backlog
        for s in [p for p in self.peers.values() if isinstance(p, Session)]:
            if now - s.last_sent >= self.heartbeat or s.notices:
                hb = {"workers": len(self.policy.workers), "queued": queued}
                if s.notices:
                    hb["notices"], s.notices = s.notices, []
                self._send(s.ident, P.HEARTBEAT, hb)
                s.last_sent = now
        self._check_unschedulable(now)
        if self.watch_pid and not pid_alive(self.watch_pid):
            log.info("process %d ended: stopping", self.watch_pid)
            self.stop()
        try:
            self._record_post_mortems()
            self.store.commit()
            self._check_store_file()
        except StoreError as e:
            self._store_failed(e)
        self._forget_sessions()


def run_master(master: Master, companions: Sequence[Any] = ()) -> None:
    """Serve until SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 (a batch system's warnings before a
    kill: scancel, qdel -notify), with companion threads (a pool's keeper) beside it.

    Each companion has ``start()``, ``stop()`` and ``join(timeout)``; they start
    before the loop and are stopped, and joined, when it ends.
    """

    def stop(*_: Any) -> None:
        for c in companions:
            c.stop()
        master.stop()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, stop)
    for c in companions:
        c.start()
    try:
        master.serve()
    finally:
        for c in companions:
            c.stop()
        for c in companions:
            c.join(defaults.COMPANION_JOIN)
