"""Graphs that survive: a master killed mid-graph finishes it after a restart; re-runs reuse nodes."""

from __future__ import annotations

import os
import sqlite3
import time
from collections import Counter

import pytest
from conftest import start_workers, wait_for
from test_migrations import SCHEMA_1
from test_resume import start_master

import cw
from cw.discovery import ClusterDir


def node(where, tag, *inputs):
    """One node of a graph: leaves a file per run, returns its tag plus its inputs."""
    open(os.path.join(where, f"{tag}-{os.getpid()}-{time.monotonic_ns()}"), "w").close()
    time.sleep(0.003)
    return tag + sum(inputs)


def runs(where) -> Counter:
    return Counter(int(name.split("-")[0]) for name in os.listdir(where))


def build(c, where, leaves, first_leaf=0):
    """A binary tree over ``leaves`` leaves: leaves get tags 1..n, inner nodes n+1...; 2n - 1 nodes."""
    level = [c.submit(node, str(where), first_leaf + i + 1) for i in range(leaves)]
    c.first = level[0]  # a leaf, to ask for its value (kept at the master) later
    tag = leaves
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level) - 1, 2):
            tag += 1
            nxt.append(c.submit(node, str(where), tag * 1000, level[i], level[i + 1]))
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0], tag


def expected(leaves, first_leaf=0):
    # every inner tag contributes tag * 1000; the leaves their own tags
    inner = sum(t * 1000 for t in range(leaves + 1, 2 * leaves))
    return inner + sum(first_leaf + i + 1 for i in range(leaves))


@pytest.mark.timeout(300)
def test_master_kill9_mid_graph_then_restart_runs_every_node_exactly_once(cw_home, procs, tmp_path):
    where = tmp_path / "runs"
    where.mkdir()
    m1 = start_master(procs, "m1")
    start_workers(procs, 2, "--master-timeout", "2")
    with cw.Client(master_timeout=2) as c:
        top, last = build(c, where, 500)  # 999 nodes
        wait_for(lambda: sum(runs(where).values()) >= 300, timeout=120, interval=0.01, what="300 nodes run")
        m1.kill()  # kill -9, mid-graph
        m1.wait()
        start_master(procs, "m2")
        assert top.result(240) == expected(500)
        assert c.first.result(30) == 1  # a value kept at the first master, asked of the second
    counts = runs(where)
    assert len(counts) == 999 and set(counts.values()) == {1}, [t for t, n in counts.items() if n != 1]
    db = sqlite3.connect(ClusterDir().store_path)
    assert db.execute("SELECT count(*) FROM results WHERE status = 0").fetchone()[0] == 999
    assert db.execute("SELECT count(*) FROM deps").fetchone()[0] == 2 * 499


@pytest.mark.timeout(180)
def test_a_rerun_reuses_stored_results_node_by_node(master, workers, tmp_path):
    where = tmp_path / "runs"
    where.mkdir()
    with cw.Client(run="graph-1") as c:
        top, _ = build(c, where, 16)
        assert top.result(60) == expected(16)
    first = runs(where)
    assert sum(first.values()) == 31
    with cw.Client(run="graph-1") as c:  # the same graph: nothing runs again
        top, _ = build(c, where, 16)
        assert top.result(60) == expected(16)
    assert runs(where) == first
    with cw.Client(run="graph-1") as c:  # one leaf changed: it and the path above it run, nothing else
        level = [c.submit(node, str(where), 100 if i == 0 else i + 1) for i in range(16)]
        tag = 16
        while len(level) > 1:
            nxt = []
            for i in range(0, len(level), 2):
                tag += 1
                nxt.append(c.submit(node, str(where), tag * 1000, level[i], level[i + 1]))
            level = nxt
        assert level[0].result(60) == expected(16) + 99
    again = runs(where) - first
    assert sum(again.values()) == 5 and 100 in again  # the leaf and its 4 ancestors


def add(a, b):
    return a + b


@pytest.mark.timeout(180)
def test_a_graph_larger_than_the_queue_window_waits_in_the_store_with_its_edges(cw_home, procs):
    start_master(procs, "m", "--queue-window", "40")
    start_workers(procs, 2)
    with cw.Client() as c:
        leaves = c.map(int, range(300))
        total = c.reduce(add, leaves)
        assert total.result(120) == sum(range(300))
    db = sqlite3.connect(ClusterDir().store_path)
    assert db.execute("SELECT count(*) FROM deps").fetchone()[0] == 2 * 299


def test_a_store_of_schema_1_is_migrated_forward(tmp_path):
    from cw import store as S

    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)
    old.executescript(f"BEGIN; {SCHEMA_1} PRAGMA user_version = 1; COMMIT;")
    old.execute("INSERT INTO jobs (id, session, seq, fn, args) VALUES (1, 's', 0, 'f', x'00')")
    old.commit()
    old.close()
    st = S.Store(path)
    try:
        assert st.conn.execute("PRAGMA user_version").fetchone()[0] == S.SCHEMA_VERSION
        assert [r.id for r in st.pending()] == [1]  # nothing lost
        st.add_graph([(1, 0, 7)], [(1, "h")])
        st.commit()
        assert st.graph_of([1]) == ({1: [7]}, {1: ["h"]})
    finally:
        st.close()
    newer = sqlite3.connect(path)
    newer.execute(f"PRAGMA user_version = {S.SCHEMA_VERSION + 1}")
    newer.commit()
    newer.close()
    with pytest.raises(cw.errors.StoreError, match="newer"):
        S.Store(path)


def slow_add(a, b):
    time.sleep(1.0)
    return a + b


def test_a_future_attached_to_another_clients_job_feeds_a_graph(master, workers):
    """In a run, a submission attached to an unfinished job of the same key is an input like any."""
    with cw.Client(run="shared") as first, cw.Client(run="shared") as second:
        a = first.submit(slow_add, 1, 2)
        wait_for(lambda: a.running(), timeout=30, what="the first copy to run")
        b = second.submit(slow_add, 1, 2)  # attached to the first client's job
        c = second.submit(slow_add, b, 10)
        assert c.result(60) == 13 and b.result(10) == 3 and a.result(10) == 3
    db = sqlite3.connect(ClusterDir().store_path)
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2  # the copy ran once


def test_the_row_copy_of_cw_store_recover_keeps_the_graph(tmp_path):
    from cw import store as S
    from cw.store import repair

    st = S.Store(tmp_path / "a.sqlite")
    st.add_jobs([("s", 0, None, None, "f", b"x", None, None, 3, None),
                 ("s", 1, None, None, "f", b"y", None, None, 3, None, 1)])  # fmt: skip
    st.add_graph([(2, 0, 1)], [(2, "h")])
    st.add_refs([("h", b"data")])
    st.commit()
    st.close()
    repair._copy_rows(tmp_path / "a.sqlite", tmp_path / "b.sqlite")
    rows = repair._finish(tmp_path / "b.sqlite")
    assert rows["deps"] == rows["uses"] == rows["refs"] == 1 and rows["jobs"] == 2
    again = S.Store(tmp_path / "b.sqlite")
    try:
        assert again.graph_of([2]) == ({2: [1]}, {2: ["h"]}) and again.ref("h") == b"data"
    finally:
        again.close()
