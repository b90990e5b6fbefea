"""A store of every older schema is opened by the master and migrated forward, nothing lost.

Each older store is built the way that cw left it: schema 1's own tables, then
the migrations that took a store to 2, 3 and 4 (the history they record). The
master's Store opens it, migrates it to SCHEMA_VERSION in one transaction, and
every table then has the columns a new store has.
"""

from __future__ import annotations

import sqlite3

import pytest

import cw
from cw.store import SCHEMA_VERSION, Store
from cw.store.reader import StoreReader
from cw.store.schema import MIGRATIONS, SCHEMA

#: Schema 1, as the first cw wrote it.
SCHEMA_1 = """
CREATE TABLE functions (hash TEXT PRIMARY KEY, blob BLOB, created REAL);
CREATE TABLE sessions (id TEXT PRIMARY KEY, run TEXT, context TEXT, started REAL);
CREATE TABLE jobs (id INTEGER PRIMARY KEY, session TEXT NOT NULL, seq INTEGER NOT NULL, run TEXT,
    key TEXT, fn TEXT NOT NULL, args BLOB NOT NULL, requires TEXT, timeout REAL, max_retries INTEGER,
    attempts INTEGER DEFAULT 0, submitted REAL);
CREATE UNIQUE INDEX idx_jobs_session_seq ON jobs (session, seq);
CREATE INDEX idx_jobs_run_key ON jobs (run, key);
CREATE TABLE results (job INTEGER PRIMARY KEY REFERENCES jobs (id), status INTEGER, value BLOB,
    error TEXT, traceback TEXT, worker TEXT, runtime REAL, finished REAL);
CREATE TABLE workers (id TEXT PRIMARY KEY, host TEXT, pid INTEGER, caps TEXT, joined REAL, left REAL,
    reason TEXT);
"""

OLDER = list(range(1, SCHEMA_VERSION))


def old_store(path, version: int) -> None:
    """A store of schema ``version`` holding two jobs of run "old": job 1 failed, job 2 pending."""
    db = sqlite3.connect(path)
    steps = "".join(MIGRATIONS[v] for v in range(1, version))
    db.executescript(f"BEGIN; {SCHEMA_1} {steps} PRAGMA user_version = {version}; COMMIT;")
    db.execute("INSERT INTO sessions VALUES ('s', 'old', '{}', 1.0)")
    for i in (1, 2):
        db.execute("INSERT INTO jobs (id, session, seq, run, key, fn, args, max_retries, submitted)"
                   " VALUES (?, 's', ?, 'old', ?, 'h', x'00', 3, 10.0)", (i, i, f"k{i}"))  # fmt: skip
    db.execute("INSERT INTO results (job, status, value, error, traceback, worker, runtime, finished)"
               " VALUES (1, 1, x'', 'ValueError: x', 'tb', 'w1', 0.5, 12.0)")  # fmt: skip
    if version >= 3:
        db.execute("INSERT INTO meta VALUES ('epoch', 'e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0')")
    if version >= 4:
        db.execute("INSERT INTO outputs VALUES (1, 'outputs/old/k1', 'a.txt', 3, ?)", ("0" * 64,))
    db.commit()
    db.close()


def columns(path) -> dict[str, set[str]]:
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: {r[1] for r in db.execute(f"PRAGMA table_info({t})")} for t in tables}
    finally:
        db.close()


def test_the_migrations_lead_from_schema_1_to_the_schema_a_new_store_has(tmp_path):
    fresh = tmp_path / "new.sqlite"
    db = sqlite3.connect(fresh)
    db.executescript(f"BEGIN; {SCHEMA} COMMIT;")
    db.close()
    migrated = tmp_path / "old.sqlite"
    old_store(migrated, 1)
    Store(migrated).close()
    assert columns(migrated) == columns(fresh)


@pytest.mark.parametrize("version", OLDER)
def test_a_store_of_an_older_schema_is_read_then_migrated_with_nothing_lost(tmp_path, version):
    path = tmp_path / "cw.sqlite"
    old_store(path, version)
    with StoreReader(path) as r:  # read as it is, unmigrated
        assert r.version == version
        assert [x["job"] for x in r.results("old")] == [1]
    s = Store(path)  # the master opens it: migrated forward
    try:
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert [q.id for q in s.pending()] == [2]
        if version >= 3:
            assert s.epoch == "e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0"  # kept
        else:
            assert len(s.epoch) == 32  # made now
        # what the newer schemas added works on the migrated store
        s.add_outputs([(2, "outputs/old/k2", "b.txt", 4, "1" * 64)])
        s.add_graph([(2, 0, 1)], [(2, "h")])
        s.add_refs([("h", b"data")])
        s.commit()
        assert s.graph_of([2]) == ({2: [1]}, {2: ["h"]}) and s.ref("h") == b"data"
    finally:
        s.close()
    db = sqlite3.connect(path)
    names = [r[0] for r in db.execute("SELECT name FROM outputs ORDER BY job")]
    assert names == (["a.txt", "b.txt"] if version >= 4 else ["b.txt"])
    assert db.execute("SELECT count(*) FROM results").fetchone()[0] == 1
    db.close()
    assert columns(path)["jobs"] >= {"output_limit", "parent"}


def test_a_store_of_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "cw.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(cw.errors.StoreError, match="newer than this cw"):
        Store(path)
