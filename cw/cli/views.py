"""What `cw top` and `cw dashboard` show, gathered in one place: a snapshot of the cluster.

A :class:`Watcher` asks the live master for its status document (one signed
STATUS request per refresh) and reads the store read-only; with no master
running it shows the store alone. It keeps a short history of the master's
counters, from which it computes rates, each run's rate and ETA, and the
series the dashboard charts.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any, Deque

from ..discovery import ClusterDir, resolve_address
from ..errors import CwError, StoreError
from ..link import query_status
from ..store.reader import StoreReader

#: Seconds of samples kept for rates (per run) and for the dashboard's charts.
HISTORY = 600.0
#: While a master answers, the store (its runs and failures: a scan of every job) is read
#: at most this often; with no master, at every refresh.
STORE_EVERY = 5.0


class Watcher:
    """The cluster as a viewer sees it, refreshed on demand."""

    def __init__(self, cluster: ClusterDir, address: str | None = None):
        self.cluster = cluster
        self.address = address
        self.samples: Deque[dict] = collections.deque()  # {t, done, failed, queued, running, workers, runs}
        self.error: str | None = None
        self._stored: tuple = ([], [], [], None)
        self._stored_at = 0.0

    def snapshot(self) -> dict[str, Any]:
        """The master's status (or None), the store's runs and failures, and derived rates."""
        now = time.time()
        status = self._status()
        if status is None or now - self._stored_at >= STORE_EVERY:
            self._stored, self._stored_at = self._store(), now
        runs, failures, workers_seen, store = self._stored
        live_runs = (status or {}).get("runs") or {}
        table = []
        names = list(dict.fromkeys([r["run"] for r in runs] + list(live_runs)))
        for name in names:
            stored = next((r for r in runs if r["run"] == name), None)
            live = live_runs.get(name, {})
            running = int(live.get("running", 0))
            if stored is not None:
                total, done, failed = stored["jobs"], stored["done"] or 0, (stored["failed"] or 0)
                cancelled = stored["cancelled"] or 0
                queued = max(0, stored["pending"] - running)
            else:  # the store is not readable here: what this master saw
                total, done, failed, cancelled = live.get("submitted", 0), live.get("done", 0), live.get("failed", 0), 0
                queued = max(0, total - done - failed - running)
            table.append({"run": name, "jobs": total, "queued": queued, "running": running, "done": done,
                          "failed": failed, "cancelled": cancelled})  # fmt: skip
        if status is not None:
            self.samples.append({
                "t": now, "done": status.get("done", 0), "failed": status.get("failed", 0),
                "queued": status.get("queued", 0), "running": status.get("running", 0),
                "workers": len(status.get("workers", ())),
                "runs": {r["run"]: r["done"] + r["failed"] for r in table},
            })  # fmt: skip
        while self.samples and self.samples[0]["t"] < now - HISTORY:
            self.samples.popleft()
        for r in table:
            r["rate"] = self._run_rate(r["run"])
            left = r["queued"] + r["running"]
            r["eta"] = left / r["rate"] if r["rate"] and left else None
        if status is not None and not status.get("failures"):
            status["failures"] = []
        return {
            "time": now, "live": status is not None, "status": status, "runs": table,
            "failures": (status or {}).get("failures") if status and status["failures"] else failures,
            "store_failures": failures, "workers_seen": workers_seen, "store": store, "error": self.error,
        }  # fmt: skip

    def _status(self) -> dict | None:
        address = self.address or resolve_address(None, self.cluster)
        if not address:
            self.error = "no master running"
            return None
        try:
            doc = query_status(address, self.cluster.key(), timeout=3.0, encrypt=self.cluster.encrypted())
        except CwError as e:
            self.error = f"the master at {address} does not answer: {e}"
            return None
        self.error = None
        return doc

    def _store(self) -> tuple[list, list, list, str | None]:
        path: Path = self.cluster.store_path
        if not path.exists():
            return [], [], [], None
        try:
            with StoreReader(path) as r:
                return r.runs(), r.failures(20), r.summary()["workers"], str(path)
        except StoreError as e:
            self.error = (self.error + "; " if self.error else "") + str(e)
            return [], [], [], str(path)

    def _run_rate(self, run: str, span: float = 30.0) -> float | None:
        """Jobs of this run finished per second over the last ``span`` seconds of samples."""
        recent = [s for s in self.samples if s["t"] >= self.samples[-1]["t"] - span] if self.samples else []
        if len(recent) < 2 or recent[-1]["t"] - recent[0]["t"] < 0.5:
            return None
        a, b = recent[0]["runs"].get(run), recent[-1]["runs"].get(run)
        if a is None or b is None:
            return None
        return max(0.0, (b - a) / (recent[-1]["t"] - recent[0]["t"]))

    def series(self) -> dict[str, list]:
        """The charts' data: per sample, jobs done and failed per second, queued, workers."""
        out: dict[str, list] = {"t": [], "done": [], "failed": [], "queued": [], "workers": []}
        prev = None
        for s in self.samples:
            if prev is not None and s["t"] > prev["t"]:
                dt = s["t"] - prev["t"]
                out["t"].append(round(s["t"], 3))
                out["done"].append(round(max(0, s["done"] - prev["done"] - (s["failed"] - prev["failed"])) / dt, 3))
                out["failed"].append(round(max(0, s["failed"] - prev["failed"]) / dt, 3))
                out["queued"].append(s["queued"])
                out["workers"].append(s["workers"])
            prev = s
        return out


def duration(seconds: float | None) -> str:
    """1:02:03, 2:03, 5s; '-' for None."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}:{m:02d}:{s:02d}"
    return f"{m}:{s:02d}" if m else f"{s}s"


def size(n: float | None) -> str:
    """Bytes as 1.2 GiB; '-' for None."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"
