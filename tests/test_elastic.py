"""Pools that grow and shrink with the work, on the real single-node SLURM and Grid Engine.

The README's notebook session runs on both (``SlurmCluster`` / ``SGECluster``,
``cw.Client(cluster)``, ``cluster.adapt(...)``): a burst grows the pool from
0, and it returns to 0 after the idle timeout; a maximum lowered mid-burst
retires busy workers by draining them, and nothing is lost or charged. On
SLURM also: ``cw slurm up --adapt`` with a resource profile, and a pool that
goes down with the process that owns it (unless ``keep=True``).

Timeouts and intervals are short (1 s decisions, 2 s idle timeouts) so that
each test takes seconds, not minutes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from clusters import Launched, launched, queued, run, wait_for

import cw

BACKENDS = [pytest.param("slurm", marks=pytest.mark.slurm), pytest.param("sge", marks=pytest.mark.sge)]
CLUSTERS = {"slurm": cw.SlurmCluster, "sge": cw.SGECluster}
MASTER_HOST = {"slurm": cw.slurm_master_host, "sge": cw.sge_master_host}
DRAIN_SIGNAL = {"slurm": "SIGUSR1", "sge": "SIGUSR2"}  # scancel --batch --signal=USR1; qdel with -notify


@pytest.fixture
def pool(request, tmp_path, cw_home):
    yield from launched(getattr(request, "param", "slurm"), tmp_path)


def nap(x, seconds=0.25):
    time.sleep(seconds)
    return x


def array_job(x):
    """Which array job ran this (the worker's batch job)."""
    time.sleep(0.2)
    return os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("JOB_ID")


def master_log(pool: Launched) -> str:
    return "\n".join(f.read_text(errors="replace") for f in sorted((pool.dir / "logs").glob("master*")))


def all_arrays(pool: Launched) -> list[str]:
    """Every worker array the pool submitted, from the master's log (pool.json forgets ended ones)."""
    jobs = []
    for line in master_log(pool).splitlines():
        if "adaptive pool: submitted" in line:
            jobs.append(line.rsplit(" ", 1)[-1].split(".")[0])
    return jobs


@pytest.mark.parametrize("pool", BACKENDS, indirect=True)
@pytest.mark.timeout(180)
def test_the_notebook_session_grows_from_zero_and_returns_to_zero(pool: Launched):
    system = pool.scheduler
    with CLUSTERS[system](cores=2, memory="2G", walltime="0:10:00", cluster=str(pool.dir), poll=1) as cluster, \
            cw.Client(cluster) as client:  # fmt: skip
        cluster.adapt(maximum=3, idle_timeout="2s", target_duration="2s", interval="1s")
        assert pool.arrays() == [] and "adapt=0..3, idle 2s" in repr(cluster)
        assert "<table>" in cluster._repr_html_() and "0..3, idle 2s" in cluster._repr_html_()
        with pytest.raises(cw.CwError, match="already owns the pool"):
            CLUSTERS[system](cluster=str(pool.dir))  # one owner per pool
        assert MASTER_HOST[system](cluster=str(pool.dir)) == socket.gethostname()
        assert client.gather(client.map(nap, range(40)), timeout=120) == list(range(40))
        # it grew from 0 with ONE array job of 3 tasks (40 jobs of unknown runtime on 2-slot
        # workers: more than its maximum's worth), each worker with the 2 cores it asked for
        arrays = all_arrays(pool)
        assert len(arrays) == 1 and pool.record()["arrays"][0]["tasks"] == 3, master_log(pool)
        joined = [line for line in master_log(pool).splitlines() if " joined with " in line]
        assert joined and all(" joined with 2 slots" in line for line in joined), joined
        # ... and back to 0 once its workers have been idle for 2 s
        wait_for(lambda: not queued(system, arrays), timeout=60, interval=0.5, what="the pool to return to 0")
        assert cluster.status()["connected"]["workers"] == []
        assert "retiring" in master_log(pool) and " lost " not in master_log(pool)
        assert f"draining ({DRAIN_SIGNAL[system]} received)" in "".join(cluster.logs().values())
    assert not pool.cluster.master_json.exists() and queued(system, arrays) == []


@pytest.mark.parametrize("pool", BACKENDS, indirect=True)
@pytest.mark.timeout(180)
def test_nothing_is_lost_when_workers_are_retired_mid_burst(pool: Launched):
    system = pool.scheduler
    with CLUSTERS[system](cores=1, memory="1G", walltime="0:10:00", cluster=str(pool.dir), poll=1,
                          grace=20) as cluster, cw.Client(cluster) as client:  # fmt: skip
        # two workers (Grid Engine's queue has four slots, which other jobs may hold)
        cluster.adapt(maximum=2, idle_timeout=60, target_duration=1, interval=1)
        futures = client.map(nap, range(20), [0.5] * 20)
        wait_for(lambda: (lambda ws: len(ws) == 2 and all(w["running"] for w in ws))(
            cluster.status()["connected"]["workers"]), timeout=60, interval=0.3, what="2 busy workers")  # fmt: skip
        cluster.adapt(maximum=1, idle_timeout=60, target_duration=1, interval=1)  # lowered mid-burst
        wait_for(lambda: len(cluster.status()["connected"]["workers"]) == 1, timeout=60, interval=0.3,
                 what="a worker retired")  # fmt: skip
        assert not all(f.done() for f in futures)  # the burst goes on
        assert client.gather(futures, timeout=120) == list(range(20))
    with pool.store() as db:
        assert db.execute("SELECT count(*) FROM results WHERE status = 0").fetchone()[0] == 20
        assert db.execute("SELECT count(*) FROM jobs WHERE attempts > 0").fetchone()[0] == 0  # nothing charged
        ran_on = {w for (w,) in db.execute("SELECT worker FROM results")}
    assert len(ran_on) >= 2  # the retired workers had run jobs before they left
    log = master_log(pool)
    assert "retiring 1" in log and " lost " not in log, log


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_up_adapt_with_a_resource_profile(pool: Launched):
    out = pool.up("--adapt", "0:3", "--idle-timeout", "2s", "--master-here", "--time", "10",
                  "--profile", "foam:tag=openfoam:--comment=cw-foam").stdout  # fmt: skip
    assert "adaptive: 0 to 3 workers" in out and pool.arrays() == []
    c = pool.client()
    plain = c.map(array_job, range(4))
    foam = [c.submit(array_job, i, requires={"tags": ["openfoam"]}) for i in range(4)]
    plain_arrays, foam_arrays = set(c.gather(plain, timeout=90)), set(c.gather(foam, timeout=90))
    rec = pool.record()
    profiles = {a["job"]: a.get("profile", "") for a in rec["arrays"]}
    assert {profiles[j] for j in foam_arrays} == {"foam"}  # where they were placed, plain jobs may run too
    assert sorted(profiles.values()) == ["", "foam"]  # one array job per profile
    for job, profile in profiles.items():  # the profile's batch flags went to its array only
        comment = run(["squeue", "-h", "-r", "-j", job, "-o", "%k"]).stdout.split()
        assert comment[:1] == (["cw-foam"] if profile else ["(null)"]), (job, profile, comment)
    assert plain_arrays <= set(profiles)
    assert "adaptive 0..3" in pool.cli("status").stdout and "profile foam" in pool.cli("status").stdout
    wait_for(lambda: not queued("slurm", [*profiles]), timeout=60, interval=0.5, what="the pool to return to 0")
    # a fixed size from now on: one worker, then none
    assert "scale to 1: submitted 1 workers" in pool.cli("scale", "1").stdout
    pool.wait_workers(1)
    assert "not healing" not in pool.cli("status").stdout and "adaptive" not in pool.cli("status").stdout
    assert "scale to 0: retiring 1 workers" in pool.cli("scale", "0").stdout
    wait_for(lambda: not pool.connected(), timeout=60, interval=0.5, what="the worker to drain and leave")


OWNER = textwrap.dedent("""
    import sys, time
    import cw
    cluster = cw.SlurmCluster(cores=1, walltime="0:10:00", n_workers=1, cluster=sys.argv[1], poll=1,
                              keep=sys.argv[2] == "keep")
    print("ready", flush=True)
    if sys.argv[2] == "sleep":
        time.sleep(600)
    # "keep", "exit": the script ends without closing its cluster
""")


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_the_pool_goes_down_with_its_owner_unless_kept(tmp_path, cw_home):
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    pools = [launched("slurm", tmp_path / name) for name in ("killed", "exits", "kept")]
    killed, exits, kept = (next(p) for p in pools)
    try:
        # killed outright: its keeper sees the owner's process gone, drains the pool, stops the master
        owner = subprocess.Popen([sys.executable, str(script), str(killed.dir), "sleep"], stdout=subprocess.PIPE,
                                 text=True)  # fmt: skip
        assert owner.stdout.readline().strip() == "ready"
        killed.wait_workers(1)
        arrays = killed.arrays()
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        wait_for(lambda: not queued("slurm", arrays) and not killed.cluster.master_json.exists(), timeout=60,
                 interval=0.5, what="the pool of a killed owner to go down")  # fmt: skip
        assert f"its owner, process {owner.pid} on {socket.gethostname()}, ended" in master_log(killed)
        # the script ends without closing: the pool goes down at its exit
        p = run([sys.executable, str(script), str(exits.dir), "exit"], timeout=120)
        assert p.returncode == 0, p.stderr
        assert "workers: SLURM job" in p.stderr and "pool down" in p.stderr, p.stderr
        assert exits.by_name() == [] and not exits.cluster.master_json.exists()
        # keep=True: the pool outlives its owner, until `cw slurm down`
        p = run([sys.executable, str(script), str(kept.dir), "keep"], timeout=120)
        assert p.returncode == 0 and "lives on (keep=True)" in p.stderr, p.stderr
        time.sleep(2)  # a few of the keeper's looks
        assert kept.wait_workers(1) and queued("slurm", kept.arrays())
        # a second object with keep=True and no options uses the pool as it is
        before = json.loads((kept.dir / "pool.json").read_text())
        p = run([sys.executable, "-c", f"import cw; cw.SlurmCluster(cluster={str(kept.dir)!r}, keep=True).close()"],
                timeout=60)  # fmt: skip
        assert p.returncode == 0, p.stderr
        after = json.loads((kept.dir / "pool.json").read_text())
        assert {k: after[k] for k in ("target", "max_heals", "poll", "options")} == \
            {k: before[k] for k in ("target", "max_heals", "poll", "options")}  # fmt: skip
        assert after["target"] == 1 and after["options"].get("time"), after
        assert kept.down().returncode == 0 and queued("slurm", kept.arrays()) == []
    finally:
        for g in pools:
            g.close()
