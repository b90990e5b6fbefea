"""The store's graph verbs: a job's inputs, scattered data, answers from other jobs' results.

Part of :class:`cw.store.Store` (a mixin over its connection and its
transaction); their tables are in :mod:`cw.store.schema`.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any, Callable, Iterable, Sequence

from .sqlite import chunks, guarded


class GraphVerbs:
    """The graph's verbs of the store (mixed into Store: uses its ``conn`` and ``_begin``)."""

    conn: sqlite3.Connection
    path: Any
    _begin: Callable[[], None]  #: Store's: the turn's transaction
    files: Any  #: Store's BlobFiles: large values live there

    @guarded
    def add_graph(self, deps: Sequence[tuple[int, int, int]], uses: Sequence[tuple[int, str]]) -> None:
        """Edges of the graph: (job, pos, input job) rows, and (job, scattered data hash) rows."""
        self._begin()
        if deps:
            self.conn.executemany("INSERT OR IGNORE INTO deps (job, pos, input) VALUES (?,?,?)", deps)
        if uses:
            self.conn.executemany("INSERT INTO uses (job, ref) VALUES (?,?)", uses)

    @guarded
    def add_refs(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Scattered data, by hash: each distinct blob once."""
        self._begin()
        now = time.time()
        self.conn.executemany("INSERT OR IGNORE INTO refs (hash, blob, created) VALUES (?, ?, ?)",
                              [(h, b, now) for h, b in items])  # fmt: skip

    @guarded
    def add_aliases(self, rows: Sequence[tuple[str, int, int]]) -> None:
        """(session, seq, job): a submission answered by that job's stored result."""
        self._begin()
        self.conn.executemany("INSERT OR REPLACE INTO aliases (session, seq, job) VALUES (?,?,?)", rows)

    @guarded
    def ref(self, ref_hash: str) -> bytes | None:
        row = self.conn.execute("SELECT blob FROM refs WHERE hash = ?", (ref_hash,)).fetchone()
        return row[0] if row else None

    @guarded
    def resolve(self, session: str, seqs: Sequence[int]) -> dict[int, int]:
        """seq -> job id of this session's submissions: its own jobs, or the stored
        results that answered them (aliases)."""
        out = {}
        for seq in seqs:
            row = self.conn.execute(
                "SELECT id FROM jobs WHERE session = ? AND seq = ? UNION ALL"
                " SELECT job FROM aliases WHERE session = ? AND seq = ? LIMIT 1", (session, seq, session, seq)
            ).fetchone()  # fmt: skip
            if row:
                out[seq] = row[0]
        return out

    @guarded
    def outcomes(self, job_ids: Sequence[int]) -> dict[int, tuple]:
        """job id -> (status, value, error, traceback, session, seq) of those that have a result."""
        out: dict[int, tuple] = {}
        for chunk in chunks(list(set(job_ids))):
            for row in self.conn.execute(
                "SELECT r.job, r.status, r.value, r.error, r.traceback, j.session, j.seq FROM results r"
                f" JOIN jobs j ON j.id = r.job WHERE r.job IN ({','.join('?' * len(chunk))})", chunk
            ):  # fmt: skip
                out[row[0]] = (row[1], self.files.get(row[2]), *row[3:])
        return out

    @guarded
    def statuses(self, job_ids: Sequence[int]) -> dict[int, int]:
        """job id -> result status, for those of these jobs that have a result."""
        out: dict[int, int] = {}
        for chunk in chunks(list(set(job_ids))):
            out.update(self.conn.execute(
                f"SELECT job, status FROM results WHERE job IN ({','.join('?' * len(chunk))})", chunk))  # fmt: skip
        return out

    @guarded
    def graph_of(self, job_ids: Sequence[int]) -> tuple[dict[int, list[int]], dict[int, list[str]]]:
        """The stored edges of these jobs: (job -> input job ids by position, job -> scattered data hashes)."""
        inputs: dict[int, list[int]] = {}
        uses: dict[int, list[str]] = {}
        for chunk in chunks(list(job_ids)):
            marks = ",".join("?" * len(chunk))
            for job, _, inp in self.conn.execute(
                    f"SELECT job, pos, input FROM deps WHERE job IN ({marks}) ORDER BY job, pos", chunk):  # fmt: skip
                inputs.setdefault(job, []).append(inp)
            for job, ref in self.conn.execute(f"SELECT job, ref FROM uses WHERE job IN ({marks})", chunk):
                uses.setdefault(job, []).append(ref)
        return inputs, uses

    @guarded
    def alias_results(self, session: str, seqs: Sequence[int]) -> list[tuple]:
        """(seq, status, value, error, traceback, job) of this session's submissions answered
        by another job's result (a re-run, or one attached to a job of the same key)."""
        out: list[tuple] = []
        for chunk in chunks(list(seqs)):
            out += ((seq, st, self.files.get(v), err, tb, job) for seq, st, v, err, tb, job in self.conn.execute(
                "SELECT a.seq, r.status, r.value, r.error, r.traceback, a.job FROM aliases a JOIN results r"
                f" ON r.job = a.job WHERE a.session = ? AND a.seq IN ({','.join('?' * len(chunk))})",
                (session, *chunk)))  # fmt: skip
        return out
