"""The store's schema: its tables, its version, and the migrations that bring an older store forward.

Part of the store (:mod:`cw.store`): SQL lives in this package only.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..errors import StoreError

#: The schema's version (SQLite's user_version). An older store is migrated forward when
#: the master opens it; a newer one is refused.
SCHEMA_VERSION = 5

#: Graphs (a job's inputs are other jobs' results), scattered data, submissions answered by
#: another job's result (schema 5).
_GRAPH = """
CREATE TABLE deps (                 -- graphs: a job's inputs are other jobs' results
    job INTEGER NOT NULL,           -- a job ...
    pos INTEGER NOT NULL,           -- ... whose argument number pos (in its blob's numbering) ...
    input INTEGER NOT NULL,         -- ... is this job's result
    PRIMARY KEY (job, pos)
);
CREATE INDEX idx_deps_input ON deps (input);
CREATE TABLE refs (
    hash TEXT PRIMARY KEY,          -- BLAKE2b of blob: scattered data, stored once
    blob BLOB,
    created REAL
);
CREATE TABLE uses (
    job INTEGER NOT NULL,           -- a job whose arguments name ...
    ref TEXT NOT NULL               -- ... this scattered data
);
CREATE INDEX idx_uses_job ON uses (job);
CREATE TABLE aliases (
    session TEXT NOT NULL,          -- a submission answered by another job's stored result
    seq INTEGER NOT NULL,           -- (a re-run, an attached copy): later jobs of the session
    job INTEGER NOT NULL,           -- may take it as input
    PRIMARY KEY (session, seq)
);
"""

SCHEMA = """
CREATE TABLE functions (
    hash TEXT PRIMARY KEY,          -- BLAKE2b of blob
    blob BLOB,                      -- (name, by reference, by value) pickles
    created REAL
);
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,            -- one per client session
    run TEXT,
    context TEXT,                   -- JSON: cwd, sys.path, named variables
    started REAL
);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,         -- assigned by the master
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,           -- the client's own job number
    run TEXT,
    key TEXT,                       -- identity within a run: stored results are reused
    fn TEXT NOT NULL,
    args BLOB NOT NULL,
    requires TEXT,                  -- JSON
    timeout REAL,
    max_retries INTEGER,
    attempts INTEGER DEFAULT 0,     -- workers lost while running it
    submitted REAL,
    output_limit INTEGER,           -- bytes of stdout and stderr kept (NULL: the session's)
    parent INTEGER                  -- the job that submitted it (a nested job)
);
CREATE UNIQUE INDEX idx_jobs_session_seq ON jobs (session, seq);
CREATE INDEX idx_jobs_run_key ON jobs (run, key);
CREATE TABLE results (
    job INTEGER PRIMARY KEY REFERENCES jobs (id),  -- at most one result per job
    status INTEGER,                 -- protocol.STATUS_NAMES
    value BLOB,                     -- pickled value or exception
    error TEXT,
    traceback TEXT,
    worker TEXT,
    runtime REAL,
    finished REAL,
    queued REAL,                    -- when this attempt was queued (NULL: jobs.submitted)
    started REAL,                   -- when a worker started it (NULL: finished - runtime)
    stdout TEXT,                    -- the job's own output: the tail, what was cut is said
    stderr TEXT
);
CREATE TABLE attempts (             -- every attempt before the one in results
    job INTEGER NOT NULL REFERENCES jobs (id),
    worker TEXT,
    queued REAL,
    started REAL,
    ended REAL,
    status INTEGER,                 -- protocol.STATUS_NAMES; LOST, or a result that was retried
    error TEXT,
    stdout TEXT,
    stderr TEXT
);
CREATE INDEX idx_attempts_job ON attempts (job);
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    host TEXT,
    pid INTEGER,
    caps TEXT,                      -- JSON
    joined REAL,
    left REAL,
    reason TEXT                     -- why it left; the batch system's post-mortem
);
CREATE TABLE meta (
    name TEXT PRIMARY KEY,          -- epoch: a random id the store gets when it is made
    value TEXT
);
CREATE TABLE outputs (              -- the files each job archived in the cluster directory
    job INTEGER NOT NULL REFERENCES jobs (id),
    dir TEXT NOT NULL,              -- where its files are, relative to the cluster directory
    name TEXT NOT NULL,             -- the file's path in the job's outputs
    size INTEGER,
    sha256 TEXT,
    PRIMARY KEY (job, name)
);
""" + _GRAPH



#: From version N to N + 1: statements run in one transaction when the master opens an older store.
MIGRATIONS = {
    1: """
ALTER TABLE jobs ADD COLUMN output_limit INTEGER;
ALTER TABLE results ADD COLUMN queued REAL;
ALTER TABLE results ADD COLUMN started REAL;
ALTER TABLE results ADD COLUMN stdout TEXT;
ALTER TABLE results ADD COLUMN stderr TEXT;
CREATE TABLE attempts (
    job INTEGER NOT NULL REFERENCES jobs (id), worker TEXT, queued REAL, started REAL,
    ended REAL, status INTEGER, error TEXT, stdout TEXT, stderr TEXT
);
CREATE INDEX idx_attempts_job ON attempts (job);
""",
    # the cluster epoch: job ids start again at 1 in a new store; the epoch tells its jobs
    # from those of the store it replaced (the Store makes it: see docs/protocol.md)
    2: """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT);
""",
    # the files jobs archive in the cluster directory (cw.outputs(), a shell job's outputs=)
    3: """
CREATE TABLE outputs (
    job INTEGER NOT NULL REFERENCES jobs (id), dir TEXT NOT NULL, name TEXT NOT NULL,
    size INTEGER, sha256 TEXT, PRIMARY KEY (job, name)
);
""",
    # graphs, scattered data, nested jobs (a job's parent)
    4: "ALTER TABLE jobs ADD COLUMN parent INTEGER;\n" + _GRAPH,
}


def prepare(conn: sqlite3.Connection, path: Any) -> None:
    """Create the schema in a new store, or migrate an older one forward (one transaction)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        conn.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
    elif version > SCHEMA_VERSION:
        raise StoreError(f"store {path} has schema {version}, newer than this cw knows ({SCHEMA_VERSION}):"
                         " use the cw that wrote it")  # fmt: skip
    elif version < SCHEMA_VERSION:
        steps = "".join(MIGRATIONS[v] for v in range(version, SCHEMA_VERSION))
        conn.executescript(f"BEGIN; {steps} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")


def check_readable(conn: sqlite3.Connection, path: Any) -> int:
    """The schema version of a store opened read-only (an older one is read as it is)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(f"store {path} has schema {version}, newer than this cw knows ({SCHEMA_VERSION})")
    return version
