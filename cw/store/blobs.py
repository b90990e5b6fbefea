"""Large arguments and results in files beside the store, not in SQLite's pages.

A job's arguments or a result of at least ``defaults.LARGE_BLOB_BYTES`` goes
to ``<store>.blobs/<job id>.args`` or ``<job id>.value``, and its row holds a
reference instead (``cw:file:<name>:<length>:<sha256>``; a pickle never starts
so); the digest is the one the blob was signed with on the wire, so a master
sends it on from its file without hashing it again.
Writing a megabyte to a file costs a quarter of a millisecond; through SQLite
it cost about one in the master's loop and four more when the write-ahead
log was copied into the database.

The file is written (to a temporary name, then renamed) before the row's
transaction commits, so that, like the row, it survives the death of any
process. Files are fsync'd before each checkpoint of the write-ahead log and
when the store closes: whatever a power loss leaves of the log, the files its
rows name are on disk (docs/store.md). A job id means one job in one store,
so a name is never reused for other content; a retried job's next result
replaces its file.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional

from ..errors import StoreError
from ..protocol import digested

MARK = b"cw:file:"
log = logging.getLogger(__name__)


def folder(store: Path) -> Path:
    """Where the files of the store at this path live."""
    return store.with_name(f"{store.name}.blobs")


def is_ref(value: object) -> bool:
    return isinstance(value, bytes) and value[:8] == MARK


def read(root: Path, ref: bytes) -> bytes:
    """The bytes a reference names, from the folder ``root`` (a Digested, if the digest
    was kept); StoreError if the file is missing or not as long as the reference says."""
    name, size, digest = bytes(ref[len(MARK) :]).decode().rsplit(":", 2)
    path = root / name
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise StoreError(f"the file {path} that holds a stored value cannot be read: {e.strerror}"
                         " (the store's .blobs folder was removed or damaged)", "damaged") from e  # fmt: skip
    if len(data) != int(size):
        raise StoreError(f"the file {path} holds {len(data)} bytes, its row says {size}"
                         " (cut short by a crash of the machine?)", "damaged")  # fmt: skip
    return digested(data, digest) if digest else data


def resolve(store: Path, value: Optional[bytes]) -> Optional[bytes]:
    """A stored value or arguments as bytes: read from its file if the row holds a reference."""
    return read(folder(store), value) if is_ref(value) else value


class BlobFiles:
    """The store's files for large blobs: the master's side, which writes them."""

    def __init__(self, store: Path):
        self.root = folder(store)
        self._unsynced: list[Path] = []
        self._lock = threading.Lock()

    def put(self, name: str, blob: bytes) -> bytes:
        """Write ``blob`` as ``name`` in the folder (replacing an older one); its reference."""
        if not self.root.is_dir():
            self.root.mkdir(mode=0o700, exist_ok=True)
        path = self.root / name
        tmp = path.with_name(f".{name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as e:
            raise StoreError.describe(path, e) from e
        with self._lock:
            self._unsynced.append(path)
        return b"%s%s:%d:%s" % (MARK, name.encode(), len(blob), getattr(blob, "digest", "").encode())

    def get(self, value: Optional[bytes]) -> Optional[bytes]:
        return read(self.root, value) if is_ref(value) else value

    def remove(self, names: list[str]) -> None:
        """Forget these files (no committed row names them any more); a file that stays
        only takes room, so failing to remove it is a warning."""
        for name in names:
            try:
                os.unlink(self.root / name)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot remove %s, which no stored row names: %s", self.root / name, e.strerror)

    def sync(self) -> None:
        """fsync the files written since the last call, and the folder: before a checkpoint."""
        with self._lock:
            paths, self._unsynced = self._unsynced, []
        if not paths:
            return
        try:
            for p in [*paths, self.root]:
                try:
                    fd = os.open(p, os.O_RDONLY)
                except FileNotFoundError:  # replaced since: its successor is in the list
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError:
            with self._lock:  # the next checkpoint tries them again (this one is skipped)
                self._unsynced[:0] = paths
            raise

    def link_into(self, dest: Path) -> None:
        """Give the store copied to ``dest`` the same files (hard links where possible)."""
        if not self.root.is_dir():
            return
        out = folder(dest)
        out.mkdir(mode=0o700, exist_ok=True)
        for p in self.root.iterdir():
            if p.name.startswith("."):
                continue
            try:
                os.link(p, out / p.name)
            except OSError:
                with open(p, "rb") as src, open(out / p.name, "wb") as dst:
                    dst.write(src.read())
