"""``python -m cw.master``: routing, scheduling, heartbeats, recovery.

One thread, one ROUTER socket. Each turn of the loop drains what has arrived,
writes it to the store in one transaction, commits, and only then answers:
acknowledgements and results reach a client after their commit, and tasks
go out in batches to workers with free capacity.

The queue lives in the store: at most ``queue_window`` unfinished jobs are
held in memory; the rest are read back from the store as the window drains.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import signal
import socket
import sqlite3
import threading
import time
from typing import Any, Deque, Optional, Sequence

import zmq

from .. import defaults
from .. import protocol as P
from ..discovery import ClusterDir, advertised_host, master_info, pid_alive
from ..errors import ConfigError, ProtocolError
from ..serialize import incompatibility
from ..store import Store

log = logging.getLogger(__name__)

_MAX_TURN = 2000  # messages handled per turn before committing and answering
_ACK_DELAY = 0.01  # seconds an acknowledgement may wait for a result to carry it


class Job:
    __slots__ = (
        "id", "session", "seq", "fn", "args", "requires", "timeout",
        "max_retries", "attempts", "lost_on", "worker",
    )  # fmt: skip

    def __init__(self, id, session, seq, fn, args, requires, timeout, max_retries, attempts=0):
        self.id, self.session, self.seq, self.fn, self.args = id, session, seq, fn, args
        self.requires, self.timeout, self.max_retries = requires, timeout, max_retries
        self.attempts, self.lost_on, self.worker = attempts, None, None


class Session:
    """A client session; it outlives its connection (its results wait in the store)."""

    def __init__(self, sid: str, run: str | None, context: dict):
        self.id, self.run, self.context = sid, run, context
        self.versions: dict = {}
        self.ident: bytes | None = None
        self.jobs: dict[int, Job] = {}  # seq -> unfinished job held in memory
        self.acks: list[int] = []
        self.results: list[tuple] = []  # (seq, status, error, tb), sent with self.blobs
        self.blobs: list[bytes] = []
        self.notices: list[str] = []
        self.last_sent = 0.0


class Worker:
    def __init__(self, ident: bytes, hello: dict):
        self.ident = ident
        self.id: str = str(hello["id"])
        self.host: str = str(hello.get("host", "?"))
        self.pid = int(hello.get("pid", 0))
        self.slots = max(1, int(hello.get("procs", 1)))
        self.caps: dict = dict(hello.get("caps") or {})
        self.caps.setdefault("cpus", self.slots)
        self.caps.setdefault("host", self.host)
        self.info: dict = dict(hello.get("info") or {})
        self.versions: dict = dict(hello.get("versions") or {})
        self.funcs: set[str] = set(hello.get("have") or ())
        self.ctxs: set[str] = set()
        self.running: dict[int, Job] = {}
        self.started: set[int] | None = None  # the jobs it says it is running, if it said
        self.draining = False
        self.counters: dict = {}
        self.last_seen = self.last_sent = time.monotonic()

    def limit(self, runtime: float | None) -> int:
        """How many jobs of this runtime the worker may hold: slots plus prefetch.

        Short jobs get deep prefetch (a worker never waits for a round trip);
        jobs of unknown or long runtime get one spare per slot, so a burst of
        long jobs spreads over every worker instead of queueing on the first.
        """
        if self.draining:
            return 0
        if runtime is None:
            return self.slots * 2
        extra = int(defaults.PREFETCH_SECONDS / max(runtime, 1e-6))
        return self.slots * (1 + min(max(extra, 1), defaults.PREFETCH_MAX))

    def describe(self) -> str:
        where = batch_label(self.info)
        return f"{self.id}{f' ({where})' if where else ''}"


def batch_label(info: dict, scheduler: bool = True) -> str:
    """'SLURM job 123_4' / 'SGE job 77.3' (or '123_4' / '77.3') from a worker's batch info, or ''."""
    if "SLURM_JOB_ID" in info:
        if "SLURM_ARRAY_JOB_ID" in info:
            job = f"{info['SLURM_ARRAY_JOB_ID']}_{info.get('SLURM_ARRAY_TASK_ID', '?')}"
        else:
            job = str(info["SLURM_JOB_ID"])
        return f"SLURM job {job}" if scheduler else job
    if "JOB_ID" in info:
        task = info.get("SGE_TASK_ID")
        job = f"{info['JOB_ID']}{f'.{task}' if task and task != 'undefined' else ''}"
        return f"SGE job {job}" if scheduler else job
    return ""


