"""SLURM: ``cw slurm up | status | down``, and what a process inside a SLURM job knows.

The master runs as its own batch job, with the longest time limit its
partition allows and its store next to master.json; the workers are ONE array
job (``--array=0-N-1%M``), each task running ``python -m cw.worker`` with the
CPUs it was given. ``scancel`` sends SIGTERM, on which a worker drains; each
worker task is also asked to drain (``--signal=B:USR1@S``) before its time limit.

submitit serves here for reading what SLURM prints: :func:`read_job_id`
expands the array ids of squeue and sacct (``123_[4-9%2]``), and
``SlurmInfoWatcher.read_info`` parses sacct's table for the post-mortem.
Submission is a plain ``sbatch`` line: its flags say exactly what is asked.
"""

from __future__ import annotations

import getpass
import os
import shlex
import time
from pathlib import Path
from typing import Mapping, Sequence

from ..defaults import COMMAND_TIMEOUT, PROBE_TIMEOUT, QUERY_TIMEOUT
from ..errors import SchedulerError
from .base import (
    ENDED,
    PENDING,
    RUNNING,
    JobEnvironment,
    JobSpec,
    Option,
    Scheduler,
    Task,
    command,
    first_line,
    megabytes,
    parse_bytes,
    positive_int,
)

# squeue's %T words; every other state is final
_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
# COMPLETING counts as running: the task still holds its node until its processes are gone
_RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING",
            "SIGNALING", "STAGE_OUT"}  # fmt: skip


