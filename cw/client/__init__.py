"""Clients: ``Client`` (futures), ``Executor`` (concurrent.futures) and ``ClientThread``.

All three sit on one :class:`~cw.client.connection.Connection`; futures and
the errors a job's outcome becomes live in :mod:`cw.client.futures`.
"""

from .client import Client, get_client
from .executor import Executor
from .futures import Future, as_completed
from .graph import Ref, wait
from .thread import ClientThread

__all__ = ["Client", "ClientThread", "Executor", "Future", "Ref", "as_completed", "get_client", "wait"]
