"""Launchers: a master and a pool of workers on a batch scheduler.

One small interface, :class:`Scheduler`, with the verbs a pool needs: submit
the master as a batch job, submit N workers as ONE array job, list the states
of the jobs it started in ONE call, cancel, read a post-mortem, and tell a
process inside a job when its allocation ends. One module per scheduler
implements it (``cw/slurm.py``, ``cw/sge.py``); adding PBS or LSF is one more
module and its name in :data:`SCHEDULERS`.

What the schedulers share lives here:

- :class:`Pool`: the pool's record in the cluster directory (``pool.json``,
  written under ``pool.lock``) and the verbs ``up``, ``status`` and ``down``;
- :class:`Keeper`: the thread beside the master that holds the pool at its
  size: array tasks that end or die are resubmitted, up to a cap, with backoff;
- :func:`serve_master`: the process a launcher starts as the master (a
  :class:`cw.master.Master` plus its keeper);
- :func:`make_cli`: the ``up | status | down`` commands of ``cw slurm`` and ``cw sge``;
- :func:`batch_deadline` and :func:`post_mortem`, which the worker and the
  master call without knowing which scheduler runs them.

The scheduler is asked about jobs only where it must be: the keeper makes one
batched query per ``--poll`` interval, ``status`` one, ``up`` and ``down`` one
per second while they wait. Everything else (which workers are connected,
what they run) comes from the workers' own messages to the master.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import importlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import click

from ..defaults import (
    DEADLINE_CACHE,
    DOWN_WAIT,
    DRAIN_BEFORE,
    HEAL_BACKOFF,
    HEAL_BACKOFF_MAX,
    HEALS_PER_WORKER,
    POLL,
    UP_WAIT,
)
from ..discovery import ClusterDir, pid_alive
from ..errors import CwError, SchedulerError
from . import batch_label

log = logging.getLogger(__name__)

#: The launcher modules, by command name: ``cw.<name>`` exports ``SCHEDULER`` and ``cli``.
SCHEDULERS = ("slurm", "sge")

PENDING, RUNNING, ENDED = "pending", "running", "ended"


@dataclass(frozen=True)
class Task:
    """One task of a job the launcher started, as the scheduler lists it."""

    job: str  #: the job's id (an array's id for its tasks)
    index: int | None  #: the array index; None for a job that is not an array
    state: str  #: PENDING, RUNNING or ENDED
    detail: str = ""  #: the scheduler's own word: COMPLETED, OUT_OF_MEMORY, hqw, Eqw, ...
    reason: str = ""  #: why it pends or ended, where the scheduler says
    host: str = ""
    leaving: bool = False  #: RUNNING, but cancelled or finished: on its way out


@dataclass
class JobSpec:
    """What a submission needs besides its script."""

    name: str  #: job name (letters, digits, '-', '_', '.')
    workdir: str  #: the job's working directory
    logs: Path  #: directory for the job's output files
    options: dict = field(default_factory=dict)  #: the scheduler's options from `up`


def command(cmd: Sequence[str], timeout: float, env: dict | None = None) -> tuple[int, str, str]:
    """Run a scheduler command: (exit code, stdout, stderr); never raises.

    A command that cannot start or runs past ``timeout`` gets exit code -1 and
    the reason as its stderr.
    """
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                           env=env, stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        return -1, "", f"{cmd[0]} did not answer within {timeout:.0f} s"
    except OSError as e:
        return -1, "", f"cannot run {cmd[0]}: {e.strerror or e}"
    return p.returncode, p.stdout, p.stderr.strip()


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


class Scheduler(abc.ABC):
    """The verbs a pool needs from a batch scheduler. One subclass per scheduler."""

    name: ClassVar[str]  #: the command: ``cw <name> up``
    title: ClassVar[str]  #: for people: "SLURM"
    first_index: ClassVar[int] = 0  #: the index of an array's first task

    # -- submission ---------------------------------------------------------------
    @abc.abstractmethod
    def submit_master(self, script: Path, spec: JobSpec) -> str:
        """Submit the master's batch job; return its id."""

    @abc.abstractmethod
    def submit_workers(self, script: Path, count: int, spec: JobSpec) -> str:
        """Submit ``count`` workers as ONE array job; return the array's id."""

    def procs(self, options: dict) -> int:
        """Executor processes for a worker: the CPUs each task is given."""
        return 1

    # -- watching -----------------------------------------------------------------
    @abc.abstractmethod
    def tasks(self, jobs: Sequence[str]) -> list[Task] | None:
        """Every task of these jobs the scheduler still lists, in ONE query; None if it
        could not be asked. A task it no longer lists has ended."""

    @abc.abstractmethod
    def cancel(self, jobs: Sequence[str]) -> None:
        """Cancel jobs or single tasks (as :meth:`task_name` spells them)."""

    def task_name(self, job: str, index: int | None) -> str:
        return job if index is None else f"{job}_{index}"

    def describe(self, job: str, index: int | None = None) -> str:
        return f"{self.title} job {self.task_name(job, index)}"

    # -- inside a job -------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def inside(cls, env: dict) -> bool:
        """True if these environment variables are those of a job of this scheduler."""

    @classmethod
    @abc.abstractmethod
    def owns(cls, info: dict) -> bool:
        """True if a worker's batch info (cw.worker.batch_info) names a job of ours."""

    @abc.abstractmethod
    def deadline(self) -> float | None:
        """Epoch time at which this process's allocation ends; None if unlimited or unknown."""

    @abc.abstractmethod
    def post_mortem(self, info: dict) -> str | None:
        """One line on what became of the job in a worker's batch info."""

    # -- helpers for subclasses -----------------------------------------------------
    @staticmethod
    def drain_before(limit: float | None, grace: float | None = None) -> int:
        """Seconds before a time limit at which a worker is signalled to drain:
        enough for its running jobs' grace, at most a third of a short limit."""
        ahead = max(DRAIN_BEFORE, (grace or 0) + 30)
        if limit is None:
            return int(ahead)
        return int(max(5.0, min(ahead, limit / 3)))

    @staticmethod
    def passed_env() -> dict[str, str]:
        """cw's variables, for schedulers whose jobs do not inherit the environment.

        ``CW_KEY`` is left out on purpose: the command line of a job is public
        (qstat -j); the key travels in the cluster directory.
        """
        names = ("CW_HOME", "CW_CLUSTER", "CW_LOG_LEVEL", "PYTHONPATH")
        return {k: os.environ[k] for k in names if os.environ.get(k)}


