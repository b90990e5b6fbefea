"""Grid Engine: ``cw sge up | status | down``, and what a process inside a Grid Engine job knows.

The master runs as its own job (or here, with ``--master-here``); the workers
are ONE array job, ``qsub -t 1-N -tc M``, each task running ``python -m
cw.worker`` with the slots it was given (``--pe smp C``). Grid Engine's
habits, all followed here:

- always ``-N`` (a bad or missing job name fails obscurely) and ``-terse``
  (the job id alone on stdout);
- scripts run by ``-S /bin/bash`` with the interpreter's absolute path: jobs
  do not inherit the submitter's environment (what cw needs is passed with
  ``-v``), and jobs of root lose TMPDIR and LD_*;
- ``-notify``: qdel sends SIGUSR2, then SIGKILL after the queue's notify time;
  the worker drains on SIGUSR2. With ``--time``, ``s_rt`` sends SIGUSR1 (drain)
  before ``h_rt`` kills;
- ``qacct -j`` for the post-mortem (exit status, failed code, maxvmem).
"""

from __future__ import annotations

import getpass
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..defaults import COMMAND_TIMEOUT, PROBE_TIMEOUT, QUERY_TIMEOUT
from ..errors import SchedulerError
from .base import (
    ENDED,
    PENDING,
    RUNNING,
    BadOption,
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


def seconds(text: str | None) -> float | None:
    """A Grid Engine time ('3600', '1:00:00', '0:90:0') in seconds; None if unlimited."""
    if not text or text.strip().upper() in ("INFINITY", "UNLIMITED"):
        return None
    parts = [float(x or 0) for x in text.strip().split(":")]
    if len(parts) > 3:
        raise ValueError(text)
    return float(sum(v * 60**i for i, v in enumerate(reversed(parts))))


def _hms(secs: float) -> str:
    s = int(secs)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def indices(text: str | None) -> list[int | None]:
    """qstat's task column: '' (not an array), '3', '2-8:1', '1,4-6:1'."""
    if not text:
        return [None]
    out: list[int | None] = []
    for part in text.split(","):
        rng, _, step = part.partition(":")
        lo, _, hi = rng.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1, int(step or 1)))
    return out


def _state(code: str) -> str:
    """PENDING / RUNNING / ENDED from qstat's state letters (qw, hqw, r, t, dr, Eqw, ...)."""
    if "E" in code:
        return ENDED  # an error state: the task will never run by itself
    if "d" in code:  # being deleted: it holds its slot until the notify time is up
        return RUNNING if any(c in code for c in "rtRsST") else ENDED
    if "q" in code or "w" in code:
        return PENDING
    return RUNNING


def _qstat_xml(args: list[str], timeout: float) -> ET.Element | None:
    """qstat's XML answer, parsed; None if qstat failed or said something else."""
    rc, out, _ = command(["qstat", "-xml", *args], timeout)
    if rc != 0:
        return None
    try:
        return ET.fromstring(out)
    except ET.ParseError:
        return None


class SGEEnvironment(JobEnvironment):
    """A process inside a Grid Engine job: ``JOB_ID`` and ``SGE_TASK_ID``.

    Grid Engine sets ``SGE_TASK_ID`` in every job ('undefined' when the job
    is not an array), so the pair names its jobs and no other's.
    """

    system = "sge"
    title = "Grid Engine"
    reported = ("JOB_ID", "SGE_TASK_ID")

    @classmethod
    def activated(cls, env: Mapping[str, str]) -> bool:
        return env.get("JOB_ID", "").isdigit() and "SGE_TASK_ID" in env

    def _task_id(self) -> str | None:
        task = self.env.get("SGE_TASK_ID")
        return task if task and task != "undefined" else None

    def task(self) -> str:
        jid = self.env.get("JOB_ID", "")
        task = self._task_id()
        return f"{jid}.{task}" if jid and task else jid

    def cpus(self) -> int | None:
        return positive_int(self.env.get("NSLOTS"))

    def partition(self) -> str | None:
        return self.env.get("QUEUE") or None

    # memory(): None. h_vmem is a limit per slot that Grid Engine exports in no
    # variable; the worker then reports the host's memory.

    def query_deadline(self) -> float | None:
        jid = self.env.get("JOB_ID", "")
        if not jid.isdigit():
            return None
        root = _qstat_xml(["-j", jid], PROBE_TIMEOUT)
        if root is None:
            return None
        limit = None
        for req in root.iter("qstat_l_requests"):
            if req.findtext("CE_name") == "h_rt":
                limit = float(req.findtext("CE_doubleval") or 0) or None
        if limit is None:
            limit = _queue_limit(self.env.get("QUEUE"))
        if limit is None:
            return None
        task = self.env.get("SGE_TASK_ID", "")
        starts = {}
        for t in root.iter("ulong_sublist"):
            n, start = t.findtext("JAT_task_number"), t.findtext("JAT_start_time")
            if n and start and start.isdigit():
                starts[n] = float(start)
        start = starts.get(task) or (min(starts.values()) if starts else None)
        return None if not start else start + limit

    def query_post_mortem(self) -> str | None:
        jid = self.env.get("JOB_ID")
        if not jid:
            return None
        task = self._task_id()
        label = f"SGE job {jid}{f'.{task}' if task else ''}"
        rc, out, err = command(["qacct", "-j", jid, *(["-t", task] if task else [])], PROBE_TIMEOUT)
        if rc != 0 or "exit_status" not in out:
            return f"{label}: no accounting record (qacct: {first_line(err or out) or f'exit code {rc}'})"
        rec: dict[str, str] = {}
        for line in out.splitlines():
            if line.startswith("====") and rec:
                break  # the first record is enough
            key, _, value = line.partition(" ")
            if key and value.strip():
                rec.setdefault(key, " ".join(value.split()))
        text = f"{label}: exit status {rec.get('exit_status', '?')}, failed {rec.get('failed', '?')}"
        if rec.get("maxvmem"):
            text += f", maxvmem {rec['maxvmem']}"
        if rec.get("ru_wallclock"):
            text += f", after {rec['ru_wallclock']}"
        if rec.get("hostname"):
            text += f" on {rec['hostname']}"
        return text


