"""Adaptive pools: how many workers the queue needs, and which ones to retire. No I/O.

Every interval the pool's keeper (or a LocalCluster's thread) reads two things
and hands them to :meth:`Adaptive.decide`:

- from the master's status document, what waits (per requirement: the jobs
  queued and the measured runtime of the functions at the head of the queue;
  :class:`Demand`) and what each worker does (the jobs it holds, the seconds
  it has been idle);
- from the scheduler, in one query, which tasks of the pool pend or run.

Together they are the pool's :class:`Member` list. The decision says how many
tasks to submit per resource :class:`Profile` (one array job each) and which
members to retire (pending ones are cancelled, running ones drained: their
workers hand back what they hold, nothing is lost or charged). It is a plain
object, unit-tested without a cluster (``tests/test_adapt.py``).

The rules:

- **Wanted workers**, per profile: enough slots to run the queued work, plus
  the jobs its busy workers hold, in about ``target`` seconds (``ADAPT_TARGET``),
  counting ``unknown_runtime`` for a function not measured yet; never more
  workers than the jobs can fill, at least one while any job of it waits,
  never more than the profile's or the pool's ``maximum``, and for the
  default profile never fewer than ``minimum``.
- **Growth** is limited: at most ``max(step, size of the pool)`` new tasks per
  decision (the pool at most doubles per interval), none while the pool is
  at its maximum, and none for a while after tasks ended that the pool did
  not retire (workers dying at start: the pause doubles from HEAL_BACKOFF).
- **Retirement** waits for ``idle_timeout``: a worker is retired once it has
  been idle that long and its profile has more workers than it wants;
  pending tasks once the surplus has lasted that long. Tasks beyond a
  maximum (lowered while jobs run) go at once: pending, starting, idle, then
  the busy ones holding the fewest jobs, drained.
- Jobs whose requirements no profile offers are reported (``unmatched``),
  never guessed at.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from .. import defaults
from ..errors import ConfigError
from .base import ENDED, PENDING, Task, parse_bytes

STARTING, IDLE, BUSY = "starting", "idle", "busy"  # and PENDING, from base


@dataclass(frozen=True)
class Profile:
    """A kind of worker the pool can ask for: what it offers jobs, and the batch options
    that get it (``--gres=gpu:1``, a partition). The name '' is the pool's default."""

    name: str = ""
    provides: dict = field(default_factory=dict)  #: cpus, mem (bytes), gpus, tags, ...: matched to requirements
    options: dict = field(default_factory=dict)  #: the scheduler's options of its tasks, over the pool's
    slots: int = 1  #: executor processes per worker
    maximum: Optional[int] = None  #: at most this many of its workers

    def label(self) -> str:
        return self.name or "default"

    def worker_args(self) -> list[str]:
        """The ``cw worker`` flags that make its workers advertise what it provides."""
        args: list[str] = []
        for k, v in sorted(self.provides.items()):
            if k == "tags":
                args += [a for t in v for a in ("--tag", str(t))]
            elif k != "cpus":
                args += ["--cap", f"{k}={json.dumps(v)}"]
        return args

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Profile:
        return cls(**{k: d[k] for k in ("name", "provides", "options", "slots", "maximum") if k in d})


@dataclass(frozen=True)
class Demand:
    """One requirement's queue at the master (a row of the status document's ``queues``)."""

    requires: dict
    queued: int
    runtime: Optional[float]  #: mean measured runtime (s) of what is at its head; None if not measured


@dataclass(frozen=True)
class Member:
    """One task of the pool, as the scheduler and the master see it."""

    name: str  #: the task as the scheduler spells it ('123_4', '77.3'), or a local process id
    profile: str  #: its Profile's name
    state: str  #: PENDING, STARTING (running, not connected yet), IDLE or BUSY
    idle: float = 0.0  #: seconds its worker has held no job
    load: int = 0  #: jobs its worker holds (running and prefetched)


