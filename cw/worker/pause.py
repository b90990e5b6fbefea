"""Pause and resume a worker: for the person at a workstation who needs it back for a while.

A paused worker takes no new jobs: the tasks it holds but has not started go
back to the master at once (uncharged), and the master sends it none until
it resumes. With ``stop``, its running jobs are stopped too: SIGSTOP to
every process group of each job (:func:`cw.system.job_groups`), SIGCONT on
resume, and the time they spent stopped does not count against their
``timeout=``. A pause ``for`` a while ends by itself.

A pause comes through the master (``cw pause --host H``, with the cluster's
key), or from this host without the key, through a unix socket in the
worker's private directory (``/tmp/cw-<uid>/ctl-<pid>.sock``, whatever ``$TMPDIR`` says; mode 0700
directory, and only a peer of the same user is heard): ``cw pause`` with no
selector pauses this user's workers on this host. Part of
:class:`cw.worker.agent.Agent` (a mixin).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any, Optional

from .. import protocol as P
from .. import system
from ..defaults import CONTROL_ROOT
from ..discovery import pid_alive

log = logging.getLogger(__name__)


def control_dir() -> Path:
    """Where this user's workers on this host listen for local pause and resume: under /tmp
    itself, not ``$TMPDIR``, which a batch system sets per job (Grid Engine's
    ``/tmp/<job>.<task>.<queue>``) and a person at the host does not know."""
    return Path(CONTROL_ROOT) / f"cw-{os.getuid()}"


def control_sockets() -> list[Path]:
    """The control sockets of this user's live workers on this host; those of workers that
    died without removing theirs (``kill -9``) are removed."""
    d = control_dir()
    found = []
    for path in sorted(d.glob("ctl-*.sock")) if d.is_dir() else []:
        if pid_alive(path.name[4:-5]):
            found.append(path)
        else:
            path.unlink(missing_ok=True)
    return found


def ask_local(path: Path, request: dict, timeout: float = 5.0) -> dict:
    """One request to a local worker's control socket; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data or b"{}")


class Pausing:
    """The agent's pause and resume (mixed into Agent: uses its children, link and pending)."""

    paused: Optional[dict] = None  #: {"until": epoch or None, "stop": bool} while paused
    control: Optional[socket.socket] = None
    control_path: Optional[Path] = None

    # -- the local control socket ------------------------------------------------------
    def _open_control(self) -> None:
        d = control_dir()
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            log.warning("%s is not private to this user: no local pause for this worker", d)
            return
        control_sockets()  # dead workers' sockets go
        path = d / f"ctl-{os.getpid()}.sock"
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        os.chmod(path, 0o600)
        s.listen(8)
        s.setblocking(False)
        self.control, self.control_path = s, path

    def _close_control(self) -> None:
        if self.control is not None:
            self.control.close()
            try:
                self.control_path.unlink()  # type: ignore[union-attr]
            except OSError:
                pass
            self.control = None

    def _read_control(self) -> None:
        """A local request: {"pause": {"seconds": s, "stop": bool}} or {"resume": {}}."""
        try:
            conn, _ = self.control.accept()  # type: ignore[union-attr]
        except OSError:
            return
        with conn:
            try:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                uid = struct.unpack("3i", creds)[1]
                conn.settimeout(1.0)
                if uid not in (os.getuid(), 0):
                    conn.sendall(b'{"error": "not your worker"}\n')
                    return
                data = b""
                while not data.endswith(b"\n") and len(data) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                req = json.loads(data or b"{}")
                if req.get("cluster") not in (None, str(self.cluster.path)):
                    conn.sendall(json.dumps({"id": self.id, "other": True}).encode() + b"\n")
                    return
                was = self.paused
                if "pause" in req:
                    p = req["pause"] or {}
                    self.pause(p.get("seconds"), bool(p.get("stop")), "a local request")
                elif "resume" in req:
                    self.resume("a local request")
                changed = (was is None) != (self.paused is None)
                conn.sendall(json.dumps({"id": self.id, "paused": self.paused, "changed": changed}).encode() + b"\n")
            except (OSError, ValueError, TypeError, AttributeError) as e:
                log.warning("local control request refused: %s", e)

    # -- pausing -----------------------------------------------------------------------
    def pause(self, seconds: Optional[float], stop: bool, why: str) -> None:
        """Take no new jobs (for ``seconds``, or until resumed); with ``stop``, stop the
        running ones too. Unstarted tasks go back to the master at once."""
        if self.draining:
            return
        until = None if seconds is None or not math.isfinite(seconds) else time.time() + float(seconds)
        was = self.paused  # a second pause does not continue what a first one stopped
        self.paused = {"until": until, "stop": bool(stop or (was or {}).get("stop"))}
        if stop:
            self._stop_jobs()
        returned = [t[0] for t in self.pending]  # (devices are taken when a task starts, not before)
        returned += [t[0] for t in self.inputs.forget_requests()]  # those waiting for their inputs too
        self.pending.clear()
        log.warning("worker %s paused by %s%s%s: %d unstarted jobs handed back", self.id, why,
                    f" for {seconds:g} s" if until else "", ", running jobs stopped" if stop else "",
                    len(returned))  # fmt: skip
        if self.link is not None and self.link.sock is not None:
            self._send(P.PAUSE, {"returned": returned, "until": until, "stopped": self.paused["stop"]})

    def resume(self, why: str) -> None:
        """Take jobs again; continue the stopped ones (their stopped time is not theirs)."""
        if self.paused is None:
            return
        self._continue_jobs()
        self.paused = None
        log.warning("worker %s resumed by %s", self.id, why)
        if self.link is not None and self.link.sock is not None:
            self._send(P.RESUME, {})

    def _check_pause(self) -> None:
        until = self.paused["until"] if self.paused else None
        if until is not None and time.time() >= until:
            self.resume("the end of its pause")

    def _stop_jobs(self) -> None:
        now = time.monotonic()
        for c in self.children:
            if not c.inflight or c.stopped is not None:
                continue
            groups: list[int] = []
            for _ in range(3):  # again, for groups made while we stopped the first ones
                new = [g for g in system.job_groups(c.pid) if g not in groups]
                if not new:
                    break
                system.signal_groups(new, signal.SIGSTOP)
                groups += new
            c.stopped, c.stopped_at = groups, now

    def _continue_jobs(self) -> None:
        now = time.monotonic()
        for c in self.children:
            if c.stopped is None:
                continue
            system.signal_groups(list(reversed(c.stopped)), signal.SIGCONT)
            c.head_started += now - c.stopped_at  # stopped time does not count against timeout=
            c.stopped = None

    def _pause_state(self) -> Any:
        return None if self.paused is None else {"until": self.paused["until"], "stopped": self.paused["stop"]}
