"""Clients: Client (futures), Executor (concurrent.futures) and ClientThread."""

from .client import Client, ClientThread, Executor, Future, as_completed

__all__ = ["Client", "ClientThread", "Executor", "Future", "as_completed"]
