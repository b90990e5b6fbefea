"""The SQLite store: this package is the only place that knows SQL.

One writer, the master, through :class:`Store`: a handful of verbs that take
and return the typed records below, allocate job ids, and raise
:class:`cw.errors.StoreError` (never a sqlite3 exception). The master runs
them in explicit transactions, one per turn of its loop. Everyone else reads
through :class:`cw.store.reader.StoreReader`, read-only (`cw status`, `cw
results`, `cw logs`, `cw top`, `cw dashboard`). The schema and its migrations
are in :mod:`cw.store.schema`. Journal mode is WAL where the filesystem allows
it (see docs/store.md).

A store that cannot be trusted is refused loudly: the master checks it on
start (``PRAGMA quick_check``, and a write), every failure names the file
and what to do (:meth:`cw.errors.StoreError.describe`); `cw store check` and
`cw store recover` are :mod:`cw.store.repair`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence

from .. import defaults
from ..errors import StoreError
from ..protocol import CANCELLED, OK
from .blobs import BlobFiles
from .graph import GraphVerbs
from .schema import SCHEMA_VERSION, prepare
from .sqlite import Checkpointer, chunks, connect, file_identity, guarded, json_column

__all__ = ["Attempt", "NewJob", "Outcome", "QueuedJob", "SCHEMA_VERSION", "SessionRecord", "Store",
           "StoredResult"]  # fmt: skip

log = logging.getLogger(__name__)


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
    output_limit: Optional[int]  #: bytes of stdout and stderr kept (None: the session's)
    parent: Optional[int] = None  #: the job that submitted it, for a nested job


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
    output_limit: Optional[int]
    key: Optional[str]


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
    queued: Optional[float]  #: when this attempt was queued (None: when the job was submitted)
    started: Optional[float]  #: when it started, if it did not run to a runtime (else finished - runtime)
    stdout: Optional[str]  #: the tail of the job's own output, if it wrote any
    stderr: Optional[str]


class Attempt(NamedTuple):
    """An attempt before the last: lost with its worker, or a result that was retried."""

    job: int
    worker: Optional[str]
    queued: Optional[float]
    started: Optional[float]
    ended: float
    status: int
    error: Optional[str]
    stdout: Optional[str]
    stderr: Optional[str]


class StoredResult(NamedTuple):
    """A finished job's result, by the client's seq."""

    seq: int
    status: int
    value: bytes
    error: Optional[str]
    traceback: Optional[str]
    job: int


class KeyMatch(NamedTuple):
    """The job of a run with a given function and key: finished well, or not finished yet."""

    job: int
    status: Optional[int]  #: OK, or None while the job has no result
    value: Optional[bytes]
    error: Optional[str]
    traceback: Optional[str]


class SessionRecord(NamedTuple):
    run: Optional[str]
    context: dict


_QUEUED = ("SELECT id, session, seq, fn, args, requires, timeout, max_retries, attempts, output_limit, key"
           " FROM jobs")
_ADD_FUNCTION = "INSERT OR IGNORE INTO functions (hash, blob, created) VALUES (?, ?, ?)"
_ADD_JOB = ("INSERT INTO jobs (id, session, seq, run, key, fn, args, requires, timeout, max_retries,"
            " submitted, output_limit, parent) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)")  # fmt: skip
_ADD_RESULT = ("INSERT OR IGNORE INTO results (job, status, value, error, traceback, worker, runtime,"
               " finished, queued, started, stdout, stderr) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")  # fmt: skip


def _queued(row: tuple, files: BlobFiles) -> QueuedJob:
    return QueuedJob(*row[:4], files.get(row[4]), json_column(row[5]), *row[6:])


class Store(GraphVerbs):
    """The master's store. Not thread-safe: only the master's loop calls it."""

    @guarded
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # owner only; SQLite gives its -wal and -shm the same mode
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.conn = connect(self.path)
        # 4 KiB pages: a turn of one job writes a few of them to the log, and large
        # arguments and results live in files beside the store (a new store only)
        self.conn.execute("PRAGMA page_size = 4096")
        self.files = BlobFiles(self.path)
        mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            log.warning("store %s: WAL unavailable on this filesystem, journal mode %s", path, mode)
        # NORMAL in WAL: a commit survives the death of any process; only a power
        # loss or OS crash may take the last transactions back.
        self.conn.execute("PRAGMA synchronous = NORMAL")
        # a checkpoint copies the log into the database and syncs the disk: a
        # thread of its own does it, so the master's loop never waits for it
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")
        prepare(self.conn, path)  # a new store's schema, or an older one migrated forward
        # refuse a damaged store now, not at the first job that reads a bad page
        problems = [r[0] for r in self.conn.execute("PRAGMA quick_check(20)")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"database disk image is malformed: {'; '.join(problems[:3])}")
        # and one that cannot be written, before the master publishes its address
        self.conn.executescript(f"BEGIN IMMEDIATE; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (secrets.token_hex(16),))
        #: this store's epoch: job ids never mean the same job in two epochs
        self.epoch: str = self.conn.execute("SELECT value FROM meta WHERE name = 'epoch'").fetchone()[0]
        self._files = {p: file_identity(p) for p in (self.path, Path(f"{self.path}-wal"))}
        self._checkpointer = Checkpointer(self.path, before=self.files.sync)
        self._in_tx = False
        self._unlink: list[str] = []  # files of rows this turn deleted: removed once it commits
        self._next_id = (self.conn.execute("SELECT max(id) FROM jobs").fetchone()[0] or 0) + 1

    @guarded
    def close(self, failed: bool = False) -> None:
        """Commit, fold the log into the database and close; after a failure, only close."""
        self._checkpointer.stop()
        if failed:
            self.conn.close()
            return
        self.commit()
        self.files.sync()
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()

    def moved(self) -> str | None:
        """Why the file this store writes is no longer the one at its path (removed or
        replaced under the master), or None while it is."""
        for path, ident in self._files.items():
            if ident is not None and file_identity(path) != ident:
                what = "removed" if not path.exists() else "replaced by another file"
                return (f"the store file {path} was {what} while the master was using it:"
                        " the master stops rather than write where nobody will read")  # fmt: skip
        return None

    @guarded
    def rescue(self) -> Path:
        """Copy what this store holds (as this connection sees it) to a new file beside its path."""
        dest = self.path.with_name(f"{self.path.name}.rescued-{time.strftime('%Y%m%d-%H%M%S')}")
        out = sqlite3.connect(str(dest))
        try:
            self.conn.backup(out)
        finally:
            out.close()
        self.files.link_into(dest)
        return dest

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
            raise StoreError.describe(self.path, e) from e
        try:
            yield
        except BaseException:
            if not self.conn.in_transaction:  # SQLite rolled the whole turn back (disk full, I/O)
                self._in_tx = False
                raise
            try:
                self.conn.execute("ROLLBACK TO batch")
                self.conn.execute("RELEASE batch")
            except sqlite3.Error:
                self._in_tx = self.conn.in_transaction
            raise
        try:
            self.conn.execute("RELEASE batch")
        except sqlite3.Error as e:
            raise StoreError.describe(self.path, e) from e

    def _unbind(self, sql: str, row: tuple) -> None:
        """SQLite keeps a cached statement's last values bound: after a large blob, bind a
        small row (rolled back at once), so that the master does not hold on to the blob."""
        self.conn.execute("SAVEPOINT unbind")
        try:
            self.conn.execute(sql, row)
        finally:
            self.conn.execute("ROLLBACK TO unbind")
            self.conn.execute("RELEASE unbind")

    @guarded
    def rollback(self) -> None:
        self._unlink = []
        if self._in_tx:
            self._in_tx = False
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")

    @guarded
    def commit(self) -> bool:
        """Commit what this turn wrote; True if there was anything."""
        if self._in_tx:
            self.conn.execute("COMMIT")
            self._in_tx = False
            if self._unlink:  # the rows that named them are gone for good only now
                names, self._unlink = self._unlink, []
                self.files.remove(names)
            return True
        return False

    # -- writes ------------------------------------------------------------------
    @guarded
    def add_functions(self, items: Iterable[tuple[str, bytes]]) -> None:
        self._begin()
        now = time.time()
        rows = [(h, b, now) for h, b in items]
        self.conn.executemany(_ADD_FUNCTION, rows)
        if rows and len(rows[-1][1]) >= defaults.RELEASE_BYTES:
            self._unbind(_ADD_FUNCTION, ("", b"", 0))

    @guarded
    def add_session(self, session: str, run: str | None, context: dict) -> None:
        self._begin()
        self.conn.execute(
            "INSERT OR REPLACE INTO sessions (id, run, context, started) VALUES (?, ?, ?, ?)",
            (session, run, json.dumps(context), time.time()),
        )

    @guarded
    def add_jobs(self, jobs: Sequence[NewJob]) -> list[int]:
        """Store jobs (NewJob records, or plain tuples in its order); their ids, in order."""
        self._begin()
        first, now, large, put = self._next_id, time.time(), defaults.LARGE_BLOB_BYTES, self.files.put
        self.conn.executemany(_ADD_JOB, [
            (first + i, j[0], j[1], j[2], j[3], j[4], put(f"{first + i}.args", j[5]) if len(j[5]) >= large else j[5],
             json.dumps(j[6]) if j[6] else None, j[7], j[8], now, j[9], j[10] if len(j) > 10 else None)
            for i, j in enumerate(jobs)])  # fmt: skip
        if jobs and len(jobs[-1][5]) >= defaults.RELEASE_BYTES:
            self._unbind(_ADD_JOB, (-1, "", -1, None, None, "", b"", None, None, 0, 0, None, None))
        self._next_id = first + len(jobs)
        return list(range(first, self._next_id))

    @guarded
    def add_results(self, outcomes: Sequence[Outcome]) -> None:
        """Store results (Outcome records, or plain tuples in its order); a second one for a job is ignored."""
        self._begin()
        large = defaults.LARGE_BLOB_BYTES
        if any(len(o[2]) >= large for o in outcomes):  # those values go to files
            outcomes = [(*o[:2], self.files.put(f"{o[0]}.value", o[2]), *o[3:]) if len(o[2]) >= large else o
                        for o in outcomes]  # fmt: skip
        self.conn.executemany(_ADD_RESULT, outcomes)
        if outcomes and len(outcomes[-1][2]) >= defaults.RELEASE_BYTES:
            self._unbind(_ADD_RESULT, (-1, 0, b"", None, None, None, None, 0, None, None, None, None))

    @guarded
    def add_attempts(self, attempts: Sequence[Attempt]) -> None:
        """Record attempts that ended without the job's result (a lost worker)."""
        self._begin()
        self.conn.executemany("INSERT INTO attempts VALUES (?,?,?,?,?,?,?,?,?)", attempts)

    @guarded
    def add_outputs(self, rows: Sequence[tuple[int, str, str, int, str]]) -> None:
        """Record archived outputs: (job, dir, name, size, sha256); a new attempt's replace the old."""
        if rows:
            self._begin()
            self.conn.executemany(
                "INSERT OR REPLACE INTO outputs (job, dir, name, size, sha256) VALUES (?,?,?,?,?)", rows)

    @guarded
    def count_attempt(self, job_ids: Sequence[int]) -> None:
        self._begin()
        self.conn.executemany(
            "UPDATE jobs SET attempts = attempts + 1 WHERE id = ?", [(j,) for j in job_ids]
        )

    @guarded
    def worker_joined(self, wid: str, host: str, pid: int, caps: dict) -> None:
        self._begin()
        self.conn.execute(
            "INSERT OR REPLACE INTO workers (id, host, pid, caps, joined) VALUES (?,?,?,?,?)",
            (wid, host, pid, json.dumps(caps), time.time()),
        )

    @guarded
    def worker_left(self, wid: str, reason: str) -> None:
        self._begin()
        self.conn.execute(
            "UPDATE workers SET left = ?, reason = ? WHERE id = ?", (time.time(), reason, wid)
        )

    @guarded
    def connected_workers(self) -> list[str]:
        """The workers connected when the last master stopped (they have not left); from now on
        they count as gone until they join again."""
        ids = [r[0] for r in self.conn.execute("SELECT id FROM workers WHERE left IS NULL")]
        if ids:
            self._begin()
            self.conn.execute("UPDATE workers SET left = ?, reason = 'the master stopped' WHERE left IS NULL",
                              (time.time(),))  # fmt: skip
        return ids

    @guarded
    def retry_failed(self, run: str) -> list[QueuedJob]:
        """Forget the failed results of a run; its jobs, for the queue. Cancelled jobs
        are not failures: they stay cancelled (a user asked for it)."""
        self._begin()
        failed = ("SELECT job FROM results r JOIN jobs j ON j.id = r.job WHERE j.run IS ?"
                  " AND r.status NOT IN (?, ?)")  # fmt: skip
        ids = [r[0] for r in self.conn.execute(failed, (run, OK, CANCELLED))]
        # the failed attempt stays in the job's history
        self.conn.executemany(
            "INSERT INTO attempts SELECT job, worker, queued, started, finished, status, error, stdout,"
            " stderr FROM results WHERE job = ?", [(i,) for i in ids])  # fmt: skip
        self.conn.executemany("DELETE FROM results WHERE job = ?", [(i,) for i in ids])
        self.conn.executemany("DELETE FROM outputs WHERE job = ?", [(i,) for i in ids])
        self.conn.executemany("UPDATE jobs SET attempts = 0 WHERE id = ?", [(i,) for i in ids])
        self._unlink += [f"{i}.value" for i in ids]
        return [_queued(row, self.files) for i in ids for row in self.conn.execute(f"{_QUEUED} WHERE id = ?", (i,))]

    # -- reads -------------------------------------------------------------------
    @guarded
    def function(self, fn_hash: str) -> bytes | None:
        row = self.conn.execute("SELECT blob FROM functions WHERE hash = ?", (fn_hash,)).fetchone()
        return row[0] if row else None

    @guarded
    def finished(self, job_ids: Sequence[int]) -> list[int]:
        """Those of these jobs that have a result."""
        out: list[int] = []
        for chunk in chunks(list(job_ids)):
            out += [r[0] for r in self.conn.execute(
                f"SELECT job FROM results WHERE job IN ({','.join('?' * len(chunk))})", chunk)]  # fmt: skip
        return out

    @guarded
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

    @guarded
    def match_key(self, run: str, key: str, fn: str) -> KeyMatch | None:
        """The job of this run with this function and key that succeeded, else the first
        one still without a result; None if neither (a job's identity in a run is its
        function and its key)."""
        row = self.conn.execute(
            "SELECT j.id, r.status, r.value, r.error, r.traceback FROM jobs j LEFT JOIN results r"
            " ON r.job = j.id WHERE j.run = ? AND j.key = ? AND j.fn = ?"
            " AND (r.job IS NULL OR r.status = ?) ORDER BY r.job IS NULL, j.id LIMIT 1",
            (run, key, fn, OK),
        ).fetchone()
        return None if row is None else KeyMatch(*row[:2], self.files.get(row[2]), *row[3:])

    @guarded
    def queued_job(self, job_id: int) -> QueuedJob | None:
        row = self.conn.execute(f"{_QUEUED} WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _queued(row, self.files)

    @guarded
    def pending(self, after: int = 0, limit: int = 10000) -> list[QueuedJob]:
        """Jobs without a result, in id order, from id ``after`` + 1."""
        return [_queued(row, self.files) for row in self.conn.execute(
            f"{_QUEUED} WHERE id > ? AND NOT EXISTS (SELECT 1 FROM results WHERE job = jobs.id)"
            " ORDER BY id LIMIT ?", (after, limit))]  # fmt: skip

    @guarded
    def count_pending(self, after: int = 0) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM jobs WHERE id > ?"
            " AND NOT EXISTS (SELECT 1 FROM results WHERE job = jobs.id)",
            (after,),
        ).fetchone()[0]

    @guarded
    def session_results(self, session: str, seqs: Sequence[int]) -> list[StoredResult]:
        """This session's finished jobs among seqs."""
        out: list[StoredResult] = []
        for chunk in chunks(list(seqs)):
            out += (StoredResult(seq, st, self.files.get(v), err, tb, jid) for seq, st, v, err, tb, jid in self.conn.execute(
                "SELECT j.seq, r.status, r.value, r.error, r.traceback, j.id FROM jobs j"
                " JOIN results r ON r.job = j.id"
                f" WHERE j.session = ? AND j.seq IN ({','.join('?' * len(chunk))})",
                (session, *chunk)))  # fmt: skip
        return out

    @guarded
    def output(self, session: str, seq: int, job: int | None = None) -> tuple[int, Optional[str], Optional[str]] | None:
        """A finished job's (status, stdout, stderr), by its id, else by its client's seq;
        None while it has no result."""
        if job is not None:
            return self.conn.execute(
                "SELECT status, coalesce(stdout, ''), coalesce(stderr, '') FROM results WHERE job = ?", (job,)
            ).fetchone()
        return self.conn.execute(  # its own job's, or the job's whose result answered it (a re-run)
            "SELECT r.status, coalesce(r.stdout, ''), coalesce(r.stderr, '') FROM jobs j"
            " JOIN results r ON r.job = j.id WHERE j.session = ? AND j.seq = ? UNION ALL"
            " SELECT r.status, coalesce(r.stdout, ''), coalesce(r.stderr, '') FROM aliases a"
            " JOIN results r ON r.job = a.job WHERE a.session = ? AND a.seq = ? LIMIT 1",
            (session, seq, session, seq),
        ).fetchone()

    @guarded
    def session(self, sid: str) -> SessionRecord | None:
        row = self.conn.execute("SELECT run, context FROM sessions WHERE id = ?", (sid,)).fetchone()
        return None if row is None else SessionRecord(row[0], json_column(row[1]) or {})