def seconds(text: str | None) -> float | None:
    """A SLURM time ('30', '30:00', '4:00:00', '2-12', '2-12:00:00') in seconds; None if unlimited."""
    if not text:
        return None
    t = text.strip()
    if t.upper() in ("UNLIMITED", "INFINITE", "NOT_SET", "INVALID", "N/A", "NONE"):
        return None
    days = 0
    if "-" in t:
        d, t = t.split("-", 1)
        days = int(d)
        parts = [int(x) for x in t.split(":")]  # days-hours[:minutes[:seconds]]
        parts += [0] * (3 - len(parts))
        h, m, s = parts
    else:
        parts = [int(x) for x in t.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0  # minutes
        elif len(parts) == 2:
            h, (m, s) = 0, parts  # minutes:seconds
        else:
            h, m, s = parts
    return float(days * 86400 + h * 3600 + m * 60 + s)


def _clean_env() -> dict:
    """This environment without the variables of a SLURM job we may be running in.

    A job submitted from a job (the keeper, beside the master) would otherwise
    inherit its allocation's settings, e.g. SLURM_CPUS_PER_TASK or
    SLURM_MEM_PER_NODE (submitit.helpers.clean_env does the same, in place).
    SLURM_CONF stays: it tells sbatch where the cluster is.
    """
    if "SLURM_JOB_ID" not in os.environ:
        return dict(os.environ)
    return {k: v for k, v in os.environ.items()
            if k == "SLURM_CONF" or not k.startswith(("SLURM_", "SLURMD_", "SRUN_"))}  # fmt: skip


class SlurmEnvironment(JobEnvironment):
    """A process inside a SLURM job: ``SLURM_JOB_ID`` and its companions."""

    system = "slurm"
    title = "SLURM"
    reported = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")

    @classmethod
    def activated(cls, env: Mapping[str, str]) -> bool:
        return bool(env.get("SLURM_JOB_ID"))

    def task(self) -> str:
        array = self.env.get("SLURM_ARRAY_JOB_ID")
        if array:
            return f"{array}_{self.env.get('SLURM_ARRAY_TASK_ID', '?')}"
        return self.env.get("SLURM_JOB_ID", "")

    def cpus(self) -> int | None:
        return positive_int(self.env.get("SLURM_CPUS_PER_TASK"))

    def memory(self) -> int | None:
        mb = positive_int(self.env.get("SLURM_MEM_PER_NODE"))  # in MB
        return None if mb is None else mb * 1024 * 1024

    def partition(self) -> str | None:
        return self.env.get("SLURM_JOB_PARTITION") or None

    def query_deadline(self) -> float | None:
        end = self.env.get("SLURM_JOB_END_TIME", "")
        if end.isdigit():
            return float(end)
        jid = self.env.get("SLURM_JOB_ID")
        if not jid:
            return None
        rc, out, _ = command(["squeue", "-h", "-j", jid, "-o", "%e|%L"], PROBE_TIMEOUT)
        if rc != 0 or "|" not in out:
            return None
        end_text, left = out.strip().splitlines()[0].split("|", 1)
        try:  # %e: the end, in local time
            return time.mktime(time.strptime(end_text.strip(), "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            pass
        try:  # %L: time left
            left_s = seconds(left)
        except ValueError:
            return None
        return None if left_s is None else time.time() + left_s

    def query_post_mortem(self) -> str | None:
        jid = self.env.get("SLURM_JOB_ID")
        array, index = self.env.get("SLURM_ARRAY_JOB_ID"), self.env.get("SLURM_ARRAY_TASK_ID")
        name = f"{array}_{index}" if array and index is not None else jid
        if not name:
            return None
        label = f"SLURM job {name}"
        rc, out, err = command(["sacct", "-P", "-j", name, "-o", "JobID,State,ExitCode,Elapsed,NodeList,MaxRSS"],
                               PROBE_TIMEOUT)  # fmt: skip
        if rc == 0:
            line = _sacct_line(out, name)
            if line:
                return f"{label}: {line}"
        acct = first_line(err or out) or "no record"
        # without accounting, slurmctld still knows a job for MinJobAge after it ended
        rc2, out2, err2 = command(["squeue", "-h", "-t", "all", "-j", name, "-o", "%T|%r|%N|%M"],
                                  PROBE_TIMEOUT)  # fmt: skip
        if rc2 == 0 and out2.strip():
            state, reason, node, elapsed = (out2.strip().splitlines()[0].split("|") + ["", "", ""])[:4]
            why = f" ({reason})" if reason and reason not in ("None", "(null)") else ""
            return f"{label}: {state}{why} after {elapsed} on {node} (sacct: {acct})"
        where = f"array job {array}, index {index}" if array else f"job {jid}"
        return f"{label}: state unknown ({where}; sacct: {acct}; squeue: {first_line(err2) or 'no record'})"


class Slurm(Scheduler):
    name = "slurm"
    title = "SLURM"
    environment = SlurmEnvironment
    seconds = staticmethod(seconds)
    time_example = "4:00:00 or 2-00:00:00"
    options = (
        Option("partition", "Partition of the jobs (default: the cluster's).", short="-p", master=True),
        Option("time", "Time limit of each worker task, e.g. 4:00:00.", short="-t"),
        Option("cpus-per-task", "CPUs per worker task; the worker runs as many executor processes.",
               type=int, default=1, short="-c", min=1, show_default=True),
        Option("mem", "Memory per worker task, e.g. 4G."),
        Option("account", "Account to charge.", short="-A", master=True),
        Option("extra-sbatch", "More sbatch flags for every job, e.g. \"--qos=long --constraint=skylake\".",
               metavar="FLAGS", master=True, key="extra"),
    )  # fmt: skip
    jobqueue_names = {"cores": "cpus_per_task", "job_cpu": "cpus_per_task", "memory": "mem", "job_mem": "mem",
                      "walltime": "time", "queue": "partition", "project": "account",
                      "job_extra_directives": "extra", "job_extra": "extra"}  # fmt: skip

    @classmethod
    def convert(cls, key, value):
        if key == "mem":  # sbatch's unit is the megabyte
            return megabytes(parse_bytes(value, "M"))
        if key == "cpus_per_task":
            return int(value)
        return value

    def provides(self, options: dict) -> dict:
        out = super().provides(options)
        if options.get("mem"):
            try:
                out["mem"] = parse_bytes(options["mem"], "M")
            except ValueError:
                pass  # sbatch will say what is wrong with it
        return out

    # -- submission ---------------------------------------------------------------
    def _sbatch(self, flags: list[str], script: Path) -> str:
        rc, out, err = command(["sbatch", "--parsable", *flags, str(script)], COMMAND_TIMEOUT, _clean_env())
        if rc != 0:
            raise SchedulerError(f"sbatch failed: {err or out or f'exit code {rc}'}")
        job = out.strip().split(";")[0]  # 'ID' or 'ID;cluster'
        if not job.isdigit():
            raise SchedulerError(f"sbatch printed no job id: {out.strip()!r}")
        return job

    @staticmethod
    def _common(spec: JobSpec) -> list[str]:
        o = spec.options
        flags = [f"--job-name={spec.name}", f"--chdir={spec.workdir}", "--ntasks=1"]
        if o.get("partition"):
            flags.append(f"--partition={o['partition']}")
        if o.get("account"):
            flags.append(f"--account={o['account']}")
        return flags

    def submit_master(self, script: Path, spec: JobSpec) -> str:
        o = spec.options
        flags = self._common(spec) + [f"--output={spec.logs}/{spec.log_name}-%j.out", "--cpus-per-task=1"]
        limit = o.get("time") or (self.partition_limit(o.get("partition")) if o.get("long") else None)
        if limit:
            flags.append(f"--time={limit}")
        flags += shlex.split(o.get("extra") or "")
        return self._sbatch(flags, script)

    def submit_workers(self, script: Path, count: int, spec: JobSpec) -> str:
        o = spec.options
        array = f"0-{count - 1}"
        if o.get("array_parallelism"):
            array += f"%{o['array_parallelism']}"
        flags = self._common(spec) + [
            f"--array={array}",
            f"--output={spec.logs}/worker-%A_%a.out",
            f"--cpus-per-task={self.procs(o)}",
            # B: the batch shell, which exec's the worker: it drains on USR1
            f"--signal=B:USR1@{self.drain_before(seconds(o.get('time')), o.get('grace'))}",
        ]
        if o.get("time"):
            flags.append(f"--time={o['time']}")
        if o.get("mem"):
            flags.append(f"--mem={o['mem']}")
        flags += shlex.split(o.get("extra") or "")
        return self._sbatch(flags, script)

    def procs(self, options: dict) -> int:
        return int(options.get("cpus_per_task") or 1)

    def partition_limit(self, partition: str | None) -> str | None:
        """The longest time limit of a partition (the default one if None): for the master."""
        rc, out, _ = command(["sinfo", "-h", "-o", "%P %l", *(["-p", partition] if partition else [])],
                             QUERY_TIMEOUT)  # fmt: skip
        if rc != 0:
            return None
        rows = [line.split() for line in out.splitlines() if len(line.split()) == 2]
        for name, limit in rows:
            if partition is None and not name.endswith("*"):
                continue
            return "UNLIMITED" if limit.lower() in ("infinite", "unlimited") else limit
        return None

    # -- watching -----------------------------------------------------------------
    def tasks(self, jobs: Sequence[str]) -> list[Task] | None:
        if not jobs:
            return []
        # -r: one line per array task, pending ones too; -t all: ended ones while
        # slurmctld keeps them (MinJobAge), with their final state
        rc, out, err = command(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(jobs),
                                "-o", "%i|%T|%r|%N"], QUERY_TIMEOUT)  # fmt: skip
        if rc != 0:
            if "Invalid job id" in err:  # all of them purged: ended long ago
                return []
            return None
        return _squeue_tasks(out)

    def named(self, names: Sequence[str]) -> list[Task] | None:
        if not names:
            return []
        rc, out, _ = command(["squeue", "-h", "-u", getpass.getuser(), "-n", ",".join(names),
                              "-o", "%i|%T|%r|%N"], QUERY_TIMEOUT)  # fmt: skip
        return _squeue_tasks(out) if rc == 0 else None

    def kill_wait(self) -> float | None:
        """KillWait, from `scontrol show config`: what a plain scancel leaves a worker."""
        rc, out, _ = command(["scontrol", "show", "config"], QUERY_TIMEOUT)
        for line in out.splitlines() if rc == 0 else ():
            name, _, value = line.partition("=")
            if name.strip() == "KillWait":
                try:
                    return float(value.split()[0])
                except (IndexError, ValueError):
                    return None
        return None

    def cancel(self, jobs: Sequence[str]) -> None:
        if not jobs:
            return
        rc, out, err = command(["scancel", *jobs], COMMAND_TIMEOUT)
        if rc != 0 and "already completing" not in err and "Invalid job id" not in err:
            raise SchedulerError(f"scancel {' '.join(jobs)} failed: {err or out}")

    def drain(self, tasks: Sequence[str]) -> None:
        """USR1 to the batch step alone (the worker, which the job script exec'd): it drains
        and leaves by itself, with its grace, and no SIGKILL follows KillWait later."""
        if not tasks:
            return
        rc, out, err = command(["scancel", "--batch", "--signal=USR1", *tasks], COMMAND_TIMEOUT)
        if rc != 0 and "already completing" not in err and "Invalid job id" not in err:
            raise SchedulerError(f"scancel --batch --signal=USR1 {' '.join(tasks)} failed: {err or out}")


def _squeue_tasks(out: str) -> list[Task]:
    """Tasks from squeue's ``%i|%T|%r|%N`` lines; array ranges ('123_[4-9%2]') expanded."""
    from submitit.slurm.slurm import read_job_id

    out_tasks = []
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        jid, state, reason, node = parts
        base = state.split()[0].rstrip("+") if state else ""
        kind = PENDING if base in _PENDING else RUNNING if base in _RUNNING else ENDED
        reason = "" if reason in ("None", "(null)") else reason
        try:
            ids = read_job_id(jid)
        except (ValueError, IndexError):
            continue
        for main, *rng in ids:
            if not rng:
                idx: list[int | None] = [None]
            else:
                lo = int(rng[0])
                idx = list(range(lo, int(rng[1]) + 1)) if len(rng) > 1 else [lo]
            for i in idx:
                out_tasks.append(Task(main, i, kind, base, reason, node, base == "COMPLETING"))
    return out_tasks




def _sacct_line(out: str, name: str) -> str | None:
    """'OUT_OF_MEMORY, exit code 0:125, after 00:10:02 on node7, max RSS 3.9G' from sacct -P."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    stats = SlurmInfoWatcher().read_info(out)
    row = stats.get(name)
    if not row:
        return None
    rss = []
    for line in out.splitlines()[1:]:  # MaxRSS lives on the steps (123_4.batch)
        cells = line.split("|")
        if cells and cells[0].startswith(f"{name}.") and len(cells) >= 6 and cells[5]:
            rss.append(cells[5])
    text = row.get("State", "?")
    if row.get("ExitCode"):
        text += f", exit code {row['ExitCode']}"
    if row.get("Elapsed"):
        text += f", after {row['Elapsed']}"
    if row.get("NodeList") and row["NodeList"] not in ("None assigned",):
        text += f" on {row['NodeList']}"
    if rss:
        text += f", max RSS {max(rss, key=_size)}"
    return text


def _size(text: str) -> float:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        return 0.0


BACKEND = Slurm
