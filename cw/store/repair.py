"""`cw store recover`: a damaged store rebuilt from what can still be read.

The damaged file is never changed: recovery reads a copy of it (with its
write-ahead log), writes a new store beside it, and only then swaps them,
keeping the damaged one as ``cw.sqlite.damaged-<time>``. It takes SQLite's own
path first, the ``.recover`` command of the ``sqlite3`` shell; where that
shell is missing or cannot recover (Debian 12's is built without the
``sqlite_dbpage`` table ``.recover`` needs), cw copies every row it can read,
table by table, skipping the ranges SQLite refuses to read.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from .. import defaults
from ..errors import StoreError
from .reader import integrity
from .schema import SCHEMA, SCHEMA_VERSION

#: Our tables, and the column each is ordered by (its rowid). A recovered store keeps its
#: jobs and their ids, so it keeps its epoch too (meta; a store older than the epoch has none).
TABLES = (("functions", "rowid"), ("sessions", "rowid"), ("jobs", "id"), ("results", "job"),
          ("attempts", "rowid"), ("workers", "rowid"), ("meta", "rowid"), ("outputs", "rowid"), ("deps", "rowid"),
          ("refs", "rowid"), ("uses", "rowid"), ("aliases", "rowid"))  # fmt: skip


class Recovery(NamedTuple):
    """What `cw store recover` did."""

    store: Path  #: the new store, in the damaged one's place
    damaged: Path  #: where the damaged file was kept
    method: str  #: "sqlite3 .recover", or cw's row copy and why SQLite's path was not taken
    rows: dict  #: table -> rows in the new store


def recover(path: str | Path) -> Recovery:
    """Rebuild a damaged store in place (no master may be running on it)."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no store at {path}")
    tmp = Path(tempfile.mkdtemp(prefix=".cw-recover-", dir=path.parent))
    try:
        copy = tmp / "damaged.sqlite"
        shutil.copyfile(path, copy)
        if Path(f"{path}-wal").exists():
            shutil.copyfile(f"{path}-wal", f"{copy}-wal")
        out = tmp / "recovered.sqlite"
        why = _shell_recover(copy, out)
        method = "sqlite3 .recover"
        if why is not None:
            out.unlink(missing_ok=True)
            _copy_rows(copy, out)
            method = f"cw's row copy ({why})"
        rows = _finish(out)
        kept = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, kept)
        for suffix in ("-wal", "-shm"):
            side = Path(f"{path}{suffix}")
            if side.exists():
                os.replace(side, f"{kept}{suffix}")
        os.replace(out, path)
        return Recovery(path, kept, method, rows)
    except (OSError, sqlite3.Error, subprocess.SubprocessError) as e:
        raise StoreError(f"cannot recover the store {path}: {e}; the damaged file is unchanged") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _shell_recover(src: Path, out: Path) -> str | None:
    """SQLite's own recovery into ``out``; None if it worked, else why not."""
    shell = shutil.which("sqlite3")
    if shell is None:
        return "no sqlite3 shell on PATH"
    with subprocess.Popen([shell, str(src), ".recover"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as dump:  # fmt: skip
        load = subprocess.run([shell, str(out)], stdin=dump.stdout, capture_output=True,
                              timeout=defaults.RECOVER_TIMEOUT)  # fmt: skip
        dump.stdout.close()
        err = dump.stderr.read().decode(errors="replace").strip()
        dump.wait(defaults.RECOVER_TIMEOUT)
    if dump.returncode or load.returncode or err:
        return f"sqlite3 .recover failed: {err or load.stderr.decode(errors='replace').strip()}"
    conn = sqlite3.connect(str(out))
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        conn.close()
    first = ("functions", "sessions", "jobs", "results", "workers")  # the others came with later schemas
    missing = [t for t, _ in TABLES if t not in names and t in first]
    return f"sqlite3 .recover rebuilt no table {', '.join(missing)}" if missing else None


def _copy_rows(src: Path, out: Path) -> None:
    """Every row SQLite can still read, table by table, in rowid order.

    A damaged page makes a range of rows unreadable: the copy probes further
    and further past it (1, 2, 4... rows on) until it reads again.
    """
    old = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    new = sqlite3.connect(str(out), isolation_level=None)
    try:
        new.executescript(f"BEGIN; {SCHEMA} COMMIT;")
        new.execute("BEGIN")
        for table, key in TABLES:
            try:
                cols = [r[1] for r in old.execute(f"PRAGMA table_info({table})")]
            except sqlite3.DatabaseError:
                continue  # the schema itself is unreadable: nothing of this table
            if not cols:
                continue  # a table an older schema did not have
            insert = f"INSERT OR IGNORE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            select = f"SELECT {key}, {', '.join(cols)} FROM {table} WHERE {key} > ? ORDER BY {key}"
            last, step = -(2**63), 1
            while step < 2**62:
                try:
                    for row in old.execute(select, (last,)):
                        new.execute(insert, row[1:])
                        last, step = row[0], 1
                    break
                except sqlite3.DatabaseError:
                    last, step = (last if last > -(2**62) else 0) + step, step * 2
        new.execute("COMMIT")
    finally:
        old.close()
        new.close()


def _finish(out: Path) -> dict:
    """The recovered store as the master wants it (schema version set, checked);
    how many rows each table holds."""
    conn = sqlite3.connect(str(out), isolation_level=None)
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        rows = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t, _ in TABLES if t in names}
    finally:
        conn.close()
    problems = integrity(out)
    if problems != ["ok"]:
        raise sqlite3.DatabaseError(f"the rebuilt store does not check out: {'; '.join(problems[:3])}")
    return rows