def scheduler_class(name: str) -> type[Scheduler]:
    return importlib.import_module(f"cw.launchers.{name}").SCHEDULER


def _job_scheduler(match: Callable[[type[Scheduler]], bool]) -> type[Scheduler] | None:
    for name in SCHEDULERS:
        try:
            cls = scheduler_class(name)
        except (ImportError, AttributeError):
            continue
        if match(cls):
            return cls
    return None


_deadline_cache: tuple[float, float | None] | None = None  # (asked at, answer)
_deadline_lock = threading.Lock()


def batch_deadline() -> float | None:
    """Epoch time at which this process's batch allocation ends, or None.

    None outside a batch job, for an unlimited job, or when the scheduler does
    not say. The answer is kept for DEADLINE_CACHE seconds; each scheduler
    command is bounded by PROBE_TIMEOUT. Never raises.
    """
    global _deadline_cache
    try:
        with _deadline_lock:
            now = time.monotonic()
            if _deadline_cache is not None and now - _deadline_cache[0] < DEADLINE_CACHE:
                return _deadline_cache[1]
            env = dict(os.environ)
            cls = _job_scheduler(lambda c: c.inside(env))
            answer = cls().deadline() if cls else None
            _deadline_cache = (now, answer)
            return answer
    except Exception as e:  # a deadline is a hint: never let it break a worker
        log.debug("batch_deadline: %r", e)
        return None


