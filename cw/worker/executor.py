"""Executor processes: where jobs run, one at a time, forked from the worker's agent.

The isolation is what makes a segfault, ``os._exit``, a memory blow-up or a
timeout survivable: the agent reports the job, replaces the child and keeps
its slot. A child serves one client context (cwd, sys.path, environment) for
its whole life. The agent and a child speak over a pipe: the agent sends a
pickled batch ``(tasks, new functions, context, output limits, data, drop,
where)``, the child answers one pickled tuple per job: the fields of
:class:`cw.protocol.WorkerResult`, the value's blob, what was archived of the
job's outputs (:mod:`cw.job`), then what the job wrote to its fds 1 and 2
(:mod:`cw.worker.output`), each None if nothing (a plain tuple: a named one
costs five times as much to pickle, on every job).

A task's inputs (other jobs' results) and scattered data come in ``data``,
each once while the child keeps it (the agent mirrors the child's cache and
names in ``drop`` what it must forget); the child unpickles each at most once.
A job that waits on jobs it submitted (``cw.get_client()``) sends ``(BLOCKED,
id)`` before it waits and ``(RESUMED, id)`` after, then waits for the agent's
``GO``: meanwhile its slot runs another job.

A job may do what programs do. The processes it starts stay inside the job:
the child leads a process group of its own (the agent kills the group with
it), is a child subreaper (descendants orphaned on the way come back to it),
and after every job it ends whatever the job left running. A process the job
forks never answers on the pipe (it ends where it would have returned into
this loop). The child is an ordinary process, not a daemonic one, so a job
may run a ``multiprocessing.Pool``, on the CPUs its slot was given.
"""

from __future__ import annotations

import collections
import functools
import logging
import multiprocessing
import os
import pickle
import select
import signal
import socket
import sys
import time
import traceback
from typing import Any, Deque, Optional

from .. import current, defaults, job, system
from .. import protocol as P
from ..errors import OutputsError, SerializationError
from ..serialize import dumps_exception, dumps_result, loads, loads_args, loads_function
from .output import Watched, capture, capture_file, collect, leftover
from .pipe import recv_batch

log = logging.getLogger(__name__)

#: Sent by the kernel to a child when its agent dies: it ends the job's processes, then itself.
AGENT_GONE = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else signal.SIGHUP
#: Thread pools that size themselves from these read them when they load.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS", "PYTHON_CPU_COUNT")  # fmt: skip

#: Seconds below which a job cannot have started a process (fork or spawn takes longer):
#: such a job is not checked for processes left behind on its own, only with its batch.
PROCESS_TIME = 20e-6

_me = 0  # this executor's pid: a process with another pid is one the job forked
_pipe_fd = -1

BLOCKED, RESUMED, GO = "B", "U", b"G"  # a job waits on its children; it may go on; it has its slot


