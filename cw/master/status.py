"""The master's status document: what `cw status`, `cw top` and `cw dashboard` show live.

Part of :class:`cw.master.server.Master` (a mixin: it reads the master's
policy, sessions and counters). It is built only when someone asks (one
signed STATUS request per refresh of a viewer), from what the master keeps
anyway; the loop pays a counter or two per batch and a sample per timer tick.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .. import defaults
from .. import protocol as P


def stderr_tail(jid: int, stderr: str, lines: int = defaults.STDERR_LINES) -> str:
    """The last lines of a failed job's stderr, to be shown under its traceback."""
    tail = stderr.rstrip("\n").splitlines()[-lines:]
    return f"\n[the last {len(tail)} lines of job {jid}'s stderr]\n" + "\n".join(tail) + "\n"


class StatusReport:
    """The status document (mixed into Master)."""

    def _failure(self, job: Any, status: int, err: str | None, wid: str | None, now: float) -> dict:
        """A failure as the status lists it: the job, its run, and the first line of its error."""
        s = job.session
        return {"id": job.id, "run": s.run if s is not None else None, "status": P.STATUS_NAMES.get(status),
                "error": (err or "").strip().split("\n", 1)[0][:300], "worker": wid, "at": now}  # fmt: skip

    def _rates(self, now: float) -> dict:
        """Jobs per second submitted (in) and finished (out) over the last 10 s and minute."""
        out: dict[str, float] = {}
        if not self.counts:
            return {"in_10s": 0.0, "out_10s": 0.0, "in_60s": 0.0, "out_60s": 0.0}
        for span in (10, 60):
            t0, in0, out0 = next((c for c in self.counts if c[0] >= now - span), self.counts[-1])
            dt = max(now - t0, 1e-6)
            out[f"in_{span}s"] = round((self.submitted - in0) / dt, 2) if now - t0 > 0.5 else 0.0
            out[f"out_{span}s"] = round((self.done - out0) / dt, 2) if now - t0 > 0.5 else 0.0
        return out

    def _runs(self) -> dict:
        """Per run, since this master started: submitted, running, done, failed."""
        runs: dict[str, dict[str, int]] = {}
        for s in self.sessions.values():
            if s.submitted or s.done or s.failed:
                r = runs.setdefault(s.run or "", {"submitted": 0, "running": 0, "done": 0, "failed": 0})
                r["submitted"] += s.submitted
                r["done"] += s.done
                r["failed"] += s.failed
        for w in self.policy.workers.values():
            for jid in w.started or ():
                job = w.running.get(jid)
                if job is not None:
                    run = job.session.run or "" if job.session is not None else ""
                    runs.setdefault(run, {"submitted": 0, "running": 0, "done": 0, "failed": 0})["running"] += 1
        return runs

    def _queues(self) -> list:
        """What waits, per requirement, with the runtime measured for it."""
        queues = [{"requires": r, "queued": n, "runtime": t} for r, n, t in self.policy.demand()]
        if self.backlog:  # jobs only in the store: their requirements are not read back yet
            row = next((q for q in queues if not q["requires"]), None)
            if row is None:
                queues.append({"requires": {}, "queued": self.backlog, "runtime": None})
            else:
                row["queued"] += self.backlog
        return queues

    def status(self) -> dict:
        running, held = self.policy.running(), self.policy.held()
        now, mono = time.time(), time.monotonic()
        return {
            "master": self.id,
            "address": self.address,
            "store": str(self.store.path),
            "uptime": now - self.started,
            "queued": self.policy.waiting() + self.backlog,
            "held": len(self.held),
            "in_memory": len(self.policy.jobs) + len(self.held),
            "running": running,
            "prefetched": held - running,
            "done": self.done,
            "failed": self.failed,
            "submitted": self.submitted,
            "rates": self._rates(mono),
            "store_bytes": _size(self.store.path),
            "bad_messages": self.bad.count,
            "sessions": sum(1 for s in self.sessions.values() if s.ident is not None),
            "sent": dict(self.sent),
            "queues": self._queues(),
            "runs": self._runs(),
            "failures": list(self.failures)[::-1],
            "workers": [
                {
                    "id": w.id, "host": w.host, "pid": w.pid, "slots": w.slots, "caps": w.caps,
                    "running": w.busy(), "blocked": sum(1 for j in w.blocked if j in w.running),
                    "prefetched": len(w.running) - w.busy(),
                    "draining": w.draining, "counters": w.counters, "info": w.info,
                    "label": w.label, "task": w.task, "versions": w.versions,
                    "idle": 0.0 if w.running else round(mono - w.idle_since, 3),
                    "jobs": [[jid, _since(w.running.get(jid), now)] for jid in sorted(w.started or ())],
                    "reserved": w.reserved, "paused": w.paused,
                }  # fmt: skip
                for w in self.policy.workers.values()
            ],
        }


def _since(job: Any, now: float) -> float | None:
    """Seconds a running job has run, as far as the master heard."""
    if job is None or job.started_at is None:
        return None
    return round(now - job.started_at, 1)


def _size(path: Any) -> int:
    """The store's bytes on disk, with its write-ahead log."""
    total = 0
    for suffix in ("", "-wal"):
        try:
            total += os.stat(f"{path}{suffix}").st_size
        except OSError:
            pass
    return total
