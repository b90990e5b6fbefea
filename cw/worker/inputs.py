"""A worker's inputs and scattered data: a bounded cache, what it asked for, the tasks that wait.

A task whose arguments name other jobs' results (inputs, by job id) or
scattered data (by hash) starts only once the agent holds all of them. The
agent keeps the most recently used blobs up to ``WORKER_DATA_CACHE`` bytes
(results of its own jobs that the master marked as inputs go in too, so a
graph's next step often finds them here), asks the master for the rest (NEED,
answered by DATA), and gives each executor child a blob once while the child
keeps it: it mirrors each child's cache and tells it what to forget.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Optional

from .. import defaults
from .. import protocol as P
from ..serialize import DataCache

#: A pending task: (job id, function hash, context, timeout, args blob, output limit, key, needs,
#: (inputs, refs) or None)
Task = tuple


class Inputs:
    """The agent's data: cache, requests, and the tasks waiting for them."""

    def __init__(self, limit: int = defaults.WORKER_DATA_CACHE):
        self.cache = DataCache(limit)
        self.asked: set = set()  # asked for, not answered yet
        self.ask_i: list[int] = []  # to ask for at the end of this turn
        self.ask_x: list[str] = []
        self.waiting: list[Task] = []  # tasks that lack some of their data
        self.keep: set[int] = set()  # our jobs whose results are inputs of others

    # -- the cache -----------------------------------------------------------------------
    def put(self, key: Any, blob: bytes) -> None:
        self.cache.put(key, blob)

    def tasks(self, h: dict, tasks: list, blobs: list, first_x: int) -> list[Task]:
        """A TASKS message of a graph's tasks: cache its scattered data; the tasks ready to
        run (the others wait, and what they lack is asked for)."""
        for x, blob in zip(h.get("x") or (), blobs[first_x:]):
            self.put(x, blob)
        self.keep.update(h.get("k") or ())
        extra = {row[0]: (row[1], row[2]) for row in h["i"]}  # TaskInputs rows
        ready = []
        for (jid, fn, ctx, timeout, limit, key, needs), args in zip(tasks, blobs):  # TaskSpec rows
            t = (jid, fn, ctx, timeout, args, limit, key, needs, extra.get(jid))
            missing = self.missing(t)
            if missing:
                self.ask(missing)
                self.waiting.append(t)
            else:
                ready.append(t)
        return ready

    def held_refs(self) -> list[str]:
        return [k for k in self.cache if isinstance(k, str)]

    def keys(self, task: Task) -> list:
        ex = task[8]
        return [*ex[0], *ex[1]] if ex is not None else []

    def missing(self, task: Task) -> list:
        cache = self.cache
        return [k for k in self.keys(task) if k not in cache]

    # -- asking ----------------------------------------------------------------------------
    def ask(self, keys: Iterable) -> None:
        for k in keys:
            if k not in self.asked:
                self.asked.add(k)
                (self.ask_i if isinstance(k, int) else self.ask_x).append(k)

    def request(self) -> Optional[dict]:
        """The NEED header for what was asked this turn, if anything."""
        if not self.ask_i and not self.ask_x:
            return None
        h: dict = {}
        if self.ask_i:
            h["i"], self.ask_i = self.ask_i, []
        if self.ask_x:
            h["x"], self.ask_x = self.ask_x, []
        return h

    def arrived(self, h: dict, blobs: list[bytes]) -> tuple[list[Task], list[tuple[Task, str]]]:
        """DATA came: cache it. (Tasks now ready, in order; (task, why) for tasks that cannot run.)"""
        failed: dict[Any, str] = {}
        rows = h.get("i") or ()
        for (jid, status), blob in zip(rows, blobs):
            self.asked.discard(jid)
            if status == P.OK:
                self.put(jid, blob)
            else:
                what = "has no result" if status == -1 else f"did not succeed ({P.STATUS_NAMES.get(status, status)})"
                failed[jid] = f"its input job {jid} {what}"
        for x, blob in zip(h.get("x") or (), blobs[len(rows) :]):
            self.asked.discard(x)
            if blob:
                self.put(x, blob)
            elif x in self.asked or any(x in self.keys(t) for t in self.waiting):
                failed[x] = f"the master does not have its scattered data {x}"
        ready, bad, still = [], [], []
        for t in self.waiting:
            keys = self.keys(t)
            why = next((failed[k] for k in keys if k in failed), None)
            if why is not None:
                bad.append((t, why))
            elif all(k in self.cache for k in keys):
                ready.append(t)
            else:
                still.append(t)
        self.waiting = still
        return ready, bad

    def forget_requests(self) -> list[Task]:
        """The link broke: nothing asked will be answered; the waiting tasks are handed back."""
        self.asked.clear()
        self.ask_i, self.ask_x = [], []
        waiting, self.waiting = self.waiting, []
        return waiting

    # -- a child's share -------------------------------------------------------------------
    def for_child(self, mirror: collections.OrderedDict, keys: list) -> tuple[list, list]:
        """(data to send, keys to forget) so that a child holds ``keys``: ``mirror`` is what it
        holds (key -> size), kept under EXECUTOR_DATA_CACHE bytes, the oldest out first."""
        data = []
        for k in keys:
            if k in mirror:
                mirror.move_to_end(k)
            else:
                blob = self.cache[k]
                mirror[k] = len(blob)
                data.append((k, blob))
        drop = []
        total = sum(mirror.values())
        need = set(keys)
        for k in list(mirror):
            if total <= defaults.EXECUTOR_DATA_CACHE:
                break
            if k not in need:
                total -= mirror.pop(k)
                drop.append(k)
        return data, drop
