"""The ``cw`` command line (click). ``python -m cw.master`` / ``cw.worker`` share these commands."""

from __future__ import annotations

import json

import click

from .. import defaults
from ..link import ask, query_status
from ..version import __version__
from .common import cluster_from, cluster_options, log_option, parse_duration, setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cw")
def cli() -> None:
    """cw (Cluster-Workers): run Python functions on a pool of workers."""


@click.command("master")
@cluster_options
@click.option("--bind", default="*", show_default=True,
              help="Interface to listen on, or a full ZeroMQ endpoint (tcp://..., ipc://...).")
@click.option("--port", type=int, default=None,
              help=f"Port to listen on (default: {defaults.PORT}, or a random one if it is taken; 0: random).")
@click.option("--host", default=None, help="Host name to publish for clients and workers (default: this host's name).")
@click.option("--interface", default=None, help="Publish the IPv4 address of this network interface (e.g. ib0).")
@click.option("--heartbeat", type=float, default=defaults.HEARTBEAT, show_default=True,
              help="Seconds between heartbeats on an idle link.")
@click.option("--worker-timeout", type=float, default=defaults.WORKER_TIMEOUT, show_default=True,
              help="Seconds of silence after which a worker is lost and its jobs requeued.")
@click.option("--queue-window", type=int, default=defaults.QUEUE_WINDOW, show_default=True,
              help="Unfinished jobs held in memory; the rest wait in the store.")
@click.option("--watch-pid", type=int, default=None, metavar="PID",
              help="Stop when process PID ends (LocalCluster's processes end with their owner).")
@click.option("--keep-pool", is_flag=True,
              help="Run the keeper of the pool recorded in pool.json beside the master"
                   " (what `cw slurm up` / `cw sge up` start).")
@click.option("--poll", type=click.FloatRange(min=0.1), default=None,
              help="Seconds between the keeper's looks at the batch system (default: the pool's).")
@log_option
def master_cmd(cluster_name, cluster_dir, bind, port, host, interface, heartbeat, worker_timeout,
               queue_window, watch_pid, keep_pool, poll, log_level):
    """Run a master: accept clients, hand their jobs to workers, store everything.

    On a cluster directory whose store holds unfinished jobs (a master that
    crashed or was stopped), it requeues them and carries on.
    """  # fmt: skip
    from ..errors import CwError
    from ..launchers.pool import keeper_for
    from ..master import Master, run_master

    setup_logging(log_level)
    cluster = cluster_from(cluster_name, cluster_dir)
    try:
        companions = [keeper_for(cluster, poll)] if keep_pool else []
        m = Master(cluster=cluster, bind=bind, port=port, host=host, interface=interface,
                   heartbeat=heartbeat, worker_timeout=worker_timeout, queue_window=queue_window,
                   watch_pid=watch_pid)  # fmt: skip
        click.echo(f"cw master listening on {m.address}")
        click.echo(f"published {m.cluster.master_json}")
        run_master(m, companions)
    except CwError as e:
        raise click.ClickException(str(e)) from None


@click.command("worker")
@click.argument("host", required=False)
@cluster_options
@click.option("--procs", type=int, default=None,
              help="Executor processes (default: $SLURM_CPUS_PER_TASK, $NSLOTS, or 1).")
@click.option("--tag", "tags", multiple=True, help="A capability tag jobs may require (repeatable).")
@click.option("--heartbeat", type=float, default=defaults.HEARTBEAT, show_default=True,
              help="Seconds between heartbeats on an idle link.")
@click.option("--master-timeout", type=float, default=defaults.MASTER_TIMEOUT, show_default=True,
              help="Seconds of silence after which the master is presumed lost and we reconnect.")
@click.option("--give-up", type=float, default=600.0, show_default=True,
              help="Exit after the master has been unreachable this many seconds.")
@click.option("--grace", type=float, default=defaults.GRACE, show_default=True,
              help="Seconds a draining worker lets running jobs finish before handing them back.")
@click.option("--lifetime", default=None, metavar="DURATION",
              help="Drain by itself after this long (e.g. 3:55:00, 90m, 3600).")
@click.option("--watch-pid", type=int, default=None, metavar="PID",
              help="Drain when process PID ends (LocalCluster's processes end with their owner).")
@log_option
def worker_cmd(host, cluster_name, cluster_dir, procs, tags, heartbeat, master_timeout, give_up,
               grace, lifetime, watch_pid, log_level):
    """Run a worker for the master at HOST (default: the address in master.json).

    SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 drain it: no new jobs, unstarted jobs go
    back to the master at once, running ones get --grace seconds; a second signal
    stops it at once. Jobs handed back are not charged an attempt.
    """  # fmt: skip
    from ..errors import CwError
    from ..worker import run_worker

    setup_logging(log_level)
    try:
        run_worker(address=host, cluster=cluster_from(cluster_name, cluster_dir), procs=procs,
                   tags=list(tags), heartbeat=heartbeat, master_timeout=master_timeout, give_up=give_up,
                   grace=grace, lifetime=parse_duration(lifetime) if lifetime else None,
                   watch_pid=watch_pid)  # fmt: skip
    except CwError as e:
        raise click.ClickException(str(e)) from None


