"""LocalCluster: a master and workers as local processes (the embedded default)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..client import Client
from ..discovery import ClusterDir

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A master and ``n_workers`` workers on this machine, on loopback.

    Uses the cluster directory ``$CW_HOME/local`` (so a re-run finds its stored
    results), or a fresh temporary one when another local master holds it.
    Every process ends with the cluster (``close()``, the context manager, or
    the death of this process).
    """

    def __init__(self, n_workers: int | None = None, procs: int = 1,
                 cluster: str | os.PathLike | None = None, tags: list[str] | None = None):  # fmt: skip
        self.n_workers = n_workers if n_workers is not None else (os.cpu_count() or 1)
        self.cluster = ClusterDir(path=cluster) if cluster else ClusterDir(name="local")
        if self.cluster.lock():  # free: ours (the master takes the lock itself)
            self.cluster.unlock()
        else:
            self.cluster = ClusterDir(path=tempfile.mkdtemp(prefix="cw-local-"))
        self.cluster.key(create=True)  # before any process needs it
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.logs = self.cluster.path / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        base = [sys.executable, "-m"]
        cdir = ["--cluster-dir", str(self.cluster.path)]
        try:
            self.master = self._spawn("master", base + ["cw.master", *cdir, "--bind", self.address])
            for i in range(self.n_workers):
                extra = [a for t in (tags or []) for a in ("--tag", t)]
                self._spawn(f"worker-{i}", base + ["cw.worker", self.address, *cdir,
                                                    "--procs", str(procs), "--give-up", "30", *extra])  # fmt: skip
        except BaseException:
            self.close()
            raise
        log.info("started a local cw cluster: master %s, %d workers (logs in %s)",
                 self.address, self.n_workers, self.logs)  # fmt: skip

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        env = dict(os.environ)
        env.pop("CW_ADDRESS", None)
        env.pop("CW_KEY", None)
        fd = os.open(self.logs / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as out:
            # --watch-pid: each process ends when this one does (a parent-death signal
            # would fire when the creating *thread* ends)
            p = subprocess.Popen([*cmd, "--watch-pid", str(os.getpid())], stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        self.procs.append(p)
        return p

    def client(self, **kwargs: Any) -> Client:
        """A client of this cluster (the same as ``cw.Client(cluster)``)."""
        return Client(self, **kwargs)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers, then the master; kill what does not stop in time."""
        workers = [p for p in self.procs if p is not getattr(self, "master", None)]
        for group in (workers, [p for p in self.procs if p not in workers]):
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for p in group:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("local cw process %d did not stop: killing it", p.pid)
                    p.kill()
                    p.wait()
        self.procs = []

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def store_path(self) -> Path:
        return self.cluster.store_path
