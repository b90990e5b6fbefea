"""`cw sge` on the real single-node Grid Engine of scripts/sge-up.sh (all.q, 4 slots).

Four slots in all: pools of four workers run their master here
(``--master-here``), the others run it as a job.
"""

from __future__ import annotations

import socket
import sys

import pytest
from clusters import (
    Launched,
    cancel,
    hand_env,
    launched,
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

from cw.discovery import ClusterDir
from cw.launchers import environment_of
from cw.launchers.base import ENDED, PENDING, RUNNING
from cw.launchers.sge import _state, indices, seconds


@pytest.fixture
def pool(tmp_path, cw_home):
    yield from launched("sge", tmp_path)


# --------------------------------------------------------------- on Grid Engine
@pytest.mark.sge
@pytest.mark.timeout(150)
def test_pool_of_4_runs_200_jobs(pool: Launched):
    pool.up("--workers", "4", "--master-here", "--time", "0:10:00")
    rec = pool.record()
    assert rec["master"]["here"] and len(rec["arrays"]) == 1 and rec["arrays"][0]["tasks"] == 4
    array = rec["arrays"][0]["job"]
    c = pool.client()
    assert c.gather(c.map(square, range(200)), timeout=90) == [x * x for x in range(200)]
    workers = pool.wait_workers(4)
    assert sorted(worker_of(w["info"]) for w in workers) == [(array, str(i)) for i in range(1, 5)]
    st = pool.status()
    assert st["arrays"] == [{"job": array, "tasks": 4, "pending": 0, "running": 4, "ended": 0, "retiring": 0}]
    assert f"Grid Engine job {array}: 4 tasks, 4 running" in pool.cli("status").stdout


@pytest.mark.sge
@pytest.mark.timeout(150)
def test_master_job_is_found_through_master_json(pool: Launched):
    pool.up("--workers", "2", "--pe", "smp", "1")
    master = pool.record()["master"]["job"]
    assert queued("sge", [master]) == [master]
    info = pool.cluster.read_master()
    assert info["store"] == str(pool.cluster.store_path)
    c = pool.client()  # no address: found through master.json
    assert c.gather(c.map(square, range(50)), timeout=60) == [x * x for x in range(50)]
    assert len(pool.wait_workers(2)) == 2
    assert pool.status()["master"]["state"] == RUNNING


@pytest.mark.sge
@pytest.mark.timeout(150)
def test_qdel_of_a_task_mid_job_requeues_and_the_pool_heals(pool: Launched):
    # a grace shorter than the jobs: the cancelled worker hands its job back unfinished
    pool.up("--workers", "3", "--master-here", "--grace", "1")
    pool.wait_workers(3)  # then the jobs go one to each
    c = pool.client()
    futures = c.map(slow, range(3), [6.0] * 3)
    workers = wait_for(lambda: (lambda ws: ws if len(ws) == 3 and all(w["running"] for w in ws) else None)(
        pool.connected()), timeout=30, interval=0.2, what="a job on each of 3 workers")  # fmt: skip
    victim = workers[0]
    job, index = worker_of(victim["info"])
    run(["qdel", job, "-t", index])
    # SIGUSR2 (-notify): the victim drains, and its job goes back to the queue uncharged
    assert c.gather(futures, timeout=90) == list(range(3))
    with pool.store() as db:
        where = [w for (w,) in db.execute("SELECT worker FROM results")]
        assert db.execute("SELECT count(*) FROM jobs WHERE attempts > 0").fetchone()[0] == 0
    assert len(where) == 3 and victim["id"] not in where  # its job ran again elsewhere
    wait_for(lambda: len(pool.arrays()) == 2, timeout=30, what="a healing array job")
    rec = pool.record()
    assert rec["heals"] == 1 and rec["arrays"][1]["tasks"] == 1
    healed = rec["arrays"][1]["job"]
    wait_for(lambda: healed in {worker_of(w["info"])[0] for w in pool.connected()}, timeout=60,
             what="the new worker to connect")  # fmt: skip
    assert len(pool.connected()) == 3
    text = wait_for(lambda: (lambda t: t if "exit status" in t else None)(environment_of(victim["info"]).post_mortem()),
                    timeout=20, interval=0.5, what="qacct's record")  # fmt: skip
    assert text.startswith(f"SGE job {job}.{index}: exit status 0, failed 0"), text


@pytest.mark.sge
@pytest.mark.timeout(180)
def test_down_drains_and_leaves_qstat_empty(pool: Launched):
    pool.up("--workers", "2")
    c = pool.client()
    assert c.gather(c.map(square, range(30)), timeout=60) == [x * x for x in range(30)]
    pool.wait_workers(2)
    jobs = pool.all_jobs()
    c.close()
    p = pool.down()
    assert p.returncode == 0, p.stdout + p.stderr
    assert "no job left" in p.stdout
    assert queued("sge", jobs) == []
    assert not pool.cluster.master_json.exists()
    log = (pool.dir / "logs" / f"worker.{jobs[0]}.1.out").read_text()
    assert "draining (SIGUSR2 received)" in log


@pytest.mark.sge
@pytest.mark.timeout(120)
def test_qsub_scripts_work_as_documented(tmp_path, cw_home):
    require("sge")
    env = hand_env(tmp_path)
    pass_on = f"CW_PYTHON={sys.executable},CW_HOME={env['CW_HOME']},CW_CLUSTER={env['CW_CLUSTER']}"
    if env.get("PYTHONPATH"):  # the jobs run the cw under test (SLURM's inherit it; -v for Grid Engine's)
        pass_on += f",PYTHONPATH={env['PYTHONPATH']}"
    jobs: list[str] = []
    try:
        # sge/README.md:  qsub -v ... sge/master.sh ; qsub -t 1-2 -v ... sge/workers.sh
        p = run(["qsub", "-terse", "-v", pass_on, script("sge/master.sh")], env=env, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        jobs.append(submitted_id("sge", p.stdout))
        p = run(["qsub", "-terse", "-t", "1-2", "-v", pass_on, script("sge/workers.sh")], env=env, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        jobs.append(submitted_id("sge", p.stdout))
        cluster = ClusterDir(path=tmp_path / "home" / "hand")
        wait_for(cluster.master_address, timeout=60, what="master.json from the master's job")
        import cw

        # the original API: the master's host, from master.json, else from the batch system (by job name)
        assert cw.sge_master_host(cluster=str(cluster.path)) == socket.gethostname()
        assert cw.sge_master_host(cluster=str(tmp_path / "no-master-here")) == socket.gethostname()

        with cw.Client(cluster=str(cluster.path)) as c:
            assert c.gather(c.map(square, range(50)), timeout=60) == [x * x for x in range(50)]
            ws = wait_for(lambda: (lambda s: s if len(s["workers"]) == 2 else None)(c.status()), timeout=30,
                          what="2 workers")["workers"]  # fmt: skip
            assert sorted(w["info"]["SGE_TASK_ID"] for w in ws) == ["1", "2"]
        cancel("sge", jobs)
        wait_gone("sge", jobs)
        assert (tmp_path / f"cw-worker.{jobs[1]}.1.out").exists()
        assert (tmp_path / f"cw-master.{jobs[0]}.out").exists()
    finally:
        cancel("sge", jobs)


@pytest.mark.sge
@pytest.mark.timeout(60)
def test_batch_deadline_inside_a_job(tmp_path):
    require("sge")
    body = tmp_path / "deadline.sh"
    code = "import time; from cw.launchers import environment as e; print(e().deadline() - time.time())"
    body.write_text(f"#!/bin/bash\nexec {sys.executable} -c '{code}'\n")
    out = tmp_path / "deadline.out"
    p = run(["qsub", "-terse", "-N", "cw-deadline", "-S", "/bin/bash", "-l", "h_rt=0:03:00", "-j", "y",
             "-o", str(out), str(body)])  # fmt: skip
    assert p.returncode == 0, p.stderr
    job = submitted_id("sge", p.stdout)
    try:
        wait_gone("sge", [job], timeout=45)
        left = wait_for(lambda: out.exists() and out.read_text().split(), timeout=10, what="its output")
        assert 150 < float(left[-1]) <= 181, left
    finally:
        cancel("sge", [job])


# ------------------------------------------------------------ without Grid Engine
def test_sge_formats():
    assert seconds("3600") == 3600 and seconds("1:00:00") == 3600 and seconds("0:90:0") == 5400
    assert seconds("INFINITY") is None
    assert indices("") == [None] and indices("3") == [3]
    assert indices("2-8:2") == [2, 4, 6, 8] and indices("1,4-6:1") == [1, 4, 5, 6]
    assert [_state(s) for s in ("qw", "hqw", "r", "t", "Rr", "dr", "dqw", "Eqw", "s")] == [
        PENDING, PENDING, RUNNING, RUNNING, RUNNING, RUNNING, ENDED, ENDED, RUNNING]  # fmt: skip
