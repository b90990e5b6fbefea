"""Data sent once: scattered objects and fanned-out inputs cross the wire at most once per worker."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import wait_for

import cw

MB = 1 << 20


def make(n):
    return os.urandom(n)


def look(data, i):
    """Which process ran it, and which object it was given (one unpickling per process)."""
    return os.getpid(), id(data), len(data), i


def size_of(data):
    return len(data)


@pytest.mark.timeout(300)
def test_a_scattered_100_mb_object_crosses_the_wire_once_per_worker(master, workers):
    payload = os.urandom(100 * MB)
    with cw.Client() as c:
        wait_for(lambda: len(c.status()["workers"]) == 2, timeout=30, what="two workers")
        ref = c.scatter(payload)
        assert ref.size > 100 * MB and c.scatter(payload) == ref  # the same bytes, the same handle
        out = c.gather(c.map(look, [ref] * 1000, range(1000)), timeout=240)
        sent = c.status()["sent"]
    assert [o[3] for o in out] == list(range(1000)) and {o[2] for o in out} == {100 * MB}
    # the master sent the object to each worker at most once: workers x 100 MB
    assert ref.size <= sent["refs"] <= 2 * ref.size, sent
    assert sent["arguments"] < 1000 * 200, sent  # each job's own arguments are a few bytes
    # unpickled at most once per executor process while it lives
    per_process: dict = {}
    for pid, obj, _, _ in out:
        per_process.setdefault(pid, set()).add(obj)
    assert all(len(objs) == 1 for objs in per_process.values()), per_process


def test_broadcast_pushes_to_every_worker_at_once(master, workers):
    with cw.Client() as c:
        wait_for(lambda: len(c.status()["workers"]) == 2, timeout=30, what="two workers")
        ref = c.scatter(b"y" * MB, broadcast=True)
        wait_for(lambda: c.status()["sent"]["refs"] >= 2 * ref.size, timeout=30, what="the broadcast")
        assert c.gather(c.map(size_of, [ref] * 50), timeout=60) == [MB] * 50
        assert c.status()["sent"]["refs"] == 2 * ref.size  # nothing more once every worker has it
    out = subprocess.run([sys.executable, "-m", "cw", "status"], capture_output=True, text=True, timeout=60)
    assert "sent to workers:" in out.stdout and "2.0 MB of refs" in out.stdout, out.stdout + out.stderr


def test_a_fanned_out_input_reaches_each_worker_once(master, workers):
    with cw.Client() as c:
        wait_for(lambda: len(c.status()["workers"]) == 2, timeout=30, what="two workers")
        big = c.submit(make, MB)
        outs = c.gather([c.submit(size_of, big) for _ in range(300)], timeout=120)
        sent = c.status()["sent"]
    assert outs == [MB] * 300
    assert sent["inputs"] <= 2 * (MB + 100), sent


def test_unknown_scattered_data_fails_the_job_clearly(master, workers):
    with cw.Client() as c:
        ghost = cw.Ref("0" * 32, 10)
        with pytest.raises(cw.JobError, match="not in the store"):
            c.submit(size_of, ghost).result(30)
