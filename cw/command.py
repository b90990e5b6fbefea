"""Shell-command jobs: the runner a worker executes, and the result it returns.

A shell-command job is an ordinary function job whose function is
:func:`run_command` (every worker has cw installed, so it travels by
reference). It runs the command in a process group (a session) of its own,
feeds it ``input``, keeps the tail of its stdout and stderr (bounded as a
function job's output is) and returns a :class:`CompletedCommand`, as
``subprocess.run`` returns a ``CompletedProcess``; a non-zero exit raises
:class:`cw.errors.CommandError` unless ``check=False``.

When the command ends, whatever it left running in its group ends too; when
the job is killed (timeout, cancel, its worker stopping), the worker kills
the command's group with the executor running it (:func:`cw.system.kill_job`),
so no process of it survives on the node. On a worker, the tails of the
command's stdout and stderr are also written to the job's own (captured like
any job's: ``future.stdout()``, ``cw logs``).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
import re
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

from . import defaults, job
from .errors import CommandError, RemoteImportError, SetupError

Command = Union[str, Sequence[Union[str, "os.PathLike[str]"]]]


class CompletedCommand(subprocess.CompletedProcess):
    """What a shell-command job returns: ``args``, ``returncode``, ``stdout``, ``stderr``
    (text: the tail, bounded), as :class:`subprocess.CompletedProcess`; and where
    it ran (``host``) and for how long (``runtime``, seconds)."""

    def __init__(self, args: Any, returncode: int, stdout: str = "", stderr: str = "",
                 host: str = "", runtime: float = 0.0):  # fmt: skip
        super().__init__(args, returncode, stdout, stderr)
        self.host, self.runtime = host, runtime

    def check_returncode(self) -> None:
        """Raise :class:`cw.errors.CommandError` if the exit code is not zero."""
        if self.returncode:
            raise CommandError(self.returncode, self.args, self.stdout, self.stderr, self.host)


def argv(cmd: Command, shell: Optional[bool] = None) -> list[str]:
    """The program and its arguments for a command line (run by ``/bin/sh -c``) or an
    argv list. ``shell`` defaults to True for a string, False for a list."""
    if isinstance(cmd, (str, bytes)):
        text = os.fsdecode(cmd)
        if not text.strip():
            raise ValueError("the command is empty")
        return ["/bin/sh", "-c", text] if shell in (None, True) else shlex.split(text)
    try:
        parts = [os.fspath(a) for a in cmd]
    except TypeError:
        raise TypeError(f"a command is a string or a list of strings, not {cmd!r}") from None
    if not parts or any(not isinstance(p, str) for p in parts):
        raise TypeError(f"a command list must hold strings (or paths), not {cmd!r}")
    return ["/bin/sh", "-c", shlex.join(parts)] if shell else parts


def environment(env: Optional[Mapping[str, Optional[str]]]) -> dict[str, str]:
    """The job's environment with ``env`` on top (a value of None removes the variable)."""
    out = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def check_env(env: Any) -> Optional[dict]:
    """``env`` as a submission takes it (names to text, or None to remove); TypeError otherwise."""
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a dict of variable names to strings, not {type(env).__name__}")
    for k, v in env.items():
        if not isinstance(k, str) or not k or "=" in k:
            raise TypeError(f"env: {k!r} is not a variable name")
        if v is not None and not isinstance(v, str):
            raise TypeError(f"env: the value of {k} must be a string (or None to remove it), not {v!r}")
    return dict(env)


#: The first line of an output whose beginning was cut: the bytes cut, the bytes kept.
CUT_NOTE = re.compile(rb"\[cw: (\d+) earlier bytes cut; the last (\d+) bytes follow\]\n")


def cut_note(cut: int, kept: int) -> str:
    """The line said at the top of an output of which ``cut`` bytes were dropped."""
    return f"[cw: {cut} earlier bytes cut; the last {kept} bytes follow]\n"


