"""`cw slurm` on the real single-node SLURM of scripts/slurm-up.sh (8 one-CPU slots).

Also the launcher's pieces that need no cluster: SLURM's time and sacct
formats, and the pool keeper's healing on a scheduler that only pretends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from clusters import (
    Launched,
    cancel,
    final_state,
    hand_env,
    launched,
    logged,
    queued,
    require,
    run,
    script,
    slow,
    square,
    submitted_id,
    wait_for,
    wait_gone,
    worker_of,
)

import cw
from cw import defaults
from cw.discovery import ClusterDir
from cw.launchers import environment, environment_of
from cw.launchers.base import ENDED, PENDING, RUNNING, Scheduler, Task
from cw.launchers.keeper import Keeper
from cw.launchers.pool import Pool
from cw.launchers.slurm import _sacct_line, seconds


@pytest.fixture
def pool(tmp_path, cw_home):
    yield from launched("slurm", tmp_path)


# --------------------------------------------------------------------- on SLURM
@pytest.mark.slurm
@pytest.mark.timeout(150)
def test_pool_of_4_runs_200_jobs(pool: Launched):
    out = pool.up("--workers", "4", "--time", "10").stdout
    assert "master at tcp://" in out
    rec = pool.record()
    assert len(rec["arrays"]) == 1 and rec["arrays"][0]["tasks"] == 4  # ONE array job
    array = rec["arrays"][0]["job"]
    c = pool.client()  # no address: found through master.json
    assert c.gather(c.map(square, range(200)), timeout=90) == [x * x for x in range(200)]
    workers = pool.wait_workers(4)
    assert sorted(worker_of(w["info"]) for w in workers) == [(array, str(i)) for i in range(4)]
    assert all(w["slots"] == 1 for w in workers)  # --procs = the CPUs each task was given
    st = pool.status()
    assert st["arrays"] == [{"job": array, "tasks": 4, "pending": 0, "running": 4, "ended": 0, "retiring": 0}]
    text = pool.cli("status").stdout
    assert f"SLURM job {array}: 4 tasks, 4 running" in text and "connected: 4 workers" in text


def shout(x):
    print(f"working on {x}")
    if x == 3:
        print(f"cannot handle {x}", file=sys.stderr)
        raise ValueError(f"bad {x}")
    return x


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_seeing_the_work_on_a_pool(pool: Launched, capsys):
    """The README's walk on SLURM: a progress bar, a failed job's own stderr from Python and
    from `cw logs`, `cw top`, and the dashboard's data naming each worker's batch job."""
    pool.up("--workers", "2", "--time", "10")
    c = pool.client(run="seen")
    futs = c.map(shout, range(6))
    failed = sum(f.exception() is not None for f in cw.as_completed(futs, progress=True, timeout=120))
    assert failed == 1 and "6/6" in capsys.readouterr().err
    assert futs[3].stderr() == "cannot handle 3\n" and futs[2].stdout() == "working on 2\n"
    logs = run([sys.executable, "-m", "cw", "logs", "seen", "--failed", "--cluster-dir", str(pool.dir)]).stdout
    assert "cannot handle 3" in logs and "ValueError: bad 3" in logs and "working on 2" not in logs
    workers = pool.wait_workers(2)
    labels = sorted(w["label"] for w in workers)
    assert all(label.startswith("SLURM job ") for label in labels)
    top = run([sys.executable, "-m", "cw", "top", "--once", "--cluster-dir", str(pool.dir)],
              env={**os.environ, "COLUMNS": "200"}).stdout  # fmt: skip
    assert "seen" in top and "ValueError: bad 3" in top and all(label in top for label in labels), top


@pytest.mark.slurm
@pytest.mark.timeout(150)
def test_master_job_is_found_through_master_json_and_resumes_from_its_store(pool: Launched, tmp_path):
    pool.up("--workers", "1", "--cpus-per-task", "2", "--time", "10")
    master = pool.record()["master"]["job"]
    info = pool.cluster.read_master()
    assert info and final_state(master) == "RUNNING"
    assert info["store"] == str(pool.cluster.store_path)  # the store lives next to master.json
    marks = tmp_path / "ran.txt"
    c = pool.client(run="sweep")
    assert c.gather(c.map(logged, range(20), [str(marks)] * 20), timeout=60) == [x * 10 for x in range(20)]
    assert [w["slots"] for w in pool.wait_workers(1)] == [2]
    c.close()
    # the master's job ends; `up` again starts another that resumes from the store
    cancel("slurm", [master])
    wait_for(lambda: not pool.cluster.master_json.exists(), timeout=30, what="master.json withdrawn")
    pool.up("--workers", "1", "--cpus-per-task", "2", "--time", "10")
    assert pool.record()["master"]["job"] != master
    assert len(pool.arrays()) == 1  # the workers' array outlived the master: no second one
    c = pool.client(run="sweep")
    assert c.gather(c.map(logged, range(20), [str(marks)] * 20), timeout=60) == [x * 10 for x in range(20)]
    assert len(marks.read_text().split()) == 20  # stored results: nothing ran twice


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_scancel_of_a_task_mid_job_requeues_its_job_and_the_pool_heals(pool: Launched):
    pool.up("--workers", "4", "--time", "10")
    pool.wait_workers(4)  # then the 4 jobs go one to each
    c = pool.client()
    # longer than KillWait (5 s): the worker's grace after a SIGTERM ends below it
    # (--term-grace, from KillWait), so it hands its job back before SLURM's SIGKILL
    futures = c.map(slow, range(4), [8.0] * 4)
    workers = wait_for(lambda: (lambda ws: ws if len(ws) == 4 and all(w["running"] for w in ws) else None)(
        pool.connected()), timeout=60, interval=0.2, what="a job on each of 4 workers")  # fmt: skip
    victim = workers[0]
    job, index = worker_of(victim["info"])
    cancel("slurm", [f"{job}_{index}"])
    assert c.gather(futures, timeout=90) == [0, 1, 2, 3]
    # its job ran again elsewhere
    with pool.store() as db:
        where = [w for (w,) in db.execute("SELECT worker FROM results")]
    assert len(where) == 4 and victim["id"] not in where
    with pool.store() as db:  # handed back, not lost: no attempt charged
        assert db.execute("SELECT count(*) FROM jobs WHERE attempts > 0").fetchone()[0] == 0
    # the keeper saw the task end and submitted one new task
    wait_for(lambda: len(pool.arrays()) == 2, timeout=30, what="a healing array job")
    rec = pool.record()
    assert rec["heals"] == 1 and rec["arrays"][1]["tasks"] == 1
    healed = rec["arrays"][1]["job"]
    wait_for(lambda: {worker_of(w["info"])[0] for w in pool.connected()} >= {healed}, timeout=60,
             what="the new worker to connect")  # fmt: skip
    assert len(pool.connected()) == 4
    text = environment_of(victim["info"]).post_mortem()
    assert text.startswith(f"SLURM job {job}_{index}: ") and "CANCELLED" in text, text


@pytest.mark.slurm
@pytest.mark.timeout(150)
def test_a_worker_drains_before_its_time_limit_and_nothing_is_charged(pool: Launched):
    pool.up("--workers", "1", "--time", "1", "--no-heal")
    task = f"{pool.arrays()[0]}_0"
    c = pool.client()
    c.map(slow, range(400), [0.2] * 400)  # 80 s of work for a 60 s task
    started = time.monotonic()
    wait_for(lambda: final_state(task) not in ("PENDING", "RUNNING", "COMPLETING"), timeout=100,
             interval=0.5, what="the worker's task to end")  # fmt: skip
    assert final_state(task) == "COMPLETED"  # it left by itself: not TIMEOUT, not CANCELLED
    assert time.monotonic() - started < 60
    with pool.store() as db:
        assert db.execute("SELECT count(*) FROM jobs WHERE attempts > 0").fetchone()[0] == 0
        assert 0 < db.execute("SELECT count(*) FROM results").fetchone()[0] < 400
    master_log = next((pool.dir / "logs").glob("master-*.out")).read_text()
    assert " lost " not in master_log and "left" in master_log


@pytest.mark.slurm
@pytest.mark.timeout(150)
def test_down_drains_and_leaves_squeue_empty(pool: Launched):
    pool.up("--workers", "3", "--time", "10")
    c = pool.client()
    assert c.gather(c.map(square, range(30)), timeout=60) == [x * x for x in range(30)]
    pool.wait_workers(3)
    jobs = pool.all_jobs()
    c.close()
    p = pool.down()
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no job left" in p.stdout
    assert queued("slurm", jobs) == []
    assert not pool.cluster.master_json.exists()
    states = {final_state(f"{a}_{i}") for a in jobs[:-1] for i in range(3)}
    assert states <= {"CANCELLED", "COMPLETED"}, states
    assert "draining" in (pool.dir / "logs" / f"worker-{jobs[0]}_0.out").read_text()


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_sbatch_scripts_work_as_documented(tmp_path, cw_home):
    require("slurm")
    env = hand_env(tmp_path)
    jobs: list[str] = []
    try:
        # slurm/README.md:  sbatch slurm/master.sbatch ; sbatch --array=0-1 slurm/workers.sbatch
        p = run(["sbatch", "--parsable", script("slurm/master.sbatch")], env=env, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        jobs.append(submitted_id("slurm", p.stdout))
        p = run(["sbatch", "--parsable", "--array=0-1", script("slurm/workers.sbatch")], env=env, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        jobs.append(submitted_id("slurm", p.stdout))
        cluster = ClusterDir(path=tmp_path / "home" / "hand")
        wait_for(cluster.master_address, timeout=60, what="master.json from the master's job")
        import cw

        # the original API: the master's host, from master.json, else from the batch system (by job name)
        assert cw.slurm_master_host(cluster=str(cluster.path)) == socket.gethostname()
        assert cw.slurm_master_host(cluster=str(tmp_path / "no-master-here")) == socket.gethostname()

        with cw.Client(cluster=str(cluster.path)) as c:
            assert c.gather(c.map(square, range(50)), timeout=60) == [x * x for x in range(50)]
            ws = wait_for(lambda: (lambda s: s if len(s["workers"]) == 2 else None)(c.status()), timeout=30,
                          what="2 workers")["workers"]  # fmt: skip
            assert sorted(w["info"]["SLURM_ARRAY_TASK_ID"] for w in ws) == ["0", "1"]
        cancel("slurm", jobs)
        wait_gone("slurm", jobs)
        assert not cluster.master_json.exists()  # scancel: the master stopped cleanly
        assert (tmp_path / f"cw-worker-{jobs[1]}_0.out").exists()
    finally:
        cancel("slurm", jobs)


@pytest.mark.slurm
@pytest.mark.timeout(60)
def test_batch_deadline_inside_a_job(tmp_path):
    require("slurm")
    code = "import time; from cw.launchers import environment as e; print(e().deadline() - time.time())"
    out = tmp_path / "deadline.out"
    p = run(["sbatch", "--parsable", "--time=3", f"--output={out}", "--wrap",
             subprocess.list2cmdline([sys.executable, "-c", code])])  # fmt: skip
    assert p.returncode == 0, p.stderr
    job = submitted_id("slurm", p.stdout)
    try:
        wait_gone("slurm", [job], timeout=45)
        left = float(out.read_text().split()[-1])
        assert 150 < left <= 181, left  # 3 minutes, less the start-up
    finally:
        cancel("slurm", [job])


# ----------------------------------------------------------------- without SLURM
def test_slurm_time_formats():
    assert seconds("30") == 1800
    assert seconds("5:30") == 330
    assert seconds("4:00:00") == 14400
    assert seconds("2-12") == 2 * 86400 + 12 * 3600
    assert seconds("1-00:30:00") == 86400 + 1800
    assert seconds("UNLIMITED") is None and seconds(None) is None
    with pytest.raises(ValueError):
        seconds("four hours")


def test_sacct_post_mortem_line():
    out = (
        "JobID|State|ExitCode|Elapsed|NodeList|MaxRSS\n"
        "123_4|OUT_OF_MEMORY|0:125|00:10:02|node7|\n"
        "123_4.batch|OUT_OF_MEMORY|0:125|00:10:02|node7|3.9G\n"
        "123_4.extern|COMPLETED|0:0|00:10:02|node7|120K\n"
    )
    assert _sacct_line(out, "123_4") == "OUT_OF_MEMORY, exit code 0:125, after 00:10:02 on node7, max RSS 3.9G"
    assert _sacct_line("JobID|State\n", "123_4") is None


def test_post_mortem_and_deadline_never_raise(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert environment_of({}).post_mortem() is None
    assert "state unknown" in environment_of({"SLURM_JOB_ID": "12"}).post_mortem()
    assert "no accounting record" in environment_of({"JOB_ID": "12", "SGE_TASK_ID": "3"}).post_mortem()
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    assert environment().deadline() is None
    monkeypatch.setenv("SLURM_JOB_END_TIME", "1900000000")
    assert environment().deadline() == 1900000000.0


class Pretend(Scheduler):
    """A scheduler that only pretends: arrays whose tasks a test ends at will."""

    name, title = "slurm", "Pretend"

    def __init__(self):
        self.arrays: dict[str, list[str]] = {}
        self.down = False

    def submit_master(self, script, spec):
        return "1"

    def submit_workers(self, script, count, spec):
        job = str(100 + len(self.arrays))
        self.arrays[job] = [RUNNING] * count
        return job

    def tasks(self, jobs):
        if self.down:
            return None
        return [Task(j, i, s) for j in jobs for i, s in enumerate(self.arrays.get(j, ())) if s != ENDED]

    def cancel(self, jobs):
        for j in jobs:
            self.arrays[j] = [ENDED] * len(self.arrays[j])


def _pretend_pool(tmp_path, **rec) -> tuple[Pretend, Pool, Keeper]:
    sched = Pretend()
    pool = Pool(sched, ClusterDir(path=tmp_path / "c"))
    with pool.record() as r:
        r.update({"scheduler": "slurm", "target": 3, "heal": True, "max_heals": 4, "heals": 0,
                  "filled": False, "arrays": [], "options": {}, **rec})  # fmt: skip
    return sched, pool, Keeper(pool, poll=1)


def test_keeper_fills_then_heals_with_backoff_up_to_its_cap(tmp_path):
    sched, pool, keeper = _pretend_pool(tmp_path)
    assert keeper.tick(now=0) == 3  # the first submission, if `up` did not make it
    assert keeper.tick(now=1) == 0  # full
    sched.arrays["100"][1] = ENDED
    assert keeper.tick(now=2) == 1  # healed at once ...
    sched.arrays["100"][2] = ENDED
    assert keeper.tick(now=3) == 0  # ... the next heal waits HEAL_BACKOFF
    assert keeper.tick(now=2 + defaults.HEAL_BACKOFF) == 1
    sched.arrays["100"][0] = ENDED
    sched.arrays["101"][0] = ENDED
    assert keeper.tick(now=2 + defaults.HEAL_BACKOFF) == 0  # backoff doubled
    assert keeper.tick(now=2 + 3 * defaults.HEAL_BACKOFF) == 2  # the cap: 4 heals in all
    sched.arrays["103"][0] = ENDED
    assert keeper.tick(now=1e6) == 0
    rec = pool.read()
    assert rec["heals"] == 4 and [a["tasks"] for a in rec["arrays"]] == [1, 2]  # ended arrays pruned


def test_keeper_without_heal_stopping_or_answer_submits_nothing(tmp_path):
    sched, pool, keeper = _pretend_pool(tmp_path, heal=False)
    assert keeper.tick(now=0) == 3
    sched.arrays["100"] = [ENDED] * 3
    assert keeper.tick(now=100) == 0  # --no-heal
    with pool.record() as r:
        r["heal"] = True
    sched.down = True
    assert keeper.tick(now=200) == 0  # the scheduler did not answer: no guess
    sched.down = False
    with pool.record() as r:
        r["stopping"] = True
    assert keeper.tick(now=300) == 0  # `down` is under way
    assert list(sched.arrays) == ["100"]


def test_census_counts_tasks_the_scheduler_no_longer_lists_as_ended(tmp_path):
    pool = Pool(Pretend(), ClusterDir(path=tmp_path / "c"))
    rec = {"arrays": [{"job": "7", "tasks": 4}, {"job": "8", "tasks": 1}]}
    tasks = [Task("7", 0, RUNNING), Task("7", 1, PENDING), Task("7", 2, ENDED, "TIMEOUT"), Task("9", 0, RUNNING)]
    (a, b) = pool.census(rec, tasks, prune=True)
    assert (a["running"], a["pending"], a["ended"]) == (1, 1, 2)
    assert (b["running"], b["pending"], b["ended"]) == (0, 0, 1)
    assert rec["arrays"] == [{"job": "7", "tasks": 4}] and rec["ended"] == 1


def test_serve_master_stops_on_the_schedulers_signals(tmp_path, procs):
    """The master of a pool, with its keeper (--keep-pool), withdraws master.json and stops
    on SIGTERM and on Grid Engine's SIGUSR2."""
    cluster = ClusterDir(path=tmp_path / "c")
    # a pool of size 0: the keeper reads it, and has nothing to submit
    pool = Pool(Pretend(), cluster)
    with pool.record() as r:
        r.update({"scheduler": "slurm", "target": 0, "heal": True, "max_heals": 0, "heals": 0,
                  "arrays": [], "options": {}, "poll": 0.2})  # fmt: skip
    before = pool.read()
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        name = f"serve-{sig.name}"
        p = procs.start(name, "-m", "cw.master", "--cluster-dir", str(cluster.path), "--port", "0",
                        "--keep-pool", "--poll", "0.2", env={"CW_LOG_LEVEL": "DEBUG"})  # fmt: skip
        wait_for(lambda p=p: cluster.master_address() or p.poll() is not None, what="master.json")
        assert p.poll() is None, procs.log(name)
        wait_for(lambda n=name: "pool keeper: keeping" in procs.log(n), what="the keeper", timeout=15)
        time.sleep(0.5)  # a few of the keeper's turns
        p.send_signal(sig)
        assert p.wait(15) == 0, procs.log(name)
        assert not cluster.master_json.exists(), procs.log(name)
        assert "pool keeper: unexpected error" not in procs.log(name)
    assert pool.read() == before  # target 0: nothing submitted, nothing changed


def test_keep_pool_without_a_pool_is_an_error(tmp_path):
    """`cw master --keep-pool` on a directory with no pool.json says so, and starts nothing."""
    p = run([sys.executable, "-m", "cw.master", "--cluster-dir", str(tmp_path / "c"), "--port", "0",
             "--keep-pool"], timeout=60)  # fmt: skip
    assert p.returncode != 0 and "no pool recorded" in p.stderr, p.stdout + p.stderr
