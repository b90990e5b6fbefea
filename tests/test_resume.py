"""Crash safety and re-runs: kill -9 the master, the client, re-run a script."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter

import pytest
from conftest import start_workers, wait_for

import cw
from cw.discovery import ClusterDir


def nap(seconds, x=None):
    time.sleep(seconds)
    return x


def flaky(marker):
    """Fails on its first run, succeeds later."""
    first = not os.path.exists(marker)
    open(marker, "a").close()
    if first:
        raise RuntimeError("first run fails")
    return "ok"


def start_master(procs, name="master", *extra):
    cluster = ClusterDir()
    p = procs.start(name, "-m", "cw.master", "--port", "0", "--heartbeat", "0.2", "--worker-timeout", "3", *extra)
    wait_for(lambda: (cluster.read_master() or {}).get("pid") == p.pid or p.poll() is not None, what="master.json")
    assert p.poll() is None, procs.log(name)
    return p


def cw_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cw", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})  # fmt: skip


@pytest.mark.timeout(180)
def test_master_kill9_and_restart_loses_nothing(cw_home, procs):
    m1 = start_master(procs, "m1")
    start_workers(procs, 2, "--master-timeout", "2")
    counts: Counter = Counter()
    lock = threading.Lock()

    def done(f):
        with lock:
            counts[f.jobid] += 1

    with cw.Client(master_timeout=2) as c:
        futs = [c.submit(nap, 0.004, i) for i in range(2000)]
        for f in futs:
            f.add_done_callback(done)
        wait_for(lambda: sum(counts.values()) >= 400, timeout=60, what="400 results")
        m1.kill()  # kill -9
        m1.wait()
        start_master(procs, "m2")
        results = [f.result(120) for f in futs]
    assert results == list(range(2000))
    assert len(counts) == 2000 and set(counts.values()) == {1}
    db = sqlite3.connect(ClusterDir().store_path)
    assert db.execute("SELECT count(*) FROM results").fetchone()[0] == 2000
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2000


SCRIPT = """
import os, sys, time, uuid
import cw

def mark(x, where):
    open(os.path.join(where, f"{x}-{uuid.uuid4().hex}"), "w").close()
    time.sleep(0.01)
    return x * 10