class _Pickled:
    """Data as it came (its pickle), until a job first takes it."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes):
        self.blob = blob


def _enter_context(ctx: dict | None) -> None:
    """Run where the client stands: its working directory, import path and variables.

    A child serves one client context for its whole life; the agent replaces it
    before a job of another context, so nothing leaks between clients.
    """
    if not ctx:
        return
    path = [p for p in ctx.get("path", ()) if p]
    sys.path[:] = path + [p for p in sys.path if p not in path]
    os.environ.update(ctx.get("env") or {})
    cwd = ctx.get("cwd")
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as e:
            log.warning("cannot enter the client's directory %s: %s", cwd, e)


def _take_cpus(cpus: Optional[list[int]], n: int) -> None:
    """Run on this slot's CPUs; tell the job (and the pools it starts) how many it has.

    ``os.cpu_count()`` is what ``multiprocessing.Pool()`` and
    ``ProcessPoolExecutor()`` size themselves by; the thread variables size
    BLAS and OpenMP. A variable already set (by the worker's environment, or
    the client's ``env=``) wins.
    """
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except (AttributeError, OSError) as e:
            log.warning("cannot pin the executor to CPUs %s: %s", cpus, e)
    if n:
        if n != os.cpu_count():
            os.cpu_count = lambda: n  # type: ignore[assignment]
        for var in THREAD_VARIABLES:
            os.environ.setdefault(var, str(n))


def _publish_main(fn: Any) -> None:
    """A function from the client's script (``__main__``), sent by value: put it and
    the functions and classes it uses in this process's ``__main__``, so that
    pickle finds them by name when the job hands them to a ``multiprocessing.Pool``."""
    if getattr(fn, "__module__", None) != "__main__":
        return
    main = sys.modules["__main__"]
    names = dict(getattr(fn, "__globals__", {}))
    names[getattr(fn, "__name__", "")] = fn
    for name, obj in names.items():
        if (callable(obj) and getattr(obj, "__module__", None) == "__main__"
                and getattr(obj, "__qualname__", None) == name):  # fmt: skip
            setattr(main, name, obj)


def _in_forked_child() -> None:
    """After a fork in the job: the new process must not hold the agent's pipe, and
    gets the signal handling of an ordinary process (a pool's terminate() is a SIGTERM)."""
    if os.getppid() != _me:
        return
    try:
        os.close(_pipe_fd)
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, AGENT_GONE):
        signal.signal(sig, signal.SIG_DFL)


def _forked_exit(exc: BaseException | None) -> None:
    """A process the job forked came back here (it returned or raised): it ends, as a
    forked process does, with its exit status, and never answers for the job."""
    code = 0
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    elif exc is not None:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _agent_gone(signum: int, frame: Any) -> None:
    """The agent died: end the job's processes, then this one."""
    if os.getpid() == _me:
        system.kill_descendants()
    os._exit(1)


def _shared(text: str | None, before: list[int]) -> str | None:
    """Output found at a batch's end that any of its unchecked jobs may have written."""
    if text is None:
        return None
    who = f"job {before[0]}" if len(before) == 1 else f"jobs {before[0]} to {before[-1]}"
    return f"[cw: written by this job or by {who} before it, in the same batch]\n" + text


def _ignore(signum: int, frame: Any) -> None:
    pass


def child_main(conn, agent: int, cpus: Optional[list[int]] = None, ncpus: int = 0,
               out_fd: int = -1, err_fd: int = -1) -> None:  # fmt: skip
    """Run batches of tasks sent by the agent; answer one message per job."""
    global _me, _pipe_fd
    _me, _pipe_fd = os.getpid(), conn.fileno()
    try:  # a group of our own: the agent ends the job's processes with us
        os.setpgid(0, 0)
    except OSError:
        pass
    system.become_subreaper()
    signal.signal(AGENT_GONE, _agent_gone)
    system.die_with_parent(AGENT_GONE)
    if os.getppid() != agent:  # it died before we asked to hear of it
        _agent_gone(AGENT_GONE, None)
    # the agent decides when we stop. A Python handler, not SIG_IGN: programs a
    # job starts get the default actions back (an ignored signal would stay ignored)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, _ignore)
    os.register_at_fork(after_in_child=_in_forked_child)
    _take_cpus(cpus, ncpus)
    capture(out_fd, err_fd)  # fds 1 and 2: each job's own output (cw.worker.output)
    noisy: set[str] = set()  # functions that wrote in this process: looked at after every job
    limit = defaults.OUTPUT_LIMIT
    blobs: dict[str, bytes] = {}
    funcs: dict[str, Any] = {}
    values: dict[Any, Any] = {}  # job id (an input) or hash (scattered data) -> value
    entered = False
    send, recv, poll, clock = conn.send_bytes, conn.recv_bytes, conn.poll, time.perf_counter
    large = False

    def block(waits: bool) -> None:  # cw.current's hook: a job waits on its children, or resumes
        if os.getpid() != _me:
            return  # a process the job forked has no slot of its own
        send(pickle.dumps((BLOCKED if waits else RESUMED, current.job_id), protocol=5))
        if not waits and recv() != GO:  # the agent answers nothing else while we wait for a slot
            os._exit(3)

    current.block = block
    while True:
        try:
            if large and not poll(1.0):  # idle after large payloads: hand memory back
                system.release_memory()
                large = False
            (tasks, new_funcs, ctx, limits, data, drop, where), size = recv_batch(recv)
        except (EOFError, OSError):
            os._exit(0)
        large = large or size >= defaults.RELEASE_BYTES
        if not entered:
            _enter_context(ctx)
            job.enter_run(ctx.get("run") if ctx else None)
            entered = True
            if ctx and ctx.get("output_limit") is not None:
                limit = int(ctx["output_limit"])
        blobs.update(new_funcs)
        for k in drop:
            values.pop(k, None)
        for k, blob in data:
            values[k] = _Pickled(blob)
        data = blob = None
        if where is not None:  # what cw.get_client() in a job needs: its master, run and context
            current.where = (where[0], where[1], (ctx or {}).get("run"), ctx or {})
        jid = None
        last, unchecked = tasks[-1][0], []
        for jid, fn_hash, args_blob, key, devices, inputs in tasks:
            t0 = clock()
            current.job_id = jid
            if devices is None:
                out = _run(jid, fn_hash, args_blob, blobs, funcs, key, inputs, values)
            else:
                out = _run_on(devices, jid, fn_hash, args_blob, blobs, funcs, key, inputs, values)
            current.job_id = None
            output = None
            if Watched.written or out[1] or fn_hash in noisy:  # it wrote, or failed (out[1])
                output = collect(out_fd, err_fd, limits.get(jid, limit) if limits else limit, [])
                unchecked = []
            elif jid == last:  # the batch's end: what its quiet jobs may have written around Python
                output = collect(out_fd, err_fd, limits.get(jid, limit) if limits else limit, unchecked)
                unchecked = []
            else:
                unchecked.append(jid)
            if output is not None:
                noisy.add(fn_hash)
            data = pickle.dumps((*out, output), protocol=5)
            out = output = None
            send(data)
            large = large or len(data) >= defaults.RELEASE_BYTES
            data = None
            # a job that started a process took longer than this: the others skip the check
            if clock() - t0 >= PROCESS_TIME:
                _end_leftovers(jid)
        if jid is not None:
            _end_leftovers(jid)
        tasks = new_funcs = args_blob = None  # (the loop's last names hold on, too)


def _end_leftovers(jid: int) -> None:
    """End what the job left running; the common case (nothing) costs one syscall."""
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return
    n = system.kill_descendants()
    if n:
        log.info("job %s left processes running (%d): killed them", jid, n)


def _value(values: dict, inputs: list, pid: Any) -> Any:
    """pickle's persistent_load for a task's arguments: input number ``pid`` (an int), or
    scattered data by its hash (a str); unpickled on first use, then kept."""
    key = inputs[pid] if isinstance(pid, int) else pid
    v = values[key]
    if type(v) is _Pickled:
        v = values[key] = loads(v.blob)
    return v


def _run(jid: int, fn_hash: str, args_blob: bytes, blobs: dict, funcs: dict, key: Optional[str],
         inputs: Optional[list] = None, values: Optional[dict] = None) -> tuple:  # fmt: skip
    """Run one job; its answer (WorkerResult fields, the blob, then what it archived). A
    process the job forked never gets past here."""
    t0 = time.perf_counter()
    job.begin(jid, key)
    try:
        fn = funcs.get(fn_hash)
        if fn is None:
            try:
                fn = funcs[fn_hash] = loads_function(blobs[fn_hash])[1]
            except (ImportError, AttributeError) as e:
                return _import_failure(jid, f"the function {pickle.loads(blobs[fn_hash])[0]}", e, t0)
            _publish_main(fn)
        try:
            if inputs is None:
                args, kwargs = loads(args_blob)
            else:  # futures and scattered data among them: from this process's cache
                args, kwargs = loads_args(args_blob, functools.partial(_value, values, inputs))
        except (ImportError, AttributeError) as e:
            return _import_failure(jid, f"the arguments of job {jid}", e, t0)
        value = fn(*args, **kwargs)
    except BaseException as e:  # noqa: B036 - a job's SystemExit is its failure too
        if os.getpid() != _me:
            _forked_exit(e)
        runtime = time.perf_counter() - t0
        note = None
        try:
            files = job.end()  # what a failed job left in its outputs is kept too
        except OutputsError as oe:
            files, note = None, str(oe)
        blob, err, tb = dumps_exception(e)
        if note:
            err, tb = f"{err}; and {note}", f"{tb}{note}\n"
        return (jid, P.RAISED, runtime, err, tb, blob, files)
    runtime = time.perf_counter() - t0
    if os.getpid() != _me:
        _forked_exit(None)
    try:
        files = job.end()
    except OutputsError as e:  # the job's work would be lost: it fails, saying why
        blob, err, tb = dumps_exception(e)
        return (jid, P.RAISED, runtime, err, tb, blob, None)
    try:
        blob = dumps_result(value)
    except BaseException as e:  # noqa: B036 - a __reduce__ may raise anything
        return _unpicklable(jid, value, e, runtime, files)
    return (jid, P.OK, runtime, None, None, blob, files)


def _run_on(devices: list, *task: Any) -> tuple:
    """Run a job that needs GPUs on its own devices: it sees them alone (CUDA_VISIBLE_DEVICES)."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    try:
        return _run(*task)
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _unpicklable(jid: int, value: Any, e: BaseException, runtime: float, files: Any) -> tuple:
    """The job returned, but its value cannot travel: a SerializationError saying so."""
    exc = SerializationError(
        f"job {jid} returned a {type(value).__module__}.{type(value).__qualname__}, which cannot be"
        f" pickled ({type(e).__name__}: {e}): return plain data (numbers, strings, lists, arrays)"
        " or objects pickle can rebuild"
    )
    exc.__cause__ = e
    blob, err, tb = dumps_exception(exc)
    return (jid, P.RAISED, runtime, err, tb, blob, files)


def _import_failure(jid: int, what: str, e: BaseException, t0: float) -> tuple:
    """An IMPORT result naming what could not be imported, where, and from which path."""
    err = (
        f"cannot import {what} on {socket.gethostname()}: {type(e).__name__}: {e}."
        f" The worker's sys.path: {sys.path}. Make the module importable there"
        " (a shared path), or send it by value: Client(ship_modules=[module])"
    )
    job.end()
    return (jid, P.IMPORT, time.perf_counter() - t0, err, None, b"", None)


class Child:
    """The agent's handle on one executor process: its pipe, pid and pidfd."""

    def __init__(self, cpus: Optional[list[int]] = None, ncpus: int = 0, close: tuple = ()):
        self.conn, child_conn = multiprocessing.Pipe(duplex=True)
        # the child's fds 1 and 2; the agent keeps them to read what a crashed job wrote
        self.out_fd, self.err_fd = capture_file(), capture_file()
        agent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the executor: it never returns into the agent's code
            code = 1
            try:
                self.conn.close()
                for fd in close:  # its siblings' pipes, pidfds and capture files are the agent's business
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                child_main(child_conn, agent, cpus, ncpus, self.out_fd, self.err_fd)
                code = 0
            except BaseException:  # noqa: B036 - the agent hears of it as a crash
                traceback.print_exc()
            finally:
                os._exit(code)
        child_conn.close()
        self.pid = pid
        self.fd = self.conn.fileno()
        try:  # the child does it too: whichever runs first, the group exists before a kill
            os.setpgid(pid, pid)
        except OSError:
            pass
        try:  # readable when the process ends: a crash is seen even if the pipe stays open
            self.pidfd: Optional[int] = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd = None
        self.exitcode: Optional[int] = None
        self.funcs: set[str] = set()
        self.ctx: str | None = None  # the client context this child has entered
        self.used = False
        self.inflight: Deque[tuple] = collections.deque()  # tasks sent, in order
        self.head_started = 0.0  # when the first task of inflight started
        self.stopped: Optional[list[int]] = None  # its job's process groups, while a pause stops them
        self.stopped_at = 0.0
        self.data: collections.OrderedDict = collections.OrderedDict()  # inputs it holds: key -> bytes
        self.blocked = False  # its job waits on its children (another process has its slot)
        self.slot = 0  # whose CPUs it runs on

    def fds(self) -> tuple:
        return (self.fd,) + ((self.pidfd,) if self.pidfd is not None else ())

    def ended(self) -> bool:
        """Whether the process has ended (without reaping it: its group is still safe to kill)."""
        if self.exitcode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def wait(self, timeout: float) -> Optional[int]:
        """Reap the ended process, waiting up to ``timeout`` for it to finish ending."""
        if self.exitcode is None:
            if self.pidfd is not None:
                select.select([self.pidfd], [], [], timeout)
                self.exitcode = system.reap(self.pid)
            else:
                deadline = time.monotonic() + timeout
                while (code := system.reap(self.pid)) is None and time.monotonic() < deadline:
                    time.sleep(0.005)
                self.exitcode = code
        return self.exitcode

    def leftover(self, limit: int) -> tuple | None:
        """What the child wrote since its last answer (its job crashed, timed out, was cancelled)."""
        return leftover(self.out_fd, self.err_fd, limit)

    def kill(self) -> None:
        """SIGKILL the executor and every process group of its job; never waits."""
        if self.exitcode is None:
            system.kill_job(self.pid)
        self.conn.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        for fd in (self.out_fd, self.err_fd):
            if fd >= 0:
                os.close(fd)
        self.out_fd = self.err_fd = -1


def describe_exit(code: int | None) -> str:
    if code is None:
        return "vanished"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} ({-code})"
    return f"exited with code {code}"
