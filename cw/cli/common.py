"""What every `cw` command shares: the cluster options, logging, durations."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

import click

from .. import defaults
from ..discovery import ClusterDir

CLUSTER_OPTIONS = [
    click.option("--cluster", "cluster_name", default=None, metavar="NAME",
                 help="Cluster name: the folder under $CW_HOME (default: $CW_CLUSTER or 'default')."),
    click.option("--cluster-dir", default=None, type=click.Path(file_okay=False),
                 help="The cluster directory itself (overrides --cluster and $CW_HOME)."),
]  # fmt: skip

log_option = click.option(
    "--log-level", default=lambda: os.environ.get("CW_LOG_LEVEL", "INFO"), show_default="INFO",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Logging threshold (also $CW_LOG_LEVEL).",
)  # fmt: skip


def with_options(options: list) -> Callable:
    """Apply a list of click options to a command, in order."""

    def deco(f: Callable) -> Callable:
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


cluster_options = with_options(CLUSTER_OPTIONS)


def cluster_from(cluster_name: str | None, cluster_dir: str | None, read: bool = False) -> ClusterDir:
    """The cluster directory named by --cluster / --cluster-dir (or the environment).

    A command that only reads (``read``), given no cluster at all, reads the cluster a script
    with no configuration used: the default one if it has a master or a store, else the
    embedded local cluster's (``$CW_HOME/local``) if that has a store.
    """
    if cluster_dir:
        return ClusterDir(path=cluster_dir)
    cluster = ClusterDir(name=cluster_name)
    if read and not cluster_name and not os.environ.get("CW_CLUSTER"):
        local = ClusterDir(name=defaults.LOCAL_CLUSTER)
        if not (cluster.master_json.exists() or cluster.store_path.exists()) and local.store_path.exists():
            logging.getLogger(__name__).info("no default cluster here: reading the embedded local cluster's"
                                             " (%s)", local.path)  # fmt: skip
            return local
    return cluster


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def parse_duration(text: str) -> float:
    """'90' (seconds), '90s', '30m', '2h', '1d', '4:00:00', '1-12:00:00' -> seconds."""
    t = text.strip()
    try:
        if t[-1:] in "smhd" and t[:-1]:
            return float(t[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[t[-1]]
        days = 0.0
        if "-" in t:
            d, t = t.split("-", 1)
            days = float(d)
        parts = [float(x) for x in t.split(":")]
        if len(parts) > 3:
            raise ValueError
        secs = sum(v * 60**i for i, v in enumerate(reversed(parts)))
        return days * 86400 + secs
    except (ValueError, IndexError):
        raise click.BadParameter(f"{text!r} is not a duration (try 3600, 90m, 4:00:00)") from None
