"""Replays, as an attacker on the network would try them: capture the bytes of real clients
and workers on loopback, send them again. Nothing runs twice and nothing changes.

Each capture is replayed twice: as raw bytes on a new TCP connection (exactly what was
sniffed: the master's gate refuses the used token), and message by message over a
connection that passed the gate (the strongest place short of the key: a token of its
own): the sessions refuse every message (another session's key, or a seen seq).
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import zmq
from conftest import start_workers, wait_for
from wire import RawPeer, Tap, raw_connection, zmtp_messages

import cw
from cw import protocol as P
from cw.discovery import ClusterDir
from cw.errors import StoreReplacedError


def mark(where, tag):
    """Leave a file per run (so runs can be counted), return the tag."""
    Path(where, f"{tag}-{uuid.uuid4().hex}").touch()
    return tag


def flaky(marker, where):
    """Fails on its first run, succeeds later; each run leaves a file."""
    Path(where, f"flaky-{uuid.uuid4().hex}").touch()
    first = not os.path.exists(marker)
    Path(marker).touch()
    if first:
        raise RuntimeError("first run fails")
    return "ok"


def slow_mark(where, tag, seconds):
    Path(where, f"{tag}-start").touch()
    time.sleep(seconds)
    Path(where, f"{tag}-end").touch()
    return tag


def runs(where) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in os.listdir(where):
        tag = name.rsplit("-", 1)[0]
        out[tag] = out.get(tag, 0) + 1
    return out


def snapshot(store: Path) -> tuple:
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return (db.execute("SELECT id, session, seq, attempts FROM jobs ORDER BY id").fetchall(),
                db.execute("SELECT job, status, value, worker FROM results ORDER BY job").fetchall())  # fmt: skip
    finally:
        db.close()


def cw_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cw", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})  # fmt: skip


def replay_raw(address: str, streams: list[bytes]) -> None:
    """Each captured byte stream, verbatim, on a new TCP connection: the master closes it."""
    for data in streams:
        with raw_connection(address) as s:
            s.settimeout(10)
            try:
                s.sendall(data)
                while s.recv(65536):
                    pass  # until the master closes the connection
            except (ConnectionResetError, BrokenPipeError):
                pass
            except socket.timeout:
                pytest.fail("the master kept a connection whose token was used before")


def replay_messages(address: str, key: bytes, captures: list[list[list[bytes]]]) -> list[bytes]:
    """Each capture's messages, in order, over a connection of its own that passed the gate;
    the kinds of what the master answered (each must verify with the cluster key alone)."""
    ctx = zmq.Context()
    answered = []
    try:
        for msgs in captures:
            peer = RawPeer(ctx, address, key, gate_key=key)
            for m in msgs:
                peer.sock.send_multipart(m)
            until = time.monotonic() + 2.0
            while time.monotonic() < until:
                if peer.sock.poll(100):
                    kind, _, _ = P.unpack(key, peer.sock.recv_multipart())  # raises if in a session
                    answered.append(kind)
            peer.close()
    finally:
        ctx.term()
    return answered


def start_master(procs, name, *extra):
    cluster = ClusterDir()
    p = procs.start(name, "-m", "cw.master", "--port", "0", "--heartbeat", "0.2", "--worker-timeout", "3", *extra)
    wait_for(lambda: (cluster.read_master() or {}).get("pid") == p.pid or p.poll() is not None, what="master.json")
    assert p.poll() is None, procs.log(name)
    return p


@pytest.mark.timeout(180)
def test_replayed_client_messages_run_nothing(master, procs, tmp_path):
    """A client's OPEN, HELLO, SUBMITs, HEARTBEATs and BYE, and `cw retry`'s RETRY, and
    `cw status`'s STATUS: captured and sent again, they run nothing and change nothing."""
    start_workers(procs, 1)
    key, address = master.key(), master.master_address()
    done = tmp_path / "runs"
    done.mkdir()
    tap = Tap(address)
    try:
        with cw.Client(tap.address, run="replay") as c:
            assert c.gather(c.map(mark, [str(done)] * 5, range(5)), timeout=60) == list(range(5))
            with pytest.raises(RuntimeError, match="first run fails"):
                c.submit(flaky, str(tmp_path / "flaky"), str(done)).result(30)
            # an idle client heartbeats: stay long enough for one to be captured
            wait_for(lambda: any(P.HEARTBEAT in bytes(s["up"]) for s in tap.streams), what="a client HEARTBEAT")
        out = cw_cli("retry", "replay", "--failed", env={"CW_ADDRESS": tap.address})
        assert out.returncode == 0 and "1 failed jobs of run replay requeued" in out.stdout, out.stdout + out.stderr
        assert cw_cli("status", env={"CW_ADDRESS": tap.address}).returncode == 0
        wait_for(lambda: runs(done).get("flaky") == 2, what="the retried job")
        wait_for(lambda: snapshot(master.store_path)[1][-1][1] == P.OK, what="its result")
    finally:
        tap.close()
    before, ran = snapshot(master.store_path), runs(done)
    bad = cw.link.query_status(address, key)["bad_messages"]
    streams = [bytes(s["up"]) for s in tap.streams]
    captures = [zmtp_messages(b) for b in streams]
    kinds = {P.kind_of(m) for msgs in captures for m in msgs}
    assert {P.OPEN, P.HELLO, P.SUBMIT, P.HEARTBEAT, P.BYE, P.RETRY, P.STATUS} <= kinds, kinds

    replay_raw(address, streams)
    answered = replay_messages(address, key, captures)
    assert set(answered) <= {P.CHALLENGE, P.BYE}, answered  # a fresh session, never a WELCOME or STATUS

    time.sleep(2)  # time enough for anything to run
    assert snapshot(master.store_path) == before
    assert runs(done) == ran == {**{str(i): 1 for i in range(5)}, "flaky": 2}
    replayed = sum(len(m) for m in captures) - len(captures)  # every message but the OPENs
    assert cw.link.query_status(address, key)["bad_messages"] >= bad + replayed
    assert "a token used before" in procs.log("master")


