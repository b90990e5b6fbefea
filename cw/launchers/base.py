"""What a batch system's backend implements: its job environment and its scheduler.

A backend is one module of this package (``slurm.py``, ``sge.py``) that
defines three things, and imports nothing of cw but this module,
:mod:`cw.errors` and :mod:`cw.defaults`:

- a :class:`JobEnvironment` subclass: what a process inside one of its jobs
  knows about that job from its environment variables (identity, CPUs,
  memory, when the allocation ends, and afterwards what became of it);
- a :class:`Scheduler` subclass: the verbs a pool needs (submit the master,
  submit N workers as ONE array job, list the states of its jobs in ONE
  query, cancel), and the options of ``cw <name> up`` as plain :class:`Option`
  data, which ``cw/cli/launch.py`` turns into a command line;
- ``BACKEND = <the Scheduler subclass>``, which the registry
  (:func:`cw.launchers.backends`) looks for.

This module is imported by every worker at start: it stays free of click,
zmq and the rest of cw.
"""

from __future__ import annotations

import abc
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from ..defaults import DEADLINE_CACHE, DRAIN_BEFORE, GRACE, TERM_MARGIN
from ..errors import ConfigError
from ..resources import parse_bytes  # noqa: F401 - the backends' memory parser, from here

log = logging.getLogger(__name__)

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
    log_name: str = "master"  #: a single job's output file is named after it (master-<id>.out)


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
    """The first non-blank line of a command's output, or ''."""
    return text.strip().splitlines()[0] if text.strip() else ""


