"""``Executor``: a ``concurrent.futures.Executor`` on a cw cluster.

Code written for ``ProcessPoolExecutor`` runs on cw by changing one line.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import time
from typing import Any, Callable, Iterable, Iterator

from .client import Client
from .futures import Future


def run_chunk(fn: Callable, chunk: list[tuple]) -> list:
    """One job of ``map(..., chunksize=n)``: ``fn`` over n argument tuples, in order."""
    return [fn(*args) for args in chunk]


def _chunks(iterables: tuple[Iterable, ...], n: int) -> Iterator[list[tuple]]:
    it = zip(*iterables)
    while True:
        chunk = list(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk


class Executor(cf.Executor):
    """A ``concurrent.futures.Executor`` on a cw cluster. Takes the same arguments as ``Client``."""

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
        self._shutdown = False

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        fut = self.client._submit(fn, args, kwargs)  # every keyword is the function's, as in the pool
        self._futures.add(fut)
        fut.add_done_callback(self._futures.discard)
        return fut

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> Iterator:  # fmt: skip
        """Like ``Executor.map``: results in order; jobs are submitted at once.

        ``chunksize`` > 1 runs that many calls in one job, as ProcessPoolExecutor does.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            futures = [self.submit(fn, *args) for args in zip(*iterables)]
        else:
            futures = [self.submit(run_chunk, fn, chunk) for chunk in _chunks(iterables, chunksize)]
        deadline = None if timeout is None else time.monotonic() + timeout

        def results() -> Iterator:
            try:
                for f in futures:
                    value = f.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
                    if chunksize == 1:
                        yield value
                    else:
                        yield from value
            finally:
                for f in futures:
                    f.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        if cancel_futures:
            for f in list(self._futures):
                f.cancel()
        if wait:
            cf.wait(list(self._futures))
        self.client.close()
