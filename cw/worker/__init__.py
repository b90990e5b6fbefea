"""The worker: an agent process (:mod:`cw.worker.agent`) and its executor children
(:mod:`cw.worker.executor`)."""

from .agent import Agent, run_worker

__all__ = ["Agent", "run_worker"]
