"""The slots a waiting job lends: a job that waits on its children gives its slot back.

Part of :class:`cw.worker.agent.Agent` (a mixin over its children, spares and
poller; :mod:`cw.worker.executors` starts and ends the processes). A child
whose job waits on jobs it submitted (``cw.get_client()``) keeps its process
but gives its slot back: another process takes the slot meanwhile. When the
job may go on, it waits for a slot, granted before any queued task takes one;
the process that leaves in its favour is kept warm as a spare for the next
job that blocks.
"""

from __future__ import annotations

from typing import Any, Deque

import zmq

from .executor import GO, Child


class Slots:
    """The slots of blocked jobs (mixed into Agent)."""

    children: list[Child]
    spares: list[Child]
    resumers: Deque[Child]
    procs: int
    reaping: set[int]
    poller: zmq.Poller
    counters: dict
    heads_changed: bool
    _spawn: Any  #: the executors': a new process for a slot
    _end: Any  #: the executors': kill a process
    _running: Any  #: the agent's: the jobs its children run

    # -- slots lent by jobs that wait on their children ------------------------------------
    def _blocked(self) -> list[int]:
        """The running jobs that wait on their children: their slots run other jobs."""
        return [c.inflight[0][0] for c in self.children if c.blocked and c.inflight]

    def _counters(self) -> dict:
        """A heartbeat's header: the counters, the running jobs and the blocked ones."""
        h = {**self.counters, "running": self._running()}
        blocked = self._blocked()
        if blocked:
            h["blocked"] = blocked
        return h

    def _child_waits(self, c: Child, blocked: bool) -> None:
        """A job waits on jobs it submitted: another process takes its slot meanwhile. When it
        may go on, it waits for a slot (granted before any queued task takes one)."""
        if blocked:
            c.blocked = True
            self._lend(c.slot)
        else:
            self.resumers.append(c)
        self.heads_changed = True

    def _lend(self, slot: int) -> None:
        """A process for a slot a blocked job gave back: a warm spare if there is one."""
        while self.spares:
            c = self.spares.pop()
            if not c.ended():
                c.slot = slot
                self.children.append(c)
                for fd in c.fds():
                    self.poller.register(fd, zmq.POLLIN)
                return
            c.kill()  # it died while it waited
            self.reaping.add(c.pid)
        new = self._spawn(slot)
        self.children.append(new)
        for fd in new.fds():
            self.poller.register(fd, zmq.POLLIN)

    def _grant(self) -> None:
        """Give slots back to resuming jobs: an idle process leaves in their favour."""
        while self.resumers:
            active = [c for c in self.children if not c.blocked]
            if sum(1 for c in active if c.inflight) >= self.procs:
                return
            idle = next((c for c in active if not c.inflight), None)
            if idle is not None and len(active) >= self.procs:
                self.children.remove(idle)
                if len(self.spares) < self.procs:  # kept warm (and out of the poller) for the next wait
                    for fd in idle.fds():
                        self.poller.unregister(fd)
                    self.spares.append(idle)
                else:
                    self._end(idle)
            c = self.resumers.popleft()
            c.blocked = False
            self.heads_changed = True
            try:
                c.conn.send_bytes(GO)
            except OSError:
                pass  # it died: its pipe says so at the next poll
