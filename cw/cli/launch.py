"""``cw <backend> up | status | down``: one command group per batch system in the registry.

Each group is built from its backend's :class:`~cw.launchers.base.Scheduler`:
its name and title, and its ``up`` options, declared there as plain
:class:`~cw.launchers.base.Option` data. The verbs themselves are
:class:`~cw.launchers.pool.Pool`'s; this module only parses, prints and turns
cw's errors into click's.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import click

from ..defaults import ADAPT_IDLE_TIMEOUT, DOWN_WAIT, HEALS_PER_WORKER, POLL, UP_WAIT
from ..errors import ConfigError, CwError
from ..launchers import backends, environment_of
from ..launchers.base import BadOption, Option, Scheduler
from .common import (
    CLUSTER_OPTIONS,
    cluster_from,
    log_option,
    parse_duration,
    setup_logging,
    with_options,
)

log = logging.getLogger(__name__)

_COMMON = [*CLUSTER_OPTIONS, log_option]

#: Parameters of `up` every backend shares: a backend's option keys must differ from them.
_SHARED = frozenset({"workers", "array_parallelism", "grace", "master_here", "master_time", "heal",
                     "max_heals", "poll", "wait", "interface", "encrypt", "cluster_name", "cluster_dir",
                     "log_level", "adapt", "idle_timeout", "profiles"})  # fmt: skip


def add_backends(group: click.Group) -> None:
    """Add ``<name> up | status | down`` to ``group`` for every backend in the registry.

    A backend whose commands cannot be built is logged at WARNING and left
    out; the other commands stay.
    """
    for name, cls in backends().items():
        if name in group.commands:
            log.warning("cw %s: a command of that name exists already; the batch system is left out", name)
            continue
        try:
            group.add_command(backend_group(cls), name)
        except Exception as e:
            log.warning("cw %s is unavailable: %r", name, e)


def _click_type(t: Any, least: int | None) -> Any:
    if isinstance(t, tuple):
        return tuple(_click_type(x, least) for x in t)
    if t is int and least is not None:
        return click.IntRange(min=least)
    return t


def click_option(o: Option) -> Callable:
    """The click option for one declared option; its value arrives under ``o.key``."""
    if o.key in _SHARED or not o.key.isidentifier():
        raise ValueError(f"option --{o.name}: its key {o.key!r} is taken or not a name")
    decls = [f"--{o.name}", *([o.short] if o.short else []), o.key]
    kw: dict[str, Any] = {"default": o.default, "help": o.help, "type": _click_type(o.type, o.min)}
    if o.type is bool:
        kw = {"default": bool(o.default), "help": o.help, "is_flag": True}
    if o.nargs != 1:
        kw["nargs"] = o.nargs
    if o.metavar:
        kw["metavar"] = o.metavar
    if o.show_default:
        kw["show_default"] = True
    return click.option(*decls, **kw)


def backend_group(cls: type[Scheduler]) -> click.Group:
    """The ``up | status | down`` commands for one backend.

    The cluster and logging options, and their handling, are `cw`'s own
    (cli/common.py); between ``--workers`` and the options every backend
    shares come the backend's own.
    """
    backend_options = [click_option(o) for o in cls.options]

    @click.group(name=cls.name, help=f"A pool of cw workers on {cls.title}: up, status, down.",
                 context_settings={"help_option_names": ["-h", "--help"]})  # fmt: skip
    def group() -> None:
        pass

    @group.command("up")
    @click.option("--workers", "-n", type=click.IntRange(min=0), default=None,
                  help="Size of the pool: worker tasks in the array job (with --adapt: the first ones).")
    @click.option("--adapt", default=None, metavar="MIN:MAX",
                  help="Size the pool by the queue between MIN and MAX workers (e.g. 0:200); decides every --poll.")
    @click.option("--idle-timeout", default=None, metavar="DURATION",
                  help="With --adapt: drain workers idle this long (default: 5m).")
    @click.option("--profile", "profiles", multiple=True, metavar="NAME:KEY=VALUE,...:FLAGS",
                  help="With --adapt: a kind of worker for jobs that require it, with its batch flags, e.g."
                       " 'gpu:gpus=1:--gres=gpu:1 --partition=gpu' (repeatable; tag=T for tags).")
    @with_options(backend_options)
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
    @click.option("--encrypt", is_flag=True,
                  help="Encrypt the wire (CurveZMQ): recorded in the cluster directory, as `cw master --encrypt` does.")
    @with_options(_COMMON)
    def up_cmd(workers, adapt, idle_timeout, profiles, array_parallelism, grace, master_here, master_time, heal,
               max_heals, poll, wait, interface, encrypt, cluster_name, cluster_dir, log_level, **values):  # fmt: skip
        """Start a master and --workers N workers as ONE array job (or an adaptive pool:
        --adapt MIN:MAX); return once the master is published."""
        from ..launchers.adapt import Adaptive, parse_profile, parse_range
        from ..launchers.pool import Pool

        setup_logging(log_level)
        try:
            options = cls.up_options(values)
        except BadOption as e:
            raise click.BadParameter(str(e), param_hint=f"--{e.option}") from None
        settings, declared = None, []
        if adapt is None and (idle_timeout or profiles):
            raise click.UsageError("--idle-timeout and --profile go with --adapt")
        if adapt is None and workers is None:
            raise click.UsageError("give --workers N, or --adapt MIN:MAX")
        if adapt is not None:
            try:
                low, high = parse_range(adapt)
                settings = {"minimum": low, "maximum": high, "idle_timeout": parse_duration(idle_timeout)
                            if idle_timeout else ADAPT_IDLE_TIMEOUT}  # fmt: skip
                Adaptive(**settings)
                settings["interval"] = poll
                for text in profiles:
                    name, provides, flags = parse_profile(text)
                    declared.append({"name": name, "provides": provides, "maximum": None,
                                     "options": {"extra": flags} if flags else {}})  # fmt: skip
            except ConfigError as e:
                raise click.BadParameter(str(e), param_hint="--adapt/--profile") from None
            workers = low if workers is None else workers
        if array_parallelism:
            options["array_parallelism"] = array_parallelism
        if grace is not None:
            options["grace"] = grace
        master_options = cls.master_options(options, master_time)
        pool = Pool(cls(), cluster_from(cluster_name, cluster_dir))
        fresh = not pool.answering_master()  # a failed up takes down what it started, nothing else
        try:
            if encrypt:  # before the master starts: it, the workers and the clients follow
                pool.cluster.set_encrypted()
            pool.up(workers, options, master_options=master_options, heal=heal, max_heals=max_heals,
                    master_here=master_here, poll=poll, wait=wait, interface=interface, report=click.echo,
                    adapt=settings, profiles=declared)  # fmt: skip
        except (CwError, KeyboardInterrupt) as e:
            if fresh and pool.read():
                click.echo("taking down the master this up started", err=True)
                try:
                    pool.down(report=lambda line: click.echo(line, err=True))
                except CwError as again:
                    click.echo(f"could not: {again}; run `cw {cls.name} down`", err=True)
            if isinstance(e, KeyboardInterrupt):
                raise click.Abort() from None
            raise click.ClickException(str(e)) from None
        if settings:
            click.echo(f"adaptive: {settings['minimum']} to {settings['maximum']} workers, sized by the queue"
                       f" every {poll:g} s; idle workers drain after {settings['idle_timeout']:g} s")  # fmt: skip
        click.echo(f"ready: clients find the master through {pool.cluster.master_json}"
                   f" (cw.Client(cluster={str(pool.cluster.path)!r}))")  # fmt: skip

    @group.command("status")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a summary.")
    @with_options(_COMMON)
    def status_cmd(as_json, cluster_name, cluster_dir, log_level):
        """The master job, the worker arrays (pending / running / ended) and the connected workers."""
        from ..launchers.pool import Pool

        setup_logging(log_level)
        pool = Pool(cls(), cluster_from(cluster_name, cluster_dir))
        try:
            doc = pool.status()
        except CwError as e:
            raise click.ClickException(str(e)) from None
        if as_json:
            click.echo(json.dumps(doc, indent=2, default=str))
            return
        click.echo(format_status(pool.scheduler, doc))

    @group.command("scale")
    @click.argument("workers", type=click.IntRange(min=0))
    @with_options(_COMMON)
    def scale_cmd(workers, cluster_name, cluster_dir, log_level):
        """Hold the pool at WORKERS from now on (adapting stops): submit the missing ones, or
        drain the surplus, idle workers first."""
        from ..launchers.elastic import scale
        from ..launchers.pool import Pool

        setup_logging(log_level)
        pool = Pool(cls(), cluster_from(cluster_name, cluster_dir))
        try:
            scale(pool, workers, report=click.echo)
        except CwError as e:
            raise click.ClickException(str(e)) from None

    @group.command("down")
    @click.option("--wait", type=float, default=DOWN_WAIT, show_default=True,
                  help="Seconds to let the workers drain before the jobs are killed.")
    @with_options(_COMMON)
    def down_cmd(wait, cluster_name, cluster_dir, log_level):
        """Drain the workers, cancel every job the pool started, stop the master."""
        from ..launchers.pool import Pool

        setup_logging(log_level)
        pool = Pool(cls(), cluster_from(cluster_name, cluster_dir))
        try:
            done = pool.down(wait=wait, report=click.echo)
        except CwError as e:
            raise click.ClickException(str(e)) from None
        if not done:
            raise click.ClickException("some jobs did not leave the queue")

    return group


def _worker_task(w: dict) -> str:
    """A connected worker's batch job ('123_4', '77.3'), as the master names it, else from its info."""
    return w.get("task") or environment_of(w.get("info") or {}).task()


def format_status(sched: Scheduler, doc: dict) -> str:
    """The summary `cw <backend> status` prints, from :meth:`Pool.status`'s document."""
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
    a = doc.get("adapt")
    if a:
        heal = (f"adaptive {a['minimum']}..{a['maximum']}, idle workers drain after {a['idle_timeout']:g} s"
                + "".join(f"; profile {p['name']}" for p in doc.get("profiles") or ()))  # fmt: skip
    lines.append(f"workers: {doc['target']} wanted; {r} running, {p} pending, {e} ended ({heal})")
    for a in doc["arrays"]:
        retiring = f", {a['retiring']} retiring" if a.get("retiring") else ""
        profile = f" (profile {a['profile']})" if a.get("profile") else ""
        lines.append(f"  {sched.describe(a['job'])}{profile}: {a['tasks']} tasks, {a['running']} running,"
                     f" {a['pending']} pending, {a['ended']} ended{retiring}")  # fmt: skip
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
            label = _worker_task(w) or "-"
            lines.append(f"  {w['id']:<28} {label:<18} {w['slots']:>3} slots {w['running']:>5} running"
                         f"{'  draining' if w.get('draining') else ''}")  # fmt: skip
    return "\n".join(lines)
