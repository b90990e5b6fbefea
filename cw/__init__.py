"""cw (Cluster-Workers): throw hundreds of CPUs at Python functions.

    import cw
    with cw.Client() as client:          # finds the master, or starts a local cluster
        futures = client.map(f, range(100))
        print(client.gather(futures))
"""

from __future__ import annotations

import logging as _logging
import os as _os

from .version import __version__  # noqa: F401


class _DefaultHandler(_logging.StreamHandler):
    """Shows cw's INFO lines on stderr until the application configures logging."""

    def emit(self, record: _logging.LogRecord) -> None:
        if not _logging.getLogger().handlers:
            super().emit(record)


_log = _logging.getLogger("cw")
if not _log.handlers:
    _h = _DefaultHandler()
    _h.setFormatter(_logging.Formatter("cw %(levelname)s: %(message)s"))
    _log.addHandler(_h)
    _log.setLevel(_os.environ.get("CW_LOG_LEVEL", "INFO").upper())

from .client import Client, ClientThread, Executor, Future, Ref, as_completed, get_client, wait  # noqa: E402
from .command import CompletedCommand  # noqa: E402
from .errors import (  # noqa: E402
    AuthenticationError,
    CommandError,
    CwError,
    DependencyError,
    JobCrashedError,
    JobError,
    MessageTooLargeError,
    NoMasterError,
    OutputsError,
    RemoteImportError,
    SerializationError,
    SetupError,
    TimeoutError,
    UnsatisfiableError,
    WorkerLostError,
)
from .job import outputs, scratch  # noqa: E402
from .launchers.local import LocalCluster  # noqa: E402

# Client() with no master configured starts a LocalCluster (the client layer knows no launcher)
Client.embedded = LocalCluster

# loaded when first used: a worker or a client that needs none of them stays light
_LAZY = {"SlurmCluster", "SGECluster", "slurm_master_host", "sge_master_host"}


def __getattr__(name: str):
    if name in _LAZY:
        from .launchers import cluster

        return getattr(cluster, name)
    raise AttributeError(f"module 'cw' has no attribute {name!r}")


__all__ = [
    "Client", "ClientThread", "CompletedCommand", "Executor", "Future", "LocalCluster", "Ref", "SGECluster",
    "SlurmCluster", "as_completed", "get_client", "outputs", "scratch", "sge_master_host", "slurm_master_host",
    "wait",
    "AuthenticationError", "CommandError", "CwError", "DependencyError", "OutputsError", "JobCrashedError",
    "JobError", "MessageTooLargeError", "NoMasterError", "RemoteImportError", "SerializationError", "SetupError",
    "TimeoutError", "UnsatisfiableError", "WorkerLostError",
]  # fmt: skip
