"""The cluster objects' shared surface on LocalCluster (scale, adapt, status, logs, the
reprs), the master's status document that adaptive pools read, and the pool's
retire and scale verbs on a scheduler that only pretends."""

from __future__ import annotations

import time

import pytest
from conftest import start_workers, wait_for

import cw
from cw.discovery import ClusterDir
from cw.launchers import cluster as cluster_objects
from cw.launchers.base import ENDED, PENDING, RUNNING, Scheduler, Task
from cw.launchers.elastic import scale
from cw.launchers.owner import Lease, OwnerWatch
from cw.launchers.pool import Pool


def nap(x, seconds=0.2):
    time.sleep(seconds)
    return x


def square(x):
    return x * x


# ---------------------------------------------------------------- LocalCluster
def test_local_cluster_scales_and_shows_itself(cw_home):
    with cw.LocalCluster(n_workers=1, cluster=str(cw_home / "lc")) as lc, cw.Client(lc) as c:
        assert c.submit(square, 4).result(30) == 16
        lc.scale(3)
        wait_for(lambda: len(c.status()["workers"]) == 3, timeout=30, what="3 workers")
        # the surplus goes, idle workers first: the busy one keeps its job
        busy = c.submit(nap, "kept", 3.0)
        wait_for(lambda: any(w["running"] for w in c.status()["workers"]), timeout=30, what="a busy worker")
        runner = next(w["pid"] for w in c.status()["workers"] if w["running"])
        lc.scale(1)
        assert [p.pid for p in lc.workers()] == [runner]
        assert busy.result(30) == "kept"
        wait_for(lambda: len(c.status()["workers"]) == 1, timeout=30, what="the others to drain and leave")
        st = lc.status()
        assert st["master"]["answering"] and st["done"] == 2 and st["adapt"] is None
        assert [w["pid"] for w in st["workers"] if w["alive"] and not w["draining"]] == [runner]
        text = repr(lc)
        assert text.startswith("<LocalCluster ") and "workers=1 running, 1 connected" in text
        assert "jobs=0 queued, 0 running, 2 done" in text and "size=1" in text
        html = lc._repr_html_()
        assert "<table>" in html and "LocalCluster" in html and "2 done" in html
        logs = lc.logs(tail=5)
        assert "master.log" in logs and sum(name.startswith("worker-") for name in logs) == 3
        assert "listening" in lc.logs()["master.log"]
    assert "(closed)" in repr(lc)


def test_local_cluster_adapts_from_zero_and_back(cw_home):
    with cw.LocalCluster(n_workers=0, cluster=str(cw_home / "lc")) as lc, cw.Client(lc) as c:
        assert "workers=0 running" in repr(lc)
        lc.adapt(maximum=3, idle_timeout=1, target_duration=1, interval=0.2)
        assert "adapt=0..3, idle 1s" in repr(lc)
        futures = c.map(nap, range(30))
        wait_for(lambda: len(lc.workers()) == 3, timeout=30, what="the pool to grow to its maximum")
        assert c.gather(futures, timeout=60) == list(range(30))
        wait_for(lambda: not lc.workers(), timeout=30, what="the pool to return to 0")
        assert lc.status()["adapt"]["maximum"] == 3
        # and again, while it runs: a second burst brings workers back
        assert c.gather(c.map(square, range(5)), timeout=60) == [x * x for x in range(5)]
        lc.scale(0)  # stops adapting
        assert lc.status()["adapt"] is None


def test_local_cluster_adapt_to_a_maximum_of_zero_starts_no_worker(cw_home):
    with cw.LocalCluster(n_workers=0, cluster=str(cw_home / "lc")) as lc, cw.Client(lc) as c:
        lc.adapt(minimum=0, maximum=0, interval=0.2)
        assert lc.status()["adapt"]["maximum"] == 0 and "adapt=0..0" in repr(lc)
        futures = c.map(square, range(4))
        time.sleep(2.0)  # ten decisions: none may start a worker
        assert not lc.workers() and not any(f.done() for f in futures)
        lc.adapt(minimum=0, maximum=2, interval=0.2, target_duration=1)
        assert c.gather(futures, timeout=60) == [0, 1, 4, 9]


# ------------------------------------------------- what adaptive pools read
def test_status_reports_queues_by_requirement_with_runtimes_and_idle_workers(master, procs):
    start_workers(procs, 1, "--tag", "small")
    with cw.Client() as c:
        wait_for(lambda: c.status()["workers"], timeout=20, what="a worker")
        assert c.gather(c.map(nap, range(3), [0.1] * 3), timeout=30) == [0, 1, 2]
        waiting = [c.submit(nap, i, 0.1, requires={"tags": ["big"]}) for i in range(4)]
        s = wait_for(lambda: (lambda s: s if s["queues"] else None)(c.status()), what="the queue")
        (q,) = s["queues"]
        assert (q["requires"], q["queued"]) == ({"tags": ["big"]}, 4)
        assert 0.09 <= q["runtime"] < 1.0  # measured on the three that ran: 0.1 s each, and some overhead
        (w,) = s["workers"]
        assert w["running"] == 0 and w["idle"] > 0  # it holds nothing: none of those jobs are for it
        time.sleep(0.3)
        assert c.status()["workers"][0]["idle"] > w["idle"]
        start_workers(procs, 1, "--tag", "big")
        assert c.gather(waiting, timeout=30) == [0, 1, 2, 3]
        assert c.status()["queues"] == []


