"""Helpers for the tests on a real SLURM and Grid Engine (scripts/slurm-up.sh, sge-up.sh).

Each test gets its own cluster directory, so its job names, master.json and
store are its own; :class:`Launched` stops everything a test started, down to
the last job it submitted, even when the test fails.

The tests check what cw did by asking the batch system themselves: each
system's commands for that are a :class:`System` in :data:`SYSTEMS`
(SLURM's and Grid Engine's here; another system's test file may
:func:`register` its own).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from conftest import wait_for

import cw
from cw.discovery import ClusterDir

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# -- what each batch system's tests need to see for themselves ---------------------
@dataclass(frozen=True)
class System:
    """How the tests ask a batch system directly, without cw (each test file may add its own)."""

    probe: list[str]  #: a command that answers when the system is up ...
    usable: Callable[[str], bool]  #: ... and, from its output, whether a node can run jobs
    queued: Callable[[list[str]], list[str]]  #: ids of these jobs' tasks still pending or running
    cancel: list[str]  #: the command that cancels jobs by id
    by_name: Callable[[str], list[str]]  #: ids of the jobs whose name starts with a prefix


SYSTEMS: dict[str, System] = {}


def register(name: str, system: System) -> None:
    """Make a batch system known to :func:`require`, :func:`queued`, :class:`Launched` ..."""
    SYSTEMS[name] = system


_reachable: dict[str, str | None] = {}


def require(scheduler: str) -> None:
    """Fail under CI, skip elsewhere, unless the scheduler answers and has a usable node."""
    if scheduler not in _reachable:
        system = SYSTEMS[scheduler]
        try:
            p = subprocess.run(system.probe, capture_output=True, text=True, timeout=20)
            why = None if p.returncode == 0 and system.usable(p.stdout) else (p.stderr.strip() or p.stdout.strip() or "no usable node")
        except (OSError, subprocess.TimeoutExpired) as e:
            why = str(e)
        _reachable[scheduler] = why
    why = _reachable[scheduler]
    if why:
        msg = f"{scheduler} is not reachable ({why}): bring it up with `bash scripts/{scheduler}-up.sh`"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


def run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# -- what the scheduler still holds -------------------------------------------------
def queued(scheduler: str, jobs: list[str]) -> list[str]:
    """Ids of these jobs' tasks the scheduler lists as pending or running (what a user sees)."""
    return SYSTEMS[scheduler].queued(jobs) if jobs else []


def cancel(scheduler: str, jobs: list[str]) -> None:
    if jobs:
        run([*SYSTEMS[scheduler].cancel, *jobs])


def _slurm_queued(jobs: list[str]) -> list[str]:
    p = run(["squeue", "-h", "-r", "-j", ",".join(jobs), "-o", "%i"])
    if p.returncode != 0 and "Invalid job id" not in p.stderr:
        raise AssertionError(f"squeue failed: {p.stderr}")
    return p.stdout.split()


def _slurm_by_name(tag: str) -> list[str]:
    p = run(["squeue", "-h", "-o", "%i %j"])
    return [i.split("_")[0] for i, n in (line.split(None, 1) for line in p.stdout.splitlines()) if n.startswith(tag)]


def _qstat_jobs() -> list[ET.Element]:
    p = run(["qstat", "-xml"])
    assert p.returncode == 0, p.stderr
    return list(ET.fromstring(p.stdout).iter("job_list"))


def _sge_queued(jobs: list[str]) -> list[str]:
    out = []
    for j in _qstat_jobs():
        job, tasks = j.findtext("JB_job_number"), j.findtext("tasks")
        if job in jobs:
            out.append(f"{job}.{tasks}" if tasks else job)
    return out


def _sge_by_name(tag: str) -> list[str]:
    try:
        found = _qstat_jobs()
    except (AssertionError, ET.ParseError):
        return []
    # qstat truncates nothing in XML, so the full name is there
    return sorted({(j.findtext("JB_job_number") or "") for j in found if (j.findtext("JB_name") or "").startswith(tag)})


register("slurm", System(
    # the node must be up and the partition available, not merely the daemon
    probe=["sinfo", "-h", "-o", "%a %t"],
    usable=lambda out: any(line.split()[0] == "up" and line.split()[1].rstrip("*~#") in ("idle", "mix", "alloc", "comp")
                           for line in out.splitlines() if len(line.split()) == 2),
    queued=_slurm_queued, cancel=["scancel"], by_name=_slurm_by_name,
))  # fmt: skip
register("sge", System(probe=["qstat", "-f"], usable=lambda out: "@" in out, queued=_sge_queued,
                       cancel=["qdel"], by_name=_sge_by_name))  # fmt: skip


def final_state(job: str) -> str:
    """SLURM's word for a task or job ('31_2', '30') while slurmctld remembers it."""
    p = run(["squeue", "-h", "-t", "all", "-j", job.split("_")[0], "-r", "-o", "%i %T"])
    for line in p.stdout.splitlines():
        name, state = line.split()
        if name == job:
            return state
    return ""