@dataclass
class Decision:
    """What to do now: tasks to submit per profile, members to retire."""

    submit: dict = field(default_factory=dict)  #: profile name -> tasks to submit (one array job each)
    retire: list = field(default_factory=list)  #: Members: pending ones to cancel, the others to drain
    wanted: dict = field(default_factory=dict)  #: profile name -> workers wanted
    unmatched: list = field(default_factory=list)  #: requirements no profile offers (with jobs waiting)
    reasons: list = field(default_factory=list)  #: one line per profile that changes, for the log

    def __bool__(self) -> bool:
        return bool(self.submit or self.retire)


class Adaptive:
    """The decision of an adaptive pool; it keeps what it must remember between decisions
    (since when a profile has had more tasks than it wants, the pause after failures)."""

    def __init__(
        self,
        minimum: int = 0,
        maximum: int = 100,
        idle_timeout: float = defaults.ADAPT_IDLE_TIMEOUT,
        target: float = defaults.ADAPT_TARGET,
        unknown_runtime: float = defaults.ADAPT_UNKNOWN_RUNTIME,
        step: int = defaults.ADAPT_STEP,
        profiles: Sequence[Profile] = (),
    ):
        if minimum < 0 or minimum > maximum:  # maximum=0: held empty (its workers drained), as dask's
            raise ConfigError(f"adapt: want 0 <= minimum <= maximum (got {minimum}, {maximum})")
        if idle_timeout < 0 or target <= 0 or unknown_runtime <= 0 or step < 1:
            raise ConfigError("adapt: idle_timeout must be >= 0, target and unknown_runtime > 0, step >= 1")
        self.minimum, self.maximum = int(minimum), int(maximum)
        self.idle_timeout, self.target = float(idle_timeout), float(target)
        self.unknown_runtime, self.step = float(unknown_runtime), int(step)
        self.profiles = list(profiles) or [Profile()]
        if self.profiles[0].name:
            self.profiles.insert(0, Profile())
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise ConfigError(f"adapt: profile names must differ: {names}")
        self._surplus_since: dict[str, float] = {}
        self._streak = 0
        self._hold_until = 0.0
        self._last_failure = -math.inf

    def profile_for(self, requires: Mapping[str, Any] | None) -> Profile | None:
        """The first profile whose workers can run jobs with these requirements (the
        master's rule: numbers are minimums, tags must all be there, the rest equal)."""
        from ..master.policy import satisfies  # here: importing cw (and LocalCluster) stays light

        return next((p for p in self.profiles if satisfies(p.provides, dict(requires or {}))), None)

    # -- the decision ------------------------------------------------------------------
    def decide(self, now: float, demand: Iterable[Demand], members: Sequence[Member], failed: int = 0) -> Decision:
        """What to submit and retire now. ``failed``: tasks that ended since the last
        decision without being retired (they pause growth)."""
        d = Decision()
        self._failures(now, failed)
        jobs: dict[str, int] = {p.name: 0 for p in self.profiles}
        work: dict[str, float] = {p.name: 0.0 for p in self.profiles}
        for row in demand:
            if row.queued <= 0:
                continue
            p = self.profile_for(row.requires)
            if p is None:
                d.unmatched.append(row.requires)
                continue
            jobs[p.name] += row.queued
            work[p.name] += row.queued * (row.runtime if row.runtime is not None else self.unknown_runtime)
        mine = {p.name: [m for m in members if m.profile == p.name] for p in self.profiles}
        for p in self.profiles:
            d.wanted[p.name] = self._wanted(p, jobs[p.name], work[p.name], mine[p.name])
        self._trim(d.wanted)
        retiring: set[str] = set()
        self._over_maximum(d, mine, retiring)
        for p in self.profiles:
            self._idle_out(now, d, p, [m for m in mine[p.name] if m.name not in retiring], retiring)
        self._grow(now, d, mine)
        for p in self.profiles:
            have = len(mine[p.name])
            gone = sum(1 for m in d.retire if m.profile == p.name)
            if d.submit.get(p.name) or gone:
                d.reasons.append(
                    f"{p.label()}: {jobs[p.name]} jobs queued (~{work[p.name]:.0f} s of work), {have} tasks"
                    f" ({_count(mine[p.name])}); wanting {d.wanted[p.name]}: submitting"
                    f" {d.submit.get(p.name, 0)}, retiring {gone}"
                )
        return d

    def _wanted(self, p: Profile, jobs: int, work: float, members: list[Member]) -> int:
        load = sum(m.load for m in members if m.state == BUSY)
        per_job = work / jobs if jobs else self.unknown_runtime
        total_jobs, total_work = jobs + load, work + load * per_job
        slots = max(1, p.slots)
        want = math.ceil(total_work / (self.target * slots)) if total_work else 0
        want = min(want, math.ceil(total_jobs / slots))
        if jobs:
            want = max(want, 1)
        if not p.name:
            want = max(want, self.minimum)
        if p.maximum is not None:
            want = min(want, p.maximum)
        return min(want, self.maximum)

    def _trim(self, wanted: dict[str, int]) -> None:
        """Down to the pool's maximum, from the largest wants, keeping the minimum."""
        while sum(wanted.values()) > self.maximum:
            name = max(wanted, key=lambda n: (wanted[n] - (self.minimum if not n else 0), n == ""))
            wanted[name] -= 1

    def _over_maximum(self, d: Decision, mine: dict[str, list[Member]], retiring: set[str]) -> None:
        """Tasks beyond a maximum go now (pending, starting, idle, then the least loaded busy)."""
        over_total = sum(len(ms) for ms in mine.values()) - self.maximum
        for p in self.profiles:
            ms = mine[p.name]
            over = len(ms) - p.maximum if p.maximum is not None else 0
            if over_total > 0:
                over = max(over, min(over_total, len(ms) - d.wanted[p.name]))
            if over <= 0:
                continue
            for m in sorted(ms, key=retire_order)[:over]:
                d.retire.append(m)
                retiring.add(m.name)
                over_total -= 1

    def _idle_out(self, now: float, d: Decision, p: Profile, ms: list[Member], retiring: set[str]) -> None:
        surplus = len(ms) - d.wanted[p.name]
        if surplus <= 0:
            self._surplus_since.pop(p.name, None)
            return
        since = self._surplus_since.setdefault(p.name, now)
        pending = [m for m in reversed(ms) if m.state == PENDING] if now - since >= self.idle_timeout else []
        idle = sorted((m for m in ms if m.state == IDLE and m.idle >= self.idle_timeout), key=lambda m: -m.idle)
        for m in (pending + idle)[:surplus]:
            d.retire.append(m)
            retiring.add(m.name)

    def _grow(self, now: float, d: Decision, mine: dict[str, list[Member]]) -> None:
        size = sum(len(ms) for ms in mine.values()) - len(d.retire)
        budget = min(max(self.step, size), self.maximum - size)
        if now < self._hold_until:
            budget = 0
        for p in self.profiles:
            short = d.wanted[p.name] - (len(mine[p.name]) - sum(1 for m in d.retire if m.profile == p.name))
            n = min(short, budget)
            if n > 0:
                d.submit[p.name] = n
                budget -= n

    def note_failure(self, now: float) -> None:
        """A submission failed: pause growth as after tasks that died."""
        self._failures(now, 1)

    def _failures(self, now: float, failed: int) -> None:
        if failed > 0:
            self._hold_until = now + min(defaults.HEAL_BACKOFF_MAX, defaults.HEAL_BACKOFF * 2**self._streak)
            self._streak += 1
            self._last_failure = now
        elif self._streak and now - self._last_failure >= defaults.HEAL_BACKOFF_MAX:
            self._streak = 0

    # -- as kept in pool.json ------------------------------------------------------------
    def settings(self) -> dict:
        return {"minimum": self.minimum, "maximum": self.maximum, "idle_timeout": self.idle_timeout,
                "target": self.target, "unknown_runtime": self.unknown_runtime, "step": self.step}  # fmt: skip


