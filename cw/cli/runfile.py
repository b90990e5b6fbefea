"""`cw run-file` and `cw template`: many runs of programs from a job file or a job set."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import sys
import time

import click

from .. import defaults
from ..errors import CommandError, CwError, SetupError, StoreError
from ..jobfile import TEMPLATE, JobSet, read
from ..resources import requirements
from ..store.reader import StoreReader
from .common import cluster_from, cluster_options, parse_duration


def parse_requires(items: tuple[str, ...]) -> dict:
    """('gpus=1', 'mem=8G', 'tags=a,b') -> {'gpus': 1, 'mem': '8G', 'tags': ['a', 'b']}."""
    out: dict = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--requires")
        if key in ("tags", "tag"):
            out.setdefault("tags", []).extend(t for t in value.split(",") if t)
        else:
            out[key] = int(value) if value.isdigit() else value
    try:
        requirements(out)  # a count that is not one is refused now, before anything runs
    except (ValueError, TypeError) as e:
        raise click.BadParameter(str(e), param_hint="--requires") from None
    return out


@click.command("run-file")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@cluster_options
@click.option("--run", "run", default=None, metavar="NAME",
              help="The run's name (a job set may name its own); re-running it runs only what did not succeed.")
@click.option("--requires", "requires", multiple=True, metavar="KEY=VALUE",
              help="What every job needs of a worker: gpus=1, mem=8G, tags=openfoam (repeatable).")
@click.option("--retries", type=click.IntRange(min=0), default=None,
              help="Times a job may lose its worker before it fails (default 3).")
@click.option("--timeout", default=None, metavar="DURATION", help="Kill each job past this (90, 30m, 2h).")
@click.option("--dry-run", is_flag=True, help="List the jobs and what the run already has of them; run nothing.")
@click.option("--quiet", "-q", is_flag=True, help="Print only failures and the summary.")
def run_file_cmd(path, cluster_name, cluster_dir, run, requires, retries, timeout, dry_run, quiet):
    """Run every command of PATH as a job: one a line (blank lines and # comments are
    skipped), or a YAML job set (`cw template` prints one).

    Each job is keyed by its line number and text (a job set's: its name), so
    running the file again in the same run runs only what has not succeeded.
    `cw results RUN` shows the joblog (line, exit code, host, runtime).
    Exit code 1 if any job failed.
    """  # fmt: skip
    try:
        jobset = read(path)
    except CwError as e:
        raise click.ClickException(str(e)) from None
    run = run or jobset.run
    if not run:
        raise click.UsageError("name the run: --run NAME (a job set may say `run:`)")
    need = dict(jobset.requires or {})
    need.update(parse_requires(requires))
    if retries is None:
        retries = jobset.retries
    seconds = None
    if timeout is not None:
        seconds = parse_duration(timeout)
        if seconds <= 0:
            raise click.BadParameter(f"{timeout!r}: a timeout is longer than 0", param_hint="--timeout")
    elif jobset.timeout is not None:
        try:
            seconds = parse_duration(jobset.timeout)
        except click.BadParameter as e:
            raise click.ClickException(f"{jobset.path}: `timeout`: {e.format_message()}") from None
        if seconds <= 0:
            raise click.ClickException(f"{jobset.path}: `timeout` {jobset.timeout!r} is not longer than 0")
    if dry_run:
        _dry_run(jobset, run, cluster_from(cluster_name, cluster_dir, read=True))
        return
    # a cluster named here must have a master; with none named, the embedded one may start
    named = cluster_from(cluster_name, cluster_dir) if cluster_name or cluster_dir else None
    _run(jobset, run, named, need or None, retries, seconds, quiet)


def _dry_run(jobset: JobSet, run: str, cluster) -> None:
    states: dict = {}
    if cluster.store_path.exists():
        try:
            with StoreReader(cluster.store_path) as store:
                states = store.key_states(run)
        except StoreError as e:
            click.echo(f"cannot read the store ({e}): every job is listed as new", err=True)
    todo = 0
    for spec in jobset.jobs:
        state = states.get(spec.key, "new")
        todo += state != "done"
        what = spec.function or (spec.command if isinstance(spec.command, str) else " ".join(spec.command))
        label = f"line {spec.line}" if not jobset.is_set else spec.key
        click.echo(f"{state:>9}  {label}: {what}")
    click.echo(f"run {run}: {len(jobset.jobs)} jobs, {todo} to run ({len(jobset.jobs) - todo} done already)")


def _run(jobset: JobSet, run: str, cluster, requires, retries, timeout, quiet: bool) -> None:
    from ..client import Client
    from ..command import Setup, run_callable, run_command

    base = str(jobset.path.resolve().parent)
    setup = Setup(jobset.setup, run, base) if jobset.setup else None
    options = {"requires": requires, "max_retries": retries, "timeout": timeout}
    env = {"CW_JOBSET_DIR": base}
    t0 = time.monotonic()
    try:
        client = Client(cluster=None if cluster is None else str(cluster.path), run=run)
    except CwError as e:
        raise click.ClickException(str(e)) from None
    with client:
        futures: dict = {}
        for spec in jobset.jobs:
            if spec.function:
                args, kw = (spec.function, spec.args, spec.kwargs, spec.inputs, spec.outputs, setup, env), {}
                fut = client._submit(run_callable, args, kw, key=spec.key, **options)
            else:
                kw = {"env": env, "check": True}
                if jobset.is_set:  # a job set's jobs run in their own directories
                    kw.update(scratch=True, inputs=spec.inputs, outputs=spec.outputs, setup=setup)
                fut = client._submit(run_command, (spec.command,), kw, key=spec.key, **options)
            futures[fut] = spec
        total, done, failed = len(futures), 0, []
        click.echo(f"run {run}: {total} jobs submitted from {jobset.path}", err=True)
        try:
            for fut in cf.as_completed(futures):
                spec = futures[fut]
                label = f"line {spec.line}" if not jobset.is_set else spec.key
                exc = fut.exception() if not fut.cancelled() else None
                if fut.cancelled():
                    continue
                done += 1
                if exc is None:
                    r = fut.result()
                    host = getattr(r, "host", "")
                    if not quiet:
                        click.echo(f"[{done}/{total}] {label}: ok{f' on {host}' if host else ''}")
                    continue
                if isinstance(exc, SetupError):  # the set cannot run: say it once, stop the rest
                    click.echo(f"[{done}/{total}] {label}: {exc}", err=True)
                    client.cancel([f for f in futures if not f.done()])
                    store = (client._local.cluster if client._local is not None else cluster or cluster_from(None, None)).store_path
                    counts = _settled(store, run, [s.key for s in jobset.jobs])
                    raise click.ClickException(f"run {run} stopped: its setup failed ({counts});"
                                               f" fix it and run `cw run-file {jobset.path}` again")  # fmt: skip
                failed.append(spec)
                text = f"exit code {exc.returncode}" if isinstance(exc, CommandError) else f"{type(exc).__name__}"
                click.echo(f"[{done}/{total}] {label}: FAILED ({text}) {exc}", err=True)  # with its stderr's tail
        except KeyboardInterrupt:
            click.echo(f"interrupted: the jobs run on at the master; `cw run-file {jobset.path}` again"
                       " picks them up", err=True)  # fmt: skip
            sys.exit(130)
    elapsed = time.monotonic() - t0
    click.echo(f"run {run}: {total - len(failed)} of {total} succeeded, {len(failed)} failed, in {elapsed:.1f} s;"
               f" `cw results {run}` shows the joblog", err=True)  # fmt: skip
    if failed:
        sys.exit(1)


def _settled(store_path, run: str, keys: list) -> str:
    """How the run's jobs ended, as the store has it, once each has ended (or the wait is
    over): cancels race with the results already on their way, so the client cannot count."""
    deadline = time.monotonic() + defaults.RUNFILE_SETTLE_WAIT
    while True:
        try:
            with StoreReader(store_path) as store:
                states = store.key_states(run)
        except StoreError as e:
            return f"the store cannot say how its jobs ended: {e}"
        ours = [states.get(k, "pending") for k in keys]
        if "pending" not in ours or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    n = collections.Counter(ours)
    words = [f"{n.pop('error', 0)} jobs failed", f"{n.pop('cancelled', 0)} cancelled"]
    words += [f"{v} {'succeeded' if k == 'done' else 'not ended yet' if k == 'pending' else k}"
              for k, v in sorted(n.items())]  # fmt: skip
    return ", ".join(words)


@click.command("template")
def template_cmd():
    """Print a commented example job set (YAML) for `cw run-file`."""
    click.echo(TEMPLATE, nl=False)