def positive_int(text: str | None) -> int | None:
    """An environment variable holding a count ('4'), or None if unset or not a positive integer."""
    text = (text or "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def megabytes(n: int) -> str:
    """Bytes as a batch system's memory request: '8192M' (rounded up)."""
    return f"{-(-n // 2**20)}M"


# ------------------------------------------------------------- inside a job
class JobEnvironment(abc.ABC):
    """What a process inside a batch job knows about its job, from its environment.

    One subclass per batch system, in the spirit of submitit's JobEnvironment.
    An instance holds a copy of the variables it was given (``os.environ`` by
    default), so it answers for the job those variables describe: the worker
    builds one for itself; the master rebuilds one from the ``info()`` a
    worker reported (:func:`cw.launchers.environment_of`) to ask what became
    of its job.
    """

    system: ClassVar[str] = ""  #: "slurm", "sge"; the registry's name of the backend
    title: ClassVar[str] = ""  #: for people: "SLURM", "Grid Engine"
    #: The variables :meth:`info` reports; ``activated(info())`` must hold inside a job.
    reported: ClassVar[tuple[str, ...]] = ()

    def __init__(self, env: Mapping[str, str] | None = None):
        self.env: dict[str, str] = dict(os.environ if env is None else env)
        self._deadline: tuple[float, float | None] | None = None  # (asked at, answer)
        self._lock = threading.Lock()

    @classmethod
    @abc.abstractmethod
    def activated(cls, env: Mapping[str, str]) -> bool:
        """True if these variables are those of a job of this batch system.

        Precise enough that no other backend's job passes: the registry asks
        each backend in turn and takes the first that says yes.
        """

    def info(self) -> dict[str, str]:
        """The variables a worker reports to the master (JSON-able): ``activated(info())`` holds."""
        return {k: self.env[k] for k in self.reported if k in self.env}

    def task(self) -> str:
        """The job's id as the batch system spells it ('123_4', '77.3', '123'); '' outside a job."""
        return ""

    def label(self) -> str:
        """'SLURM job 123_4', 'SGE job 77.3': the task with the system's name; '' outside a job."""
        task = self.task()
        return f"{self.system.upper()} job {task}" if task else ""

    def cpus(self) -> int | None:
        """CPUs the job was given for this task, if the environment says."""
        return None

    def memory(self) -> int | None:
        """Bytes of memory the job was given, if the environment says."""
        return None

    def partition(self) -> str | None:
        """The partition or queue the job runs in, if the environment says."""
        return None

    def deadline(self) -> float | None:
        """Epoch time at which this job's allocation ends; None if unlimited or unknown.

        Asked of the batch system at most once per DEADLINE_CACHE seconds per
        instance; each command is bounded by PROBE_TIMEOUT. Never raises: a
        deadline is a hint, and must not stop a worker.
        """
        try:
            with self._lock:
                now = time.monotonic()
                if self._deadline is not None and now - self._deadline[0] < DEADLINE_CACHE:
                    return self._deadline[1]
                answer = self.query_deadline()
                self._deadline = (now, answer)
                return answer
        except Exception as e:
            log.debug("deadline of %s: %r", self.label() or "no batch job", e)
            return None

    def post_mortem(self) -> str | None:
        """One line on what became of this job, e.g.
        ``SLURM job 123_4: OUT_OF_MEMORY, exit code 0:125, after 00:10:02 on node7``.

        From the batch system's accounting where it works, and what is known
        otherwise; None outside a job. Each command is bounded by
        PROBE_TIMEOUT. Never raises: the master asks when it loses a worker.
        """
        try:
            return self.query_post_mortem()
        except Exception as e:
            log.debug("post-mortem of %s: %r", self.label() or "no batch job", e)
            return None

    # -- what a backend implements behind deadline() and post_mortem() ---------------
    def query_deadline(self) -> float | None:
        """Ask the batch system when the allocation ends (may raise; deadline() guards it)."""
        return None

    def query_post_mortem(self) -> str | None:
        """Ask the batch system what became of the job (may raise; post_mortem() guards it)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info()!r})"


class NoBatch(JobEnvironment):
    """A process outside any batch system: no job, no limits, nothing to ask."""

    system = ""
    title = ""

    @classmethod
    def activated(cls, env: Mapping[str, str]) -> bool:
        return True

    def info(self) -> dict[str, str]:
        return {}


# ------------------------------------------------------------ the scheduler
@dataclass(frozen=True)
class Option:
    """One option of ``cw <backend> up``, as data: the command line is built from it."""

    name: str  #: the long flag without its dashes: "cpus-per-task"
    help: str
    type: Any = str  #: str, int, or a tuple of them for several values (nargs > 1)
    default: Any = None
    short: str | None = None  #: "-c"
    metavar: str | None = None
    nargs: int = 1
    min: int | None = None  #: the least value of an int
    show_default: bool = False
    master: bool = False  #: also applies to the master's job (a partition, an account, ...)
    key: str = ""  #: its key in the options dict; default: the name with '_' for '-'

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.name.replace("-", "_"))


class BadOption(ConfigError):
    """A value of an `up` option the scheduler cannot use (``option`` names it)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option  #: the Option's name (its long flag), e.g. "time"


class Scheduler(abc.ABC):
    """The verbs a pool needs from a batch scheduler. One subclass per backend."""

    name: ClassVar[str]  #: the command: ``cw <name> up``
    title: ClassVar[str]  #: for people: "SLURM"
    environment: ClassVar[type[JobEnvironment]]  #: what its jobs know of themselves
    #: The options of ``cw <name> up`` besides the common ones (--workers, --grace, ...).
    options: ClassVar[tuple[Option, ...]] = ()
    #: An example of a valid --time, for the error on a bad one.
    time_example: ClassVar[str] = "4:00:00"

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

    def kill_wait(self) -> float | None:
        """Seconds between the SIGTERM of a plain cancel and the SIGKILL after it (SLURM's
        KillWait); None if there is no such wait, or it cannot be read."""
        return None

    def grace_args(self, grace: float | None) -> list[str]:
        """A worker's --grace (when given) and, when a plain cancel would kill it before its
        grace ends, a --term-grace that leaves it time to hand its running jobs back."""
        out = [] if grace is None else ["--grace", str(grace)]
        wait = self.kill_wait()
        if wait is not None and (GRACE if grace is None else grace) > wait - TERM_MARGIN:
            out += ["--term-grace", str(max(0.0, wait - TERM_MARGIN))]
        return out

    # -- watching -----------------------------------------------------------------
    @abc.abstractmethod
    def tasks(self, jobs: Sequence[str]) -> list[Task] | None:
        """Every task of these jobs the scheduler still lists, in ONE query; None if it
        could not be asked. A task it no longer lists has ended."""

    @abc.abstractmethod
    def cancel(self, jobs: Sequence[str]) -> None:
        """Cancel jobs or single tasks (as :meth:`task_name` spells them)."""

    def drain(self, tasks: Sequence[str]) -> None:
        """Ask running tasks to drain and leave, in ONE call: their workers hand back what
        they hold, let their running jobs finish within their grace, and exit.

        By default a cancel, for schedulers whose cancel sends a signal the
        worker drains on well before the kill (Grid Engine's ``-notify``).
        """
        self.cancel(tasks)

    def named(self, names: Sequence[str]) -> list[Task] | None:
        """This user's jobs with one of these names, in ONE query (their ``job`` is the
        id, ``host`` where they run); None if the scheduler could not be asked."""
        return None

    def task_name(self, job: str, index: int | None) -> str:
        """A job or one task of an array, as the scheduler's commands spell it."""
        return job if index is None else f"{job}_{index}"

    def describe(self, job: str, index: int | None = None) -> str:
        """'SLURM job 123_4', for people."""
        return f"{self.title} job {self.task_name(job, index)}"

    # -- the options of `up` ---------------------------------------------------------
    #: dask-jobqueue's names for options that mean the same here: {their name: our key}.
    jobqueue_names: ClassVar[dict[str, str]] = {}

    @classmethod
    def jobqueue_options(cls, values: Mapping[str, Any]) -> dict:
        """Option values by key (as :meth:`up_options` takes them), from keyword arguments
        named as dask-jobqueue names them (``cores``, ``memory``, ``walltime``, ``queue``,
        ``account``, ``job_extra_directives``) or as this backend's options' keys.

        ``job_extra_directives`` (a list of flags) joins ``extra``. Raises
        :class:`BadOption` for a name the backend does not know, or two names
        given different values for the same option.
        """
        keys = {o.key for o in cls.options}
        out: dict[str, Any] = {}
        extra: list[str] = []
        for name, value in values.items():
            if value is None:
                continue
            key = cls.jobqueue_names.get(name, name)
            if key == "extra":
                extra += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
                continue
            if key not in keys:
                known = sorted(set(cls.jobqueue_names) | keys)
                raise BadOption(name, f"{cls.title} has no option {name!r} (it knows: {', '.join(known)})")
            try:
                value = cls.convert(key, value)
            except (TypeError, ValueError) as e:
                raise BadOption(name, f"{name}={value!r}: {e}") from None
            if key in out and out[key] != value:
                raise BadOption(name, f"{name}={value!r} contradicts another name for the same option ({out[key]!r})")
            out[key] = value
        if extra:
            out["extra"] = " ".join(extra)
        return out

    @classmethod
    def convert(cls, key: str, value: Any) -> Any:
        """A Python value of an option (``memory=8 * 2**30``, ``"8GB"``) as the command line
        would give it; by default unchanged."""
        return value

    def provides(self, options: dict) -> dict:
        """What a worker task with these options offers jobs (cpus, mem in bytes where the
        options say): what an adaptive pool matches queued jobs' requirements against."""
        return {"cpus": self.procs(options)}

    @staticmethod
    def seconds(text: str | None) -> float | None:
        """A time limit ('90', '1:30', '4:00:00') in seconds; None if unlimited.

        Raises ValueError if it is not one. Backends whose format differs override it.
        """
        if not text or text.strip().upper() in ("INFINITY", "UNLIMITED"):
            return None
        parts = [float(x or 0) for x in text.strip().split(":")]
        if len(parts) > 3:
            raise ValueError(text)
        return float(sum(v * 60**i for i, v in enumerate(reversed(parts))))

    @classmethod
    def up_options(cls, values: Mapping[str, Any]) -> dict:
        """The options dict :meth:`submit_workers` reads, from the values of :attr:`options`
        (by their keys).

        Unset values are dropped, several values become a list (the dict is
        kept in pool.json), and a time limit is checked. Raises
        :class:`BadOption` (a ConfigError) for a value the scheduler cannot use.
        """
        declared = {o.key: o for o in cls.options}
        out: dict[str, Any] = {}
        for key, value in values.items():
            if value is None or value == "":
                continue
            o = declared.get(key)
            if o is not None and o.min is not None:
                for v in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(v, int) and v < o.min:
                        raise BadOption(o.name, f"{v} is smaller than {o.min}")
            out[key] = list(value) if isinstance(value, tuple) else value
        if out.get("time"):
            try:
                cls.seconds(out["time"])
            except ValueError:
                flag = declared["time"].name if "time" in declared else "time"
                raise BadOption(flag, f"{out['time']!r} is not a time limit (e.g. {cls.time_example})") from None
        return out

    @classmethod
    def master_options(cls, options: dict, time: str | None = None) -> dict:
        """The options of the master's job: those declared ``master=True``, and its own
        time limit (without one, the longest the queue allows: ``long``)."""
        keys = {o.key for o in cls.options if o.master}
        out = {k: v for k, v in options.items() if k in keys}
        if time:
            out["time"] = time
        else:
            out.pop("time", None)
            out["long"] = True
        return out

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
