"""Worker faults: loss, retries, timeouts, cancel, drain. Real processes, real kills."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import random
import signal
import socket
import sqlite3
import threading
import time
from collections import Counter

import pytest
from conftest import start_workers, wait_for

import cw


def nap(seconds, marker=None):
    time.sleep(seconds)
    if marker:
        with open(marker, "a") as f:
            f.write("done\n")
    return seconds


def nap_once(marker, first, then):
    """Sleep `first` seconds on the first run, `then` on later runs; count runs in marker."""
    n = os.path.exists(marker) and len(open(marker).read().splitlines())
    with open(marker, "a") as f:
        f.write("run\n")
    time.sleep(then if n else first)
    return n or 0


def kill_my_worker():
    """A poison job: kills the agent that runs it."""
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(10)


def square(x):
    return x * x


def _store(master) -> sqlite3.Connection:
    return sqlite3.connect(master.store_path)


def _workers(client, n):
    return wait_for(lambda: len(client.status()["workers"]) == n, what=f"{n} workers")


@pytest.fixture
def fast_master(cw_home, procs):
    """A master that loses silent workers within 2 s."""
    from cw.discovery import ClusterDir

    cluster = ClusterDir()
    procs.start("master", "-m", "cw.master", "--port", "0", "--heartbeat", "0.2", "--worker-timeout", "2")
    wait_for(cluster.master_address, what="master.json")
    return cluster


def test_lost_worker_requeues_its_job_and_counts_an_attempt(fast_master, procs, tmp_path):
    (w1,) = start_workers(procs, 1)
    with cw.Client() as c:
        _workers(c, 1)
        marker = str(tmp_path / "runs")
        f = c.submit(nap_once, marker, 60, 0)
        wait_for(lambda: os.path.exists(marker), what="job started")
        w1.kill()  # kill -9 the agent; its executor child dies with it
        start_workers(procs, 1)
        assert f.result(30) == 1  # the second run
    attempts = _store(fast_master).execute("SELECT attempts FROM jobs").fetchall()
    assert attempts == [(1,)]


def test_poison_job_fails_with_worker_lost_error(fast_master, procs):
    start_workers(procs, 3)
    with cw.Client() as c:
        _workers(c, 3)
        f = c.submit(kill_my_worker, max_retries=1)
        with pytest.raises(cw.WorkerLostError) as ei:
            f.result(60)
        msg = str(ei.value)
        assert "lost its worker 2 times (max_retries=1)" in msg
        lost_on = [line.strip() for line in msg.splitlines()[1:]]
        assert len(lost_on) == 2 and len(set(lost_on)) == 2, msg  # both workers it killed are named
        assert c.submit(square, 3).result(30) == 9  # the surviving worker still serves


def test_timeout_kills_the_job_and_the_worker_goes_on(master, procs):
    start_workers(procs, 1)
    with cw.Client() as c:
        t0 = time.monotonic()
        f = c.submit(nap, 30, timeout=1)
        with pytest.raises(cw.TimeoutError, match="timed out after 1"):
            f.result(20)
        assert isinstance(f.exception(), TimeoutError)  # also the builtin
        assert time.monotonic() - t0 < 10
        assert c.submit(square, 5).result(30) == 25


def test_cancel_queued_and_running(master, procs, tmp_path):
    start_workers(procs, 1)
    with cw.Client() as c:
        _workers(c, 1)
        running_marker = str(tmp_path / "running")
        running = c.submit(nap_once, running_marker, 30, 30)
        queued = [c.submit(nap, 30, str(tmp_path / f"q{i}")) for i in range(3)]
        wait_for(lambda: os.path.exists(running_marker), what="first job started")
        assert c.cancel(queued) == 3
        assert running.cancel()
        assert all(f.cancelled() for f in [running, *queued])
        with pytest.raises(cf.CancelledError):
            running.result()
        # the single slot is free again at once: the running job was killed
        assert c.submit(square, 7).result(15) == 49
        stored = wait_for(lambda: _store(master).execute(
            "SELECT count(*) FROM results WHERE status = ?", (cw.protocol.CANCELLED,)).fetchone()[0] == 4,
            what="4 cancelled results in the store")  # fmt: skip
        assert stored
    assert not any(os.path.exists(tmp_path / f"q{i}") for i in range(3))


def test_sigterm_drains_without_charging_attempts(master, procs, tmp_path):
    (w1,) = start_workers(procs, 1, "--grace", "20")
    with cw.Client() as c:
        _workers(c, 1)
        first = str(tmp_path / "first")
        futs = [c.submit(nap_once, first, 2, 0)] + [c.submit(nap, 0.5) for _ in range(5)]
        wait_for(lambda: os.path.exists(first), what="first job started")
        w1.send_signal(signal.SIGTERM)
        start_workers(procs, 1)
        assert [f.result(30) for f in futs] == [0] + [0.5] * 5  # the running job finished on w1
        assert w1.wait(10) == 0
    assert _store(master).execute("SELECT max(attempts) FROM jobs").fetchone()[0] == 0


def test_grace_expiry_hands_the_running_job_back_uncharged(master, procs, tmp_path):
    (w1,) = start_workers(procs, 1, "--grace", "1")
    with cw.Client() as c:
        _workers(c, 1)
        marker = str(tmp_path / "m")
        f = c.submit(nap_once, marker, 60, 0)
        wait_for(lambda: os.path.exists(marker), what="job started")
        w1.send_signal(signal.SIGTERM)
        assert w1.wait(15) == 0
        start_workers(procs, 1)
        assert f.result(30) == 1
    assert _store(master).execute("SELECT attempts FROM jobs").fetchone()[0] == 0


def test_lifetime_drains_by_itself(master, procs):
    (w1,) = start_workers(procs, 1, "--lifetime", "2")
    with cw.Client() as c:
        _workers(c, 1)
        assert w1.wait(20) == 0
        _workers(c, 0)


def test_no_worker_warning_names_the_queue(master, monkeypatch, caplog):
    monkeypatch.setattr(cw.defaults, "NO_WORKERS_WARNING", 0.5)
    with caplog.at_level(logging.WARNING, logger="cw"):
        with cw.Client() as c:
            f = c.submit(square, 2)
            wait_for(lambda: any("no worker" in r.getMessage() for r in caplog.records), what="warning")
            assert not f.done()  # a warning, not an error
    msg = next(r.getMessage() for r in caplog.records if "no worker" in r.getMessage())
    assert "1 jobs queued at master" in msg


def test_blocking_calls_take_timeouts(master):
    with cw.Client() as c:  # no workers: nothing finishes
        f = c.submit(square, 2)
        with pytest.raises(cf.TimeoutError):
            f.result(timeout=0.2)
        with pytest.raises(cw.TimeoutError):
            c.gather([f], timeout=0.2)
        with pytest.raises(cw.TimeoutError):
            list(cw.as_completed([f], timeout=0.2))
    t = cw.ClientThread(lambda *_: None)
    t.start()
    t.submit(square, 1)
    assert t.wait(timeout=0.2) is False
    t.stop()


@pytest.mark.timeout(180)
def test_chaos_kill_workers_every_2s(fast_master, procs):
    """5,000 jobs while a random worker is kill -9'd every 2 s and replaced."""
    workers = start_workers(procs, 3)
    counts: Counter = Counter()
    lock = threading.Lock()

    def callback(jobid, result):
        with lock:
            counts[jobid] += 1

    t = cw.ClientThread(callback, error_callback=callback)
    t.start()
    ids = [t.submit(nap, 0.002) for _ in range(5000)]
    rng = random.Random(1)
    kills = 0
    while not t.wait(timeout=2):
        alive = [w for w in workers if w.poll() is None]
        victim = rng.choice(alive)
        victim.kill()
        kills += 1
        workers.remove(victim)
        workers += start_workers(procs, 1)
        assert kills < 60, "the run does not finish"
    t.stop()
    assert kills >= 1
    assert set(counts) == set(ids) and set(counts.values()) == {1}
    db = _store(fast_master)
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 5000
    assert db.execute("SELECT count(*) FROM results").fetchone()[0] == 5000
    assert db.execute("SELECT count(*) FROM results WHERE status != 0").fetchone()[0] == 0


