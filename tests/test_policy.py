"""The scheduling policy on its own: no sockets, no store, no processes."""

from __future__ import annotations

import itertools

from cw import defaults
from cw.master.policy import Job, Policy, Worker, satisfies

_ids = itertools.count(1)


def job(fn="f", requires=None, args=b"x"):
    return Job(next(_ids), None, 0, fn, args, requires, None, 3)


def worker(name, slots=1, **caps):
    return Worker(name.encode(), {"id": name, "procs": slots, "caps": caps, "running": []})


def placed(policy, compatible=lambda j, w: True):
    """{worker id: ids of the jobs placed on it}, over both passes."""
    out: dict[str, list[int]] = {}
    for w, jobs in policy.assign(compatible):
        out.setdefault(w.id, []).extend(j.id for j in jobs)
    return out


def test_idle_slots_first_least_loaded_first():
    p = Policy()
    a, b = worker("a", slots=2), worker("b", slots=2)
    p.add_worker(a)
    p.add_worker(b)
    jobs = [job() for _ in range(3)]
    for j in jobs:
        p.enqueue(j)
    got = placed(p)
    assert got == {"a": [jobs[0].id, jobs[1].id], "b": [jobs[2].id]}
    assert all(j.worker is not None for j in jobs) and p.waiting() == 0
    # b is now the less loaded: the next job goes there
    nxt = job()
    p.enqueue(nxt)
    assert placed(p) == {"b": [nxt.id]}


def test_a_burst_of_unknown_runtime_is_shared_out_one_spare_per_slot():
    p = Policy()
    for name in "ab":
        p.add_worker(worker(name))
    for _ in range(10):
        p.enqueue(job())
    got = placed(p)
    assert {k: len(v) for k, v in got.items()} == {"a": 2, "b": 2}
    assert {w.id: len(w.running) for w in p.workers.values()} == {"a": 2, "b": 2}
    assert p.waiting() == 6


def test_short_jobs_prefetch_deeply_but_never_past_an_even_share():
    p = Policy()
    for name in "ab":
        p.add_worker(worker(name))
    p.ran("f", 0.001)  # 1 ms: PREFETCH_SECONDS holds 20 of them
    for _ in range(100):
        p.enqueue(job())
    list(p.assign(lambda j, w: True))
    per = 1 + int(defaults.PREFETCH_SECONDS / 0.001)
    assert {w.id: len(w.running) for w in p.workers.values()} == {"a": per, "b": per}
    # and with few jobs, no worker swallows them all
    q = Policy()
    for name in "ab":
        q.add_worker(worker(name))
    q.ran("f", 0.001)
    for _ in range(6):
        q.enqueue(job())
    list(q.assign(lambda j, w: True))
    assert sorted(len(w.running) for w in q.workers.values()) == [3, 3]


def test_requirements_pick_the_workers_that_have_them():
    p = Policy()
    cpu, gpu = worker("cpu", gpus=0, tags=["x"]), worker("gpu", gpus=1, tags=["x", "cuda"])
    p.add_worker(cpu)
    p.add_worker(gpu)
    g = job(requires={"gpus": 1, "tags": ["cuda"]})
    p.enqueue(g)
    assert placed(p) == {"gpu": [g.id]}
    assert satisfies({"gpus": 2, "tags": ["a", "b"]}, {"gpus": 1, "tags": ["a"]})
    assert not satisfies({"gpus": 0}, {"gpus": 1})
    assert not satisfies({"arch": "arm"}, {"arch": "x86"})
    assert satisfies({}, None)


def test_draining_workers_and_refused_pairs_get_nothing():
    p = Policy()
    w = worker("a", slots=4)
    w.draining = True
    p.add_worker(w)
    j = job()
    p.enqueue(j)
    assert placed(p) == {}
    w.draining = False
    assert placed(p, compatible=lambda j, w: False) == {}
    assert list(p.queues[None]) == [j] and j.worker is None  # still first in line
    assert placed(p) == {"a": [j.id]}


def test_the_window_bounds_memory_and_says_when_to_read_back():
    p = Policy(window=10)
    jobs = [job(args=b"1234") for _ in range(12)]
    for j in jobs[:10]:
        p.enqueue(j)
    assert not p.window_full() and p.window_full(extra=1)
    assert p.mem_bytes == 40
    assert p.room() == 0  # not until half the window is free
    for j in jobs[:6]:
        assert p.forget(j)
    assert not p.forget(jobs[0])
    assert p.room() == 6 and p.mem_bytes == 16
    # jobs no connected worker can run do not hold the window
    q = Policy(window=4)
    q.add_worker(worker("cpu", gpus=0))
    for _ in range(4):
        q.enqueue(job(requires={"gpus": 1}))
    assert q.blocked() == 4 and q.room() == 4


