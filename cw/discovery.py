"""The cluster directory on the shared filesystem: master.json, the key, the store.

Layout of ``$CW_HOME/<cluster>/`` (default ``~/.cw/default/``)::

    key           the secret (hex), mode 0600, created by the first master
    master.json   address, host, port, pid, start time, version of the live master
    master.lock   held (flock) by the live master
    cw.sqlite     the store

Resolution of the master's address: explicit argument, ``$CW_ADDRESS``,
master.json; a client with none of these starts an embedded local cluster.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import struct
import time
from pathlib import Path
from typing import Any

from . import defaults
from .errors import ConfigError
from .version import __version__


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

    # -- the key ----------------------------------------------------------------
    def key(self, create: bool = False) -> bytes:
        """The secret key: ``$CW_KEY`` (hex) if set, else the key file."""
        env = os.environ.get("CW_KEY")
        if env:
            return _parse_key(env, "$CW_KEY")
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
        """Create the directory, readable by its owner only: it holds the key and
        the store (every job's arguments and results)."""
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir(mode=0o700, exist_ok=True)

    def publish(self, info: dict[str, Any]) -> None:
        """Write master.json atomically (readers never see half a file)."""
        self.make()
        tmp = self.master_json.with_name(f".master.json.{os.getpid()}")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, self.master_json)

    def unpublish(self, pid: int) -> None:
        """Remove master.json if it is still ours."""
        info = self.read_master()
        if info and info.get("pid") == pid and info.get("host") == socket.gethostname():
            self.master_json.unlink(missing_ok=True)

    def read_master(self) -> dict[str, Any] | None:
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


def _parse_key(text: str, where: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigError(f"the key in {where} is not hex") from None
    if len(key) < 16:
        raise ConfigError(f"the key in {where} is shorter than 16 bytes")
    return key


def pid_alive(pid: Any) -> bool:
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


def master_info(address: str, host: str, port: int, store: Path) -> dict[str, Any]:
    return {
        "address": address,
        "host": socket.gethostname(),
        "advertised_host": host,
        "port": port,
        "pid": os.getpid(),
        "started": time.time(),
        "version": __version__,
        "store": str(store),
    }
