"""Launchers: pools of workers on batch systems, and the local cluster.

The registry of batch systems lives here. A backend is a module of this
package that defines ``BACKEND = <a Scheduler subclass>`` (see
:mod:`cw.launchers.base`); :func:`backends` finds every one of them, so
adding a batch system is adding its module. The framework modules
(``base``, ``pool``, ``keeper``, ``local``, ``adapt``, ``elastic``, ``owner``,
``cluster``, ``surface``: :data:`FRAMEWORK`) are not backends.

Inside a job, :func:`environment` names the batch system running this
process: backends are asked in the alphabetical order of their module names
and the first whose environment is ``activated`` answers, else
:class:`~cw.launchers.base.NoBatch`. Each ``activated`` is precise enough
(SLURM: ``SLURM_JOB_ID``; Grid Engine: ``JOB_ID`` with ``SGE_TASK_ID``) that
the order only matters for an environment made up to fool it.

Importing this package is light (no click, zmq, master, client or pool): every
worker does it at start.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import threading
from typing import Mapping

from .base import JobEnvironment, NoBatch, Option, Scheduler

log = logging.getLogger(__name__)

#: Modules of this package that are the framework, not backends.
FRAMEWORK = frozenset({"base", "pool", "keeper", "local", "adapt", "elastic", "owner", "cluster", "surface"})

_registry: dict[str, type[Scheduler]] | None = None
_registry_lock = threading.Lock()


def backends() -> dict[str, type[Scheduler]]:
    """Every batch system's Scheduler class, by name, in the order of their module names.

    Found once per process (then cached) by importing each module of this
    package but the framework's and keeping its ``BACKEND``. A module that
    fails to import is logged at WARNING and skipped: one broken backend
    never takes the others down.
    """
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = _discover()
        return dict(_registry)


def clear_cache() -> None:
    """Forget the backends found: the next :func:`backends` looks again."""
    global _registry
    with _registry_lock:
        _registry = None


def _discover() -> dict[str, type[Scheduler]]:
    found: dict[str, type[Scheduler]] = {}
    modules = sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
    for m in modules:
        if m.name in FRAMEWORK or m.name.startswith("_") or m.ispkg:
            continue
        try:
            module = importlib.import_module(f"{__name__}.{m.name}")
        except Exception as e:
            log.warning("batch system module cw.launchers.%s cannot be imported, skipped: %r", m.name, e)
            continue
        cls = getattr(module, "BACKEND", None)
        if cls is None:
            continue  # a module of the package that is not a backend
        if not (isinstance(cls, type) and issubclass(cls, Scheduler)):
            log.warning("cw.launchers.%s: BACKEND is not a Scheduler subclass, skipped", m.name)
            continue
        if cls.name in found:
            log.warning("cw.launchers.%s: a backend named %r exists already, skipped", m.name, cls.name)
            continue
        found[cls.name] = cls
    return found


def environment(env: Mapping[str, str] | None = None) -> JobEnvironment:
    """The job environment of this process (or of ``env``): the first backend's that is
    activated, else NoBatch.

    Each call builds a new object; keep it to benefit from its deadline cache.
    """
    env = dict(os.environ if env is None else env)
    for cls in backends().values():
        try:
            if cls.environment.activated(env):
                return cls.environment(env)
        except Exception as e:  # a backend's bug must not stop a worker from starting
            log.warning("%s: cannot tell whether this is one of its jobs: %r", cls.name, e)
    return NoBatch(env)


def environment_of(info: Mapping[str, str] | None) -> JobEnvironment:
    """The job environment a worker reported (its HELLO's ``info``), for the master."""
    return environment(dict(info or {}))


__all__ = ["FRAMEWORK", "JobEnvironment", "NoBatch", "Option", "Scheduler", "backends", "clear_cache",
           "environment", "environment_of"]  # fmt: skip
