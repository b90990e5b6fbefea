"""Fixtures: real masters and workers as processes, each stopped by its test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cw.discovery import ClusterDir


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; return its value or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Procs:
    """Processes started by one test; all stopped at its end, even on failure."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, *args: str, env: dict | None = None, cwd: str | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        p = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}, cwd=cwd)  # fmt: skip
        log.close()
        self.procs.append((name, p))
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def cw_home(tmp_path, monkeypatch):
    """An empty CW_HOME: no master is configured anywhere."""
    home = tmp_path / "cwhome"
    monkeypatch.setenv("CW_HOME", str(home))
    for var in ("CW_ADDRESS", "CW_KEY", "CW_CLUSTER"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.stop()


@pytest.fixture
def master(cw_home, procs):
    """A real `python -m cw.master` on a random port, published in CW_HOME/default."""
    cluster = ClusterDir()
    p = procs.start("master", "-m", "cw.master", "--port", "0", "--heartbeat", "0.2")
    wait_for(lambda: cluster.master_address() or p.poll() is not None, what="master.json")
    assert p.poll() is None, procs.log("master")
    return cluster


def start_workers(procs: Procs, n: int = 2, *extra: str, address: str | None = None):
    ps = []
    for _ in range(n):
        args = ["-m", "cw.worker", *([address] if address else []), "--heartbeat", "0.2", *extra]
        ps.append(procs.start(f"worker-{len(procs.procs)}", *args))
    return ps


@pytest.fixture
def workers(master, procs):
    """Two single-process workers joined to `master`."""
    return start_workers(procs, 2)