with cw.Client(run="sweep-1") as c:
    futs = c.map(mark, range(500), [sys.argv[1]] * 500)
    for f in cw.as_completed(futs):
        print("R", f.result() // 10, flush=True)
"""


@pytest.mark.timeout(180)
def test_rerun_returns_stored_results_without_running_again(master, workers, tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent(SCRIPT))
    execs = tmp_path / "execs"
    execs.mkdir()
    p = subprocess.Popen([sys.executable, str(script), str(execs)], stdout=subprocess.PIPE, text=True)
    first = set()
    for line in p.stdout:
        first.add(int(line.split()[1]))
        if len(first) >= 250:
            break
    p.kill()  # killed half-way
    p.wait()
    out = subprocess.run([sys.executable, str(script), str(execs)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    second = [int(line.split()[1]) for line in out.stdout.splitlines()]
    assert sorted(second) == list(range(500))  # every result comes back
    runs = Counter(name.split("-")[0] for name in os.listdir(execs))
    assert all(runs[str(x)] == 1 for x in first), "a finished job ran again"


def test_killed_client_jobs_still_finish(master, workers, tmp_path):
    script = tmp_path / "fire.py"
    script.write_text(textwrap.dedent("""
        import time, cw
        def nap(s, x):
            time.sleep(s)
            return x
        c = cw.Client(run="orphans")
        futs = [c.submit(nap, 0.5, i) for i in range(10)]
        print("submitted", flush=True)
        time.sleep(60)
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "submitted"
    db = sqlite3.connect(master.store_path)
    wait_for(lambda: db.execute("SELECT count(*) FROM jobs WHERE run = 'orphans'").fetchone()[0] == 10,
             what="jobs stored")  # fmt: skip
    p.kill()
    p.wait()
    wait_for(lambda: db.execute("SELECT count(*) FROM results r JOIN jobs j ON j.id = r.job"
                                " WHERE j.run = 'orphans' AND r.status = 0").fetchone()[0] == 10,
             timeout=30, what="results of the dead client")  # fmt: skip
    out = cw_cli("results", "orphans", "--format", "csv")
    assert out.returncode == 0, out.stderr
    rows = out.stdout.strip().splitlines()[1:]
    assert len(rows) == 10 and sorted(int(r.split(",")[4]) for r in rows) == list(range(10))


def test_status_and_results_without_a_master(master, workers, procs):
    with cw.Client(run="offline") as c:
        c.gather(c.map(nap, [0] * 5, range(5)))
        c.submit(flaky, str(procs.tmp / "never-there") + "/x").exception(30)
    procs.stop()  # master and workers gone
    st = cw_cli("status")
    assert st.returncode == 0, st.stderr
    assert "no master running" in st.stdout and "run offline: 5 done, 1 error" in st.stdout
    res = cw_cli("results", "offline", "--format", "json")
    assert res.returncode == 0 and res.stdout.count('"status": "done"') == 5
    failed = cw_cli("results", "offline", "--failed")
    assert "FileNotFoundError" in failed.stdout and "done" not in failed.stdout


def test_retry_failed_through_the_live_master(master, workers, tmp_path):
    marker = str(tmp_path / "flaky")
    with cw.Client(run="again") as c:
        with pytest.raises(RuntimeError, match="first run fails"):
            c.submit(flaky, marker).result(30)
        cancelled = c.submit(nap, 30, "cancelled")
        wait_for(cancelled.running, timeout=30, what="the job to start")
        assert c.cancel([cancelled]) == 1  # cancelled, not failed: a retry leaves it so
    out = cw_cli("retry", "again", "--failed")
    assert out.returncode == 0 and "1 failed jobs of run again requeued by the master" in out.stdout
    db = sqlite3.connect(master.store_path)
    wait_for(lambda: db.execute("SELECT r.status FROM results r ORDER BY r.job").fetchall() == [(0,), (5,)],
             what="retried job done")  # fmt: skip
    time.sleep(1.0)
    assert db.execute("SELECT r.status FROM results r ORDER BY r.job").fetchall() == [(0,), (5,)]
    assert cw_cli("results", "again", "--failed", "--format", "csv").stdout.strip().count("\n") == 0


def test_retry_failed_in_the_store_runs_at_next_start(cw_home, procs, tmp_path):
    marker = str(tmp_path / "flaky")
    m = start_master(procs, "m1")
    start_workers(procs, 1, "--master-timeout", "1", "--give-up", "60")
    with cw.Client(run="later") as c:
        c.submit(flaky, marker).exception(30)
    m.send_signal(signal.SIGTERM)
    m.wait(10)
    out = cw_cli("retry", "later", "--failed")
    assert out.returncode == 0 and "will run when a master starts" in out.stdout, out.stdout + out.stderr
    start_master(procs, "m2")
    db = sqlite3.connect(ClusterDir().store_path)
    wait_for(lambda: db.execute("SELECT status FROM results").fetchall() == [(0,)], timeout=30,
             what="retried job done after restart")  # fmt: skip


def test_second_master_refuses(master, procs):
    p = procs.start("m2", "-m", "cw.master", "--port", "0")
    assert p.wait(20) != 0
    log = procs.log("m2")
    assert "already running" in log and str(master.path) in log


def test_queue_spills_to_the_store_and_comes_back(cw_home, procs, tmp_path):
    start_master(procs, "m", "--queue-window", "50")
    with cw.Client() as c:
        futs = c.map(nap, [0] * 600, range(600))
        st = wait_for(lambda: (lambda s: s if s["queued"] == 600 else None)(c.status()), what="600 queued")
        assert st["in_memory"] <= 50  # the rest waits in the store
        # cancel jobs that live only in the store
        marker = str(tmp_path / "ran")
        late = [c.submit(touch, marker + str(i)) for i in range(5)]
        assert all(f.cancel() for f in late)
        start_workers(procs, 2)
        assert c.gather(futs, timeout=60) == list(range(600))
        assert all(f.cancelled() for f in late)
    assert not any(os.path.exists(marker + str(i)) for i in range(5))
    db = sqlite3.connect(ClusterDir().store_path)
    assert db.execute("SELECT count(*) FROM results WHERE status = 5").fetchone()[0] == 5


def touch(path):
    open(path, "w").close()


@pytest.mark.timeout(120)
def test_master_restart_on_the_same_port_charges_nothing(cw_home, procs):
    port = _free_port()
    m1 = start_master(procs, "m1", "--port", str(port))
    start_workers(procs, 2, "--master-timeout", "3")
    with cw.Client(master_timeout=3) as c:
        wait_for(lambda: len(c.status()["workers"]) == 2, what="2 workers")
        futs = c.map(nap, [0.5] * 40, range(40))
        wait_for(lambda: sum(f.done() for f in futs) >= 4, what="some results")
        m1.kill()
        m1.wait()
        start_master(procs, "m2", "--port", str(port))
        assert c.gather(futs, timeout=90) == list(range(40))
    db = sqlite3.connect(ClusterDir().store_path)
    assert db.execute("SELECT count(*) FROM results").fetchone()[0] == 40
    assert db.execute("SELECT max(attempts) FROM jobs").fetchone()[0] == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_lost_ack_and_result_are_answered_on_resend(master, workers):
    """The link breaks after the commit: ack and result are lost; the resend brings the result."""
    import zmq
    from wire import RawPeer

    from cw import protocol as P
    from cw.serialize import dumps_args, dumps_function

    key = master.key()
    fn, blob = dumps_function(nap)
    ctx = zmq.Context()

    def connect():
        peer = RawPeer(ctx, master.master_address(), key, gate_key=key)
        peer.open()
        peer.send(P.HELLO, {"role": "client", "session": "s-lost", "run": None, "context": {}})
        return peer

    try:
        s1 = connect()
        assert s1.read(P.WELCOME)
        s1.send(P.SUBMIT, {"j": [[0, fn, None, None]], "f": [fn]}, [dumps_args((0, "v"), {}), blob])
        assert s1.read(P.RESULT)  # ...which this client never sees: its link breaks
        s1.close()
        s2 = connect()  # the same session again; seq 0 was never acknowledged to it
        assert s2.read(P.WELCOME)
        s2.send(P.SUBMIT, {"j": [[0, fn, None, None]], "f": [fn], "resend": True},
                [dumps_args((0, "v"), {}), blob])  # fmt: skip
        got = s2.read(P.RESULT)
        assert got, "the stored result never came back"
        h, blobs = got
        assert h["r"][0][:2] == [0, P.OK] and cw.serialize.loads(blobs[0]) == "v"
        s2.close()
    finally:
        ctx.term()
    db = sqlite3.connect(master.store_path)
    assert db.execute("SELECT count(*) FROM jobs WHERE session = 's-lost'").fetchone()[0] == 1


RERUN = """
import os, sys, time, uuid
import cw

def mark(x, where):
    open(os.path.join(where, f"{x}-{uuid.uuid4().hex}"), "w").close()
    time.sleep(0.05)
    return x * 10

with cw.Client(run="sweep-2") as c:
    if sys.argv[2:] == ["again"]:  # cache=False runs it anew
        print("R", c.submit(mark, 7, sys.argv[1], cache=False).result() // 10)
        sys.exit(0)
    futs = c.map(mark, range(300), [sys.argv[1]] * 300)
    for f in cw.as_completed(futs):
        print("R", f.result() // 10, flush=True)
"""


@pytest.mark.timeout(180)
def test_a_rerun_attaches_to_the_dead_clients_unfinished_jobs(master, workers, tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent(RERUN))
    execs = tmp_path / "execs"
    execs.mkdir()
    p = subprocess.Popen([sys.executable, str(script), str(execs)], stdout=subprocess.PIPE, text=True)
    for n, _ in enumerate(p.stdout, 1):
        if n >= 60:
            break
    p.kill()  # its other 240 jobs are still queued or running at the master
    p.wait()
    out = subprocess.run([sys.executable, str(script), str(execs)], capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr
    assert sorted(int(line.split()[1]) for line in out.stdout.splitlines()) == list(range(300))
    runs = Counter(name.split("-")[0] for name in os.listdir(execs))
    assert sorted(runs) == sorted(map(str, range(300))) and set(runs.values()) == {1}, "a job ran twice"
    db = sqlite3.connect(master.store_path)
    assert db.execute("SELECT count(*) FROM jobs WHERE run = 'sweep-2'").fetchone()[0] == 300
    again = subprocess.run([sys.executable, str(script), str(execs), "again"], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert again.stdout.split() == ["R", "7"], again.stderr
    assert len([n for n in os.listdir(execs) if n.startswith("7-")]) == 2


def count_runs(marker, x, seconds=0.0):
    with open(marker, "a") as f:
        f.write(f"{x}\n")
    time.sleep(seconds)
    return x


def other_function(marker, x, seconds=0.0):
    with open(marker, "a") as f:
        f.write(f"other {x}\n")
    return -x


@pytest.mark.timeout(120)
def test_attached_submissions_share_one_run_and_outlive_a_cancel(master, workers, tmp_path):
    marker = str(tmp_path / "runs")
    with cw.Client(run="shared") as a, cw.Client(run="shared") as b:
        first = a.submit(count_runs, marker, 1, 3.0, key="k1")
        wait_for(first.running, timeout=30, what="the job to start")
        second = b.submit(count_runs, marker, 1, 3.0, key="k1")  # attaches: no second run
        twice = b.submit(count_runs, marker, 1, 3.0, key="k1")  # so does a copy in one session
        assert first.cancel()  # a lets go; b still waits for it, so it runs on
        assert second.result(30) == 1 and twice.result(30) == 1
        with pytest.raises(cf.CancelledError):
            first.result(1)
        lone = b.submit(count_runs, marker, 2, 30.0, key="k2")
        wait_for(lone.running, timeout=30, what="the second job to start")
        assert b.cancel(lone) == 1 and lone.cancelled()  # nobody else waits for it: killed
    assert open(marker).read().split().count("1") == 1  # k1 ran once for all three


@pytest.mark.timeout(120)
def test_a_key_names_a_job_of_one_function(master, workers, tmp_path):
    """The same key= on two functions in one run: two jobs, each with its own result."""
    marker = str(tmp_path / "runs")
    with cw.Client(run="keys") as c:
        assert c.submit(count_runs, marker, 5, key="same").result(30) == 5
        assert c.submit(other_function, marker, 5, key="same").result(30) == -5
    with cw.Client(run="keys") as c:  # a re-run gets each function's own stored result
        assert c.submit(other_function, marker, 5, key="same").result(30) == -5
        assert c.submit(count_runs, marker, 5, key="same").result(30) == 5
    assert open(marker).read().splitlines() == ["5", "other 5"]


@pytest.mark.timeout(180)
def test_an_attached_submission_survives_a_master_restart(cw_home, procs, tmp_path):
    marker = str(tmp_path / "runs")
    m1 = start_master(procs, "m1")
    start_workers(procs, 1, "--master-timeout", "2")
    with cw.Client(run="restart", master_timeout=2) as a, cw.Client(run="restart", master_timeout=2) as b:
        first = a.submit(count_runs, marker, 3, 2.0, key="k")
        wait_for(first.running, timeout=30, what="the job to start")
        second = b.submit(count_runs, marker, 3, 2.0, key="k")  # attached, never acknowledged:
        m1.kill()  # b resends it to the next master, which attaches it again
        m1.wait()
        start_master(procs, "m2")
        assert second.result(90) == 3 and first.result(90) == 3


SETS = """
import os, sys, uuid
import cw

WORDS = {"alpha", "beta", "gamma", "delta", "epsilon"}

def ran(where, what):
    open(os.path.join(where, f"{what}-{uuid.uuid4().hex}"), "w").close()

def with_set(where, s):
    ran(where, "set")
    return len(s)

def reads_a_global_set(where, x):
    ran(where, "global")
    return x in WORDS and x not in {"zeta", "eta", "theta"}

with cw.Client(run="sets") as c:
    futures = [c.submit(with_set, sys.argv[1], {"a", "b", "c", "d", "e"}),
               c.submit(with_set, sys.argv[1], frozenset({"f", "g", "h", "i"})),
               c.submit(reads_a_global_set, sys.argv[1], "beta")]
    print(c.gather(futures))
"""


@pytest.mark.timeout(120)
def test_a_rerun_finds_jobs_whose_function_or_arguments_hold_sets(master, workers, tmp_path):
    """A set's order changes with each interpreter's string hashing: the function's hash
    and the default key must not, or a re-run runs everything again."""
    script = tmp_path / "sets.py"
    script.write_text(textwrap.dedent(SETS))
    execs = tmp_path / "execs"
    execs.mkdir()
    for seed in ("1", "2", "3"):
        out = subprocess.run([sys.executable, str(script), str(execs)], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHONHASHSEED": seed})  # fmt: skip
        assert out.returncode == 0 and out.stdout.strip() == "[5, 4, True]", out.stderr
    assert sorted(name.split("-")[0] for name in os.listdir(execs)) == ["global", "set", "set"]


CLIENTS = """
import cw

SCALE = 1

def f(x):
    return x * SCALE

with cw.Client() as c1:
    print(c1.submit(f, 10).result(30))
SCALE = 100
with cw.Client() as c2:  # a new client pickles the function anew, with the globals of now
    print(c2.submit(f, 10).result(30))
"""


@pytest.mark.timeout(60)
def test_each_client_pickles_its_functions_anew(master, workers, tmp_path):
    script = tmp_path / "clients.py"
    script.write_text(textwrap.dedent(CLIENTS))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["10", "1000"]


def big_echo(data, reply_bytes):
    """A large argument in, a large result out."""
    return hashlib.sha256(data).hexdigest(), bytes(reply_bytes)


@pytest.mark.timeout(180)
def test_large_arguments_and_results_live_in_files_and_survive_a_master_crash(cw_home, procs, tmp_path):
    """Blobs over defaults.LARGE_BLOB_BYTES go to <store>.blobs/, not the database: a job
    queued when the master is killed -9 is sent from its file by the next master; the
    results are files too; `cw results` and a re-run read them back."""
    m1 = start_master(procs, "m1")
    store = ClusterDir().store_path
    files = store.with_name(store.name + ".blobs")
    args = [os.urandom(300_000) + bytes([i]) for i in range(4)]
    with cw.Client(run="big", master_timeout=2) as c:
        futs = [c.submit(big_echo, a, 200_000 + i, key=f"k{i}") for i, a in enumerate(args)]
        wait_for(lambda: len(list(files.glob("*.args"))) == 4, what="four argument files")
        wait_for(lambda: sqlite3.connect(store).execute("SELECT count(*) FROM jobs").fetchone()[0] == 4,
                 what="four jobs committed")  # fmt: skip
        m1.kill()  # no worker yet: they are queued, in the store only
        m1.wait()
        start_master(procs, "m2")
        start_workers(procs, 1, "--master-timeout", "2")
        got = [f.result(60) for f in futs]
    assert got == [(hashlib.sha256(a).hexdigest(), bytes(200_000 + i)) for i, a in enumerate(args)]
    db = sqlite3.connect(store)
    refs = [r[0] for r in db.execute("SELECT args FROM jobs ORDER BY id")]
    assert all(r.startswith(b"cw:file:") for r in refs) and max(map(len, refs)) < 200, refs
    values = [r[0] for r in db.execute("SELECT value FROM results ORDER BY job")]
    assert all(v.startswith(b"cw:file:") for v in values), values
    assert sorted(p.name for p in files.iterdir()) == sorted(
        [f"{i}.args" for i in range(1, 5)] + [f"{i}.value" for i in range(1, 5)])
    out = cw_cli("results", "big", "--format", "json")
    assert out.returncode == 0, out.stderr
    assert sum(hashlib.sha256(a).hexdigest() in out.stdout for a in args) == 4
    with cw.Client(run="big") as c:  # a re-run: answered from the files, nothing runs again
        again = [c.submit(big_echo, a, 200_000 + i, key=f"k{i}") for i, a in enumerate(args)]
        assert [f.result(30) for f in again] == got
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 4