def submitted_id(scheduler: str, out: str) -> str:
    """The job id printed by `sbatch --parsable` or `qsub -terse`."""
    return out.strip().split(";")[0].split(".")[0]


# -- functions the workers run ----------------------------------------------------------
def square(x):
    return x * x


def slow(x, seconds=1.0):
    time.sleep(seconds)
    return x


def logged(x, path):
    """x * 10, leaving a line in a file each time it really runs."""
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return x * 10


# -- a pool started by `python -m cw <scheduler> up` --------------------------------
class Launched:
    """A pool in its own cluster directory, driven through the command line."""

    def __init__(self, scheduler: str, tmp_path: Path):
        self.scheduler = scheduler
        # the directory's name is in the job names: unique per test
        self.dir = tmp_path / f"t{uuid.uuid4().hex[:8]}"
        self.cluster = ClusterDir(path=self.dir)
        self.own_jobs: list[str] = []  # submitted by the test itself
        self.clients: list[cw.Client] = []

    def cli(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "cw", self.scheduler, *args, "--cluster-dir", str(self.dir)]
        p = run(cmd, timeout=timeout, cwd=self.dir.parent)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}\n{self.logs()}")
        return p

    def up(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.cli("up", "--poll", "1", *args, timeout=timeout)

    def down(self, timeout: float = 180) -> subprocess.CompletedProcess:
        return self.cli("down", timeout=timeout, check=False)

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def record(self) -> dict:
        try:
            return json.loads((self.dir / "pool.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def arrays(self) -> list[str]:
        return [a["job"] for a in self.record().get("arrays", ())]

    def client(self, **kw) -> cw.Client:
        c = cw.Client(cluster=str(self.dir), **kw)
        self.clients.append(c)
        return c

    def connected(self) -> list[dict]:
        """Workers connected to the live master (from its status document)."""
        c = self.status().get("connected") or {}
        return c.get("workers") or []

    def wait_workers(self, n: int, timeout: float = 60) -> list[dict]:
        return wait_for(lambda: (lambda ws: ws if len(ws) >= n else None)(self.connected()),
                        timeout=timeout, interval=0.5, what=f"{n} connected workers")  # fmt: skip

    def store(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.cluster.store_path}?mode=ro", uri=True)

    def logs(self) -> str:
        out = []
        for f in sorted((self.dir / "logs").glob("*"))[-8:]:
            text = f.read_text(errors="replace").splitlines()[-15:]
            out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)

    def all_jobs(self) -> list[str]:
        rec = self.record()
        m = rec.get("master") or {}
        return self.arrays() + ([m["job"]] if m.get("job") else []) + self.own_jobs

    def cleanup(self) -> None:
        """`down`, then whatever is still there: by id, by name, and a master run here."""
        for c in self.clients:
            try:
                c.close()
            except Exception:
                pass
        rec = self.record()
        jobs = self.all_jobs()
        if rec:
            try:
                self.down(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        cancel(self.scheduler, jobs + self.by_name())
        m = rec.get("master") or {}
        if m.get("here") and m.get("pid"):
            try:
                os.kill(int(m["pid"]), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def by_name(self) -> list[str]:
        """Jobs whose name carries this pool's directory (submitted by a keeper, say)."""
        return SYSTEMS[self.scheduler].by_name(f"cw-{self.dir.name}-")


def launched(scheduler: str, tmp_path: Path):
    """A fixture body: a Launched pool, cleaned up at teardown."""
    require(scheduler)
    pool = Launched(scheduler, tmp_path)
    try:
        yield pool
    finally:
        pool.cleanup()


def wait_gone(scheduler: str, jobs: list[str], timeout: float = 90) -> None:
    wait_for(lambda: not queued(scheduler, jobs), timeout=timeout, interval=0.5,
             what=f"jobs {jobs} to leave the queue")  # fmt: skip


def worker_of(info: dict) -> tuple[str, str]:
    """(array job id, task index) from a connected worker's batch info."""
    if "SLURM_ARRAY_JOB_ID" in info:
        return info["SLURM_ARRAY_JOB_ID"], info["SLURM_ARRAY_TASK_ID"]
    return info.get("JOB_ID", ""), info.get("SGE_TASK_ID", "")


def hand_env(tmp_path: Path) -> dict:
    """The environment a user of the scripts in slurm/ and sge/ sets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CW_")}
    env.update(CW_HOME=str(tmp_path / "home"), CW_CLUSTER="hand", CW_PYTHON=sys.executable)
    return env


def script(path: str) -> str:
    return str(ROOT / path)


__all__ = ["IN_CI", "SYSTEMS", "Launched", "System", "cancel", "final_state", "hand_env", "launched",
           "logged", "queued", "register", "require", "run", "script", "slow", "square", "submitted_id",
           "wait_for", "wait_gone", "worker_of"]  # fmt: skip