def satisfies(caps: dict, requires: dict | None) -> bool:
    """True if a worker with these capabilities can run a job with these requirements."""
    if not requires:
        return True
    for k, want in requires.items():
        have = caps.get(k)
        if k == "tags":
            if not set(want) <= set(have or ()):
                return False
        elif isinstance(want, (int, float)) and not isinstance(want, bool):
            if not isinstance(have, (int, float)) or have < want:
                return False
        elif have != want:
            return False
    return True


class Master:
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
    ):
        self.cluster = cluster
        if not cluster.lock():
            info = cluster.read_master() or {}
            raise ConfigError(
                f"a master is already running on {cluster.path} "
                f"(pid {info.get('pid', '?')} on {info.get('host', '?')}, {info.get('address', '?')})"
            )
        self.key = cluster.key(create=True)
        self.heartbeat, self.worker_timeout = heartbeat, worker_timeout
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message + 65536)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.port = self._bind(bind, port)
        self.host = advertised_host(host, interface)
        self.address = bind if bind.startswith("ipc://") else f"tcp://{self.host}:{self.port}"
        # a peer's TCP connection closing makes silent workers suspect at once
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.disconnected_at = 0.0
        self.store = Store(cluster.store_path)
        self.publish = publish
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self.sessions: dict[str, Session] = {}
        self.peers: dict[bytes, Any] = {}  # routing id -> Session | Worker
        self.workers: dict[bytes, Worker] = {}
        self.functions: dict[str, bytes] = {}
        self.runtimes: dict[str, float] = {}  # function hash -> smoothed job runtime
        self.queues: dict[Optional[str], Deque[Job]] = {None: collections.deque()}
        self.requires: dict[Optional[str], dict] = {None: {}}
        self.jobs: dict[int, Job] = {}  # unfinished jobs held in memory
        self.window = queue_window
        self.watch_pid = watch_pid
        self.backlog_from: int | None = 0  # first job id known only to the store
        self.backlog = 0  # how many jobs wait in the store only
        self.mem_bytes = 0  # argument bytes of the jobs held in memory
        self.unschedulable: dict[Optional[str], float] = {}  # requirement -> since when
        self.bad = P.RateLimited(log, "dropped unverifiable messages")
        self.stopping = threading.Event()
        self._dirty: set[Session] = set()
        self._warned: set[tuple[str, str]] = set()
        self.post_mortems: dict[str, str] = {}  # worker id -> what the batch system said
        self._pm_queue: queue.SimpleQueue = queue.SimpleQueue()
        self.started = time.time()
        self.done = 0
        for sid, (run, ctx) in self.store.sessions().items():
            self.sessions[sid] = Session(sid, run, ctx)
        self._load_backlog()
        if self.backlog_from is not None:
            self.backlog = self.store.count_pending(self.backlog_from - 1)
        if self.jobs:
            log.warning("recovered %d unfinished jobs from %s", len(self.jobs) + self.backlog,
                        self.store.path)  # fmt: skip

    # -- start-up ----------------------------------------------------------------
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
        log.info("master %s listening on %s; published %s", self.id, self.address, self.cluster.master_json)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        recv = self.sock.recv_multipart
        next_timer = 0.0
        try:
            while not self.stopping.is_set():
                events = poller.poll(10 if self._dirty else 100)
                if events:
                    n = 0
                    while n < _MAX_TURN:
                        try:
                            frames = recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames)
                        n += 1
                    if len(events) > 1 or events[0][0] is self.monitor:
                        self._drain_monitor()
                self._end_turn()
                now = time.monotonic()
                if now >= next_timer:
                    self._timers(now)
                    next_timer = now + min(self.heartbeat, self.worker_timeout) / 4
        finally:
            self.close()

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        for ident in list(self.peers):
            self._send(ident, P.BYE, {"why": "master shutting down"})
        try:
            self.store.close()
        finally:
            if self.publish:
                self.cluster.unpublish(os.getpid())
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.sock.close(linger=500)
            self.ctx.term()
            self.cluster.unlock()
            log.info("master %s stopped", self.id)

    def _drain_monitor(self) -> None:
        while True:
            try:
                self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.disconnected_at = time.monotonic()

    def _send(self, ident: bytes, kind: bytes, header: Any = None, blobs=()) -> None:
        frames = P.pack(self.key, kind, header, blobs)
        self.sock.send_multipart([ident, *frames], copy=sum(map(len, blobs)) < 65536)

    def _handle(self, frames: list[bytes]) -> None:
        ident = frames[0]
        try:
            kind, header, blobs = P.unpack(self.key, frames[1:])
        except ProtocolError as e:
            self.bad(f"from peer {ident.hex()}: {e}")
            if isinstance(e, P.BadMAC):  # a cw peer with another key: tell it
                self.sock.send_multipart([ident, *P.reject(str(e))])
            return
        peer = self.peers.get(ident)
        try:
            if kind == P.HELLO:
                self._hello(ident, header)
            elif kind == P.STATUS:  # any key holder may ask; no session needed
                self._send(ident, P.STATUS, self.status())
            elif kind == P.RETRY:
                self._send(ident, P.STATUS, {"retried": self._retry(str(header["run"]))})
            elif peer is None:  # we restarted, or it timed out: it must say HELLO again
                if kind == P.RESULT:  # what it computed meanwhile still counts
                    self._orphan_results(header, blobs)
                if kind != P.BYE:
                    self._send(ident, P.BYE, {"why": "unknown peer, say HELLO", "rehello": True})
            elif isinstance(peer, Worker):
                peer.last_seen = time.monotonic()
                if "running" in header:
                    peer.started = set(header["running"])
                if kind == P.RESULT:
                    self._results(peer, header, blobs)
                elif kind == P.BYE:
                    self._worker_bye(peer, header)
                elif kind == P.HEARTBEAT:
                    peer.counters = header
            elif kind == P.SUBMIT:
                self._submit(peer, header, blobs)
            elif kind == P.CANCEL:
                self._cancel(peer, header["s"])
            elif kind == P.BYE:
                self.peers.pop(ident, None)
                peer.ident = None
        except sqlite3.OperationalError as e:  # disk full, I/O error: the store is unusable
            self._store_failed(e)
        except Exception as e:
            # signed by a key holder, yet malformed: a bug or version skew, not an attack
            log.error("malformed %s message from %r: %r", kind.decode(), peer or ident.hex(), e)

    # -- peers -------------------------------------------------------------------
    def _hello(self, ident: bytes, h: dict) -> None:
        if h.get("role") == "worker":
            self._worker_hello(ident, h)
            return
        sid = str(h["session"])
        s = self.sessions.get(sid)
        if s is None:
            s = self.sessions[sid] = Session(sid, h.get("run"), h.get("context") or {})
            self.store.add_session(sid, s.run, s.context)
        if s.ident is not None and s.ident != ident:
            self.peers.pop(s.ident, None)
        s.ident = ident
        s.versions = h.get("versions") or {}
        self.peers[ident] = s
        self._send(ident, P.WELCOME, {"master": self.id, "heartbeat": self.heartbeat})
        s.last_sent = time.monotonic()
        waiting = h.get("waiting")
        if waiting:  # a client back after a reconnect: what finished meanwhile
            self._stored_results(s, waiting)

    def _stored_results(self, s: Session, seqs: list[int]) -> None:
        for seq, status, value, err, tb in self.store.session_results(s.id, seqs):
            s.results.append((seq, status, err, tb))
            s.blobs.append(value or b"")
        self._dirty.add(s)

    def _worker_hello(self, ident: bytes, h: dict) -> None:
        """A worker joins, or comes back (new connection, or a master that restarted).

        The jobs it says it still holds stay with it; jobs we thought it had and
        it does not hold were lost in transit, not by its fault: requeued uncharged.
        """
        w = Worker(ident, h)
        holding = {int(j) for j in h.get("holding") or ()}
        w.started = {int(j) for j in h.get("running") or ()}
        w.draining = bool(h.get("draining"))
        old = self.peers.get(ident)
        if not isinstance(old, Worker) or old.id != w.id:
            old = next((x for x in self.workers.values() if x.id == w.id), None)
        if old is not None:
            self.peers.pop(old.ident, None)
            self.workers.pop(old.ident, None)
            w.running = old.running
        for jid in reversed(list(w.running)):  # lost in transit, not by its fault
            if jid not in holding:
                self._requeue(w.running.pop(jid))
        for jid in holding:
            job = self.jobs.get(jid)
            if job is not None and (job.worker is None or job.worker is old):
                job.worker = w  # what it runs stays with it
                w.running[jid] = job
        done = self.store.finished([j for j in holding if j not in self.jobs])
        if done:  # finished or cancelled meanwhile: stop wasting its slots
            self._send(ident, P.CANCEL, {"i": done})
        self.peers[ident] = self.workers[ident] = w
        self.store.worker_joined(w.id, w.host, w.pid, w.caps)
        log.info("worker %s %s with %d slots %s", w.describe(), "rejoined" if old else "joined",
                 w.slots, w.caps)  # fmt: skip
        self._send(ident, P.WELCOME, {"master": self.id, "heartbeat": self.heartbeat})
        w.last_sent = time.monotonic()

    def _requeue(self, job: Job) -> None:
        job.worker = None
        self._enqueue(job, front=True)

    def _orphan_results(self, h: dict, blobs: list[bytes]) -> None:
        """Results from a worker we do not know (yet): keep those of jobs still unfinished."""
        rows = []
        for (jid, status, runtime, err, tb), blob in zip(h["r"], blobs):
            job = self.jobs.get(jid)
            if job is not None and job.worker is None:
                rows.append(self._finish(job, status, blob, err, tb, None, runtime, store=False))
        if rows:
            self.store.add_results(rows)

    def _lose(self, w: Worker, why: str) -> None:
        """A worker is gone without handing its jobs back: requeue them.

        Only the jobs it was running are charged an attempt: those it last said
        it was running (every RESULT and heartbeat says), else the oldest `slots`
        it was given. The ones waiting behind them never started.
        """
        self.peers.pop(w.ident, None)
        self.workers.pop(w.ident, None)
        self.store.worker_left(w.id, why)
        if w.info:
            threading.Thread(target=self._post_mortem, args=(w,), daemon=True).start()
        jobs = list(w.running.values())  # in the order they were given
        w.running.clear()
        if w.started is not None:  # it told us what it was running
            charged = [j for j in jobs if j.id in w.started]
            spared = [j for j in jobs if j.id not in w.started]
        else:  # it runs jobs in the order it got them
            charged, spared = jobs[: w.slots], jobs[w.slots :]
        if charged:
            self.store.count_attempt([j.id for j in charged])
        failed = 0
        for job in reversed(spared):
            self._requeue(job)
        for job in reversed(charged):
            job.attempts += 1
            job.lost_on = (job.lost_on or []) + [w.describe()]
            job.worker = None
            if job.attempts > job.max_retries:
                failed += 1
                self._finish(job, P.LOST, b"", self._lost_error(job), "", w.id, None)
            else:
                self._enqueue(job, front=True)
        log.warning("worker %s on %s lost (%s): %d jobs requeued, %d of them charged an attempt;"
                    " %d failed", w.describe(), w.host, why, len(jobs) - failed, len(charged) - failed,
                    failed)  # fmt: skip

    def _lost_error(self, job: Job) -> str:
        lines = [f"job lost its worker {job.attempts} times (max_retries={job.max_retries}):"]
        for d in job.lost_on or ():
            wid = d.split(" ", 1)[0]
            pm = self.post_mortems.get(wid)
            lines.append(f"  {d}{f': {pm}' if pm else ''}")
        return "\n".join(lines)

    def _post_mortem(self, w: Worker) -> None:
        """Ask the batch system what became of a lost worker (off the loop's thread)."""
        try:
            from ..launchers import environment_of
        except ImportError:
            return
        try:
            text = environment_of(w.info).post_mortem()
        except Exception as e:  # never let a post-mortem take the master down
            text = f"post-mortem failed: {e!r}"
        if text:
            self._pm_queue.put((w.id, text))

    def _worker_bye(self, w: Worker, h: dict) -> None:
        """A draining worker hands back jobs it did not finish; they cost no attempt."""
        w.draining = True
        returned = [w.running.pop(j) for j in h.get("returned", ()) if j in w.running]
        if h.get("final"):
            returned += list(w.running.values())
            w.running.clear()
        for job in reversed(returned):
            self._requeue(job)
        if h.get("final"):
            self.peers.pop(w.ident, None)
            self.workers.pop(w.ident, None)
            self.store.worker_left(w.id, str(h.get("why", "left")))
            log.info("worker %s left (%s): %d jobs handed back", w.describe(), h.get("why", "drained"),
                     len(returned))  # fmt: skip
        else:
            log.info("worker %s draining: %d jobs handed back", w.describe(), len(returned))

    # -- jobs --------------------------------------------------------------------
    def _enqueue(self, job: Job, front: bool = False) -> None:
        if job.id not in self.jobs:
            self.mem_bytes += len(job.args)
        self.jobs[job.id] = job
        if job.session is not None:
            job.session.jobs[job.seq] = job
        rkey = json.dumps(job.requires, sort_keys=True) if job.requires else None
        q = self.queues.get(rkey)
        if q is None:
            q = self.queues[rkey] = collections.deque()
            self.requires[rkey] = job.requires
        (q.appendleft if front else q.append)(job)

    def _job_from_row(self, row: tuple) -> Job:
        jid, sid, seq, fn, args, req, timeout, retries, attempts = row
        return Job(jid, self.sessions.get(sid), seq, fn, args, json.loads(req) if req else None,
                   timeout, retries, attempts)  # fmt: skip

    def _blocked(self) -> int:
        """Jobs in memory that no connected worker can run (their requirements)."""
        if not self.workers:
            return 0
        return sum(
            len(q) for rkey, q in self.queues.items()
            if rkey is not None and q and not any(satisfies(w.caps, self.requires[rkey]) for w in self.workers.values())
        )  # fmt: skip

    def _window_full(self, extra: int = 0) -> bool:
        held = len(self.jobs) - self._blocked() + extra
        return held > self.window or self.mem_bytes > defaults.QUEUE_WINDOW_BYTES or len(self.jobs) >= 4 * self.window

    def _load_backlog(self) -> None:
        """Refill the in-memory window from jobs that so far live only in the store.

        Jobs no connected worker can run do not count against the window, so
        they cannot keep runnable jobs waiting in the store.
        """
        want = self.window - (len(self.jobs) - self._blocked())
        if self.backlog_from is None or want < self.window // 2 or self._window_full():
            return
        rows = self.store.pending(self.backlog_from - 1, want)
        for row in rows:
            if row[0] not in self.jobs:
                self._enqueue(self._job_from_row(row))
        if len(rows) == want:
            self.backlog_from = rows[-1][0] + 1
            self.backlog = max(0, self.backlog - len(rows))
        else:
            self.backlog_from, self.backlog = None, 0

    def _submit(self, s: Session, h: dict, blobs: list[bytes]) -> None:
        """Store a batch of jobs, then take them in: nothing changes in memory
        unless the whole batch is in the store (a savepoint guards the store)."""
        specs = h["j"]
        n = len(specs)
        fns = list(zip(h.get("f") or (), blobs[n:]))
        seen = self.store.job_ids(s.id, [sp[0] for sp in specs]) if h.get("resend") else {}
        now = time.time()
        rows, jobs, hits, next_id = [], [], [], self.store.next_id
        for spec, args in zip(specs, blobs):
            seq, fn, key, opts = spec
            if seq in seen:  # resent after a reconnect: the first copy stands
                continue
            opts = opts or {}
            if s.run is not None and key is not None and opts.get("c", True):
                hit = self.store.cached_result(s.run, key)
                if hit is not None:
                    hits.append((seq, hit))
                    continue
            req = opts.get("r")
            retries = int(opts.get("m", defaults.MAX_RETRIES))
            timeout = None if opts.get("t") is None else float(opts["t"])
            rows.append((next_id, s.id, int(seq), s.run, key, fn, args, json.dumps(req) if req else None,
                         timeout, retries, now))  # fmt: skip
            jobs.append(Job(next_id, s, seq, fn, args, req, timeout, retries))
            next_id += 1
        with self.store.savepoint():
            if fns:
                self.store.add_functions(fns)
            if rows:
                self.store.add_jobs(rows)
        # stored: now the batch counts
        self.functions.update(fns)
        self.store.next_id = next_id
        s.acks.extend(sp[0] for sp in specs)
        for seq, (status, value, err, tb) in hits:
            s.results.append((seq, status, err, tb))
            s.blobs.append(value or b"")
        spill = self.backlog_from is not None or self._window_full(len(jobs))
        for job in jobs:
            if spill:  # the window is full: this job waits in the store only
                if self.backlog_from is None:
                    self.backlog_from = job.id
                self.backlog += 1
            else:
                self._enqueue(job)
        if seen:  # resent because the ack was lost: the result may be lost with it
            self._stored_results(s, [q for q in seen if q not in s.jobs])
        self._dirty.add(s)

    def _cancel(self, s: Session, seqs: list[int]) -> None:
        """Cancel jobs of a session: queued ones are dropped, running ones killed."""
        by_worker: dict[Worker, list[int]] = {}
        stored_only = []
        for seq in seqs:
            job = s.jobs.get(seq)
            if job is None:
                stored_only.append(seq)
                continue
            w = job.worker
            if w is not None:
                w.running.pop(job.id, None)
                by_worker.setdefault(w, []).append(job.id)
            self._finish(job, P.CANCELLED, b"", "cancelled", "", None, None)
        for w, ids in by_worker.items():
            self._send(w.ident, P.CANCEL, {"i": ids})
        for rkey, q in self.queues.items():  # drop what is no longer waiting
            if any(self.jobs.get(j.id) is not j for j in q):
                self.queues[rkey] = collections.deque(j for j in q if self.jobs.get(j.id) is j)
        if stored_only:  # not in memory: waiting in the store, or already finished
            ids = self.store.job_ids(s.id, stored_only)
            now = time.time()
            self.store.add_results([(i, P.CANCELLED, b"", "cancelled", "", None, None, now) for i in ids.values()])
            for seq in ids:
                s.results.append((seq, P.CANCELLED, "cancelled", ""))
                s.blobs.append(b"")
            self._dirty.add(s)

    def _retry(self, run: str) -> int:
        """Requeue the failed jobs of a run, with fresh attempts."""
        rows = self.store.retry_failed(run)
        for row in rows:
            if row[0] not in self.jobs:
                self._enqueue(self._job_from_row(row))
        log.info("run %s: %d failed jobs requeued", run, len(rows))
        return len(rows)

    def _results(self, w: Worker, h: dict, blobs: list[bytes]) -> None:
        rows = []
        runtimes = self.runtimes
        for (jid, status, runtime, err, tb), blob in zip(h["r"], blobs):
            job = w.running.pop(jid, None)
            if job is None:
                job = self.jobs.get(jid)
                if job is None or job.worker is not None:
                    continue  # already finished (a duplicate after a requeue), or owned elsewhere
            if runtime is not None:
                old = runtimes.get(job.fn)
                runtimes[job.fn] = runtime if old is None else 0.8 * old + 0.2 * runtime
            rows.append(self._finish(job, status, blob, err, tb, w.id, runtime, store=False))
        if rows:
            self.store.add_results(rows)

    def _finish(self, job: Job, status: int, blob: bytes, err, tb, wid, runtime, store=True):
        """Record a job's outcome and queue it for its client (sent after the commit)."""
        if self.jobs.pop(job.id, None) is not None:
            self.mem_bytes -= len(job.args)
        self.done += 1
        row = (job.id, status, blob, err, tb, wid, runtime, time.time())
        if store:
            self.store.add_results([row])
        s = job.session
        if s is not None:
            s.jobs.pop(job.seq, None)
            s.results.append((job.seq, status, err, tb))
            s.blobs.append(blob)
            self._dirty.add(s)
        return row

    # -- end of a turn: commit, then put workers to work, then answer -------------
    def _end_turn(self) -> None:
        try:
            self.store.commit()
        except sqlite3.OperationalError as e:
            self._store_failed(e)
            return
        if self.backlog_from is not None:
            self._load_backlog()
        if self.workers and self.jobs:
            self._dispatch()
        if self._dirty:
            now = time.monotonic()
            keep = set()
            for s in self._dirty:
                if s.ident is None:
                    s.acks, s.results, s.blobs = [], [], []
                elif s.results:
                    self._send_results(s)
                    s.last_sent = now
                elif len(s.acks) >= defaults.BATCH_JOBS or now - s.last_sent >= _ACK_DELAY:
                    self._send(s.ident, P.ACK, {"s": s.acks})
                    s.acks, s.last_sent = [], now
                elif s.acks:  # acks alone wait a moment for a result to ride on
                    keep.add(s)
            self._dirty = keep

    def _store_failed(self, e: Exception) -> None:
        """The store refused a commit (disk full, I/O error): nothing of this turn counts.

        Nothing committed is lost. Submissions of this turn are not acknowledged
        (clients resend them), results of this turn are dropped (their jobs run
        again), and the master stops: it must not promise what it cannot keep.
        """
        log.critical("the store %s refused a commit (%s): stopping; nothing committed is lost",
                     self.store.path, e)  # fmt: skip
        self.store.rollback()
        for s in self.sessions.values():
            if s.ident is not None:
                self._send(s.ident, P.BYE, {"why": f"the master's store failed: {e}", "fatal": True})
            s.acks, s.results, s.blobs = [], [], []
        self._dirty = set()
        self.stop()

    def _send_results(self, s: Session) -> None:
        """RESULT messages in batches; the first carries the pending acknowledgements."""
        i, n = 0, len(s.results)
        while i < n:
            j, size = i, 0
            while j < n and j - i < defaults.BATCH_JOBS and (j == i or size + len(s.blobs[j]) <= defaults.BATCH_BYTES):
                size += len(s.blobs[j])
                j += 1
            header = {"r": s.results[i:j]}
            if s.acks:
                header["s"], s.acks = s.acks, []
            self._send(s.ident, P.RESULT, header, s.blobs[i:j])
            i = j
        s.results, s.blobs = [], []

    def _compatible(self, s: Session | None, w: Worker) -> bool:
        if s is None or not s.versions or not w.versions:
            return True
        why = incompatibility(s.versions, w.versions)
        if why and (s.id, w.id) not in self._warned:
            self._warned.add((s.id, w.id))
            text = f"worker {w.describe()} on {w.host} cannot run this client's jobs: {why}"
            log.warning("session %s: %s", s.id[:8], text)
            s.notices.append(text)
        return why is None

    def _dispatch(self) -> None:
        """Jobs to workers: first into idle slots, least-loaded workers first; then
        prefetch. A burst is shared out evenly, never swallowed by the first worker."""
        for prefetch in (False, True):
            queues = [(k, q) for k, q in self.queues.items() if q]
            if not queues:
                return
            queued = sum(len(q) for _, q in queues)
            share = -(-queued // len(self.workers))
            for w in sorted(self.workers.values(), key=lambda w: len(w.running) / w.slots):
                self._dispatch_to(w, queues, share, prefetch)

    def _dispatch_to(self, w: Worker, queues: list, share: int, prefetch: bool) -> None:
        now = time.monotonic()
        tasks, args, fns, ctxs, size, given = [], [], [], {}, 0, 0
        for rkey, q in queues:
            if not q or not satisfies(w.caps, self.requires[rkey]):
                continue
            if prefetch:  # no more than an even share of what waits
                free = min(w.limit(self.runtimes.get(q[0].fn)) - len(w.running), share - given)
            else:  # idle executors: they take what they can run now
                free = (0 if w.draining else w.slots) - len(w.running) - given
            skipped = []
            while q and free > 0:
                job = q.popleft()
                if self.jobs.get(job.id) is not job or job.worker is not None:
                    continue  # finished, cancelled or placed since it was queued
                s = job.session
                if not self._compatible(s, w):
                    skipped.append(job)
                    continue
                blob = None
                if job.fn not in w.funcs:
                    blob = self.functions.get(job.fn) or self.store.function(job.fn)
                    if blob is None:
                        self._finish(job, P.FAILED, b"", f"function {job.fn} is not in the store", "", None, None)
                        continue
                    self.functions[job.fn] = blob
                grow = len(job.args) + (len(blob) if blob else 0)
                if tasks and size + grow > defaults.BATCH_BYTES:  # never outgrow a message
                    self._send_tasks(w, tasks, args, fns, ctxs, now)
                    tasks, args, fns, ctxs, size = [], [], [], {}, 0
                if blob is not None:
                    fns.append((job.fn, blob))
                    w.funcs.add(job.fn)
                ctx = s.id if s is not None and s.context else None
                if ctx is not None and ctx not in w.ctxs:
                    ctxs[ctx] = s.context
                    w.ctxs.add(ctx)
                job.worker = w
                w.running[job.id] = job
                tasks.append((job.id, job.fn, ctx, job.timeout))
                args.append(job.args)
                size += grow
                free -= 1
                given += 1
                if len(tasks) >= defaults.BATCH_JOBS:
                    self._send_tasks(w, tasks, args, fns, ctxs, now)
                    tasks, args, fns, ctxs, size = [], [], [], {}, 0
            q.extendleft(reversed(skipped))
        if tasks:
            self._send_tasks(w, tasks, args, fns, ctxs, now)

    def _send_tasks(self, w, tasks, args, fns, ctxs, now) -> None:
        header = {"t": tasks, "f": [h for h, _ in fns]}
        if ctxs:
            header["c"] = ctxs
        self._send(w.ident, P.TASKS, header, [*args, *(b for _, b in fns)])
        w.last_sent = now

    # -- timers ------------------------------------------------------------------
    def _timers(self, now: float) -> None:
        # after a connection closed, a worker silent for three heartbeats (at
        # least 3 s) is taken as gone, without waiting for the full timeout
        suspect = now - self.disconnected_at < self.worker_timeout
        for w in list(self.workers.values()):
            silent = now - w.last_seen
            if silent > self.worker_timeout:
                self._lose(w, f"silent for {silent:.1f} s")
            elif suspect and silent > max(3 * self.heartbeat, 3.0):
                self._lose(w, f"disconnected, silent for {silent:.1f} s")
            elif now - w.last_sent >= self.heartbeat:
                self._send(w.ident, P.HEARTBEAT)
                w.last_sent = now
        queued = len(self.jobs) - sum(len(w.running) for w in self.workers.values()) + self.backlog
        for s in [p for p in self.peers.values() if isinstance(p, Session)]:
            if now - s.last_sent >= self.heartbeat or s.notices:
                hb = {"workers": len(self.workers), "queued": queued}
                if s.notices:
                    hb["notices"], s.notices = s.notices, []
                self._send(s.ident, P.HEARTBEAT, hb)
                s.last_sent = now
        self._check_unschedulable(now)
        if self.watch_pid and not pid_alive(self.watch_pid):
            log.info("process %d ended: stopping", self.watch_pid)
            self.stop()
        while not self._pm_queue.empty():
            wid, text = self._pm_queue.get()
            self.post_mortems[wid] = text
            self.store.worker_left(wid, text)
            log.warning("worker %s post-mortem: %s", wid, text)
        try:
            self.store.commit()
        except sqlite3.OperationalError as e:
            self._store_failed(e)

    def _check_unschedulable(self, now: float) -> None:
        """Tell clients whose jobs require what no connected worker has (a warning:
        a worker that has it may still join)."""
        for rkey, q in self.queues.items():
            if rkey is None or not q or not self.workers or any(
                satisfies(w.caps, self.requires[rkey]) for w in self.workers.values()
            ):
                self.unschedulable.pop(rkey, None)
                continue
            since = self.unschedulable.setdefault(rkey, now)
            if now - since < defaults.NO_WORKERS_WARNING:
                continue
            self.unschedulable[rkey] = now  # again after another interval
            text = (f"{len(q)} jobs require {rkey}, which none of the {len(self.workers)} connected"
                    f" workers offers (they offer: {[w.caps for w in list(self.workers.values())[:3]]})")  # fmt: skip
            log.warning(text)
            for s in {j.session for j in list(q)[:1000] if j.session is not None}:
                s.notices.append(text)

    def status(self) -> dict:
        running = sum(len(w.running) for w in self.workers.values())
        return {
            "master": self.id,
            "address": self.address,
            "store": str(self.store.path),
            "uptime": time.time() - self.started,
            "queued": len(self.jobs) - running + self.backlog,
            "in_memory": len(self.jobs),
            "running": running,
            "done": self.done,
            "bad_messages": self.bad.count,
            "sessions": sum(1 for s in self.sessions.values() if s.ident is not None),
            "workers": [
                {
                    "id": w.id, "host": w.host, "pid": w.pid, "slots": w.slots, "caps": w.caps,
                    "running": len(w.running), "draining": w.draining, "counters": w.counters,
                    "info": w.info, "versions": w.versions,
                }  # fmt: skip
                for w in self.workers.values()
            ],
        }


def run_master(master: Master, companions: Sequence[Any] = ()) -> None:
    """Serve until SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 (a batch system's warnings before a
    kill: scancel, qdel -notify), with companion threads (a pool's keeper) beside it.

    Each companion has ``start()`` and ``stop()``; they start before the loop and
    are stopped, and joined, when it ends.
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
