"""The master: one process, one thread, one ROUTER socket, the store's only writer.

- :mod:`cw.master.policy`: where jobs go (queues, matching, prefetch, the window); no I/O.
- :mod:`cw.master.server`: the loop (read, commit, answer), timers, status; :func:`run_master`.
- :mod:`cw.master.clients` and :mod:`cw.master.workers`: what it does for each kind of peer.
"""

from .policy import Job, Policy, Worker, satisfies
from .server import Master, run_master

__all__ = ["Job", "Master", "Policy", "Worker", "run_master", "satisfies"]
