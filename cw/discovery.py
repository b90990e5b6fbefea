"""The cluster directory on the shared filesystem: master.json, the key, the store.

Layout of ``$CW_HOME/<cluster>/`` (default ``~/.cw/default/``)::

    key           the secret (hex), mode 0600, created by the first master
    curve         present: the wire is encrypted (CurveZMQ), written by `cw master --encrypt`
    master.json   address, host, port, pid, start time, version of the live master
    master.lock   held (flock) by the live master
    cw.sqlite     the store

Resolution of the master's address: explicit argument, ``$CW_ADDRESS``,
master.json; a client with none of these starts an embedded local cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any, Iterator

from . import defaults
from .errors import ConfigError
from .version import __version__

log = logging.getLogger(__name__)


class ClusterDir:
    """One cluster's directory; everything a master publishes lives here."""

    def __init__(self, path: str | os.PathLike | None = None, name: str | None = None):
        if path is None:
            path = os.path.join(
                os.path.expanduser(os.environ.get("CW_HOME", defaults.HOME)),
                name or os.environ.get("CW_CLUSTER", defaults.CLUSTER),
            )
        self.path = Path(path).expanduser().absolute()
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"ClusterDir({str(self.path)!r})"

    @property
    def key_path(self) -> Path:
        return self.path / "key"

    @property
    def master_json(self) -> Path:
        return self.path / "master.json"

    @property
    def store_path(self) -> Path:
        return self.path / "cw.sqlite"

    @property
    def curve_path(self) -> Path:
        return self.path / "curve"

    # -- encryption ---------------------------------------------------------------
    def encrypted(self) -> bool:
        """Whether this cluster's wire runs over CurveZMQ: ``$CW_ENCRYPT=1``, or the
        ``curve`` file beside the key (checked first, as the key is)."""
        if os.environ.get("CW_ENCRYPT", "").lower() in ("1", "true", "yes"):
            return True
        if os.environ.get("CW_KEY") and not self.path.exists():
            return False  # a key from the environment, and no cluster directory to read
        self.check()
        return self.curve_path.exists()

    def set_encrypted(self) -> None:
        """Record that this cluster's wire is encrypted: every peer follows, nothing to configure."""
        self.make()
        if not self.curve_path.exists():
            fd = os.open(self.curve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("CurveZMQ: every connection to this cluster's master is encrypted\n")

    # -- the key ----------------------------------------------------------------
    def key(self, create: bool = False) -> bytes:
        """The secret key: ``$CW_KEY`` (hex) if set, else the key file (checked first:
        see :meth:`check`)."""
        env = os.environ.get("CW_KEY")
        if env:
            return _parse_key(env, "$CW_KEY")
        self.check()
        try:
            return _parse_key(self.key_path.read_text(), str(self.key_path))
        except FileNotFoundError:
            if not create:
                raise ConfigError(
                    f"no key at {self.key_path}: start a master on this cluster directory "
                    "first, or set CW_HOME / CW_CLUSTER / CW_KEY to the master's"
                ) from None
        self.make()
        text = secrets.token_hex(32)
        tmp = self.key_path.with_name(f".key.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        try:  # another master may have won the race: keep its key
            os.link(tmp, self.key_path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return self.key(create=False)

    # -- master.json ------------------------------------------------------------
    def make(self) -> None:
        """Create the directory (and a missing ``$CW_HOME``), readable by its owner only,
        whatever the umask: it holds the key and the store (every job's arguments and
        results). An existing one that others may read is made private."""
        private_dir(self.path)
        if not shared():
            mode = self.path.stat().st_mode & 0o777
            if mode & 0o077 and self.path.stat().st_uid == os.getuid():
                os.chmod(self.path, 0o700)
                log.warning("made %s private (mode %o was %o): it holds the key, the store and"
                            " the jobs' output", self.path, 0o700, mode)  # fmt: skip
        self.check()

    def subdir(self, name: str) -> Path:
        """A directory inside the cluster directory (jobs/, logs/), private like it."""
        self.make()
        return private_dir(self.path / name)

    def check(self) -> None:
        """Refuse a cluster directory that someone else could have planted or changed.

        ``$CW_HOME`` and the cluster directory must be the user's own and writable
        by nobody else (a sticky ``$CW_HOME``, as /tmp, is fine); the key and
        master.json must be the user's own, the key readable by the user alone.
        Otherwise another user could put their own key and master.json there and
        have this process run their pickles. ``CW_SHARED_CLUSTER=1`` relaxes this
        for a cluster shared on purpose (only world-writable paths are refused):
        every member can then run code as every other.
        """
        me = os.getuid()
        for path, what in ((self.path.parent, "the cluster home ($CW_HOME)"), (self.path, "the cluster directory")):
            st = _stat(path)
            if st is None:
                continue
            sticky = bool(st.st_mode & stat.S_ISVTX)
            if st.st_mode & 0o002 and not sticky:
                raise ConfigError(f"{what} {path} is writable by everyone: anyone could replace its key"
                                  f" and master.json. Fix it with: chmod o-w {path}")  # fmt: skip
            if shared():
                continue
            if path == self.path and st.st_uid != me:
                raise ConfigError(f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {me}): its"
                                  f" key and master.json could be another user's. Use a directory of"
                                  f" your own (--cluster-dir, CW_HOME), or set CW_SHARED_CLUSTER=1 if it"
                                  f" is shared on purpose (see README)")  # fmt: skip
            if st.st_mode & 0o020 and not sticky:
                raise ConfigError(f"{what} {path} is writable by its group: a member could replace its"
                                  f" key and master.json. Fix it with: chmod g-w {path}"
                                  f" (or set CW_SHARED_CLUSTER=1 if the cluster is shared on purpose)")  # fmt: skip
        for path, mask, fix in ((self.key_path, 0o077, "chmod 600"), (self.master_json, 0o022, "chmod go-w"),
                                (self.curve_path, 0o022, "chmod go-w")):
            st = _stat(path)
            if st is None:
                continue
            if st.st_mode & 0o002 or (not shared() and st.st_mode & mask):
                raise ConfigError(f"{path} has mode {st.st_mode & 0o777:o}: others could read or change it."
                                  f" Fix it with: {fix} {path}")  # fmt: skip
            if not shared() and st.st_uid != me:
                raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to you (uid {me}): another user"
                                  f" may have planted it. Remove it, or set CW_SHARED_CLUSTER=1 if the"
                                  f" cluster is shared on purpose (see README)")  # fmt: skip

    def publish(self, info: dict[str, Any]) -> None:
        """Write master.json atomically (readers never see half a file)."""
        self.make()
        tmp = self.master_json.with_name(f".master.json.{os.getpid()}")
        # others may read where the master is; nobody else may change it
        write_private(tmp, json.dumps(info, indent=2) + "\n", mode=0o644)
        os.replace(tmp, self.master_json)

    def unpublish(self, pid: int) -> None:
        """Remove master.json if it is still ours."""
        info = self.read_master()
        if info and info.get("pid") == pid and info.get("host") == socket.gethostname():
            self.master_json.unlink(missing_ok=True)

    def read_master(self) -> dict[str, Any] | None:
        """master.json, once :meth:`check` has found the directory trustworthy."""
        self.check()
        try:
            return json.loads(self.master_json.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def master_address(self) -> str | None:
        """The published address, unless master.json names a dead process on this host."""
        info = self.read_master()
        if not info or "address" not in info:
            return None
        if info.get("host") == socket.gethostname() and not pid_alive(info.get("pid")):
            return None
        return str(info["address"])

    # -- the single-master lock -------------------------------------------------
    def lock(self) -> bool:
        """Take the master lock; False if a live master holds it."""
        self.make()
        fd = os.open(self.path / "master.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def shared() -> bool:
    """``CW_SHARED_CLUSTER=1``: the cluster directory is shared on purpose."""
    return os.environ.get("CW_SHARED_CLUSTER", "").lower() in ("1", "true", "yes")


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def private_dir(path: Path) -> Path:
    """Create a directory and its missing parents, each readable by its owner only
    (an explicit chmod: mkdir's mode is cut by the umask)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)
    return path


def _parse_key(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigError(f"the key in {where} is not hex") from None
    if len(key) < 16:
        raise ConfigError(f"the key in {where} is shorter than 16 bytes")
    return key


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Umask 077 for a while: what others create for us meanwhile (a batch system's job
    output files) is its owner's alone."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a file with this mode (its owner's alone by default), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, mode)
        f.write(text)


def pid_alive(pid: Any, reap: bool = False) -> bool:
    """Whether a process runs on this host; with ``reap``, a child of ours that ended (a
    master a cluster object started here) is reaped, not taken for alive."""
    if reap:
        try:
            if os.waitpid(int(pid), os.WNOHANG)[0]:
                return False
        except (ChildProcessError, TypeError, ValueError):
            pass
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


def resolve_address(address: str | None, cluster: ClusterDir) -> str | None:
    """Explicit address, then $CW_ADDRESS, then master.json; None if none of them.

    A bare host name takes its port from master.json when that names the same
    host, so ``python -m cw.worker HOST`` finds a master on a random port.
    """
    address = address or os.environ.get("CW_ADDRESS")
    if not address:
        return cluster.master_address()
    if "://" not in address and ":" not in address:
        info = cluster.read_master() or {}
        local = {"localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()}
        same = address in (info.get("host"), info.get("advertised_host")) or (
            address in local and info.get("host") == socket.gethostname()
        )
        if same and info.get("port"):
            return f"tcp://{address}:{info['port']}"
    return normalize_address(address)


def normalize_address(address: str) -> str:
    """'host', 'host:port' or a full ZeroMQ endpoint -> endpoint."""
    if "://" in address:
        return address
    host, _, port = address.rpartition(":") if ":" in address else (address, "", "")
    if not host:
        host, port = address, ""
    return f"tcp://{host}:{port or defaults.PORT}"


def interface_address(name: str) -> str:
    """IPv4 address of a network interface (Linux), e.g. 'ib0' -> '10.1.2.3'."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
        except OSError as e:  # SIOCGIFADDR
            raise ConfigError(f"no IPv4 address on interface {name!r}: {e}") from None
    return socket.inet_ntoa(packed[20:24])


def advertised_host(host: str | None = None, interface: str | None = None) -> str:
    """The name other hosts use to reach this one."""
    if host:
        return host
    if interface:
        return interface_address(interface)
    return socket.gethostname()


def interfaces() -> dict[str, str]:
    """This host's network interfaces that have an IPv4 address: {name: address}."""
    out = {}
    for _, name in socket.if_nameindex():
        try:
            out[name] = interface_address(name)
        except ConfigError:
            pass
    return out


def master_info(address: str, host: str, port: int, store: Path) -> dict[str, Any]:
    """What master.json says: where the master listens, who it is, and what `cw doctor`
    checks from elsewhere (its interfaces, its Python and cloudpickle)."""
    import platform

    import cloudpickle

    return {
        "address": address,
        "host": socket.gethostname(),
        "advertised_host": host,
        "port": port,
        "pid": os.getpid(),
        "started": time.time(),
        "version": __version__,
        "store": str(store),
        "versions": {"python": platform.python_version(), "cloudpickle": cloudpickle.__version__, "cw": __version__},
        "interfaces": interfaces(),
    }
