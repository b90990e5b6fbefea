"""The scheduling policy: which job goes to which worker, and when. No sockets, no store.

Jobs wait in per-requirement queues. Each turn, jobs go first into idle slots,
least-loaded workers first; then into prefetch: a worker may hold its slots'
worth of jobs plus about ``PREFETCH_SECONDS`` of work, by the runtime measured
for the function at the head of the queue (one spare per slot for long or
unknown jobs). No worker takes more than its even share of what is queued, so
a burst is spread over every worker. Requirements filter workers by their
capabilities (:func:`cw.resources.satisfies`), and the counted ones (GPUs,
memory) are reserved: a worker holds no more jobs than its GPUs and memory
can run at once.

The queue window bounds memory: at most ``window`` runnable jobs and
``window_bytes`` of their arguments are held; the master leaves the rest in
the store and asks :meth:`Policy.room` when to read them back.
"""

from __future__ import annotations

import collections
import itertools
import json
import time
from typing import Callable, Deque, Iterator, Optional

from .. import defaults
from ..resources import counted, describe, satisfies


class Job:
    """An unfinished job held in memory."""

    __slots__ = (
        "id", "session", "seq", "fn", "args", "requires", "timeout",
        "max_retries", "attempts", "lost_on", "worker", "followers", "output", "queued_at", "started_at", "key",
        "needs", "inputs", "refs", "parent", "missing",
    )  # fmt: skip

    def __init__(self, id, session, seq, fn, args, requires, timeout, max_retries, attempts=0, output=None,
                 key=None):  # fmt: skip
        self.id, self.session, self.seq, self.fn, self.args, self.key = id, session, seq, fn, args, key
        self.requires, self.timeout, self.max_retries = requires, timeout, max_retries
        self.needs = counted(requires) if requires else None  # what it holds of its worker
        self.attempts, self.lost_on, self.worker = attempts, None, None
        self.followers: Optional[list] = None  # (session, seq) of submissions attached to it
        self.output = output  # its output limit in bytes (None: its client's)
        # when this attempt was queued (None: when submitted) and when a worker said it started
        self.queued_at = self.started_at = None
        # a graph's job: the jobs whose results are its inputs, the scattered data it takes,
        # the job that submitted it, and how many of its inputs have no result yet
        self.inputs = self.refs = self.parent = None
        self.missing = 0