class _Tail:
    """The last ``limit`` bytes of a stream, and how many came before them."""

    __slots__ = ("buf", "total", "limit")

    def __init__(self, limit: int):
        self.buf, self.total, self.limit = bytearray(), 0, max(0, limit)

    def add(self, data: bytes) -> None:
        self.total += len(data)
        self.buf += data
        if len(self.buf) > 2 * self.limit + 65536:  # trim now and then, not on every read
            del self.buf[: len(self.buf) - self.limit]

    def text(self) -> str:
        data = bytes(self.buf[-self.limit :]) if self.limit else b""
        text = data.decode("utf-8", "replace")
        cut = self.total - len(data)
        if cut > 0:
            text = cut_note(cut, len(data)) + text
        return text


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def communicate(proc: subprocess.Popen, data: Optional[bytes], limit: int) -> tuple[str, str]:
    """Feed ``data`` to the process, read its two pipes keeping their tails, until it ends.

    Once the command has ended, processes it left in its group (a ``cmd &``)
    would keep the pipes open: after a short grace they are killed, as the
    processes any job leaves behind are.
    """
    out, err = _Tail(limit), _Tail(limit)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    if data:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE, None)
    elif proc.stdin is not None:
        proc.stdin.close()
    view, offset = memoryview(data or b""), 0
    ended_at: Optional[float] = None
    killed = False
    while sel.get_map():
        for key, _ in sel.select(0.05):
            f = key.fileobj
            if key.data is None:  # stdin
                try:
                    offset += os.write(f.fileno(), view[offset : offset + 65536])  # type: ignore[union-attr]
                except BrokenPipeError:
                    offset = len(view)
                except BlockingIOError:
                    continue
                if offset >= len(view):
                    sel.unregister(f)
                    f.close()  # type: ignore[union-attr]
                continue
            chunk = os.read(f.fileno(), 65536)  # type: ignore[union-attr]
            if chunk:
                key.data.add(chunk)
            else:
                sel.unregister(f)
                f.close()  # type: ignore[union-attr]
        if ended_at is None and proc.poll() is not None:
            ended_at = time.monotonic()
        if ended_at is not None and not killed and time.monotonic() - ended_at > defaults.COMMAND_LEFTOVER_GRACE:
            _kill_group(proc.pid)  # what it left running holds the pipes: it ends with the command
            killed = True
        elif killed and time.monotonic() - ended_at > defaults.COMMAND_LEFTOVER_GRACE + 2.0:
            for key in list(sel.get_map().values()):  # a process that left the group: stop reading
                sel.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    proc.wait()
    _kill_group(proc.pid)  # the command ended: its group ends with it
    return out.text(), err.text()


