"""The owner of a pool: the process of a ``SlurmCluster`` / ``SGECluster``, whose pool ends with it.

The owner records itself in pool.json (its host, pid and lease) and renews a
lease file, ``owner.lease`` in the cluster directory, every quarter of the
lease (:class:`Lease`, a thread). The keeper beside the master watches it
(:class:`OwnerWatch`): on the owner's host, the owner is gone as soon as its
process is; elsewhere, once the lease file has not changed for the lease's
length, as the keeper's own clock counts it (no two hosts' clocks are
compared). A gone owner's pool is taken down: its workers drain, then the
master stops.

The lease file is rewritten in place, and read whole, so that NFS's
close-to-open consistency shows each renewal on the other host.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from ..defaults import OWNER_LEASE
from ..discovery import ClusterDir, pid_alive

log = logging.getLogger(__name__)

LEASE_FILE = "owner.lease"


class Lease(threading.Thread):
    """Renews the owner's lease while this process lives (a daemon thread)."""

    def __init__(self, cluster: ClusterDir, lease: float = OWNER_LEASE):
        super().__init__(name="cw-owner-lease", daemon=True)
        self.path = cluster.path / LEASE_FILE
        self.lease = float(lease)
        self.token = secrets.token_hex(4)
        self._halt = threading.Event()
        self._count = 0
        self.renew()

    def record(self) -> dict[str, Any]:
        """What pool.json says of its owner."""
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "lease": self.lease}

    def renew(self) -> None:
        self._count += 1
        try:
            with open(self.path, "w") as f:
                f.write(f"{self.token} {self._count} {time.time():.0f}\n")
        except OSError as e:
            log.warning("cannot renew the pool's lease %s: %s", self.path, e)

    def run(self) -> None:
        while not self._halt.wait(self.lease / 4):
            self.renew()

    def stop(self) -> None:
        self._halt.set()


class OwnerWatch:
    """The keeper's view of the owner: is it gone, and why."""

    def __init__(self, cluster: ClusterDir):
        self.path = cluster.path / LEASE_FILE
        self._seen: str | None = None
        self._changed = time.monotonic()

    def gone(self, owner: dict[str, Any] | None, now: float | None = None) -> str | None:
        """Why the owner is gone (one line), or None while it lives (or the pool has none)."""
        if not owner:
            return None
        now = time.monotonic() if now is None else now
        if owner.get("host") == socket.gethostname():  # its process decides, at once
            return None if pid_alive(owner.get("pid")) else f"its owner, process {owner.get('pid')} on" \
                f" {owner.get('host')}, ended"  # fmt: skip
        try:
            text = self.path.read_text()
        except OSError:
            text = ""
        if text != self._seen:
            self._seen, self._changed = text, now
            return None
        lease = float(owner.get("lease") or OWNER_LEASE)
        if now - self._changed > lease:
            return (f"its owner, process {owner.get('pid')} on {owner.get('host')}, has not renewed its"
                    f" lease ({self.path}) for {lease:.0f} s")  # fmt: skip
        return None
