"""The SQLite store: a handful of verbs the master calls, and read-only queries.

One writer (the master); everyone else opens the file read-only. The schema
is the SQL below; the master runs prepared statements in explicit
transactions, one per turn of its loop. The export behind `cw results` is
sqlite-utils'. Journal mode is WAL where the filesystem allows it (see
docs/store.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# (id, session, seq, run, key, fn, args, requires, timeout, max_retries, submitted)
JobRow = tuple
# (job, status, value, error, traceback, worker, runtime, finished)
ResultRow = tuple


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
    submitted REAL
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
    finished REAL
);
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    host TEXT,
    pid INTEGER,
    caps TEXT,                      -- JSON
    joined REAL,
    left REAL,
    reason TEXT                     -- why it left; the batch system's post-mortem
);
"""


def connect(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


class _Checkpointer(threading.Thread):
    """Copies the write-ahead log into the database, off the master's thread."""

    EVERY = 1.0  # seconds between looks at the log
    BYTES = 32 * 1024 * 1024  # checkpoint once the log is this large

    def __init__(self, path: Path):
        super().__init__(name="cw-checkpoint", daemon=True)
        self.path, self.wal = path, Path(f"{path}-wal")
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        conn = connect(self.path)
        try:
            while not self._halt.wait(self.EVERY):
                try:
                    if self.wal.stat().st_size >= self.BYTES:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except (OSError, sqlite3.Error) as e:
                    log.debug("checkpoint skipped: %s", e)
        finally:
            conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


class Store:
    """The master's store. Not thread-safe: only the master's loop calls it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # owner only; SQLite gives its -wal and -shm the same mode
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.conn = connect(self.path)
        # 16 KiB pages: large argument and result blobs take a quarter of the page
        # writes (applies to a new store only)
        self.conn.execute("PRAGMA page_size = 16384")
        mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            log.warning("store %s: WAL unavailable on this filesystem, journal mode %s", path, mode)
        # NORMAL in WAL: a commit survives the death of any process; only a power
        # loss or OS crash may take the last transactions back.
        self.conn.execute("PRAGMA synchronous = NORMAL")
        # a checkpoint copies the log into the database and syncs the disk: a
        # thread of its own does it, so the master's loop never waits for it
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")
        self._checkpointer = _Checkpointer(self.path)
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            self.conn.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        elif version != SCHEMA_VERSION:
            raise RuntimeError(f"store {path} has schema {version}, this cw knows {SCHEMA_VERSION}")
        self._in_tx = False
        self.next_id = (self.conn.execute("SELECT max(id) FROM jobs").fetchone()[0] or 0) + 1

    def close(self) -> None:
        self.commit()
        self._checkpointer.stop()
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()

    # -- transactions: one per turn of the master's loop -------------------------
    def _begin(self) -> None:
        if not self._in_tx:
            self.conn.execute("BEGIN IMMEDIATE")
            self._in_tx = True

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """All of the block's writes, or none of them (the turn's transaction goes on)."""
        self._begin()
        self.conn.execute("SAVEPOINT batch")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK TO batch")
            self.conn.execute("RELEASE batch")
            raise
        self.conn.execute("RELEASE batch")

    def finished(self, job_ids: Sequence[int]) -> list[int]:
        """Those of these jobs that have a result."""
        out: list[int] = []
        ids = list(job_ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            out += [r[0] for r in self.conn.execute(
                f"SELECT job FROM results WHERE job IN ({','.join('?' * len(chunk))})", chunk)]  # fmt: skip
        return out

    def rollback(self) -> None:
        if self._in_tx:
            self.conn.execute("ROLLBACK")
            self._in_tx = False

    def commit(self) -> bool:
        """Commit what this turn wrote; True if there was anything."""
        if self._in_tx:
            self.conn.execute("COMMIT")
            self._in_tx = False
            return True
        return False

    # -- writes ------------------------------------------------------------------
    def add_functions(self, items: Iterable[tuple[str, bytes]]) -> None:
        self._begin()
        now = time.time()
        self.conn.executemany(
            "INSERT OR IGNORE INTO functions (hash, blob, created) VALUES (?, ?, ?)",
            [(h, b, now) for h, b in items],
        )

    def add_session(self, session: str, run: str | None, context: dict) -> None:
        self._begin()
        self.conn.execute(
            "INSERT OR REPLACE INTO sessions (id, run, context, started) VALUES (?, ?, ?, ?)",
            (session, run, json.dumps(context), time.time()),
        )

    def add_jobs(self, rows: Sequence[JobRow]) -> None:
        self._begin()
        self.conn.executemany(
            "INSERT INTO jobs (id, session, seq, run, key, fn, args, requires, timeout,"
            " max_retries, submitted) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )

    def add_results(self, rows: Sequence[ResultRow]) -> None:
        self._begin()
        self.conn.executemany(
            "INSERT OR IGNORE INTO results (job, status, value, error, traceback, worker,"
            " runtime, finished) VALUES (?,?,?,?,?,?,?,?)",
            rows,
        )

    def count_attempt(self, job_ids: Sequence[int]) -> None:
        self._begin()
        self.conn.executemany(
            "UPDATE jobs SET attempts = attempts + 1 WHERE id = ?", [(j,) for j in job_ids]
        )

    def worker_joined(self, wid: str, host: str, pid: int, caps: dict) -> None:
        self._begin()
        self.conn.execute(
            "INSERT OR REPLACE INTO workers (id, host, pid, caps, joined) VALUES (?,?,?,?,?)",
            (wid, host, pid, json.dumps(caps), time.time()),
        )

    def worker_left(self, wid: str, reason: str) -> None:
        self._begin()
        self.conn.execute(
            "UPDATE workers SET left = ?, reason = ? WHERE id = ?", (time.time(), reason, wid)
        )

    # -- reads -------------------------------------------------------------------
    def function(self, fn_hash: str) -> bytes | None:
        row = self.conn.execute("SELECT blob FROM functions WHERE hash = ?", (fn_hash,)).fetchone()
        return row[0] if row else None

    def job_ids(self, session: str, seqs: Sequence[int]) -> dict[int, int]:
        """seq -> job id of the jobs this session already submitted (idempotent resend)."""
        out = {}
        for seq in seqs:
            row = self.conn.execute(
                "SELECT id FROM jobs WHERE session = ? AND seq = ?", (session, seq)
            ).fetchone()
            if row:
                out[seq] = row[0]
        return out

    def cached_result(self, run: str, key: str) -> tuple | None:
        """(status, value, error, traceback) of a finished job with this key in this run."""
        return self.conn.execute(
            "SELECT r.status, r.value, r.error, r.traceback FROM jobs j JOIN results r"
            " ON r.job = j.id WHERE j.run = ? AND j.key = ? AND r.status = 0 LIMIT 1",
            (run, key),
        ).fetchone()

    def pending(self, after: int = 0, limit: int = 10000) -> list[tuple]:
        """Jobs without a result, in id order: (id, session, seq, fn, args, requires,
        timeout, max_retries, attempts)."""
        return self.conn.execute(
            "SELECT id, session, seq, fn, args, requires, timeout, max_retries, attempts"
            " FROM jobs WHERE id > ? AND NOT EXISTS (SELECT 1 FROM results WHERE job = jobs.id)"
            " ORDER BY id LIMIT ?",
            (after, limit),
        ).fetchall()

    def count_pending(self, after: int = 0) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM jobs WHERE id > ?"
            " AND NOT EXISTS (SELECT 1 FROM results WHERE job = jobs.id)",
            (after,),
        ).fetchone()[0]

    def session_results(self, session: str, seqs: Sequence[int]) -> list[tuple]:
        """(seq, status, value, error, traceback) of this session's finished jobs among seqs."""
        out: list[tuple] = []
        seqs = list(seqs)
        for i in range(0, len(seqs), 500):
            chunk = seqs[i : i + 500]
            out += self.conn.execute(
                "SELECT j.seq, r.status, r.value, r.error, r.traceback FROM jobs j"
                " JOIN results r ON r.job = j.id"
                f" WHERE j.session = ? AND j.seq IN ({','.join('?' * len(chunk))})",
                (session, *chunk),
            ).fetchall()
        return out

    def retry_failed(self, run: str) -> list[tuple]:
        """Forget the failed results of a run; its jobs, as rows for the queue."""
        self._begin()
        failed = "SELECT job FROM results r JOIN jobs j ON j.id = r.job WHERE j.run IS ? AND r.status != 0"
        ids = [r[0] for r in self.conn.execute(failed, (run,))]
        self.conn.executemany("DELETE FROM results WHERE job = ?", [(i,) for i in ids])
        self.conn.executemany("UPDATE jobs SET attempts = 0 WHERE id = ?", [(i,) for i in ids])
        return [
            row
            for i in ids
            for row in self.conn.execute(
                "SELECT id, session, seq, fn, args, requires, timeout, max_retries, attempts"
                " FROM jobs WHERE id = ?",
                (i,),
            )
        ]

    def sessions(self) -> dict[str, tuple[str | None, dict]]:
        return {
            sid: (run, json.loads(ctx))
            for sid, run, ctx in self.conn.execute("SELECT id, run, context FROM sessions")
        }


def summary(conn: sqlite3.Connection) -> dict[str, Any]:
    """Jobs by state and run, and workers: what `cw status` shows without a master."""
    from .protocol import STATUS_NAMES

    runs: dict[str, dict[str, int]] = {}
    for run, status, n in conn.execute(
        "SELECT j.run, r.status, count(*) FROM jobs j LEFT JOIN results r ON r.job = j.id"
        " GROUP BY j.run, r.status"
    ):
        name = "pending" if status is None else STATUS_NAMES.get(status, str(status))
        runs.setdefault(run or "", {})[name] = n
    workers = [
        dict(zip(("id", "host", "pid", "joined", "left", "reason"), row))
        for row in conn.execute("SELECT id, host, pid, joined, left, reason FROM workers")
    ]
    return {"runs": runs, "workers": workers}
