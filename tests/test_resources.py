"""Capabilities found without being told, and counted resources: a worker with 2 (fake)
GPUs never runs 3 one-GPU jobs at once and each job sees its own device; memory is
reserved likewise; a job no worker could run is warned about at once and fails after its
client's deadline. The fake GPUs come through the same path as real ones (nvidia-smi)."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
from conftest import start_workers, wait_for

import cw
from cw.launchers import environment
from cw.resources import requirements
from cw.worker.caps import capabilities, detect_gpus

NVIDIA_SMI = """#!/bin/sh
# a fake nvidia-smi: two GPUs
echo "0, GPU-aaaa-0000, Fake GPU X1"
echo "1, GPU-bbbb-1111, Fake GPU X1"
"""


@pytest.fixture
def fake_gpus(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(NVIDIA_SMI)
    smi.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def hold_devices(log, seconds=1.0):
    """Notes when it ran and which GPUs it saw."""
    t0 = time.time()
    time.sleep(seconds)
    with open(log, "a") as f:
        f.write(json.dumps([t0, time.time(), os.environ.get("CUDA_VISIBLE_DEVICES")]) + "\n")
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def most_at_once(rows):
    events = sorted([(a, 1) for a, _, _ in rows] + [(b, -1) for _, b, _ in rows])
    n = top = 0
    for _, d in events:
        n += d
        top = max(top, n)
    return top


def overlapping(rows):
    return [(x, y) for i, x in enumerate(rows) for y in rows[i + 1 :] if x[0] < y[1] and y[0] < x[1]]


@pytest.mark.timeout(120)
def test_two_gpus_never_run_three_one_gpu_jobs_and_each_sees_its_own(master, procs, tmp_path, fake_gpus):
    procs.start("gpu-worker", "-m", "cw.worker", "--heartbeat", "0.2", "--procs", "3", env=fake_gpus)
    log = tmp_path / "gpu.log"
    with cw.Client() as c:
        w = wait_for(lambda: c.status()["workers"], what="the worker")[0]
        assert w["caps"]["gpus"] == 2 and w["caps"]["gpu_model"] == "Fake GPU X1"
        futures = [c.submit(hold_devices, str(log), requires={"gpus": 1}) for _ in range(6)]
        plain = c.submit(hold_devices, str(tmp_path / "plain.log"), 0.1)  # the third slot is free for it
        assert plain.result(30) == os.environ.get("CUDA_VISIBLE_DEVICES")  # what the worker has, untouched
        seen = c.gather(futures, timeout=60)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 6 and set(seen) == {"0", "1"}
    assert all(r[2] in ("0", "1") for r in rows)  # one device each
    assert most_at_once(rows) == 2  # never three at once, and both GPUs used
    assert all(x[2] != y[2] for x, y in overlapping(rows))  # jobs at once never share a device


@pytest.mark.timeout(120)
def test_devices_from_cuda_visible_devices_and_memory_reserved(master, procs, tmp_path):
    procs.start("w", "-m", "cw.worker", "--heartbeat", "0.2", "--procs", "3", "--cap", "mem=3G",
                env={"CUDA_VISIBLE_DEVICES": "3,5"})  # fmt: skip
    with cw.Client() as c:
        w = wait_for(lambda: c.status()["workers"], what="the worker")[0]
        assert w["caps"]["gpus"] == 2 and w["caps"]["mem"] == 3 * 2**30 and "gpu_model" not in w["caps"]
        assert set(c.gather([c.submit(hold_devices, str(tmp_path / "g.log"), 0.3, requires={"gpus": 1})
                             for _ in range(4)], timeout=60)) <= {"3", "5"}  # fmt: skip
        log = tmp_path / "mem.log"
        c.gather([c.submit(hold_devices, str(log), 0.5, requires={"mem": "2G"}) for _ in range(3)], timeout=60)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == 3 and most_at_once(rows) == 1  # 3G holds one 2G job at a time


@pytest.mark.timeout(90)
def test_a_job_no_worker_could_run_is_warned_at_once_then_fails(master, procs, fake_gpus, caplog):
    procs.start("gpu-worker", "-m", "cw.worker", "--heartbeat", "0.2", "--tag", "lab", env=fake_gpus)
    start_workers(procs, 1)
    with caplog.at_level(logging.WARNING, logger="cw"), cw.Client(unsatisfiable_timeout=3) as c:
        wait_for(lambda: len(c.status()["workers"]) == 2, what="two workers")
        t0 = time.monotonic()
        f = c.submit(hold_devices, "/dev/null", requires={"gpus": 4, "tags": ["lab"]})
        ok = c.submit(hold_devices, "/dev/null", 0.1, requires={"gpus": 2, "tags": ["lab"]})
        wait_for(lambda: any("none of the 2 connected workers offers" in r.getMessage() for r in caplog.records),
                 timeout=5, what="the warning")  # fmt: skip
        assert time.monotonic() - t0 < 3 and not f.done()  # warned at once, not failed yet
        with pytest.raises(cw.errors.UnsatisfiableError) as e:
            f.result(30)
        assert time.monotonic() - t0 >= 3
        text = str(e.value)
        assert "{'gpus': 4, 'tags': ['lab']}" in text and "gpus=2 (Fake GPU X1)" in text and "tags=lab" in text
        assert ok.result(30) == "0,1"  # two GPUs: it sees both


def test_requirements_are_checked_and_put_in_one_form():
    assert requirements({"mem": "8G", "gpus": 1, "tags": "a"}) == {"gpus": 1, "mem": 8 * 2**30, "tags": ["a"]}
    assert requirements({"gpus": 0}) is None and requirements(None) is None
    assert requirements({"partition": "gpu", "tag": ["b", "a"]}) == {"partition": "gpu", "tags": ["a", "b"]}
    for bad, why in (({"mem": "lots"}, "amount of memory"), ({"gpus": 1.5}, "whole number"),
                     ({"tags": [1]}, "list of names"), ("gpus", "must be a dict")):  # fmt: skip
        with pytest.raises((ValueError, TypeError), match=why):
            requirements(bad)
    with cw.Client(serial=True) as c, pytest.raises(ValueError, match="amount of memory"):
        c.submit(hold_devices, "/dev/null", requires={"mem": "lots"})


def test_capabilities_come_from_the_job_environment_and_the_host(fake_gpus):
    slurm = environment({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "8", "SLURM_MEM_PER_NODE": "4096",
                         "SLURM_JOB_PARTITION": "gpu"})  # fmt: skip
    caps, devices = capabilities(2, ["x"], slurm, {**fake_gpus, "CUDA_VISIBLE_DEVICES": "1"})
    assert caps["cpus"] == 8 and caps["mem"] == 4096 * 2**20 and caps["partition"] == "gpu"
    assert caps["gpus"] == 1 and caps["gpu_model"] == "Fake GPU X1" and devices == ["1"] and caps["tags"] == ["x"]
    sge = environment({"JOB_ID": "9", "SGE_TASK_ID": "undefined", "NSLOTS": "4", "QUEUE": "all.q"})
    caps, devices = capabilities(1, [], sge, {"PATH": "/nonexistent"}, told={"gpus": 2, "mem": "1G"})
    assert caps["queue"] == "all.q" and caps["cpus"] == 4 and caps["gpus"] == 2 and devices == ["0", "1"]
    assert caps["mem"] == 2**30
    assert detect_gpus({**fake_gpus, "CUDA_VISIBLE_DEVICES": "GPU-bbbb-1111"}) == (["GPU-bbbb-1111"], "Fake GPU X1")
    assert detect_gpus({**fake_gpus, "CUDA_VISIBLE_DEVICES": ""}) == ([], None)
    assert detect_gpus(fake_gpus) == (["0", "1"], "Fake GPU X1")


@pytest.mark.timeout(60)
def test_a_hung_gpu_probe_is_killed_with_what_it_started(tmp_path, monkeypatch):
    """An nvidia-smi that hangs (a wedged driver) costs the worker the probe's timeout, and
    neither it nor the helpers it started are left on the node."""
    import cw.worker.caps as caps_module

    monkeypatch.setattr(caps_module, "PROBE_TIMEOUT", 1.0)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pids = tmp_path / "pids"
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nsleep 300 &\necho $! >> {pids}\necho $$ >> {pids}\nsleep 300\n")
    smi.chmod(0o755)
    assert detect_gpus({"PATH": f"{bin_dir}:{os.environ['PATH']}"}) == ([], None)
    left = [int(p) for p in pids.read_text().split()]
    assert len(left) == 2

    def gone(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rpartition(")")[2].split()[0] == "Z"  # a zombie its reaper will take
        except FileNotFoundError:
            return True

    wait_for(lambda: all(gone(p) for p in left), timeout=10, what="the probe and its helper to be gone")
