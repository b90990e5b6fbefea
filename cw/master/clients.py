"""What the master does for clients: sessions, submissions, cancels, retries, answers.

Part of :class:`cw.master.server.Master` (a mixin: it uses the master's store,
policy and sending). Nothing here is sent before the turn's commit: handlers
queue acknowledgements and results on the session, and
:meth:`ClientHandlers._answer_clients` sends them at the end of the turn.
"""

from __future__ import annotations

import logging
import sys
import time

from .. import defaults
from .. import protocol as P
from ..errors import InvalidJobError
from ..resources import checked_key, limits, requirements
from ..serialize import incompatibility
from ..store import Outcome
from .policy import Job, Worker

log = logging.getLogger(__name__)


class Session:
    """A client session; it outlives its connection (its results wait in the store)."""

    def __init__(self, sid: str, run: str | None, context: dict):
        self.id, self.run, self.context = sid, run, context
        #: seconds its jobs may wait for requirements no connected worker offers (None: for ever)
        self.unsatisfiable: float | None = defaults.UNSATISFIABLE_TIMEOUT
        self.versions: dict = {}
        self.ident: bytes | None = None
        self.jobs: dict[int, Job] = {}  # seq -> unfinished job held in memory
        self.acks: list[int] = []
        self.started: list[int] = []  # seqs a worker started: the client's futures go RUNNING
        self.results: list[P.ClientResult] = []  # sent with self.blobs, after the commit
        self.blobs: list[bytes] = []
        self.notices: list[str] = []
        self.last_sent = 0.0
        self.submitted = self.done = self.failed = 0  # since this master started, for the status
        self.kept: set[int] = set()  # seqs among results whose values stay at the master
        self.recent: dict[int, int] = {}  # finished seq -> job id, the latest ones

    def finished(self, seq: int, jid: int) -> None:
        """Remember a finished submission's job: later jobs may name its future as input
        (older ones are looked up in the store)."""
        recent = self.recent
        recent[seq] = jid
        if len(recent) > defaults.SESSION_RECENT:
            for old in list(recent)[: defaults.SESSION_RECENT // 2]:
                del recent[old]

    def __repr__(self) -> str:
        return f"<session {self.id[:8]}>"


def checked(opts: dict) -> dict:
    """A SUBMIT row's options, checked as the client checks them (InvalidJobError if not):
    a job the policy cannot read must never be stored, or it would stop every master."""
    requires = requirements(opts.get("r"))
    t, m, o = limits(opts.get("t"), opts.get("m"), opts.get("o"))
    return {**opts, "r": requires, "t": t, "m": m, "o": o}


def refusal(row) -> str | None:
    """Why a stored job (a QueuedJob) cannot be taken in, or None: options a master that
    did not check them stored. It fails alone; no master stops on it."""
    if row.requires is None and row.timeout is None:
        return None
    try:
        checked({"r": row.requires, "t": row.timeout})
    except InvalidJobError as e:
        return f"refused by the master: {e}"
    return None


class ClientHandlers:
    """The master's client side (mixed into Master: uses its store, policy, peers and _send)."""

    def _client_hello(self, ident: bytes, h: dict) -> None:
        sid = str(h["session"])
        s = self._session(sid)
        if s is None:
            run = h.get("run")  # a string from our clients; no other value may reach the store
            s = self.sessions[sid] = Session(sid, None if run is None else str(run), h.get("context") or {})
            self.store.add_session(sid, s.run, s.context)
        if s.ident is not None and s.ident != ident:  # the session's old connection is over
            self.peers.pop(s.ident, None)
            self.door.forget(s.ident)
        s.ident = ident
        s.versions = h.get("versions") or {}
        if "unsatisfiable" in h:
            s.unsatisfiable = None if h["unsatisfiable"] is None else float(h["unsatisfiable"])
        if self._compat:  # what its versions allowed, asked again
            self._compat = {k: v for k, v in self._compat.items() if k[0] != sid}
        self.peers[ident] = s
        self._send(ident, P.WELCOME, self._welcome())
        s.last_sent = time.monotonic()
        waiting = h.get("waiting")
        if waiting:  # a client back after a reconnect: what finished meanwhile
            self._stored_results(s, waiting)

    def _from_client(self, s: Session, kind: bytes, h: dict, blobs: list[bytes]) -> None:
        if kind == P.SUBMIT:
            self._submit(s, h, blobs)
        elif kind == P.CANCEL:
            self._cancel(s, h["s"])
        elif kind == P.NEED:  # values kept here (inputs of other jobs), wanted after all
            self._stored_results(s, [int(q) for q in h["s"]])
        elif kind == P.BYE:
            self.peers.pop(s.ident, None)
            self.door.forget(s.ident)
            s.ident = None
        # HEARTBEAT: hearing from it is all it is for

    def _output(self, h: dict) -> dict:
        """A finished job's own output, by session and seq (the answer to OUTPUT)."""
        job = h.get("job")
        row = self.store.output(str(h["session"]), int(h["seq"]), None if job is None else int(job))
        if row is None:
            return {"status": None, "stdout": None, "stderr": None}
        return {"status": row[0], "stdout": row[1], "stderr": row[2]}

    def _welcome(self) -> dict:
        """WELCOME's header: who we are, and which store (epoch) job ids refer to."""
        return {"master": self.id, "heartbeat": self.heartbeat, "epoch": self.store.epoch,
                "store": str(self.store.path)}  # fmt: skip

    def _stored_results(self, s: Session, seqs: list[int]) -> None:
        found = set()
        for r in self.store.session_results(s.id, seqs):
            s.results.append(P.ClientResult(r.seq, r.status, r.error, r.traceback, r.job))
            s.blobs.append(r.value or b"")
            found.add(r.seq)
        if len(found) < len(seqs):  # answered by another job's result: a re-run's, or one attached to
            for seq, status, value, err, tb, job in self.store.alias_results(s.id, [q for q in seqs if q not in found]):
                s.results.append(P.ClientResult(seq, status, err, tb, job))
                s.blobs.append(value or b"")
        self._dirty.add(s)

    def _submit(self, s: Session, h: dict, blobs: list[bytes]) -> None:
        """Store a batch of jobs, then take them in: nothing changes in memory
        unless the whole batch is in the store (a savepoint guards the store).

        In a named run, a job's identity is its function and its key: one that
        already succeeded is answered from the store; one still queued or
        running (of a client that died, or an earlier copy in this batch) gets
        the submission attached, and its result answers both. A job whose
        arguments name futures (``opts.d``) is stored with its edges and held
        until its inputs have results; scattered data (``x``) is stored by hash.
        """
        specs = h["j"]
        if blobs and max(map(len, blobs)) >= defaults.RELEASE_BYTES:
            self.release = True  # hand the memory back once they are gone
        nf = len(h.get("f") or ())
        fns = list(zip(h.get("f") or (), blobs[len(specs) :]))
        scattered = h.get("x") or ()
        seen = self.store.job_ids(s.id, [sp[0] for sp in specs]) if h.get("resend") else {}
        new: list[tuple] = []  # NewJob rows (plain tuples: this runs once per job)
        hits, hit_blobs, attach = [], [], []  # attach: (seq, job id) or (seq, -1 - index in new)
        firsts: dict = {}  # (key, fn) -> index in new, for copies within this batch
        acks = []  # attached submissions are acknowledged with their result, not now
        graph: list[tuple] = []  # per new job with inputs or scattered data: (index in new, inputs, refs)
        aliases, refused = [], []
        batch: dict[int, int] = {}  # seq -> index in new, or -1 - job id attached to: inputs named in this batch
        for (seq, fn, key, opts), args in zip(specs, blobs):  # SubmitSpec rows
            if seq in seen:  # resent after a reconnect: the first copy stands
                acks.append(seq)
                continue
            if seq in s.jobs:  # resent, and attached to a job already
                continue
            opts = opts or {}
            if opts.get("r") or "t" in opts or "o" in opts or "m" in opts or not isinstance(key, (str, type(None))):
                try:  # checked by the client too: a message that skipped it must not reach dispatch or the store
                    opts, key = checked(opts), checked_key(key)
                except InvalidJobError as e:
                    acks.append(seq)
                    hits.append(P.ClientResult(seq, P.FAILED, f"refused by the master: {e}", ""))
                    hit_blobs.append(b"")
                    continue
            if s.run is not None and key is not None and opts.get("c", True):
                if (key, fn) in firsts:
                    attach.append((seq, -1 - firsts[key, fn]))
                    batch[int(seq)] = firsts[key, fn]
                    continue
                m = self.store.match_key(s.run, key, fn)
                if m is not None:
                    if m.status is None:
                        attach.append((seq, m.job))
                        batch[int(seq)] = -1 - m.job
                    else:
                        acks.append(seq)
                        hits.append(P.ClientResult(seq, m.status, m.error, m.traceback, m.job))
                        hit_blobs.append(m.value or b"")
                        aliases.append((s.id, int(seq), m.job))  # later jobs may take it as input
                        s.finished(int(seq), m.job)
                    continue
                firsts[key, fn] = len(new)
            acks.append(seq)
            inputs = None
            if opts.get("d"):
                inputs, unknown = self._resolve_inputs(s, [int(q) for q in opts["d"]], batch)
                if unknown:
                    refused.append((seq, f"its inputs name futures {unknown} this client never submitted"))
                    continue
            if inputs or opts.get("x"):
                graph.append((len(new), inputs, opts.get("x")))
            batch[int(seq)] = len(new)
            retries = opts.get("m")
            new.append((s.id, int(seq), s.run, key, fn, args, opts.get("r"), opts.get("t"),
                        defaults.MAX_RETRIES if retries is None else retries, opts.get("o"), opts.get("p")))  # fmt: skip
        with self.store.savepoint():
            if fns:
                self.store.add_functions(fns)
            ack_x = self._scattered(scattered, blobs[len(specs) + nf :])
            ids = self.store.add_jobs(new) if new else []
            graph = [(i, [ids[-1 - x] if x < 0 else x for x in inputs or ()], refs) for i, inputs, refs in graph]
            if graph:
                self.store.add_graph([(ids[i], pos, inp) for i, inputs, _ in graph for pos, inp in enumerate(inputs)],
                                     [(ids[i], r) for i, _, refs in graph for r in refs or ()])  # fmt: skip
            if aliases:
                self.store.add_aliases(aliases)
        # stored: now the batch counts
        self.functions.update(fns)
        s.acks.extend(acks)
        s.acks.extend(ack_x)
        s.results.extend(hits)
        s.blobs.extend(hit_blobs)
        for seq, why in refused:
            s.results.append(P.ClientResult(seq, P.FAILED, why, ""))
            s.blobs.append(b"")
        edges = {i: (inputs, refs) for i, inputs, refs in graph}
        led = {-1 - j for _, j in attach if j < 0}  # jobs of this batch that others wait for
        spill = self.backlog_from is not None or self.policy.window_full(len(new))
        s.submitted += len(new)
        self.submitted += len(new)
        jobs: list = []
        for i, (jid, (_, seq, _, key, fn, args, requires, timeout, retries, limit, parent)) in enumerate(zip(ids, new)):
            if spill and i not in led:  # the window is full: this job waits in the store only
                if self.backlog_from is None:
                    self.backlog_from = jid
                self.backlog += 1
                jobs.append(None)
            else:
                job = Job(jid, s, seq, fn, args, requires, timeout, retries, 0, limit, key)
                job.parent = parent
                jobs.append(job)
                if i in edges:
                    job.inputs, job.refs = edges[i]
                    self._admit(job)
                else:
                    self._enqueue(job)
        for seq, j in attach:
            job = jobs[-1 - j] if j < 0 else self._held(j)
            if job is None:  # cannot be: the store said it is unfinished
                s.acks.append(seq)
                s.results.append((seq, P.FAILED, f"job {j} vanished before this submission could"
                                  " attach to it: submit it again", "", None))  # fmt: skip
                s.blobs.append(b"")
                continue
            if job.followers is None:
                job.followers = []
            job.followers.append((s, seq))
            s.jobs[seq] = job
        if seen:  # resent because the ack was lost: the result may be lost with it
            self._stored_results(s, [q for q in seen if q not in s.jobs])
        self._dirty.add(s)

    def _held(self, jid: int) -> Job | None:
        """An unfinished job in memory, taken in from the store if it waits there only."""
        job = self.policy.jobs.get(jid) or self.held.get(jid)
        if job is None:
            row = self.store.queued_job(jid)
            if row is not None and not self.store.finished([jid]):
                job = self._take(row)
                if self.backlog_from is not None and jid >= self.backlog_from:
                    self.backlog = max(0, self.backlog - 1)  # no longer only in the store
        return job

    def _cancel(self, s: Session, seqs: list[int]) -> None:
        """Cancel jobs of a session: queued ones are dropped, running ones killed.

        A job other submissions are attached to runs on for them: the canceller
        only lets go of it (as a dask client releasing a shared key).
        """
        by_worker: dict = {}
        stored_only = []
        for seq in seqs:
            job = s.jobs.get(seq)
            if job is None:
                stored_only.append(seq)
                continue
            if job.session is not s or job.seq != seq:  # attached to it: let go
                job.followers.remove((s, seq))
                self._cancelled(s, seq)
                if job.session is not None or job.followers:
                    continue
            elif job.followers:  # others are attached to it: it runs on for them
                job.session = None
                self._cancelled(s, seq)
                continue
            w = job.worker
            if w is not None:
                self.policy.unplace(job)
                by_worker.setdefault(w, []).append(job.id)
            self._finish(job, P.CANCELLED, b"", "cancelled", "", None, None)
        for w, ids in by_worker.items():
            self._send(w.ident, P.CANCEL, {"i": ids})
        self.policy.prune()
        if stored_only:  # not in memory: waiting in the store, or already finished
            ids = self.store.job_ids(s.id, stored_only)
            now = time.time()
            self.store.add_results([Outcome(i, P.CANCELLED, b"", "cancelled", "", None, None, now, None,
                                            None, None, None) for i in ids.values()])  # fmt: skip
            for seq in ids:
                s.results.append(P.ClientResult(seq, P.CANCELLED, "cancelled", "", ids[seq]))
                s.blobs.append(b"")
            self._dirty.add(s)

    def _cancelled(self, s: Session, seq: int) -> None:
        """Tell a session its submission is cancelled (acknowledged too: it may never have been)."""
        s.jobs.pop(seq, None)
        s.acks.append(seq)
        s.results.append((seq, P.CANCELLED, "cancelled", "", None))
        s.blobs.append(b"")
        self._dirty.add(s)

    def _retry(self, run: str) -> int:
        """Requeue the failed jobs of a run, with fresh attempts."""
        rows = self.store.retry_failed(run)
        now = time.time()
        for row in rows:
            if row.id not in self.policy.jobs:
                self._take(row).queued_at = now
        log.info("run %s: %d failed jobs requeued", run, len(rows))
        return len(rows)

    # -- sessions in memory -------------------------------------------------------------
    def _session(self, sid: str) -> Session | None:
        """A session by id: in memory, or brought back from the store (ended sessions
        leave memory, their jobs and results stay in the store)."""
        s = self.sessions.get(sid)
        if s is None:
            rec = self.store.session(sid)
            if rec is not None:
                s = self.sessions[sid] = Session(sid, rec.run, rec.context)
        return s

    def _forget_sessions(self) -> None:
        """Sessions whose client left and whose jobs are all finished leave memory, and
        the functions no job in memory needs with them: memory returns to its baseline."""
        gone = [sid for sid, s in self.sessions.items() if s.ident is None and not s.jobs and not s.results]
        for s in self.sessions.values():
            if not s.jobs and sys.getsizeof(s.jobs) > 1024:  # a dict never shrinks by itself
                s.jobs = {}
        if not self.policy.jobs and sys.getsizeof(self.policy.jobs) > 1024:
            self.policy.jobs = {}
        if not gone:
            return
        for sid in gone:
            del self.sessions[sid]
        self._warned = {w for w in self._warned if w[0] in self.sessions}
        self._compat = {k: v for k, v in self._compat.items() if k[0] in self.sessions}
        needed = {j.fn for j in self.policy.jobs.values()}
        self.functions = {fn: b for fn, b in self.functions.items() if fn in needed}
        self.release = True

    # -- answers, after the commit -----------------------------------------------------
    def _answer_clients(self) -> None:
        now = time.monotonic()
        keep = set()
        for s in self._dirty:
            if s.ident is None:
                s.acks, s.started, s.results, s.blobs = [], [], [], []
                s.kept.clear()
            elif s.results:
                self._send_results(s)
                s.last_sent = now
            elif len(s.acks) + len(s.started) >= defaults.BATCH_JOBS or now - s.last_sent >= defaults.ACK_DELAY:
                header: dict = {"s": s.acks}
                if s.started:
                    header["g"], s.started = s.started, []
                self._send(s.ident, P.ACK, header)
                s.acks, s.last_sent = [], now
            elif s.acks or s.started:  # alone, they wait a moment for a result to ride on
                keep.add(s)
        self._dirty = keep

    def _send_results(self, s: Session) -> None:
        """RESULT messages in batches; the first carries the pending acknowledgements."""
        for part in P.batches([len(b) for b in s.blobs]):
            header: dict = {"r": s.results[part]}
            if s.acks:
                header["s"], s.acks = s.acks, []
            if s.started:
                header["g"], s.started = s.started, []
            if s.kept:
                kept = [r[0] for r in header["r"] if r[0] in s.kept]
                if kept:
                    header["k"] = kept
            self._send(s.ident, P.RESULT, header, s.blobs[part])
        s.results, s.blobs = [], []
        s.kept.clear()

    def _compatible(self, job: Job, w: Worker) -> bool:
        """Whether a worker can unpickle this job's client's pickles (Python, cloudpickle)."""
        s = job.session
        if s is None or not s.versions or not w.versions:
            return True
        pair = (s.id, w.id)
        why = self._compat.get(pair, False)
        if why is False:  # asked once per client and worker, not once per job
            why = self._compat[pair] = incompatibility(s.versions, w.versions)
        if why and (s.id, w.id) not in self._warned:
            self._warned.add((s.id, w.id))
            text = f"worker {w.describe()} on {w.host} cannot run this client's jobs: {why}"
            log.warning("session %s: %s", s.id[:8], text)
            s.notices.append(text)
        return why is None
