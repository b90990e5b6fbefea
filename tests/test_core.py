"""The core engine end to end: real master, worker processes, sockets and SQLite."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import zmq
from conftest import start_workers, wait_for
from wire import RawPeer

import cw
import cw.client
from cw import protocol as P
from cw.discovery import ClusterDir


def square(x):
    return x * x


def add(a, b=0, *, c=0):
    return a + b + c


class Boom(ValueError):
    pass


def raises(msg):
    raise Boom(msg)


def where():
    return os.getpid(), socket.gethostname()


def abort():
    os.abort()


# -- the original Cluster-Workers usage ------------------------------------------
def test_master_prints_address_and_publishes(cw_home, procs):
    p = procs.start("m", "-m", "cw.master", "--port", "0")
    cluster = ClusterDir()
    info = wait_for(cluster.read_master, what="master.json")
    out = wait_for(lambda: "published" in procs.log("m") and procs.log("m"), what="output")
    assert f"listening on {info['address']}" in out
    assert str(cluster.master_json) in out
    assert info["pid"] == p.pid and info["address"].startswith("tcp://")
    # owner only: the key, and the store with every job's arguments and results
    assert oct(cluster.key_path.stat().st_mode & 0o777) == "0o600"
    assert oct(cluster.path.stat().st_mode & 0o777) == "0o700"
    wait_for(cluster.store_path.exists, what="the store")
    assert oct(cluster.store_path.stat().st_mode & 0o777) == "0o600"


def test_client_thread_seed_usage(master, procs):
    start_workers(procs, 1, "--procs", "2", address="localhost")
    done = {}
    lock = threading.Lock()

    def my_callback(jobid, result):
        with lock:
            done[jobid] = result

    thread = cw.client.ClientThread(my_callback, host="localhost")
    thread.start()
    ids = [thread.submit(add, i, b=1, c=10) for i in range(50)]
    assert len(set(ids)) == 50
    assert thread.wait(30)
    thread.stop()
    assert done == {j: i + 11 for j, i in zip(ids, range(50))}


def test_client_thread_reports_errors(master, workers):
    got = []
    t = cw.ClientThread(lambda j, r: got.append((j, r)))
    t.start()
    j = t.submit(raises, "no")
    assert t.wait(30)
    t.stop()
    assert got[0][0] == j and isinstance(got[0][1], Boom)


# -- futures ---------------------------------------------------------------------
def test_futures_api(master, workers):
    with cw.Client() as c:
        f = c.submit(square, 12)
        assert isinstance(f, cf.Future)
        assert f.result(30) == 144
        futs = c.map(add, range(100), range(100))
        assert c.gather(futs) == [2 * i for i in range(100)]
        done = [f.result() for f in cw.as_completed(c.map(square, range(20)), timeout=30)]
        assert sorted(done) == [i * i for i in range(20)]
        # a burst is shared by both workers
        wait_for(lambda: len(c.status()["workers"]) == 2, what="2 workers")
        pids = {p for p, _ in c.gather([c.submit(where) for _ in range(200)])}
        assert len(pids) == 2


def test_executor_takes_process_pool_arguments(cw_home):
    with cw.Executor(max_workers=2) as ex:  # no master: an embedded cluster of 2 workers
        assert sorted(ex.map(square, range(8), chunksize=4)) == [i * i for i in range(8)]
        assert len(ex.client.status()["workers"]) <= 2
    with pytest.raises(ValueError):
        cw.Executor(max_workers=0)


def test_executor_is_a_concurrent_futures_executor(master, workers):
    assert issubclass(cw.Executor, cf.Executor)
    with cw.Executor() as ex:
        assert list(ex.map(square, range(10))) == [i * i for i in range(10)]
        assert ex.submit(add, 1, 2).result(30) == 3
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


def test_job_exception_reraised_with_remote_traceback(master, workers):
    with cw.Client() as c:
        f = c.submit(raises, "kaboom")
        with pytest.raises(Boom, match="kaboom") as ei:
            f.result(30)
        cause = ei.value.__cause__
        assert isinstance(cause, cw.errors.RemoteTraceback)
        assert "in raises" in str(cause) and "Boom: kaboom" in str(cause)


def test_child_crash_is_reported_and_worker_survives(master, workers):
    with cw.Client() as c:
        f = c.submit(abort)
        with pytest.raises(cw.JobCrashedError, match="SIGABRT"):
            f.result(30)
        # the agent replaced its child and keeps serving
        assert c.gather(c.map(square, range(50)), timeout=30) == [i * i for i in range(50)]
        assert len(c.status()["workers"]) == 2


def test_unpicklable_argument_raises_in_submit(master, workers):
    with cw.Client() as c:
        with pytest.raises(cw.SerializationError, match="argument 1 .*lock"):
            c.submit(add, 1, threading.Lock())
        with pytest.raises(cw.SerializationError, match="keyword argument 'c'"):
            c.submit(add, 1, c=threading.Lock())
        assert c.submit(square, 3).result(30) == 9  # nothing was lost or wedged


def test_oversized_argument(master, workers, monkeypatch):
    monkeypatch.setattr(cw.defaults, "MAX_MESSAGE", 1000)
    with cw.Client() as c:
        with pytest.raises(cw.MessageTooLargeError, match="largest message"):
            c.submit(len, b"x" * 5000)
        assert c.submit(len, b"x" * 100).result(30) == 100


def test_wrong_key_is_reported_fast(master, workers, monkeypatch):
    monkeypatch.setenv("CW_KEY", "ab" * 32)
    t0 = time.monotonic()
    with pytest.raises(cw.AuthenticationError, match="key"):
        cw.Client()
    assert time.monotonic() - t0 < 5


def test_worker_with_the_wrong_key_exits_clearly(master, procs):
    p = procs.start("bad-worker", "-m", "cw.worker", env={"CW_KEY": "cd" * 32})
    assert p.wait(20) != 0
    assert "rejected this worker's key" in procs.log("bad-worker")


def test_no_master_names_the_address(cw_home):
    ClusterDir().key(create=True)
    with pytest.raises(cw.NoMasterError, match="tcp://127.0.0.1:1"):
        cw.Client("tcp://127.0.0.1:1", connect_timeout=1)


def test_garbage_on_the_socket_does_not_hurt_the_master(master, workers):
    address = master.master_address()
    host, port = address[len("tcp://"):].rsplit(":", 1)
    # raw bytes that are not even ZMTP
    for junk in (b"\x00" * 10, os.urandom(4096), b"GET / HTTP/1.1\r\n\r\n"):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(junk)
    # well-framed ZeroMQ messages that are truncated, unsigned or forged, from a peer
    # that passed the gate (a key holder's token) but has no session
    ctx = zmq.Context()
    peer = RawPeer(ctx, address, b"z" * 32, gate_key=master.key())
    s = peer.sock
    s.send_multipart([b"x"])
    s.send_multipart([P.VERSION, P.SUBMIT])
    s.send_multipart([P.VERSION, P.SUBMIT, b"\x00" * 32, b"\x00" * 8, b"{}", os.urandom(100)])
    s.send_multipart(P.pack(b"z" * 32, P.SUBMIT, {"j": []}))
    s.send_multipart(P.open_message(b"z" * 32, P.nonce()))  # a session opened with another key
    assert s.poll(5000), "the master answers an OPEN signed with another key with REJECT"
    while s.poll(200):
        frames = s.recv_multipart()
        if P.is_reject(frames):
            break
    assert P.is_reject(frames)
    peer.close()
    ctx.term()
    with cw.Client() as c:
        assert c.gather(c.map(square, range(20)), timeout=30) == [i * i for i in range(20)]
        assert c.status()["bad_messages"] >= 3


def test_function_bytes_cross_once_per_worker(master, workers):
    with cw.Client() as c:
        for _ in range(3):  # several batches, the same function every time
            assert c.gather(c.map(square, range(300)), timeout=30) == [i * i for i in range(300)]
        assert c.submit(add, 1, 2).result(30) == 3

        def counters():
            ws = c.status()["workers"]
            return len(ws) == 2 and all(w["counters"].get("results") for w in ws) and ws

        ws = wait_for(lambda: (lambda w: w and sum(x["counters"]["results"] for x in w) == 901 and w)(counters()),
                      what="worker counters")  # fmt: skip
    for w in ws:
        # each worker received each function it ran exactly once, whatever the job count
        assert 1 <= w["counters"]["fn_received"] <= 2, w


def test_map_passes_other_keywords_to_the_function_and_takes_futures_among_values(master, workers):
    """map's bulk path: cw's own options are submit's, any other keyword goes to the
    function; an item that is a future makes its job wait for it, in order with the rest."""
    with cw.Client() as c:
        first = c.submit(square, 3)
        futs = c.map(add, [1, first, 2], [10, 20, 30], c=100, timeout=30)
        assert c.gather(futs, timeout=30) == [111, 129, 132]
        assert len({f.jobid for f in futs} | {first.jobid}) == 4


def test_results_are_in_the_store(master, workers):
    with cw.Client(run="stored") as c:
        assert c.gather(c.map(square, range(100)), timeout=30)[-1] == 99 * 99
        c.submit(raises, "x").exception(30)
    db = sqlite3.connect(master.store_path)
    assert db.execute("SELECT count(*) FROM jobs WHERE run = 'stored'").fetchone()[0] == 101
    rows = db.execute(
        "SELECT r.status, r.value, r.error, r.traceback FROM results r JOIN jobs j ON j.id = r.job"
        " WHERE j.run = 'stored' ORDER BY j.id"
    ).fetchall()
    assert len(rows) == 101
    assert [cw.serialize.loads(v) for s, v, _, _ in rows[:100]] == [i * i for i in range(100)]
    assert rows[100][0] == P.RAISED and "Boom: x" in rows[100][2] and "in raises" in rows[100][3]
    assert db.execute("SELECT count(*) FROM functions").fetchone()[0] == 2


# -- embedded and serial ---------------------------------------------------------
def test_embedded_local_cluster_by_default(cw_home, caplog):
    with caplog.at_level(logging.INFO, logger="cw"):
        with cw.Client(n_workers=2) as c:
            assert c.gather(c.map(square, range(10)), timeout=30) == [i * i for i in range(10)]
            assert c.submit(where).result(30)[0] != os.getpid()
    started = [r for r in caplog.records if "local cw cluster" in r.getMessage()]
    assert len(started) == 1


def test_local_cluster_context_manager(cw_home):
    with cw.LocalCluster(n_workers=2) as lc:
        with lc.client() as c:
            assert c.submit(square, 5).result(30) == 25
            wait_for(lambda: len(c.status()["workers"]) == 2, what="2 workers")
        procs = list(lc.procs)
    assert all(p.poll() is not None for p in procs)


def test_serial_runs_in_process_in_order(cw_home):
    order = []
    with cw.Client(serial=True) as c:
        futs = [c.submit(lambda i: order.append(i) or os.getpid(), i) for i in range(5)]
        assert [f.result() for f in futs] == [os.getpid()] * 5
        with pytest.raises(Boom):
            c.submit(raises, "serial").result()
        with pytest.raises(cw.SerializationError):  # the same checks as on a cluster
            c.submit(add, 1, threading.Lock())
        for exit_with in (lambda: sys.exit(3), lambda: (_ for _ in ()).throw(KeyboardInterrupt)):
            with pytest.raises(cw.JobError, match="the job raised") as e:  # the caller's program goes on
                c.submit(exit_with).result()
            assert isinstance(e.value.original, (SystemExit, KeyboardInterrupt))
    assert order == [0, 1, 2, 3, 4]


# -- the command line ------------------------------------------------------------
def test_cli_version_and_help():
    out = subprocess.run([sys.executable, "-m", "cw", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and cw.__version__ in out.stdout
    for cmd in (["master"], ["worker"], ["status"]):
        h = subprocess.run([sys.executable, "-m", "cw", *cmd, "--help"], capture_output=True, text=True)
        assert h.returncode == 0
        opts = [line for line in h.stdout.splitlines() if line.strip().startswith("--")]
        assert opts and all(len(line.split(None, 1)) > 1 for line in opts), h.stdout
    for mod in ("cw.master", "cw.worker"):
        h = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True)
        assert h.returncode == 0 and f"python -m {mod}" in h.stdout


def test_cw_worker_cli_joins(master, procs):
    procs.start("w", "-m", "cw", "worker", "--procs", "2")
    with cw.Client() as c:
        ws = wait_for(lambda: c.status()["workers"], what="worker")
        assert ws[0]["slots"] == 2
        assert c.submit(square, 4).result(30) == 16


def nap(seconds):
    time.sleep(seconds)
    return seconds


def test_status_tells_running_from_prefetched(master, procs):
    """A one-slot worker holds two long jobs: one runs, one waits behind it."""
    start_workers(procs, 1)
    with cw.Client() as c:
        wait_for(lambda: c.status()["workers"], what="worker")
        futs = [c.submit(nap, 3) for _ in range(5)]
        doc = wait_for(lambda: (lambda d: d if d["running"] == 1 and d["prefetched"] == 1 else None)(c.status()),
                       what="one running, one prefetched")  # fmt: skip
        assert doc["queued"] == 3
        (w,) = doc["workers"]
        assert (w["running"], w["prefetched"]) == (1, 1)
        out = subprocess.run([sys.executable, "-m", "cw", "status"], capture_output=True, text=True, timeout=30)
        assert "jobs: 3 queued, 1 running, 1 prefetched" in out.stdout, out.stdout
        assert "1 running      1 prefetched" in out.stdout, out.stdout
        c.cancel(futs)


def test_executor_map_chunksize_as_process_pool():
    """map(chunksize=n) runs n calls per job and yields every result in order; a bad size is refused."""
    with pytest.raises(ValueError, match="chunksize"):
        cw.Executor(serial=True).map(square, [1], chunksize=0)
    with cw.Executor(serial=True) as ex:
        assert list(ex.map(add, range(7), range(7), chunksize=3)) == [2 * i for i in range(7)]
    with cf.ProcessPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="chunksize"):
            pool.map(square, [1], chunksize=0)


def test_executor_map_chunks_travel_as_fewer_jobs(master, workers):
    with cw.Executor() as ex:
        assert list(ex.map(square, range(10), chunksize=4)) == [i * i for i in range(10)]
        st = ex.client.status()
    assert st["done"] == 3  # 4 + 4 + 2 calls


class Scaler:
    def __init__(self, k):
        self.k = k

    def scale(self, x):
        return self.k * x


def takes_options(x, timeout=None, key=None, max_retries=None):
    return (x, timeout, key, max_retries)


def test_executor_and_client_thread_pass_every_keyword_to_the_function(master, workers):
    with cw.Executor() as ex:
        assert ex.submit(takes_options, 1, timeout=2, key="k", max_retries=5).result(30) == (1, 2, "k", 5)
    got = []
    t = cw.ClientThread(lambda j, r: got.append(r))
    t.start()
    t.submit(takes_options, 1, timeout=3, key="q")
    assert t.wait(30)
    t.stop()
    assert got == [(1, 3, "q", None)]


def test_a_bound_method_travels_with_its_current_state(master, workers):
    s = Scaler(2)
    with cw.Client() as c:
        assert c.submit(s.scale, 10).result(30) == 20
        s.k = 3
        assert c.submit(s.scale, 10).result(30) == 30


def sigterm_in_a_subprocess():
    code = "import signal; print(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()


def test_programs_a_job_starts_get_default_signal_handling(master, workers):
    with cw.Client() as c:
        assert c.submit(sigterm_in_a_subprocess).result(30) == "True"


def agent_pid():
    return os.getppid()


def test_requirements_choose_the_worker(master, procs):
    plain, tagged = start_workers(procs, 1)[0], start_workers(procs, 1, "--tag", "special", "--procs", "2")[0]
    with cw.Client() as c:
        wait_for(lambda: len(c.status()["workers"]) == 2, what="2 workers")
        on_tag = {f.result(30) for f in [c.submit(agent_pid, requires={"tags": ["special"]}) for _ in range(20)]}
        on_cpus = {f.result(30) for f in [c.submit(agent_pid, requires={"cpus": 2}) for _ in range(20)]}
        anywhere = {f.result(30) for f in [c.submit(agent_pid) for _ in range(100)]}
    assert on_tag == {tagged.pid} and on_cpus == {tagged.pid}
    assert plain.pid in anywhere


def test_cancelling_while_results_arrive_never_breaks_the_client(master, workers):
    with cw.Client() as c:
        for _ in range(20):
            futs = c.map(square, range(200))
            for f in futs[::2]:
                f.cancel()
            for f in futs[1::2]:
                assert f.result(30) in {i * i for i in range(200)}
        assert c.submit(square, 9).result(30) == 81
        for f in cw.as_completed(c.map(square, range(50)), timeout=30):
            f.result()
        with cw.Executor() as ex:  # closing map() early cancels the rest
            it = ex.map(square, range(500))
            assert next(it) == 0
            it.close()
        assert c.submit(square, 4).result(30) == 16
