"""``python -m cw.worker HOST``: the agent, which talks to the master and feeds executors.

The agent holds the link to the master, the function cache and the queue of
tasks; its executor children (:mod:`cw.worker.executor`) run the jobs. It
learns what the batch system gave it (CPUs, memory, its job's id and time
limit) from :func:`cw.launchers.environment`, and tells the master in HELLO.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import signal
import socket
import time
from typing import Any, Deque

import zmq

from .. import defaults, job, system, trace
from .. import protocol as P
from ..discovery import ClusterDir, pid_alive
from ..launchers import environment
from ..link import Link
from ..serialize import runtime_versions
from .caps import Devices, capabilities
from .executor import Child
from .executors import Executors
from .inputs import Inputs
from .output import echo_output
from .pause import Pausing
from .pipe import out_of_band, send_batch
from .sent import SentResults
from .slots import Slots

log = logging.getLogger(__name__)


class Agent(Executors, Slots, Pausing):
    def __init__(
        self,
        address: str | None = None,
        cluster: ClusterDir | None = None,
        procs: int | None = None,
        tags: list[str] | None = None,
        caps: dict | None = None,
        heartbeat: float = defaults.HEARTBEAT,
        master_timeout: float = defaults.MASTER_TIMEOUT,
        give_up: float = defaults.GIVE_UP,
        max_message: int = defaults.MAX_MESSAGE,
        grace: float = defaults.GRACE,
        term_grace: float | None = None,
        scratch: str | None = None,
        lifetime: float | None = None,
        watch_pid: int | None = None,
    ):
        self.cluster = cluster or ClusterDir()
        self.explicit_address = address
        self.key = self.cluster.key()
        self.env = environment()
        self.procs = procs or self.env.cpus() or 1
        self.caps, gpus = capabilities(self.procs, tags or [], self.env, told=caps)
        self.devices = Devices(gpus)  # each job that needs GPUs gets its own
        self.heartbeat, self.master_timeout, self.give_up = heartbeat, master_timeout, give_up
        self.max_message = max_message
        # pid alone is not unique across containers sharing a host name
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"
        # each executor's CPUs: a slot's share of what the batch system gave the worker
        self.shares = system.cpu_shares(self.procs, self.env.cpus())
        self.children: list[Child] = []
        self.reaping: set[int] = set()  # killed processes not reaped yet
        self.sweep_until = self.next_sweep = 0.0
        # (jid, fn, ctx, timeout, args, output limit, key, needs, (inputs, refs) or None)
        self.pending: Deque[tuple] = collections.deque()
        self.inputs = Inputs()
        self.resumers: Deque[Child] = collections.deque()  # children whose job may go on, waiting for a slot
        self.spares: list[Child] = []  # idle processes that gave their slot to a resuming job: warm, reused
        self.sent = SentResults()  # recent successes: sent again after a broken link
        self.resend = False
        self.heard = 0.0  # when the master last said anything
        self.fn_blobs: dict[str, bytes] = {}
        self.contexts: dict[str, dict] = {}
        self.outbox: list[P.WorkerResult] = []
        self.outblobs: list[bytes] = []
        self.outfiles: list[list] = []  # [job id, archive dir, [[name, size, sha256], ...]]
        # jobs' scratch and outputs on this node's disk; what dead workers left is wiped
        self.scratch_root = scratch
        self.wdir: job.WorkerDir | None = None
        self.counters = {"fn_received": 0, "tasks": 0, "results": 0, "crashes": 0}
        self.runtimes: dict[str, float] = {}  # function hash -> smoothed runtime
        self.draining = False
        self.drain_requested: str | None = None
        self.drain_started = 0.0
        self.grace = grace
        #: the grace after a SIGTERM, which the batch system's SIGKILL follows (KillWait)
        self.term_grace = grace if term_grace is None else min(grace, term_grace)
        self.stopping = False
        self.cancelled: set[int] = set()
        self.hello_sent = 0.0
        self.epoch: str | None = None  # the store the jobs we hold belong to (the last WELCOME's)
        self.heads_changed, self.heads_since = False, None  # what runs changed, untold since when
        self._last_usage = (0.0, 0.0)
        self.watch_pid = watch_pid
        self.ctx: zmq.Context | None = None
        self.link: Link | None = None
        # drain by itself: at --lifetime, or early enough before the batch
        # allocation ends that running jobs still get their grace period
        deadlines = [time.time() + lifetime] if lifetime else []
        end = self.env.deadline()
        if end:
            deadlines.append(end - grace - 2 * heartbeat)
        self.deadline = min(deadlines) if deadlines else None

    # -- the link to the master ------------------------------------------------------
    def _hello(self) -> None:
        """Introduce ourselves on a new session; `holding` names the jobs our children still
        have or whose results wait to be sent, and `epoch` the store they belong to.

        Tasks not yet given to a child are dropped: the master requeues them.
        """
        self.pending.clear()
        self.inputs.forget_requests()
        self.link.welcomed = False
        resent = self.sent.since(self.heard, self.heartbeat)  # may never have been stored: they go again
        header = {
            "role": "worker", "id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
            "procs": self.procs, "caps": self.caps, "have": list(self.fn_blobs),
            "refs": self.inputs.held_refs(),
            "holding": [t[0] for c in self.children for t in c.inflight] + [r[0] for r in self.outbox] + resent,
            "running": self._running(), "draining": self.draining,
            "info": self.env.info(), "label": self.env.label(), "task": self.env.task(),
            "versions": runtime_versions(), "epoch": self.epoch,
            **({"paused": self._pause_state()} if self.paused else {}),
        }  # fmt: skip
        if self._blocked():
            header["blocked"] = self._blocked()
        self._send(P.HELLO, header)
        self.resend = bool(resent)
        self.hello_sent = time.monotonic()
        log.info("worker %s saying hello to %s with %d procs", self.id, self.link.address, self.procs)

    def _usage(self, now: float) -> dict:
        """Memory (RSS, bytes) and CPU (% of one core since the last look) of the agent and its children."""
        pids = [os.getpid()] + [c.pid for c in self.children if c.pid > 0]
        rss, cpu = system.usage(pids)
        last_t, last_cpu = self._last_usage
        self._last_usage = (now, cpu)
        pct = 100.0 * (cpu - last_cpu) / (now - last_t) if last_t and now > last_t else 0.0
        return {"rss": rss, "cpu": round(max(0.0, pct), 1)}

    def _running(self) -> list[int]:
        """The jobs our children are running now: the head of each one's batch."""
        return [c.inflight[0][0] for c in self.children if c.inflight]

    def _send(self, kind: bytes, header: Any = None, blobs=()) -> None:
        self.link.send(kind, header, blobs)

    # -- the loop ----------------------------------------------------------------
    def run(self) -> None:
        # the processes of a killed executor's job that left its group come to us, to be ended
        system.become_subreaper()
        self.wdir = job.WorkerDir(self.scratch_root, self.id)
        job.configure(self.wdir.path, self.cluster.path / "outputs", on_worker=True)  # executors inherit it
        self._open_control()  # a local `cw pause`, without the cluster's key
        for i in range(self.procs):  # fork before any ZeroMQ thread exists
            self.children.append(self._spawn(i))
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        for c in self.children:
            for fd in c.fds():
                self.poller.register(fd, zmq.POLLIN)
        if self.control is not None:
            self.poller.register(self.control.fileno(), zmq.POLLIN)
        self.link = Link(self.ctx, self.poller, self.key, self.cluster, self.explicit_address,
                         who="this worker", hello=self._hello, master_timeout=self.master_timeout,
                         give_up=self.give_up, max_message=self.max_message, linger=2000)  # fmt: skip
        self.link.connect()
        try:
            while not self.stopping:
                events = dict(self.poller.poll(self._poll_ms()))
                if self.link.readable(events):
                    self._read_master()
                for c in list(self.children):
                    if c.fd in events:
                        self._read_child(c)
                    if c.pidfd in events and c in self.children:
                        self._child_died(c)  # ended, though its pipe may still be open
                if self.control is not None and self.control.fileno() in events:
                    self._read_control()
                if self.cancelled:
                    self._cancel()
                if self.resumers:
                    self._grant()
                self._feed_children()
                now = time.monotonic()
                self._flush(now)
                self._check_timeouts(now)
                if self.paused:
                    self._check_pause()
                if now >= self.next_sweep:
                    self._sweep(now)
                if self.watch_pid and not pid_alive(self.watch_pid) and not self.drain_requested:
                    self.drain_requested = f"process {self.watch_pid} ended"
                if self.drain_requested and not self.draining:
                    self._begin_drain(self.drain_requested)
                elif self.deadline is not None and time.time() >= self.deadline and not self.draining:
                    self._begin_drain("lifetime reached")
                # also under load (results keep the link busy): the status shows RSS and CPU
                if now - self.link.last_sent >= self.heartbeat or now - self._last_usage[0] >= defaults.USAGE_EVERY:
                    self._send(P.HEARTBEAT, {**self._counters(), **self._usage(now)})
                if not self.link.keep_alive(now):
                    break
                if self.draining:
                    busy = any(c.inflight for c in self.children)
                    if not busy or now - self.drain_started > self.grace:
                        break
        finally:
            self._shutdown()

    def _read_master(self) -> None:
        for kind, h, blobs in self.link.recv():
            self.heard = time.monotonic()
            if kind == P.TASKS:
                tasks = h["t"]
                n = len(tasks)
                nf = len(h.get("f", ()))
                for fn, blob in zip(h.get("f", ()), blobs[n:]):
                    self.fn_blobs[fn] = blob
                    self.counters["fn_received"] += 1
                self.contexts.update(h.get("c") or {})
                if "i" not in h:
                    for (jid, fn, ctx, timeout, limit, key, needs), args in zip(tasks, blobs):  # TaskSpec rows
                        self.pending.append((jid, fn, ctx, timeout, args, limit, key, needs, None))
                else:  # a graph's: each waits until its inputs and scattered data are here
                    self.pending.extend(self.inputs.tasks(h, tasks, blobs, n + nf))
                self.counters["tasks"] += n
            elif kind == P.DATA:
                ready, bad = self.inputs.arrived(h, blobs)
                self.pending.extendleft(reversed(ready))
                for t, why in bad:
                    self._result(t[0], P.FAILED, None, f"job {t[0]} cannot run: {why}", None, b"")
            elif kind == P.CANCEL:
                self.cancelled.update(h["i"])
            elif kind == P.WELCOME:
                self._welcomed(h)
            elif kind == P.PAUSE:
                self.pause(h.get("seconds"), bool(h.get("stop")), "the master")
            elif kind == P.RESUME:
                self.resume("the master")
            elif kind == P.BYE:
                if h.get("rehello"):
                    # one HELLO at a time (later BYEs answer messages queued before
                    # it), unless it has gone unanswered for two heartbeats
                    if self.link.welcomed or time.monotonic() - self.hello_sent > 2 * self.heartbeat:
                        self._hello()
                else:  # the master is going away: look for it again at once
                    log.warning("master says: %s", h.get("why", "bye"))
                    self.link.drop()
                    return
            # HEARTBEAT: hearing from the master is all it is for

    def _welcomed(self, h: dict) -> None:
        """A master on another store (a new epoch) knows none of our jobs, and their ids
        name other jobs there: drop them, results included, before any new task. The same
        store: results sent since we last heard from it may never have been stored, and go
        again."""
        epoch = h.get("epoch")
        if self.epoch is not None and epoch != self.epoch:
            held = [t[0] for c in self.children for t in c.inflight] + [r[0] for r in self.outbox]
            if held:
                log.warning("master %s serves another store (%s, epoch %s, was %s): dropping the %d"
                            " jobs we held", h.get("master"), h.get("store"), epoch, self.epoch, len(held))  # fmt: skip
            for c in list(self.children):
                if c.inflight:
                    c.inflight.clear()
                    self._respawn(c)
            self.outbox, self.outblobs = [], []
            self.cancelled.clear()
            self.sent = SentResults()
            self.resend = False
        self.epoch = epoch
        if self.resend:
            self.resend = False
            for rows, out, files in self.sent.batches():
                header = {"r": rows, "running": self._running()}
                if files:
                    header["o"] = files
                self._send(P.RESULT, header, out)

    # -- children ----------------------------------------------------------------
    def _feed_children(self) -> None:
        """Hand a batch of tasks to each idle child.

        Only idle children get work: a task given to a busy child could wait
        behind a long job while a sibling frees up, and a drain or a cancel
        could not take it back. Batches (sized to ~5 ms of work) keep short
        jobs flowing.
        """
        if not self.pending or self.draining or self.paused:
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
            per = max(1, min(len(self.pending) // (4 * len(self.children)),
                             int(defaults.EXECUTOR_BATCH_SECONDS / rt) if rt else 1, defaults.EXECUTOR_BATCH_MAX))
            ctx = self.pending[0][2]
            if c.used and c.ctx != ctx:  # another client's job: start from a clean process
                c = self._respawn(c)
            batch, new_funcs, limits, keys, short = [], [], {}, [], False
            while self.pending and len(batch) < per and self.pending[0][2] == ctx:
                if batch and (self.pending[0][1] != batch[0][1] or self.pending[0][7]):
                    break  # one function per batch (its runtime sized the batch); a GPU job alone
                devices = None
                gpus = (self.pending[0][7] or {}).get("gpus")
                if gpus:  # its own devices: it waits while they are busy (the master counts too)
                    devices = self.devices.take(self.pending[0][0], int(gpus))
                    if devices is None:
                        short = True
                        break
                jid, fn, _, timeout, args, limit, key, _, ex = task = self.pending.popleft()
                if ex is not None:
                    missing = self.inputs.missing(task)
                    if missing:  # gone from the cache since it arrived: ask again
                        if devices is not None:
                            self.devices.give_back(jid)
                        self.inputs.ask(missing)
                        self.inputs.waiting.append(task)
                        continue
                    keys += self.inputs.keys(task)
                if fn not in c.funcs:
                    new_funcs.append((fn, self.fn_blobs[fn]))
                    c.funcs.add(fn)
                batch.append((jid, fn, out_of_band(args), key, devices, None if ex is None else ex[0]))
                if limit is not None:
                    limits[jid] = limit
                c.inflight.append(task)
                if devices is not None:
                    break
            if not batch:
                if short:  # a GPU job waits for its devices
                    break
                continue  # what it took waits for its inputs: the next child may take more
            data, drop = self.inputs.for_child(c.data, keys) if keys else ((), ())
            c.head_started = now
            self.heads_changed = True
            where = (self.link.address, str(self.cluster.path))
            send_batch(c.conn.send_bytes, (batch, new_funcs, self.contexts.get(ctx) if ctx else None,
                                           limits or None, data, drop, where))  # fmt: skip
            trace.mark("to executor")
            c.ctx, c.used = ctx, True

    def _limit(self, task: tuple) -> int:
        """The output limit of a task: its own, its client's, or the default."""
        if task[5] is not None:
            return task[5]
        ctx = self.contexts.get(task[2]) if task[2] else None
        return int((ctx or {}).get("output_limit") or defaults.OUTPUT_LIMIT)

    def _result(self, jid, status, runtime, err, tb, blob, output=None) -> None:
        if len(blob) > self.max_message:
            status, err, tb = P.FAILED, (
                f"result of job {jid} is {len(blob)} bytes, larger than the largest message "
                f"({self.max_message} bytes)"
            ), None
            blob = b""
        if self.devices.held:
            self.devices.give_back(jid)
        if output is None:
            self.outbox.append((jid, status, runtime, err, tb))  # a WorkerResult row
        else:
            self.outbox.append((jid, status, runtime, err, tb, *output))
            echo_output(jid, output)
        self.outblobs.append(blob)
        self.counters["results"] += 1
        keep = self.inputs.keep
        if keep and jid in keep:  # an input of other jobs: they may run here next
            keep.discard(jid)
            if status == P.OK:
                self.inputs.put(jid, blob)

    def _poll_ms(self) -> int:
        """How long the loop may wait for an event: less while a change of what runs is untold."""
        since = self.heads_since if self.heads_changed else None
        return 100 if since is None else max(0, int((since + defaults.STARTED_DELAY - time.monotonic()) * 1000) + 1)

    def _flush(self, now: float | None = None) -> None:
        """Send the results waiting, or, once no result has carried it for STARTED_DELAY,
        what the executors run now (a HEARTBEAT)."""
        if not self.link.welcomed:  # results wait for a session the master has welcomed
            return
        need = self.inputs.request()
        if need is not None:
            self._send(P.NEED, need)
        if self.outbox:
            now = time.monotonic()
            blocked = self._blocked()
            sizes = [len(b) + (len(r[5] or "") + len(r[6] or "") if len(r) > 5 else 0)
                     for r, b in zip(self.outbox, self.outblobs)]  # fmt: skip
            sent = 0
            for part in P.batches(sizes):
                header = {"r": self.outbox[part], "running": self._running()}
                if self.outfiles:  # archived outputs travel with their jobs' results
                    ids = {r[0] for r in header["r"]}
                    header["o"] = [f for f in self.outfiles if f[0] in ids]
                if blocked:
                    header["blocked"] = blocked
                if not self.link.send(P.RESULT, header, self.outblobs[part]):
                    break  # the connection just went: the rest waits for the next session
                sent = part.stop
            # a master killed now never stored them: kept, with what they archived, to go again
            self.sent.add(now, self.outbox[:sent], self.outblobs[:sent], self.outfiles)
            if self.outfiles and sent:
                done = {r[0] for r in self.outbox[:sent]}
                self.outfiles = [f for f in self.outfiles if f[0] not in done]
            del self.outbox[:sent], self.outblobs[:sent]
            if sent:  # a RESULT says what runs now (and what is blocked)
                self.heads_changed, self.heads_since = False, None
        elif self.heads_changed:  # the master charges a lost worker's running jobs only; a
            now = time.monotonic() if now is None else now  # RESULT within STARTED_DELAY tells it
            if self.heads_since is None:
                self.heads_since = now
            elif now - self.heads_since >= defaults.STARTED_DELAY:
                self._send(P.HEARTBEAT, self._counters())
                self.heads_changed, self.heads_since = False, None

    # -- stopping ----------------------------------------------------------------
    def drain(self, signum: int | None = None, _frame: Any = None) -> None:
        """Signal handler: drain (a second signal stops at once). The loop does the work."""
        if self.drain_requested:
            self.stopping = True
        name = signal.Signals(signum).name if signum else "request"
        self.drain_requested = f"{name} received"
        if signum == signal.SIGTERM:
            self.grace = self.term_grace

    def _begin_drain(self, why: str) -> None:
        """Take no new jobs, hand back the ones not started, let the running ones finish."""
        if self.paused:  # running jobs get their grace: stopped ones continue
            self._continue_jobs()
            self.paused = None
        self.draining = True
        self.drain_started = time.monotonic()
        returned = [t[0] for t in self.pending] + [t[0] for t in self.inputs.forget_requests()]
        self.pending.clear()
        log.warning("worker %s draining (%s): %d jobs handed back, %d running get %.0f s",
                    self.id, why, len(returned), sum(len(c.inflight) for c in self.children), self.grace)  # fmt: skip
        self._send(P.BYE, {"returned": returned, "why": f"draining: {why}"})

    def _shutdown(self) -> None:
        """Kill the children; every job not finished goes back to the master uncharged."""
        for c in self.children + self.spares:
            c.kill()
        deadline = time.monotonic() + 1.0  # their jobs' orphans come to us: end them too
        while time.monotonic() < deadline:
            live = [pid for pid in system.children(os.getpid()) if system.reap(pid) is None]
            if not live:
                break
            for pid in live:
                system.kill_orphan(pid)
            time.sleep(0.01)
        if self.link is not None and self.link.sock is not None:
            returned = [t[0] for t in self.pending] + [t[0] for c in self.children for t in c.inflight]
            returned += [t[0] for t in self.inputs.forget_requests()]
            self._flush()
            self._send(P.BYE, {"returned": returned, "final": True, "why": self.drain_requested or "stopped"})
            self.link.close()
        if self.ctx is not None:
            self.ctx.term()
        self._close_control()
        if self.wdir is not None:
            self.wdir.close()
        log.info("worker %s stopped", self.id)


def run_worker(**kwargs: Any) -> None:
    """Run a worker in the foreground; signals drain it (a second one stops it at once)."""
    agent = Agent(**kwargs)
    # scancel, qdel -notify (SIGUSR2), preemption and Ctrl-C all drain
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, agent.drain)
    agent.run()

