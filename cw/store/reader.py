"""The store, read-only: what `cw status`, `cw results`, `cw logs`, `cw top`, `cw dashboard`
and `cw store check` see.

Safe beside a live master (WAL readers do not block its writes), and without one.
Reads an older store as it is (what it lacks reads as empty) and refuses a newer one.
"""

from __future__ import annotations

import json
import pickle
import sqlite3
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..protocol import CANCELLED, OK, RAISED, STATUS_NAMES
from .blobs import resolve
from .schema import check_readable
from .sqlite import connect, guarded

_FAILED = f"r.status NOT IN ({OK}, {CANCELLED})"  # not done, not cancelled


def integrity(path: str | Path, quick: bool = False) -> list[str]:
    """SQLite's own check of a store file: ``["ok"]``, or what is wrong (one line each).

    Opens the file read-only: a damaged store is looked at, never changed.
    """
    if not Path(path).exists():
        raise StoreError(f"no store at {path}")
    try:
        conn = connect(path, readonly=True)
        try:
            pragma = "quick_check" if quick else "integrity_check"
            return [str(r[0]) for r in conn.execute(f"PRAGMA {pragma}(100)")]
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:  # not even a database: that is the answer
        return [str(e)]


class StoreReader:
    """The store, read-only: plain dicts out, StoreError on failure."""

    @guarded
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"no store at {self.path}")
        self.conn = connect(self.path, readonly=True)
        self.version = check_readable(self.conn, self.path)
        self._v2 = self.version >= 2  # output, timings and attempts exist from schema 2 on
        self.has_files = self.version >= 4  # archived outputs, from schema 4 on

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _rows(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur]

    @guarded
    def summary(self) -> dict[str, Any]:
        """Jobs by run and state, and the workers that ever joined."""
        runs: dict[str, dict[str, int]] = {}
        for run, status, n in self.conn.execute(
            "SELECT j.run, r.status, count(*) FROM jobs j LEFT JOIN results r ON r.job = j.id"
            " GROUP BY j.run, r.status"
        ):
            name = "pending" if status is None else STATUS_NAMES.get(status, str(status))
            runs.setdefault(run or "", {})[name] = n
        workers = self._rows("SELECT id, host, pid, joined, left, reason FROM workers")
        return {"runs": runs, "workers": workers}

    @guarded
    def runs(self) -> list[dict[str, Any]]:
        """Each run: jobs in all, pending, done, failed, cancelled, first submit and last finish."""
        return self._rows(
            "SELECT coalesce(j.run, '') AS run, count(*) AS jobs, count(*) - count(r.job) AS pending,"
            f" sum(r.status = {OK}) AS done, sum({_FAILED.replace('r.status', 'coalesce(r.status, 0)')})"
            f" AS failed, sum(r.status = {CANCELLED}) AS cancelled, min(j.submitted) AS submitted,"
            " max(r.finished) AS finished FROM jobs j LEFT JOIN results r ON r.job = j.id"
            " GROUP BY coalesce(j.run, '') ORDER BY min(j.id)"
        )

    def _where_run(self, run: str | None) -> tuple[str, list]:
        return ("(j.run IS NULL OR j.run = '')", []) if not run else ("j.run = ?", [run])

    def _blob(self, value: bytes | None) -> bytes | None:
        """A value or arguments, read from its file beside the store if it lives there; a
        file that cannot be read leaves the reference (shown as what cannot be unpickled)."""
        try:
            return resolve(self.path, value)
        except StoreError:
            return value

    @guarded
    def results(self, run: str | None, failed: bool = False) -> list[dict[str, Any]]:
        """Finished jobs of a run (None: jobs submitted without one), in id order:
        job, seq, run, key, status, value (its repr, for a success), error, worker, the
        timings: waited (queued to started), runtime, started and finished (epoch seconds),
        and outputs (how many files the job archived)."""
        where, params = self._where_run(run)
        timing = ("coalesce(r.queued, j.submitted), coalesce(r.started, r.finished - r.runtime)" if self._v2
                  else "j.submitted, r.finished - r.runtime")  # fmt: skip
        files = "(SELECT count(*) FROM outputs o WHERE o.job = j.id)" if self.has_files else "0"
        sql = (f"SELECT j.id, j.seq, j.run, j.key, r.status, r.value, r.error, r.worker, r.runtime, {timing},"
               f" r.finished, {files} FROM jobs j JOIN results r ON r.job = j.id WHERE {where}"
               + (f" AND {_FAILED}" if failed else "") + " ORDER BY j.id")  # fmt: skip
        out = []
        for jid, seq, r, key, status, value, error, worker, runtime, queued, started, finished, n in \
                self.conn.execute(sql, params):  # fmt: skip
            value = self._blob(value)
            out.append({
                "job": jid, "seq": seq, "run": r, "key": key, "status": STATUS_NAMES.get(status, str(status)),
                "value": _value_text(value) if status == OK else None, "error": error, "worker": worker,
                "waited": None if started is None or queued is None else round(max(0.0, started - queued), 6),
                "runtime": None if runtime is None else round(runtime, 6),
                "started": started, "finished": finished, "outputs": n,
                "exit": _exit_code(status, value), "host": (worker or "").split(":")[0] or None,
            })  # fmt: skip
        return out

    @guarded
    def key_states(self, run: str) -> dict[str, str]:
        """The state of each key of a run: done if one of its jobs succeeded, else the
        state of its latest job (pending, error, timeout...)."""
        out: dict[str, str] = {}
        for key, status in self.conn.execute(
            "SELECT j.key, r.status FROM jobs j LEFT JOIN results r ON r.job = j.id"
            " WHERE j.run = ? AND j.key IS NOT NULL ORDER BY j.id", (run,)):  # fmt: skip
            if out.get(key) != "done":
                out[key] = "pending" if status is None else STATUS_NAMES.get(status, str(status))
        return out

    @guarded
    def outputs(self, run: str | None, which: str | None = None, failed: bool = False,
                after: float | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """Finished jobs' own output (stdout, stderr) in a run, in the order they finished.

        ``which``: a job's key, or its id; ``failed``: only jobs that did not
        succeed; ``after``: only jobs finished since then (epoch seconds).
        """
        if not self._v2:
            return []
        where, params = self._where_run(run)
        if which is not None:
            where += " AND (j.key = ?" + (" OR j.id = ?)" if which.isdigit() else ")")
            params += [which] + ([int(which)] if which.isdigit() else [])
        if failed:
            where += f" AND {_FAILED}"
        if after is not None:
            where += " AND r.finished >= ?"
            params.append(after)
        rows = self._rows(
            "SELECT j.id AS job, j.seq, j.run, j.key, r.status, r.error, r.worker, r.finished,"
            " coalesce(r.stdout, '') AS stdout, coalesce(r.stderr, '') AS stderr FROM jobs j"
            f" JOIN results r ON r.job = j.id WHERE {where} ORDER BY r.finished, j.id", params)  # fmt: skip
        for row in rows:
            row["status"] = STATUS_NAMES.get(row["status"], str(row["status"]))
        return rows

    @guarded
    def failures(self, limit: int = 20, run: str | None = None, tail: int = 0) -> list[dict[str, Any]]:
        """The latest jobs that did not succeed, newest first, with their traceback, and
        with ``tail`` > 0 the last ``tail`` characters of their stdout and stderr."""
        where, params = ("", []) if run is None else ("AND " + self._where_run(run)[0], self._where_run(run)[1])
        out = ""
        if tail and self._v2:
            out = ", substr(coalesce(r.stdout, ''), -?) AS stdout, substr(coalesce(r.stderr, ''), -?) AS stderr"
            params = [tail, tail] + params
        rows = self._rows(
            "SELECT j.id AS job, j.run, j.key, r.status, r.error, r.traceback, r.worker, r.finished"
            f"{out} FROM results r JOIN jobs j ON j.id = r.job WHERE {_FAILED} {where}"
            " ORDER BY r.finished DESC LIMIT ?", params + [limit])  # fmt: skip
        for row in rows:
            row["status"] = STATUS_NAMES.get(row["status"], str(row["status"]))
        return rows

    @guarded
    def job(self, jid: int) -> dict[str, Any] | None:
        """One job: its function, a summary of its arguments, its attempts with their
        worker and timings, its result, stdout and stderr. None if there is no such job."""
        rows = self._rows(
            "SELECT j.id AS job, j.seq, j.run, j.key, j.fn, f.blob AS fn_blob, j.args, j.requires,"
            " j.timeout, j.max_retries, j.submitted, s.context FROM jobs j"
            " LEFT JOIN functions f ON f.hash = j.fn LEFT JOIN sessions s ON s.id = j.session"
            " WHERE j.id = ?", (jid,))  # fmt: skip
        if not rows:
            return None
        job = rows[0]
        job["function"] = _function_name(job.pop("fn_blob"))
        job["arguments"] = _args_summary(self._blob(job.pop("args")))
        job["requires"] = json.loads(job["requires"]) if job["requires"] else None
        job["cwd"] = (json.loads(job.pop("context") or "{}") or {}).get("cwd")
        attempts = []
        if self._v2:
            attempts = self._rows(
                "SELECT worker, queued, started, ended, status, error, coalesce(stdout, '') AS stdout,"
                " coalesce(stderr, '') AS stderr FROM attempts WHERE job = ? ORDER BY rowid", (jid,))  # fmt: skip
        timing = ("r.queued, coalesce(r.started, r.finished - r.runtime) AS started,"
                  " coalesce(r.stdout, '') AS stdout, coalesce(r.stderr, '') AS stderr" if self._v2 else
                  "NULL AS queued, r.finished - r.runtime AS started, '' AS stdout, '' AS stderr")  # fmt: skip
        result = self._rows(
            f"SELECT r.worker, {timing}, r.finished AS ended, r.runtime, r.status, r.error, r.traceback,"
            " r.value FROM results r WHERE r.job = ?", (jid,))  # fmt: skip
        for r in result:
            r["value"] = _value_text(self._blob(r["value"])) if r["status"] == OK else None
        prev_end = None
        for a in attempts + result:
            a["status"] = STATUS_NAMES.get(a["status"], str(a["status"]))
            if a["queued"] is None:  # queued when submitted, or when the attempt before ended
                a["queued"] = job["submitted"] if prev_end is None else prev_end
            prev_end = a["ended"]
        job["attempts"] = attempts + result
        job["result"] = result[0] if result else None
        return job

    @guarded
    def files(self, run: str | None, key: str | None = None) -> list[dict[str, Any]]:
        """The files a run's jobs archived (of one job, by its key), in job order:
        job, key, dir (relative to the cluster directory), name, size, sha256."""
        if not self.has_files:
            return []
        where, params = self._where_run(run)
        if key is not None:
            where += " AND j.key = ?"
            params.append(key)
        sql = ("SELECT j.id, j.key, o.dir, o.name, o.size, o.sha256 FROM outputs o JOIN jobs j ON j.id = o.job"
               f" WHERE {where} ORDER BY j.id, o.name")  # fmt: skip
        cols = ("job", "key", "dir", "name", "size", "sha256")
        return [dict(zip(cols, row)) for row in self.conn.execute(sql, params)]


def _exit_code(status: int, value: bytes | None) -> int | None:
    """The exit code of a shell-command job (its CompletedCommand, or its CommandError), else None."""
    if not value or status not in (OK, RAISED):
        return None
    try:
        obj = pickle.loads(value)
    except Exception:
        return None
    code = getattr(obj, "returncode", None)
    return code if isinstance(code, int) else None


def _value_text(value: bytes | None, limit: int = 2000) -> str | None:
    """repr() of a stored value, if it unpickles here (its classes may live elsewhere)."""
    if value is None:
        return None
    try:
        text = repr(pickle.loads(value))
    except Exception as e:
        return f"<cannot unpickle here: {e!r}>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _function_name(blob: bytes | None) -> str | None:
    """The function's qualified name, from its blob's first field (nothing is unpickled but a string)."""
    if not blob:
        return None
    try:
        return str(pickle.loads(blob)[0])
    except Exception:
        return None


def _args_summary(blob: bytes | None) -> str:
    """The arguments' repr, shortened, if they unpickle here; else their size."""
    if blob is None:
        return ""
    try:
        import cloudpickle  # noqa: F401 - arguments may hold by-value classes

        args, kwargs = pickle.loads(blob)
        parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        text = "(" + ", ".join(parts) + ")"
    except Exception:
        return f"<{len(blob)} bytes>"
    return text if len(text) <= 500 else text[:500] + f"... ({len(blob)} bytes pickled)"