def run_command(cmd: Command, cwd: Optional[str] = None, env: Optional[dict] = None,
                input: Union[str, bytes, None] = None, shell: Optional[bool] = None,
                check: bool = True, outputs: Sequence[str] = (), scratch: bool = False,
                inputs: Sequence[str] = (), setup: Optional[Setup] = None,
                output_limit: int = defaults.OUTPUT_LIMIT) -> CompletedCommand:  # fmt: skip
    """Run one command where the job runs; the runner of every shell-command job.

    The command gets a session (and so a process group) of its own, ``env`` on
    top of the job's environment, ``input`` on its stdin (else /dev/null). With
    ``scratch`` it runs in the job's scratch directory (``$CW_SCRATCH``); files
    it writes to ``$CW_OUTPUTS``, and those matching the ``outputs`` globs
    (relative to where it ran), are archived after it, whatever its exit code.
    ``inputs`` are copied where it runs first; a job set's ``setup`` runs once
    on this worker before its first job (:func:`ensure_setup`).
    Returns a :class:`CompletedCommand`; raises :class:`cw.errors.CommandError`
    on a non-zero exit when ``check`` (the default).
    """
    args = argv(cmd, shell)
    data = input.encode() if isinstance(input, str) else input
    variables = environment(env)
    if setup is not None:
        variables["CW_SETUP_DIR"] = str(ensure_setup(setup, variables))
    if scratch:
        cwd = str(job.scratch())
        variables["CW_SCRATCH"] = cwd
    copy_inputs(inputs, Path(cwd or os.getcwd()))
    if job.running():
        variables["CW_OUTPUTS"] = str(job.outputs())
    t0 = time.monotonic()
    proc = subprocess.Popen(args, cwd=cwd, env=variables, start_new_session=True,
                            stdin=subprocess.PIPE if data else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        stdout, stderr = communicate(proc, data, output_limit)
    except BaseException:
        _kill_group(proc.pid)
        proc.wait()
        raise
    if outputs:
        base = Path(cwd or os.getcwd())
        job.declare([p for pattern in outputs for p in sorted(base.glob(pattern))], base)
    if job.on_a_worker:  # the job's own output too (future.stdout(), cw logs): the same tails
        for text, stream in ((stdout, sys.stdout), (stderr, sys.stderr)):
            if text:
                stream.write(text)
                stream.flush()
    shown = cmd if isinstance(cmd, str) else [os.fspath(a) for a in cmd]
    done = CompletedCommand(shown, proc.returncode, stdout, stderr, socket.gethostname(),
                            time.monotonic() - t0)  # fmt: skip
    if check:
        done.check_returncode()
    return done


class Setup(NamedTuple):
    """A job set's setup step: its script, the run it belongs to, the set file's directory."""

    script: str
    run: str
    base: str


def ensure_setup(setup: Setup, variables: dict) -> Path:
    """Run the setup script once on this worker (the first job of the run does; the
    others wait for it), in a directory kept for the worker's life; that directory.

    Its failure is remembered: every later job of the run on this worker fails
    with the same :class:`cw.errors.SetupError` without running it again.
    """
    digest = hashlib.blake2b(f"{setup.run}\0{setup.script}".encode(), digest_size=8).hexdigest()
    root = job.worker_dir() or Path(tempfile.gettempdir()) / f"cw-{os.getuid()}-serial"
    home = root / f"setup-{job.slug(setup.run, '_')[:40]}-{digest}"
    home.mkdir(parents=True, exist_ok=True)
    with open(home.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the worker's other executors wait for the first
        done, failed = home / ".cw-setup-done", home / ".cw-setup-failed"
        if done.exists():
            return home
        if failed.exists():
            raise SetupError(failed.read_text())
        env = {**variables, "CW_SETUP_DIR": str(home), "CW_JOBSET_DIR": setup.base}
        proc = subprocess.Popen(["/bin/sh", "-c", setup.script], cwd=home, env=env, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        try:
            _, stderr = communicate(proc, None, defaults.OUTPUT_LIMIT)
        except BaseException:
            _kill_group(proc.pid)
            raise
        if proc.returncode:
            text = str(SetupError.of(setup.run, proc.returncode, stderr, socket.gethostname()))
            failed.write_text(text)
            raise SetupError(text)
        done.touch()
    return home


def copy_inputs(inputs: Sequence[str], where: Path) -> None:
    """Copy a job's input files (and directories) into the directory it runs in."""
    for src in inputs:
        s = Path(src)
        if s.is_dir():
            shutil.copytree(s, where / s.name, dirs_exist_ok=True)
        else:
            shutil.copy2(s, where / s.name)


def import_callable(target: str, base: Optional[str] = None) -> Any:
    """``package.module:function``, imported with the set's directory ``base`` first on the
    import path (a module beside the set file is found wherever the worker started).

    Raises :class:`cw.errors.RemoteImportError` naming what, this host and the path tried.
    """
    module, _, name = target.partition(":") if ":" in target else target.rpartition(".")
    added = base is not None and base not in sys.path
    if added:
        sys.path.insert(0, base)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RemoteImportError(f"cannot import {target} on {socket.gethostname()}: {type(e).__name__}: {e}."
                                f" The job's sys.path: {sys.path}. Put the module beside the set file,"
                                " or make it importable there (a shared path)") from None
    finally:
        if added and base in sys.path:
            sys.path.remove(base)


def run_callable(target: str, args: Sequence = (), kwargs: Optional[dict] = None,
                 inputs: Sequence[str] = (), outputs: Sequence[str] = (),
                 setup: Optional[Setup] = None, env: Optional[dict] = None) -> Any:  # fmt: skip
    """A job set's Python job: import ``package.module:function`` and call it in the job's
    scratch directory, with its inputs copied there and its output globs archived."""
    if setup is not None:
        os.environ["CW_SETUP_DIR"] = str(ensure_setup(setup, environment(env)))
    fn = import_callable(target, (env or {}).get("CW_JOBSET_DIR"))
    here = job.scratch()
    copy_inputs(inputs, here)
    before, saved = os.getcwd(), {k: os.environ.get(k) for k in env or {}}
    os.environ.update({k: v for k, v in (env or {}).items() if v is not None})
    os.chdir(here)
    try:
        return fn(*args, **(kwargs or {}))
    finally:
        os.chdir(before)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if outputs:
            job.declare([p for pattern in outputs for p in sorted(here.glob(pattern))], here)
