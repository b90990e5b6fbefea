"""``Client``: futures on a cw cluster (``submit``, ``map``, ``gather``, ``cancel``).

A Client pickles each job in the caller's thread and hands it to its
:class:`~cw.client.connection.Connection`. With no master configured it starts
an embedded local cluster (``Client.embedded``); with ``serial=True`` it runs
each job in-process, after the same serialization round trip a cluster makes.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fnmatch
import itertools
import os
import sys
import threading
import time
from typing import Any, Callable, ClassVar, Iterable

from .. import current, defaults, job
from ..command import Command, argv, check_env, run_command
from ..discovery import ClusterDir, resolve_address
from ..errors import (
    ClientError,
    ConfigError,
    JobError,
    MessageTooLargeError,
    NeedsReferences,
    NoMasterError,
    TimeoutError,
)
from ..link import query_status
from ..resources import checked_key, limits, requirements, run_name
from ..serialize import (
    FunctionCache,
    data_hash,
    dumps_args,
    dumps_function,
    dumps_result,
    job_key,
    loads,
)
from ..serialize import ship_modules as ship
from .connection import Connection
from .futures import Delivery, Future
from .graph import Ref, dumps_graph_args, loads_serial_args, prefetch
from .graph import reduce as tree_reduce
from .progress import track

#: submit's own keywords (the rest go to the function)
_OPTIONS = ("cache", "requires", "timeout", "max_retries", "output_limit")


class Client:
    """Futures on a cw cluster: ``submit``, ``map``, ``gather``, ``as_completed``.

    ``Client()`` finds the master through ``$CW_ADDRESS`` or master.json in the
    cluster directory; with none, it starts an embedded local cluster.
    ``Client(cluster)`` connects to a cluster object (``cw.LocalCluster``).
    ``Client(serial=True)`` runs every job in-process, in order, after the same
    serialization round trip a cluster would make. Jobs that require what no
    connected worker offers are warned about at once and fail with
    :class:`cw.errors.UnsatisfiableError` after ``unsatisfiable_timeout``
    seconds (None: they wait for such a worker for ever).
    """

    #: What ``Client()`` starts when no master is configured: a callable taking
    #: ``n_workers`` and returning a cluster (``address``, ``cluster``, ``close()``).
    #: cw sets it to LocalCluster (the client layer knows no launcher).
    embedded: ClassVar[Callable[..., Any] | None] = None

    def __init__(
        self,
        address: str | Any | None = None,
        *,
        run: str | None = None,
        cluster: str | os.PathLike | None = None,
        serial: bool = False,
        n_workers: int | None = None,
        env: dict | None = None,
        env_from: Iterable[str] | None = None,
        ship_modules: Iterable[Any] = (),
        timeout: float | None = None,
        max_retries: int | None = None,
        output_limit: int | None = None,
        unsatisfiable_timeout: float | None = defaults.UNSATISFIABLE_TIMEOUT,
        connect_timeout: float = defaults.CONNECT_TIMEOUT,
        master_timeout: float = defaults.MASTER_TIMEOUT,
        _context: dict | None = None,
    ):
        self.run = run_name(run)
        self.serial = serial
        self._data: dict[str, bytes] = {}  # a serial client's scattered data
        timeout, max_retries, output_limit = limits(timeout, max_retries, output_limit)  # refused now, not per job
        self.defaults = {"t": timeout, "m": max_retries}
        self._local = None
        self._conn: Connection | None = None
        self._functions = FunctionCache()  # each function pickled once by this client
        if ship_modules:
            ship(ship_modules)
        if serial:
            self._archive = _cluster_dir(cluster).path / "outputs"
            return
        named = cluster is not None or (address is not None and not isinstance(address, str))
        if address is not None and not isinstance(address, str):  # a cluster object
            cdir, address = address.cluster, address.address
        else:
            cdir = _cluster_dir(cluster)
        if resolve_address(address, cdir) is None:
            if named:  # a cluster asked for by name or object: its work never goes elsewhere
                raise NoMasterError(f"no master is running for the cluster in {cdir.path} (no master.json):"
                                    " start it (or its pool), or leave cluster= out for the embedded one")  # fmt: skip
            if Client.embedded is None:
                raise ConfigError(f"no master address: none given, no master.json in {cdir.path}")
            self._local = Client.embedded(n_workers=n_workers)
            cdir, address = self._local.cluster, self._local.address
        try:
            context = _context if _context is not None else _client_context(env, env_from)
            if output_limit is not None:  # each job's stdout and stderr keep their last bytes
                context["output_limit"] = int(output_limit)
            self._conn = Connection(cdir.key(), run, context, cdir, address, connect_timeout, master_timeout,
                                    unsatisfiable_timeout)  # fmt: skip
        except BaseException:
            if self._local is not None:
                self._local.close()
            raise

    @property
    def address(self) -> str | None:
        return self._conn.address if self._conn else None

    def __repr__(self) -> str:
        where = "serial" if self.serial else self.address
        return f"<cw.Client {where} run={self.run!r}>"

    # -- submission ---------------------------------------------------------------
    def submit(self, fn: Callable, /, *args: Any, key: str | None = None, cache: bool = True,
               requires: dict | None = None, timeout: float | None = None,
               max_retries: int | None = None, output_limit: int | None = None,
               **kwargs: Any) -> Future:  # fmt: skip
        """Run ``fn(*args, **kwargs)`` on the cluster; return its future at once.

        ``key``, ``cache``, ``requires``, ``timeout``, ``max_retries`` and
        ``output_limit`` (bytes of the job's stdout, and of its stderr, that
        the store keeps: the tail) are cw's own options and are not passed to
        ``fn`` (``Executor`` and ``ClientThread`` pass every keyword to the function).
        """
        return self._submit(fn, args, kwargs, key=key, cache=cache, requires=requires,
                            timeout=timeout, max_retries=max_retries, output_limit=output_limit)  # fmt: skip

    def submit_shell(self, cmd: Command, *, cwd: str | os.PathLike | None = None, env: dict | None = None,
                     input: str | bytes | None = None, shell: bool | None = None, check: bool = True,
                     outputs: Iterable[str] | str | None = None, scratch: bool = False,
                     key: str | None = None, cache: bool = True, requires: dict | None = None,
                     timeout: float | None = None, max_retries: int | None = None,
                     output_limit: int | None = None) -> Future:  # fmt: skip
        """Run a command on the cluster, as ``subprocess.run`` would there; its future at once.

        ``cmd`` is a command line (run by ``/bin/sh -c``) or an argv list; ``env``
        adds variables to the job's environment (None removes one); ``input`` is
        its stdin. The result is a :class:`cw.CompletedCommand` (``returncode``,
        ``stdout``, ``stderr``); a non-zero exit raises :class:`cw.CommandError`
        unless ``check=False``. ``scratch=True`` runs it in a private scratch
        directory on the worker's disk, wiped after the job; the files matching
        the ``outputs`` globs (relative to where it ran), and those it writes to
        ``$CW_OUTPUTS``, are archived under the run and the job's key (``cw
        pull``). ``key``, ``cache``, ``requires``, ``timeout``, ``max_retries`` and
        ``output_limit`` (the bytes of stdout and of stderr kept) are as for
        :meth:`submit`. A timeout or a cancel kills the command with every
        process of its group.
        """
        args, kwargs = shell_job(cmd, cwd, env, input, shell, check, outputs, scratch)
        if output_limit is not None:
            kwargs["output_limit"] = int(output_limit)
        return self._submit(run_command, args, kwargs, key=key, cache=cache, requires=requires,
                            timeout=timeout, max_retries=max_retries, output_limit=output_limit)  # fmt: skip

    def _submit(self, fn: Callable, args: tuple, kwargs: dict, *, key: str | None = None,
                cache: bool = True, requires: dict | None = None, timeout: float | None = None,
                max_retries: int | None = None, output_limit: int | None = None,
                sink: Callable | None = None, kill: bool = True) -> Future | Delivery:  # fmt: skip
        # checked here: a clear error now (InvalidJobError), not a job that never runs or dies at once
        key = checked_key(key)
        requires = requirements(requires)
        timeout, max_retries, output_limit = limits(timeout, max_retries, output_limit)
        fn_hash, fn_blob = dumps_function(fn, self._functions)
        inputs, refs = (), ()
        try:
            args_blob = dumps_args(args, kwargs)
        except NeedsReferences:  # futures or scattered data among the arguments: by reference
            args_blob, inputs, refs = dumps_graph_args(args, kwargs, self._conn)
        for what, blob in (("arguments", args_blob), ("function", fn_blob)):
            if len(blob) > defaults.MAX_MESSAGE:
                raise MessageTooLargeError(
                    f"the {what} of {getattr(fn, '__qualname__', fn)} pickle to {len(blob)} bytes, more"
                    f" than the largest message ({defaults.MAX_MESSAGE} bytes); put large data on the"
                    " shared filesystem and pass its path"
                )
        if self.serial:
            fut = self._run_serial(fn, args_blob, key, inputs)
            if sink is not None:
                exc = fut.exception()
                sink(fut.jobid, fut.result() if exc is None else exc, exc is not None)
            return fut
        if self._conn is None:
            raise ClientError("this client is closed: make a new one to submit more jobs")
        if key is None and self.run is not None and cache:
            keys = [f.key for f in inputs]  # a re-run reuses a graph node by node
            plain = None if inputs or refs else (args, kwargs)  # sets in them hashed in sorted order
            key = job_key(fn_hash, args_blob, keys, plain) if None not in keys else None
        opts = self._opts(cache, requires, timeout, max_retries, output_limit) or {}
        if inputs:
            opts["d"] = [f._seq for f in inputs]
        if refs:
            opts["x"] = refs
        return self._conn.submit(fn_hash, fn_blob, args_blob, key, opts or None, sink, kill)

    def _opts(self, cache: bool, requires: dict | None, timeout: float | None, max_retries: int | None,
              output_limit: int | None) -> dict | None:  # fmt: skip
        """A SubmitSpec's opts: only what differs from the defaults."""
        opts: dict = {}
        if current.job_id is not None:  # submitted by a job: its child
            opts["p"] = current.job_id
        if not cache:
            opts["c"] = False
        if requires:
            opts["r"] = requires
        t = timeout if timeout is not None else self.defaults["t"]
        if t is not None:
            opts["t"] = t
        m = max_retries if max_retries is not None else self.defaults["m"]
        if m is not None:
            opts["m"] = m
        if output_limit is not None:
            opts["o"] = output_limit
        return opts or None

    def _submit_many(self, fn: Callable, calls: Iterable[tuple], kwargs: dict | None = None, *, cache: bool = True,
                     requires: dict | None = None, timeout: float | None = None,
                     max_retries: int | None = None, output_limit: int | None = None,
                     kill: bool = True) -> list[Future]:  # fmt: skip
        """The bulk path of map: ``fn(*args, **kwargs)`` for each args tuple; their futures, in order.

        The function is pickled once, the options made once, and the futures made and
        queued a thousand at a time: each job is still its own row, key, result and future.
        """
        if self.serial or self._conn is None:
            return [self._submit(fn, args, kwargs or {}, cache=cache, requires=requires, timeout=timeout,
                                 max_retries=max_retries, output_limit=output_limit, kill=kill)
                    for args in calls]  # fmt: skip
        kw = kwargs or {}
        requires = requirements(requires)  # checked once, as submit checks them
        timeout, max_retries, output_limit = limits(timeout, max_retries, output_limit)
        fn_hash, fn_blob = dumps_function(fn, self._functions)
        if len(fn_blob) > defaults.MAX_MESSAGE:
            return [self._submit(fn, args, kw) for args in calls]  # raises MessageTooLargeError
        opts = self._opts(cache, requires, timeout, max_retries, output_limit)
        keyed = self.run is not None and cache
        futures: list[Future] = []
        blobs: list[bytes] = []
        plain: list[tuple] = []  # the arguments: a key hashes sets in them in sorted order

        def flush() -> None:
            if blobs:
                keys = [job_key(fn_hash, b, (), v) for b, v in zip(blobs, plain)] if keyed else None
                futures.extend(self._conn.submit_many(fn_hash, fn_blob, blobs, keys, opts, kill))
                blobs.clear()
                plain.clear()

        calls = iter(calls)
        while True:
            chunk = list(itertools.islice(calls, defaults.BATCH_JOBS))
            if not chunk:
                return futures
            for args in chunk:
                try:
                    blob = dumps_args(args, kw)
                except NeedsReferences:  # futures or scattered data among its arguments: on its own
                    flush()
                    futures.append(self._submit(fn, args, kw, cache=cache, requires=requires, timeout=timeout,
                                                max_retries=max_retries, output_limit=output_limit, kill=kill))  # fmt: skip
                    continue
                if len(blob) > defaults.MAX_MESSAGE:
                    self._submit(fn, args, kw)  # raises MessageTooLargeError
                blobs.append(blob)
                plain.append((args, kw))
            flush()

    _serial_seq = itertools.count()

    def _run_serial(self, fn: Callable, args_blob: bytes, key: str | None, inputs: Any = ()) -> Future:
        """Run now, in this process: the function itself (so a debugger's breakpoints
        hold), on unpickled copies of the arguments, as a worker would get them."""
        fut = Future(next(self._serial_seq))
        try:
            args, kwargs = loads(args_blob) if not inputs and not self._data else loads_serial_args(
                args_blob, list(inputs), self._data)  # fmt: skip
        except Exception as e:
            fut.set_exception(e)
            return fut
        job.configure(job.worker_dir(), self._archive)
        job.enter_run(self.run)
        job.begin(fut.jobid, key)
        try:
            try:
                value = loads(dumps_result(fn(*args, **kwargs)))
            finally:
                job.end()  # archived in the cluster directory, recorded in no store
        except Exception as e:
            fut.set_exception(e)
        except BaseException as e:  # noqa: B036 - a job's sys.exit() must not end the caller's program
            wrapped = JobError(f"the job raised {type(e).__name__}: {e}")
            wrapped.original = e  # type: ignore[attr-defined]
            fut.set_exception(wrapped)
        else:
            fut.set_result(value)
        return fut

    def map(self, fn: Callable, *iterables: Iterable, progress: bool = False, **options: Any) -> list[Future]:
        """Submit ``fn`` over the zipped iterables; a list of futures, in order. The items
        may be futures (of this client): each job waits for its inputs at the master.

        ``progress=True`` draws a bar (tqdm.auto) that follows the jobs as they finish.
        """
        if "key" in options:  # one key for every job: the submissions attach to the first
            futures = [self.submit(fn, *args, **options) for args in zip(*iterables)]
        else:  # cw's options as submit's; any other keyword goes to fn, as with submit
            ours = {k: options.pop(k) for k in _OPTIONS if k in options}
            futures = self._submit_many(fn, zip(*iterables), options, **ours)
        if progress:
            track(futures, getattr(fn, "__name__", "jobs"))
        return futures

    def reduce(self, fn: Callable, futures: Iterable[Any], split_every: int = 2, **options: Any) -> Future:
        """``fn(a, b)`` folded over the results of ``futures`` by a tree of jobs (``split_every``
        inputs each, pairwise by default); one future. No result passes through the client."""
        return tree_reduce(self, fn, futures, split_every, **options)

    def scatter(self, obj: Any, broadcast: bool = False) -> Ref:
        """Send ``obj`` once; pass the returned ``cw.Ref`` as an argument to any number of jobs.

        Its bytes are stored once, cross the network at most once per worker, and
        are unpickled at most once per executor process. ``broadcast=True`` pushes
        them to every connected worker now.
        """
        blob = dumps_result(obj)
        if len(blob) > defaults.MAX_MESSAGE:
            raise MessageTooLargeError(f"scattered data of {len(blob)} bytes is larger than the largest message"
                                       f" ({defaults.MAX_MESSAGE} bytes): put it on the shared filesystem")  # fmt: skip
        ref = Ref(data_hash(blob), len(blob))
        if self.serial:
            self._data[ref.hash] = blob
        elif self._conn is None:
            raise ClientError("this client is closed: make a new one to scatter data")
        else:
            self._conn.scatter(ref.hash, blob, broadcast)
        return ref

    def gather(self, futures: Iterable[cf.Future], timeout: float | None = None,
               progress: bool = False) -> list:  # fmt: skip
        """Results of the futures, in order; raises the first job exception met.

        ``progress=True`` draws a bar (tqdm.auto): done, failed, total and the rate.
        """
        futures = list(futures)
        bar = track(futures) if progress else None
        prefetch(futures)
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list = []
        pending = not all(f.done() for f in futures)
        with current.waiting() if pending else contextlib.nullcontext():  # inside a job: its slot is lent
            for f in futures:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    out.append(f.result(left))
                except cf.TimeoutError:
                    raise TimeoutError(f"gather: {len(futures) - len(out)} jobs unfinished after {timeout} s") from None
                except BaseException:
                    if bar is not None:
                        bar.close()
                    raise
        return out

    def cancel(self, futures: Iterable[cf.Future] | cf.Future) -> int:
        """Cancel jobs: queued ones are dropped, running ones killed (also an Executor's,
        whose own ``cancel()`` leaves running jobs alone). How many were cancelled."""
        if isinstance(futures, cf.Future):
            futures = [futures]
        return sum(bool(f._cancel(kill=True) if isinstance(f, Future) else f.cancel()) for f in futures)

    def output(self, jobid: int) -> tuple[str | None, str | None]:
        """(stdout, stderr) of a ``ClientThread``'s job ``jobid`` (the number its submit
        returned); (None, None) while it has not finished. A future has ``stdout()``."""
        if self._conn is None:
            raise ClientError("this client is closed (or serial): no output to ask for")
        _, out, err = self._conn.output(jobid)
        return out, err
    @property
    def traffic(self) -> dict:
        """Bytes this client moved: ``sent`` (arguments, functions, scattered data) and
        ``received`` (results)."""
        return dict(self._conn.traffic) if self._conn is not None else {"sent": 0, "received": 0}

    def status(self) -> dict:
        """The master's view: workers, queued and running jobs."""
        if self._conn is None:
            return {"serial": True}
        return query_status(self._conn.address, self._conn.key, encrypt=self._conn.encrypt)

    # -- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        """Disconnect; futures still pending are cancelled. Stops an embedded cluster."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._local is not None:
            self._local.close()
            self._local = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def shell_job(cmd: Command, cwd: Any = None, env: Any = None, input: Any = None, shell: Any = None,
              check: Any = True, outputs: Any = None, scratch: Any = False) -> tuple[tuple, dict]:  # fmt: skip
    """The arguments of :func:`cw.command.run_command` for a shell-command job, checked
    here (a TypeError or ValueError now, not a failed job later)."""
    argv(cmd, shell)  # raises on what is not a command
    if input is not None and not isinstance(input, (str, bytes)):
        raise TypeError(f"input must be text or bytes, not {type(input).__name__}")
    kwargs: dict = {"check": bool(check)}
    if scratch:
        if cwd is not None:
            raise ValueError("a command runs in cwd or in its scratch directory: give one of cwd, scratch")
        kwargs["scratch"] = True
    if outputs:
        globs = [outputs] if isinstance(outputs, str) else list(outputs)
        if not all(isinstance(g, str) and g for g in globs):
            raise TypeError(f"outputs must be glob patterns (strings), not {outputs!r}")
        kwargs["outputs"] = job.check_globs(globs)
    if cwd is not None:
        kwargs["cwd"] = os.fspath(cwd)
    if env:
        kwargs["env"] = check_env(env)
    if input:
        kwargs["input"] = input
    if shell is not None:
        kwargs["shell"] = bool(shell)
    cmd = cmd if isinstance(cmd, str) else [os.fspath(a) for a in cmd]
    return (cmd,), kwargs


