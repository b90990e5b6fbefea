"""What the master does for graphs: jobs whose inputs are other jobs' results, and scattered data.

Part of :class:`cw.master.server.Master` (a mixin: it uses the master's store,
policy and sending). A job whose arguments name futures is held outside the
policy's queues until every input has a result, then queued; an input that
fails finishes its dependents with status DEPENDENCY (carrying the first
failure), one cancelled cancels them, both all the way down the graph. The
values of inputs stay here (and in the store) and reach workers when they ask
(NEED, answered by DATA); scattered data reaches each worker once.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any, Iterable, Optional

from .. import defaults
from .. import protocol as P
from ..serialize import DataCache
from .policy import Job, Worker

log = logging.getLogger(__name__)

SENT_KINDS = ("functions", "arguments", "refs", "inputs")


class GraphHandlers:
    """The master's graph side (mixed into Master)."""

    def _graph_init(self) -> None:
        self.held: dict[int, Job] = {}  # jobs waiting for inputs that have no result yet
        self.dependents: dict[int, list[Job]] = {}  # input job id -> jobs that wait for it
        self.values = DataCache(defaults.MASTER_DATA_CACHE)
        self.sent = dict.fromkeys(SENT_KINDS, 0)  # bytes sent to workers, by kind
        self.broadcasts: list[str] = []  # scattered data to push to every worker after the commit
        self._cascade: Optional[list] = None

    # -- taking jobs in ------------------------------------------------------------------
    def _resolve_inputs(self, s: Any, seqs: list[int], batch: dict[int, int]) -> tuple[list[int], list[int]]:
        """The job ids of a session's futures named as inputs (-1 - i for the i-th job of the
        batch being stored; ``batch`` maps a seq of that batch to i, or to -1 - the job id it
        attached to), and the seqs it does not know."""
        ids, unknown = [], []
        look = []
        for seq in seqs:
            job = s.jobs.get(seq)
            jid = job.id if job is not None else s.recent.get(seq)
            if jid is None and seq in batch:
                jid = -1 - batch[seq]
            if jid is None:
                look.append(seq)
            ids.append(jid)
        if look:
            found = self.store.resolve(s.id, look)
            for i, seq in enumerate(seqs):
                if ids[i] is None:
                    ids[i] = found.get(seq)
                    if ids[i] is None:
                        unknown.append(seq)
        return ids, unknown

    def _admit(self, job: Job) -> None:
        """A new or stored job into memory: queued if its inputs have results, held if not,
        finished if one of them failed or was cancelled."""
        if not job.inputs:
            self._enqueue(job)
            return
        jobs, held = self.policy.jobs, self.held
        done = []
        missing = 0
        for jid in set(job.inputs):
            dep = jobs.get(jid) or held.get(jid)
            if dep is not None:
                self.dependents.setdefault(jid, []).append(job)
                missing += 1
            else:
                done.append(jid)
        if done:
            known = self.store.statuses(done)
            bad = [j for j in done if known.get(j, P.OK) != P.OK]
            lost = [j for j in done if j not in known]  # no result, not in memory: waiting in the store only
            if bad:
                self._unhook(job)
                self._fail_dependent(job, bad[0], known[bad[0]])
                return
            for jid in lost:  # (a job taken in before its inputs, to be attached to): held until they finish
                self.dependents.setdefault(jid, []).append(job)
                missing += 1
        job.missing = missing
        if missing:
            held[job.id] = job
            self.policy.outside = len(held)
            if job.session is not None:
                job.session.jobs[job.seq] = job
        else:
            self._enqueue(job)

    def _unhook(self, job: Job) -> None:
        for jid in set(job.inputs or ()):
            waiting = self.dependents.get(jid)
            if waiting and job in waiting:
                waiting.remove(job)
                if not waiting:
                    del self.dependents[jid]

    def _fail_dependent(self, job: Job, input_id: int, status: int) -> None:
        """Finish a job whose input did not succeed: cancelled with it, or DEPENDENCY with
        the first failure of the chain."""
        if status == P.CANCELLED:
            self._finish(job, P.CANCELLED, b"", f"cancelled: its input job {input_id} was cancelled", "",
                         None, None)  # fmt: skip
            return
        out = self.store.outcomes([input_id]).get(input_id)
        if out is None:
            root = (input_id, None, None, status, "failed", "", b"")
        else:
            st, value, err, tb, session, seq = out
            root = pickle.loads(value) if st == P.DEPENDENCY and value else (input_id, session, seq, st, err, tb, value)
        self._finish(job, P.DEPENDENCY, pickle.dumps(root, protocol=5), _dependency_text(root), root[5] or "",
                     None, None)  # fmt: skip

    # -- a job finished: its dependents ------------------------------------------------
    def _graph_finished(self, job: Job, status: int, blob: bytes, err: Any, tb: Any) -> bool:
        """Release or fail the jobs waiting for this one; True if it succeeded and had any (its
        value then stays here: clients get it when they ask)."""
        if self.held and self.held.pop(job.id, None) is not None:
            self.policy.outside = len(self.held)
            self._unhook(job)
        waiting = self.dependents.pop(job.id, None) if self.dependents else None
        if not waiting:
            return False
        if status == P.OK:
            self.values.put(job.id, blob)
            for d in waiting:
                d.missing -= 1
                if d.missing <= 0 and self.held.pop(d.id, None) is not None:
                    self.policy.outside = len(self.held)
                    self._enqueue(d)
            return True
        if status == P.DEPENDENCY and blob:
            root = pickle.loads(blob)
        else:
            s = job.session
            root = (job.id, s.id if s is not None else None, job.seq, status, err, tb, blob)
        cascade = [(d, root, status) for d in waiting]
        if self._cascade is not None:  # finishing inside a cascade: the outer loop goes on
            self._cascade.extend(cascade)
            return False
        self._cascade = cascade
        try:
            while self._cascade:
                d, root, st = self._cascade.pop()
                if d.id not in self.held:
                    continue  # finished already (another input failed first)
                if st == P.CANCELLED:
                    self._finish(d, P.CANCELLED, b"", f"cancelled: its input job {root[0]} was cancelled", "",
                                 None, None)  # fmt: skip
                else:
                    self._finish(d, P.DEPENDENCY, pickle.dumps(root, protocol=5), _dependency_text(root),
                                 root[5] or "", None, None)  # fmt: skip
        finally:
            self._cascade = None
        return False

    # -- data out ---------------------------------------------------------------------------
    def _task_data(self, w: Worker, job: Job, refs_out: list, blobs_out: list) -> Optional[str]:
        """The scattered data a task needs that its worker lacks (appended); why it cannot run."""
        for h in job.refs or ():
            if h in w.refs:
                continue
            blob = self.values.get(h)
            if blob is None:
                blob = self.store.ref(h)
                if blob is None:
                    return f"scattered data {h} is not in the store {self.store.path}"
                self.values.put(h, blob)
            w.refs.add(h)
            refs_out.append(h)
            blobs_out.append(blob)
            self.sent["refs"] += len(blob)
        return None

    def _need(self, w: Worker, h: dict) -> None:
        """A worker lacks inputs or scattered data: DATA, from memory or the store."""
        ids = [int(i) for i in h.get("i") or ()]
        hashes = [str(x) for x in h.get("x") or ()]
        stored = self.store.outcomes([i for i in ids if self.values.get(i) is None]) if ids else {}
        rows, blobs = [], []
        for jid in ids:
            blob = self.values.get(jid)
            if blob is not None:
                rows.append((jid, P.OK))
            elif jid in stored:
                st, blob = stored[jid][0], stored[jid][1] or b""
                rows.append((jid, st))
            else:
                rows.append((jid, -1))  # no result: the worker fails the task that wanted it
                blob = b""
            blobs.append(blob)
            self.sent["inputs"] += len(blob)
        xblobs = []
        for x in hashes:
            blob = self.values.get(x) or self.store.ref(x) or b""
            if blob:
                w.refs.add(x)
            xblobs.append(blob)
            self.sent["refs"] += len(blob)
        sizes = [len(b) for b in blobs]
        for part in P.batches(sizes) if rows else ():
            self._send(w.ident, P.DATA, {"i": rows[part]}, blobs[part])
        for x, blob in zip(hashes, xblobs):
            self._send(w.ident, P.DATA, {"x": [x]}, [blob])

    def _scattered(self, rows: Iterable, blobs: list[bytes]) -> list[int]:
        """Store a client's scattered data; the seqs that acknowledge it."""
        items, seqs = [], []
        for (seq, h, broadcast), blob in zip(rows, blobs):
            items.append((str(h), blob))
            seqs.append(seq)
            if broadcast:
                self.broadcasts.append(str(h))
        if items:
            self.store.add_refs(items)
            for h, blob in items:
                self.values.put(h, blob)
        return seqs

    def _broadcast(self) -> None:
        """Push scattered data to every connected worker that lacks it (after the commit)."""
        hashes, self.broadcasts = self.broadcasts, []
        for h in dict.fromkeys(hashes):
            blob = self.values.get(h) or self.store.ref(h)
            if blob is None:
                continue
            for w in list(self.policy.workers.values()):
                if h not in w.refs and not w.draining:
                    w.refs.add(h)
                    self._send(w.ident, P.DATA, {"x": [h]}, [blob])
                    self.sent["refs"] += len(blob)


def _dependency_text(root: tuple) -> str:
    job, _, seq, status, err, _, _ = root
    what = P.STATUS_NAMES.get(status, str(status))
    return f"input job {job} ({what}): {err or what}"
