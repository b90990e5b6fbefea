"""The adaptive decision (cw.launchers.adapt), without a cluster; and the option names
dask-jobqueue users know, mapped onto each backend's options."""

from __future__ import annotations

import pytest

from cw import defaults
from cw.errors import ConfigError
from cw.launchers.adapt import (
    BUSY,
    IDLE,
    PENDING,
    STARTING,
    Adaptive,
    Demand,
    Member,
    Profile,
    members_of,
    parse_profile,
    parse_range,
)
from cw.launchers.base import ENDED, RUNNING, BadOption, Task, parse_bytes
from cw.launchers.base import PENDING as QUEUED
from cw.launchers.sge import SGE
from cw.launchers.slurm import Slurm
from cw.launchers.surface import seconds_of, short_duration


def busy(name, load=1, profile=""):
    return Member(name, profile, BUSY, 0.0, load)


def idle(name, secs, profile=""):
    return Member(name, profile, IDLE, secs, 0)


def pending(name, profile=""):
    return Member(name, profile, PENDING)


# ------------------------------------------------------------------ growing
def test_a_burst_grows_the_pool_from_zero_by_its_work_not_by_its_length():
    a = Adaptive(maximum=200, target=60)
    # 1000 jobs of a function measured at 0.1 s: 100 s of work, two workers' minute
    d = a.decide(0, [Demand({}, 1000, 0.1)], [])
    assert d.submit == {"": 2} and d.wanted == {"": 2} and not d.retire
    # not measured yet: counted at ADAPT_UNKNOWN_RUNTIME each
    d = Adaptive(maximum=200, target=60).decide(0, [Demand({}, 24, None)], [])
    assert d.submit == {"": -(-24 * defaults.ADAPT_UNKNOWN_RUNTIME // 60)}
    # never more workers than the jobs can fill, and one at least while any waits
    assert Adaptive(maximum=200, target=1).decide(0, [Demand({}, 3, 100.0)], []).submit == {"": 3}
    assert Adaptive(maximum=200, target=600).decide(0, [Demand({}, 1, 0.001)], []).submit == {"": 1}
    # slots count: 4-slot workers need a quarter as many
    a = Adaptive(maximum=200, target=10, profiles=[Profile("", {"cpus": 4}, slots=4)])
    assert a.decide(0, [Demand({}, 40, 4.0)], []).submit == {"": 4}


def test_growth_is_limited_per_decision_and_by_the_maximum():
    a = Adaptive(maximum=50, target=60, step=8)
    work = [Demand({}, 10_000, 60.0)]  # wants far more than the maximum
    d = a.decide(0, work, [])
    assert d.wanted == {"": 50} and d.submit == {"": 8}  # at most `step` from nothing
    members = [pending(f"t{i}") for i in range(8)]
    assert a.decide(10, work, members).submit == {"": 8}  # ... then at most doubling
    members += [busy(f"b{i}", 2) for i in range(32)]
    assert a.decide(20, work, members).submit == {"": 10}  # never past the maximum
    assert a.decide(30, work, members + [pending(f"p{i}") for i in range(10)]).submit == {}


def test_a_maximum_of_zero_holds_the_pool_empty():
    """adapt(maximum=0), as dask's: no worker is asked for whatever waits, and those
    there are retired (drained), busy ones too."""
    a = Adaptive(minimum=0, maximum=0, target=60)
    work = [Demand({}, 1000, 1.0)]
    d = a.decide(0, work, [])
    assert d.submit == {} and d.wanted == {"": 0}
    d = a.decide(1, work, [busy("a"), idle("b", 1.0), pending("c")])
    assert d.submit == {} and sorted(m.name for m in d.retire) == ["a", "b", "c"]


def test_what_is_pending_or_starting_counts_as_supply():
    a = Adaptive(maximum=10, target=10)
    work = [Demand({}, 39, 1.0)]  # and the busy one's job: 40 s of work, 4 workers
    assert a.decide(0, work, [pending("a"), Member("b", "", STARTING), busy("c")]).submit == {"": 1}


def test_busy_workers_and_their_jobs_count_in_what_is_wanted():
    a = Adaptive(maximum=10, target=10)
    # 3 busy workers hold 30 jobs of 1 s and 10 more wait: 40 s of work, 4 workers
    members = [busy("a", 10), busy("b", 10), busy("c", 10)]
    d = a.decide(0, [Demand({}, 10, 1.0)], members)
    assert d.wanted == {"": 4} and d.submit == {"": 1}


# ---------------------------------------------------------------- shrinking
def test_back_to_zero_after_the_idle_timeout_and_not_before():
    a = Adaptive(maximum=10, idle_timeout=30)
    members = [idle("a", 10.0), idle("b", 29.0)]
    assert not a.decide(0, [], members)  # idle, not long enough
    members = [idle("a", 40.0), idle("b", 31.0)]
    d = a.decide(10, [], members)
    assert [m.name for m in d.retire] == ["a", "b"] and d.submit == {}  # longest idle first
    assert d.reasons and "retiring 2" in d.reasons[0]


def test_busy_workers_are_never_retired_for_being_idle():
    a = Adaptive(maximum=10, idle_timeout=1)
    d = a.decide(0, [], [busy("a"), idle("b", 5.0), idle("c", 0.5)])
    assert [m.name for m in d.retire] == ["b"]


def test_the_minimum_stays():
    a = Adaptive(minimum=2, maximum=10, idle_timeout=1)
    d = a.decide(0, [], [idle("a", 9.0), idle("b", 8.0), idle("c", 7.0)])
    assert [m.name for m in d.retire] == ["a"] and d.wanted == {"": 2}
    assert Adaptive(minimum=2, maximum=10).decide(0, [], []).submit == {"": 2}  # and is reached


def test_pending_tasks_leave_once_the_surplus_lasts_the_idle_timeout():
    a = Adaptive(maximum=10, idle_timeout=30)
    members = [busy("a"), pending("b"), pending("c")]
    assert not a.decide(0, [], members)  # the queue emptied: surplus since 0
    assert not a.decide(20, [], members)
    d = a.decide(31, [], members)
    assert [m.name for m in d.retire] == ["c", "b"]  # newest first; the busy one stays
    # a surplus that ended starts over
    a.decide(40, [Demand({}, 100, 10.0)], members)
    assert not a.decide(50, [], members)


def test_a_lowered_maximum_retires_at_once_even_busy_workers_least_loaded_first():
    a = Adaptive(maximum=1, idle_timeout=3600)
    members = [busy("a", 5), busy("b", 1), busy("c", 3), pending("d")]
    d = a.decide(0, [Demand({}, 50, 1.0)], members)
    assert [m.name for m in d.retire] == ["d", "b", "c"] and d.submit == {}


# ----------------------------------------------------------------- profiles
def test_jobs_that_require_resources_drive_requests_for_their_profile():
    gpu = Profile("gpu", {"cpus": 8, "gpus": 1, "mem": 64 * 2**30}, {"extra": "--gres=gpu:1"}, slots=8)
    foam = Profile("foam", {"cpus": 1, "tags": ["openfoam"]}, maximum=2)
    a = Adaptive(maximum=20, target=10, profiles=[Profile("", {"cpus": 1, "mem": 2**30}), gpu, foam])
    d = a.decide(0, [Demand({}, 5, 1.0), Demand({"gpus": 1}, 80, 1.0), Demand({"tags": ["openfoam"]}, 50, 10.0),
                     Demand({"mem": 32 * 2**30}, 8, 10.0), Demand({"gpus": 4}, 3, None)], [])  # fmt: skip
    assert a.profile_for({"cpus": 4, "gpus": 1}) is gpu and a.profile_for({"tags": ["openfoam"]}) is foam
    assert d.wanted == {"": 1, "gpu": 2, "foam": 2}  # foam: held to its maximum
    assert d.submit == {"": 1, "gpu": 2, "foam": 2}
    assert d.unmatched == [{"gpus": 4}]  # no profile offers 4 GPUs: reported, never guessed
    # the big-memory jobs went to the GPU profile, the only one with 32G: 8 x 10 s more work
    assert a.decide(0, [Demand({"mem": 32 * 2**30}, 8, 10.0)], []).wanted["gpu"] == 1
    # an idle GPU worker retires when only plain jobs wait
    d = a.decide(100, [Demand({}, 5, 1.0)], [busy("p"), idle("g", 1e6, "gpu")])
    assert [m.name for m in d.retire] == ["g"] and not d.submit
    assert Profile("gpu", {"cpus": 8, "gpus": 1, "tags": ["a", "b"], "mem": 5}).worker_args() == [
        "--cap", "gpus=1", "--cap", "mem=5", "--tag", "a", "--tag", "b"]  # fmt: skip


def test_the_pool_maximum_is_shared_among_profiles():
    a = Adaptive(minimum=1, maximum=4, target=1, profiles=[Profile(""), Profile("x", {"tags": ["x"]})])
    d = a.decide(0, [Demand({}, 100, 1.0), Demand({"tags": ["x"]}, 100, 1.0)], [])
    assert sum(d.wanted.values()) == 4 and d.wanted[""] >= 1 and sum(d.submit.values()) == 4


# ----------------------------------------------------------------- failures
def test_tasks_that_die_pause_growth_with_a_doubling_backoff():
    a = Adaptive(maximum=10, target=10)
    work = [Demand({}, 100, 1.0)]
    assert a.decide(0, work, [], failed=2).submit == {}
    assert a.decide(defaults.HEAL_BACKOFF + 1, work, []).submit == {"": 8}
    a.decide(20, work, [], failed=1)
    assert a.decide(20 + defaults.HEAL_BACKOFF + 1, work, []).submit == {}  # doubled
    assert a.decide(20 + 2 * defaults.HEAL_BACKOFF + 1, work, []).submit == {"": 8}


def test_settings_are_checked():
    for bad in ({"minimum": 5, "maximum": 2}, {"maximum": -1}, {"idle_timeout": -1}, {"target": 0}):
        with pytest.raises(ConfigError):
            Adaptive(**bad)
    with pytest.raises(ConfigError, match="must differ"):
        Adaptive(profiles=[Profile("a"), Profile("a")])
    assert Adaptive(profiles=[Profile("gpu")]).profiles[0].name == ""  # the default comes first


# -------------------------------------------------------- what the pool sees
def test_members_from_the_scheduler_and_the_master():
    arrays = [{"job": "7", "tasks": 4, "retired": [3]}, {"job": "9", "tasks": 1, "profile": "gpu"}]
    tasks = [Task("7", 0, RUNNING), Task("7", 1, RUNNING), Task("7", 2, QUEUED), Task("7", 3, RUNNING),
             Task("9", 0, RUNNING), Task("7", 4, ENDED), Task("8", 0, RUNNING),
             Task("9", 1, RUNNING, "COMPLETING", leaving=True)]  # fmt: skip
    workers = [{"task": "7_0", "running": 1, "prefetched": 2, "idle": 0.0},
               {"task": "7_3", "running": 0, "prefetched": 0, "idle": 50.0},
               {"task": "9_0", "running": 0, "prefetched": 0, "idle": 12.5},
               {"task": "", "running": 0}]  # fmt: skip
    ms = members_of(arrays, tasks, workers, lambda j, i: f"{j}_{i}")
    assert ms == [Member("7_0", "", BUSY, 0.0, 3), Member("7_1", "", STARTING), Member("7_2", "", PENDING),
                  Member("9_0", "gpu", IDLE, 12.5, 0)]  # fmt: skip
    # a draining worker is on its way out
    workers[0]["draining"] = True
    assert [m.name for m in members_of(arrays, tasks, workers, lambda j, i: f"{j}_{i}")] == ["7_1", "7_2", "9_0"]


# ------------------------------------------------------------ typed by people
def test_ranges_profiles_durations_and_sizes():
    assert parse_range("0:200") == (0, 200) and parse_range("5-10") == (5, 10) and parse_range("20") == (0, 20)
    assert parse_range("0:0") == (0, 0)  # held empty
    for bad in ("a:b", "5:2", "-1:3"):
        with pytest.raises(ConfigError):
            parse_range(bad)
    assert parse_profile("gpu:gpus=1,tag=cuda,tag=a100,mem=64G:--gres=gpu:1 --partition=gpu") == (
        "gpu", {"gpus": 1, "tags": ["cuda", "a100"], "mem": 64 * 2**30}, "--gres=gpu:1 --partition=gpu")
    assert parse_profile("foam:tag=openfoam") == ("foam", {"tags": ["openfoam"]}, "")
    for bad in ("nocolon", ":gpus=1", "x:gpus", "x:mem=lots"):
        with pytest.raises(ConfigError):
            parse_profile(bad)
    assert [seconds_of(v) for v in (90, "90", "90s", "5m", "2h", "1d", "1:30", "0:05:00")] == [
        90, 90, 90, 300, 7200, 86400, 90, 300]  # fmt: skip
    with pytest.raises(ConfigError):
        seconds_of("soon")
    assert [short_duration(s) for s in (300, 90, 7200, 1.5)] == ["5m", "90s", "2h", "1.5s"]
    assert parse_bytes("8G") == parse_bytes("8GB") == parse_bytes("8 GiB") == 8 * 2**30
    assert parse_bytes("100", "M") == 100 * 2**20 and parse_bytes("100b", "M") == 100


def test_dask_jobqueue_names_map_onto_each_backends_options():
    o = Slurm.jobqueue_options({"cores": 4, "memory": "8GB", "walltime": "1:00:00", "queue": "debug",
                                "account": "physics", "job_extra_directives": ["--gres=gpu:1", "--qos=long"]})
    assert o == {"cpus_per_task": 4, "mem": "8192M", "time": "1:00:00", "partition": "debug", "account": "physics",
                 "extra": "--gres=gpu:1 --qos=long"}  # fmt: skip
    assert Slurm().provides(Slurm.up_options(o)) == {"cpus": 4, "mem": 8 * 2**30}
    assert Slurm.jobqueue_options({"partition": "debug", "queue": "debug"}) == {"partition": "debug"}
    with pytest.raises(BadOption, match="contradicts"):
        Slurm.jobqueue_options({"partition": "a", "queue": "b"})
    with pytest.raises(BadOption, match="has no option 'pe'"):
        Slurm.jobqueue_options({"pe": "smp"})
    with pytest.raises(BadOption, match="memory"):
        Slurm.jobqueue_options({"memory": "lots"})
    # Grid Engine: cores are slots of a parallel environment, memory the task's total (h_vmem is per slot)
    o = SGE.jobqueue_options({"cores": 4, "memory": "8G", "walltime": "1:00:00", "queue": "all.q",
                              "project": "p1", "job_extra_directives": ["-l gpu=1"]})  # fmt: skip
    assert o == {"pe": ["smp", 4], "mem": "2048M", "time": "1:00:00", "queue": "all.q", "extra": "-l gpu=1 -P p1"}
    assert SGE().provides(SGE.up_options(o)) == {"cpus": 4, "mem": 8 * 2**30}
    assert SGE.jobqueue_options({"cores": 2, "pe": "mpi"})["pe"] == ["mpi", 2]
    assert SGE.jobqueue_options({"cores": 1}) == {}  # one slot: no parallel environment
    assert SGE.jobqueue_options({"pe": ("smp", 3)}) == {"pe": ["smp", 3]}  # the command line's form