def post_mortem(info: dict) -> str | None:
    """One line on what became of a worker's batch job, from its batch info.

    ``info`` is what :func:`cw.worker.batch_info` reports (SLURM_JOB_ID,
    SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID, JOB_ID, SGE_TASK_ID). For example
    ``SLURM job 123_4: OUT_OF_MEMORY, exit code 0:125, after 00:10:02 on node7``,
    from the scheduler's accounting where it works, and what is known otherwise.
    None when ``info`` names no batch job. Each command is bounded by
    PROBE_TIMEOUT; never raises.
    """
    try:
        if not info:
            return None
        cls = _job_scheduler(lambda c: c.owns(info))
        return cls().post_mortem(info) if cls else None
    except Exception as e:
        log.debug("post_mortem(%r): %r", info, e)
        return None


# ------------------------------------------------------------------------- the pool
class Pool:
    """A pool of workers on one scheduler, for one cluster directory.

    Its record, ``pool.json`` beside master.json, holds what the launcher
    started and what it was asked for; every change is made under the file
    lock ``pool.lock``, so ``up``, ``down`` and the keeper never submit twice.
    """

    def __init__(self, scheduler: Scheduler, cluster: ClusterDir):
        self.scheduler = scheduler
        self.cluster = cluster
        self.path = cluster.path / "pool.json"
        self.logs = cluster.path / "logs"
        self.jobs_dir = cluster.path / "jobs"

    # -- the record ---------------------------------------------------------------
    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    @contextlib.contextmanager
    def record(self) -> Iterator[dict]:
        """The record, locked; written back (atomically) when the block ends."""
        self.cluster.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.cluster.path / "pool.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            rec = self.read()
            before = json.dumps(rec, sort_keys=True)
            yield rec
            if json.dumps(rec, sort_keys=True) != before:
                tmp = self.path.with_name(f".pool.json.{os.getpid()}.{threading.get_ident()}")
                tmp.write_text(json.dumps(rec, indent=2) + "\n")
                os.replace(tmp, self.path)
        finally:
            os.close(fd)

    def _check_owner(self, rec: dict) -> None:
        other = rec.get("scheduler")
        if other and other != self.scheduler.name:
            raise click.ClickException(
                f"{self.cluster.path} holds a pool started by `cw {other} up`; "
                f"use `cw {other}` there, or another --cluster"
            )

    def job_name(self, role: str) -> str:
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.cluster.path.name)
        return f"cw-{base}-{role}"

    def array_ids(self, rec: dict) -> list[str]:
        return [a["job"] for a in rec.get("arrays", ())]

    # -- counting -----------------------------------------------------------------
    def census(self, rec: dict, tasks: list[Task], prune: bool = False) -> list[dict]:
        """Per worker array: its pending, running and ended tasks.

        Tasks the scheduler no longer lists have ended. With ``prune``, arrays
        whose tasks have all ended leave the record (counted in ``ended``).
        """
        by_job: dict[str, list[Task]] = {}
        for t in tasks:
            by_job.setdefault(t.job, []).append(t)
        out, kept = [], []
        for a in rec.get("arrays", ()):
            listed = [t for t in by_job.get(a["job"], ()) if t.index is not None]
            pending = sum(t.state == PENDING for t in listed)
            running = sum(t.state == RUNNING for t in listed)
            ended = max(0, a["tasks"] - pending - running)
            out.append({**a, "pending": pending, "running": running, "ended": ended,
                        "gone": [t for t in listed if t.state == ENDED]})  # fmt: skip
            if pending or running or not prune:
                kept.append(a)
            else:
                rec["ended"] = rec.get("ended", 0) + a["tasks"]
        if prune:
            rec["arrays"] = kept
        return out

    @staticmethod
    def live(census: list[dict]) -> int:
        return sum(a["pending"] + a["running"] for a in census)

    # -- submission ---------------------------------------------------------------
    def _script(self, role: str, argv: list[str], what: str) -> Path:
        """A job script in the cluster directory (the scheduler copies it at submission)."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        path = self.jobs_dir / f"{self.scheduler.name}-{role}.sh"
        text = (
            "#!/bin/bash\n"
            f"# {what}\n"
            f"# written by `cw {self.scheduler.name} up` for the cluster directory {self.cluster.path}\n"
            f"exec {shlex.join(argv)}\n"
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def _spec(self, rec: dict, role: str, options: dict) -> JobSpec:
        self.logs.mkdir(parents=True, exist_ok=True)
        return JobSpec(self.job_name(role), rec.get("workdir") or os.getcwd(), self.logs, options)

    def submit_workers(self, rec: dict, count: int) -> str:
        """Submit ``count`` workers as one array job and record it."""
        options = rec.get("options") or {}
        argv = [rec.get("python") or sys.executable, "-m", "cw.worker",
                "--cluster-dir", str(self.cluster.path),
                "--procs", str(self.scheduler.procs(options))]  # fmt: skip
        if options.get("grace") is not None:
            argv += ["--grace", str(options["grace"])]
        script = self._script("workers", argv, "one cw worker; each task of the array runs one")
        job = self.scheduler.submit_workers(script, count, self._spec(rec, "workers", options))
        rec.setdefault("arrays", []).append({"job": job, "tasks": count, "submitted": time.time()})
        return job

    def submit_master(self, rec: dict, here: bool) -> dict:
        """Start the master (and its keeper) as a batch job, or as a process on this host."""
        argv = [rec.get("python") or sys.executable, "-m", "cw.master", "--cluster-dir",
                str(self.cluster.path), "--keep-pool"]  # fmt: skip
        for opt in ("interface", "host", "port", "poll"):
            if rec.get(opt) is not None:
                argv += [f"--{opt}", str(rec[opt])]
        if here:
            self.logs.mkdir(parents=True, exist_ok=True)
            out = open(self.logs / "master-here.log", "ab")
            try:
                p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     cwd=rec.get("workdir"), start_new_session=True)  # fmt: skip
            finally:
                out.close()
            return {"here": True, "pid": p.pid, "host": socket.gethostname(), "started": time.time()}
        script = self._script("master", argv, "the cw master and the keeper of its pool of workers")
        options = dict(rec.get("master_options") or {})
        job = self.scheduler.submit_master(script, self._spec(rec, "master", options))
        return {"job": job, "started": time.time()}

    # -- the master -----------------------------------------------------------------
    def answering_master(self, timeout: float = 3.0) -> str | None:
        """The address of the master in master.json if it answers, else None."""
        from ..link import query_status

        address = self.cluster.master_address()
        if not address:
            return None
        try:
            query_status(address, self.cluster.key(), timeout=timeout)
        except CwError:
            return None
        return address

    def master_state(self, rec: dict, tasks: list[Task] | None = None) -> str:
        """PENDING, RUNNING or ENDED for the recorded master (a job, or a process here)."""
        m = rec.get("master") or {}
        if m.get("here"):
            if m.get("host") != socket.gethostname():
                return RUNNING  # another host's process: we cannot tell, assume it runs
            return RUNNING if pid_alive(m.get("pid")) else ENDED
        if not m.get("job"):
            return ENDED
        if tasks is None:
            tasks = self.scheduler.tasks([m["job"]])
            if tasks is None:
                return RUNNING  # the scheduler did not answer: do not start a second master
        states = [ENDED if t.leaving else t.state for t in tasks if t.job == m["job"]]
        return states[0] if states else ENDED

    def _wait_master(self, rec: dict, stale: dict | None, wait: float, echo: Callable) -> str:
        """Until the master publishes itself and answers; raise if its job ends first."""
        deadline = time.monotonic() + wait
        next_check, said = 0.0, ""
        while True:
            info = self.cluster.read_master()
            if info and info != stale:
                address = self.answering_master(timeout=2.0)
                if address:
                    return address
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 5.0
                tasks = None if (rec.get("master") or {}).get("here") else \
                    self.scheduler.tasks([rec["master"]["job"]])  # fmt: skip
                state = self.master_state(rec, tasks)
                if state == ENDED:
                    raise click.ClickException(
                        f"the master ended before it published itself: see {self.logs}"
                    )
                t = next((t for t in tasks or () if t.index is None), None)
                if t and t.state == PENDING and t.reason and t.reason != said:
                    said = t.reason
                    echo(f"master {self.scheduler.describe(t.job)} is pending ({t.reason})")
            if now > deadline:
                raise click.ClickException(
                    f"no master published itself in {self.cluster.path} within {wait:.0f} s; its"
                    f" job stays queued: run the same `up` again later to add the workers"
                )
            time.sleep(0.5)

    # -- verbs --------------------------------------------------------------------
    def up(self, workers: int, options: dict, *, master_options: dict, heal: bool,
           max_heals: int | None, master_here: bool, poll: float, wait: float,
           interface: str | None = None, echo: Callable[[str], Any] = print) -> dict:  # fmt: skip
        """Start the master unless one runs, wait until it is published, then
        bring the workers up to ``workers`` with one array job."""
        c = self.cluster
        c.path.mkdir(parents=True, exist_ok=True)
        c.key(create=True)  # before any job needs it
        with self.record() as rec:
            self._check_owner(rec)
            rec.update(
                scheduler=self.scheduler.name, workdir=os.getcwd(), python=sys.executable,
                options=options, master_options=master_options, heal=heal, poll=poll,
                max_heals=max_heals if max_heals is not None else HEALS_PER_WORKER * workers,
                heals=0, stopping=False, interface=interface,
            )  # fmt: skip
            rec.setdefault("arrays", [])
            rec.setdefault("target", 0)  # raised below, once the master runs
            stale = c.read_master()
            address = self.answering_master()
            if address:
                echo(f"master already running at {address}")
                if not rec.get("master") and heal:
                    echo(f"it was not started by `cw {self.scheduler.name} up`: nothing will heal the pool")
            elif rec.get("master") and self.master_state(rec) != ENDED:
                echo("master already submitted; waiting for it")
            else:
                if stale:
                    echo(f"master.json names no live master: starting one (the store {c.store_path} resumes)")
                rec["master"] = self.submit_master(rec, master_here)
                m = rec["master"]
                where = f"pid {m['pid']} on {m['host']}" if m.get("here") else self.scheduler.describe(m["job"])
                echo(f"master: {where}")
        if not address:
            address = self._wait_master(rec, stale, wait, echo)
            echo(f"master at {address}, published in {c.master_json}")
        with self.record() as rec:
            rec["target"] = workers
            tasks = self.scheduler.tasks(self.array_ids(rec))
            if tasks is None:
                raise click.ClickException(f"cannot list the pool's jobs: is {self.scheduler.title} up?")
            census = self.census(rec, tasks, prune=True)
            live = self.live(census)
            if live < workers:
                job = self.submit_workers(rec, workers - live)
                echo(f"workers: {self.scheduler.describe(job)}, {workers - live} tasks"
                     f"{f' (and {live} already queued or running)' if live else ''}; logs in {self.logs}")  # fmt: skip
            else:
                echo(f"workers: {live} already queued or running")
            rec["filled"] = True
            return dict(rec)

    def status(self) -> dict:
        """The master job, the worker arrays (one scheduler query) and the connected workers."""
        from ..link import query_status

        rec = self.read()
        if not rec:
            raise click.ClickException(f"no pool in {self.cluster.path}: start one with `cw {self.scheduler.name} up`")
        self._check_owner(rec)
        m = rec.get("master") or {}
        ids = ([m["job"]] if m.get("job") else []) + self.array_ids(rec)
        tasks = self.scheduler.tasks(ids) if ids else []
        census = self.census(rec, tasks or [])
        doc: dict[str, Any] = {
            "cluster": str(self.cluster.path), "scheduler": self.scheduler.name,
            "target": rec.get("target", 0), "heal": rec.get("heal", False),
            "heals": rec.get("heals", 0), "max_heals": rec.get("max_heals", 0),
            "stopping": rec.get("stopping", False), "scheduler_answered": tasks is not None,
            "master": {**m, "state": self.master_state(rec, tasks) if m else ENDED},
            "arrays": [{k: a[k] for k in ("job", "tasks", "pending", "running", "ended")} for a in census],
            "ended_before": rec.get("ended", 0),
        }  # fmt: skip
        mt = next((t for t in tasks or () if t.job == m.get("job")), None)
        if mt:
            doc["master"].update(detail=mt.detail, reason=mt.reason, node=mt.host)
        doc["address"] = address = self.cluster.master_address()
        doc["connected"] = None
        if address:
            try:
                s = query_status(address, self.cluster.key(), timeout=3.0)
                doc["connected"] = {
                    "workers": [{k: w.get(k) for k in ("id", "host", "slots", "running", "draining", "info")}
                                for w in s.get("workers", ())],
                    "queued": s.get("queued"), "running": s.get("running"), "done": s.get("done"),
                }  # fmt: skip
            except CwError as e:
                doc["master"]["error"] = str(e)
        return doc

    def down(self, wait: float = DOWN_WAIT, echo: Callable[[str], Any] = print) -> bool:
        """Drain and cancel the workers, then stop the master; True if nothing is left."""
        with self.record() as rec:
            if not rec:
                echo(f"no pool in {self.cluster.path}")
                return True
            self._check_owner(rec)
            rec["stopping"] = True  # from here on the keeper submits nothing
            arrays = self.array_ids(rec)
            master = dict(rec.get("master") or {})
        deadline = time.monotonic() + wait
        if arrays:
            # the workers drain on the scheduler's signal: jobs not started go
            # back to the master (still running, so nothing is lost or charged)
            self.scheduler.cancel(arrays)
            echo(f"cancelled worker arrays {', '.join(arrays)}: draining")
            self._wait_gone(arrays, deadline)
        if master.get("here"):
            if master.get("host") == socket.gethostname() and pid_alive(master.get("pid")):
                os.kill(int(master["pid"]), signal.SIGTERM)
                while pid_alive(master["pid"]) and time.monotonic() < deadline:
                    time.sleep(0.2)
            elif master.get("host") != socket.gethostname():
                echo(f"the master runs on {master.get('host')} (pid {master.get('pid')}): stop it there")
        elif master.get("job"):
            self.scheduler.cancel([master["job"]])
            echo(f"cancelled master {self.scheduler.describe(master['job'])}")
        ids = arrays + ([master["job"]] if master.get("job") else [])
        left = self._wait_gone(ids, deadline) if ids else []
        if left:  # past the grace: cancel again (SLURM: KillWait later, SIGKILL)
            self.scheduler.cancel(sorted({t.job for t in left}))
            left = self._wait_gone(ids, time.monotonic() + 30.0)
        with self.record() as rec:
            rec["target"] = 0
            if not left:
                rec["ended"] = rec.get("ended", 0) + sum(a["tasks"] for a in rec.get("arrays", ()))
                rec["arrays"], rec["master"] = [], None
        if left:
            echo(f"still in the queue: {', '.join(self.scheduler.task_name(t.job, t.index) for t in left)}")
            return False
        echo("pool down: no job left in the queue")
        return True

    def _wait_gone(self, jobs: list[str], deadline: float) -> list[Task]:
        """Until no task of these jobs pends or runs; what is left at the deadline."""
        while True:
            tasks = self.scheduler.tasks(jobs)
            left = [t for t in tasks or () if t.state != ENDED]
            if tasks is not None and not left:
                return []
            if time.monotonic() > deadline:
                return left
            time.sleep(1.0)


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

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.wait(self.interval()):
            try:
                self.tick()
            except Exception:
                log.exception("pool keeper: unexpected error (it keeps going)")

    def interval(self) -> float:
        if self.poll is not None:
            return self.poll
        return float(self.pool.read().get("poll") or POLL)

    def tick(self, now: float | None = None) -> int:
        """One look at the scheduler; returns the number of tasks submitted."""
        now = time.monotonic() if now is None else now
        pool, sched = self.pool, self.pool.scheduler
        with pool.record() as rec:
            target = int(rec.get("target") or 0)
            if rec.get("stopping") or not target:
                return 0
            if rec.get("filled") and not rec.get("heal"):
                return 0
            tasks = sched.tasks(pool.array_ids(rec))
            if tasks is None:
                if now >= self._quiet_until:
                    log.warning("pool keeper: %s did not answer; trying again", sched.title)
                    self._quiet_until = now + 300.0
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

    def backoff(self) -> float:
        return min(HEAL_BACKOFF_MAX, HEAL_BACKOFF * 2**self.streak)


def keeper_for(cluster: ClusterDir, poll: float | None = None) -> Keeper:
    """The keeper of the pool recorded in a cluster directory's pool.json."""
    rec = Pool(None, cluster).read()  # type: ignore[arg-type]
    name = rec.get("scheduler")
    if not name:
        raise CwError(f"no pool recorded in {cluster.path / 'pool.json'}: nothing to keep")
    return Keeper(Pool(scheduler_class(name)(), cluster), poll)


