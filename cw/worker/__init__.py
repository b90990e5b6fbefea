"""The worker: an agent process and its executor children."""

from .agent import Agent, run_worker

__all__ = ["Agent", "run_worker"]
