"""The SQLite store: the only place that knows SQL.

One writer, the master, through :class:`Store`: a handful of verbs that take
and return the typed records below, allocate job ids, and raise
:class:`cw.errors.StoreError` (never a sqlite3 exception). The master runs
them in explicit transactions, one per turn of its loop. Everyone else reads
through :class:`StoreReader`, read-only (`cw status`, `cw results`). Journal
mode is WAL where the filesystem allows it (see docs/store.md).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pickle
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, TypeVar

from .errors import StoreConflict, StoreError
from .protocol import OK, STATUS_NAMES

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class NewJob(NamedTuple):
    """A job as the master stores it; the store gives it its id."""

    session: str
    seq: int
    run: Optional[str]
    key: Optional[str]
    fn: str
    args: bytes
    requires: Optional[dict]
    timeout: Optional[float]
    max_retries: int


class QueuedJob(NamedTuple):
    """A stored job without a result, as the master's queue takes it back."""

    id: int
    session: str
    seq: int
    fn: str
    args: bytes
    requires: Optional[dict]
    timeout: Optional[float]
    max_retries: int
    attempts: int


class Outcome(NamedTuple):
    """A job's result as stored: one per job at most."""

    job: int
    status: int
    value: bytes
    error: Optional[str]
    traceback: Optional[str]
    worker: Optional[str]
    runtime: Optional[float]
    finished: float


class StoredResult(NamedTuple):
    """A finished job's result, by the client's seq."""

    seq: int
    status: int
    value: bytes
    error: Optional[str]
    traceback: Optional[str]


class SessionRecord(NamedTuple):
    run: Optional[str]
    context: dict


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


F = TypeVar("F", bound=Callable[..., Any])


