"""Each job's own output: an executor's file descriptors 1 and 2 are two files of its own.

The agent opens the two files (unlinked at once) before it forks the
executor, and keeps them, so it can still read what a job wrote before it
crashed. In the executor they become fds 1 and 2: whatever a job writes, from
Python, a C extension or a program it starts, lands in them. What is kept of
each is its tail, up to the job's output limit, with a first line saying how
much was cut.

A job that prints nothing costs no system call: the executor looks at the
files (two ``fstat`` calls) only after a job that wrote through
``sys.stdout``/``sys.stderr`` (a flag their ``write`` sets), after a job
that failed, after every job of a function that has written before in this
process, and after the last job of each batch. Output that a function which
never wrote before writes around Python (C code, a subprocess) in the middle
of a batch is found at the batch's end and given to its last job, saying so.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from typing import Optional

from ..command import CUT_NOTE, cut_note


def capture_file() -> int:
    """A file for one stream of an executor: unlinked at once, appended to (a job's
    subprocesses write at its end too), not inherited by programs a job runs."""
    fd, path = tempfile.mkstemp(prefix="cw-output-")
    os.unlink(path)
    os.set_inheritable(fd, False)
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND | os.O_RDWR)
    except (ImportError, OSError):
        pass
    return fd


def take_output(fd: int, limit: int) -> Optional[str]:
    """What was written to a capture file since the last take: its last ``limit`` bytes
    as text (what was cut is said at the top); None if nothing was written. Empties it."""
    size = os.fstat(fd).st_size
    if not size:
        return None
    start = earlier = 0
    if size > limit:  # a shell job's output may be a tail already: count what its note says was cut
        m = CUT_NOTE.match(os.pread(fd, 96, 0))
        if m:
            start, earlier = m.end(), int(m.group(1))
    n = min(size - start, max(0, limit))
    data = os.pread(fd, n, size - n) if n else b""
    os.ftruncate(fd, 0)
    text = data.decode("utf-8", "replace")
    cut = earlier + size - start - n
    if cut > 0:
        text = cut_note(cut, n) + text
    return text


def flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a job may have closed or replaced them
            pass


class Watched(io.TextIOWrapper):
    """sys.stdout and sys.stderr of an executor: a text stream that notes that it was written to."""

    written = False  # one flag for both streams: "look at the capture files after this job"

    def write(self, s: str) -> int:
        Watched.written = True
        return super().write(s)


def capture(out_fd: int, err_fd: int) -> None:
    """In the executor: fds 1 and 2 become the capture files, and Python's own streams
    on them note each write."""
    flush_std()
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for name, fd, errors in (("stdout", 1, "strict"), ("stderr", 2, "backslashreplace")):
        old = getattr(sys, name)
        stream = Watched(open(fd, "wb", closefd=False), encoding=getattr(old, "encoding", None) or "utf-8",
                         errors=errors, line_buffering=name == "stderr")  # fmt: skip
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def collect(out_fd: int, err_fd: int, limit: int, unchecked: list[int]) -> tuple | None:
    """(stdout, stderr) written since the last look, or None. ``unchecked``: the jobs of
    the batch before this one that nobody looked after, which may have written it too."""
    Watched.written = False
    flush_std()
    if not (os.fstat(out_fd).st_size or os.fstat(err_fd).st_size):
        return None
    out, err = take_output(out_fd, limit), take_output(err_fd, limit)
    if unchecked:
        who = f"job {unchecked[0]}" if len(unchecked) == 1 else f"jobs {unchecked[0]} to {unchecked[-1]}"
        note = f"[cw: written by this job or by {who} before it, in the same batch]\n"
        out, err = (None if out is None else note + out), (None if err is None else note + err)
    return out, err


def leftover(out_fd: int, err_fd: int, limit: int) -> tuple | None:
    """What an executor wrote since its last answer (its job crashed, timed out, was cancelled)."""
    try:
        out, err = take_output(out_fd, limit), take_output(err_fd, limit)
    except OSError:
        return None
    return None if out is None and err is None else (out, err)


def echo_output(jid: int, output: tuple) -> None:
    """A job's output in the worker's own log too, each line after the job's id."""
    for text, stream in zip(output, (sys.stdout, sys.stderr)):
        if text:
            try:
                stream.write("".join(f"[job {jid}] {line}\n" for line in text.splitlines()))
                stream.flush()
            except (OSError, ValueError):
                pass
