"""The job this process runs, if any: where its master is, and how a job that waits gives its slot back.

The executor (:mod:`cw.worker.executor`) says here which job it runs and
installs the hook that tells its agent when that job blocks; the client layer
reads it: ``cw.get_client()`` returns a client of the same master, in the
job's run and context, and a future's ``result()`` (``gather``, ``wait``,
``as_completed``) waits inside :func:`waiting`, so that the worker runs
another job in this one's slot meanwhile and gives it back when it resumes.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, NamedTuple, Optional


class RunningJob(NamedTuple):
    """What a job knows of where it runs."""

    id: int  #: its job id in the store
    address: str  #: the master's address, as the worker reaches it
    cluster: str  #: the cluster directory (its key signs the messages)
    run: Optional[str]  #: the run of the client that submitted it
    context: dict  #: that client's cwd, sys.path and named variables


#: The id of the job this process runs now (set by the executor around each job), or None ...
job_id: Optional[int] = None
#: ... and where it runs: (master address, cluster directory, run, context), set per batch.
where: Optional[tuple] = None


def running() -> Optional[RunningJob]:
    """The job this process runs now, or None outside a job."""
    if job_id is None or where is None:
        return None
    return RunningJob(job_id, *where)

#: Set by the executor: ``block(True)`` before a job waits on other jobs, ``block(False)``
#: after (it returns once the worker has given the job a slot again).
block: Optional[Callable[[bool], None]] = None

_lock = threading.Lock()
_depth = 0


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    """Around a wait on other jobs' results: inside a job, its slot is lent meanwhile.

    Waits nest (``gather`` waits on each future) and several threads of a job
    may wait at once: only the first wait in and the last wait out say so.
    """
    global _depth
    hook = block
    if hook is None or job_id is None:
        yield
        return
    with _lock:
        _depth += 1
        first = _depth == 1
    if first:
        hook(True)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            last = _depth == 0
        if last:
            hook(False)
