"""Futures and how a job's outcome becomes one: a value, or the right exception.

:class:`Future` is a ``concurrent.futures.Future`` that knows its job;
:class:`Delivery` hands an outcome straight to a callback (ClientThread)
without the cost of a Future.
"""

from __future__ import annotations

import concurrent.futures as cf
import pickle
import threading
import time
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from .. import current
from .. import protocol as P
from ..errors import (
    ClientError,
    DependencyError,
    JobCrashedError,
    JobError,
    NeedsReferences,
    RemoteImportError,
    TimeoutError,
    UnsatisfiableError,
    WorkerLostError,
)
from ..serialize import rebuild_exception
from .progress import track


class _Kept:
    """A finished job's value that stayed at the master (it is an input of other jobs)."""

    def __repr__(self) -> str:
        return "<value kept at the master>"


KEPT = _Kept()

if TYPE_CHECKING:
    from .connection import Connection

_DONE = (FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED)


class Future(cf.Future):
    """A ``concurrent.futures.Future`` that knows its job's number in the store.

    ``jobid`` is the number error messages, ``cw logs RUN ID``, ``cw results``,
    ``cw top`` and the dashboard show: the store's id of the job that answered
    (an earlier job's, for a stored result or a running job it was attached to),
    known once the future is done; None before, and for a job cancelled before
    it was stored. (With ``serial=True`` there is no store: a number of this process.)

    PENDING until a worker starts the job, then RUNNING, then FINISHED (or
    CANCELLED). ``cancel()`` on a ``Client`` future keeps dask's meaning: a
    queued job is dropped and a running one killed. An ``Executor`` future
    (``kill=False``) keeps the standard contract: a running one cannot be
    cancelled (``client.cancel(futures)`` is the explicit kill).
    """

    _output: tuple | None = None  # (status, stdout, stderr), asked once the job finished
    # concurrent.futures.Future's state, as class defaults: a future writes them only as
    # they change. Its Condition and two lists (about 1 KB a future, most of a million
    # futures' memory) are made only for a future somebody waits on, or watches: every
    # future of a connection shares one lock, and a waiter's Condition is built on it.
    _state = PENDING
    _result = None
    _exception = None
    _lock = threading.RLock()  # a future without a connection (serial) shares this one
    key: str | None = None  #: its key in the client's run (futures among a job's arguments feed its key)
    _fetched: threading.Event | None = None  # set once a value kept at the master arrives

    def __init__(self, seq: int, conn: Connection | None = None, kill: bool = True):
        # not cf.Future.__init__: it makes the Condition and the lists at once
        self._seq = seq  # its number in this client's session, on the wire only
        self.jobid: int | None = None if conn is not None else seq
        self._conn = conn
        self._owner = conn  # the connection that can fetch a value kept at the master
        self._kill = kill
        if conn is not None:
            self._lock = conn.lock

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        c = self.__dict__.get("_cond")
        if c is None:
            with self._lock:
                c = self.__dict__.setdefault("_cond", threading.Condition(self._lock))
        return c

    @property
    def _waiters(self) -> list:  # type: ignore[override]
        return self.__dict__.setdefault("_waiting", [])

    @property
    def _done_callbacks(self) -> list:  # type: ignore[override]
        return self.__dict__.setdefault("_callbacks", [])

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        """set_result and set_exception: wake only who waits on this future."""
        with self._lock:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED):
                raise cf.InvalidStateError(f"{self._state}: {self!r}")
            if exception is None:
                self._result = result
            else:
                self._exception = exception
            self._state = FINISHED
            d = self.__dict__
            for waiter in d.get("_waiting", ()):
                if exception is None:
                    waiter.add_result(self)
                else:
                    waiter.add_exception(self)
            c = d.get("_cond")
            if c is not None:
                c.notify_all()
        if "_callbacks" in self.__dict__:
            self._invoke_callbacks()

    def set_result(self, result: Any) -> None:
        self._finish(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception)

    def result(self, timeout: float | None = None) -> Any:
        """The job's value. Inside a job, the wait gives the job's slot to another job
        meanwhile; a value kept at the master (an input of other jobs) is fetched now."""
        if self._state not in _DONE:
            with current.waiting():
                self._wait(timeout)
        value = super().result(0)
        if value is KEPT:
            value = self._fetch(timeout)
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state not in _DONE:
            with current.waiting():
                self._wait(timeout)
        return super().exception(0)

    def _wait(self, timeout: float | None) -> None:
        """Until the future is done or the timeout passes (then result(0) says which)."""
        if self._state in (FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED):
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = self._condition
        with cond:
            while self._state not in (FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                cond.wait(left)

    def _fetch(self, timeout: float | None) -> Any:
        conn = self._owner
        if conn is None or conn.closed:
            raise ClientError(f"job {self.jobid}'s value stayed at the master (it is an input of other jobs) and"
                              " this client is closed: read it with `cw results`, or ask before closing")  # fmt: skip
        conn.fetch([self])
        with current.waiting():
            if not self._fetched.wait(timeout):
                raise TimeoutError(f"job {self.jobid}'s value did not come from the master within {timeout} s")
        value = self._result
        if isinstance(value, _Failed):
            raise value.exc
        return value

    def _kept(self) -> None:
        """The job succeeded; its value stays at the master until someone asks for it."""
        with self._condition:
            self._fetched = threading.Event()
        self._settle(KEPT, False)

    def _fill(self, value: Any, failed: bool) -> None:
        """A kept value arrived (from the I/O thread)."""
        with self._condition:
            self._result = _Failed(value) if failed else value
        self._fetched.set()

    def __reduce__(self):
        raise NeedsReferences("a cw Future travels only as an argument of a job of the client that made it"
                              " (client.submit(f, future)): pass future.result() elsewhere")  # fmt: skip

    def stdout(self) -> str | None:
        """What the job wrote to its stdout (file descriptor 1), as submitit's ``job.stdout()``.

        The tail the store kept (what was cut is said at the top); ``""`` if it
        wrote nothing; None while the job has not finished, for a cancelled
        one, and with ``serial=True`` (the job's output went to this terminal).
        Also for a failed job. Asks the master once, then remembers.
        """
        out = self._fetch_output()
        return None if out is None else out[1]

    def stderr(self) -> str | None:
        """What the job wrote to its stderr (file descriptor 2); as :meth:`stdout`."""
        out = self._fetch_output()
        return None if out is None else out[2]

    def _fetch_output(self) -> tuple | None:
        if self._output is None and self.done() and self._conn is not None:
            out = self._conn.output(self._seq, self.jobid)
            if out[0] is not None:
                self._output = out
        return self._output

    def cancel(self) -> bool:
        return self._cancel(self._kill)

    def _cancel(self, kill: bool) -> bool:
        with self._condition:
            if self._state == FINISHED or (self._state == RUNNING and not kill):
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            self._state = CANCELLED
            self._condition.notify_all()
        # nobody will dequeue it: waiters (wait, as_completed) hear of it now
        self.set_running_or_notify_cancel()
        self._invoke_callbacks()
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            conn.cancel(self._seq)
        return True

    def _started(self) -> None:
        """A worker started the job (the I/O thread heard so)."""
        with self._lock:
            if self._state == PENDING:
                self._state = RUNNING

    def _settle(self, value: Any, failed: bool) -> None:
        """The job's outcome (from the I/O thread); nothing if it was cancelled meanwhile."""
        try:
            if failed:
                self.set_exception(value)
            else:
                self.set_result(value)
        except cf.InvalidStateError:
            pass  # cancelled while the result was on its way

    def __repr__(self) -> str:
        return f"<cw.Future job {self.jobid} {self._state.lower()}>"


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


class Delivery:
    """A job's outcome handed straight to a callback: 56 bytes where a Future takes 1.5 KB."""

    __slots__ = ("jobid", "sink", "finished")

    def __init__(self, jobid: int, sink: Callable[[int, Any, bool], None]):
        self.jobid, self.sink, self.finished = jobid, sink, False

    def done(self) -> bool:
        return self.finished

    def _started(self) -> None:
        pass

    def _settle(self, value: Any, failed: bool) -> None:
        if not self.finished:
            self.finished = True
            self.sink(self.jobid, value, failed)

    def set_exception(self, exc: BaseException) -> None:
        self._settle(exc, True)

    def cancel(self) -> bool:
        return self._cancel(True)

    def _cancel(self, kill: bool) -> bool:
        if self.finished:
            return False
        self._settle(cf.CancelledError(f"job {self.jobid} was cancelled"), True)
        return True


def dependency_error(err: str, blob: bytes, session: str | None) -> DependencyError:
    """The DependencyError of a job whose input failed: it names the first job that failed
    (by its id in the store: ``Future.jobid``) and carries that job's exception."""
    try:
        job, sid, seq, status, ierr, itb, iblob = pickle.loads(blob)
    except Exception:
        return DependencyError(f"an input of this job failed: {err}")
    cause = error_for(status, ierr, itb, iblob) if status != P.CANCELLED else cf.CancelledError(ierr)
    ours = sid is not None and sid == session
    who = f"job {job}" + ("" if ours else " (another client's)")
    exc = DependencyError(f"an input of this job failed: {who} ended {P.STATUS_NAMES.get(status, status)}:"
                          f" {ierr}", job if ours else None, job, cause)  # fmt: skip
    exc.__cause__ = cause
    return exc


def error_for(status: int, err: str, tb: str, blob: bytes, session: str | None = None) -> BaseException:
    """The exception a client raises for a job that did not succeed.

    A job's SystemExit or KeyboardInterrupt arrives as a JobError carrying it
    (``.original``): re-raised as itself, it would end the client's program.
    """
    if status == P.DEPENDENCY:
        return dependency_error(err, blob, session)
    if status == P.RAISED:
        exc = rebuild_exception(blob, err, tb)
        if not isinstance(exc, Exception):
            wrapped = JobError(f"the job raised {type(exc).__name__}: {exc}")
            wrapped.original = exc  # type: ignore[attr-defined]
            wrapped.__cause__ = exc.__cause__
            return wrapped
        return exc
    cls = {
        P.IMPORT: RemoteImportError,
        P.CRASHED: JobCrashedError,
        P.LOST: WorkerLostError,
        P.TIMEOUT: TimeoutError,
        P.UNSATISFIABLE: UnsatisfiableError,
    }.get(status, JobError)
    return cls(err)


def as_completed(futures: Iterable[cf.Future], timeout: float | None = None,
                 progress: bool = False) -> Iterator[cf.Future]:  # fmt: skip
    """Futures in the order they finish (``concurrent.futures.as_completed``). Inside a job,
    its slot runs another job while it waits for the next one.

    ``progress=True`` draws a bar (tqdm.auto): done, failed, total and the rate.
    """
    if progress:
        futures = list(futures)
        bar = track(futures)
    it = cf.as_completed(futures, timeout)
    try:
        while True:
            try:
                with current.waiting():
                    f = next(it)
            except StopIteration:
                return
            except cf.TimeoutError as e:
                raise TimeoutError(str(e)) from None
            yield f
    finally:
        if progress:
            bar.close()


