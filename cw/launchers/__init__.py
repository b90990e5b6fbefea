"""Launchers: pools of workers on batch systems, and the local cluster."""

from __future__ import annotations

import os
from typing import Mapping

_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "JOB_ID", "SGE_TASK_ID")


class _Environment:
    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def info(self) -> dict:
        return {k: self.env[k] for k in _VARS if k in self.env}

    def task(self) -> str:
        return batch_label(self.info(), scheduler=False)

    def label(self) -> str:
        return batch_label(self.info())

    def cpus(self) -> int | None:
        for var in ("SLURM_CPUS_PER_TASK", "NSLOTS"):
            v = self.env.get(var, "")
            if v.isdigit() and int(v) > 0:
                return int(v)
        return None

    def memory(self) -> int | None:
        mem = self.env.get("SLURM_MEM_PER_NODE", "")
        return int(mem) * 1024 * 1024 if mem.isdigit() else None

    def deadline(self) -> float | None:
        from .pool import batch_deadline

        return batch_deadline()

    def post_mortem(self) -> str | None:
        from .pool import post_mortem

        return post_mortem(self.info())


def environment(env: Mapping[str, str] | None = None) -> _Environment:
    return _Environment(os.environ if env is None else env)


def environment_of(info: dict) -> _Environment:
    return _Environment(info)



def batch_label(info: dict, scheduler: bool = True) -> str:
    """'SLURM job 123_4' / 'SGE job 77.3' (or '123_4' / '77.3') from a worker's batch info, or ''."""
    if "SLURM_JOB_ID" in info:
        if "SLURM_ARRAY_JOB_ID" in info:
            job = f"{info['SLURM_ARRAY_JOB_ID']}_{info.get('SLURM_ARRAY_TASK_ID', '?')}"
        else:
            job = str(info["SLURM_JOB_ID"])
        return f"SLURM job {job}" if scheduler else job
    if "JOB_ID" in info:
        task = info.get("SGE_TASK_ID")
        job = f"{info['JOB_ID']}{f'.{task}' if task and task != 'undefined' else ''}"
        return f"SGE job {job}" if scheduler else job
    return ""
