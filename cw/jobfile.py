"""Job files and job sets: many runs of programs, read from a file (`cw run-file`).

A **job file** holds one shell command a line, as disBatch's or GNU
parallel's do; blank lines and ``#`` comments are skipped. Each line is a job
keyed by its line number and its text, so that re-running the file in the
same run runs only what has not succeeded.

A **job set** (YAML, in the spirit of distribute's) names its run, the
capabilities its jobs require, a ``setup`` script each worker runs once
before its first job of the run, and its jobs: each a name (its key), a
command or a Python callable by import path, input files copied into the
job's scratch directory, and output globs archived after it. ``cw template``
prints :data:`TEMPLATE`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError, OutputsPatternError
from .job import check_globs
from .resources import requirements

TEMPLATE = """\
# A cw job set: `cw run-file this.yaml` runs it; again, it runs only what has not succeeded.
run: foam-sweep                 # the run's name: results, joblog and outputs are kept under it

requires:                       # what every job needs of a worker (omit what you do not need)
  tags: [openfoam]              #   workers started with --tag openfoam
  mem: 4G                       #   reserved per job while it runs
  # gpus: 1                     #   each job sees its own device (CUDA_VISIBLE_DEVICES)

retries: 2                      # times a job may lose its worker (default 3)
timeout: 2h                     # each job is killed past this (90, 30m, 2h, 1:30:00)

# Run once on each worker, before its first job of this run, in a directory kept for
# the worker's life ($CW_SETUP_DIR, which jobs see too). If it fails, the set stops,
# with its stderr, once.
setup: |
  cp -r "$CW_JOBSET_DIR/mesh" "$CW_SETUP_DIR/"

jobs:                           # each job runs in a scratch directory of its own, wiped after it
  - name: case-1                # the job's key in the run (unique)
    command: simpleFoam -case "$CW_SETUP_DIR/mesh" -parameters params.txt
    inputs: [cases/1/params.txt]    # copied into the job's directory by base name (paths from this file's)
    outputs: ["*.csv", "log.*"]     # archived under the run and the name: `cw pull foam-sweep DEST`
  - name: case-2
    command: ["simpleFoam", "-parameters", "params.txt"]   # an argv list: no shell, so no $VARIABLES
    inputs: [cases/2/params.txt]
    outputs: ["*.csv"]
  - name: summary
    function: mypackage.post:summarize   # a Python callable, by import path
    args: [foam-sweep]
    kwargs: {plots: true}
    outputs: ["*.png"]
"""


@dataclass
class JobSpec:
    """One job of a job file or set."""

    key: str  #: its identity in the run: the line number and text, or the name
    command: Any = None  #: a command line or an argv list
    function: Optional[str] = None  #: "package.module:callable"
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)  #: absolute paths
    outputs: list = field(default_factory=list)  #: globs
    line: int = 0  #: where it is in its file


@dataclass
class JobSet:
    """What a job set file says (a job file is one with commands alone)."""

    path: Path
    jobs: list[JobSpec]
    run: Optional[str] = None
    requires: Optional[dict] = None
    setup: Optional[str] = None
    retries: Optional[int] = None
    timeout: Optional[str] = None
    is_set: bool = False  #: a YAML job set (its jobs run in scratch directories)


def read(path: str | os.PathLike) -> JobSet:
    """A job file or a job set (``.yaml``/``.yml``), checked; ConfigError says where it is wrong."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p} is not a text file: {e}") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        return parse_set(text, p)
    return parse_lines(text, p)


def parse_lines(text: str, path: Path) -> JobSet:
    """One command a line; blank lines and ``#`` comments are skipped."""
    jobs = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            jobs.append(JobSpec(key=f"{n}: {line}", command=line, line=n))
    if not jobs:
        raise ConfigError(f"{path} holds no command (one a line; blank lines and # comments are skipped)")
    return JobSet(path=path, jobs=jobs)


_FIELDS = {"run", "requires", "setup", "retries", "timeout", "jobs"}
_JOB_FIELDS = {"name", "command", "function", "args", "kwargs", "inputs", "outputs"}
_CALLABLE = re.compile(r"[A-Za-z_][\w.]*[:.][A-Za-z_]\w*")


