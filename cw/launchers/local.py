"""LocalCluster: a master and workers as local processes (the embedded default).

It has the surface of the batch clusters (``scale``, ``adapt``, ``status``,
``logs``, the reprs): a retired worker is sent SIGTERM, on which it drains,
and adapting is the same decision (:class:`~cw.launchers.adapt.Adaptive`),
made by a thread of this process.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..client import Client
from ..defaults import ADAPT_IDLE_TIMEOUT, ADAPT_TARGET, CONNECT_TIMEOUT, LOCAL_CLUSTER
from ..discovery import ClusterDir
from ..errors import ConfigError, CwError, NoMasterError
from ..link import query_status
from .adapt import BUSY, IDLE, STARTING, Adaptive, Member, Profile, demand_of, retire_order
from .surface import ClusterSurface, seconds_of, short_duration

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster(ClusterSurface):
    """A master and ``n_workers`` workers on this machine, on loopback.

    Uses the cluster directory ``$CW_HOME/local`` (so a re-run finds its stored
    results), or a fresh temporary one when another local master holds it.
    Every process ends with the cluster (``close()``, the context manager, or
    the death of this process). ``encrypt=True`` runs the wire over CurveZMQ
    (recorded in the cluster directory, as ``cw master --encrypt`` does).
    """

    def __init__(self, n_workers: int | None = None, procs: int = 1,
                 cluster: str | os.PathLike | None = None, tags: list[str] | None = None,
                 encrypt: bool = False):  # fmt: skip
        if n_workers is not None and (isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 0):
            raise ConfigError(f"n_workers={n_workers!r}: a number of workers is a whole number, 0 or more")
        if isinstance(procs, bool) or not isinstance(procs, int) or procs < 1:
            raise ConfigError(f"procs={procs!r}: processes per worker are a whole number, 1 or more")
        self.n_workers = n_workers if n_workers is not None else (os.cpu_count() or 1)
        self.procs_per_worker, self.tags = procs, list(tags or [])
        self._names = itertools.count()
        self._lock = threading.RLock()
        self._retired: set[int] = set()  # worker pids sent SIGTERM: draining
        self._adapt: dict | None = None
        self._adapter: threading.Thread | None = None
        self._stop_adapting = threading.Event()
        c = os.fspath(cluster) if cluster else None  # a path (with a '/'), or a name under $CW_HOME
        self.cluster = ClusterDir(name=LOCAL_CLUSTER) if c is None else ClusterDir(path=c) if os.sep in c else \
            ClusterDir(name=c)  # fmt: skip
        if self.cluster.lock():  # free: ours (the master takes the lock itself)
            self.cluster.unlock()
        else:
            self.cluster = ClusterDir(path=tempfile.mkdtemp(prefix="cw-local-"))
        self.cluster.key(create=True)  # before any process needs it
        if encrypt:
            self.cluster.set_encrypted()
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.cluster.subdir("logs")  # private, as the cluster directory
        self.procs: list[subprocess.Popen] = []
        base = [sys.executable, "-m"]
        cdir = ["--cluster-dir", str(self.cluster.path)]
        try:
            self.master = self._spawn("master", base + ["cw.master", *cdir, "--bind", self.address])
            for _ in range(self.n_workers):
                self._add_worker()
            self._wait_for_master()
        except BaseException:
            self.close()
            raise
        log.info("started a local cw cluster: master %s, %d workers (logs in %s)",
                 self.address, self.n_workers, self.logs_dir)  # fmt: skip

    def _wait_for_master(self) -> None:
        """Until the master has published its address; if it exits first (a damaged
        store, a port taken), NoMasterError says why, from its log, at once."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while time.monotonic() < deadline:
            code = self.master.poll()
            if code is not None:
                lines = (self.logs_dir / "master.log").read_text(errors="replace").strip().splitlines()
                why = lines[-1].removeprefix("Error: ") if lines else "it printed nothing"
                raise NoMasterError(f"the local cluster's master exited (code {code}): {why}"
                                    f" (its log: {self.logs_dir / 'master.log'})")  # fmt: skip
            if (self.cluster.read_master() or {}).get("pid") == self.master.pid:
                return
            time.sleep(0.05)

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        env = dict(os.environ)
        env.pop("CW_ADDRESS", None)
        env.pop("CW_KEY", None)
        fd = os.open(self.logs_dir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as out:
            # --watch-pid: each process ends when this one does (a parent-death signal
            # would fire when the creating *thread* ends)
            p = subprocess.Popen([*cmd, "--watch-pid", str(os.getpid())], stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        self.procs.append(p)
        return p

    def _add_worker(self) -> subprocess.Popen:
        extra = [a for t in self.tags for a in ("--tag", t)]
        return self._spawn(f"worker-{next(self._names)}", [
            sys.executable, "-m", "cw.worker", self.address, "--cluster-dir", str(self.cluster.path),
            "--procs", str(self.procs_per_worker), "--give-up", "30", *extra])  # fmt: skip

    def client(self, **kwargs: Any) -> Client:
        """A client of this cluster (the same as ``cw.Client(cluster)``)."""
        return Client(self, **kwargs)

    # -- size ---------------------------------------------------------------------------
    def workers(self) -> list[subprocess.Popen]:
        """The worker processes that run and have not been asked to leave."""
        return [p for p in self.procs if p is not self.master and p.poll() is None and p.pid not in self._retired]

    def _members(self, status: dict | None) -> list[Member]:
        here = socket.gethostname()
        by_pid = {w.get("pid"): w for w in (status or {}).get("workers", ()) if w.get("host") == here}
        out = []
        for p in self.workers():
            w = by_pid.get(p.pid)
            if w is None or w.get("draining"):
                out.append(Member(str(p.pid), "", STARTING))
            else:
                held = int(w.get("running") or 0) + int(w.get("prefetched") or 0)
                out.append(Member(str(p.pid), "", BUSY if held else IDLE, float(w.get("idle") or 0.0), held))
        return out

    def _retire(self, names: list[str]) -> None:
        for p in self.procs:
            if str(p.pid) in names and p.poll() is None:
                self._retired.add(p.pid)
                p.send_signal(signal.SIGTERM)  # the worker drains: nothing is lost or charged

    def _master_status(self) -> dict | None:
        try:
            return query_status(self.address, self.cluster.key(), timeout=2.0, encrypt=self.cluster.encrypted())
        except CwError:
            return None

    def scale(self, n: int) -> None:
        """Hold ``n`` workers from now on (stops adapting): start the missing ones, or drain
        the surplus (the idle ones first)."""
        if n < 0:
            raise ConfigError(f"scale: {n} is not a number of workers")
        self._stop_adapter()
        with self._lock:
            self.n_workers = n
            live = self.workers()
            for _ in range(n - len(live)):
                self._add_worker()
            if len(live) > n:
                members = sorted(self._members(self._master_status()), key=retire_order)
                self._retire([m.name for m in members[: len(live) - n]])

    def adapt(self, minimum: int = 0, maximum: int | None = None, idle_timeout: float | str = ADAPT_IDLE_TIMEOUT,
              *, target_duration: float | str = ADAPT_TARGET, interval: float | str = 1.0) -> None:  # fmt: skip
        """Size the cluster by the queue, between ``minimum`` and ``maximum`` (default: the
        CPUs) workers, as the batch clusters do (see :class:`~cw.launchers.adapt.Adaptive`).
        ``maximum=0`` holds it empty: its workers drain and jobs wait."""
        settings = {"minimum": minimum, "maximum": (os.cpu_count() or 1) if maximum is None else maximum,
                    "idle_timeout": seconds_of(idle_timeout, "idle_timeout"),
                    "target": seconds_of(target_duration, "target_duration")}  # fmt: skip
        decider = Adaptive(**settings, profiles=[Profile("", {"cpus": self.procs_per_worker, "tags": self.tags},
                                                         slots=self.procs_per_worker)])  # fmt: skip
        every = max(0.05, seconds_of(interval, "interval"))
        self._stop_adapter()
        self._adapt = {**settings, "interval": every}
        self._stop_adapting = threading.Event()
        self._adapter = threading.Thread(target=self._adapting, args=(decider, every, self._stop_adapting),
                                         name="cw-local-adapt", daemon=True)  # fmt: skip
        self._adapter.start()

    def _adapting(self, decider: Adaptive, every: float, stop: threading.Event) -> None:
        known: set[int] = set()
        while not stop.wait(every):
            try:
                with self._lock:
                    status = self._master_status()
                    if status is None:
                        continue
                    members = self._members(status)
                    alive = {int(m.name) for m in members}
                    failed = len(known - alive - self._retired)  # ended without being asked
                    d = decider.decide(time.monotonic(), demand_of(status), members, failed)
                    self._retire([m.name for m in d.retire])
                    for _ in range(d.submit.get("", 0)):
                        self._add_worker()
                    known = {p.pid for p in self.workers()}
                    for line in d.reasons:
                        log.info("local adaptive cluster: %s", line)
            except Exception:
                log.exception("local adaptive cluster: unexpected error (it keeps going)")

    def _stop_adapter(self) -> None:
        self._stop_adapting.set()
        if self._adapter is not None and self._adapter is not threading.current_thread():
            self._adapter.join(10)
        self._adapter, self._adapt = None, None

    # -- looking ------------------------------------------------------------------------
    def status(self) -> dict:
        """The processes, what the master says of them and of the queue, and the adaptive settings."""
        s = self._master_status()
        by_pid = {w.get("pid"): w for w in (s or {}).get("workers", ())}
        return {
            "cluster": str(self.cluster.path), "address": self.address,
            "master": {"pid": self.master.pid, "alive": self.master.poll() is None, "answering": s is not None},
            "workers": [{"pid": p.pid, "alive": p.poll() is None, "draining": p.pid in self._retired,
                         "connected": p.pid in by_pid,
                         **{k: by_pid[p.pid].get(k) for k in ("running", "prefetched", "idle") if p.pid in by_pid}}
                        for p in self.procs if p is not self.master],
            "queued": (s or {}).get("queued"), "running": (s or {}).get("running"), "done": (s or {}).get("done"),
            "queues": (s or {}).get("queues", []), "adapt": self._adapt,
        }  # fmt: skip

    def facts(self, live: bool = True) -> list[tuple[str, str]]:
        facts = [("", repr(str(self.cluster.path))), ("master", self.address)]
        s = self._master_status() if live and self.procs else None
        n = len(self.workers())
        if s is not None:
            ws = s.get("workers", [])
            facts.append(("workers", f"{n} running, {len(ws)} connected"))
            facts.append(("jobs", f"{s.get('queued', 0)} queued, {s.get('running', 0)} running, {s.get('done', 0)} done"))
        else:
            facts.append(("workers", f"{n} running" + ("" if self.procs else " (closed)")))
        a = self._adapt
        facts.append(("adapt", f"{a['minimum']}..{a['maximum']}, idle {short_duration(a['idle_timeout'])}")
                     if a else ("size", str(self.n_workers)))  # fmt: skip
        return facts

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers, then the master; kill what does not stop in time."""
        self._stop_adapter()
        workers = [p for p in self.procs if p is not getattr(self, "master", None)]
        for group in (workers, [p for p in self.procs if p not in workers]):
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for p in group:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("local cw process %d did not stop: killing it", p.pid)
                    p.kill()
                    p.wait()
        self.procs = []

    def __enter__(self) -> LocalCluster:
        return self

    @property
    def store_path(self) -> Path:
        return self.cluster.store_path
