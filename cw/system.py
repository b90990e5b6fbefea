"""What cw asks of the operating system: memory handed back, process trees, CPUs.

Linux first; elsewhere each call does what it can and never fails. The
worker uses the process calls to keep a job's processes inside the job (a
process group, a child subreaper, a parent-death signal); the master and the
worker's executors hand freed memory back to the system after large payloads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import time
from typing import Optional

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

_libc: Optional[ctypes.CDLL] = None


def _c() -> Optional[ctypes.CDLL]:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        except OSError:
            return None
    return _libc


def release_memory() -> None:
    """Give the allocator's free memory back to the system (glibc's malloc_trim).

    Freed blocks above 32 MiB go back at once; smaller ones stay in the heap
    for reuse unless trimmed. Called after large payloads and when sessions end.
    """
    libc = _c()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


def rss(pid: int | str = "self") -> int:
    """Resident memory of a process, in bytes (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def usage(pids: list[int]) -> tuple[int, float]:
    """Resident memory (bytes) and CPU seconds used so far by these processes (Linux /proc)."""
    total, cpu = 0, 0.0
    tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        cpu += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        total += int(fields[21]) * page
    return total, cpu


def prctl(option: int, value: int) -> bool:
    libc = _c()
    try:
        return libc is not None and libc.prctl(option, value, 0, 0, 0) == 0
    except AttributeError:
        return False


def become_subreaper() -> bool:
    """Orphaned descendants become our children (not init's), so we can end them."""
    return prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(sig: int) -> bool:
    """The kernel sends us ``sig`` when the thread that forked us ends (even by SIGKILL)."""
    return prctl(_PR_SET_PDEATHSIG, int(sig))


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (zombies included)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
        return out
    except FileNotFoundError:  # no /proc/PID/task/TID/children in this kernel: scan
        pass
    except OSError:
        return out
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(name))
    return out


def reap(pid: int) -> Optional[int]:
    """The exit code of a child that has ended (negative: killed by that signal), or None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 0  # reaped elsewhere: gone all the same
    return os.waitstatus_to_exitcode(status) if done else None


def kill_descendants(timeout: float = 2.0) -> int:
    """SIGKILL every descendant of this process and reap them; how many there were.

    Needs :func:`become_subreaper` first: the grandchildren of a killed child
    become our children, and the next round takes them. Gives up after
    ``timeout`` (a process in uninterruptible sleep cannot be reaped before it wakes).
    """
    me, n = os.getpid(), 0
    deadline = time.monotonic() + timeout
    while True:
        kids = children(me)
        if not kids or time.monotonic() > deadline:
            break
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
                n += 1
            except ProcessLookupError:
                pass
        while kids and time.monotonic() <= deadline:
            kids = [pid for pid in kids if reap(pid) is None]
            if kids:
                time.sleep(0.001)
    while True:  # zombies that were never listed (reparented after the last look)
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    return n


def kill_group(pgid: int) -> None:
    """SIGKILL a process group (a job's executor and the processes it started)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before their children."""
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def job_groups(pid: int) -> list[int]:
    """The process groups of a job: its executor's (``pid``'s own), and every group led by
    a process below it (a command in a session of its own, a daemon that called setsid)."""
    groups = [pid]
    for d in descendants(pid):
        try:
            if os.getpgid(d) == d:
                groups.append(d)
        except OSError:
            pass
    return groups


def signal_groups(groups: list[int], sig: int) -> None:
    """Send ``sig`` to each of these process groups (gone ones are skipped)."""
    for g in groups:
        try:
            os.killpg(g, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_job(pid: int) -> None:
    """SIGKILL an executor with every process group of its job (see :func:`job_groups`).

    Never waits. What escapes (a process that made a group of its own in the
    instant between the look and the kill) is orphaned to the agent, a child
    subreaper, which kills it with its group.
    """
    groups = job_groups(pid)
    signal_groups(groups[1:], signal.SIGSTOP)  # no more forking while we kill
    kill_group(pid)
    signal_groups(groups[1:], signal.SIGKILL)


def kill_orphan(pid: int) -> None:
    """SIGKILL an orphaned process of a job, and the group it leads if it leads one."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def cpu_shares(procs: int, given: Optional[int]) -> list[tuple[Optional[list[int]], int]]:
    """How a worker's CPUs are shared among its ``procs`` executors: (CPUs to pin
    to or None, how many CPUs) for each.

    The worker's CPUs are its affinity mask (what SLURM or a cpuset gave it).
    When the batch system says it gave fewer CPUs than the mask holds (no
    binding), nobody knows which are ours: each executor gets a count, unpinned.
    """
    try:
        mask = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mask = []
    if not mask or (given and given < len(mask)):
        n = given or os.cpu_count() or 1
        return [(None, max(1, n // procs))] * procs
    per = max(1, len(mask) // procs)
    shares = []
    for i in range(procs):
        start = (i * per) % len(mask)
        shares.append((mask[start : start + per], per))
    return shares
