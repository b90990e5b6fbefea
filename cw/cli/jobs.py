"""`cw status`, `cw results`, `cw logs`, `cw retry`: jobs and workers, through the master or in the store."""

from __future__ import annotations

import csv
import io
import json
import time

import click

from .. import protocol as P
from ..discovery import resolve_address
from ..errors import CwError, StoreError
from ..link import ask, query_status
from ..resources import describe
from ..store import Store
from ..store.reader import StoreReader
from .common import cluster_from, cluster_options


@click.command("status")
@cluster_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a summary.")
def status_cmd(cluster_name, cluster_dir, as_json):
    """Workers and jobs: from the live master, else from the store."""
    cluster = cluster_from(cluster_name, cluster_dir, read=True)
    address = resolve_address(None, cluster)
    doc = None
    if address:
        try:
            doc = {"live": True, **query_status(address, cluster.key(), encrypt=cluster.encrypted())}
        except CwError as e:
            click.echo(f"master at {address} did not answer ({e}); reading the store", err=True)
    try:
        if doc is None:
            if not cluster.store_path.exists():
                raise click.ClickException(f"no master running and no store at {cluster.store_path}")
            with StoreReader(cluster.store_path) as store:
                doc = {"live": False, "store": str(cluster.store_path), **store.summary()}
        elif cluster.store_path.exists():  # WAL: reading beside the live master is safe
            with StoreReader(cluster.store_path) as store:
                doc["runs"] = store.summary()["runs"]
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    if doc["live"]:
        click.echo(f"master {doc['master']} at {doc['address']} (store {doc['store']})")
        held = f", {doc['held']} waiting for their inputs" if doc.get("held") else ""
        click.echo(f"jobs: {doc['queued']} queued, {doc['running']} running,"
                   f" {doc.get('prefetched', 0)} prefetched{held}, {doc['done']} done since start")  # fmt: skip
        sent = doc.get("sent") or {}
        if any(sent.values()):
            click.echo("sent to workers: " + ", ".join(f"{_size(n)} of {kind}" for kind, n in sent.items()))
        click.echo(f"workers: {len(doc['workers'])}")
        for w in doc["workers"]:
            where = w.get("label") or " ".join(f"{k}={v}" for k, v in w.get("info", {}).items())
            blocked = f" ({w['blocked']} waiting on their children)" if w.get("blocked") else ""
            click.echo(f"  {w['id']:<30} {w['slots']:>3} slots {w['running']:>6} running{blocked}"
                       f" {w.get('prefetched', 0):>6} prefetched"
                       f"{'  draining' if w['draining'] else ''}{_paused(w.get('paused'))}  {where}")  # fmt: skip
            held = ", ".join(f"{k} {_amount(k, v)} of {_amount(k, w['caps'].get(k, 0))} held"
                             for k, v in (w.get("reserved") or {}).items() if v)  # fmt: skip
            click.echo(f"  {'':<30} {describe(w.get('caps') or {})}{f'; {held}' if held else ''}")
    else:
        click.echo(f"no master running; store {doc['store']}")
    for run, states in sorted(doc.get("runs", {}).items()):
        parts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        click.echo(f"  run {run or '(none)'}: {parts}")


def _paused(p: dict | None) -> str:
    if not p:
        return ""
    until = f" until {time.strftime('%H:%M:%S', time.localtime(p['until']))}" if p.get("until") else ""
    return f"  PAUSED{' (jobs stopped)' if p.get('stopped') else ''}{until}"


def _amount(k: str, v: float) -> str:
    return f"{v / 2**30:.1f}G" if k == "mem" else f"{v:g}"


