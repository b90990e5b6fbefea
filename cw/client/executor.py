"""``Executor``: a ``concurrent.futures.Executor`` on a cw cluster.

Code written for ``ProcessPoolExecutor`` runs on cw by changing one line.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import itertools
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Iterator

from ..command import run_command
from .client import Client, shell_job
from .futures import Future
from .progress import track


def run_chunk(fn: Callable, chunk: list[tuple]) -> list:
    """One job of ``map(..., chunksize=n)``: ``fn`` over n argument tuples, in order."""
    return [fn(*args) for args in chunk]


def _result(fut: cf.Future, deadline: float | None) -> Any:
    return fut.result(None if deadline is None else max(0.0, deadline - time.monotonic()))


def _chunks(iterables: tuple[Iterable, ...], n: int) -> Iterator[list[tuple]]:
    it = zip(*iterables)
    while True:
        chunk = list(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk


_live: weakref.WeakSet = weakref.WeakSet()  # executors whose work is not done


@atexit.register
def _wait_at_exit() -> None:
    """As ProcessPoolExecutor does: an interpreter that exits without shutdown() waits
    for the work it submitted (cw's I/O threads still run while atexit hooks do)."""
    for ex in list(_live):
        ex.shutdown(wait=True)


class Executor(cf.Executor):
    """A ``concurrent.futures.Executor`` on a cw cluster. Takes the same arguments as ``Client``.

    Its futures keep the standard contract: PENDING until a worker starts the
    job, then RUNNING, and a running future cannot be cancelled
    (``executor.client.cancel(futures)`` kills jobs on purpose).
    """

    def __init__(self, max_workers: int | str | None = None, address: str | None = None, **kwargs: Any):
        """``max_workers`` (as for ProcessPoolExecutor) sizes an embedded local
        cluster; a cluster's size is its own business. An address may come first."""
        if isinstance(max_workers, str):
            max_workers, address = None, max_workers
        if max_workers is not None and "n_workers" not in kwargs:
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            kwargs["n_workers"] = max_workers
        self.client = Client(address, **kwargs)
        self._futures: set[cf.Future] = set()
        self._lock = threading.Lock()
        self._shutdown = False
        self._closer: threading.Thread | None = None
        _live.add(self)

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            # every keyword is the function's, as in the pool
            fut = self.client._submit(fn, args, kwargs, kill=False)
            self._futures.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    def submit_shell(self, cmd: Any, **kwargs: Any) -> Future:
        """Run a command on the cluster (see :meth:`cw.Client.submit_shell`); its future."""
        options = {k: kwargs.pop(k) for k in ("key", "cache", "requires", "timeout", "max_retries", "output_limit")
                   if k in kwargs}
        args, kw = shell_job(cmd, **kwargs)
        if options.get("output_limit") is not None:
            kw["output_limit"] = int(options["output_limit"])
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            fut = self.client._submit(run_command, args, kw, kill=False, **options)
            self._futures.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: cf.Future) -> None:
        with self._lock:
            self._futures.discard(fut)

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1, progress: bool = False) -> Iterator:  # fmt: skip
        """Like ``Executor.map``: results in order; jobs are submitted at once.

        ``chunksize`` > 1 runs that many calls in one job, as ProcessPoolExecutor
        does. Each future is dropped as its result is yielded, so a long map
        over big results does not hold them all. ``progress=True`` (cw's own
        keyword) draws a bar (tqdm.auto) over the jobs.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if chunksize == 1:
                futures = self.client._submit_many(fn, zip(*iterables), kill=False)
            else:
                futures = self.client._submit_many(run_chunk, ((fn, chunk) for chunk in _chunks(iterables, chunksize)),
                                                   kill=False)  # fmt: skip
            self._futures.update(futures)
        for f in futures:
            f.add_done_callback(self._forget)
        bar = track(futures, getattr(fn, "__name__", "jobs")) if progress else None
        futures.reverse()
        deadline = None if timeout is None else time.monotonic() + timeout

        def results(executor: Executor = self) -> Iterator:  # holds the executor while iterated
            # no local keeps a yielded future or value: the caller's reference is the last
            try:
                while futures:
                    if chunksize == 1:
                        yield _result(futures.pop(), deadline)
                    else:
                        yield from _result(futures.pop(), deadline)
            finally:
                for f in futures:
                    f.cancel()
                if bar is not None:
                    bar.close()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As the standard says: no new work; ``cancel_futures`` cancels the pending
        futures (running ones finish); ``wait=False`` returns at once while the
        work still runs, and the connection closes when it is done."""
        with self._lock:
            self._shutdown = True
            pending = list(self._futures)
        if cancel_futures:
            for f in pending:
                f.cancel()
        if wait:
            cf.wait(pending)
            self._close()
        elif self._closer is None:
            self._closer = threading.Thread(target=self._close_when_done, args=(pending,),
                                            name="cw-executor-shutdown", daemon=True)  # fmt: skip
            self._closer.start()

    def _close_when_done(self, pending: list[cf.Future]) -> None:
        cf.wait(pending)
        self._close()

    def _close(self) -> None:
        _live.discard(self)
        self.client.close()

    def __del__(self) -> None:
        try:
            if not self._shutdown:
                self.shutdown(wait=False)
        except Exception:
            pass
