"""`cw pull`: the outputs a run's jobs archived, copied from the cluster directory to here."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import click

from ..errors import StoreError
from ..job import inside, sha256
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

    A job's files go to DEST/KEY/ (a job without a key: DEST/job/JOBID/); when
    several jobs of the run share a key, each has DEST/KEY/JOBID/. The files
    are read from the cluster directory (outputs/RUN/...), where the workers
    put them, and each copy is checked against the size and SHA-256 the store
    recorded: each is copied to a temporary name beside its place and renamed
    there once it checks, so that a bad copy is never left in DEST. A file
    already in DEST with the same content is skipped; a name that would lead
    outside DEST (or outside the archive) is refused.
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
    where = _layout(rows)
    root = Path(dest)
    copied = skipped = size = 0
    problems = []
    for r in rows:
        src = cluster.path / r["dir"] / r["name"]
        target = root / where[r["job"]] / r["name"]
        if not inside(src, cluster.path / "outputs") or not inside(target, root):
            problems.append(f"{src}: its name {r['name']!r} leads outside the archive or DEST; not copied")
            continue
        if dry_run:
            click.echo(f"{src} -> {target} ({r['size']} bytes)")
            continue
        if target.is_file() and target.stat().st_size == r["size"] and sha256(target) == r["sha256"]:
            skipped += 1
            continue
        problem = _copy_checked(src, target, r["sha256"])
        if problem:
            problems.append(f"{src}: {problem}")
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


def _layout(rows: list[dict]) -> dict[int, str]:
    """Each job's directory in DEST: its key's, or its key's and its id's when the key
    is shared (archives are outputs/RUN/KEY/JOBID; older ones outputs/RUN/KEY)."""
    keydir: dict[int, str] = {}
    for r in rows:
        parts = Path(r["dir"]).parts
        keydir[r["job"]] = parts[2] if len(parts) > 2 else str(r["job"])  # outputs, run, key[, id]
    jobs: dict[str, set] = {}
    for jid, k in keydir.items():
        jobs.setdefault(k, set()).add(jid)
    return {jid: k if len(jobs[k]) == 1 and k != "job" else f"{k}/{jid}" for jid, k in keydir.items()}


def _copy_checked(src: Path, target: Path, digest: str) -> str | None:
    """Copy src to target through a temporary name beside it, renamed only once its SHA-256
    checks: a failed copy never stands in DEST under the file's name. What went wrong, or None."""
    tmp = target.with_name(f".{target.name}.cw-pull-{os.getpid()}")
    made = [d for d in (target.parent, *target.parent.parents) if not d.exists()]  # deepest first
    problem = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp)
        if sha256(tmp) != digest:
            problem = "its content differs from what the job archived (sha256); not copied"
        else:
            os.replace(tmp, target)
    except OSError as e:
        problem = str(e.strerror or e)
    finally:
        if tmp.exists():
            tmp.unlink()
    for d in made if problem else ():  # a failed copy leaves no empty folders behind
        try:
            d.rmdir()
        except OSError:
            break
    return problem
