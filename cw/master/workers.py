"""What the master does for workers: joining, tasks, results, drains, losses, post-mortems,
and the jobs that require what no connected worker offers.

Part of :class:`cw.master.server.Master` (a mixin: it uses the master's store,
policy and sending). Where jobs go is the policy's decision
(:meth:`cw.master.policy.Policy.assign`); this module sends them, takes their
results, and decides what a lost worker's jobs cost.
"""

from __future__ import annotations

import logging
import threading
import time

from .. import defaults
from .. import protocol as P
from ..launchers import environment_of
from .policy import Job, Worker

log = logging.getLogger(__name__)


class WorkerHandlers:
    """The master's worker side (mixed into Master: uses its store, policy, peers and _send)."""

    def _worker_hello(self, ident: bytes, h: dict) -> None:
        """A worker joins, or comes back (new connection, or a master that restarted).

        The jobs it says it still holds stay with it; jobs we thought it had and
        it does not hold were lost in transit, not by its fault: requeued uncharged.
        Jobs it holds from another store (another epoch: their ids name other jobs
        here) are ignored; our WELCOME's epoch tells it to drop them.
        """
        epoch = h.get("epoch")
        if epoch is not None and epoch != self.store.epoch:
            if h.get("holding"):
                log.warning("worker %s holds %d jobs of another store (epoch %s, ours %s): ignored;"
                            " it drops them", h.get("id"), len(h["holding"]), epoch, self.store.epoch)  # fmt: skip
            h = {**h, "holding": [], "running": []}
        w = Worker(ident, h)
        holding = {int(j) for j in h.get("holding") or ()}
        old = self.peers.get(ident)
        if not isinstance(old, Worker) or old.id != w.id:
            old = next((x for x in self.policy.workers.values() if x.id == w.id), None)
        if old is not None:
            self.peers.pop(old.ident, None)
            if old.ident != ident:  # its old connection's session is over
                self.door.forget(old.ident)
            self.policy.remove_worker(old)
            for job in old.release_all():
                w.hold(job)
        for jid in reversed(list(w.running)):  # lost in transit, not by its fault
            if jid not in holding:
                self._requeue(w.release(jid))
        jobs = self.policy.jobs
        for jid in holding:
            job = jobs.get(jid)
            if job is not None and (job.worker is None or job.worker is old):
                job.worker = w  # what it runs stays with it
                if jid not in w.running:
                    w.hold(job)
        done = self.store.finished([j for j in holding if j not in jobs])
        if done:  # finished or cancelled meanwhile: stop wasting its slots
            self._send(ident, P.CANCEL, {"i": done})
        self.peers[ident] = w
        self.policy.add_worker(w)
        self.store.worker_joined(w.id, w.host, w.pid, w.caps)
        log.info("worker %s %s with %d slots %s", w.describe(), "rejoined" if old else "joined",
                 w.slots, w.caps)  # fmt: skip
        self._send(ident, P.WELCOME, self._welcome())
        w.last_sent = time.monotonic()

    def _from_worker(self, w: Worker, kind: bytes, h: dict, blobs: list[bytes]) -> None:
        w.last_seen = time.monotonic()
        if "running" in h:
            w.blocked = set(h["blocked"]) if "blocked" in h else set()
            running = set(h["running"])
            new = running - w.started if w.started is not None else running
            w.started = running
            if new:
                self._tell_started(w, new)
        if kind == P.RESULT:
            self._results(w, h, blobs)
        elif kind == P.BYE:
            self._worker_bye(w, h)
        elif kind == P.PAUSE:  # paused (through us, or by its own user): what it had not started comes back
            w.paused = {"until": h.get("until"), "stopped": bool(h.get("stopped"))}
            for job in reversed([w.release(j) for j in h.get("returned", ()) if j in w.running]):
                self._requeue(job)
            log.info("worker %s paused%s", w.describe(), ", its running jobs stopped" if w.paused["stopped"] else "")
        elif kind == P.RESUME:
            w.paused = None
            log.info("worker %s resumed", w.describe())
        elif kind == P.HEARTBEAT:
            w.counters = h
        elif kind == P.NEED:
            self._need(w, h)

    def _tell_started(self, w: Worker, ids: set[int]) -> None:
        """Clients hear which of their jobs started (their futures go RUNNING), with
        their next acknowledgement or result."""
        now = time.time()
        for jid in ids:
            job = w.running.get(jid)
            if job is None:
                continue
            job.started_at = now
            s = job.session
            if s is not None and s.ident is not None:
                s.started.append(job.seq)
                self._dirty.add(s)
            for fs, fseq in job.followers or ():
                if fs.ident is not None:
                    fs.started.append(fseq)
                    self._dirty.add(fs)

    # -- tasks out -------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Send each worker the jobs the policy placed on it, with the functions and
        client contexts it does not have yet, in batches."""
        now = time.monotonic()
        sent = self.sent
        for w, jobs in list(self.policy.assign(self._compatible)):
            tasks, args, fns, ctxs, sizes = [], [], [], [], []
            extra: dict[int, tuple] = {}  # task index -> (TaskInputs row, scattered hashes, their blobs)
            keep = set()
            for job in jobs:
                blob = ex = None
                if job.inputs or job.refs:
                    xs: list = []
                    xb: list = []
                    why = self._task_data(w, job, xs, xb)
                    if why is not None:
                        self.policy.unplace(job)
                        self._finish(job, P.FAILED, b"", why, "", None, None)
                        continue
                    ex = ((job.id, job.inputs or [], job.refs or []), xs, xb)
                if job.id in self.dependents:
                    keep.add(job.id)
                if job.fn not in w.funcs:
                    blob = self.functions.get(job.fn) or self.store.function(job.fn)
                    if blob is None:
                        self.policy.unplace(job)
                        self._finish(job, P.FAILED, b"", f"function {job.fn} is not in the store", "", None, None)
                        continue
                    self.functions[job.fn] = blob
                    w.funcs.add(job.fn)
                s = job.session or (job.followers[0][0] if job.followers else None)
                # a nested client (cw.get_client() in a job) names the context of the client it
                # stands for: its jobs run in that client's processes
                ctx = (s.context.get("ctx") or s.id) if s is not None and s.context else None
                new_ctx = None
                if ctx is not None and ctx not in w.ctxs:
                    new_ctx = (ctx, {**s.context, "run": s.run, "ctx": ctx})
                    w.ctxs.add(ctx)
                size = len(job.args) + (len(blob) if blob else 0)
                if ex is not None:
                    extra[len(tasks)] = ex
                    size += sum(map(len, ex[2]))
                tasks.append((job.id, job.fn, ctx, job.timeout, job.output, job.key, job.needs))  # a TaskSpec row
                args.append(job.args)
                fns.append(blob)
                ctxs.append(new_ctx)
                sizes.append(size)
            for part in P.batches(sizes):
                header: dict = {"t": tasks[part]}
                new = [(t[1], b) for t, b in zip(tasks[part], fns[part]) if b is not None]
                header["f"] = [fn for fn, _ in new]
                c = {k: v for k, v in filter(None, ctxs[part])}
                if c:
                    header["c"] = c
                xblobs: list = []
                if extra:
                    rows = [extra[i] for i in range(part.start, part.stop) if i in extra]
                    if rows:
                        header["i"] = [r[0] for r in rows]  # TaskInputs rows
                        xs = [x for r in rows for x in r[1]]
                        if xs:
                            header["x"] = xs
                            xblobs = [b for r in rows for b in r[2]]
                if keep:
                    k = [t[0] for t in tasks[part] if t[0] in keep]
                    if k:
                        header["k"] = k
                sent["arguments"] += sum(len(a) for a in args[part])
                sent["functions"] += sum(len(b) for _, b in new)
                self._send(w.ident, P.TASKS, header, [*args[part], *(b for _, b in new), *xblobs])
            w.last_sent = now

    # -- results in --------------------------------------------------------------------
    def _results(self, w: Worker, h: dict, blobs: list[bytes]) -> None:
        """Results count only from the worker the job was sent to, for that attempt: a job
        requeued or placed elsewhere meanwhile runs (or ran) there."""
        outcomes = []
        policy = self.policy
        if blobs and max(map(len, blobs)) >= defaults.RELEASE_BYTES:
            self.release = True
        for row, blob in zip(h["r"], blobs):  # WorkerResult rows: stdout, stderr only if written
            if len(row) == 5:
                jid, status, runtime, err, tb = row
                out = errout = None
            else:
                jid, status, runtime, err, tb, out, errout = row
            job = w.release(jid)
            if job is None:
                continue  # already finished (a duplicate after a requeue), or not this worker's
            if runtime is not None:
                policy.ran(job.fn, runtime)
            outcomes.append(self._finish(job, status, blob, err, tb, w.id, runtime, False, out, errout))
        if not w.running:
            w.idle_since = w.last_seen
        if outcomes:
            self.store.add_results(outcomes)
            if "o" in h:
                self._outputs(h["o"], {o[0] for o in outcomes})

    def _outputs(self, rows: list, accepted: set[int]) -> None:
        """Record what workers archived of the jobs whose results were just stored."""
        self.store.add_outputs([(jid, where, name, size, digest)
                                for jid, where, files in rows if jid in accepted
                                for name, size, digest in files])  # fmt: skip

    def _control(self, kind: bytes, h: dict) -> dict:
        """A client's PAUSE or RESUME of the workers on a host, of one worker (its id, or
        the start of it), or of all: passed on to them; the ids it reached."""
        host, wid = h.get("host"), h.get("worker")
        chosen = [w for w in self.policy.workers.values()
                  if (host is None or w.host == host or w.host.split(".")[0] == host)
                  and (wid is None or w.id == wid or w.id.startswith(str(wid)))]  # fmt: skip
        if wid is not None and len(chosen) > 1:  # the start of an id names one worker, or none
            exact = [w for w in chosen if w.id == wid]
            if not exact:
                return {"paused" if kind == P.PAUSE else "resumed": [], "ambiguous": sorted(w.id for w in chosen)}
            chosen = exact
        for w in chosen:
            if kind == P.PAUSE:
                until = None if h.get("seconds") is None else time.time() + float(h["seconds"])
                # no new job from now on (the worker confirms, handing back what it had not started)
                w.paused = {"until": until, "stopped": bool(h.get("stop")) or bool((w.paused or {}).get("stopped"))}
                self._send(w.ident, P.PAUSE, {k: h[k] for k in ("seconds", "stop") if h.get(k) is not None})
            else:
                w.paused = None
                self._send(w.ident, P.RESUME, {})
        log.info("%s %d workers (%s)", "paused" if kind == P.PAUSE else "resumed", len(chosen),
                 ", ".join(w.describe() for w in chosen) or "none matched")  # fmt: skip
        return {"paused" if kind == P.PAUSE else "resumed": [w.id for w in chosen]}

    # -- leaving -------------------------------------------------------------------------
    def _worker_bye(self, w: Worker, h: dict) -> None:
        """A draining worker hands back jobs it did not finish; they cost no attempt."""
        w.draining = True
        returned = [w.release(j) for j in h.get("returned", ()) if j in w.running]
        if h.get("final"):
            returned += w.release_all()
        self._record_attempts(w, [j for j in returned if j.started_at is not None], None,
                              f"handed back: {h.get('why', 'drained')}")  # fmt: skip
        for job in reversed(returned):
            self._requeue(job)
        if h.get("final"):
            self.peers.pop(w.ident, None)
            self.door.forget(w.ident)
            self.policy.remove_worker(w)
            self.store.worker_left(w.id, str(h.get("why", "left")))
            log.info("worker %s left (%s): %d jobs handed back", w.describe(), h.get("why", "drained"),
                     len(returned))  # fmt: skip
        else:
            log.info("worker %s draining: %d jobs handed back", w.describe(), len(returned))

    def _record_attempts(self, w: Worker, jobs: list[Job], status: int | None, why: str) -> None:
        """Attempts that ended without a result (lost, handed back), for the job's history."""
        if jobs:
            now = time.time()
            self.store.add_attempts([(j.id, w.id, j.queued_at, j.started_at, now, status, why, None, None)
                                     for j in jobs])  # fmt: skip

    def _awaiting_workers(self) -> bool:
        """True while workers connected to the last master may still come back with its jobs."""
        if not self.expected:
            return False
        back = {w.id for w in self.policy.workers.values()}
        if self.expected <= back or time.monotonic() > self.expect_until:
            missing = self.expected - back
            if missing:
                log.info("%d workers of the last master did not come back: giving out their jobs", len(missing))
            self.expected = set()
            return False
        return True

    def _check_workers(self, now: float) -> None:
        """Lose silent workers; heartbeat the others.

        After a connection closed, a worker silent for three heartbeats (at
        least 3 s) is taken as gone, without waiting for the full timeout.
        """
        suspect = now - self.door.disconnected_at < self.worker_timeout
        for w in list(self.policy.workers.values()):
            silent = now - w.last_seen
            if silent > self.worker_timeout:
                self._lose(w, f"silent for {silent:.1f} s")
            elif suspect and silent > max(3 * self.heartbeat, 3.0):
                self._lose(w, f"disconnected, silent for {silent:.1f} s")
            elif now - w.last_sent >= self.heartbeat:
                self._send(w.ident, P.HEARTBEAT)
                w.last_sent = now

    def _lose(self, w: Worker, why: str) -> None:
        """A worker is gone without handing its jobs back: requeue them.

        Only the jobs it was running are charged an attempt (see Policy.lost);
        the ones waiting behind them never started.
        """
        self.peers.pop(w.ident, None)
        self.store.worker_left(w.id, why)
        if w.info:
            threading.Thread(target=self._post_mortem, args=(w,), daemon=True).start()
        charged, spared = self.policy.lost(w)
        if charged:
            self.store.count_attempt([j.id for j in charged])
            self._record_attempts(w, [j for j in charged if j.attempts < j.max_retries], P.LOST, why)
        failed = 0
        for job in reversed(spared):
            self._requeue(job)
        for job in reversed(charged):
            job.attempts += 1
            job.lost_on = (job.lost_on or []) + [w.describe()]
            if job.attempts > job.max_retries:
                failed += 1
                self._finish(job, P.LOST, b"", self._lost_error(job), "", w.id, None)
            else:
                self._requeue(job)
        log.warning("worker %s on %s lost (%s): %d jobs requeued, %d of them charged an attempt;"
                    " %d failed", w.describe(), w.host, why, len(charged) + len(spared) - failed,
                    len(charged) - failed, failed)  # fmt: skip

    def _lost_error(self, job: Job) -> str:
        lines = [f"job lost its worker {job.attempts} times (max_retries={job.max_retries}):"]
        for d in job.lost_on or ():
            wid = d.split(" ", 1)[0]
            pm = self.post_mortems.get(wid)
            lines.append(f"  {d}{f': {pm}' if pm else ''}")
        return "\n".join(lines)

    def _post_mortem(self, w: Worker) -> None:
        """Ask the batch system what became of a lost worker (off the loop's thread)."""
        try:
            text = environment_of(w.info).post_mortem()
        except Exception as e:  # never let a post-mortem take the master down
            text = f"post-mortem failed: {e!r}"
        if text:
            self._pm_queue.put((w.id, text))

    def _record_post_mortems(self) -> None:
        while not self._pm_queue.empty():
            wid, text = self._pm_queue.get()
            self.post_mortems[wid] = text
            self.store.worker_left(wid, text)
            log.warning("worker %s post-mortem: %s", wid, text)

    def _check_unschedulable(self, now: float) -> None:
        """Jobs that require what no connected worker has: their clients are warned at once
        (and again every NO_WORKERS_WARNING s: a worker that has it may still join), and
        the jobs fail once their client's ``unsatisfiable_timeout`` has passed."""
        warned = {}
        for requires, q, since in self.policy.unschedulable(now):
            rkey = repr(requires)
            warned[rkey] = last = self._unmet.get(rkey, -1e18)
            if now - last >= defaults.NO_WORKERS_WARNING:
                warned[rkey] = now
                text = (f"{len(q)} jobs require {requires}, which none of the {len(self.policy.workers)}"
                        f" connected workers offers; they offer: {self.policy.describe_workers()}")  # fmt: skip
                log.warning(text)
                for s in {j.session for j in list(q)[:1000] if j.session is not None}:
                    s.notices.append(text)
            expired = [j for j in q if j.worker is None and self.policy.jobs.get(j.id) is j
                       and now - since >= self._unsatisfiable_after(j)]  # fmt: skip
            for j in expired:
                err = (f"job {j.id} requires {requires}, which none of the {len(self.policy.workers)} connected"
                       f" workers has offered for {now - since:.0f} s (Client(unsatisfiable_timeout=...));"
                       f" they offer: {self.policy.describe_workers()}")  # fmt: skip
                self._finish(j, P.UNSATISFIABLE, b"", err, "", None, None)
            if expired:
                self.policy.prune()
        self._unmet = warned  # requirements met again (or gone) are warned anew if they return

    def _unsatisfiable_after(self, job: Job) -> float:
        s = job.session
        t = s.unsatisfiable if s is not None else defaults.UNSATISFIABLE_TIMEOUT
        return float("inf") if t is None else t
