"""What a worker offers jobs, found without being told: CPUs, memory, GPUs, host, partition.

The batch system's job environment (:mod:`cw.launchers`) says which CPUs and
how much memory the worker was given, and its partition (SLURM) or queue
(Grid Engine); the host says the rest. GPUs come from ``nvidia-smi`` when it
is on the PATH (count, model, memory), restricted to ``CUDA_VISIBLE_DEVICES``
when that is set (a batch system sets it to the devices it gave), or from
``CUDA_VISIBLE_DEVICES`` alone. ``--tag`` and ``--cap name=value`` add to
this (and ``--cap`` overrides it). The device ids are what jobs requiring
GPUs get, each their own (:class:`Devices`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
from typing import Any, Mapping, Optional

from ..defaults import PROBE_TIMEOUT
from ..resources import parse_bytes

log = logging.getLogger(__name__)


def detect_gpus(environ: Mapping[str, str] = os.environ) -> tuple[list[str], Optional[str]]:
    """(device ids, model) of the GPUs this process may use; ([], None) if none."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        if not ids or ids[0] in ("-1", "NoDevFiles"):
            return [], None  # hidden on purpose
    else:
        ids = None
    smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    rows = []
    if smi:
        try:
            out = _probe([smi, "--query-gpu=index,uuid,name", "--format=csv,noheader"], environ)
            if out.returncode == 0:
                rows = [[x.strip() for x in line.split(",", 2)] for line in out.stdout.splitlines() if line.count(",") >= 2]
            else:
                log.warning("nvidia-smi failed (%s): GPUs from CUDA_VISIBLE_DEVICES only", out.stderr.strip()[:200])
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("nvidia-smi did not answer (%s): GPUs from CUDA_VISIBLE_DEVICES only", e)
    if not rows:
        return ids or [], None
    if ids is not None:  # the batch system's devices, by index or UUID, in its order
        known = {r[0]: r for r in rows} | {r[1]: r for r in rows}
        rows = [known[d] for d in ids if d in known]
        return ids, (rows[0][2] if rows else None)
    models = sorted({r[2] for r in rows})
    return [r[0] for r in rows], " / ".join(models)


def capabilities(procs: int, tags: list[str], env: Any, environ: Mapping[str, str] = os.environ,
                 told: Optional[dict] = None) -> tuple[dict, list[str]]:  # fmt: skip
    """What this worker offers jobs, and its GPU device ids (what jobs requiring GPUs share).

    ``env`` is the batch system's job environment; ``told`` what ``--cap`` said,
    which wins over what was found.
    """
    caps: dict[str, Any] = {"cpus": env.cpus() or procs, "host": socket.gethostname(), "tags": sorted(tags)}
    mem = env.memory()
    if mem is None:
        try:
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            pass
    if mem is not None:
        caps["mem"] = mem
    where = env.partition()
    if where:
        caps["queue" if getattr(env, "system", "") == "sge" else "partition"] = where
    devices, model = detect_gpus(environ)
    caps["gpus"] = len(devices)
    if model:
        caps["gpu_model"] = model
    told = dict(told or {})
    if "mem" in told:
        told["mem"] = parse_bytes(told["mem"])
    if "gpus" in told and told["gpus"] != len(devices):
        n = int(told["gpus"])
        devices = devices[:n] if n <= len(devices) else [str(i) for i in range(n)]
    caps.update(told)
    return caps, devices


def _probe(argv: list[str], environ: Mapping[str, str]) -> subprocess.CompletedProcess:
    """Run a probe in a process group of its own: one that hangs is killed with whatever it
    started (a hung ``nvidia-smi`` leaves helpers behind)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(environ), start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


class Devices:
    """The worker's GPUs, handed to the jobs that need them: each job its own."""

    def __init__(self, ids: list[str]):
        self.free = list(ids)
        self.held: dict[int, list[str]] = {}  # job id -> its devices

    def take(self, jid: int, n: int) -> Optional[list[str]]:
        """n devices for a job, or None if fewer are free (it waits)."""
        if n > len(self.free):
            return None
        got, self.free = self.free[:n], self.free[n:]
        self.held[jid] = got
        return got

    def give_back(self, jid: int) -> None:
        got = self.held.pop(jid, None)
        if got:
            self.free = sorted(self.free + got, key=lambda d: (len(d), d))
