"""Nested jobs: cw.get_client() inside a job, and slots lent while a parent waits on its children."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time

import pytest
from conftest import start_workers, wait_for

import cw
from cw.discovery import ClusterDir


def tree(depth):
    """A node of a binary tree of jobs: submits two children and waits on them."""
    if depth == 0:
        return 1
    c = cw.get_client()
    kids = [c.submit(tree, depth - 1) for _ in range(2)]
    return 1 + sum(k.result() for k in kids)


def where_am_i():
    """What a nested job sees: its run, a variable of the outer client's context, its cwd."""
    c = cw.get_client()
    inner = c.submit(os.environ.get, "NESTED_MARK")
    return c.run, inner.result(), os.getcwd()


def kid(where, i):
    open(os.path.join(where, f"kid-{i}-{time.monotonic_ns()}"), "w").close()
    time.sleep(1.0)
    return i * 10


def parent(where):
    """Submits two children on other workers, says where it runs, waits on them."""
    c = cw.get_client()
    kids = [c.submit(kid, where, i, requires={"tags": ["kids"]}) for i in range(2)]
    open(os.path.join(where, f"parent-{time.monotonic_ns()}"), "w").write(json.dumps({"agent": os.getppid()}))
    return sum(c.gather(kids))


@pytest.mark.timeout(300)
def test_a_tree_of_depth_8_on_two_slots_does_not_deadlock(master, workers):
    with cw.Client() as c:
        wait_for(lambda: len(c.status()["workers"]) == 2, timeout=30, what="two workers")
        assert c.submit(tree, 8).result(240) == 2**9 - 1
    db = sqlite3.connect(ClusterDir().store_path)
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2**9 - 1
    # every job but the root records the job that submitted it
    assert db.execute("SELECT count(*) FROM jobs WHERE parent IS NOT NULL").fetchone()[0] == 2**9 - 2


def test_a_nested_client_has_the_run_and_context_of_the_submitting_client(master, workers, tmp_path):
    os.chdir(tmp_path)
    with cw.Client(run="outer", env={"NESTED_MARK": "here"}) as c:
        run, mark, cwd = c.submit(where_am_i).result(60)
    assert (run, mark, cwd) == ("outer", "here", str(tmp_path))


@pytest.mark.timeout(180)
def test_a_parent_killed_mid_wait_is_retried_and_its_children_finish_once(cw_home, procs, tmp_path):
    from test_resume import start_master

    where = tmp_path / "runs"
    where.mkdir()
    start_master(procs, "m")
    start_workers(procs, 1, "--tag", "kids", "--procs", "2")
    first = start_workers(procs, 1, "--tag", "parents")[0]
    with cw.Client(run="nested") as c:
        fut = c.submit(parent, str(where), requires={"tags": ["parents"]})
        wait_for(lambda: any(n.startswith("parent-") for n in os.listdir(where)), timeout=60, what="the parent waits")
        info = json.loads(next((where / n).read_text() for n in os.listdir(where) if n.startswith("parent-")))
        assert info["agent"] == first.pid
        os.kill(first.pid, signal.SIGKILL)  # the parent's worker dies while the parent waits
        first.wait()
        # its children finish anyway, and are stored
        wait_for(lambda: sum(n.startswith("kid-") for n in os.listdir(where)) == 2, timeout=30, what="children")
        start_workers(procs, 1, "--tag", "parents")  # somewhere for the parent to run again
        assert fut.result(120) == 10
    names = os.listdir(where)
    assert sum(n.startswith("parent-") for n in names) == 2  # retried once
    assert sorted(n.split("-")[1] for n in names if n.startswith("kid-")) == ["0", "1"]  # each child ran once
    db = sqlite3.connect(ClusterDir().store_path)
    attempts = db.execute("SELECT attempts FROM jobs WHERE parent IS NULL").fetchall()
    assert attempts == [(1,)]  # charged as any job whose worker is lost


def fan(n):
    """Waits on its children with gather, cw.wait and as_completed, one after the other."""
    c = cw.get_client()
    a = c.gather([c.submit(pow, 2, i) for i in range(n)])
    futs = [c.submit(pow, 3, i) for i in range(n)]
    done, _ = cw.wait(futs)
    b = sorted(f.result() for f in cw.as_completed([c.submit(pow, 5, i) for i in range(n)]))
    return sum(a), sum(f.result() for f in done), sum(b)


def waits_long(seconds):
    c = cw.get_client()
    return c.submit(time.sleep, seconds).result()


def test_gather_wait_and_as_completed_inside_a_job_on_one_slot(master, procs):
    start_workers(procs, 1)
    with cw.Client() as c:
        assert c.submit(fan, 6).result(120) == (63, 364, 3906)


def test_a_parent_cancelled_while_it_waits_frees_its_process_and_the_worker_goes_on(master, procs):
    start_workers(procs, 1, "--procs", "2")  # one slot for the child, the other free
    with cw.Client() as c:
        parent = c.submit(waits_long, 5)
        wait_for(lambda: any(w.get("blocked") for w in c.status()["workers"]), timeout=60,
                 what="the parent to wait on its child")  # fmt: skip
        assert parent.cancel()
        assert c.gather(c.map(pow, [2] * 5, range(5)), timeout=60) == [1, 2, 4, 8, 16]
        wait_for(lambda: not any(w.get("blocked") for w in c.status()["workers"]), timeout=30,
                 what="no job reported blocked")  # fmt: skip
