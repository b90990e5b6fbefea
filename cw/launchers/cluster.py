"""``cw.SlurmCluster`` and ``cw.SGECluster``: a pool of workers from Python.

    with cw.SlurmCluster(cores=4, memory="8G", walltime="1:00:00") as cluster, cw.Client(cluster) as client:
        cluster.adapt(maximum=20)
        results = client.gather(client.map(f, range(1000)))

The options are those of ``cw slurm up`` / ``cw sge up`` (by the keys of
their :class:`~cw.launchers.base.Option`), and the names dask-jobqueue users
know where they mean the same (``cores``, ``memory``, ``walltime``,
``queue``, ``account``, ``job_extra_directives``; each backend maps them in
:meth:`~cw.launchers.base.Scheduler.jobqueue_options`). The object starts
the master (here, or as a batch job with ``master_here=False``) and the
pool's keeper beside it, exactly as ``up`` does, and records itself as the
pool's owner: when this process ends, however it ends, the keeper drains
the workers and stops the master, unless ``keep=True``.

:func:`master_host` (``cw.slurm_master_host()``, ``cw.sge_master_host()``)
is the original Cluster-Workers API: the host of the master, from the
cluster directory, else from the batch system.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import weakref
from typing import Any, ClassVar, Mapping

from ..defaults import (
    ADAPT_IDLE_TIMEOUT,
    ADAPT_INTERVAL,
    ADAPT_TARGET,
    DOWN_WAIT,
    OWNER_LEASE,
    POLL,
    UP_WAIT,
)
from ..discovery import ClusterDir, pid_alive
from ..errors import ConfigError, NoMasterError
from . import backends
from .adapt import Adaptive
from .base import RUNNING, Scheduler, parse_bytes
from .elastic import master_status, scale
from .owner import Lease
from .pool import Pool
from .surface import ClusterSurface, seconds_of, short_duration

log = logging.getLogger(__name__)


def cluster_dir(cluster: str | os.PathLike | None) -> ClusterDir:
    """A cluster directory from a path (with a '/') or a name under $CW_HOME (default: $CW_CLUSTER)."""
    if cluster is None:
        return ClusterDir()
    c = os.fspath(cluster)
    return ClusterDir(path=c) if os.sep in c else ClusterDir(name=c)


class BatchCluster(ClusterSurface):
    """A pool on a batch system, owned by this Python process (see the module's doc)."""

    backend: ClassVar[str] = ""

    def __init__(self, cores: int | None = None, memory: str | int | None = None, walltime: str | None = None,
                 queue: str | None = None, account: str | None = None,
                 job_extra_directives: list[str] | None = None, *, n_workers: int = 0,
                 cluster: str | os.PathLike | None = None, master_here: bool = True,
                 master_time: str | None = None, interface: str | None = None,
                 array_parallelism: int | None = None, grace: float | None = None, heal: bool = True,
                 max_heals: int | None = None, poll: float = POLL, wait: float = UP_WAIT, keep: bool = False,
                 profiles: Mapping[str, Mapping[str, Any]] | None = None, lease: float = OWNER_LEASE,
                 **options: Any):  # fmt: skip
        cls = backends().get(self.backend)
        if cls is None:
            raise ConfigError(f"this cw has no {self.backend} backend (it has: {', '.join(backends())})")
        self.scheduler: Scheduler = cls()
        values = {"cores": cores, "memory": memory, "walltime": walltime, "queue": queue, "account": account,
                  "job_extra_directives": job_extra_directives, **options}  # fmt: skip
        opts = cls.up_options(cls.jobqueue_options(values))
        if array_parallelism:
            opts["array_parallelism"] = int(array_parallelism)
        if grace is not None:
            opts["grace"] = float(grace)
        self.options = opts
        self.cluster = cluster_dir(cluster)
        self.pool = Pool(self.scheduler, self.cluster)
        self.keep = keep
        self._closed = False
        self._refuse_a_live_pool()
        self.lease: Lease | None = None
        if not keep:
            self.cluster.make()
            self.lease = Lease(self.cluster, lease)
        if int(n_workers) < 0:
            raise ConfigError(f"n_workers={n_workers}: a number of workers is 0 or more")
        rec = self.pool.read() if keep else None
        if rec and not rec.get("stopping") and self.pool.answering_master():
            # keep=True on a live pool: use it as it is (its size, heal budget and batch options
            # stay those it was started with); only a larger n_workers grows it
            if int(n_workers) > int(rec.get("target") or 0):
                scale(self.pool, int(n_workers))
            _live.add(self)
            return
        try:
            self.pool.up(int(n_workers), opts, master_options=cls.master_options(opts, master_time), heal=heal,
                         max_heals=max_heals, master_here=master_here, poll=poll, wait=wait, interface=interface,
                         report=log.info, profiles=self._profiles(cls, profiles or {}),
                         owner=self.lease.record() if self.lease else None)  # fmt: skip
        except BaseException:
            self.close()
            raise
        if self.lease is not None:
            self.lease.start()
        _live.add(self)

    def _refuse_a_live_pool(self) -> None:
        """A pool that someone else owns (or `up` started) is not ours to take down."""
        rec = self.pool.read()
        if not rec or self.keep or rec.get("stopping"):
            return
        owner = rec.get("owner")
        if owner and owner.get("host") == socket.gethostname() and not pid_alive(owner.get("pid")):
            return  # its owner is gone: its keeper is taking it down, or will
        if owner is None and not self.pool.answering_master():
            return
        if owner and owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid():
            raise ConfigError(f"this process already owns the pool in {self.cluster.path}: close that cluster"
                              " object first (cluster.close()), or pass another cluster=")  # fmt: skip
        who = f"process {owner['pid']} on {owner['host']}" if owner else f"`cw {self.backend} up`"
        raise ConfigError(f"{self.cluster.path} holds a live pool started by {who}: use another cluster="
                          f" (a name or a path), or keep=True to use that pool and leave it running")  # fmt: skip

    @staticmethod
    def _profiles(cls: type[Scheduler], profiles: Mapping[str, Mapping[str, Any]]) -> list[dict]:
        out = []
        for name, spec in profiles.items():
            spec = dict(spec)
            provides = dict(spec.pop("provides", {}) or {})
            if "mem" in provides:
                provides["mem"] = parse_bytes(provides["mem"])
            maximum = spec.pop("maximum", None)
            if not name or not str(name).replace("-", "").replace("_", "").isalnum():
                raise ConfigError(f"profile name {name!r}: letters, digits, '-' and '_' only")
            out.append({"name": str(name), "provides": provides, "maximum": maximum,
                        "options": cls.up_options(cls.jobqueue_options(spec))})  # fmt: skip
        return out

    # -- what a Client needs ------------------------------------------------------------
    @property
    def address(self) -> str | None:
        """The master's address, as it publishes it (master.json)."""
        return self.cluster.master_address()

    # -- size ---------------------------------------------------------------------------
    def scale(self, n: int | None = None, *, jobs: int | None = None, cores: int | None = None,
              memory: str | int | None = None) -> None:  # fmt: skip
        """Hold the pool at ``n`` workers (one per array task) from now on; stops adapting.

        ``jobs`` is the same as ``n``; ``cores`` and ``memory`` ask for enough
        workers to give that many cores or that much memory (as dask-jobqueue's
        ``scale``). Surplus workers are retired: pending tasks cancelled, the
        idle ones first drained.
        """
        n = _workers(n, jobs, cores, memory, self.scheduler.provides(self.options))
        scale(self.pool, n)

    def adapt(self, minimum: int = 0, maximum: int = 100, idle_timeout: float | str = ADAPT_IDLE_TIMEOUT,
              *, target_duration: float | str = ADAPT_TARGET, interval: float | str = ADAPT_INTERVAL,
              minimum_jobs: int | None = None, maximum_jobs: int | None = None) -> None:  # fmt: skip
        """Size the pool by the queue, between ``minimum`` and ``maximum`` workers.

        It asks for enough workers to run what is queued in about
        ``target_duration`` (by the measured runtime of what is queued), at
        most doubling per ``interval``, and drains workers idle for
        ``idle_timeout``. Decisions are made by the pool's keeper, beside the
        master, every ``interval`` (one scheduler query each).
        """
        settings = {"minimum": minimum if minimum_jobs is None else minimum_jobs,
                    "maximum": maximum if maximum_jobs is None else maximum_jobs,
                    "idle_timeout": seconds_of(idle_timeout, "idle_timeout"),
                    "target": seconds_of(target_duration, "target_duration")}  # fmt: skip
        Adaptive(**settings)  # checks them
        settings["interval"] = max(0.1, seconds_of(interval, "interval"))
        with self.pool.record() as rec:
            rec["adapt"] = settings

    # -- looking ------------------------------------------------------------------------
    def status(self) -> dict:
        """The pool (master, arrays: pending, running, retiring), the connected workers,
        the queue, and the adaptive settings: one scheduler query, one to the master."""
        return self.pool.status()

    def facts(self, live: bool = True) -> list[tuple[str, str]]:
        rec = self.pool.read()
        m = rec.get("master") or {}
        where = "here" if m.get("here") else self.scheduler.describe(m["job"]) if m.get("job") else "none"
        facts = [("", repr(str(self.cluster.path))), ("master", f"{self.address or 'not published'} ({where})")]
        s = master_status(self.pool, timeout=1.0) if live and self.address else None
        if s is not None:
            ws = s.get("workers", [])
            facts.append(("workers", f"{len(ws)} connected, {sum(w.get('slots', 0) for w in ws)} slots"))
            facts.append(("jobs", f"{s.get('queued', 0)} queued, {s.get('running', 0)} running, {s.get('done', 0)} done"))
        elif live:
            facts.append(("workers", "master not answering"))
        a = rec.get("adapt")
        if a:
            facts.append(("adapt", f"{a['minimum']}..{a['maximum']}, idle {short_duration(a['idle_timeout'])}"))
        else:
            facts.append(("size", str(rec.get("target", 0))))
        arrays = rec.get("arrays") or []
        facts.append(("arrays", f"{len(arrays)} ({sum(x['tasks'] for x in arrays)} tasks submitted)"))
        if self.keep:
            facts.append(("keep", "True"))
        return facts

    # -- the end ----------------------------------------------------------------------
    def close(self, wait: float = DOWN_WAIT) -> None:
        """Drain the workers, cancel the pool's jobs and stop the master (unless keep=True:
        then the pool lives on, and ``cw <backend> down`` stops it)."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        try:
            if self.keep:
                if self.pool.read():
                    log.info("the pool in %s lives on (keep=True): stop it with `cw %s down --cluster-dir %s`",
                             self.cluster.path, self.backend, self.cluster.path)  # fmt: skip
            elif self.pool.read():
                self.pool.down(wait=wait)
        finally:
            if self.lease is not None:
                self.lease.stop()


def _workers(n: int | None, jobs: int | None, cores: int | None, memory: Any, provides: dict) -> int:
    if n is None:
        n = jobs
    if n is None and cores is not None:
        n = -(-int(cores) // int(provides.get("cpus") or 1))
    if n is None and memory is not None:
        if not provides.get("mem"):
            raise ConfigError("scale(memory=...): the workers' memory is unknown: give memory= to the cluster")
        n = -(-parse_bytes(memory) // int(provides["mem"]))
    if n is None or int(n) < 0:
        raise ConfigError("scale: give a number of workers (n, jobs), cores or memory")
    return int(n)


class SlurmCluster(BatchCluster):
    """A pool of workers on SLURM, from Python: the options of ``cw slurm up`` (``partition``,
    ``time``, ``cpus_per_task``, ``mem``, ``account``, ``extra``) or dask-jobqueue's names."""

    backend = "slurm"


class SGECluster(BatchCluster):
    """A pool of workers on Grid Engine, from Python: the options of ``cw sge up`` (``queue``,
    ``pe``, ``time``, ``mem``, ``extra``) or dask-jobqueue's names (``cores`` asks for a
    ``smp`` parallel environment, ``memory`` is the task's total)."""

    backend = "sge"


# pools still open when the interpreter exits go down with it (keep=True ones live on)
_live: weakref.WeakSet = weakref.WeakSet()
_exit_lock = threading.Lock()


@atexit.register
def _close_at_exit() -> None:
    with _exit_lock:
        for c in list(_live):
            try:
                c.close()
            except Exception as e:
                log.error("taking down the pool of %s at exit: %s", c.cluster.path, e)


# -------------------------------------------------------------- the master's host
def master_host(backend: str, cluster: str | os.PathLike | None = None) -> str:
    """The host the master runs on: from master.json if a live master published it, else
    from the batch system (the pool's master job, or a job named ``cw-<cluster>-master``
    or ``cw-master`` of this user). Raises NoMasterError if neither knows one."""
    cdir = cluster_dir(cluster)
    info = cdir.read_master()
    if info and cdir.master_address():
        return str(info.get("advertised_host") or info.get("host"))
    cls = backends().get(backend)
    if cls is None:
        raise ConfigError(f"this cw has no {backend} backend (it has: {', '.join(backends())})")
    sched, pool = cls(), Pool(cls(), cdir)
    job = (pool.read().get("master") or {}).get("job")
    tasks = sched.tasks([job]) if job else None
    names = [pool.job_name("master"), "cw-master"]
    found = [t for t in tasks or () if t.state == RUNNING and t.host]
    if not found:
        found = [t for t in sched.named(names) or () if t.state == RUNNING and t.host]
    if found:
        return found[0].host
    raise NoMasterError(f"no master: {cdir.master_json} names no live master, and {cls.title} runs no job"
                        f" {'nor '.join(repr(n) + ' ' for n in names)}of this user; start one"
                        f" (`cw {backend} up`)")  # fmt: skip


def slurm_master_host(cluster: str | os.PathLike | None = None) -> str:
    """The host of the master (as the original Cluster-Workers' ``slurm_master_host()``)."""
    return master_host("slurm", cluster)


def sge_master_host(cluster: str | os.PathLike | None = None) -> str:
    """The host of the master on Grid Engine (the SGE counterpart of ``slurm_master_host()``)."""
    return master_host("sge", cluster)


__all__ = ["BatchCluster", "SGECluster", "SlurmCluster", "master_host", "sge_master_host",
           "slurm_master_host"]  # fmt: skip
