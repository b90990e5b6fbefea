"""`cw pull`: the outputs a run's jobs archived, copied from the cluster directory to here."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import click

from ..errors import StoreError
from ..job import sha256
from ..store.reader import StoreReader
from .common import cluster_from, cluster_options


@click.command("pull")
@click.argument("run")
@click.argument("dest", type=click.Path(file_okay=False))
@cluster_options
@click.option("--job", "key", default=None, metavar="KEY", help="Only the outputs of the job with this key.")
@click.option("--match", "pattern", default=None, metavar="REGEX",
              help="Only files whose name (their path in the job's outputs) matches (re.search).")
@click.option("--dry-run", is_flag=True, help="Say what would be copied; copy nothing.")
def pull_cmd(run, dest, cluster_name, cluster_dir, key, pattern, dry_run):
    """Copy the outputs RUN's jobs archived into DEST, one directory per job.

    The files are read from the cluster directory (outputs/RUN/...), where the
    workers put them, and each copy is checked against the size and SHA-256 the
    store recorded. A file already in DEST with the same content is skipped.
    """  # fmt: skip
    cluster = cluster_from(cluster_name, cluster_dir, read=True)
    try:
        match = re.compile(pattern) if pattern else None
    except re.error as e:
        raise click.BadParameter(f"{pattern!r} is not a regular expression: {e}", param_hint="--match") from None
    try:
        with StoreReader(cluster.store_path) as store:
            rows = store.files(run, key)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    rows = [r for r in rows if match is None or match.search(r["name"])]
    if not rows:
        raise click.ClickException(f"no archived outputs in run {run!r}"
                                   f"{f' for job {key!r}' if key else ''}{f' matching {pattern!r}' if pattern else ''}")
    copied = skipped = size = 0
    problems = []
    for r in rows:
        src = cluster.path / r["dir"] / r["name"]
        target = Path(dest) / Path(r["dir"]).name / r["name"]
        if dry_run:
            click.echo(f"{src} -> {target} ({r['size']} bytes)")
            continue
        if target.is_file() and target.stat().st_size == r["size"] and sha256(target) == r["sha256"]:
            skipped += 1
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
        except OSError as e:
            problems.append(f"{src}: {e.strerror or e}")
            continue
        if sha256(target) != r["sha256"]:
            problems.append(f"{src}: its content differs from what the job archived (sha256)")
            continue
        copied += 1
        size += r["size"]
    if dry_run:
        return
    click.echo(f"{copied} files ({size} bytes) copied into {dest}" + (f", {skipped} already there" if skipped else ""))
    if problems:
        for p in problems:
            click.echo(f"  FAILED {p}", err=True)
        raise SystemExit(1)
