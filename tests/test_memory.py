"""Memory returns to its baseline after a large job: the master's and the executor's.
(How much memory, how fast: benchmarks/memory.py. This test only says it comes back.)"""

from __future__ import annotations

import os

import pytest
from conftest import start_workers, wait_for

import cw
from cw import system


def size(blob):
    return len(blob)


@pytest.mark.timeout(180)
def test_master_and_executor_give_a_large_argument_back(master, procs):
    (agent,) = start_workers(procs, 1)
    master_pid = procs.procs[0][1].pid
    with cw.Client() as c:
        assert c.submit(size, b"warm up").result(30) == 7
        executor = wait_for(lambda: system.children(agent.pid), what="the executor")[0]
        before = {"master": system.rss(master_pid), "executor": system.rss(executor)}
        big = 200 * 2**20
        assert c.submit(size, os.urandom(big)).result(120) == big
        assert system.children(agent.pid) == [executor]  # the same process, not a new one

        def back():
            now = {"master": system.rss(master_pid), "executor": system.rss(executor)}
            return all(now[k] < before[k] + 48 * 2**20 for k in now) and now

        wait_for(back, timeout=20, interval=0.5, what=f"memory back to {before}")