# ------------------------------------------------------------------- the commands
def _with(options: list) -> Callable:
    def deco(f: Callable) -> Callable:
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


def up_options(values: dict, extra_flag: str, seconds: Callable[[str], Any], example: str) -> dict:
    """The options dict of `up` from click's values: unset ones dropped, the
    scheduler's extra flags under "extra", the time limit checked by ``seconds``."""
    out = {k: v for k, v in values.items() if v is not None and k != extra_flag}
    if values.get(extra_flag):
        out["extra"] = values[extra_flag]
    if out.get("time"):
        try:
            seconds(out["time"])
        except ValueError:
            raise click.BadParameter(f"{out['time']!r} is not a time limit (e.g. {example})",
                                     param_hint="--time") from None  # fmt: skip
    return out


def make_cli(cls: type[Scheduler], up_options: list, to_options: Callable[[dict], dict]) -> click.Group:
    """The `up | status | down` commands for one scheduler.

    The cluster and logging options, and their handling, are `cw`'s own (cli.py).

    ``up_options`` are the scheduler's own click options of `up`;
    ``to_options`` turns their values into the options dict its
    :meth:`Scheduler.submit_workers` reads.
    """
    from ..cli.common import CLUSTER_OPTIONS as _cluster_options
    from ..cli.common import cluster_from as _cluster
    from ..cli.common import log_option
    from ..cli.common import setup_logging as _logging

    _common = [*_cluster_options, log_option]
    n = cls.name

    @click.group(name=n, help=f"A pool of cw workers on {cls.title}: up, status, down.",
                 context_settings={"help_option_names": ["-h", "--help"]})  # fmt: skip
    def group() -> None:
        pass

    @group.command("up")
    @click.option("--workers", "-n", type=click.IntRange(min=1), required=True,
                  help="Size of the pool: worker tasks in the array job.")
    @_with(up_options)
    @click.option("--array-parallelism", type=click.IntRange(min=1), default=None,
                  help="At most this many worker tasks run at once (default: all).")
    @click.option("--grace", type=click.FloatRange(min=0), default=None,
                  help="Seconds a draining worker lets its running jobs finish before it hands"
                       " them back (default: the worker's).")
    @click.option("--master-here", is_flag=True,
                  help="Run the master as a process on this host instead of as a batch job.")
    @click.option("--master-time", default=None,
                  help="Time limit of the master's job (default: the longest the queue allows).")
    @click.option("--heal/--no-heal", default=True, show_default=True,
                  help="Resubmit worker tasks that end or die, so the pool holds its size.")
    @click.option("--max-heals", type=click.IntRange(min=0), default=None,
                  help=f"Resubmit at most this many tasks over the pool's life (default: {HEALS_PER_WORKER} per worker).")
    @click.option("--poll", type=click.FloatRange(min=0.1), default=POLL, show_default=True,
                  help="Seconds between the keeper's looks at the queue (one query each).")
    @click.option("--wait", type=float, default=UP_WAIT, show_default=True,
                  help="Seconds to wait for the master to publish itself.")
    @click.option("--interface", default=None,
                  help="Publish the master's address on this network interface (e.g. ib0).")
    @_with(_common)
    def up_cmd(workers, array_parallelism, grace, master_here, master_time, heal, max_heals, poll, wait,
               interface, cluster_name, cluster_dir, log_level, **sched_opts):  # fmt: skip
        """Start a master and --workers N workers as ONE array job; return once the master is published."""
        _logging(log_level)
        options = to_options(sched_opts)
        if array_parallelism:
            options["array_parallelism"] = array_parallelism
        if grace is not None:
            options["grace"] = grace
        master_options = {k: v for k, v in options.items() if k in MASTER_KEYS}
        if master_time:
            master_options["time"] = master_time
        else:
            master_options.pop("time", None)
            master_options["long"] = True
        pool = Pool(cls(), _cluster(cluster_name, cluster_dir))
        try:
            pool.up(workers, options, master_options=master_options, heal=heal, max_heals=max_heals,
                    master_here=master_here, poll=poll, wait=wait, interface=interface, echo=click.echo)  # fmt: skip
        except CwError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"ready: clients find the master through {pool.cluster.master_json}"
                   f" (cw.Client(cluster={str(pool.cluster.path)!r}))")  # fmt: skip

    @group.command("status")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a summary.")
    @_with(_common)
    def status_cmd(as_json, cluster_name, cluster_dir, log_level):
        """The master job, the worker arrays (pending / running / ended) and the connected workers."""
        _logging(log_level)
        pool = Pool(cls(), _cluster(cluster_name, cluster_dir))
        doc = pool.status()
        if as_json:
            click.echo(json.dumps(doc, indent=2, default=str))
            return
        click.echo(_format_status(pool.scheduler, doc))

    @group.command("down")
    @click.option("--wait", type=float, default=DOWN_WAIT, show_default=True,
                  help="Seconds to let the workers drain before the jobs are killed.")
    @_with(_common)
    def down_cmd(wait, cluster_name, cluster_dir, log_level):
        """Drain the workers, cancel every job the pool started, stop the master."""
        _logging(log_level)
        pool = Pool(cls(), _cluster(cluster_name, cluster_dir))
        if not pool.down(wait=wait, echo=click.echo):
            raise click.ClickException("some jobs did not leave the queue")

    return group