@cli.command("status")
@cluster_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a summary.")
def status_cmd(cluster_name, cluster_dir, as_json):
    """Workers and jobs: from the live master, else from the store."""
    from ..discovery import resolve_address
    from ..errors import CwError

    cluster = cluster_from(cluster_name, cluster_dir)
    address = resolve_address(None, cluster)
    doc = None
    if address:
        try:
            doc = {"live": True, **query_status(address, cluster.key())}
        except CwError as e:
            click.echo(f"master at {address} did not answer ({e}); reading the store", err=True)
    from ..store import connect, summary

    if doc is None:
        if not cluster.store_path.exists():
            raise click.ClickException(f"no master running and no store at {cluster.store_path}")
        doc = {"live": False, "store": str(cluster.store_path), **summary(connect(cluster.store_path, readonly=True))}
    elif cluster.store_path.exists():  # WAL: reading beside the live master is safe
        doc["runs"] = summary(connect(cluster.store_path, readonly=True))["runs"]
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    if doc["live"]:
        click.echo(f"master {doc['master']} at {doc['address']} (store {doc['store']})")
        click.echo(f"jobs: {doc['queued']} queued, {doc['running']} running, {doc['done']} done since start")
        click.echo(f"workers: {len(doc['workers'])}")
        for w in doc["workers"]:
            where = " ".join(f"{k}={v}" for k, v in w.get("info", {}).items())
            click.echo(f"  {w['id']:<30} {w['slots']:>3} slots {w['running']:>6} running"
                       f"{'  draining' if w['draining'] else ''}  {where}")  # fmt: skip
    else:
        click.echo(f"no master running; store {doc['store']}")
    for run, states in sorted(doc.get("runs", {}).items()):
        parts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        click.echo(f"  run {run or '(none)'}: {parts}")


# SQL for `cw results`; cw_value() is defined for sqlite-utils by _VALUE_FUNCTION
_RESULTS_SQL = """
SELECT j.id AS job, j.seq, j.run, r.status, cw_value(r.status, r.value) AS value,
       r.error, r.worker, round(r.runtime, 6) AS runtime
FROM jobs j JOIN results r ON r.job = j.id
WHERE j.run IS :run {failed}
ORDER BY j.id
"""
_VALUE_FUNCTION = """
def cw_value(status, value):
    import pickle
    if status != 0 or value is None:
        return None
    try:
        return repr(pickle.loads(value))
    except Exception as e:
        return f"<cannot unpickle here: {e!r}>"
"""


@cli.command("results")
@click.argument("run", required=False)
@cluster_options
@click.option("--failed", is_flag=True, help="Only jobs that did not succeed.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True, help="Output format (sqlite-utils does the export).")
def results_cmd(run, cluster_name, cluster_dir, failed, fmt):
    """Finished jobs of RUN (default: jobs submitted without a run name), from the store.

    Reads the SQLite file directly: it works with or without a live master.
    """  # fmt: skip
    import sqlite_utils.cli

    from ..protocol import OK, STATUS_NAMES

    cluster = cluster_from(cluster_name, cluster_dir)
    if not cluster.store_path.exists():
        raise click.ClickException(f"no store at {cluster.store_path}")
    names = " ".join(f"WHEN {k} THEN '{v}'" for k, v in STATUS_NAMES.items())
    sql = _RESULTS_SQL.replace("r.status,", f"CASE r.status {names} END AS status,", 1).format(
        failed=f"AND r.status != {OK}" if failed else ""
    )
    args = [str(cluster.store_path), sql, "-p", "run", run or "", "--functions", _VALUE_FUNCTION]
    if not run:  # jobs without a run name are stored with run NULL
        args[1] = args[1].replace("j.run IS :run", "(j.run IS NULL OR j.run = :run)")
    args += {"table": ["--table"], "csv": ["--csv"], "json": []}[fmt]
    sqlite_utils.cli.query.main(args, prog_name="cw results", standalone_mode=True)


@cli.command("retry")
@click.argument("run")
@cluster_options
@click.option("--failed", is_flag=True, required=True, help="Requeue the jobs that did not succeed.")
def retry_cmd(run, cluster_name, cluster_dir, failed):
    """Run the failed jobs of RUN again (through the live master, else in the store)."""
    from .. import protocol as P
    from ..discovery import resolve_address
    from ..errors import CwError

    cluster = cluster_from(cluster_name, cluster_dir)
    address = resolve_address(None, cluster)
    if address:
        try:
            doc = ask(address, cluster.key(), P.RETRY, {"run": run})
            click.echo(f"{doc['retried']} failed jobs of run {run} requeued by the master at {address}")
            return
        except CwError as e:
            click.echo(f"master at {address} did not answer ({e}); changing the store", err=True)
    from ..store import Store

    if not cluster.store_path.exists():
        raise click.ClickException(f"no store at {cluster.store_path}")
    if not cluster.lock():  # the store has one writer: a master that is alive but silent
        raise click.ClickException(f"a master holds {cluster.path} but does not answer; try again")
    try:
        store = Store(cluster.store_path)
        n = len(store.retry_failed(run))
        store.close()
    finally:
        cluster.unlock()
    click.echo(f"{n} failed jobs of run {run} will run when a master starts on {cluster.path}")


cli.add_command(master_cmd)
cli.add_command(worker_cmd)


def _add_launchers() -> None:
    """`cw slurm ...`, `cw sge ...`: one command group per batch system in cw.launchers' registry."""
    from .launch import add_backends

    add_backends(cli)


_add_launchers()


def main() -> None:
    cli(prog_name="cw")


def master_main() -> None:
    master_cmd(prog_name="python -m cw.master")


def worker_main() -> None:
    worker_cmd(prog_name="python -m cw.worker")
