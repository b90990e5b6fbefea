"""`cw pause` and `cw resume`: a workstation's worker given back to the person at it, for a while."""

from __future__ import annotations

import click

from .. import protocol as P
from ..discovery import resolve_address
from ..errors import ConfigError, CwError
from ..link import ask
from .common import cluster_from, cluster_options, parse_duration


def _targets(host, worker, every) -> dict | None:
    """The master's selector, or None: this user's workers on this host, through their sockets."""
    if every:
        return {}
    if host or worker:
        return {k: v for k, v in (("host", host), ("worker", worker)) if v}
    return None


def _through_master(cluster, kind: bytes, header: dict) -> list[str]:
    address = resolve_address(None, cluster)
    if not address:
        raise click.ClickException(f"no master found for {cluster.path}: pausing by host or worker goes"
                                   " through it (with no selector, `cw pause` pauses this host's workers)")  # fmt: skip
    try:
        doc = ask(address, cluster.key(), kind, header, encrypt=cluster.encrypted())
    except (CwError, ConfigError) as e:
        raise click.ClickException(f"the master at {address} did not answer: {e}") from None
    if doc.get("ambiguous"):
        raise click.ClickException(f"--worker {header.get('worker')} starts the ids of {len(doc['ambiguous'])} workers"
                                   f" ({', '.join(doc['ambiguous'])}): give more of the one you mean")  # fmt: skip
    return doc.get("paused" if kind == P.PAUSE else "resumed", [])


def _locally(request: dict, cluster_name, cluster_dir) -> list[str]:
    """This user's workers on this host (of the named cluster only, if one is named) that the
    request changed or, for a pause, that are paused."""
    from ..worker.pause import ask_local, control_sockets

    if cluster_name or cluster_dir:
        request = dict(request, cluster=str(cluster_from(cluster_name, cluster_dir).path))
    reached, problems = [], []
    for path in control_sockets():
        try:
            answer = ask_local(path, request)
        except (OSError, ValueError) as e:  # a worker stopped, or ending
            problems.append(f"{path}: {e}")
            continue
        if "error" in answer:
            problems.append(f"{path}: {answer['error']}")
        elif not answer.get("other") and ("pause" in request or answer.get("changed")):
            reached.append(str(answer.get("id")))
    for p in problems:
        click.echo(f"  (skipped {p})", err=True)
    return reached


@click.command("pause")
@cluster_options
@click.option("--host", default=None, metavar="HOST", help="Pause the workers on HOST (through the master).")
@click.option("--worker", default=None, metavar="ID", help="Pause the worker with this id, or the start of it naming one worker (through the master).")
@click.option("--all", "every", is_flag=True, help="Pause every worker (through the master).")
@click.option("--for", "duration", default=None, metavar="DURATION",
              help="Resume by itself after this long (90, 30m, 1h, 1:30:00).")
@click.option("--stop-running", is_flag=True,
              help="Also stop the running jobs (SIGSTOP; continued on resume; stopped time is not"
                   " counted against their timeout).")
def pause_cmd(cluster_name, cluster_dir, host, worker, every, duration, stop_running):
    """Pause workers: they take no new jobs (what they hold but have not started goes back
    to the queue); with --stop-running their running jobs stop too.

    With no --host, --worker or --all, pauses your own workers on this host (of every
    cluster, or of the one --cluster names), through a socket only you can reach: no
    cluster key needed.
    """  # fmt: skip
    seconds = parse_duration(duration) if duration else None
    selector = _targets(host, worker, every)
    if selector is None:
        ids = _locally({"pause": {"seconds": seconds, "stop": stop_running}}, cluster_name, cluster_dir)
        where = "on this host"
    else:
        header = dict(selector, stop=stop_running) if stop_running else dict(selector)
        if seconds is not None:
            header["seconds"] = seconds
        ids = _through_master(cluster_from(cluster_name, cluster_dir), P.PAUSE, header)
        where = "through the master"
    if not ids:
        raise click.ClickException(f"no worker paused {where}: none matched")
    what = "paused" + (", their running jobs stopped" if stop_running else "") + (f", for {seconds:g} s" if duration else "")
    click.echo(f"{len(ids)} workers {what}: {', '.join(ids)}")


@click.command("resume")
@cluster_options
@click.option("--host", default=None, metavar="HOST", help="Resume the workers on HOST (through the master).")
@click.option("--worker", default=None, metavar="ID", help="Resume the worker with this id, or the start of it naming one worker.")
@click.option("--all", "every", is_flag=True, help="Resume every worker (through the master).")
def resume_cmd(cluster_name, cluster_dir, host, worker, every):
    """Resume paused workers: they take jobs again, and stopped jobs continue.

    With no --host, --worker or --all, resumes your own workers on this host (of every
    cluster, or of the one --cluster names).
    """
    selector = _targets(host, worker, every)
    if selector is None:
        ids = _locally({"resume": {}}, cluster_name, cluster_dir)
    else:
        ids = _through_master(cluster_from(cluster_name, cluster_dir), P.RESUME, selector)
    if not ids:
        raise click.ClickException("no worker resumed: none matched")
    click.echo(f"{len(ids)} workers resumed: {', '.join(ids)}")
