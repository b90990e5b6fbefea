"""`cw store check` and `cw store recover`: SQLite's verdict on the store, and its repair."""

from __future__ import annotations

import click

from ..errors import StoreError
from ..store.reader import integrity
from ..store.repair import recover
from .common import cluster_from, cluster_options


@click.group("store")
def store_group() -> None:
    """The store (cw.sqlite): check it, recover it."""


@store_group.command("check")
@cluster_options
@click.option("--quick", is_flag=True, help="SQLite's quick_check (what the master runs on start).")
def check_cmd(cluster_name, cluster_dir, quick):
    """Ask SQLite whether the store is sound (PRAGMA integrity_check); exit 1 if not.

    Reads the file only: safe beside a live master.
    """
    path = cluster_from(cluster_name, cluster_dir).store_path
    try:
        problems = integrity(path, quick=quick)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    if problems == ["ok"]:
        click.echo(f"{path}: ok")
        return
    click.echo(f"{path} is damaged:")
    for line in problems:
        click.echo(f"  {line}")
    click.echo("`cw store recover` rebuilds it from what SQLite can still read.")
    raise SystemExit(1)


@store_group.command("recover")
@cluster_options
def recover_cmd(cluster_name, cluster_dir):
    """Rebuild a damaged store from what can still be read; keep the damaged file beside it.

    SQLite's own .recover (the sqlite3 shell) when it works here, else a row-by-row
    copy. Jobs whose rows are lost are gone; jobs whose result is lost run again.
    No master may be running on the cluster directory.
    """
    cluster = cluster_from(cluster_name, cluster_dir)
    if not cluster.lock():
        raise click.ClickException(f"a master is running on {cluster.path}: stop it first")
    try:
        r = recover(cluster.store_path)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    finally:
        cluster.unlock()
    click.echo(f"recovered {r.store} with {r.method}:")
    click.echo("  " + ", ".join(f"{n} {t}" for t, n in r.rows.items()))
    click.echo(f"the damaged store is kept as {r.damaged}")
