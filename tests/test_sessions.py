"""Sessions, the gate and the encrypted wire, piece by piece and end to end; and a cluster
directory nobody else can read or plant."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import time
import uuid

import pytest
import zmq
from clusters import launched
from conftest import start_workers, wait_for
from wire import RawPeer, Tap

import cw
from cw import protocol as P
from cw.discovery import ClusterDir
from cw.errors import BadMAC, ConfigError, ProtocolError, Replayed
from cw.security import Gate, token

KEY = b"k" * 32


def echo(x):
    return x + "!"


# -- the pieces ------------------------------------------------------------------------
def test_a_channel_refuses_a_replayed_or_reordered_message_and_another_sessions():
    session = P.session_key(KEY, P.nonce(), P.nonce(), "epoch")
    a, b = P.Channel(session), P.Channel(session)
    first, second = a.pack(P.SUBMIT, {"j": []}), a.pack(P.HEARTBEAT)
    assert b.unpack(first)[0] == P.SUBMIT
    assert b.unpack(second)[0] == P.HEARTBEAT
    for again in (first, second):
        with pytest.raises(Replayed):
            b.unpack(again)
    other = P.Channel(b"o" * 32).pack(P.SUBMIT, {"j": []})
    with pytest.raises(BadMAC):
        b.unpack(other)
    with pytest.raises(BadMAC):  # a message signed with the cluster key is not of the session
        b.unpack(P.pack(KEY, P.SUBMIT, {"j": []}))


def test_a_handshake_derives_the_same_key_on_both_sides_and_a_replayed_challenge_does_nothing():
    mine = P.nonce()
    kind, header, _ = P.unpack(KEY, P.open_message(KEY, mine))
    assert kind == P.OPEN
    master, reply = P.challenge(KEY, header, "epoch-1")
    _, ch_header, _ = P.unpack(KEY, reply)
    peer = P.accept_challenge(KEY, ch_header, [mine])
    assert peer is not None and peer.key == master.key
    assert master.unpack(peer.pack(P.HELLO, {"role": "client"}))[1] == {"role": "client"}
    assert P.accept_challenge(KEY, ch_header, [P.nonce()]) is None  # answers another OPEN
    _, again, _ = P.unpack(KEY, P.challenge(KEY, header, "epoch-1")[1])
    assert P.accept_challenge(KEY, again, [mine]).key != peer.key  # a new session each time


def test_sizes_and_frames_are_checked_before_the_mac(monkeypatch):
    calls = []
    real = P._mac
    monkeypatch.setattr(P, "_mac", lambda *a: calls.append(1) or real(*a))
    big = P.pack(KEY, P.OPEN, {"n": "00" * 16}, [b"x" * 10_000])
    with pytest.raises(ProtocolError, match="before a session"):
        P.unpack(KEY, big, 0, 4096)
    with pytest.raises(ProtocolError, match="frames"):
        P.unpack(KEY, [P.VERSION, P.OPEN, b"", b"\0" * 8, b"{}"] + [b""] * 5000)
    assert calls == [1]  # only pack's own


def test_the_gate_takes_a_token_once_within_its_window():
    gate = Gate(KEY, encrypt=False, window=300)
    user, password = token(KEY)
    assert gate.check(b"PLAIN", [user, password]) is None
    assert "used before" in gate.check(b"PLAIN", [user, password])
    assert "another key" in gate.check(b"PLAIN", list(token(b"x" * 32)))
    assert "clock" in gate.check(b"PLAIN", list(token(KEY, time.time() - 400)))
    assert gate.check(b"PLAIN", list(token(KEY, time.time() - 200))) is None
    assert "without a cw token" in gate.check(b"NULL", [])
    assert "encrypted" in Gate(KEY, encrypt=True).check(b"PLAIN", list(token(KEY)))


# -- the encrypted wire ------------------------------------------------------------------
def start_master(procs, name, *extra):
    cluster = ClusterDir()
    p = procs.start(name, "-m", "cw.master", "--port", "0", "--heartbeat", "0.2", *extra)
    wait_for(lambda: (cluster.read_master() or {}).get("pid") == p.pid or p.poll() is not None, what="master.json")
    assert p.poll() is None, procs.log(name)
    return p


@pytest.mark.timeout(120)
@pytest.mark.parametrize("encrypt", [False, True], ids=["clear", "encrypted"])
def test_what_a_sniffer_reads(cw_home, procs, encrypt):
    """In the clear, a job's argument and result cross the wire as they are; with
    --encrypt, nothing of them (nor of the protocol) does, workers and clients follow the
    cluster's setting, and a peer without the CurveZMQ keys gets nowhere."""
    start_master(procs, "m", *(["--encrypt"] if encrypt else []))
    cluster = ClusterDir()
    assert cluster.encrypted() is encrypt
    if encrypt:
        assert stat.S_IMODE(cluster.curve_path.stat().st_mode) == 0o600
    key, address = cluster.key(), cluster.master_address()
    tap = Tap(address)
    start_workers(procs, 1, address=tap.address)
    secret = f"s3cret-{uuid.uuid4().hex}"
    try:
        with cw.Client(tap.address) as c:
            assert c.submit(echo, secret).result(60) == secret + "!"
    finally:
        tap.close()
    wire = b"".join(bytes(s[d]) for s in tap.streams for d in ("up", "down"))
    assert len(tap.streams) == 2 and len(wire) > 1000
    assert (secret.encode() in wire) is not encrypt
    assert (P.VERSION in wire) is not encrypt
    if encrypt:  # a token, even a valid one, does not open an encrypted master; nor another key
        ctx = zmq.Context()
        for peer in (RawPeer(ctx, address, key, gate_key=key), RawPeer(ctx, address, key, gate_key=b"x" * 32, encrypt=True)):
            with pytest.raises(AssertionError, match="no CHALLENGE"):
                peer.open(timeout=2)
            peer.close()
        ctx.term()


