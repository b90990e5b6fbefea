"""A pool of workers on a batch scheduler: its record and its verbs.

What every backend (:mod:`cw.launchers.slurm`, :mod:`cw.launchers.sge`) shares:

- :class:`Pool`: the pool's record in the cluster directory (``pool.json``,
  written under ``pool.lock``) and the verbs ``up``, ``status`` and ``down``;
- the keeper beside the master, which holds it at its size, is in
  :mod:`cw.launchers.keeper`.

The scheduler is asked about jobs only where it must be: the keeper makes one
batched query per ``--poll`` interval, ``status`` one, ``up`` and ``down`` one
per second while they wait. Everything else (which workers are connected,
what they run) comes from the workers' own messages to the master.

Nothing here prints or knows the command line: errors are cw's typed errors,
and the lines a person follows while ``up`` and ``down`` wait go to their
``report`` callable (INFO logging by default; ``cw <backend> up`` passes
click.echo).
"""

from __future__ import annotations

import contextlib
import fcntl
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
from pathlib import Path
from typing import Any, Callable, Iterator

from ..defaults import DOWN_WAIT, HEALS_PER_WORKER
from ..discovery import ClusterDir, pid_alive, private_umask, write_private
from ..errors import ConfigError, CwError, SchedulerError
from ..errors import TimeoutError as CwTimeoutError
from .base import ENDED, PENDING, RUNNING, JobSpec, Scheduler, Task

log = logging.getLogger(__name__)