def parse_set(text: str, path: Path) -> JobSet:
    """A YAML job set (see :data:`TEMPLATE`)."""
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a job set is a mapping with `run`, `jobs`... (`cw template` shows one)")
    unknown = set(doc) - _FIELDS
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}; a job set has {', '.join(sorted(_FIELDS))}")
    if not isinstance(doc.get("jobs"), list) or not doc["jobs"]:
        raise ConfigError(f"{path}: `jobs` must be a list of jobs (`cw template` shows one)")
    for k, t in (("run", str), ("setup", str), ("requires", dict), ("retries", int)):
        if doc.get(k) is not None and not isinstance(doc[k], t):
            raise ConfigError(f"{path}: `{k}` must be a {t.__name__}, not {doc[k]!r}")
    retries = doc.get("retries")
    if retries is not None and (isinstance(retries, bool) or retries < 0):
        raise ConfigError(f"{path}: `retries` must be a whole number, 0 or more, not {retries!r}")
    try:
        requirements(doc.get("requires"))  # what each job will be submitted with: checked now
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    timeout = doc.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (str, int, float))
                                or (not isinstance(timeout, str) and timeout <= 0)):
        raise ConfigError(f"{path}: `timeout` is a duration (90, 30m, 2h, 1:30:00), not {timeout!r}")
    base = path.resolve().parent
    jobs, names = [], set()
    for i, j in enumerate(doc["jobs"], 1):
        where = f"{path}: job {i}"
        if not isinstance(j, dict):
            raise ConfigError(f"{where} is not a mapping (name, command or function, inputs, outputs)")
        if set(j) - _JOB_FIELDS:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(set(j) - _JOB_FIELDS))}")
        name = j.get("name")
        if not isinstance(name, (str, int)) or str(name) == "":
            raise ConfigError(f"{where} has no `name` (its key in the run)")
        name = str(name)
        if name in names:
            raise ConfigError(f"{where}: the name {name!r} is taken by an earlier job")
        names.add(name)
        where = f"{path}: job {name!r}"
        cmd, fn = j.get("command"), j.get("function")
        if (cmd is None) == (fn is None):
            raise ConfigError(f"{where} needs a `command` or a `function` (one of them)")
        if cmd is not None and not (isinstance(cmd, str) or (isinstance(cmd, list) and cmd and all(isinstance(a, (str, int, float)) for a in cmd))):
            raise ConfigError(f"{where}: `command` is a command line or a list of arguments")
        if fn is not None and not (isinstance(fn, str) and _CALLABLE.fullmatch(fn)):
            raise ConfigError(f"{where}: `function` is an import path, e.g. package.module:function")
        if cmd is not None and ("args" in j or "kwargs" in j):
            raise ConfigError(f"{where}: `args` and `kwargs` are for a function; put arguments in the command")
        args, kwargs = j.get("args") or [], j.get("kwargs") or {}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ConfigError(f"{where}: `args` is a list and `kwargs` a mapping")
        lists = {}
        for k in ("inputs", "outputs"):
            v = j.get(k) or []
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
                raise ConfigError(f"{where}: `{k}` is a list of paths")
            lists[k] = v
        try:
            check_globs(lists["outputs"])
        except OutputsPatternError as e:
            raise ConfigError(f"{where}: {e}") from None
        inputs = [str(base / x) for x in lists["inputs"]]
        missing = [x for x in inputs if not os.path.exists(x)]
        if missing:
            raise ConfigError(f"{where}: input(s) not found: {', '.join(missing)}")
        seen: dict[str, str] = {}
        for given, full in zip(lists["inputs"], inputs):  # each is copied in by its base name
            other = seen.setdefault(Path(full).name, given)
            if other != given:
                raise ConfigError(f"{where}: inputs {other} and {given} would both be copied to"
                                  f" {Path(full).name}: give each a name of its own (or put them in a directory)")
        jobs.append(JobSpec(key=name, command=[str(a) for a in cmd] if isinstance(cmd, list) else cmd,
                            function=fn, args=args, kwargs=kwargs, inputs=inputs, outputs=lists["outputs"],
                            line=i))  # fmt: skip
    return JobSet(path=path, jobs=jobs, run=doc.get("run"), requires=doc.get("requires"),
                  setup=doc.get("setup"), retries=doc.get("retries"),
                  timeout=None if timeout is None else str(timeout), is_set=True)  # fmt: skip