def retire_order(m: Member) -> tuple:
    """Which members go first: pending, starting, idle (longest idle first), then the least busy."""
    rank = {PENDING: 0, STARTING: 1, IDLE: 2, BUSY: 3}[m.state]
    return (rank, m.load, -m.idle)


def _count(ms: list[Member]) -> str:
    counts = {s: sum(1 for m in ms if m.state == s) for s in (BUSY, IDLE, STARTING, PENDING)}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none"


# ----------------------------------------------------------------- from what is seen
def demand_of(status: Mapping[str, Any]) -> list[Demand]:
    """The master's status document's ``queues`` as Demand rows."""
    return [Demand(dict(q.get("requires") or {}), int(q.get("queued") or 0), q.get("runtime"))
            for q in status.get("queues") or ()]  # fmt: skip


def members_of(arrays: Sequence[Mapping[str, Any]], tasks: Sequence[Task], workers: Sequence[Mapping[str, Any]],
               task_name: Callable[[str, Optional[int]], str]) -> list[Member]:  # fmt: skip
    """The pool's live tasks (not ended, not leaving, not already retired) as Members.

    ``arrays`` are the pool's records (``job``, ``profile``, ``retired``: the
    indices asked to leave), ``tasks`` the scheduler's answer, ``workers``
    the status document's; a worker is matched to its task by the name of its
    batch job (``task``: '123_4', '77.3').
    """
    by_task = {w["task"]: w for w in workers if w.get("task")}
    records = {a["job"]: a for a in arrays}
    out = []
    for t in tasks:
        a = records.get(t.job)
        if a is None or t.index is None or t.state == ENDED or t.leaving or t.index in a.get("retired", ()):
            continue
        name = task_name(t.job, t.index)
        w = by_task.get(name)
        profile = a.get("profile") or ""
        if t.state == PENDING:
            out.append(Member(name, profile, PENDING))
        elif w is None:
            out.append(Member(name, profile, STARTING))
        elif not w.get("draining"):
            held = int(w.get("running") or 0) + int(w.get("prefetched") or 0)
            out.append(Member(name, profile, BUSY if held else IDLE, float(w.get("idle") or 0.0), held))
    return out