@click.command("results")
@click.argument("run", required=False)
@cluster_options
@click.option("--failed", is_flag=True, help="Only jobs that failed (not those that succeeded or were cancelled).")
@click.option("--outputs", "files", is_flag=True, help="List the files the jobs archived (see `cw pull`).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True, help="Output format.")
def results_cmd(run, cluster_name, cluster_dir, failed, files, fmt):
    """Finished jobs of RUN (default: jobs submitted without a run name), from the store.

    Reads the SQLite file directly: it works with or without a live master.
    """  # fmt: skip
    cluster = cluster_from(cluster_name, cluster_dir, read=True)
    try:
        with StoreReader(cluster.store_path) as store:
            if files:
                click.echo(format_rows(store.files(run), fmt, OUTPUT_COLUMNS), nl=False)
                return
            rows = store.results(run, failed=failed)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    joblog = any(r["exit"] is not None for r in rows)  # a run of commands: its joblog
    click.echo(format_rows(rows, fmt, JOBLOG_COLUMNS if joblog else COLUMNS), nl=False)


#: `cw results` table columns: `waited` is queued to started, `runtime` started to finished (seconds)
COLUMNS = ("job", "seq", "run", "status", "value", "error", "worker", "waited", "runtime", "outputs")
ALL_COLUMNS = COLUMNS + ("started", "finished")  # CSV and JSON: epoch seconds too
#: `cw results --outputs`: the files the jobs archived
OUTPUT_COLUMNS = ("job", "key", "name", "size", "sha256")
#: A run of shell commands (`cw run-file`): its key is the line number and the command.
JOBLOG_COLUMNS = ("job", "key", "status", "exit", "host", "runtime", "outputs", "error")


def format_rows(rows: list[dict], fmt: str, columns: tuple = COLUMNS) -> str:
    """Rows as a table (tabulate), CSV or JSON, with a final newline."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        every = ALL_COLUMNS if columns == COLUMNS else columns
        w = csv.DictWriter(out, every, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        return out.getvalue()
    from tabulate import tabulate

    def cell(v):  # one line per row: the first line of an error (the whole is in json and csv)
        return v.split("\n", 1)[0] if isinstance(v, str) else v

    return tabulate([[cell(r[c]) for c in columns] for r in rows], headers=columns) + "\n"


@click.command("logs")
@click.argument("run")
@click.argument("which", required=False, metavar="[KEY|ID]")
@cluster_options
@click.option("--failed", is_flag=True, help="Only jobs that failed (not those that succeeded or were cancelled).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing the output of jobs as they finish (Ctrl-C stops).")
def logs_cmd(run, which, cluster_name, cluster_dir, failed, follow):
    """Each finished job's own stdout and stderr in RUN ('-': jobs without a run name).

    KEY or ID picks one job (its key in the run, or its job id). Reads the
    store directly: it works with or without a live master.
    """
    cluster = cluster_from(cluster_name, cluster_dir, read=True)
    run = None if run == "-" else run
    seen: set[int] = set()
    after = None
    try:
        with StoreReader(cluster.store_path) as store:
            while True:
                rows = [r for r in store.outputs(run, which, failed, after) if r["job"] not in seen]
                for r in rows:
                    click.echo(_log_text(r), nl=False)
                    seen.add(r["job"])
                    after = r["finished"] - 1.0 if r["finished"] else after  # clocks: keep a margin
                if not follow:
                    if not rows:
                        click.echo(f"no finished jobs{' that failed' if failed else ''} in run {run or '(none)'}"
                                   f"{f' matching {which}' if which else ''}", err=True)  # fmt: skip
                    return
                time.sleep(0.5)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        return


def _log_text(r: dict) -> str:
    """One job's output, under a line naming it."""
    head = f"==> job {r['job']}" + (f" key {r['key']}" if r["key"] else "") + f" ({r['status']}"
    head += f" on {r['worker']})" if r["worker"] else ")"
    parts = [head + (f": {r['error'].splitlines()[0]}" if r["error"] else "") + " <=="]
    for name in ("stdout", "stderr"):
        if r[name]:
            parts.append(f"--- {name}\n" + r[name] + ("" if r[name].endswith("\n") else "\n"))
    if len(parts) == 1:
        parts.append("(no output)")
    return "\n".join(parts) + "\n"


@click.command("retry")
@click.argument("run")
@cluster_options
@click.option("--failed", is_flag=True, required=True, help="Requeue the jobs that failed (cancelled ones stay cancelled).")
def retry_cmd(run, cluster_name, cluster_dir, failed):
    """Run the failed jobs of RUN again (through the live master, else in the store)."""
    cluster = cluster_from(cluster_name, cluster_dir, read=True)
    address = resolve_address(None, cluster)
    if address:
        try:
            doc = ask(address, cluster.key(), P.RETRY, {"run": run}, encrypt=cluster.encrypted())
            click.echo(f"{doc['retried']} failed jobs of run {run} requeued by the master at {address}")
            return
        except CwError as e:
            click.echo(f"master at {address} did not answer ({e}); changing the store", err=True)
    if not cluster.store_path.exists():
        raise click.ClickException(f"no store at {cluster.store_path}")
    if not cluster.lock():  # the store has one writer: a master that is alive but silent
        raise click.ClickException(f"a master holds {cluster.path} but does not answer; try again")
    try:
        store = Store(cluster.store_path)
        n = len(store.retry_failed(run))
        store.close()
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    finally:
        cluster.unlock()
    click.echo(f"{n} failed jobs of run {run} will run when a master starts on {cluster.path}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
