"""``python -m cw.worker HOST``: an agent process and its executor children.

The agent talks to the master; each executor child runs jobs one at a time.
The isolation is what makes a segfault, ``os._exit``, a memory blow-up or a
timeout survivable: the agent reports the job, replaces the child and keeps
its slot. Functions arrive once per worker and are cached by hash.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import pickle
import secrets
import signal
import socket
import sys
import time
from typing import Any, Deque

import zmq

from .. import defaults
from .. import protocol as P
from ..discovery import ClusterDir, pid_alive, resolve_address
from ..errors import AuthenticationError, ConfigError, ProtocolError
from ..serialize import dumps_exception, dumps_result, loads, loads_function, runtime_versions

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- executor child
def _enter_context(ctx: dict | None) -> None:
    """Run where the client stands: its working directory, import path and variables.

    A child serves one client context for its whole life; the agent replaces it
    before a job of another context, so nothing leaks between clients.
    """
    if not ctx:
        return
    path = [p for p in ctx.get("path", ()) if p]
    sys.path[:] = path + [p for p in sys.path if p not in path]
    os.environ.update(ctx.get("env") or {})
    cwd = ctx.get("cwd")
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as e:
            log.warning("cannot enter the client's directory %s: %s", cwd, e)


def _child_main(conn) -> None:
    """Run batches of tasks sent by the agent; answer one message per job."""
    # the agent decides when we stop. A Python handler, not SIG_IGN: programs a
    # job starts get the default actions back (an ignored signal would stay ignored)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, _ignore)
    _die_with_parent()
    blobs: dict[str, bytes] = {}
    funcs: dict[str, Any] = {}
    entered = False
    send, recv = conn.send_bytes, conn.recv_bytes
    while True:
        try:
            msg = recv()
        except (EOFError, OSError):
            os._exit(0)
        tasks, new_funcs, ctx = pickle.loads(msg)
        if not entered:
            _enter_context(ctx)
            entered = True
        blobs.update(new_funcs)
        for jid, fn_hash, args_blob in tasks:
            t0 = time.perf_counter()
            try:
                fn = funcs.get(fn_hash)
                if fn is None:
                    try:
                        fn = funcs[fn_hash] = loads_function(blobs[fn_hash])[1]
                    except (ImportError, AttributeError) as e:
                        what = f"the function {pickle.loads(blobs[fn_hash])[0]}"
                        send(_import_failure(jid, what, e, t0))
                        continue
                try:
                    args, kwargs = loads(args_blob)
                except (ImportError, AttributeError) as e:
                    send(_import_failure(jid, f"the arguments of job {jid}", e, t0))
                    continue
                value = fn(*args, **kwargs)
                out = (jid, P.OK, time.perf_counter() - t0, None, None, dumps_result(value))
            except BaseException as e:  # noqa: B036 - a job's SystemExit is its failure too
                blob, err, tb = dumps_exception(e)
                out = (jid, P.RAISED, time.perf_counter() - t0, err, tb, blob)
            try:
                data = pickle.dumps(out, protocol=5)
            except Exception as e:  # the result itself would not pickle
                out = (jid, P.FAILED, out[2], f"cannot pickle the result of job {jid}: {e}", None, b"")
                data = pickle.dumps(out, protocol=5)
            send(data)


def _ignore(signum: int, frame: Any) -> None:
    pass


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the agent dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _import_failure(jid: int, what: str, e: BaseException, t0: float) -> bytes:
    """An IMPORT result naming what could not be imported, where, and from which path."""
    err = (
        f"cannot import {what} on {socket.gethostname()}: {type(e).__name__}: {e}."
        f" The worker's sys.path: {sys.path}. Make the module importable there"
        " (a shared path), or send it by value: Client(ship_modules=[module])"
    )
    return pickle.dumps((jid, P.IMPORT, time.perf_counter() - t0, err, None, b""), protocol=5)


class _Child:
    """The agent's handle on one executor process."""

    def __init__(self, mp):
        self.conn, child_conn = mp.Pipe(duplex=True)
        self.proc = mp.Process(target=_child_main, args=(child_conn,), daemon=True)
        self.proc.start()
        child_conn.close()
        self.funcs: set[str] = set()
        self.ctx: str | None = None  # the client context this child has entered
        self.used = False
        self.inflight: Deque[tuple] = collections.deque()  # tasks sent, in order
        self.head_started = 0.0  # when the first task of inflight started

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def describe_exit(code: int | None) -> str:
    if code is None:
        return "vanished"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} ({-code})"
    return f"exited with code {code}"


