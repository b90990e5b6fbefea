"""Jobs that behave like real programs: they fork, leave processes behind, run pools,
return what cannot be pickled. Real workers, real processes, real kills."""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import start_workers, wait_for

import cw
from cw import system
from cw.discovery import ClusterDir


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may linger under init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def square(x):
    return x * x


def fork_and_return(marker):
    """Forks, and both processes return (a classic bug in real code)."""
    pid = os.fork()
    if pid == 0:
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        return "child"
    return ("parent", pid)


def leave_processes():
    """Starts processes of every kind and returns without waiting for them."""
    plain = subprocess.Popen(["sleep", "300"])
    session = subprocess.Popen(["sleep", "300"], start_new_session=True)
    daemon = subprocess.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"],
                            capture_output=True, text=True).stdout  # fmt: skip
    pid = os.fork()
    if pid == 0:
        time.sleep(300)
        os._exit(0)
    return [plain.pid, session.pid, int(daemon), pid]


def start_processes_and_hang(pidfile, raw_fork=False, then=None):
    """Starts processes (one in a session of its own), writes their pids, then hangs
    or does `then` ("kill": SIGKILL itself). With raw_fork, a C-level fork keeps the
    executor's pipe open in a child that leaves the group."""
    pids = [subprocess.Popen(["sleep", "300"]).pid,
            subprocess.Popen(["sleep", "300"], start_new_session=True).pid]  # fmt: skip
    if raw_fork:
        pid = ctypes.CDLL(None).fork()  # no at-fork hooks: the child keeps every fd
        if pid == 0:
            os.setsid()
            time.sleep(300)
            os._exit(0)
        pids.append(pid)
    with open(pidfile, "w") as f:
        f.write(" ".join(map(str, pids)))
    if then == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(300)


def read_pids(pidfile):
    return wait_for(lambda: os.path.exists(pidfile) and [int(p) for p in open(pidfile).read().split()],
                    timeout=30, what="the job's processes")  # fmt: skip


def cpus_and_pools():
    """What a job sees of its CPUs, and pools of 2 inside it."""
    with multiprocessing.Pool(2) as pool:
        pooled = pool.map(square, range(10))
        pool_cpus = pool.map(_affinity, range(2))
    with cf.ProcessPoolExecutor(2) as ex:
        executed = list(ex.map(square, range(10)))
    return {"cpu_count": os.cpu_count(), "affinity": _affinity(), "pool": pooled, "pool_cpus": pool_cpus,
            "executor": executed, "omp": os.environ.get("OMP_NUM_THREADS")}  # fmt: skip


def _affinity(_=None):
    return sorted(os.sched_getaffinity(0))


def hold(seconds):
    time.sleep(seconds)
    return _affinity()


def returns_lock():
    return threading.Lock()


def returns_generator():
    return (i for i in range(3))


class Refuses:
    def __reduce__(self):
        raise RuntimeError("no pickling me")


def returns_refuser():
    return Refuses()


@pytest.fixture
def fast_master(cw_home, procs):
    """A master that loses a worker silent for 2 s: an agent that blocks is seen lost."""
    cluster = ClusterDir()
    procs.start("master", "-m", "cw.master", "--port", "0", "--heartbeat", "0.2", "--worker-timeout", "2")
    wait_for(cluster.master_address, what="master.json")
    return cluster


def _one_worker(client):
    return wait_for(lambda: (lambda w: w[0]["id"] if len(w) == 1 else None)(client.status()["workers"]),
                    timeout=30, what="the worker")  # fmt: skip


def _workers_left(cluster):
    db = sqlite3.connect(cluster.store_path)
    try:
        return db.execute("SELECT id, reason FROM workers WHERE left IS NOT NULL").fetchall()
    finally:
        db.close()


@pytest.mark.timeout(90)
def test_a_job_that_forks_and_returns_twice_answers_once(master, procs, tmp_path):
    (agent,) = start_workers(procs, 1)
    marker = tmp_path / "children"
    with cw.Client() as c:
        results = c.gather([c.submit(fork_and_return, str(marker)) for _ in range(10)], timeout=60)
        assert [r[0] for r in results] == ["parent"] * 10  # the forked process never answers
        # (it ends with its job: it may not even have had the time to write its pid)
        written = marker.read_text().split() if marker.exists() else []
        assert set(map(int, written)) <= {r[1] for r in results}
        wait_for(lambda: not any(running(r[1]) for r in results), what="the forked processes to end")
        assert c.submit(square, 7).result(30) == 49
    assert agent.poll() is None, procs.log("worker-1")
    assert "Traceback" not in procs.log("worker-1")
    db = sqlite3.connect(master.store_path)
    assert db.execute("SELECT count(*), count(DISTINCT job) FROM results").fetchone() == (11, 11)


