"""Memory with a deep queue: N (default 1,000,000) no-op jobs queued at a master with no worker.

    python -m benchmarks.memory [N]

For each client API (futures: Client.submit; callbacks: ClientThread), in a
process of its own: queue N jobs, then print the peak resident memory of the
master (target <= 500 MB: the queue lives in the store, the master keeps a
window of it in memory) and of the client (arguments are dropped once the
master acknowledges them; what remains is one future, or one 56-byte record
per callback, per job). Then 2 workers drain the queue.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time

import cw


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


def main(n: int = 1_000_000) -> int:
    print(f"{'client API':<10} {'jobs':>10} {'queued/s':>12} {'master MB':>10} {'client MB':>10}"
          f" {'drained/s':>12}   master <= 500 MB")  # fmt: skip
    for api in ("futures", "callbacks"):
        subprocess.run([sys.executable, "-m", "benchmarks.memory", "--one", api, str(n)], check=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