def test_a_lost_worker_is_charged_only_for_what_it_ran():
    p = Policy()
    w = worker("a", slots=1)
    p.add_worker(w)
    jobs = [job() for _ in range(3)]
    for j in jobs:
        p.enqueue(j)
    list(p.assign(lambda j, w: True))
    w.started = {jobs[0].id}
    assert w.busy() == 1 and len(w.running) - w.busy() == 1
    charged, spared = p.lost(w)
    assert [j.id for j in charged] == [jobs[0].id] and [j.id for j in spared] == [jobs[1].id]
    assert not p.workers and all(j.worker is None for j in jobs)
    # a worker that never said what it runs: the oldest `slots` it was given
    v = worker("b", slots=1)
    v.started = None
    p.add_worker(v)
    for j in charged + spared:
        p.requeue(j)
    list(p.assign(lambda j, w: True))
    charged, spared = p.lost(v)
    assert len(charged) == 1 and len(spared) == 1


def test_unschedulable_requirements_are_found_with_the_time_they_were_first_seen():
    p = Policy()
    p.enqueue(job(requires={"gpus": 2}))
    assert list(p.unschedulable(0.0)) == []  # no worker at all: nothing is judged
    p.add_worker(worker("cpu", gpus=0, cpus=4))
    ((requires, q, since),) = list(p.unschedulable(5.0))
    assert requires == {"gpus": 2} and len(q) == 1 and since == 5.0
    assert [s for _, _, s in p.unschedulable(60.0)] == [5.0]  # still since 5
    assert "cpu: cpus=4 gpus=0" in p.describe_workers()
    p.add_worker(worker("gpu", gpus=2))  # all it has would do, even if it is busy
    assert list(p.unschedulable(61.0)) == []


def test_counted_resources_are_reserved_while_held():
    p = Policy()
    w = worker("g", slots=4, gpus=2, mem=8 * 2**30)
    p.add_worker(w)
    gpu_jobs = [job(requires={"gpus": 1}) for _ in range(3)]
    for j in gpu_jobs:
        p.enqueue(j)
    assert placed(p) == {"g": [gpu_jobs[0].id, gpu_jobs[1].id]}  # two GPUs: two jobs, even with prefetch
    assert w.reserved == {"gpus": 2} and p.waiting() == 1
    assert placed(p) == {}
    w.release(gpu_jobs[0].id)  # its result came: its GPU is free
    assert placed(p) == {"g": [gpu_jobs[2].id]}
    # memory likewise, beside jobs that need none
    big = [job(requires={"mem": 3 * 2**30}) for _ in range(3)]
    plain = [job() for _ in range(2)]
    for j in big + plain:
        p.enqueue(j)
    got = placed(p)["g"]
    assert [i for i in got if i in {j.id for j in big}] == [big[0].id, big[1].id]
    assert {j.id for j in plain} <= set(got) and w.reserved["mem"] == 6 * 2**30
    p.unplace(big[0])
    assert w.reserved["mem"] == 3 * 2**30
    charged, spared = p.lost(w)
    assert w.reserved == {} and not w.running


def test_among_a_thousand_full_workers_the_one_with_room_gets_the_job():
    """Workers without room are passed over before sorting (a deep queue and a thousand
    busy workers), in both passes: by slots, then by each queue's prefetch depth."""
    p = Policy()
    full = [worker(f"w{i}") for i in range(1000)]
    for w in full:
        p.add_worker(w)
        for _ in range(2):  # a running job and one spare: full for jobs of unknown runtime
            j = job()
            p.enqueue(j)
            j.worker = w
            w.hold(j)
    p.prune()
    p.queues[None].clear()
    waiting = [job() for _ in range(3)]
    for j in waiting:
        p.enqueue(j)
    assert placed(p) == {}
    spare = worker("spare", slots=2)
    spare.draining = True
    p.add_worker(spare)
    assert placed(p) == {}  # draining: no room
    spare.draining, spare.paused = False, {"until": None, "stopped": False}
    assert placed(p) == {}  # paused: no room either
    spare.paused = None
    got = placed(p)
    assert got == {"spare": [j.id for j in waiting]}  # 2 slots, then 1 of its 2 spares
    p.ran("f", 0.0001)  # short jobs: every worker may now prefetch deeply
    more = [job() for _ in range(2000)]
    for j in more:
        p.enqueue(j)
    got = placed(p)
    assert sum(map(len, got.values())) == 2000 and max(map(len, got.values())) == 2  # even shares
    assert len(got) == 1000 and "spare" in got
