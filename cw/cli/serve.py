"""`cw master` and `cw worker` (also ``python -m cw.master`` and ``python -m cw.worker``)."""

from __future__ import annotations

import json
import os

import click

from .. import defaults
from .common import cluster_from, cluster_options, log_option, parse_duration, setup_logging


def parse_caps(items: tuple[str, ...]) -> dict:
    """('gpus=1', 'arch="x86"') -> {'gpus': 1, 'arch': 'x86'}: values are JSON, else text."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--cap")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


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
@click.option("--encrypt", is_flag=True,
              help="Encrypt the wire (CurveZMQ, keys derived from the cluster key). Recorded in the"
                   " cluster directory (file `curve`): workers, clients and later masters follow.")
@click.option("--max-connections", type=click.IntRange(min=1), default=defaults.MAX_CONNECTIONS,
              show_default=True, help="Connections open at once; more are refused (and logged).")
@log_option
def master_cmd(cluster_name, cluster_dir, bind, port, host, interface, heartbeat, worker_timeout,
               queue_window, watch_pid, keep_pool, poll, encrypt, max_connections, log_level):
    """Run a master: accept clients, hand their jobs to workers, store everything.

    On a cluster directory whose store holds unfinished jobs (a master that
    crashed or was stopped), it requeues them and carries on.
    """  # fmt: skip
    from ..errors import CwError
    from ..launchers.keeper import keeper_for
    from ..master import Master, run_master

    setup_logging(log_level)
    cluster = cluster_from(cluster_name, cluster_dir)
    try:
        companions = [keeper_for(cluster, poll)] if keep_pool else []
        m = Master(cluster=cluster, bind=bind, port=port, host=host, interface=interface,
                   heartbeat=heartbeat, worker_timeout=worker_timeout, queue_window=queue_window,
                   watch_pid=watch_pid, encrypt=encrypt, max_connections=max_connections)  # fmt: skip
        click.echo(f"cw master listening on {m.address}{' (encrypted)' if m.encrypt else ''}")
        click.echo(f"published {m.cluster.master_json}")
        run_master(m, companions)
    except CwError as e:
        if getattr(e, "reported", False):  # its one line is in the log already
            raise SystemExit(1) from None
        raise click.ClickException(str(e)) from None


@click.command("worker")
@click.argument("host", required=False)
@cluster_options
@click.option("--procs", type=int, default=None,
              help="Executor processes (default: $SLURM_CPUS_PER_TASK, $NSLOTS, or 1).")
@click.option("--tag", "tags", multiple=True, help="A capability tag jobs may require (repeatable).")
@click.option("--cap", "caps", multiple=True, metavar="KEY=VALUE",
              help="A capability to advertise, over what the worker finds (e.g. gpus=1; repeatable).")
@click.option("--heartbeat", type=float, default=defaults.HEARTBEAT, show_default=True,
              help="Seconds between heartbeats on an idle link.")
@click.option("--master-timeout", type=float, default=defaults.MASTER_TIMEOUT, show_default=True,
              help="Seconds of silence after which the master is presumed lost and we reconnect.")
@click.option("--give-up", type=float, default=defaults.GIVE_UP, show_default=True,
              help="Exit after the master has been unreachable this many seconds.")
@click.option("--grace", type=float, default=defaults.GRACE, show_default=True,
              help="Seconds a draining worker lets running jobs finish before handing them back.")
@click.option("--term-grace", type=click.FloatRange(min=0), default=None,
              help="The grace after a SIGTERM, when less (a plain scancel's SIGKILL follows KillWait"
                   " later; cw slurm up sets it below KillWait).")
@click.option("--lifetime", default=None, metavar="DURATION",
              help="Drain by itself after this long (e.g. 3:55:00, 90m, 3600).")
@click.option("--watch-pid", type=int, default=None, metavar="PID",
              help="Drain when process PID ends (LocalCluster's processes end with their owner).")
@click.option("--scratch-dir", default=lambda: os.environ.get("CW_SCRATCH_DIR"), metavar="DIR",
              type=click.Path(file_okay=False),
              help="Where jobs' scratch and outputs live on this node's disk (default: $CW_SCRATCH_DIR,"
                   " else $TMPDIR or /tmp).")
@log_option
def worker_cmd(host, cluster_name, cluster_dir, procs, tags, caps, heartbeat, master_timeout, give_up,
               grace, term_grace, lifetime, watch_pid, scratch_dir, log_level):
    """Run a worker for the master at HOST (default: the address in master.json).

    SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 drain it: no new jobs, unstarted jobs go
    back to the master at once, running ones get --grace seconds (--term-grace after
    a SIGTERM, when less); a second signal
    stops it at once. Jobs handed back are not charged an attempt.
    """  # fmt: skip
    from ..errors import CwError
    from ..worker import run_worker

    setup_logging(log_level)
    try:
        run_worker(address=host, cluster=cluster_from(cluster_name, cluster_dir), procs=procs,
                   tags=list(tags), caps=parse_caps(caps), heartbeat=heartbeat, master_timeout=master_timeout, give_up=give_up,
                   grace=grace, term_grace=term_grace, lifetime=parse_duration(lifetime) if lifetime else None,
                   watch_pid=watch_pid, scratch=scratch_dir)  # fmt: skip
    except CwError as e:
        raise click.ClickException(str(e)) from None