def _guarded(method: F) -> F:
    """sqlite3's exceptions become cw's: a broken rule is a conflict, anything else a store failure."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.IntegrityError as e:
            raise StoreConflict(f"store {self.path}: {e}") from e
        except sqlite3.Error as e:
            raise StoreError(f"store {self.path}: {e}") from e

    return call  # type: ignore[return-value]


def _connect(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def _chunks(items: Sequence, n: int = 500) -> Iterator[Sequence]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


_QUEUED = "SELECT id, session, seq, fn, args, requires, timeout, max_retries, attempts FROM jobs"


def _queued(row: tuple) -> QueuedJob:
    return QueuedJob(*row[:5], json.loads(row[5]) if row[5] else None, *row[6:])


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
        conn = _connect(self.path)
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

    @_guarded
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # owner only; SQLite gives its -wal and -shm the same mode
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.conn = _connect(self.path)
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
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            self.conn.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        elif version != SCHEMA_VERSION:
            raise StoreError(f"store {path} has schema {version}, this cw knows {SCHEMA_VERSION}")
        self._checkpointer = _Checkpointer(self.path)
        self._in_tx = False
        self._next_id = (self.conn.execute("SELECT max(id) FROM jobs").fetchone()[0] or 0) + 1

    @_guarded
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
        try:
            self._begin()
            self.conn.execute("SAVEPOINT batch")
        except sqlite3.Error as e:
            raise StoreError(f"store {self.path}: {e}") from e
        try:
            yield
        except BaseException:
            try:
                self.conn.execute("ROLLBACK TO batch")
                self.conn.execute("RELEASE batch")
            except sqlite3.Error as e:
                raise StoreError(f"store {self.path}: {e}") from e
            raise
        try:
            self.conn.execute("RELEASE batch")
        except sqlite3.Error as e:
            raise StoreError(f"store {self.path}: {e}") from e

    @_guarded
    def rollback(self) -> None:
        if self._in_tx:
            self._in_tx = False
            self.conn.execute("ROLLBACK")

    @_guarded
    def commit(self) -> bool:
        """Commit what this turn wrote; True if there was anything."""
        if self._in_tx:
            self.conn.execute("COMMIT")
            self._in_tx = False
            return True
        return False

    # -- writes ------------------------------------------------------------------
    @_guarded
    def add_functions(self, items: Iterable[tuple[str, bytes]]) -> None:
        self._begin()
        now = time.time()
        self.conn.executemany(
            "INSERT OR IGNORE INTO functions (hash, blob, created) VALUES (?, ?, ?)",
            [(h, b, now) for h, b in items],
        )

    @_guarded
    def add_session(self, session: str, run: str | None, context: dict) -> None:
        self._begin()
        self.conn.execute(
            "INSERT OR REPLACE INTO sessions (id, run, context, started) VALUES (?, ?, ?, ?)",
            (session, run, json.dumps(context), time.time()),
        )

    @_guarded
    def add_jobs(self, jobs: Sequence[NewJob]) -> list[int]:
        """Store jobs (NewJob records, or plain tuples in its order); their ids, in order."""
        self._begin()
        first, now = self._next_id, time.time()
        self.conn.executemany(
            "INSERT INTO jobs (id, session, seq, run, key, fn, args, requires, timeout,"
            " max_retries, submitted) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [(first + i, session, seq, run, key, fn, args, json.dumps(req) if req else None,
              timeout, retries, now)
             for i, (session, seq, run, key, fn, args, req, timeout, retries) in enumerate(jobs)],
        )  # fmt: skip
        self._next_id = first + len(jobs)
        return list(range(first, self._next_id))

    @_guarded
    def add_results(self, outcomes: Sequence[Outcome]) -> None:
        """Store results (Outcome records, or plain tuples in its order); a second one for a job is ignored."""
        self._begin()
        self.conn.executemany(
            "INSERT OR IGNORE INTO results (job, status, value, error, traceback, worker,"
            " runtime, finished) VALUES (?,?,?,?,?,?,?,?)",
            outcomes,
        )

    @_guarded
    def count_attempt(self, job_ids: Sequence[int]) -> None:
        self._begin()
        self.conn.executemany(
            "UPDATE jobs SET attempts = attempts + 1 WHERE id = ?", [(j,) for j in job_ids]
        )

    @_guarded
    def worker_joined(self, wid: str, host: str, pid: int, caps: dict) -> None:
        self._begin()
        self.conn.execute(
            "INSERT OR REPLACE INTO workers (id, host, pid, caps, joined) VALUES (?,?,?,?,?)",
            (wid, host, pid, json.dumps(caps), time.time()),
        )

    @_guarded
    def worker_left(self, wid: str, reason: str) -> None:
        self._begin()
        self.conn.execute(
            "UPDATE workers SET left = ?, reason = ? WHERE id = ?", (time.time(), reason, wid)
        )

    @_guarded
    def retry_failed(self, run: str) -> list[QueuedJob]:
        """Forget the failed results of a run; its jobs, for the queue."""
        self._begin()
        failed = "SELECT job FROM results r JOIN jobs j ON j.id = r.job WHERE j.run IS ? AND r.status != ?"
        ids = [r[0] for r in self.conn.execute(failed, (run, OK))]
        self.conn.executemany("DELETE FROM results WHERE job = ?", [(i,) for i in ids])
        self.conn.executemany("UPDATE jobs SET attempts = 0 WHERE id = ?", [(i,) for i in ids])
        return [_queued(row) for i in ids for row in self.conn.execute(f"{_QUEUED} WHERE id = ?", (i,))]

    # -- reads -------------------------------------------------------------------
    @_guarded
    def function(self, fn_hash: str) -> bytes | None:
        row = self.conn.execute("SELECT blob FROM functions WHERE hash = ?", (fn_hash,)).fetchone()
        return row[0] if row else None

    @_guarded
    def finished(self, job_ids: Sequence[int]) -> list[int]:
        """Those of these jobs that have a result."""
        out: list[int] = []
        for chunk in _chunks(list(job_ids)):
            out += [r[0] for r in self.conn.execute(
                f"SELECT job FROM results WHERE job IN ({','.join('?' * len(chunk))})", chunk)]  # fmt: skip
        return out

    @_guarded
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

    @_guarded
    def cached_result(self, run: str, key: str, seq: int) -> StoredResult | None:
        """A successful result of a job with this key in this run, answered as ``seq``."""
        row = self.conn.execute(
            "SELECT r.status, r.value, r.error, r.traceback FROM jobs j JOIN results r"
            " ON r.job = j.id WHERE j.run = ? AND j.key = ? AND r.status = ? LIMIT 1",
            (run, key, OK),
        ).fetchone()
        return None if row is None else StoredResult(seq, *row)

    @_guarded
    def pending(self, after: int = 0, limit: int = 10000) -> list[QueuedJob]:
        """Jobs without a result, in id order, from id ``after`` + 1."""
        return [_queued(row) for row in self.conn.execute(
            f"{_QUEUED} WHERE id > ? AND NOT EXISTS (SELECT 1 FROM results WHERE job = jobs.id)"
            " ORDER BY id LIMIT ?", (after, limit))]  # fmt: skip

    @_guarded
    def count_pending(self, after: int = 0) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM jobs WHERE id > ?"
            " AND NOT EXISTS (SELECT 1 FROM results WHERE job = jobs.id)",
            (after,),
        ).fetchone()[0]

    @_guarded
    def session_results(self, session: str, seqs: Sequence[int]) -> list[StoredResult]:
        """This session's finished jobs among seqs."""
        out: list[StoredResult] = []
        for chunk in _chunks(list(seqs)):
            out += map(StoredResult._make, self.conn.execute(
                "SELECT j.seq, r.status, r.value, r.error, r.traceback FROM jobs j"
                " JOIN results r ON r.job = j.id"
                f" WHERE j.session = ? AND j.seq IN ({','.join('?' * len(chunk))})",
                (session, *chunk)))  # fmt: skip
        return out

    @_guarded
    def sessions(self) -> dict[str, SessionRecord]:
        return {
            sid: SessionRecord(run, json.loads(ctx))
            for sid, run, ctx in self.conn.execute("SELECT id, run, context FROM sessions")
        }


