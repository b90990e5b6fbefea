"""Pause and resume: a paused worker gets no new job within a heartbeat, --stop-running
really stops its jobs' CPU use (measured) and resume continues them without charging the
stopped time to their timeout; --for ends by itself; the worker's own user pauses it
without the cluster's key. Real workers, real signals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import wait_for

import cw


def cw_cmd(*args, env=None):
    p = subprocess.run([sys.executable, "-m", "cw", *args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **(env or {})})  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def agent_of_job(seconds=0.0):
    time.sleep(seconds)
    return os.getppid()  # the executor's parent: the worker's agent


def burn(cpu_seconds, pidfile):
    """Uses this much CPU time in this process, however long that takes."""
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    t0 = time.monotonic()
    while time.process_time() < cpu_seconds:
        pass
    return time.monotonic() - t0


BURN = "echo $$ > {pidfile}; exec python3 -c 'import time\nwhile time.process_time() < {s}: pass'"


def cpu_time(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_used(pids: list[int], over: float = 1.0) -> list[float]:
    """CPU seconds each process used over ``over`` seconds of wall time."""
    a = [cpu_time(p) for p in pids]
    time.sleep(over)
    return [cpu_time(p) - x for p, x in zip(pids, a)]


def workers_by_pid(c):
    return {w["pid"]: w for w in c.status()["workers"]}


@pytest.mark.timeout(120)
def test_a_paused_worker_gets_no_new_job_and_resumes(master, procs):
    a = procs.start("a", "-m", "cw.worker", "--heartbeat", "0.2")
    b = procs.start("b", "-m", "cw.worker", "--heartbeat", "0.2")
    with cw.Client() as c:
        ws = wait_for(lambda: len(workers_by_pid(c)) == 2 and workers_by_pid(c), what="two workers")
        shared = os.path.commonprefix([ws[a.pid]["id"], ws[b.pid]["id"]])  # the same host's
        assert shared
        p = subprocess.run([sys.executable, "-m", "cw", "pause", "--worker", shared], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        assert p.returncode == 1 and "starts the ids of 2 workers" in p.stderr, p.stderr
        assert not any(w["paused"] for w in workers_by_pid(c).values())  # neither was paused
        out = cw_cmd("pause", "--worker", ws[a.pid]["id"])
        assert "1 workers paused" in out
        assert workers_by_pid(c)[a.pid]["paused"] == {"until": None, "stopped": False}  # at once
        assert "PAUSED" in cw_cmd("status")
        top = cw_cmd("top", "--once", env={"COLUMNS": "250"}).splitlines()  # cw top says so too
        assert [line for line in top if ws[a.pid]["id"] in line and "paused" in line], top
        assert set(c.gather([c.submit(agent_of_job, 0.1) for _ in range(8)], timeout=60)) == {b.pid}
        out = cw_cmd("resume", "--worker", ws[a.pid]["id"])
        assert "1 workers resumed" in out and workers_by_pid(c)[a.pid]["paused"] is None
        assert set(c.gather([c.submit(agent_of_job, 0.3) for _ in range(8)], timeout=60)) == {a.pid, b.pid}
        # --for: the pause ends by itself
        cw_cmd("pause", "--host", ws[a.pid]["host"], "--for", "1.5")
        assert all(w["paused"] for w in workers_by_pid(c).values())
        wait_for(lambda: not any(w["paused"] for w in workers_by_pid(c).values()), timeout=10,
                 what="the pause to end by itself")  # fmt: skip
        assert c.submit(agent_of_job).result(30) in (a.pid, b.pid)


@pytest.mark.timeout(150)
def test_stop_running_stops_cpu_use_and_the_stopped_time_is_not_timed(master, procs, tmp_path):
    w = procs.start("w", "-m", "cw.worker", "--heartbeat", "0.2", "--procs", "2")
    with cw.Client() as c:
        wid = wait_for(lambda: workers_by_pid(c).get(w.pid), what="the worker")["id"]
        fn_pid, sh_pid = tmp_path / "fn.pid", tmp_path / "sh.pid"
        # 2.5 s of CPU each, within a 7 s timeout; they will be stopped for 8 s of it
        f = c.submit(burn, 2.5, str(fn_pid), timeout=7)
        s = c.submit_shell(BURN.format(pidfile=sh_pid, s=2.5), timeout=7)
        pids = [wait_for(lambda p=p: p.exists() and p.read_text().strip() and int(p.read_text()), what=str(p))
                for p in (fn_pid, sh_pid)]  # fmt: skip
        assert min(cpu_used(pids, 1.0)) > 0.05  # burning
        cw_cmd("pause", "--worker", wid, "--stop-running")
        time.sleep(0.3)
        used = cpu_used(pids, 1.0)
        assert max(used) < 0.03, f"the jobs still use CPU: {used}"
        assert workers_by_pid(c)[w.pid]["paused"]["stopped"] is True
        time.sleep(6.7)  # stopped 8 s in all: past their timeout, had it counted
        assert not f.done() and not s.done()
        cw_cmd("resume", "--worker", wid)
        before = [cpu_time(p) for p in pids]  # they go on (as fast as a shared machine lets them)
        wait_for(lambda: all(cpu_time(p) - b > 0.1 for p, b in zip(pids, before)), timeout=20,
                 what="the stopped jobs to use CPU again")  # fmt: skip
        assert f.result(30) > 8.0  # it finished (more than 8 s of wall time, 2.5 of CPU)
        assert s.result(30).returncode == 0


@pytest.mark.timeout(120)
def test_the_workers_user_pauses_it_without_the_cluster_key(master, procs, tmp_path):
    private = tmp_path / "ctl"  # this test's workers' sockets, away from any other's
    private.mkdir()
    batch_tmp = tmp_path / "job-tmp"  # a batch system's $TMPDIR for the job: not where `cw pause` looks
    batch_tmp.mkdir()
    w = procs.start("w", "-m", "cw.worker", "--heartbeat", "0.2",
                    env={"CW_CONTROL_ROOT": str(private), "TMPDIR": str(batch_tmp)})  # fmt: skip
    nokey = {"CW_CONTROL_ROOT": str(private), "CW_HOME": str(tmp_path / "elsewhere")}  # no key, no master.json
    with cw.Client() as c:
        wait_for(lambda: workers_by_pid(c).get(w.pid), what="the worker")
        sockets = list((private / f"cw-{os.getuid()}").glob("ctl-*.sock"))
        assert len(sockets) == 1 and oct(os.stat(sockets[0].parent).st_mode & 0o777) == "0o700"
        dead = sockets[0].parent / "ctl-999999999.sock"  # a worker killed with kill -9 left its socket
        dead.touch()
        other = subprocess.run([sys.executable, "-m", "cw", "pause", "--cluster-dir", str(tmp_path / "other")],
                               capture_output=True, text=True, timeout=60, env={**os.environ, **nokey})  # fmt: skip
        assert other.returncode != 0 and "none matched" in other.stderr  # another cluster's workers only
        assert not dead.exists() and "skipped" not in other.stderr  # the dead one's socket is gone, unsaid
        t0 = time.monotonic()
        out = cw_cmd("pause", "--stop-running", env=nokey)
        assert "1 workers paused, their running jobs stopped" in out
        wait_for(lambda: workers_by_pid(c)[w.pid]["paused"], timeout=1.0, what="the master to know, in a heartbeat")
        assert time.monotonic() - t0 < 3
        f = c.submit(agent_of_job)
        time.sleep(1.0)
        assert not f.done()  # no new job while paused
        assert "1 workers resumed" in cw_cmd("resume", env=nokey)
        again = subprocess.run([sys.executable, "-m", "cw", "resume"], capture_output=True, text=True,
                               timeout=60, env={**os.environ, **nokey})  # fmt: skip
        assert again.returncode != 0 and "none matched" in again.stderr  # it was not paused any more
        assert f.result(30) == w.pid
        assert json.loads(cw_cmd("status", "--json"))["workers"][0]["paused"] is None
