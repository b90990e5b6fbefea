"""The SQLite connection under the store: how it is opened, its errors, its checkpoints.

Shared by :class:`cw.store.Store` (the master's writer) and
:class:`cw.store.reader.StoreReader`; sqlite3's exceptions stop here and leave
as :class:`cw.errors.StoreError`.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from ..errors import StoreConflict, StoreError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def guarded(method: F) -> F:
    """sqlite3's exceptions become cw's: a broken rule is a conflict, anything else a store failure."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.IntegrityError as e:
            raise StoreConflict(f"store {self.path}: {e}") from e
        except (sqlite3.Error, OSError) as e:
            raise StoreError.describe(self.path, e) from e

    return call  # type: ignore[return-value]


def json_column(text: str | None) -> Any:
    """A JSON column: undecodable text is a damaged store."""
    try:
        return json.loads(text) if text else None
    except ValueError as e:
        raise sqlite3.DatabaseError(f"database disk image is malformed (bad JSON: {e})") from None


def file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def connect(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def chunks(items: Sequence, n: int = 500) -> Iterator[Sequence]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class Checkpointer(threading.Thread):
    """Copies the write-ahead log into the database, off the master's thread."""

    EVERY = 1.0  # seconds between looks at the log
    BYTES = 32 * 1024 * 1024  # checkpoint once the log is this large

    def __init__(self, path: Path, before: Callable[[], None] = lambda: None):
        super().__init__(name="cw-checkpoint", daemon=True)
        self.path, self.wal, self.before = path, Path(f"{path}-wal"), before
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        conn = connect(self.path)
        try:
            while not self._halt.wait(self.EVERY):
                try:
                    if self.wal.stat().st_size >= self.BYTES:
                        self.before()  # the files the log's rows name are on disk before it is
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except (OSError, sqlite3.Error) as e:
                    log.debug("checkpoint skipped: %s", e)
        finally:
            conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
