"""The ``cw`` command line: the only place that prints or knows click.

- :mod:`cw.cli.serve`: `cw master`, `cw worker` (and ``python -m cw.master`` / ``cw.worker``);
- :mod:`cw.cli.jobs`: `cw status`, `cw results`, `cw logs`, `cw retry`;
- :mod:`cw.cli.store`: `cw store check | recover`;
- :mod:`cw.cli.top`: `cw top`, the live terminal view; :mod:`cw.cli.views`: what it and the
  dashboard show (the master's status and the store, read-only); :mod:`cw.cli.dashboard`:
  `cw dashboard`, which serves :mod:`cw.dashboard`;
- :mod:`cw.cli.files`: `cw pull`;
- :mod:`cw.cli.runfile`: `cw run-file`, `cw template`;
- :mod:`cw.cli.pause`: `cw pause`, `cw resume`;
- :mod:`cw.cli.launch`: `cw <batch system> up | status | scale | down`, one group per backend;
- :mod:`cw.cli.doctor`: `cw doctor`;
- :mod:`cw.cli.common`: the options and helpers they share.
"""

from __future__ import annotations

import click

from ..version import __version__
from .dashboard import dashboard_cmd
from .doctor import doctor_cmd
from .files import pull_cmd
from .jobs import logs_cmd, results_cmd, retry_cmd, status_cmd
from .launch import add_backends
from .pause import pause_cmd, resume_cmd
from .runfile import run_file_cmd, template_cmd
from .serve import master_cmd, worker_cmd
from .store import store_group
from .top import top_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cw")
def cli() -> None:
    """cw (Cluster-Workers): run Python functions on a pool of workers."""


for _cmd in (master_cmd, worker_cmd, status_cmd, results_cmd, logs_cmd, retry_cmd, run_file_cmd, template_cmd,
             pull_cmd, pause_cmd, resume_cmd, top_cmd, dashboard_cmd, store_group, doctor_cmd):
    cli.add_command(_cmd)
add_backends(cli)


def main() -> None:
    cli(prog_name="cw")


def master_main() -> None:
    master_cmd(prog_name="python -m cw.master")


def worker_main() -> None:
    worker_cmd(prog_name="python -m cw.worker")
