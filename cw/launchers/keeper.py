"""The keeper: the thread beside the master (``cw master --keep-pool``) that holds a
pool at its size. Array tasks that end or die are resubmitted, up to a cap, with
backoff; an adaptive pool is sized by the queue instead (:mod:`cw.launchers.elastic`).
A pool with an owner (a ``SlurmCluster``'s process) is taken down once that owner
is gone (:mod:`cw.launchers.owner`). :func:`keeper_for` builds the keeper from the
pool's record (pool.json)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from ..defaults import DOWN_WAIT, HEAL_BACKOFF, HEAL_BACKOFF_MAX, OWNER_CHECK, POLL
from ..discovery import ClusterDir
from ..errors import ConfigError, CwError, SchedulerError
from . import backends
from .elastic import Elastic
from .owner import OwnerWatch
from .pool import Pool

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ the keeper
class Keeper(threading.Thread):
    """Holds the pool at its size for as long as the master runs.

    Every ``poll`` seconds (the record's, else POLL) it asks the scheduler, in
    one query, for the tasks of the worker arrays it started. Tasks that ended
    (drained at their time limit, cancelled, killed, failed) are replaced by a
    new array job of as many tasks, as long as the pool may heal: at most
    ``max_heals`` tasks over the pool's life, and after each heal a pause that
    doubles while heals follow each other (HEAL_BACKOFF up to HEAL_BACKOFF_MAX),
    so a pool whose workers die at start does not flood the queue. Without
    healing it only completes the first submission, if ``up`` could not.
    """

    def __init__(self, pool: Pool, poll: float | None = None):
        super().__init__(name="cw-keeper", daemon=True)
        self.pool = pool
        self.poll = poll
        self._halt = threading.Event()
        self.streak = 0  # heals in a row
        self.next_heal = 0.0
        self.full_since: float | None = None
        self.reported: set[str] = set()
        self._capped = False
        self._quiet_until = 0.0
        self.elastic = Elastic(pool)
        self.owner = OwnerWatch(pool.cluster)

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        log.debug("pool keeper: keeping the %s pool of %s at its size", self.pool.scheduler.title,
                  self.pool.cluster.path)  # fmt: skip
        last = time.monotonic()
        while not self._halt.wait(min(OWNER_CHECK, max(0.05, last + self.interval() - time.monotonic()))):
            try:
                if self.check_owner():
                    return
                # the interval is read again each time: `adapt()` may have just changed it
                if time.monotonic() >= last + self.interval():
                    self.tick()
                    last = time.monotonic()
            except Exception:
                log.exception("pool keeper: unexpected error (it keeps going)")

    def interval(self) -> float:
        rec = self.pool.read()
        if rec.get("adapt") and rec["adapt"].get("interval"):
            return float(rec["adapt"]["interval"])
        if self.poll is not None:
            return self.poll
        return float(rec.get("poll") or POLL)

    def check_owner(self) -> bool:
        """Take the pool down, and stop the master, if the pool's owner is gone; True then."""
        rec = self.pool.read()
        if rec.get("stopping"):
            return False
        why = self.owner.gone(rec.get("owner"))
        if why is None:
            return False
        log.warning("pool keeper: %s: taking the pool down (its workers drain), then the master", why)
        try:
            self.pool.down(wait=DOWN_WAIT, master=False)
        except CwError as e:
            log.error("pool keeper: taking the pool down: %s", e)
        with self.pool.record() as rec:
            rec.pop("owner", None)
        # the master withdraws master.json and stops; a master's batch job ends with it
        os.kill(os.getpid(), signal.SIGTERM)
        return True

    def tick(self, now: float | None = None) -> int:
        """One look at the scheduler; returns the number of tasks submitted."""
        now = time.monotonic() if now is None else now
        pool, sched = self.pool, self.pool.scheduler
        with pool.record() as rec:
            if rec.get("adapt") and not rec.get("stopping"):
                tasks = sched.tasks(pool.array_ids(rec))
                if tasks is None:
                    self._no_answer(now)
                    return 0
                decision = self.elastic.tick(rec, tasks, now)
                return sum(decision.submit.values()) if decision else 0
            target = int(rec.get("target") or 0)
            if rec.get("stopping") or not target:
                return 0
            if rec.get("filled") and not rec.get("heal"):
                return 0
            tasks = sched.tasks(pool.array_ids(rec))
            if tasks is None:
                self._no_answer(now)
                return 0
            census = pool.census(rec, tasks, prune=True)
            missing = target - pool.live(census)
            if missing <= 0:
                rec["filled"] = True
                if self.full_since is None:
                    self.full_since = now
                elif self.streak and now - self.full_since >= HEAL_BACKOFF_MAX:
                    self.streak = 0
                return 0
            self.full_since = None
            if not rec.get("filled"):
                job = pool.submit_workers(rec, missing)
                rec["filled"] = True
                log.info("pool keeper: submitted %d workers as %s", missing, sched.describe(job))
                return missing
            for a in census:
                for t in a["gone"]:
                    name = sched.task_name(t.job, t.index)
                    if name not in self.reported:
                        self.reported.add(name)
                        log.warning("pool keeper: worker %s ended: %s%s", sched.describe(t.job, t.index),
                                    t.detail or "ended", f" ({t.reason})" if t.reason else "")  # fmt: skip
            left = int(rec.get("max_heals", 0)) - int(rec.get("heals", 0))
            if left <= 0:
                if not self._capped:
                    self._capped = True
                    log.error("pool keeper: %d of %d workers are gone and the pool has used its %d"
                              " heals: not resubmitting (see the logs in %s)",
                              missing, target, rec.get("max_heals", 0), pool.logs)  # fmt: skip
                return 0
            if now < self.next_heal:
                return 0
            n = min(missing, left)
            try:
                job = pool.submit_workers(rec, n)
            except SchedulerError as e:
                log.error("pool keeper: cannot resubmit %d workers: %s", n, e)
                self.next_heal = now + self.backoff()
                self.streak += 1
                return 0
            rec["heals"] = int(rec.get("heals", 0)) + n
            pause = self.backoff()
            self.streak += 1
            self.next_heal = now + pause
            log.warning("pool keeper: %d of %d workers gone; resubmitted %d as %s (heal %d of %d;"
                        " next one no sooner than %.0f s)", missing, target, n, sched.describe(job),
                        rec["heals"], rec.get("max_heals", 0), pause)  # fmt: skip
            return n

    def _no_answer(self, now: float) -> None:
        if now >= self._quiet_until:
            log.warning("pool keeper: %s did not answer; trying again", self.pool.scheduler.title)
            self._quiet_until = now + 300.0

    def backoff(self) -> float:
        return min(HEAL_BACKOFF_MAX, HEAL_BACKOFF * 2**self.streak)


def keeper_for(cluster: ClusterDir, poll: float | None = None) -> Keeper:
    """The keeper of the pool recorded in a cluster directory's pool.json."""
    rec = Pool(None, cluster).read()  # type: ignore[arg-type]
    name = rec.get("scheduler")
    if not name:
        raise ConfigError(f"no pool recorded in {cluster.path / 'pool.json'}: nothing to keep")
    cls = backends().get(name)
    if cls is None:
        raise ConfigError(f"{cluster.path / 'pool.json'} names the batch system {name!r}, which this"
                          f" cw does not know (it knows: {', '.join(backends()) or 'none'})")  # fmt: skip
    return Keeper(Pool(cls(), cluster), poll)