class Worker:
    """The master's view of a connected worker, from its HELLO and what it says since."""

    def __init__(self, ident: bytes, hello: dict):
        self.ident = ident
        self.id: str = str(hello["id"])
        self.host: str = str(hello.get("host", "?"))
        self.pid = int(hello.get("pid", 0))
        self.slots = max(1, int(hello.get("procs", 1)))
        self.caps: dict = dict(hello.get("caps") or {})
        self.caps.setdefault("cpus", self.slots)
        self.caps.setdefault("host", self.host)
        self.info: dict = dict(hello.get("info") or {})
        self.label: str = str(hello.get("label") or "")  #: "SLURM job 123_4", or ""
        self.task: str = str(hello.get("task") or "")  #: "123_4", or ""
        self.versions: dict = dict(hello.get("versions") or {})
        self.funcs: set[str] = set(hello.get("have") or ())
        self.ctxs: set[str] = set()
        self.refs: set[str] = set(hello.get("refs") or ())  # scattered data it holds
        self.running: dict[int, Job] = {}  # every job it holds: running or prefetched (hold/release)
        self.reserved: dict[str, float] = {}  # counted resources its held jobs take
        self.blocked: set[int] = set(hello.get("blocked") or ())  # running, waiting on their children
        self.started: set[int] | None = {int(j) for j in hello.get("running") or ()}
        self.draining = bool(hello.get("draining"))
        self.paused: Optional[dict] = hello.get("paused") or None  #: {until, stopped} while paused
        self.counters: dict = {}
        self.last_seen = self.last_sent = time.monotonic()
        self.idle_since = self.last_seen  #: when it last came to hold no job (read while it holds none)

    def limit(self, runtime: float | None) -> int:
        """How many jobs of this runtime the worker may hold: slots plus prefetch.

        Short jobs get deep prefetch (a worker never waits for a round trip);
        jobs of unknown or long runtime get one spare per slot, so a burst of
        long jobs spreads over every worker instead of queueing on the first.
        """
        if self.draining or self.paused:
            return 0
        return self.slots * depth(runtime)

    def hold(self, job: Job) -> None:
        """The worker holds the job now (and what it needs of its GPUs and memory)."""
        self.running[job.id] = job
        if job.needs:
            for k, n in job.needs.items():
                self.reserved[k] = self.reserved.get(k, 0) + n

    def release(self, jid: int) -> Job | None:
        """The worker no longer holds this job: its result came, or it was handed back."""
        job = self.running.pop(jid, None)
        if job is not None and job.needs:
            for k, n in job.needs.items():
                self.reserved[k] -= n
        return job

    def release_all(self) -> list[Job]:
        jobs = list(self.running.values())  # in the order they were given
        self.running.clear()
        self.reserved.clear()
        return jobs

    def room_for(self, needs: dict) -> int:
        """How many more jobs needing this much of the counted resources it can hold."""
        return min(int((self.caps.get(k, 0) - self.reserved.get(k, 0)) // n) for k, n in needs.items())

    def busy(self) -> int:
        """Jobs it is running now (the rest of what it holds is prefetched)."""
        if self.started is None:
            return min(len(self.running), self.slots)
        return sum(1 for j in self.started if j in self.running)

    def load(self) -> int:
        """What it holds, less the jobs blocked on their children: their slots run other jobs."""
        if not self.blocked:
            return len(self.running)
        return len(self.running) - sum(1 for j in self.blocked if j in self.running)

    def describe(self) -> str:
        return f"{self.id}{f' ({self.label})' if self.label else ''}"


def depth(runtime: float | None) -> int:
    """Jobs of this runtime a worker may hold per slot: the one running and its prefetch."""
    if runtime is None:
        return 2
    extra = int(defaults.PREFETCH_SECONDS / max(runtime, 1e-6))
    return 1 + min(max(extra, 1), defaults.PREFETCH_MAX)


class Policy:
    """Queues, workers and the placement of jobs on them."""

    def __init__(self, window: int = defaults.QUEUE_WINDOW, window_bytes: int = defaults.QUEUE_WINDOW_BYTES):
        self.window, self.window_bytes = window, window_bytes
        self.jobs: dict[int, Job] = {}  # unfinished jobs held in memory
        self.queues: dict[Optional[str], Deque[Job]] = {None: collections.deque()}
        self.requires: dict[Optional[str], dict] = {None: {}}
        self.workers: dict[bytes, Worker] = {}
        self.runtimes: dict[str, float] = {}  # function hash -> smoothed job runtime
        self.mem_bytes = 0  # argument bytes of the jobs held in memory
        self.outside = 0  # jobs the master holds in memory outside the queues (waiting for inputs)
        self._unschedulable: dict[Optional[str], float] = {}  # requirement -> since when

    # -- jobs ----------------------------------------------------------------------
    def enqueue(self, job: Job, front: bool = False) -> None:
        if job.id not in self.jobs:
            self.mem_bytes += len(job.args)
        self.jobs[job.id] = job
        rkey = json.dumps(job.requires, sort_keys=True) if job.requires else None
        q = self.queues.get(rkey)
        if q is None:
            q = self.queues[rkey] = collections.deque()
            self.requires[rkey] = job.requires
        (q.appendleft if front else q.append)(job)

    def requeue(self, job: Job) -> None:
        """Back to the front of its queue: it was handed back or lost in transit."""
        job.worker = None
        self.enqueue(job, front=True)

    def forget(self, job: Job) -> bool:
        """The job leaves memory (finished or cancelled); False if it was not held."""
        if self.jobs.pop(job.id, None) is None:
            return False
        self.mem_bytes -= len(job.args)
        return True

    def prune(self) -> None:
        """Drop from the queues what is no longer waiting (after cancels)."""
        for rkey, q in self.queues.items():
            if any(self.jobs.get(j.id) is not j for j in q):
                self.queues[rkey] = collections.deque(j for j in q if self.jobs.get(j.id) is j)

    def ran(self, fn: str, runtime: float) -> None:
        """A job of this function ran this long: the smoothed runtime sizes prefetch."""
        old = self.runtimes.get(fn)
        w = defaults.RUNTIME_WEIGHT
        self.runtimes[fn] = runtime if old is None else (1 - w) * old + w * runtime

    # -- counting ------------------------------------------------------------------
    def held(self) -> int:
        """Jobs placed on workers (running or prefetched)."""
        return sum(len(w.running) for w in self.workers.values())

    def running(self) -> int:
        return sum(w.busy() for w in self.workers.values())

    def waiting(self) -> int:
        """Jobs in memory that no worker holds yet."""
        return len(self.jobs) - self.held()

    def demand(self, sample: int = defaults.DEMAND_SAMPLE) -> list[tuple[dict, int, Optional[float]]]:
        """What waits, per requirement: (requires, jobs queued, runtime or None).

        The runtime is the mean measured runtime of the functions of the next
        ``sample`` jobs of that queue (those measured); None when none is. It
        sizes an adaptive pool; reading a sample keeps this cheap on a long queue.
        """
        out = []
        for rkey, q in self.queues.items():
            if not q:
                continue
            known = [self.runtimes[j.fn] for j in itertools.islice(q, sample) if j.fn in self.runtimes]
            out.append((self.requires[rkey], len(q), sum(known) / len(known) if known else None))
        return out

    # -- the window ------------------------------------------------------------------
    def blocked(self) -> int:
        """Jobs in memory that no connected worker can run (their requirements)."""
        if not self.workers:
            return 0
        return sum(
            len(q) for rkey, q in self.queues.items()
            if rkey is not None and q and not any(satisfies(w.caps, self.requires[rkey]) for w in self.workers.values())
        )  # fmt: skip

    def window_full(self, extra: int = 0) -> bool:
        held = len(self.jobs) + self.outside - self.blocked() + extra
        return held > self.window or self.mem_bytes > self.window_bytes or len(self.jobs) >= 4 * self.window

    def room(self) -> int:
        """How many jobs to read back from the store now: none until half the window is free.

        Jobs no connected worker can run do not count against the window, so
        they cannot keep runnable jobs waiting in the store.
        """
        want = self.window - (len(self.jobs) + self.outside - self.blocked())
        return 0 if want < self.window // 2 or self.window_full() else want

    # -- workers ---------------------------------------------------------------------
    def add_worker(self, w: Worker) -> None:
        self.workers[w.ident] = w

    def remove_worker(self, w: Worker) -> None:
        self.workers.pop(w.ident, None)

    def lost(self, w: Worker) -> tuple[list[Job], list[Job]]:
        """A worker vanished with its jobs: (those it was running, charged an attempt;
        those waiting behind them, spared). It said what it was running in every
        RESULT and heartbeat; if it never did, the oldest ``slots`` it was given."""
        self.remove_worker(w)
        jobs = w.release_all()
        for j in jobs:
            j.worker = None
        if w.started is not None:
            return [j for j in jobs if j.id in w.started], [j for j in jobs if j.id not in w.started]
        return jobs[: w.slots], jobs[w.slots :]

    # -- placement ---------------------------------------------------------------------
    def assign(self, compatible: Callable[[Job, Worker], bool]) -> Iterator[tuple[Worker, list[Job]]]:
        """Place queued jobs on workers: first into idle slots, least-loaded workers
        first; then prefetch. Yields (worker, jobs) with ``job.worker`` set and the
        jobs in ``worker.running``. ``compatible`` may refuse a pair (versions)."""
        if not self.workers or not self.jobs:
            return
        for prefetch in (False, True):
            queues = [(k, q) for k, q in self.queues.items() if q]
            if not queues:
                return
            share = -(-sum(len(q) for _, q in queues) // len(self.workers))
            # only workers with room can take a job: with a deep queue and a thousand
            # busy workers, looking at each one on every turn cost milliseconds
            per_slot = max(depth(self.runtimes.get(q[0].fn)) for _, q in queues) if prefetch else 1
            room = [w for w in self.workers.values()
                    if not (w.draining or w.paused) and w.load() < w.slots * per_slot]  # fmt: skip
            for w in sorted(room, key=lambda w: w.load() / w.slots):
                jobs = self._fill(w, queues, share, prefetch, compatible)
                if jobs:
                    yield w, jobs

    def _fill(self, w: Worker, queues: list, share: int, prefetch: bool, compatible: Callable) -> list[Job]:
        given: list[Job] = []
        for rkey, q in queues:
            if not q or not satisfies(w.caps, self.requires[rkey]):
                continue
            if prefetch:  # no more than an even share of what waits
                free = min(w.limit(self.runtimes.get(q[0].fn)) - w.load(), share - len(given))
            else:  # idle executors: they take what they can run now
                free = (0 if w.draining or w.paused else w.slots) - w.load()
            needs = q[0].needs  # one requirement per queue: its jobs need the same
            if needs and free > 0:
                free = min(free, w.room_for(needs))
            skipped = []
            while q and free > 0:
                job = q.popleft()
                if self.jobs.get(job.id) is not job or job.worker is not None:
                    continue  # finished, cancelled or placed since it was queued
                if not compatible(job, w):
                    skipped.append(job)
                    continue
                job.worker = w
                w.hold(job)
                given.append(job)
                free -= 1
            q.extendleft(reversed(skipped))
        return given

    def unplace(self, job: Job) -> None:
        """Undo a placement that could not be sent."""
        w = job.worker
        if w is not None:
            w.release(job.id)
        job.worker = None

    def unschedulable(self, now: float) -> Iterator[tuple[dict, Deque[Job], float]]:
        """Requirements that no connected worker could ever satisfy (by all it has, not by
        what is free now) while jobs wait for them: (requires, queue, since when).
        With no worker connected, none is judged (a pool may be starting)."""
        for rkey, q in self.queues.items():
            if rkey is None or not q or not self.workers or any(
                satisfies(w.caps, self.requires[rkey]) for w in self.workers.values()
            ):
                self._unschedulable.pop(rkey, None)
                continue
            yield self.requires[rkey], q, self._unschedulable.setdefault(rkey, now)

    def describe_workers(self, n: int = 5) -> str:
        """What the connected workers offer, for people (the first ``n``)."""
        ws = list(self.workers.values())
        text = "; ".join(f"{w.id}: {describe(w.caps)}" for w in ws[:n])
        return text + (f"; and {len(ws) - n} more" if len(ws) > n else "")
