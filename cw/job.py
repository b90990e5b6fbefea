"""What a running job has of its own on its worker: a scratch directory and an outputs
directory, and the archive its outputs are copied to.

Each worker has a directory on its node's local disk (``<root>/cw-<uid>/<worker>``,
see :class:`WorkerDir`), locked for as long as the worker lives: a worker
that starts wipes the directories of dead ones (a ``kill -9`` leaves its
directory behind). A job's scratch and outputs live under it, in
``<job id>/``, made on first use (a job that uses neither costs nothing)
and wiped when the job ends, whatever its end.

Files put in :func:`outputs` (and those a shell job declares) are copied
after the job into the cluster directory, under
``outputs/<run>/<job key>/<job id>/`` (two jobs of a run may share a key);
the copy is checked (size, SHA-256) and the
records travel with the result to the store. A job whose outputs cannot be
archived fails with that error.

The executor drives this module (:func:`begin`, :func:`end`); a job calls
:func:`scratch` and :func:`outputs`. Serial clients use it too, on a
temporary directory.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

from .errors import OutputsError, OutputsPatternError

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[A-Za-z0-9._-]{1,80}")
_LOCK = ".lock"

# this process's state: set by the worker for its executors (configure), per job (begin)
_dir: Optional[Path] = None  # the worker's directory: jobs' scratch and outputs go under it
_archive: Optional[Path] = None  # <cluster directory>/outputs
_run: Optional[str] = None
_jid: Optional[int] = None
_key: Optional[str] = None
_used = False  # scratch() or outputs() was called by the current job
_extra: list[tuple[Path, str]] = []  # files a shell job declared: (where, name in the archive)
#: This process is a worker's executor (a job's output is captured there), not a serial client.
on_a_worker = False


def slug(text: Optional[str], fallback: str) -> str:
    """A directory name for a run or a key: itself when it is a safe name, else a
    readable part and a hash (two keys never share a directory)."""
    if text is None or text == "":
        return fallback
    if _SAFE.fullmatch(text) and text not in (".", ".."):
        return text
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:40]
    return f"{readable or 'key'}-{hashlib.blake2b(text.encode(), digest_size=6).hexdigest()}"


def archive_dir(run: Optional[str], key: Optional[str], jid: int) -> str:
    """Where a job's outputs are archived, relative to the cluster directory: under its run
    and key, in a directory of the job's own (the same key may name two jobs)."""
    return f"outputs/{slug(run, '_')}/{slug(key, 'job')}/{jid}"


def check_globs(globs: Iterable[str]) -> list[str]:
    """Output globs, refused when one could match outside the directory the job runs in
    (an absolute pattern, or a ``..`` part): their files are archived by that path."""
    out = []
    for g in globs:
        if not isinstance(g, str) or not g:
            raise OutputsPatternError(f"an outputs pattern is a non-empty glob string, not {g!r}")
        if os.path.isabs(g) or g.startswith("~"):
            raise OutputsPatternError(f"outputs pattern {g!r} is absolute: outputs are globs relative to the"
                                      " directory the job runs in (copy other files into it, or into $CW_OUTPUTS)")
        if ".." in g.split("/"):
            raise OutputsPatternError(f"outputs pattern {g!r} climbs out of the job's directory with '..':"
                                      " outputs are globs below the directory the job runs in")
        out.append(g)
    return out


def inside(path: Path, root: Path) -> bool:
    """Whether ``path``, resolved (symbolic links and ``..``), is ``root`` or below it."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def configure(worker_dir: Optional[Path], archive: Optional[Path], on_worker: bool = False) -> None:
    """Set by the worker before it forks its executors: where jobs' files go."""
    global _dir, _archive, on_a_worker
    _dir, _archive, on_a_worker = worker_dir, archive, on_worker


def enter_run(run: Optional[str]) -> None:
    """The run of the client context an executor serves."""
    global _run
    _run = run


def begin(jid: int, key: Optional[str]) -> None:
    """A job starts in this process (three assignments: the common job uses nothing)."""
    global _jid, _key
    _jid, _key = jid, key


def running() -> bool:
    """Whether a job is running in this process (its scratch and outputs can be had)."""
    return _jid is not None


def worker_dir() -> Optional[Path]:
    return _dir


def _home() -> Path:
    global _dir
    if _jid is None:
        raise OutputsError("cw.scratch() and cw.outputs() are for a job, while it runs")
    if _dir is None:  # a serial client: a directory of its own, wiped with the process
        _dir = Path(tempfile.mkdtemp(prefix="cw-serial-"))
        atexit.register(shutil.rmtree, _dir, True)
    return _dir / str(_jid)


def scratch() -> Path:
    """This job's private scratch directory on the worker's local disk: empty when the
    job starts, wiped when it ends (success, failure, timeout, cancel, a killed worker)."""
    return _made("scratch")


def outputs() -> Path:
    """This job's outputs directory: what the job puts here is copied, after the job, to
    the cluster directory under its run and key, and recorded in the store (``cw pull``)."""
    return _made("outputs")


def _made(name: str) -> Path:
    """A directory of this job's, made on first use (the job's directory is then wiped after it)."""
    global _used
    p = _home() / name
    if not _used or not p.is_dir():
        p.mkdir(parents=True, exist_ok=True)
        _used = True
    return p


def declare(paths: Iterable[Path], base: Path) -> None:
    """Files a shell job's output globs matched: archived with the outputs directory."""
    global _used
    for p in paths:
        try:
            name = p.relative_to(base).as_posix()
        except ValueError:
            name = p.name
        _extra.append((p, name))
    _used = True


