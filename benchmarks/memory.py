"""Memory with a deep queue, and memory back to its baseline after large jobs and sessions.

    python -m benchmarks.memory [N]            # both tables
    python -m benchmarks.memory --queue [N]    # the deep queue only
    python -m benchmarks.memory --baseline     # back to baseline only

For each client API (futures: Client.submit; callbacks: ClientThread), in a
process of its own: queue N jobs, then print the peak resident memory of the
master (target <= 500 MB: the queue lives in the store, the master keeps a
window of it in memory) and of the client (arguments are dropped once the
master acknowledges them; what remains is one future, or one 56-byte record
per callback, per job). Then 2 workers drain the queue.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import tempfile
import threading
import time

import cw
from cw import system


def noop(x=None):
    return x


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(api: str, n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="cw-mem-") as tmp:
        with cw.LocalCluster(n_workers=0, cluster=os.path.join(tmp, "c")) as lc, lc.client() as probe:
            done = threading.Semaphore(0)
            t = time.perf_counter()
            if api == "futures":
                c = lc.client()
                futures = [c.submit(noop, i) for i in range(n)]
            else:
                c = cw.ClientThread(lambda j, r: done.release(), lc.address, cluster=lc.cluster.path)
                c.start()
                for i in range(n):
                    c.submit(noop, i)
            while probe.status()["queued"] < n:
                time.sleep(0.2)
            queued_s = time.perf_counter() - t
            master_mb, client_mb = peak_rss_mb(lc.master.pid), peak_rss_mb()
            for i in range(2):
                lc._spawn(f"late-{i}", [sys.executable, "-m", "cw.worker", lc.address, "--cluster-dir",
                                        str(lc.cluster.path)])  # fmt: skip
            t = time.perf_counter()
            if api == "futures":
                for f in cw.as_completed(futures):
                    f.result()
                c.close()
            else:
                c.wait()
                c.stop()
            drain_s = time.perf_counter() - t
            print(f"{api:<10} {n:>10,} {n / queued_s:>12,.0f} {master_mb:>10,.0f} {client_mb:>10,.0f}"
                  f" {n / drain_s:>12,.0f}   {'yes' if master_mb <= 500 else 'NO'}", flush=True)  # fmt: skip


def rss_mb(pid: int | str = "self") -> float:
    return system.rss(pid) / 2**20


def _settled(pid: int, seconds: float = 5.0) -> float:
    """Resident memory once it stops falling (memory is handed back within a second or two)."""
    deadline, last = time.monotonic() + seconds, rss_mb(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_mb(pid)
        if now >= last - 1:
            return now
        last = now
    return last


def _child_of(pid: int) -> int:
    return system.children(pid)[0]


def baseline(big_mb: int = 500, sessions: int = 5, jobs: int = 100_000) -> None:
    """After one job with a big_mb argument, and after each of `sessions` client sessions
    of `jobs` no-op jobs: the master's and the executor's resident memory, beside a
    ProcessPoolExecutor worker's after the same argument."""
    print(f"\n{'back to baseline':<34} {'before MB':>10} {'after MB':>10}")
    with tempfile.TemporaryDirectory(prefix="cw-mem-") as tmp:
        with cw.LocalCluster(n_workers=1, cluster=os.path.join(tmp, "c")) as lc, lc.client() as c:
            c.submit(noop, 0).result()
            master, executor = lc.master.pid, _child_of(lc.procs[1].pid)
            m0, e0 = _settled(master), _settled(executor)
            blob = os.urandom(big_mb * 2**20)
            c.submit(len, blob).result()
            del blob
            print(f"{'cw master, ' + str(big_mb) + ' MB argument':<34} {m0:>10,.0f} {_settled(master):>10,.0f}")
            print(f"{'cw executor, ' + str(big_mb) + ' MB argument':<34} {e0:>10,.0f} {_settled(executor):>10,.0f}")
            m0 = _settled(master)
            for i in range(sessions):
                with lc.client() as s:
                    for f in cw.as_completed(s.map(noop, range(jobs))):
                        f.result()
                after = _settled(master)
                print(f"{f'cw master, session {i + 1} of {jobs:,} jobs':<34} {m0:>10,.0f} {after:>10,.0f}", flush=True)
        with cf.ProcessPoolExecutor(1) as pool:
            pool.submit(noop, 0).result()
            (worker,) = list(pool._processes)  # the pool's one worker process
            w0 = _settled(worker)
            blob = os.urandom(big_mb * 2**20)
            pool.submit(len, blob).result()
            del blob
            label = f"ProcessPoolExecutor, {big_mb} MB arg"
            print(f"{label:<34} {w0:>10,.0f} {_settled(worker):>10,.0f}", flush=True)


def main(n: int = 1_000_000) -> int:
    print(f"{'client API':<10} {'jobs':>10} {'queued/s':>12} {'master MB':>10} {'client MB':>10}"
          f" {'drained/s':>12}   master <= 500 MB")  # fmt: skip
    for api in ("futures", "callbacks"):
        subprocess.run([sys.executable, "-m", "benchmarks.memory", "--one", api, str(n)], check=True)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--one"]:
        one(args[1], int(args[2]))
        sys.exit(0)
    if args[:1] == ["--baseline"]:
        baseline()
        sys.exit(0)
    if args[:1] == ["--queue"]:
        args = args[1:]
    code = main(int(args[0]) if args else 1_000_000)
    if not sys.argv[1:2] == ["--queue"]:
        baseline()
    sys.exit(code)