@pytest.mark.timeout(120)
def test_a_worker_meets_another_master_on_its_masters_port(cw_home, procs, tmp_path):
    """Its master dies and a master of another cluster takes the port: the worker's
    reconnects are refused, with backoff (no loop); once its own master is back on another
    port (master.json), it joins at once, without waiting out the backoff."""
    from cw.discovery import ClusterDir

    ours = ClusterDir()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
    s.close()
    a = procs.start("master-a", "-m", "cw.master", "--bind", "127.0.0.1", "--port", port, "--heartbeat", "0.2")
    wait_for(ours.master_address, what="master.json")
    start_workers(procs, 1, "--master-timeout", "1", "--give-up", "600")
    with cw.Client() as c:
        _workers(c, 1)
    a.kill()
    a.wait()
    other = {"CW_HOME": str(tmp_path / "other-home")}
    b = procs.start("master-b", "-m", "cw.master", "--bind", "127.0.0.1", "--port", port, "--heartbeat", "0.2", env=other)
    wait_for(lambda: "rejects our key" in procs.log("worker-1"), timeout=30, what="the other master's refusal")
    time.sleep(8)
    refusals = procs.log("worker-1").count("rejects our key")
    assert refusals <= 8, f"{refusals} reconnects to the other master in 8 s"
    b.terminate()
    b.wait()
    procs.start("master-a2", "-m", "cw.master", "--bind", "127.0.0.1", "--port", "0", "--heartbeat", "0.2")
    wait_for(lambda: (ours.master_address() or ":" + port).rsplit(":", 1)[1] != port, what="the new master.json")
    t0 = time.monotonic()
    with cw.Client() as c:
        wait_for(lambda: len(c.status()["workers"]) == 1, timeout=15, what="the worker back")
        assert c.submit(square, 4).result(30) == 16
    assert time.monotonic() - t0 < 10
