"""Executor processes: where jobs run, one at a time, forked from the worker's agent.

The isolation is what makes a segfault, ``os._exit``, a memory blow-up or a
timeout survivable: the agent reports the job, replaces the child and keeps
its slot. A child serves one client context (cwd, sys.path, environment) for
its whole life. The agent and a child speak over a pipe: the agent sends a
pickled batch ``(tasks, new functions, context)``, the child answers one
pickled tuple per job: the fields of :class:`cw.protocol.WorkerResult`, then
the value's blob (a plain tuple: a named one costs five times as much to
pickle, on every job).
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import signal
import socket
import sys
import time
from typing import Any, Deque

from .. import protocol as P
from ..serialize import dumps_exception, dumps_result, loads, loads_function

log = logging.getLogger(__name__)


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


def child_main(conn) -> None:
    """Run batches of tasks sent by the agent; answer one message per job."""
    # the agent decides when we stop. A Python handler, not SIG_IGN: programs a
    # job starts get the default actions back (an ignored signal would stay ignored)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, _ignore)
    _die_with_parent()
    blobs: dict[str, bytes] = {}
    funcs: dict[str, Any] = {}
    entered = False
    send, recv = conn.send_bytes, conn.recv_bytes
    while True:
        try:
            msg = recv()
        except (EOFError, OSError):
            os._exit(0)
        tasks, new_funcs, ctx = pickle.loads(msg)
        if not entered:
            _enter_context(ctx)
            entered = True
        blobs.update(new_funcs)
        for jid, fn_hash, args_blob in tasks:
            t0 = time.perf_counter()
            try:
                fn = funcs.get(fn_hash)
                if fn is None:
                    try:
                        fn = funcs[fn_hash] = loads_function(blobs[fn_hash])[1]
                    except (ImportError, AttributeError) as e:
                        what = f"the function {pickle.loads(blobs[fn_hash])[0]}"
                        send(_import_failure(jid, what, e, t0))
                        continue
                try:
                    args, kwargs = loads(args_blob)
                except (ImportError, AttributeError) as e:
                    send(_import_failure(jid, f"the arguments of job {jid}", e, t0))
                    continue
                value = fn(*args, **kwargs)
                out = (jid, P.OK, time.perf_counter() - t0, None, None, dumps_result(value))
            except BaseException as e:  # noqa: B036 - a job's SystemExit is its failure too
                blob, err, tb = dumps_exception(e)
                out = (jid, P.RAISED, time.perf_counter() - t0, err, tb, blob)
            try:
                data = pickle.dumps(out, protocol=5)
            except Exception as e:  # the result itself would not pickle
                out = (jid, P.FAILED, out[2], f"cannot pickle the result of job {jid}: {e}", None, b"")
                data = pickle.dumps(out, protocol=5)
            send(data)


def _ignore(signum: int, frame: Any) -> None:
    pass


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the agent dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _import_failure(jid: int, what: str, e: BaseException, t0: float) -> bytes:
    """An IMPORT result naming what could not be imported, where, and from which path."""
    err = (
        f"cannot import {what} on {socket.gethostname()}: {type(e).__name__}: {e}."
        f" The worker's sys.path: {sys.path}. Make the module importable there"
        " (a shared path), or send it by value: Client(ship_modules=[module])"
    )
    return pickle.dumps((jid, P.IMPORT, time.perf_counter() - t0, err, None, b""), protocol=5)


class Child:
    """The agent's handle on one executor process."""

    def __init__(self, mp):
        self.conn, child_conn = mp.Pipe(duplex=True)
        self.proc = mp.Process(target=child_main, args=(child_conn,), daemon=True)
        self.proc.start()
        child_conn.close()
        self.funcs: set[str] = set()
        self.ctx: str | None = None  # the client context this child has entered
        self.used = False
        self.inflight: Deque[tuple] = collections.deque()  # tasks sent, in order
        self.head_started = 0.0  # when the first task of inflight started

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


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
