"""The store fails loudly: damaged, removed, replaced, full, read-only. Real masters, real
SQLite files, a real small tmpfs, a real read-only mount."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import start_workers, wait_for

import cw
from cw import protocol as P
from cw.discovery import ClusterDir
from cw.store import Store

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def payload(blob, x):
    return (len(blob), x)


def square(x):
    return x * x


def cw_cli(*args):
    return subprocess.run([sys.executable, "-m", "cw", *args], capture_output=True, text=True, timeout=120)


def start_master(procs, name="master", *extra):
    cluster = ClusterDir()
    p = procs.start(name, "-m", "cw.master", "--port", "0", "--heartbeat", "0.2", "--worker-timeout", "3", *extra)
    wait_for(lambda: (cluster.read_master() or {}).get("pid") == p.pid or p.poll() is not None,
             timeout=30, what="master.json")  # fmt: skip
    return p


def stop(p):
    p.send_signal(signal.SIGTERM)
    return p.wait(20)


def make_store(procs, jobs=300, size=20_000, run="real"):
    """A real store: a master, a worker and a client ran `jobs` jobs of `size`-byte arguments."""
    m = start_master(procs, "maker")
    (w,) = start_workers(procs, 1)
    with cw.Client(run=run) as c:
        assert c.gather(c.map(payload, [os.urandom(size)] * jobs, range(jobs)), timeout=120)[-1] == (size, jobs - 1)
    stop(w)
    assert stop(m) == 0
    return ClusterDir()


def damage(path: Path, first=0.25, last=0.75, seed=1):
    """Overwrite the first 4 KiB of every page between these fractions of the file."""
    data = path.read_bytes()
    page = int.from_bytes(data[16:18], "big") or 65536
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for n in range(int(len(data) * first) // page, int(len(data) * last) // page):
            f.seek(n * page)
            f.write(rng.randbytes(4096))


def master_fails(procs, name, *words):
    """Start a master that must refuse: non-zero, before master.json, one clear message."""
    cluster = ClusterDir()
    cluster.master_json.unlink(missing_ok=True)
    p = procs.start(name, "-m", "cw.master", "--port", "0")
    assert p.wait(60) != 0
    log = procs.log(name)
    assert "Traceback" not in log, log
    for w in words:
        assert w in log, log
    assert not cluster.master_json.exists()
    return log


@pytest.mark.timeout(240)
def test_a_damaged_store_is_refused_then_checked_and_recovered(cw_home, procs):
    cluster = make_store(procs, jobs=300)
    damage(cluster.store_path)
    log = master_fails(procs, "m-damaged", str(cluster.store_path), "damaged", "cw store check", "cw store recover")
    assert "malformed message" not in log
    check = cw_cli("store", "check")
    assert check.returncode == 1 and "is damaged" in check.stdout, check.stdout + check.stderr
    rec = cw_cli("store", "recover")
    assert rec.returncode == 0, rec.stdout + rec.stderr
    kept = list(cluster.path.glob("cw.sqlite.damaged-*"))
    assert [k.name for k in kept if not k.name.endswith(("-wal", "-shm"))], rec.stdout
    assert cw_cli("store", "check").stdout.strip().endswith(": ok")
    # the recovered store serves again: what was read back is kept, the rest runs again
    start_master(procs, "m-recovered")
    start_workers(procs, 1)
    with cw.Client(run="real") as c:
        assert c.gather(c.map(payload, [b"x"] * 5, range(5)), timeout=60)[0] in ((1, 0), (20_000, 0))


@pytest.mark.timeout(120)
def test_the_embedded_cluster_says_why_its_master_refused_a_damaged_store(cw_home, procs):
    """cw.Client() starting the local cluster on a damaged store: the master's own reason,
    at once, not a wait for a master that will never answer."""
    with cw.Client(run="fill", n_workers=1) as c:
        assert c.gather(c.map(payload, [os.urandom(20_000)] * 200, range(200)), timeout=60)[-1] == (20_000, 199)
    damage(ClusterDir(name="local").store_path)
    t0 = time.monotonic()
    with pytest.raises(cw.errors.NoMasterError) as e:
        cw.Client(run="fill", n_workers=1)
    assert time.monotonic() - t0 < 8
    text = str(e.value)
    assert "master exited" in text and "damaged" in text and "cw store recover" in text and "master.log" in text


@pytest.mark.timeout(240)
def test_damage_found_while_running_stops_the_master_and_tells_clients(cw_home, procs, caplog):
    cluster = make_store(procs, jobs=1500, size=20_000)  # ~30 MB: more than SQLite's page cache
    m = start_master(procs, "m-live")
    start_workers(procs, 1)
    with cw.Client(run="real", master_timeout=2) as c:
        assert c.submit(square, 3).result(30) == 9
        damage(cluster.store_path, first=0.1, last=0.95)
        caplog.set_level(logging.ERROR, logger="cw")
        out = cw_cli("retry", "real", "--failed")  # reads every result of the run
        assert m.wait(30) != 0
        log = procs.log("m-live")
        assert "damaged" in log and str(cluster.store_path) in log and "cw store recover" in log, log
        assert "malformed message" not in log and "cannot handle" not in log, log
        wait_for(lambda: any("damaged" in r.getMessage() for r in caplog.records), what="the client told")
    assert out.returncode != 0 or "damaged" in out.stdout + out.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_store_removed_or_replaced_under_the_master_stops_it(cw_home, procs, how):
    m = start_master(procs, "m")
    start_workers(procs, 1)
    cluster = ClusterDir()
    with cw.Client(run="gone") as c:
        assert c.gather(c.map(square, range(50)), timeout=60)[-1] == 49 * 49
        if how == "removed":
            cluster.store_path.unlink()
        else:
            other = cluster.path / "other.sqlite"
            sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
            os.replace(other, cluster.store_path)
        assert m.wait(30) != 0
    log = procs.log("m")
    assert how in log and "while the master was using it" in log and "Traceback" not in log, log
    rescued = next(cluster.path.glob("cw.sqlite.rescued-*"))
    db = sqlite3.connect(rescued)
    assert db.execute("SELECT count(*) FROM results r JOIN jobs j ON j.id = r.job"
                      " WHERE j.run = 'gone'").fetchone()[0] == 50  # fmt: skip


@pytest.fixture
def small_disk(tmp_path):
    """A real 32 MiB tmpfs, mounted for the test (needs root; under CI it must work)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if p.returncode != 0:
        msg = f"cannot mount a tmpfs ({p.stderr.strip()}): run the tests as root"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.timeout(240)
