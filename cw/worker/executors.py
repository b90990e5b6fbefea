"""The agent's executors: started on their slots' CPUs, replaced when they die or are
killed (with every process group of their job), reaped, and their jobs' orphans ended.

Part of :class:`cw.worker.agent.Agent` (a mixin: it uses the agent's children,
poller, queue and results). The agent never waits on a process: a killed
executor is reaped by a later sweep, and what its job started outside its
group comes to the agent (a child subreaper), which ends it.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import time

import zmq

from .. import defaults, job, system
from .. import protocol as P
from .executor import Child, describe_exit

log = logging.getLogger(__name__)


class Executors:
    """The agent's executor processes (mixed into Agent)."""

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
        others = tuple(fd for o in self.children if o.pid != -1 for fd in (*o.fds(), o.out_fd, o.err_fd))
        if self.control is not None:  # the control socket is the agent's alone
            others += (self.control.fileno(),)
        return Child(cpus, n, others)

    def _respawn(self, c: Child) -> Child:
        """Kill an executor (with every process of its job) and start another in its slot.

        Never waits: a process not reaped yet is reaped by a later sweep.
        """
        for fd in c.fds():
            self.poller.unregister(fd)
        c.kill()
        if c.exitcode is None:
            self.reaping.add(c.pid)
        c.pid = -1
        self.sweep_until = time.monotonic() + defaults.ORPHAN_SWEEP
        i = self.children.index(c)
        self.children[i] = new = self._spawn(i)
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
            live = {c.pid for c in self.children}
            for pid in system.children(os.getpid()):
                if pid not in live and pid not in self.reaping:
                    system.kill_orphan(pid)
                    self.reaping.add(pid)
        for c in list(self.children):
            if c.pidfd is None and c in self.children and c.ended():
                self._child_died(c)