def _queue_limit(queue: str | None) -> float | None:
    """The h_rt of a queue (qconf -sq), in seconds; None if unlimited or unknown."""
    if not queue:
        return None
    rc, out, _ = command(["qconf", "-sq", queue], PROBE_TIMEOUT)
    for line in out.splitlines() if rc == 0 else ():
        key, _, value = line.partition(" ")
        if key == "h_rt":
            try:
                return seconds(value.strip())
            except ValueError:
                return None
    return None


class SGE(Scheduler):
    name = "sge"
    title = "Grid Engine"
    environment = SGEEnvironment
    seconds = staticmethod(seconds)
    time_example = "4:00:00 or 14400"
    options = (
        Option("queue", "Queue of the jobs (default: the cluster's).", short="-q", master=True),
        Option("pe", "Parallel environment and slots per worker, e.g. --pe smp 4; the worker"
                     " runs as many executor processes.", type=(str, int), nargs=2, min=1,
               metavar="NAME SLOTS"),
        Option("time", "h_rt of each worker task, e.g. 4:00:00."),
        Option("mem", "h_vmem of each worker task, e.g. 4G."),
        Option("extra-qsub", "More qsub flags for every job, e.g. \"-P myproject -l arch=lx-amd64\".",
               metavar="FLAGS", master=True, key="extra"),
    )  # fmt: skip
    jobqueue_names = {"walltime": "time", "job_extra_directives": "extra", "job_extra": "extra"}
    #: The parallel environment of ``cores=N`` when none is named (``pe="mpi"``).
    default_pe = "smp"

    @classmethod
    def jobqueue_options(cls, values: Mapping[str, Any]) -> dict:
        """As the base's, and: ``cores=N`` asks for N slots of a parallel environment
        (``pe="name"``, default smp); ``memory`` is the task's total, which becomes
        ``h_vmem`` per slot; ``project`` is ``-P``, ``account`` ``-A``, ``resource_spec``
        one more ``-l``."""
        v = dict(values)
        cores, pe, memory = v.pop("cores", None), v.pop("pe", None), v.pop("memory", None)
        flags = [f"{flag} {v.pop(name)}" for name, flag in (("project", "-P"), ("account", "-A"),
                                                           ("resource_spec", "-l")) if v.get(name)]  # fmt: skip
        v.pop("project", None), v.pop("account", None), v.pop("resource_spec", None)
        out = super().jobqueue_options(v)
        if pe is not None and not isinstance(pe, str):  # the command line's form: ("smp", 4)
            out["pe"] = [str(pe[0]), int(pe[1])]
        if cores is not None and (int(cores) > 1 or isinstance(pe, str)):
            out["pe"] = [pe if isinstance(pe, str) else cls.default_pe, int(cores)]
        if memory is not None:
            slots = int(out["pe"][1]) if out.get("pe") else 1
            try:
                out["mem"] = megabytes(parse_bytes(memory) // slots)
            except ValueError as e:
                raise BadOption("memory", str(e)) from None
        if flags:
            out["extra"] = " ".join(filter(None, [out.get("extra"), *flags]))
        return out

    @classmethod
    def convert(cls, key, value):
        if key == "mem" and isinstance(value, (int, float)):
            return megabytes(int(value))
        return value

    def provides(self, options: dict) -> dict:
        out = super().provides(options)
        if options.get("mem"):  # h_vmem counts per slot
            try:
                out["mem"] = parse_bytes(options["mem"]) * self.procs(options)
            except ValueError:
                pass  # qsub will say what is wrong with it
        return out

    # -- submission ---------------------------------------------------------------
    def _qsub(self, flags: list[str], script: Path) -> str:
        rc, out, err = command(["qsub", "-terse", *flags, str(script)], COMMAND_TIMEOUT)
        if rc != 0:
            raise SchedulerError(f"qsub failed: {err or out or f'exit code {rc}'}")
        job = out.strip().split(".")[0]  # '12' or, for an array, '12.1-4:1'
        if not job.isdigit():
            raise SchedulerError(f"qsub printed no job id: {out.strip()!r}")
        return job

    def _common(self, spec: JobSpec) -> list[str]:
        o = spec.options
        flags = ["-N", spec.name, "-S", "/bin/bash", "-wd", spec.workdir, "-j", "y", "-notify"]
        env = self.passed_env()
        bad = [k for k, v in env.items() if "," in v]
        env = {k: v for k, v in env.items() if k not in bad}  # -v splits on commas
        if env:
            flags += ["-v", ",".join(f"{k}={v}" for k, v in env.items())]
        if o.get("queue"):
            flags += ["-q", o["queue"]]
        return flags

    def submit_master(self, script: Path, spec: JobSpec) -> str:
        o = spec.options
        flags = self._common(spec) + ["-o", f"{spec.logs}/{spec.log_name}.$JOB_ID.out"]
        if o.get("time"):  # else the queue's h_rt: the longest it allows
            flags += ["-l", f"h_rt={o['time']}"]
        flags += shlex.split(o.get("extra") or "")
        return self._qsub(flags, script)

    def submit_workers(self, script: Path, count: int, spec: JobSpec) -> str:
        o = spec.options
        flags = self._common(spec) + ["-t", f"1-{count}", "-o", f"{spec.logs}/worker.$JOB_ID.$TASK_ID.out"]
        if o.get("array_parallelism"):
            flags += ["-tc", str(o["array_parallelism"])]
        if o.get("pe"):
            flags += ["-pe", o["pe"][0], str(o["pe"][1])]
        resources = []
        if o.get("time"):
            limit = seconds(o["time"])
            resources.append(f"h_rt={o['time']}")
            if limit:  # SIGUSR1 this long before h_rt: the worker drains
                resources.append(f"s_rt={_hms(limit - self.drain_before(limit, o.get('grace')))}")
        if o.get("mem"):
            resources.append(f"h_vmem={o['mem']}")
        if resources:
            flags += ["-l", ",".join(resources)]
        flags += shlex.split(o.get("extra") or "")
        return self._qsub(flags, script)

    def procs(self, options: dict) -> int:
        pe = options.get("pe")
        return int(pe[1]) if pe else 1

    # -- watching -----------------------------------------------------------------
    def tasks(self, jobs: Sequence[str]) -> list[Task] | None:
        if not jobs:
            return []
        # one qstat for all of this user's jobs; ours are picked out here.
        # Grid Engine lists no finished task: those are ENDED by absence
        root = _qstat_xml(["-u", getpass.getuser()], QUERY_TIMEOUT)
        if root is None:
            return None
        wanted = set(jobs)
        found = []
        for j in root.iter("job_list"):
            job = (j.findtext("JB_job_number") or "").strip()
            if job not in wanted:
                continue
            code = (j.findtext("state") or "").strip()
            host = (j.findtext("queue_name") or "").partition("@")[2]
            try:
                idx = indices((j.findtext("tasks") or "").strip())
            except ValueError:
                continue
            for i in idx:
                found.append(Task(job, i, _state(code), code, "", host, "d" in code))
        return found

    def task_name(self, job: str, index: int | None) -> str:
        return job if index is None else f"{job}.{index}"

    def cancel(self, jobs: Sequence[str]) -> None:
        if not jobs:
            return
        # ONE call: qdel takes a list of jobs and tasks, '77,78.3,78.5'
        rc, out, err = command(["qdel", ",".join(jobs)], COMMAND_TIMEOUT)
        text = f"{out} {err}"
        if rc != 0 and not all(("does not exist" in line or "already" in line or "registered" in line)
                               for line in text.strip().splitlines() if line.strip()):  # fmt: skip
            raise SchedulerError(f"qdel {','.join(jobs)} failed: {err or out}")

    def named(self, names: Sequence[str]) -> list[Task] | None:
        root = _qstat_xml(["-u", getpass.getuser()], QUERY_TIMEOUT)
        if root is None:
            return None
        found = []
        for j in root.iter("job_list"):
            if (j.findtext("JB_name") or "").strip() in names:
                code = (j.findtext("state") or "").strip()
                host = (j.findtext("queue_name") or "").partition("@")[2]
                found.append(Task((j.findtext("JB_job_number") or "").strip(), None, _state(code), code, "", host))
        return found


BACKEND = SGE
