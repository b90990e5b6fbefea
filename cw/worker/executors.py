"""The agent's executors: their answers read, started on their slots' CPUs, replaced when they die or are
killed (with every process group of their job), reaped, and their jobs' orphans ended.

Part of :class:`cw.worker.agent.Agent` (a mixin: it uses the agent's children,
spares, poller, queue and results). The agent never waits on a process: a killed
executor is reaped by a later sweep, and what its job started outside its
group comes to the agent (a child subreaper), which ends it. A cancelled or
timed-out job is killed with its executor here too.
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import socket
import time

import zmq

from .. import defaults, job, system, trace
from .. import protocol as P
from .executor import BLOCKED, Child, describe_exit

log = logging.getLogger(__name__)


class Executors:
    """The agent's executor processes (mixed into Agent)."""

    # -- what executors say ------------------------------------------------------------
    def _read_child(self, c: Child) -> None:
        try:
            while c.conn.poll():
                trace.mark("from executor")
                self._child_answered(c, pickle.loads(c.conn.recv_bytes()))
        except (EOFError, OSError):
            self._child_died(c)
        except Exception as e:  # not one of our answers: nothing more it says can be trusted
            self._child_died(c, f"the process running the job garbled its answer ({e!r})")

    def _child_answered(self, c: Child, answer: tuple) -> None:
        if len(answer) == 2:  # its job waits on its children, or may go on
            self._child_waits(c, answer[0] == BLOCKED)
            return
        jid, status, runtime, err, tb, blob, files, output = answer
        if not c.inflight or c.inflight[0][0] != jid:  # one answer per job, whatever the job does
            log.warning("executor %d answered for job %s, which it is not running: ignored", c.pid, jid)
            return
        fn = c.inflight.popleft()[1]
        c.head_started = time.monotonic()
        self._result(jid, status, runtime, err, tb, blob, output)
        if files:
            self.outfiles.append([jid, *files])
        old, w = self.runtimes.get(fn), defaults.RUNTIME_WEIGHT
        self.runtimes[fn] = runtime if old is None else (1 - w) * old + w * runtime

    # -- ending and replacing ----------------------------------------------------------
    def _child_died(self, c: Child, why: str | None = None) -> None:
        """An executor ended (its pipe closed, or its pidfd said so): take the answers it
        sent before it went, then report its job and replace it. Never blocks for long."""
        if c not in self.children:
            return
        system.kill_group(c.pid)  # the job's processes end with it (and let go of the pipe)
        try:
            os.set_blocking(c.fd, False)  # a half-written answer must not stall us
            while c.conn.poll():
                self._child_answered(c, pickle.loads(c.conn.recv_bytes()))
        except Exception:
            pass
        code = c.wait(1.0)
        self._replace(c, why or f"the process running the job {describe_exit(code)}", P.CRASHED)

    def _replace(self, c: Child, why: str, status: int) -> None:
        """Fail the child's current job, hand its other tasks back to the queue, restart it."""
        self.counters["crashes"] += 1
        jid = None
        if c.inflight:
            task = c.inflight.popleft()
            jid, ran = task[0], time.monotonic() - c.head_started
            output = c.leftover(self._limit(task))  # what it wrote before it died
            self._result(jid, status, ran, f"job {jid} on {socket.gethostname()}: {why}", None, b"", output)
            log.warning("job %s: %s; replacing the executor process", jid, why)
        self.pending.extendleft(reversed(c.inflight))
        self._respawn(c)
        if jid is not None:
            job.wipe(self.wdir.job(jid))  # what the killed job left on the disk

    def _spawn(self, i: int) -> Child:
        """A new executor for slot i, on the slot's CPUs."""
        cpus, n = self.shares[i]
        # its siblings' pipes, pidfds and capture files are theirs alone
        others = tuple(fd for o in self.children + self.spares if o.pid != -1
                       for fd in (*o.fds(), o.out_fd, o.err_fd))  # fmt: skip
        if self.control is not None:  # the control socket is the agent's alone
            others += (self.control.fileno(),)
        if self.wdir is not None:  # and so is the lock of its directory: held by a live agent only
            others += (self.wdir.lock_fd,)
        child = Child(cpus, n, others)
        child.slot = i
        return child

    def _end(self, c: Child) -> None:
        """Kill an executor (with every process of its job); never waits: a process not
        reaped yet is reaped by a later sweep."""
        for fd in c.fds():
            self.poller.unregister(fd)
        c.kill()
        if c.exitcode is None:
            self.reaping.add(c.pid)
        c.pid = -1
        self.sweep_until = time.monotonic() + defaults.ORPHAN_SWEEP

    def _respawn(self, c: Child) -> Child | None:
        """Kill an executor and start another in its slot; none for one whose job was
        blocked (another process took its slot when it blocked)."""
        self._end(c)
        k = self.children.index(c)
        if c.blocked:
            del self.children[k]
            if c in self.resumers:
                self.resumers.remove(c)
            self.heads_changed = True
            return None
        self.children[k] = new = self._spawn(c.slot)
        for fd in new.fds():
            self.poller.register(fd, zmq.POLLIN)
        return new

    def _sweep(self, now: float) -> None:
        """Reap killed executors; end the processes their jobs started outside their group
        (orphans come to us: the agent is a child subreaper). Without a pidfd, an
        executor's end is seen here."""
        self.next_sweep = now + 0.2
        if self.reaping:
            self.reaping = {pid for pid in self.reaping if system.reap(pid) is None}
        if now < self.sweep_until:
            live = {c.pid for c in self.children + self.spares}
            for pid in system.children(os.getpid()):
                if pid not in live and pid not in self.reaping:
                    system.kill_orphan(pid)
                    self.reaping.add(pid)
        for c in list(self.children):
            if c.pidfd is None and c in self.children and c.ended():
                self._child_died(c)

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
            for t in hit:
                job.wipe(self.wdir.job(t[0]))
        waiting = self.inputs.waiting
        if any(t[0] in ids for t in waiting):
            for t in waiting:
                if t[0] in ids:
                    self._result(t[0], P.CANCELLED, None, "cancelled", None, b"")
            self.inputs.waiting = [t for t in waiting if t[0] not in ids]

    def _check_timeouts(self, now: float) -> None:
        for c in list(self.children):
            if c.inflight and c.stopped is None:  # a stopped job's time is not its own
                timeout = c.inflight[0][3]
                if timeout is not None and now - c.head_started > timeout:
                    self._replace(c, f"timed out after {timeout} s and was killed", P.TIMEOUT)