# ------------------------------------------------------------------ what people type
def parse_range(text: str) -> tuple[int, int]:
    """'0:200' (or '0-200', or '200': from 0) -> (0, 200); ConfigError if it is not one."""
    t = text.strip().replace("-", ":")
    lo, sep, hi = t.partition(":")
    try:
        low, high = (int(lo), int(hi)) if sep else (0, int(lo))
    except ValueError:
        raise ConfigError(f"{text!r} is not a range of workers (e.g. 0:200)") from None
    if low < 0 or high < low:
        raise ConfigError(f"{text!r}: want MIN:MAX with 0 <= MIN <= MAX (0:0 holds the pool empty)")
    return low, high


def parse_profile(text: str) -> tuple[str, dict, str]:
    """'gpu:gpus=1,tag=cuda:--gres=gpu:1 --partition=gpu' -> (name, provides, batch flags).

    The provides are comma-separated ``key=value``: ``tag=T`` (repeatable) adds
    a tag, ``mem`` takes a size (64G), numbers are numbers. The flags (what
    follows the second colon) are the batch system's, for that profile's jobs.
    """
    name, sep, rest = text.partition(":")
    spec, _, flags = rest.partition(":")
    name = name.strip()
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"profile {text!r}: want NAME:KEY=VALUE,...:FLAGS, e.g. gpu:gpus=1:--gres=gpu:1")
    provides: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"profile {name}: {item!r} is not KEY=VALUE")
        if key in ("tag", "tags"):
            provides.setdefault("tags", []).append(value.strip())
        elif key == "mem":
            try:
                provides["mem"] = parse_bytes(value)
            except ValueError as e:
                raise ConfigError(f"profile {name}: {e}") from None
        else:
            provides[key] = _number(value.strip())
    return name, provides, flags.strip()


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


__all__ = ["BUSY", "IDLE", "PENDING", "STARTING", "Adaptive", "Decision", "Demand", "Member", "Profile",
           "demand_of", "members_of", "parse_profile", "parse_range", "retire_order"]  # fmt: skip