def end() -> Optional[tuple[str, list[tuple[str, int, str]]]]:
    """The job is over: archive its outputs, wipe its directory. Where they were archived
    (relative to the cluster directory) and what ((name, size, sha256) rows), or None
    if the job archived nothing.

    Raises :class:`OutputsError` when the outputs cannot be archived; the
    directory is wiped all the same.
    """
    global _used, _jid
    if not _used:
        _jid = None
        return None
    home = _home()
    try:
        files = _collect(home / "outputs", _extra)
        if not files:
            return None
        if _archive is None:
            raise OutputsError("this worker has no cluster directory to archive outputs to")
        where = archive_dir(_run, _key, _jid)
        return where, archive(files, _archive.parent / where)
    finally:
        _used, _jid = False, None
        _extra.clear()
        shutil.rmtree(home, ignore_errors=True)


def _collect(out: Path, extra: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    files: list[tuple[Path, str]] = []
    if out.is_dir():
        files += [(p, p.relative_to(out).as_posix()) for p in sorted(out.rglob("*")) if p.is_file()]
    for p, name in extra:
        if p.is_dir():
            files += [(q, f"{name}/{q.relative_to(p).as_posix()}") for q in sorted(p.rglob("*")) if q.is_file()]
        elif p.is_file():
            files.append((p, name))
    return files


def archive(files: list[tuple[Path, str]], dest: Path) -> list[tuple[str, int, str]]:
    """Copy files into ``dest`` (replacing what an earlier attempt left there) and check
    each copy; (name, size, sha256) of each. OutputsError says what failed and where."""
    part = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    records = []
    try:
        shutil.rmtree(part, ignore_errors=True)
        for src, name in files:
            target = part / name
            if not inside(target, part) or name in ("", ".", ".."):
                raise OutputsError(f"cannot archive {src} as {name!r}: that name is outside the job's"
                                   f" archive {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            size, digest = _copy(src, target)
            if target.stat().st_size != size:
                raise OSError(errno.EIO, f"the copy of {name} is {target.stat().st_size} bytes, not {size}")
            records.append((name, size, digest))
        if dest.exists():
            old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        part.rename(dest)
    except OutputsError:
        shutil.rmtree(part, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(part, ignore_errors=True)
        raise OutputsError(f"cannot archive the job's outputs to {dest}: {e.strerror or e}"
                           f"{f' ({e.filename})' if e.filename else ''}") from e  # fmt: skip
    return records


def _copy(src: Path, dst: Path) -> tuple[int, str]:
    """Copy a file, hashing what is read: (bytes, sha256)."""
    h, n = hashlib.sha256(), 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            chunk = fi.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            fo.write(chunk)
            n += len(chunk)
        fo.flush()
        os.fsync(fo.fileno())  # on the shared filesystem before the store says it is there
    shutil.copymode(src, dst)
    return n, h.hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wipe(path: Path) -> None:
    """Remove a directory in the background (renamed away at once: a job dir can be large)."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{time.monotonic_ns()}")
    try:
        path.rename(trash)
    except OSError:
        trash = path
    threading.Thread(target=shutil.rmtree, args=(trash, True), name="cw-wipe", daemon=True).start()


class WorkerDir:
    """A worker's directory on the node's local disk, locked while the worker lives.

    ``<root>/cw-<uid>/<worker>``, beside its lock ``<worker>.lock`` (the
    per-user parent is private, 0700). The lock is taken before the directory
    is made (under a temporary name, then renamed), so that another worker
    never takes a live one for dead. Made, it wipes what dead workers left
    beside it: a directory whose lock nobody holds.
    """

    def __init__(self, root: str | os.PathLike | None, worker: str):
        base = Path(root or tempfile.gettempdir()) / f"cw-{os.getuid()}"
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        if base.stat().st_uid != os.getuid() or base.stat().st_mode & 0o077:
            raise OutputsError(f"{base} must be yours and private to hold jobs' scratch: chmod 700 {base}")
        name = slug(worker, "worker")
        self.path = base / name
        self.lock_path = base / f"{name}{_LOCK}"
        tmp = base / f".{name}{_LOCK}.{os.getpid()}"
        self._lock = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        os.replace(tmp, self.lock_path)  # seen by others only once it is held
        self.path.mkdir(exist_ok=True)
        self.wiped = self._wipe_dead(base)

    @property
    def lock_fd(self) -> int:
        """The lock's descriptor: the worker's agent alone holds it (its executors close it,
        so that a killed agent's directory is free to wipe even while they are dying)."""
        return self._lock

    def _wipe_dead(self, base: Path) -> list[Path]:
        wiped = []
        for lock in base.glob(f"*{_LOCK}"):
            if lock == self.lock_path:
                continue
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue  # wiped by another worker meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # a live worker holds it
                continue
            d = lock.with_name(lock.name[: -len(_LOCK)])
            shutil.rmtree(d, ignore_errors=True)
            try:
                lock.unlink()
            except OSError:
                pass
            os.close(fd)
            wiped.append(d)
        if wiped:
            log.info("wiped the scratch that %d ended workers left in %s", len(wiped), base)
        return wiped

    def job(self, jid: int) -> Path:
        return self.path / str(jid)

    def close(self) -> None:
        """Wipe it all, then let go of the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            self.lock_path.unlink()
        except OSError:
            pass
        try:
            os.close(self._lock)
        except OSError:
            pass
