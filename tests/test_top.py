"""`cw top` for real: run in tmux beside a live cluster, read off the screen as a person would."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from clusters import IN_CI
from conftest import wait_for

import cw

pytestmark = pytest.mark.timeout(180)


def nap(s):
    time.sleep(s)
    return s


def bad(x):
    raise ValueError(f"top sees this {x}")


class Tmux:
    """A private tmux server (its own socket) running one command in a 160x50 pane."""

    def __init__(self, name: str):
        if shutil.which("tmux") is None:
            msg = "tmux is not installed: bash scripts/test.sh installs it (apt-get install tmux)"
            if IN_CI:
                pytest.fail(msg)
            pytest.skip(msg)
        self.sock = f"cw-test-{os.getpid()}-{name}"

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True,
                              timeout=20).stdout  # fmt: skip

    def start(self, command: str) -> None:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in os.environ.items() if k.startswith(("CW_", "PYTHON")))
        p = subprocess.run(["tmux", "-L", self.sock, "-f", "/dev/null", "new-session", "-d", "-s", "top",
                            "-x", "160", "-y", "50", f"env -u COLUMNS -u LINES {env} {command}; echo TOP-EXITED $?; sleep 120"],
                           capture_output=True, text=True, timeout=20)  # fmt: skip
        if p.returncode != 0:
            pytest.fail(f"tmux cannot start: {p.stderr}")
        self.tmux("resize-window", "-t", "top", "-x", "160", "-y", "50")  # no client attached: say the size

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "top", *keys)

    def wait(self, *texts: str, timeout: float = 30) -> str:
        """The screen once every text is on it; the test fails showing the last screen."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if all(t in screen for t in texts):
                return screen
            if time.monotonic() > deadline:
                pytest.fail(f"after {timeout} s, {[t for t in texts if t not in screen]} not on the screen:\n{screen}")
            time.sleep(0.1)

    def close(self) -> None:
        self.tmux("kill-server")


def _split(line: str) -> list[str]:
    return [c.strip() for c in line.split("│") if c.strip()]


def _cells(screen: str, first: str) -> list[str]:
    """The cells of the table row whose first cell starts with ``first``."""
    for line in screen.splitlines():
        cells = _split(line)
        if cells and any(c.startswith(first) for c in cells[:1] + cells[-1:]):
            return cells
    return []


@pytest.fixture
def tmux(request):
    t = Tmux(request.node.name[-20:])
    yield t
    t.close()


def test_top_shows_master_runs_workers_and_failures_and_takes_keys(master, workers, tmux):
    top = f"{shlex.quote(sys.executable)} -m cw top --interval 0.3"
    with cw.Client(run="watched") as c, cw.Client(run="other") as c2:
        c.submit(bad, 7).exception(30)
        c2.submit(nap, 0.1).result(30)
        # distinct arguments: in a run, the same call twice is one job
        longs = [c.submit(nap, 60 + i) for i in range(2)]  # both workers idle: one each
        queued = [c.submit(nap, 70 + i) for i in range(3)]
        wait_for(lambda: all(f.running() for f in longs), timeout=30, what="two jobs running")
        tmux.start(top)
        screen = tmux.wait("cw top", "master ", "watched", "other", "ValueError: top sees this 7", timeout=40)
        # the master line, a run's counts, each worker busy with its job, the failure's first line
        assert "jobs/s in" in screen and "workers 2" in screen
        # run, queued, running, done, failed
        assert _cells(screen, "watched")[:5] == ["watched", "3", "2", "0", "1"], screen
        assert _cells(screen, "other")[:5] == ["other", "0", "0", "1", "0"], screen
        busy = [cells for cells in map(_split, screen.splitlines()) if "1/1" in cells and "busy" in cells]
        assert len(busy) == 2, screen
        failure = next(_split(line) for line in screen.splitlines() if "top sees this" in line)
        assert failure[2:4] == ["watched", "error"], failure
        assert "sorted by worker" in screen
        # keys: s sorts by the next column, f shows one run, q quits
        tmux.keys("s")
        tmux.wait("sorted by busy")
        tmux.keys("f")
        screen = tmux.wait("run filter (watched)")
        assert not any("other" in line and "%" in line for line in screen.splitlines()), screen
        tmux.keys("q")
        tmux.wait("TOP-EXITED 0")
        c.cancel(longs + queued)


def test_top_without_a_master_reads_the_store(master, workers, procs, tmux):
    with cw.Client(run="kept") as c:
        c.gather([c.submit(nap, 0.01 * (i + 1)) for i in range(4)], timeout=30)
        c.submit(bad, 3).exception(30)
    for name, p in procs.procs:
        if name == "master":
            p.send_signal(signal.SIGTERM)
            p.wait(20)
    wait_for(lambda: master.read_master() is None, what="the master to unpublish itself")
    tmux.start(f"{shlex.quote(sys.executable)} -m cw top --interval 0.3")
    screen = tmux.wait("no master running", "kept", "ValueError: top sees this 3")
    row = _cells(screen, "kept")
    assert row[:5] == ["kept", "0", "0", "4", "1"] and row[5].endswith("100%"), screen
    assert "read-only" in screen
    tmux.keys("q")
    tmux.wait("TOP-EXITED 0")
