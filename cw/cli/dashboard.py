"""`cw dashboard`: serve the web dashboard (cw.dashboard) and print its URL with its token."""

from __future__ import annotations

import signal
import socket
from typing import Any

import click

from ..errors import CwError
from .common import cluster_from, cluster_options


@click.command("dashboard")
@cluster_options
@click.option("--port", default=8787, show_default=True, type=int, help="Port (a free one if taken; 0: any).")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Interface to listen on. The default keeps it to this host: reach it with ssh -L.")
@click.option("--interval", default=1.0, show_default=True, type=float,
              help="Seconds between status requests to the master (one per refresh, whatever the browsers).")
@click.option("--token", default=None, help="The access token (default: a new random one).")
def dashboard_cmd(cluster_name, cluster_dir, port, bind, interval, token):
    """A web page with live charts, runs, workers, failures and each job's page.

    Prints a URL with a token: without the token, no page and no data.
    """
    try:
        from ..dashboard import Dashboard
    except ImportError as e:
        raise click.ClickException(f"cw dashboard needs its extra: pip install 'cw[dashboard]' ({e})") from None
    cluster = cluster_from(cluster_name, cluster_dir, read=True)
    try:
        dash = Dashboard(cluster, bind=bind, port=port, interval=interval, token=token)
    except (CwError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"cw dashboard for {cluster.path}")
    click.echo(f"  {dash.url}")
    click.echo(f"  from your machine: ssh -L {dash.port}:127.0.0.1:{dash.port} {socket.gethostname()}"
               f"  then open the same URL")  # fmt: skip
    click.echo("  (Ctrl-C stops it)", nl=True)

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        dash.serve_forever()
    except KeyboardInterrupt:
        pass