#: What takes the progress lines of ``up`` and ``down`` (click.echo, a logger's method).
Report = Callable[[str], Any]


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
        self.cluster.make()
        fd = os.open(self.cluster.path / "pool.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            rec = self.read()
            before = json.dumps(rec, sort_keys=True)
            yield rec
            if json.dumps(rec, sort_keys=True) != before:
                tmp = self.path.with_name(f".pool.json.{os.getpid()}.{threading.get_ident()}")
                write_private(tmp, json.dumps(rec, indent=2) + "\n")
                os.replace(tmp, self.path)
        finally:
            os.close(fd)

    def _check_owner(self, rec: dict) -> None:
        other = rec.get("scheduler")
        if other and other != self.scheduler.name:
            raise ConfigError(
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
            retired = set(a.get("retired", ()))
            retiring = sum(t.state != ENDED and t.index in retired for t in listed)
            out.append({**a, "pending": pending, "running": running, "ended": ended, "retiring": retiring,
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
        """Tasks pending or running, less those asked to leave (retired, draining)."""
        return sum(a["pending"] + a["running"] - a.get("retiring", 0) for a in census)

    # -- submission ---------------------------------------------------------------
    def _script(self, role: str, argv: list[str], what: str) -> Path:
        """A job script in the cluster directory (the scheduler copies it at submission)."""
        path = self.cluster.subdir("jobs") / f"{self.scheduler.name}-{role}.sh"
        text = (
            "#!/bin/bash\n"
            f"# {what}\n"
            f"# written by `cw {self.scheduler.name} up` for the cluster directory {self.cluster.path}\n"
            "umask 077  # what the job writes is its owner's alone, its output files too:\n"
            'for fd in 1 2; do f=$(readlink "/proc/$$/fd/$fd") && [ -f "$f" ] && chmod go= "$f"; done 2>/dev/null\n'
            f"exec {shlex.join(argv)}\n"
        )
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        write_private(tmp, text)
        os.replace(tmp, path)
        return path

    def _spec(self, rec: dict, role: str, options: dict) -> JobSpec:
        self.cluster.subdir("logs")
        return JobSpec(self.job_name(role), rec.get("workdir") or os.getcwd(), self.logs, options)

    def profile(self, rec: dict, name: str = "") -> dict:
        """A resource profile of the pool ('' the default): its name, what its workers
        provide, its scheduler options (the pool's, with the profile's over them)."""
        options = dict(rec.get("options") or {})
        if not name:
            return {"name": "", "provides": self.scheduler.provides(options), "options": options,
                    "declared": {}}  # fmt: skip
        p = next((p for p in rec.get("profiles") or () if p.get("name") == name), None)
        if p is None:
            raise ConfigError(f"the pool in {self.cluster.path} has no profile {name!r}")
        own = dict(p.get("options") or {})
        if options.get("extra") and own.get("extra"):
            own["extra"] = f"{options['extra']} {own['extra']}"
        options.update(own)
        provides = {**self.scheduler.provides(options), **(p.get("provides") or {})}
        return {"name": name, "provides": provides, "options": options, "declared": dict(p.get("provides") or {}),
                "maximum": p.get("maximum")}  # fmt: skip

    def submit_workers(self, rec: dict, count: int, profile: str = "") -> str:
        """Submit ``count`` workers (of a resource profile) as one array job and record it."""
        from .adapt import Profile

        prof = self.profile(rec, profile)
        options = prof["options"]
        argv = [rec.get("python") or sys.executable, "-m", "cw.worker",
                "--cluster-dir", str(self.cluster.path),
                "--procs", str(self.scheduler.procs(options))]  # fmt: skip
        argv += self.scheduler.grace_args(options.get("grace"))
        argv += Profile(profile, prof["declared"]).worker_args()
        role = f"workers-{profile}" if profile else "workers"
        what = f"one cw worker{f' of the profile {profile}' if profile else ''}; each task of the array runs one"
        script = self._script(role, argv, what)
        with private_umask():  # the scheduler creates the job's output files under our umask
            job = self.scheduler.submit_workers(script, count, self._spec(rec, role, options))
        entry = {"job": job, "tasks": count, "submitted": time.time()}
        if profile:
            entry["profile"] = profile
        rec.setdefault("arrays", []).append(entry)
        return job

    def retire(self, rec: dict, names: list[str], tasks: list[Task]) -> list[str]:
        """Ask tasks to leave, in at most two scheduler calls: pending ones are cancelled,
        running ones drained (their workers hand back what they hold: nothing is lost or
        charged). They are recorded as retired, so they no longer count. Returns the names."""
        where = {self.scheduler.task_name(t.job, t.index): t for t in tasks if t.index is not None}
        chosen = [where[n] for n in names if n in where]
        done: list[Task] = []
        for state, verb in ((PENDING, self.scheduler.cancel), (RUNNING, self.scheduler.drain)):
            these = [t for t in chosen if t.state == state]
            if not these:
                continue
            try:
                verb([self.scheduler.task_name(t.job, t.index) for t in these])
            except SchedulerError as e:  # they still count; the next turn may try again
                log.warning("cannot retire %d workers: %s", len(these), e)
                continue
            done += these
        for a in rec.get("arrays", ()):
            mine = sorted({t.index for t in done if t.job == a["job"]})
            if mine:
                a["retired"] = sorted(set(a.get("retired", ())) | set(mine))
        return [self.scheduler.task_name(t.job, t.index) for t in done]

    def submit_master(self, rec: dict, here: bool) -> dict:
        """Start the master (and its keeper) as a batch job, or as a process on this host."""
        argv = [rec.get("python") or sys.executable, "-m", "cw.master", "--cluster-dir",
                str(self.cluster.path), "--keep-pool"]  # fmt: skip
        for opt in ("interface", "host", "port", "poll"):
            if rec.get(opt) is not None:
                argv += [f"--{opt}", str(rec[opt])]
        if here:
            fd = os.open(self.cluster.subdir("logs") / "master-here.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            out = os.fdopen(fd, "ab")
            try:
                p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     cwd=rec.get("workdir"), start_new_session=True)  # fmt: skip
            finally:
                out.close()
            return {"here": True, "pid": p.pid, "host": socket.gethostname(), "started": time.time()}
        script = self._script("master", argv, "the cw master and the keeper of its pool of workers")
        options = dict(rec.get("master_options") or {})
        with private_umask():
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
            query_status(address, self.cluster.key(), timeout=timeout, encrypt=self.cluster.encrypted())
        except CwError:
            return None
        return address

    def master_state(self, rec: dict, tasks: list[Task] | None = None) -> str:
        """PENDING, RUNNING or ENDED for the recorded master (a job, or a process here)."""
        m = rec.get("master") or {}
        if m.get("here"):
            if m.get("host") != socket.gethostname():
                return RUNNING  # another host's process: we cannot tell, assume it runs
            return RUNNING if pid_alive(m.get("pid"), reap=True) else ENDED
        if not m.get("job"):
            return ENDED
        if tasks is None:
            tasks = self.scheduler.tasks([m["job"]])
            if tasks is None:
                return RUNNING  # the scheduler did not answer: do not start a second master
        states = [ENDED if t.leaving else t.state for t in tasks if t.job == m["job"]]
        return states[0] if states else ENDED

    def _wait_master(self, rec: dict, stale: dict | None, wait: float, report: Report) -> str:
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
                    raise SchedulerError(f"the master ended before it published itself: see {self.logs}")
                t = next((t for t in tasks or () if t.index is None), None)
                if t and t.state == PENDING and t.reason and t.reason != said:
                    said = t.reason
                    report(f"master {self.scheduler.describe(t.job)} is pending ({t.reason})")
            if now > deadline:
                raise CwTimeoutError(
                    f"no master published itself in {self.cluster.path} within {wait:.0f} s; its"
                    f" job stays queued: run the same `up` again later to add the workers"
                )
            time.sleep(0.5)

    # -- verbs --------------------------------------------------------------------
    def up(self, workers: int, options: dict, *, master_options: dict, heal: bool,
           max_heals: int | None, master_here: bool, poll: float, wait: float,
           interface: str | None = None, report: Report | None = None, adapt: dict | None = None,
           profiles: list[dict] | None = None, owner: dict | None = None) -> dict:  # fmt: skip
        """Start the master unless one runs, wait until it is published, then
        bring the workers up to ``workers`` with one array job.

        ``options`` are the scheduler's (:meth:`Scheduler.up_options`),
        ``master_options`` those of the master's job
        (:meth:`Scheduler.master_options`). With ``adapt`` (the settings of
        :class:`~cw.launchers.adapt.Adaptive`) the keeper sizes the pool by
        the queue, with the resource ``profiles``; with ``owner`` (see
        :mod:`cw.launchers.owner`) it takes the pool down when that process
        is gone. Progress lines go to ``report`` (default: INFO logging).
        Raises SchedulerError if the scheduler fails or the master's job ends,
        cw's TimeoutError if the master does not publish itself within
        ``wait`` seconds, ConfigError if the cluster directory holds another
        scheduler's pool.
        """
        report = report or log.info
        c = self.cluster
        c.make()
        c.key(create=True)  # before any job needs it
        with self.record() as rec:
            self._check_owner(rec)
            if rec.get("filled") and not rec.get("stopping"):  # up again: never smaller, the same budget
                if max_heals is None and rec.get("max_heals_given"):
                    max_heals = rec.get("max_heals")
                workers = max(workers, int(rec.get("target") or 0))
                options = {**(rec.get("options") or {}), **options}  # what is not given again stays
            rec.update(
                scheduler=self.scheduler.name, workdir=os.getcwd(), python=sys.executable,
                options=options, master_options=master_options, heal=heal, poll=poll,
                max_heals=max_heals if max_heals is not None else HEALS_PER_WORKER * workers,
                heals=0, stopping=False, interface=interface, adapt=adapt, profiles=profiles or [],
                max_heals_given=max_heals is not None,
            )  # fmt: skip
            if owner is not None:
                rec["owner"] = owner
            rec.setdefault("arrays", [])
            rec.setdefault("target", 0)  # raised below, once the master runs
            stale = c.read_master()
            address = self.answering_master()
            if address:
                report(f"master already running at {address}")
                if not rec.get("master") and heal:
                    report(f"it was not started by `cw {self.scheduler.name} up`: nothing will heal the pool")
            elif rec.get("master") and self.master_state(rec) != ENDED:
                report("master already submitted; waiting for it")
            else:
                if stale:
                    report(f"master.json names no live master: starting one (the store {c.store_path} resumes)")
                rec["master"] = self.submit_master(rec, master_here)
                m = rec["master"]
                where = f"pid {m['pid']} on {m['host']}" if m.get("here") else self.scheduler.describe(m["job"])
                report(f"master: {where}")
        if not address:
            address = self._wait_master(rec, stale, wait, report)
            report(f"master at {address}, published in {c.master_json}")
        with self.record() as rec:
            rec["target"] = workers
            tasks = self.scheduler.tasks(self.array_ids(rec))
            if tasks is None:
                raise SchedulerError(f"cannot list the pool's jobs: is {self.scheduler.title} up?")
            census = self.census(rec, tasks, prune=True)
            live = self.live(census)
            if live < workers:
                job = self.submit_workers(rec, workers - live)
                report(f"workers: {self.scheduler.describe(job)}, {workers - live} tasks"
                       f"{f' (and {live} already queued or running)' if live else ''}; logs in {self.logs}")  # fmt: skip
            else:
                report(f"workers: {live} already queued or running")
            rec["filled"] = True
            return dict(rec)

    def status(self) -> dict:
        """The master job, the worker arrays (one scheduler query) and the connected workers."""
        from ..link import query_status

        rec = self.read()
        if not rec:
            raise ConfigError(f"no pool in {self.cluster.path}: start one with `cw {self.scheduler.name} up`")
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
            "arrays": [{**{k: a[k] for k in ("job", "tasks", "pending", "running", "ended", "retiring")},
                        **({"profile": a["profile"]} if a.get("profile") else {})} for a in census],
            "ended_before": rec.get("ended", 0),
            "adapt": rec.get("adapt"), "profiles": rec.get("profiles") or [], "owner": rec.get("owner"),
        }  # fmt: skip
        mt = next((t for t in tasks or () if t.job == m.get("job")), None)
        if mt:
            doc["master"].update(detail=mt.detail, reason=mt.reason, node=mt.host)
        doc["address"] = address = self.cluster.master_address()
        doc["connected"] = None
        if address:
            try:
                s = query_status(address, self.cluster.key(), timeout=3.0, encrypt=self.cluster.encrypted())
                # label and task: the master's name of each worker's batch job, where it gives one
                doc["connected"] = {
                    "workers": [{**{k: w.get(k) for k in ("id", "host", "slots", "running", "draining", "info")},
                                 **{k: w[k] for k in ("label", "task", "prefetched", "idle") if k in w}}
                                for w in s.get("workers", ())],
                    "queued": s.get("queued"), "running": s.get("running"), "done": s.get("done"),
                    "queues": s.get("queues", []),
                }  # fmt: skip
            except CwError as e:
                doc["master"]["error"] = str(e)
        return doc

    def down(self, wait: float = DOWN_WAIT, report: Report | None = None, master: bool = True) -> bool:
        """Drain and cancel the workers, then stop the master; True if nothing is left.

        Progress lines go to ``report`` (default: INFO logging). With
        ``master=False`` the master is left to stop by itself (its keeper
        takes down the pool of an owner that is gone).
        """
        stop_master = master
        report = report or log.info
        with self.record() as rec:
            if not rec:
                report(f"no pool in {self.cluster.path}")
                return True
            self._check_owner(rec)
            rec["stopping"] = True  # from here on the keeper submits nothing
            arrays = self.array_ids(rec)
            master = dict(rec.get("master") or {})
        deadline = time.monotonic() + wait
        if arrays:
            # the workers drain on the scheduler's signal: jobs not started go
            # back to the master (still running, so nothing is lost or charged)
            tasks = self.scheduler.tasks(arrays)
            running = [self.scheduler.task_name(t.job, t.index) for t in tasks or ()
                       if t.state == RUNNING and not t.leaving and t.index is not None]  # fmt: skip
            if running:
                self.scheduler.drain(running)
            self.scheduler.cancel(arrays if tasks is None else
                                  [self.scheduler.task_name(t.job, t.index) for t in tasks if t.state == PENDING])  # fmt: skip
            report(f"worker arrays {', '.join(arrays)}: {len(running)} workers draining, pending tasks cancelled")
            self._wait_gone(arrays, deadline)
        if not stop_master:
            master = {}
        if master.get("here"):
            if master.get("host") == socket.gethostname() and pid_alive(master.get("pid"), reap=True):
                os.kill(int(master["pid"]), signal.SIGTERM)
                while pid_alive(master["pid"], reap=True) and time.monotonic() < deadline:
                    time.sleep(0.2)
            elif master.get("host") != socket.gethostname():
                report(f"the master runs on {master.get('host')} (pid {master.get('pid')}): stop it there")
        elif master.get("job"):
            self.scheduler.cancel([master["job"]])
            report(f"cancelled master {self.scheduler.describe(master['job'])}")
        ids = arrays + ([master["job"]] if master.get("job") else [])
        left = self._wait_gone(ids, deadline) if ids else []
        if left:  # past the grace: cancel again (SLURM: KillWait later, SIGKILL)
            self.scheduler.cancel(sorted({t.job for t in left}))
            left = self._wait_gone(ids, time.monotonic() + 30.0)
        with self.record() as rec:
            rec["target"] = 0
            if not left:
                rec["ended"] = rec.get("ended", 0) + sum(a["tasks"] for a in rec.get("arrays", ()))
                rec["arrays"] = []
                if stop_master:
                    rec["master"] = None
        if left:
            report(f"still in the queue: {', '.join(self.scheduler.task_name(t.job, t.index) for t in left)}")
            return False
        report("pool down: no job left in the queue")
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