def test_disk_full_is_one_clear_line_and_loses_nothing(cw_home, small_disk, procs, monkeypatch, caplog):
    monkeypatch.setenv("CW_HOME", str(small_disk))
    cluster = ClusterDir()
    m1 = start_master(procs, "m1")
    start_workers(procs, 1, "--master-timeout", "2")
    filler = small_disk / "filler"
    caplog.set_level(logging.ERROR, logger="cw")
    with cw.Client(run="full", master_timeout=2) as c:
        wait_for(lambda: len(c.status()["workers"]) == 1, timeout=30, what="the worker")
        free = shutil.disk_usage(small_disk).free
        filler.write_bytes(b"\0" * (free - 3 * 2**20))  # leave 3 MiB
        futs = [c.submit(payload, os.urandom(200_000), i) for i in range(40)]  # 8 MB of arguments
        assert m1.wait(60) != 0
        log = procs.log("m1")
        lines = [line for line in log.splitlines() if "disk full" in line]
        assert len(lines) == 1 and str(cluster.store_path) in lines[0], log
        assert "no such savepoint" not in log and "Traceback" not in log, log
        told = wait_for(lambda: [r.getMessage() for r in caplog.records if "disk full" in r.getMessage()],
                        timeout=30, what="the client told")  # its I/O thread may still be sending 8 MB
        assert str(cluster.store_path) in told[0]
        filler.unlink()  # space freed: the next master finishes everything, nothing lost
        start_master(procs, "m2")
        assert c.gather(futs, timeout=120) == [(200_000, i) for i in range(40)]
    db = sqlite3.connect(cluster.store_path)
    assert db.execute("SELECT count(*), count(DISTINCT seq) FROM jobs WHERE run = 'full'").fetchone() == (40, 40)


@pytest.fixture
def read_only(cw_home, procs):
    """A real store made read-only by a read-only bind mount over the file (root ignores modes)."""
    cluster = make_store(procs, jobs=10, size=10)
    path = str(cluster.store_path)
    for cmd in (["mount", "--bind", path, path], ["mount", "-o", "remount,bind,ro", path]):
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            subprocess.run(["umount", path], capture_output=True)
            msg = f"cannot mount the store read-only ({p.stderr.strip()}): run the tests as root"
            if IN_CI:
                pytest.fail(msg)
            pytest.skip(msg)
    yield cluster
    subprocess.run(["umount", "-l", path], capture_output=True)


@pytest.mark.timeout(120)
def test_a_read_only_store_is_refused_before_master_json(read_only, procs):
    master_fails(procs, "m-ro", str(read_only.store_path), "read-only")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["header", "truncated"])
def test_a_corrupt_header_or_truncated_store_is_refused_clearly(cw_home, procs, how):
    cluster = make_store(procs, jobs=200)
    path = cluster.store_path
    if how == "header":
        with open(path, "r+b") as f:
            f.write(b"this is no store")
    else:
        os.truncate(path, path.stat().st_size // 2)
    master_fails(procs, f"m-{how}", str(path), "damaged", "cw store recover")
    for args in (("status",), ("results", "real"), ("store", "check")):
        out = cw_cli(*args)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "damaged" in out.stdout + out.stderr, out.stdout + out.stderr


def test_a_retried_results_file_goes_only_once_the_retry_commits(tmp_path):
    """A large value lives in a file: retrying its job removes the file after the commit,
    and a rolled-back retry leaves both row and file."""
    store = Store(tmp_path / "s.db")
    store.add_session("s", "r", {})
    [jid] = store.add_jobs([("s", 1, "r", "k", "f", b"args", None, None, None, None)])
    big = b"\x80" + bytes(100_000)
    store.add_results([(jid, P.FAILED, big, "boom", "", "w:1", 0.1, 1.0, None, None, None, None)])
    store.commit()
    value = tmp_path / "s.db.blobs" / f"{jid}.value"
    assert value.stat().st_size == len(big)
    store.retry_failed("r")
    store.rollback()  # the turn failed: nothing of it counts
    assert value.exists() and store.outcomes([jid])[jid][1] == big
    assert [q.id for q in store.retry_failed("r")] == [jid] and value.exists()
    store.commit()
    assert not value.exists() and store.outcomes([jid]) == {}
    store.close()
