"""`cw <batch system> up | status | down`."""

from __future__ import annotations

import importlib
import logging

import click


def add_backends(group: click.Group) -> None:
    for name in ("slurm", "sge"):
        try:
            mod = importlib.import_module(f"cw.launchers.{name}")
        except Exception as e:  # a broken launcher must not take every other command down
            logging.getLogger(__name__).warning("cw %s is unavailable: %r", name, e)
            continue
        group.add_command(mod.cli, name)
