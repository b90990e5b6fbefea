"""Graphs from the client: futures and scattered data as arguments, tree reductions, nested clients.

A job's arguments are pickled with a ``persistent_id`` that turns every cw
:class:`~cw.client.futures.Future` into its number among the job's inputs
(the master holds the job until they have results) and every :class:`Ref`
into its hash (the data was sent once, by ``Client.scatter``).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .. import current
from ..errors import DependencyError, NeedsReferences, SerializationError
from ..serialize import dumps_args, loads, loads_args
from .futures import KEPT, Future

if TYPE_CHECKING:
    from .client import Client


class Ref:
    """Data sent once with ``client.scatter(obj)``: pass it as an argument to any number of
    jobs; each worker gets its bytes once, each executor process unpickles it once."""

    __slots__ = ("hash", "size")

    def __init__(self, data_hash: str, size: int):
        self.hash, self.size = data_hash, size

    def __repr__(self) -> str:
        return f"<cw.Ref {self.hash[:12]} {self.size} bytes>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other.hash == self.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def __reduce__(self):
        raise NeedsReferences("a cw.Ref travels only as an argument of a job (client.submit(f, ref))")


def dumps_graph_args(args: tuple, kwargs: dict, conn: Any) -> tuple[bytes, list[Future], list[str]]:
    """(blob, the futures it names as inputs in order, the hashes of the scattered data it names)."""
    inputs: list[Future] = []
    index: dict[int, int] = {}
    refs: dict[str, None] = {}

    def persistent_id(obj: Any) -> Any:
        if isinstance(obj, Future):
            if obj._owner is not conn:
                raise SerializationError(
                    f"{obj!r} belongs to another client: pass its result (future.result()), or submit"
                    " from the client that made it"
                )
            if obj.cancelled():
                raise cf.CancelledError(f"{obj!r} is cancelled: a job cannot take it as an input")
            i = index.get(id(obj))
            if i is None:
                i = index[id(obj)] = len(inputs)
                inputs.append(obj)
            return i
        if isinstance(obj, Ref):
            refs[obj.hash] = None
            return obj.hash
        return None

    return dumps_args(args, kwargs, persistent_id), inputs, list(refs)


def loads_serial_args(blob: bytes, inputs: list[Future], data: dict[str, bytes]) -> Any:
    """Arguments for a serial client: futures become their results, refs their objects."""

    def persistent_load(pid: Any) -> Any:
        if isinstance(pid, int):
            f = inputs[pid]
            try:
                return f.result()
            except BaseException as e:  # noqa: B036 - an input's failure is this job's
                raise DependencyError(f"an input of this job failed: job {f.jobid}: {e!r}",
                                      f.jobid, None, e) from e  # fmt: skip
        return loads(data[pid])

    return loads_args(blob, persistent_load)


def fold(fn: Callable, *values: Any) -> Any:
    """One job of a tree reduction: ``fn`` over its inputs, left to right."""
    return functools.reduce(fn, values)


def reduce(client: Client, fn: Callable, futures: Iterable[Any], split_every: int = 2, **options: Any) -> Any:
    """One future: ``fn`` folded over the futures' results by a tree of jobs, ``split_every``
    inputs a job, in order (``fn`` must be associative); no result passes through the client.

    The tree grows as the futures come: a node is submitted as soon as its
    inputs are there, so with a generator of futures the leaves' values stay
    at the master (a value with a dependent is kept there) and never reach
    the client.
    """
    if split_every < 2:
        raise ValueError(f"split_every must be 2 or more, not {split_every}")
    levels: list[list] = []

    def node(group: list) -> Future:
        if len(group) == 2:
            return client.submit(fn, *group, **options)
        return client.submit(fold, fn, *group, **options)

    def push(level: int, f: Any) -> None:
        if len(levels) <= level:
            levels.append([])
        buf = levels[level]
        buf.append(f)
        if len(buf) == split_every:
            levels[level] = []
            push(level + 1, node(buf))

    for f in futures:
        push(0, f)
    rest = [f for buf in reversed(levels) for f in buf]  # what is left, in order: higher levels came first
    if not rest:
        raise ValueError("reduce of no futures: nothing to reduce")
    while len(rest) > 1:
        rest = [node(rest[i : i + split_every]) if len(rest[i : i + split_every]) > 1 else rest[i]
                for i in range(0, len(rest), split_every)]  # fmt: skip
    return rest[0]


def prefetch(futures: list) -> None:
    """Ask once for every kept value among these finished futures (gather's first step)."""
    kept = [f for f in futures if isinstance(f, Future) and f.done() and not f.cancelled()
            and f._state == "FINISHED" and f._result is KEPT and f._owner is not None]  # fmt: skip
    if kept:
        kept[0]._owner.fetch(kept)


def wait(futures: Iterable[cf.Future], timeout: float | None = None, return_when: str = cf.ALL_COMPLETED):
    """``concurrent.futures.wait``; inside a job, its slot runs another job meanwhile."""
    with current.waiting():
        return cf.wait(list(futures), timeout, return_when)
