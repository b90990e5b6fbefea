"""The store, read-only: what `cw status`, `cw results` and `cw store check` see.

Safe beside a live master (WAL readers do not block its writes), and without one.
"""

from __future__ import annotations

import pickle
import sqlite3
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..protocol import OK, STATUS_NAMES
from .sqlite import connect, guarded


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
    """The store, read-only: what `cw status` and `cw results` show without a master.

    Safe beside a live master (WAL readers do not block its writes).
    """

    @guarded
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"no store at {self.path}")
        self.conn = connect(self.path, readonly=True)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

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
        workers = [
            dict(zip(("id", "host", "pid", "joined", "left", "reason"), row))
            for row in self.conn.execute("SELECT id, host, pid, joined, left, reason FROM workers")
        ]
        return {"runs": runs, "workers": workers}

    @guarded
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
