"""The master: routing, scheduling, heartbeats, recovery."""

from .server import Master, batch_label, run_master, satisfies

__all__ = ["Master", "batch_label", "run_master", "satisfies"]