# ---------------------------------------------------------------- the agent

def default_procs() -> int:
    for var in ("SLURM_CPUS_PER_TASK", "NSLOTS"):
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    return 1


def default_caps(procs: int, tags: list[str]) -> dict:
    caps: dict[str, Any] = {"cpus": procs, "host": socket.gethostname(), "tags": sorted(tags)}
    mem = os.environ.get("SLURM_MEM_PER_NODE", "")
    if mem.isdigit():
        caps["mem"] = int(mem) * 1024 * 1024
    else:
        try:
            caps["mem"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            pass
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    caps["gpus"] = len([g for g in gpus.split(",") if g.strip()]) if gpus else 0
    return caps


def batch_info() -> dict:
    """Where this worker runs in the batch system, for post-mortems."""
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "JOB_ID", "SGE_TASK_ID")
    return {k: os.environ[k] for k in keys if k in os.environ}


class Agent:
    def __init__(
        self,
        address: str | None = None,
        cluster: ClusterDir | None = None,
        procs: int | None = None,
        tags: list[str] | None = None,
        caps: dict | None = None,
        heartbeat: float = defaults.HEARTBEAT,
        master_timeout: float = defaults.MASTER_TIMEOUT,
        give_up: float = 600.0,
        max_message: int = defaults.MAX_MESSAGE,
        grace: float = defaults.GRACE,
        lifetime: float | None = None,
        watch_pid: int | None = None,
    ):
        self.cluster = cluster or ClusterDir()
        self.explicit_address = address
        self.key = self.cluster.key()
        self.procs = procs or default_procs()
        self.caps = default_caps(self.procs, tags or [])
        self.caps.update(caps or {})
        self.heartbeat, self.master_timeout, self.give_up = heartbeat, master_timeout, give_up
        self.max_message = max_message
        # pid alone is not unique across containers sharing a host name
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        self.mp = multiprocessing.get_context("fork")
        self.children: list[_Child] = []
        self.pending: Deque[tuple] = collections.deque()  # (jid, fn, ctx, timeout, args)
        self.fn_blobs: dict[str, bytes] = {}
        self.contexts: dict[str, dict] = {}
        self.outbox: list[tuple] = []  # result headers
        self.outblobs: list[bytes] = []
        self.counters = {"fn_received": 0, "tasks": 0, "results": 0, "crashes": 0}
        self.bad = P.RateLimited(log, "dropped bad messages from the master")
        self.runtimes: dict[str, float] = {}  # function hash -> smoothed runtime
        self.draining = False
        self.drain_requested: str | None = None
        self.drain_started = 0.0
        self.grace = grace
        self.stopping = False
        self.cancelled: set[int] = set()
        self.welcomed = self.ever_welcomed = False
        self.hello_sent = 0.0
        self.heads_changed = False
        self.watch_pid = watch_pid
        self.ctx = self.sock = None
        # drain by itself: at --lifetime, or early enough before the batch
        # allocation ends that running jobs still get their grace period
        deadlines = [time.time() + lifetime] if lifetime else []
        end = _batch_deadline()
        if end:
            deadlines.append(end - grace - 2 * heartbeat)
        self.deadline = min(deadlines) if deadlines else None

    # -- connection --------------------------------------------------------------
    def _connect(self) -> None:
        address = resolve_address(self.explicit_address, self.cluster)
        if address is None:
            raise ConfigError(f"no master address: none given, no master.json in {self.cluster.path}")
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close(linger=0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, self.max_message + 65536)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(address)
        self.poller.register(self.sock, zmq.POLLIN)
        self.address = address
        self._hello()
        log.info("worker %s connecting to %s with %d procs", self.id, address, self.procs)

    def _hello(self) -> None:
        """Introduce ourselves; `holding` names the jobs our children still have.

        Tasks not yet given to a child are dropped: the master requeues them.
        """
        self.pending.clear()
        self._send(P.HELLO, {
            "role": "worker", "id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
            "procs": self.procs, "caps": self.caps, "have": list(self.fn_blobs),
            "holding": [t[0] for c in self.children for t in c.inflight],
            "running": self._running(), "draining": self.draining,
            "info": batch_info(), "versions": runtime_versions(),
        })  # fmt: skip
        self.welcomed = False
        self.hello_sent = time.monotonic()

    def _running(self) -> list[int]:
        """The jobs our children are running now: the head of each one's batch."""
        return [c.inflight[0][0] for c in self.children if c.inflight]

    def _send(self, kind: bytes, header: Any = None, blobs=()) -> None:
        self.sock.send_multipart(P.pack(self.key, kind, header, blobs), copy=sum(map(len, blobs)) < 65536)
        self.last_sent = time.monotonic()

    # -- the loop ----------------------------------------------------------------
    def run(self) -> None:
        for _ in range(self.procs):  # fork before any ZeroMQ thread exists
            self.children.append(_Child(self.mp))
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        for c in self.children:
            self.poller.register(c.conn.fileno(), zmq.POLLIN)
        self._connect()
        self.last_heard = time.monotonic()
        lost_since, retry_at, backoff = None, 0.0, 1.0
        try:
            while not self.stopping:
                events = dict(self.poller.poll(100))
                now = time.monotonic()
                if self.sock in events and self._read_master():
                    self.last_heard = now
                    lost_since, backoff = None, 1.0
                for c in list(self.children):
                    if c.conn.fileno() in events:
                        self._read_child(c)
                if self.cancelled:
                    self._cancel()
                self._feed_children()
                self._flush()
                now = time.monotonic()
                self._check_timeouts(now)
                if self.watch_pid and not pid_alive(self.watch_pid) and not self.drain_requested:
                    self.drain_requested = f"process {self.watch_pid} ended"
                if self.drain_requested and not self.draining:
                    self._begin_drain(self.drain_requested)
                elif self.deadline is not None and time.time() >= self.deadline and not self.draining:
                    self._begin_drain("lifetime reached")
                if now - self.last_sent >= self.heartbeat:
                    self._send(P.HEARTBEAT, {**self.counters, "running": self._running()})
                if now - self.last_heard > self.master_timeout and now >= retry_at:
                    lost_since = lost_since or self.last_heard
                    if now - lost_since > self.give_up:
                        log.error("master %s unreachable for %.0f s: giving up", self.address, now - lost_since)
                        break
                    log.warning("master %s silent for %.0f s: reconnecting (next try in %.0f s)",
                                self.address, now - lost_since, backoff)  # fmt: skip
                    self._connect()
                    retry_at, backoff = now + backoff, min(backoff * 2, 30.0)
                if self.draining:
                    busy = any(c.inflight for c in self.children)
                    if not busy or now - self.drain_started > self.grace:
                        break
        finally:
            self._shutdown()

    def _read_master(self) -> bool:
        """Handle what the master sent; True if anything came from a live master of ours."""
        heard = False
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return heard
            try:
                kind, h, blobs = P.unpack(self.key, frames)
            except ProtocolError as e:
                why = P.is_reject(frames)
                if why is not None and not self.ever_welcomed:
                    raise AuthenticationError(
                        f"the master at {self.address} rejected this worker's key ({why}): use the"
                        f" master's cluster directory ({self.cluster.path}) or its CW_KEY"
                    ) from None
                if why is not None:  # another master took the address: find ours again
                    log.warning("master at %s rejects our key now (%s): looking for ours", self.address, why)
                    self.last_heard = time.monotonic() - self.master_timeout - 1  # as if silent
                    return False
                self.bad(str(e))
                continue
            heard = True
            if kind == P.TASKS:
                tasks = h["t"]
                n = len(tasks)
                for fn, blob in zip(h.get("f", ()), blobs[n:]):
                    self.fn_blobs[fn] = blob
                    self.counters["fn_received"] += 1
                self.contexts.update(h.get("c") or {})
                for (jid, fn, ctx, timeout), args in zip(tasks, blobs):
                    self.pending.append((jid, fn, ctx, timeout, args))
                self.counters["tasks"] += n
            elif kind == P.CANCEL:
                self.cancelled.update(h["i"])
            elif kind == P.WELCOME:
                self.welcomed = self.ever_welcomed = True
            elif kind == P.BYE:
                if h.get("rehello"):
                    # one HELLO at a time (later BYEs answer messages queued before
                    # it), unless it has gone unanswered for two heartbeats
                    if self.welcomed or time.monotonic() - self.hello_sent > 2 * self.heartbeat:
                        self._hello()
                else:
                    log.warning("master says: %s", h.get("why", "bye"))
            # HEARTBEAT: hearing from the master is all it is for

    # -- children ----------------------------------------------------------------
    def _feed_children(self) -> None:
        """Hand a batch of tasks to each idle child.

        Only idle children get work: a task given to a busy child could wait
        behind a long job while a sibling frees up, and a drain or a cancel
        could not take it back. Batches (sized to ~5 ms of work) keep short
        jobs flowing.
        """
        if not self.pending or self.draining:
            return
        idle = [c for c in self.children if not c.inflight]
        if not idle:
            return
        now = time.monotonic()
        for c in idle:
            if not self.pending:
                break
            # batches only from a backlog (a quarter of each child's share), sized to
            # ~5 ms of work by the runtime measured for this function
            rt = self.runtimes.get(self.pending[0][1])
            per = max(1, min(len(self.pending) // (4 * len(self.children)), int(0.005 / rt) if rt else 1, 200))
            ctx = self.pending[0][2]
            if c.used and c.ctx != ctx:  # another client's job: start from a clean process
                c = self._respawn(c)
            batch, new_funcs = [], []
            while self.pending and len(batch) < per and self.pending[0][2] == ctx:
                if batch and self.pending[0][1] != batch[0][1]:
                    break  # one function per batch: its runtime sized the batch
                jid, fn, _, timeout, args = task = self.pending.popleft()
                if fn not in c.funcs:
                    new_funcs.append((fn, self.fn_blobs[fn]))
                    c.funcs.add(fn)
                batch.append((jid, fn, args))
                c.inflight.append(task)
            c.head_started = now
            self.heads_changed = True
            c.conn.send_bytes(pickle.dumps((batch, new_funcs, self.contexts.get(ctx) if ctx else None), protocol=5))
            c.ctx, c.used = ctx, True

    def _read_child(self, c: _Child) -> None:
        try:
            while c.conn.poll():
                jid, status, runtime, err, tb, blob = pickle.loads(c.conn.recv_bytes())
                fn = c.inflight.popleft()[1]
                c.head_started = time.monotonic()
                self._result(jid, status, runtime, err, tb, blob)
                old = self.runtimes.get(fn)
                self.runtimes[fn] = runtime if old is None else 0.8 * old + 0.2 * runtime
        except (EOFError, OSError):
            c.proc.join(1)
            self._replace(c, f"the process running the job {describe_exit(c.proc.exitcode)}", P.CRASHED)

    def _replace(self, c: _Child, why: str, status: int) -> None:
        """Fail the child's current job, hand its other tasks back to the queue, restart it."""
        self.counters["crashes"] += 1
        if c.inflight:
            jid = c.inflight.popleft()[0]
            self._result(jid, status, time.monotonic() - c.head_started,
                         f"job {jid} on {socket.gethostname()}: {why}", None, b"")  # fmt: skip
            log.warning("job %s: %s; replacing the executor process", jid, why)
        self.pending.extendleft(reversed(c.inflight))
        self._respawn(c)

    def _respawn(self, c: _Child) -> _Child:
        self.poller.unregister(c.conn.fileno())
        c.kill()
        i = self.children.index(c)
        self.children[i] = new = _Child(self.mp)
        self.poller.register(new.conn.fileno(), zmq.POLLIN)
        return new

    def _cancel(self) -> None:
        """Drop cancelled jobs not started; kill the process running a cancelled one."""
        ids, self.cancelled = self.cancelled, set()
        kept = collections.deque(t for t in self.pending if t[0] not in ids)
        for t in self.pending:
            if t[0] in ids:
                self._result(t[0], P.CANCELLED, None, "cancelled", None, b"")
        self.pending = kept
        for c in list(self.children):
            hit = [t for t in c.inflight if t[0] in ids]
            if not hit:
                continue
            for t in hit:
                c.inflight.remove(t)
                self._result(t[0], P.CANCELLED, None, "cancelled", None, b"")
            self.pending.extendleft(reversed(c.inflight))
            c.inflight.clear()
            self._respawn(c)

    def _check_timeouts(self, now: float) -> None:
        for c in list(self.children):
            if c.inflight:
                timeout = c.inflight[0][3]
                if timeout is not None and now - c.head_started > timeout:
                    self._replace(c, f"timed out after {timeout} s and was killed", P.TIMEOUT)

    def _result(self, jid, status, runtime, err, tb, blob) -> None:
        if len(blob) > self.max_message:
            status, err, tb = P.FAILED, (
                f"result of job {jid} is {len(blob)} bytes, larger than the largest message "
                f"({self.max_message} bytes)"
            ), None
            blob = b""
        self.outbox.append((jid, status, runtime, err, tb))
        self.outblobs.append(blob)
        self.counters["results"] += 1

    def _flush(self) -> None:
        i, n = 0, len(self.outbox)
        while i < n:
            j, size = i, 0
            while j < n and j - i < defaults.BATCH_JOBS and (j == i or size + len(self.outblobs[j]) <= defaults.BATCH_BYTES):
                size += len(self.outblobs[j])
                j += 1
            self._send(P.RESULT, {"r": self.outbox[i:j], "running": self._running()}, self.outblobs[i:j])
            i = j
        if n:
            self.outbox, self.outblobs = [], []
        elif self.heads_changed:  # the master charges a lost worker's running jobs only
            self._send(P.HEARTBEAT, {**self.counters, "running": self._running()})
        self.heads_changed = False

    # -- stopping ----------------------------------------------------------------
    def drain(self, signum: int | None = None, _frame: Any = None) -> None:
        """Signal handler: drain (a second signal stops at once). The loop does the work."""
        if self.drain_requested:
            self.stopping = True
        name = signal.Signals(signum).name if signum else "request"
        self.drain_requested = f"{name} received"

    def _begin_drain(self, why: str) -> None:
        """Take no new jobs, hand back the ones not started, let the running ones finish."""
        self.draining = True
        self.drain_started = time.monotonic()
        returned = [t[0] for t in self.pending]
        self.pending.clear()
        log.warning("worker %s draining (%s): %d jobs handed back, %d running get %.0f s",
                    self.id, why, len(returned), sum(len(c.inflight) for c in self.children), self.grace)  # fmt: skip
        self._send(P.BYE, {"returned": returned, "why": f"draining: {why}"})

    def _shutdown(self) -> None:
        """Kill the children; every job not finished goes back to the master uncharged."""
        for c in self.children:
            c.kill()
        if self.sock is not None:
            returned = [t[0] for t in self.pending] + [t[0] for c in self.children for t in c.inflight]
            self._flush()
            self._send(P.BYE, {"returned": returned, "final": True, "why": self.drain_requested or "stopped"})
            self.sock.close(linger=2000)
        if self.ctx is not None:
            self.ctx.term()
        log.info("worker %s stopped", self.id)


def _batch_deadline() -> float | None:
    """When the batch allocation running us ends (epoch seconds), if a launcher knows."""
    try:
        from ..launchers import environment
    except ImportError:
        return None
    try:
        return environment().deadline()
    except Exception:  # a post-mortem helper must never stop a worker from starting
        return None


def run_worker(**kwargs) -> None:
    agent = Agent(**kwargs)
    # scancel, qdel -notify (SIGUSR2), preemption and Ctrl-C all drain
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, agent.drain)
    agent.run()