def test_a_planted_encryption_setting_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("CW_KEY", raising=False)
    c = ClusterDir(path=tmp_path / "c")
    c.key(create=True)
    c.set_encrypted()
    os.chown(c.curve_path, pwd.getpwnam("nobody").pw_uid, -1)
    with pytest.raises(ConfigError, match="curve belongs to uid"):
        c.encrypted()


# -- `cw slurm up` and `cw sge up` leave nothing others can read ------------------------
@pytest.fixture(params=[pytest.param("slurm", marks=pytest.mark.slurm), pytest.param("sge", marks=pytest.mark.sge)])
def pool(request, tmp_path, cw_home):
    yield from launched(request.param, tmp_path)


UP = {"slurm": ("--workers", "1", "--time", "10"), "sge": ("--workers", "1", "--time", "0:10:00")}


@pytest.mark.timeout(180)
def test_up_leaves_nothing_others_can_read(pool):
    old = os.umask(0o002)  # a loose umask, as on many clusters
    try:
        pool.up(*UP[pool.scheduler])
    finally:
        os.umask(old)
    c = pool.client()
    assert c.submit(echo, "x").result(60) == "x!"
    pool.wait_workers(1)
    paths = [pool.dir, *pool.dir.rglob("*")]
    names = {p.relative_to(pool.dir).as_posix() for p in paths[1:]}
    assert {"key", "pool.json", "jobs", "logs", "cw.sqlite"} <= names, names
    assert any(n.startswith("logs/") for n in names) and any(n.startswith("jobs/") for n in names)
    print("\n".join(f"{stat.S_IMODE(p.lstat().st_mode):o} {p}" for p in paths))
    for p in paths:
        mode = stat.S_IMODE(p.lstat().st_mode)
        if p.is_dir():
            assert mode == 0o700, f"{p} has mode {mode:o}"
        elif p.name != "master.json":  # master.json says where the master is: 0644, in a 0700 folder
            assert not mode & 0o077, f"{p} has mode {mode:o}"
    # and as another user: nothing at all can be read
    for p in paths[1:]:
        if p.is_file():
            r = subprocess.run(["runuser", "-u", "nobody", "--", "head", "-c1", str(p)], capture_output=True)
            assert r.returncode != 0, f"nobody can read {p}"


def test_a_store_from_before_the_epoch_gets_one_and_keeps_its_jobs(tmp_path):
    """The epoch came with schema 3: a store made before it (schema 2) is migrated forward."""
    import sqlite3

    from test_migrations import SCHEMA_1

    from cw.store import Store
    from cw.store.schema import MIGRATIONS, SCHEMA_VERSION

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1 + MIGRATIONS[1] + "PRAGMA user_version = 2;")
    db.execute("INSERT INTO jobs (id, session, seq, fn, args) VALUES (7, 's', 0, 'f', x'00')")
    db.commit()
    db.close()
    s = Store(path)
    epoch = s.epoch
    assert len(epoch) == 32 and [j.id for j in s.pending()] == [7]
    s.close()
    s = Store(path)
    assert s.epoch == epoch  # made once, kept
    s.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert Store(tmp_path / "new.sqlite").epoch != epoch


def test_a_recovered_store_keeps_its_epoch(tmp_path):
    """`cw store recover` keeps the jobs and their ids: the epoch goes with them, by SQLite's
    own recovery or by cw's row copy alike."""
    from cw.store import NewJob, Store
    from cw.store.repair import _copy_rows, _finish, recover

    path = tmp_path / "cw.sqlite"
    s = Store(path)
    epoch = s.epoch
    s.add_jobs([NewJob("s", 0, None, None, "f", b"x", None, None, 3, *[None] * (len(NewJob._fields) - 9))])
    s.close()
    recover(path)
    copied = tmp_path / "copied.sqlite"
    _copy_rows(path, copied)
    _finish(copied)
    for p in (path, copied):
        s = Store(p)
        assert s.epoch == epoch and [j.id for j in s.pending()] == [1]
        s.close()