@pytest.mark.timeout(60)
def test_processes_a_job_leaves_behind_end_with_it(master, procs):
    start_workers(procs, 1)
    with cw.Client() as c:
        pids = c.submit(leave_processes).result(30)
        assert len(set(pids)) == 4 and all(p > 0 for p in pids)
        wait_for(lambda: not any(map(running, pids)), what="the job's processes to end")
        assert c.submit(square, 3).result(30) == 9


@pytest.mark.timeout(90)
def test_a_timed_out_job_takes_its_processes_and_the_worker_stays(fast_master, procs, tmp_path):
    start_workers(procs, 1)
    with cw.Client() as c:
        wid = _one_worker(c)
        for i in range(3):  # each kill replaces the executor: the agent must never stall
            pidfile = str(tmp_path / f"pids-{i}")
            f = c.submit(start_processes_and_hang, pidfile, raw_fork=(i == 2), timeout=1)
            pids = read_pids(pidfile)
            with pytest.raises(cw.TimeoutError):
                f.result(30)
            wait_for(lambda pids=pids: not any(map(running, pids)), what="the job's processes to end")
        assert c.submit(square, 4).result(30) == 16
        assert [w["id"] for w in c.status()["workers"]] == [wid]
    assert _workers_left(fast_master) == [], "the worker was declared lost"


@pytest.mark.timeout(90)
def test_a_crashing_job_holding_its_pipe_is_reported_at_once(fast_master, procs, tmp_path):
    """The job's executor dies while a process it forked (in its own session) still
    holds the executor's pipe: the crash is seen all the same, and that process ends."""
    start_workers(procs, 1)
    with cw.Client() as c:
        wid = _one_worker(c)
        pidfile = str(tmp_path / "pids")
        f = c.submit(start_processes_and_hang, pidfile, raw_fork=True, then="kill")
        with pytest.raises(cw.JobCrashedError, match="SIGKILL"):
            f.result(30)
        pids = read_pids(pidfile)
        wait_for(lambda: not any(map(running, pids)), what="the job's processes to end")
        assert c.submit(square, 5).result(30) == 25
        assert [w["id"] for w in c.status()["workers"]] == [wid]
    assert _workers_left(fast_master) == []


@pytest.mark.timeout(90)
def test_a_killed_worker_takes_its_jobs_processes(master, procs, tmp_path):
    (agent,) = start_workers(procs, 1)
    with cw.Client() as c:
        _one_worker(c)
        pidfile = str(tmp_path / "pids")
        c.submit(start_processes_and_hang, pidfile)
        pids = read_pids(pidfile)
        (executor,) = system.children(agent.pid)
        agent.kill()  # kill -9: nothing of the worker may stay behind
        wait_for(lambda: not any(map(running, [executor, *pids])), what="the job's processes to end")


@pytest.mark.timeout(120)
def test_pools_inside_a_job_run_on_the_cpus_it_was_given(master, procs):
    start_workers(procs, 1, "--procs", "2")
    mask = sorted(os.sched_getaffinity(0))
    per = max(1, len(mask) // 2)
    with cw.Client() as c:
        out = c.submit(cpus_and_pools).result(60)
        assert out["pool"] == out["executor"] == [x * x for x in range(10)]
        assert out["cpu_count"] == per and len(out["affinity"]) == per
        assert out["pool_cpus"] == [out["affinity"]] * 2  # the pool's processes stay on them
        assert out["omp"] == str(per)
        # two jobs at once run on two slots: on different CPUs when there are two
        a, b = c.gather([c.submit(hold, 1.0), c.submit(hold, 1.0)], timeout=60)
        if len(mask) >= 2:
            assert not set(a) & set(b), (a, b)


SCRIPT = """
import multiprocessing, sys
import cw

def inner(x):
    return x * x

def job(n):
    with multiprocessing.Pool(2) as pool:
        return sum(pool.map(inner, range(n)))

if __name__ == "__main__":
    with cw.Client() as c:
        print(c.submit(job, 10).result(60))
"""


@pytest.mark.timeout(120)
def test_a_pool_of_functions_from_the_clients_script(master, workers, tmp_path):
    script = tmp_path / "pooled.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(sum(x * x for x in range(10)))]


@pytest.mark.timeout(60)
def test_a_result_that_cannot_be_pickled_says_so(workers):
    with cw.Client() as c:
        for fn, what in ((returns_lock, "_thread.lock"), (returns_generator, "generator"),
                         (returns_refuser, "Refuses")):  # fmt: skip
            with pytest.raises(cw.SerializationError, match=f"returned a .*{what}.*cannot be pickled"):
                c.submit(fn).result(30)
        assert c.submit(square, 6).result(30) == 36  # the worker goes on