@pytest.mark.timeout(180)
def test_replayed_worker_messages_get_no_task_and_change_no_result(master, procs, tmp_path):
    """A worker's OPEN, HELLO, RESULTs, HEARTBEATs and BYE, sent again while jobs wait: the
    impostor gets no task (no argument, no code), and no result changes."""
    key, address = master.key(), master.master_address()
    done = tmp_path / "runs"
    done.mkdir()
    tap = Tap(address)
    (w,) = start_workers(procs, 1, address=tap.address)
    with cw.Client() as c:
        assert c.gather(c.map(mark, [str(done)] * 20, range(20)), timeout=60) == list(range(20))
        w.send_signal(signal.SIGTERM)
        assert w.wait(20) == 0
        wait_for(lambda: not c.status()["workers"], what="the worker gone")
        tap.close()
        waiting = c.map(mark, [str(done)] * 5, range(100, 105))
        wait_for(lambda: c.status()["queued"] == 5, what="5 queued jobs")
        before = snapshot(master.store_path)
        streams = [bytes(s["up"]) for s in tap.streams]
        captures = [zmtp_messages(b) for b in streams]
        kinds = {P.kind_of(m) for msgs in captures for m in msgs}
        assert {P.OPEN, P.HELLO, P.RESULT, P.HEARTBEAT, P.BYE} <= kinds, kinds

        replay_raw(address, streams)
        answered = replay_messages(address, key, captures)
        assert P.TASKS not in answered and set(answered) <= {P.CHALLENGE, P.BYE}, answered

        time.sleep(1)
        st = c.status()
        assert st["queued"] == 5 and not st["workers"]
        assert snapshot(master.store_path) == before
        assert not any(f.done() for f in waiting)
        start_workers(procs, 1)
        assert c.gather(waiting, timeout=60) == list(range(100, 105))
    assert runs(done) == {str(i): 1 for i in [*range(20), *range(100, 105)]}


@pytest.mark.timeout(180)
def test_results_of_a_replaced_store_never_reach_new_futures(cw_home, procs, tmp_path):
    """Job ids start again at 1 in a new store: a worker's captured RESULTs for ids 1-5 of
    the old store, replayed to the new one, complete none of the new jobs 1-5."""
    m1 = start_master(procs, "m1")
    cluster = ClusterDir()
    tap = Tap(cluster.master_address())
    (w,) = start_workers(procs, 1, address=tap.address)
    with cw.Client() as c:
        assert c.gather(c.map(mark, ["/tmp"] * 5, [f"old-{uuid.uuid4().hex[:6]}"] * 5), timeout=60)
    w.send_signal(signal.SIGTERM)
    assert w.wait(20) == 0
    tap.close()
    m1.send_signal(signal.SIGTERM)
    m1.wait(20)
    for f in cluster.path.glob("cw.sqlite*"):
        f.unlink()  # the store is lost
    start_master(procs, "m2")
    key, address = cluster.key(), cluster.master_address()
    captures = [zmtp_messages(bytes(s["up"])) for s in tap.streams]
    assert sum(P.kind_of(m) == P.RESULT for msgs in captures for m in msgs) >= 1
    done = tmp_path / "runs"
    done.mkdir()
    with cw.Client() as c:
        futs = c.map(mark, [str(done)] * 5, [f"new-{i}" for i in range(5)])
        wait_for(lambda: c.status()["queued"] == 5, what="5 queued jobs")
        # the status may answer in the turn that took the jobs in, before its commit
        ids = wait_for(lambda: [r[0] for r in snapshot(cluster.store_path)[0]], what="5 stored jobs")
        assert ids == [1, 2, 3, 4, 5]  # the old ids again
        replay_messages(address, key, captures)
        time.sleep(1)
        assert not any(f.done() for f in futs)
        start_workers(procs, 1)
        assert c.gather(futs, timeout=60) == [f"new-{i}" for i in range(5)]


@pytest.mark.timeout(180)
def test_a_worker_drops_jobs_of_a_replaced_store_and_a_waiting_client_is_told(cw_home, procs, tmp_path):
    """A worker runs job 1 of a store that is lost; the new store's job 1 is another job.
    The new master ignores what the worker holds, the worker kills it, the new job 1 gets
    its own result, and the client still waiting on the old store hears it is gone."""
    m1 = start_master(procs, "m1")
    cluster = ClusterDir()
    start_workers(procs, 1, "--master-timeout", "2")
    done = tmp_path / "runs"
    done.mkdir()
    old = cw.Client(master_timeout=2)
    try:
        f_old = old.submit(slow_mark, str(done), "old", 10)
        wait_for(lambda: (done / "old-start").exists(), what="the old job started")
        m1.kill()
        m1.wait()
        for f in cluster.path.glob("cw.sqlite*"):
            f.unlink()
        start_master(procs, "m2")
        with cw.Client() as c:
            f_new = c.submit(slow_mark, str(done), "new", 0)
            assert f_new.result(60) == "new"
        assert snapshot(cluster.store_path)[1][0][:2] == (1, P.OK)
        with pytest.raises(StoreReplacedError, match="another store"):
            f_old.result(60)
    finally:
        old.close()
    assert "holds 1 jobs of another store" in procs.log("m2")
    time.sleep(max(0.0, 12 - (time.time() - (done / "old-start").stat().st_mtime)))
    assert not (done / "old-end").exists(), "the job of the lost store ran on"
