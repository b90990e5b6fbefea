"""Pools that change size: :func:`scale` to a number now, or :class:`Elastic`, the keeper's
adaptive turn, which sizes the pool by the queue.

Both retire workers the same way (:meth:`Pool.retire`): pending tasks are
cancelled, running ones drained by the scheduler's signal, so a retired
worker hands back what it holds and nothing is lost or charged. Both make at
most one scheduler query, one submission per resource profile and one cancel
and one drain call per turn, never a call per worker.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..defaults import HEALS_PER_WORKER, LOG_EVERY
from ..errors import ConfigError, CwError, SchedulerError
from .adapt import Adaptive, Decision, Member, Profile, demand_of, members_of, retire_order
from .base import ENDED, Task
from .pool import Pool, Report

log = logging.getLogger(__name__)


def master_status(pool: Pool, timeout: float = 3.0) -> dict | None:
    """The live master's status document, or None if none answers."""
    from ..link import query_status

    address = pool.cluster.master_address()
    if not address:
        return None
    try:
        return query_status(address, pool.cluster.key(), timeout=timeout, encrypt=pool.cluster.encrypted())
    except CwError:
        return None


def profiles_of(pool: Pool, rec: dict) -> list[Profile]:
    """The pool's resource profiles as the adaptive decision sees them, its default first."""
    out = []
    for name in ["", *(p["name"] for p in rec.get("profiles") or ())]:
        prof = pool.profile(rec, name)
        out.append(Profile(name, prof["provides"], {}, pool.scheduler.procs(prof["options"]), prof.get("maximum")))
    return out


def scale(pool: Pool, n: int, report: Report | None = None) -> dict:
    """Hold the pool at ``n`` workers from now on (adaptivity off), acting at once.

    Missing tasks are submitted as one array job; surplus ones retired:
    pending tasks first, then starting ones, idle workers, and last the
    workers holding the fewest jobs (drained). Returns the pool's record.
    """
    if n < 0:
        raise ConfigError(f"scale: {n} is not a number of workers")
    report = report or log.info
    with pool.record() as rec:
        if not rec.get("scheduler"):
            raise ConfigError(f"no pool in {pool.cluster.path}: start one first")
        rec["adapt"] = None
        rec["target"] = n
        if not rec.get("max_heals_given"):
            rec["max_heals"] = max(int(rec.get("max_heals") or 0), HEALS_PER_WORKER * n)
        tasks = pool.scheduler.tasks(pool.array_ids(rec))
        if tasks is None:
            raise SchedulerError(f"cannot list the pool's jobs: is {pool.scheduler.title} up?")
        live = pool.live(pool.census(rec, tasks, prune=True))
        if live < n:
            job = pool.submit_workers(rec, n - live)
            report(f"scale to {n}: submitted {n - live} workers as {pool.scheduler.describe(job)}")
        elif live > n:
            status = master_status(pool) or {}
            members = members_of(rec.get("arrays", ()), tasks, status.get("workers", ()), pool.scheduler.task_name)
            gone = pool.retire(rec, [m.name for m in sorted(members, key=retire_order)[: live - n]], tasks)
            report(f"scale to {n}: retiring {len(gone)} workers ({', '.join(gone)})")
        rec["filled"] = True
        return dict(rec)


class Elastic:
    """The keeper's adaptive turn: one status query, one scheduler query (made by the
    keeper), then the decision of :class:`~cw.launchers.adapt.Adaptive`, carried out."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.adaptive: Adaptive | None = None
        self._made_from: Any = None
        self._live: set[str] = set()
        self._warned: set[str] = set()
        self._quiet_until = 0.0

    def _decider(self, rec: dict) -> Adaptive:
        made_from = (rec.get("adapt"), rec.get("profiles"), rec.get("options"))
        if self.adaptive is None or made_from != self._made_from:
            s = dict(rec["adapt"])
            s.pop("interval", None)
            self.adaptive = Adaptive(**s, profiles=profiles_of(self.pool, rec))
            self._made_from = made_from
        return self.adaptive

    def tick(self, rec: dict, tasks: list[Task], now: float | None = None) -> Decision | None:
        """One decision, on the record (locked by the caller) and the scheduler's answer."""
        now = time.monotonic() if now is None else now
        pool, sched = self.pool, self.pool.scheduler
        adaptive = self._decider(rec)
        status = master_status(pool)
        if status is None:
            if now >= self._quiet_until:
                log.warning("adaptive pool: the master did not answer; no decision this turn")
                self._quiet_until = now + 10 * LOG_EVERY
            return None
        pool.census(rec, tasks, prune=True)
        members = members_of(rec.get("arrays", ()), tasks, status.get("workers", ()), sched.task_name)
        failed = self._ended_unasked(rec, tasks, members)
        decision = adaptive.decide(now, demand_of(status), members, failed)
        for r in decision.unmatched:
            key = repr(sorted(r.items()))
            if key not in self._warned:
                self._warned.add(key)
                log.warning("adaptive pool: jobs require %s, which no resource profile of the pool offers"
                            " (add one: `--profile NAME:KEY=VALUE:FLAGS`, or profiles= in Python)", r)  # fmt: skip
        if decision.retire:
            by_name = {m.name: m for m in decision.retire}
            gone = pool.retire(rec, list(by_name), tasks)
            self._live -= set(gone)
        for name, n in decision.submit.items():
            try:
                job = pool.submit_workers(rec, n, name)
            except SchedulerError as e:
                log.error("adaptive pool: cannot submit %d workers%s: %s", n, f" of {name}" if name else "", e)
                adaptive.note_failure(now)
                continue
            log.info("adaptive pool: submitted %d workers%s as %s", n, f" of the profile {name}" if name else "",
                     sched.describe(job))  # fmt: skip
        for line in decision.reasons:
            log.info("adaptive pool: %s", line)
        rec["target"] = sum(decision.wanted.values())
        rec["filled"] = True
        return decision

    def _ended_unasked(self, rec: dict, tasks: list[Task], members: list[Member]) -> int:
        """Tasks live at the last turn that ended since, and were not retired: failures."""
        name = self.pool.scheduler.task_name
        retired = {name(a["job"], i) for a in rec.get("arrays", ()) for i in a.get("retired", ())}
        listed = {name(t.job, t.index): t for t in tasks if t.index is not None}
        now_live = {m.name for m in members}
        gone = sorted(n for n in self._live - now_live - retired if n not in listed or listed[n].state == ENDED)
        for n in gone:
            detail = listed[n].detail if n in listed else ""
            log.warning("adaptive pool: worker %s ended by itself%s", n, f" ({detail})" if detail else "")
        self._live = now_live
        return len(gone)