class StoreReader:
    """The store, read-only: what `cw status` and `cw results` show without a master.

    Safe beside a live master (WAL readers do not block its writes).
    """

    @_guarded
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"no store at {self.path}")
        self.conn = _connect(self.path, readonly=True)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @_guarded
    def summary(self) -> dict[str, Any]:
        """Jobs by run and state, and the workers that ever joined."""
        runs: dict[str, dict[str, int]] = {}
        for run, status, n in self.conn.execute(
            "SELECT j.run, r.status, count(*) FROM jobs j LEFT JOIN results r ON r.job = j.id"
            " GROUP BY j.run, r.status"
        ):
            name = "pending" if status is None else STATUS_NAMES.get(status, str(status))
            runs.setdefault(run or "", {})[name] = n
        workers = [
            dict(zip(("id", "host", "pid", "joined", "left", "reason"), row))
            for row in self.conn.execute("SELECT id, host, pid, joined, left, reason FROM workers")
        ]
        return {"runs": runs, "workers": workers}

    @_guarded
    def results(self, run: str | None, failed: bool = False) -> list[dict[str, Any]]:
        """Finished jobs of a run (None: jobs submitted without one), in id order:
        job, seq, run, status, value (its repr, for a success), error, worker, runtime."""
        where = "(j.run IS NULL OR j.run = '')" if not run else "j.run = ?"
        sql = ("SELECT j.id, j.seq, j.run, r.status, r.value, r.error, r.worker, r.runtime"
               f" FROM jobs j JOIN results r ON r.job = j.id WHERE {where}"
               + (" AND r.status != ?" if failed else "") + " ORDER BY j.id")  # fmt: skip
        params = ([run] if run else []) + ([OK] if failed else [])
        return [
            {"job": jid, "seq": seq, "run": r, "status": STATUS_NAMES.get(status, str(status)),
             "value": _value_text(value) if status == OK else None, "error": error,
             "worker": worker, "runtime": None if runtime is None else round(runtime, 6)}
            for jid, seq, r, status, value, error, worker, runtime in self.conn.execute(sql, params)
        ]  # fmt: skip


def _value_text(value: bytes | None) -> str | None:
    """repr() of a stored value, if it unpickles here (its classes may live elsewhere)."""
    if value is None:
        return None
    try:
        return repr(pickle.loads(value))
    except Exception as e:
        return f"<cannot unpickle here: {e!r}>"