# ------------------------------------------- retire and scale, on a pretend scheduler
class Recording(Scheduler):
    """A scheduler that only pretends, and remembers each call."""

    name, title = "slurm", "Recording"

    def __init__(self):
        self.states: dict[str, list[str]] = {}
        self.calls: list[tuple] = []

    def submit_master(self, script, spec):
        return "1"

    def submit_workers(self, script, count, spec):
        job = str(100 + len(self.states))
        self.states[job] = [PENDING] * count
        self.calls.append(("submit", count, spec.name))
        return job

    def tasks(self, jobs):
        self.calls.append(("tasks",))
        return [Task(j, i, s) for j in jobs for i, s in enumerate(self.states.get(j, ())) if s != ENDED]

    def cancel(self, jobs):
        self.calls.append(("cancel", sorted(jobs)))

    def drain(self, tasks):
        self.calls.append(("drain", sorted(tasks)))


def test_retire_cancels_pending_and_drains_running_in_one_call_each(tmp_path):
    sched = Recording()
    pool = Pool(sched, ClusterDir(path=tmp_path / "c"))
    with pool.record() as rec:
        rec.update({"scheduler": "slurm", "options": {}, "arrays": [], "target": 5, "heal": True})
        pool.submit_workers(rec, 5)
    sched.states["100"][:3] = [RUNNING] * 3
    with pool.record() as rec:
        tasks = sched.tasks(["100"])
        gone = pool.retire(rec, ["100_0", "100_1", "100_3", "100_4", "100_9"], tasks)
    assert gone == ["100_3", "100_4", "100_0", "100_1"]
    assert sched.calls[-2:] == [("cancel", ["100_3", "100_4"]), ("drain", ["100_0", "100_1"])]
    rec = pool.read()
    assert rec["arrays"][0]["retired"] == [0, 1, 3, 4]
    (a,) = pool.census(rec, sched.tasks(["100"]))
    assert (a["running"], a["pending"], a["retiring"]) == (3, 2, 4) and pool.live([a]) == 1


def test_scale_submits_the_missing_or_retires_the_surplus_pending_first(tmp_path):
    sched = Recording()
    pool = Pool(sched, ClusterDir(path=tmp_path / "c"))
    with pool.record() as rec:
        rec.update({"scheduler": "slurm", "options": {}, "arrays": [], "target": 0, "heal": True, "max_heals": 0,
                    "adapt": {"minimum": 0, "maximum": 9}})  # fmt: skip
    scale(pool, 4)
    assert sched.calls[-1] == ("submit", 4, pool.job_name("workers"))
    rec = pool.read()
    assert rec["target"] == 4 and rec["adapt"] is None and rec["max_heals"] == 40
    sched.states["100"] = [RUNNING, RUNNING, PENDING, PENDING]
    scale(pool, 1)  # no master answers: the running ones count as starting, after the pending
    assert sched.calls[-2:] == [("cancel", ["100_2", "100_3"]), ("drain", ["100_0"])]
    scale(pool, 1)
    assert sched.calls[-1] == ("tasks",)  # already there: nothing to do
    with pytest.raises(cw.CwError, match="not a number"):
        scale(pool, -1)


def test_an_owner_elsewhere_is_gone_once_its_lease_is_not_renewed(tmp_path):
    c = ClusterDir(path=tmp_path / "c")
    c.make()
    lease = Lease(c, lease=10)
    owner = {**lease.record(), "host": "another-host"}  # its pid cannot be checked from here
    watch = OwnerWatch(c)
    assert watch.gone(owner, now=0) is None and watch.gone(owner, now=9) is None
    lease.renew()  # renewed: the clock starts again
    assert watch.gone(owner, now=15) is None and watch.gone(owner, now=24) is None
    assert "has not renewed its lease" in watch.gone(owner, now=26)
    here = lease.record()  # on this host, its process decides at once, lease or not
    assert watch.gone(here, now=1e9) is None and watch.gone(None) is None
    dead = {**here, "pid": 2**22 + 12345}
    assert f"process {dead['pid']} on" in OwnerWatch(c).gone(dead)


def test_master_host_says_where_to_look_when_nobody_knows(tmp_path, monkeypatch):
    class Silent(Recording):
        def named(self, names):
            self.calls.append(("named", sorted(names)))
            return []

    monkeypatch.setattr(cluster_objects, "backends", lambda: {"silent": Silent})
    with pytest.raises(cw.NoMasterError, match="names no live master") as e:
        cluster_objects.master_host("silent", str(tmp_path / "c"))
    assert "'cw-c-master'" in str(e.value) and "'cw-master'" in str(e.value)