_nested: dict[int, Client] = {}  # pid -> the client of jobs running in this process
_nested_lock = threading.Lock()


def get_client(**kwargs: Any) -> Client:
    """Inside a job: a client of the same master, in the run and context of the client that
    submitted the job; the jobs it submits are the job's children. Outside a job: ``Client()``.

    While a job waits on its children's results, the worker runs another job in its slot.
    """
    job = current.running()
    if job is None:
        return Client(**kwargs)
    with _nested_lock:
        c = _nested.get(os.getpid())
        if c is None or c._conn is None:
            c = _nested[os.getpid()] = Client(job.address, cluster=job.cluster, run=job.run, _context=job.context)
    return c


def _cluster_dir(cluster: str | os.PathLike | None) -> ClusterDir:
    if cluster is None:
        return ClusterDir()
    c = os.fspath(cluster)
    return ClusterDir(path=c) if os.sep in c else ClusterDir(name=c)



def _client_context(env: dict | None, env_from: Iterable[str] | None) -> dict:
    """What a job needs to run where the client stands: cwd, sys.path, named variables."""
    variables = dict(env or {})
    for pattern in env_from or ():
        variables.update({k: v for k, v in os.environ.items() if fnmatch.fnmatchcase(k, pattern)})
    return {
        "cwd": os.getcwd(),
        "path": [os.path.abspath(p) if p else os.getcwd() for p in sys.path],
        "env": {str(k): str(v) for k, v in variables.items()},
    }
