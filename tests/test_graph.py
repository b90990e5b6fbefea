"""Futures as arguments: graphs of jobs held at the master, inputs fetched by the workers."""

from __future__ import annotations

import concurrent.futures as cf
import os
import sqlite3
import time

import pytest
from conftest import wait_for

import cw
from cw import protocol as P
from cw.discovery import ClusterDir


def inc(x):
    return x + 1


def add(a, b):
    return a + b


def total(items, extra=None):
    """Sums what it is given: numbers, nested lists, tuples and dict values."""
    if isinstance(items, dict):
        return sum(total(v) for v in items.values()) + total(extra or 0)
    if isinstance(items, (list, tuple)):
        return sum(total(v) for v in items) + total(extra or 0)
    return items + (extra or 0)


def boom(x):
    raise ZeroDivisionError(f"boom {x}")


def nap(seconds, x=None):
    time.sleep(seconds)
    return x


def marked(where, x):
    """Leaves a file per run: counts how many times each node ran."""
    open(os.path.join(where, f"{x}-{os.getpid()}-{time.monotonic_ns()}"), "w").close()
    return x


def test_diamond_of_three_levels(master, workers):
    with cw.Client() as c:
        a = c.submit(inc, 1)  # 2
        b, d = c.submit(inc, a), c.submit(add, a, 10)  # 3, 12
        top = c.submit(add, b, d)  # 15
        again = c.submit(total, [a, (b, {"k": d})], extra=top)  # 2 + 3 + 12 + 15
        assert top.result(60) == 15
        assert again.result(60) == 32
        assert a.result(10) == 2 and b.result(10) == 3 and d.result(10) == 12  # kept values come on demand
        st = c.status()
        assert st["held"] == 0 and st["sent"]["inputs"] > 0


def test_inputs_do_not_pass_through_the_client(master, workers):
    """A value that is an input of other jobs stays at the master until asked for."""
    with cw.Client() as c:
        slow = c.submit(nap, 0.5, b"x" * 100_000)
        after = c.submit(len, slow)
        assert after.result(60) == 100_000
        assert slow.done() and slow._result is cw.client.futures.KEPT
        assert slow.result(10) == b"x" * 100_000


def test_a_failed_input_fails_its_dependents_with_dependency_error(master, workers):
    with cw.Client() as c:
        bad = c.submit(boom, 7)
        child = c.submit(inc, bad)
        grandchild = c.submit(add, child, 1)
        fine = c.submit(inc, 1)
        mixed = c.submit(add, fine, grandchild)
        for f in (child, grandchild, mixed):
            with pytest.raises(cw.DependencyError) as info:
                f.result(60)
            e = info.value
            assert e.jobid == bad.jobid == e.job  # the first job that failed, by its number in the store
            assert isinstance(e.error, ZeroDivisionError) and "boom 7" in str(e.error)
            assert f"job {bad.jobid} ended" in str(e)
        with pytest.raises(ZeroDivisionError):
            bad.result()
        assert fine.result(10) == 2
    db = sqlite3.connect(ClusterDir().store_path)
    statuses = dict(db.execute("SELECT j.id, r.status FROM jobs j JOIN results r ON r.job = j.id"))
    assert statuses[child.jobid] == statuses[grandchild.jobid] == statuses[mixed.jobid] == P.DEPENDENCY


def test_cancelling_a_future_cancels_its_dependents(master, workers):
    with cw.Client() as c:
        slow = c.submit(nap, 30, 1)
        wait_for(lambda: slow.running(), timeout=30, what="the slow job to start")
        child = c.submit(inc, slow)
        grandchild = c.submit(inc, child)
        other = c.submit(inc, 1)
        assert slow.cancel()
        for f in (child, grandchild):
            with pytest.raises(cf.CancelledError):
                f.result(30)
        assert other.result(30) == 2
        late = c.submit(inc, grandchild)  # a job on a cancelled future is refused at once
        with pytest.raises(cf.CancelledError):
            late.result(30)


def test_map_over_futures_and_fan_out_of_one_input(master, workers, tmp_path):
    with cw.Client() as c:
        base = c.submit(inc, 0)
        firsts = c.map(inc, range(20))
        seconds = c.map(add, firsts, [base] * 20)  # one input, twenty dependents
        assert c.gather(seconds, timeout=60) == [i + 2 for i in range(20)]
        assert c.gather(firsts, timeout=60) == [i + 1 for i in range(20)]


def test_a_future_of_another_client_is_refused(master, workers):
    with cw.Client() as a, cw.Client() as b:
        f = a.submit(inc, 1)
        with pytest.raises(cw.SerializationError, match="another client"):
            b.submit(inc, f)
        assert f.result(30) == 2


def test_serial_client_runs_graphs_in_order(cw_home):
    c = cw.Client(serial=True)
    a = c.submit(inc, 1)
    b = c.submit(add, a, [a][0])
    assert b.result() == 4
    bad = c.submit(boom, 1)
    with pytest.raises(cw.DependencyError):
        c.submit(inc, bad).result()
    ref = c.scatter({"k": 5})
    assert c.submit(total, ref).result() == 5


def concat(a, b):
    return a + b


def leaf(i):
    return i, b"x" * 1000


def merge(a, b):
    return a[0] + b[0], a[1]


@pytest.mark.timeout(240)
def test_a_tree_reduction_of_10000_leaves_passes_no_leaf_through_the_client(master, workers):
    with cw.Client() as c:
        total = c.reduce(merge, (c.submit(leaf, i) for i in range(10_000)))
        value = total.result(200)
        received = c.traffic["received"]
        assert value == (sum(range(10_000)), b"x" * 1000)
        # 10,000 leaves of 1 KB: their values stayed at the master, and at the workers
        assert received < 1_000_000, received
        st = c.status()
        assert st["held"] == 0 and st["sent"]["inputs"] < 2 * 10_000 * 1100


def test_reduce_keeps_the_order_and_takes_a_list(master, workers):
    with cw.Client() as c:
        parts = c.map(str, range(1, 12))
        assert c.reduce(concat, parts).result(60) == "1234567891011"
        assert c.reduce(concat, parts, split_every=3).result(60) == "1234567891011"
        assert c.reduce(concat, parts[:1]) is parts[0]
        with pytest.raises(ValueError):
            c.reduce(concat, [])