#: Options of `up` that apply to the master's job too (resources stay the workers').
MASTER_KEYS = ("partition", "account", "queue", "extra")


def _format_status(sched: Scheduler, doc: dict) -> str:
    lines = []
    m = doc["master"]
    if m.get("here"):
        where = f"process {m.get('pid')} on {m.get('host')}"
    elif m.get("job"):
        where = sched.describe(m["job"])
    else:
        where = "none"
    state = m.get("detail") or m.get("state", "?")
    node = f" on {m['node']}" if m.get("node") else ""
    at = f", at {doc['address']}" if doc.get("address") else ""
    lines.append(f"master: {where}, {state}{node}{at}")
    if m.get("error"):
        lines.append(f"  not answering: {m['error']}")
    p = sum(a["pending"] for a in doc["arrays"])
    r = sum(a["running"] for a in doc["arrays"])
    e = sum(a["ended"] for a in doc["arrays"]) + doc.get("ended_before", 0)
    heal = f"healing, {doc['heals']} of {doc['max_heals']} heals used" if doc["heal"] else "not healing"
    lines.append(f"workers: {doc['target']} wanted; {r} running, {p} pending, {e} ended ({heal})")
    for a in doc["arrays"]:
        lines.append(f"  {sched.describe(a['job'])}: {a['tasks']} tasks, {a['running']} running,"
                     f" {a['pending']} pending, {a['ended']} ended")  # fmt: skip
    if not doc.get("scheduler_answered", True):
        lines.append(f"  ({sched.title} did not answer: counts unknown)")
    conn = doc.get("connected")
    if conn is None:
        lines.append("connected: no master answering")
    else:
        ws = conn["workers"]
        lines.append(f"connected: {len(ws)} workers, {sum(w['slots'] or 0 for w in ws)} slots;"
                     f" jobs {conn['queued']} queued, {conn['running']} running, {conn['done']} done")  # fmt: skip
        for w in ws:
            info = w.get("info") or {}
            label = batch_label(info, scheduler=False) or "-"
            lines.append(f"  {w['id']:<28} {label:<18} {w['slots']:>3} slots {w['running']:>5} running"
                         f"{'  draining' if w.get('draining') else ''}")  # fmt: skip
    return "\n".join(lines)
