"""cw beside concurrent.futures.ProcessPoolExecutor, same machine, same run.

    python -m benchmarks.bench            # the whole table
    python -m benchmarks.bench W1 W4      # some rows

Both sides get 2 worker processes. cw runs a real local cluster on loopback
(master + 2 workers + this client, 4 processes) and commits every job and
result to its SQLite store; the pool keeps everything in memory.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import sys
import tempfile
import time

import cw

WORKERS = 2


def noop(x=None):
    return x


def nap(s):
    time.sleep(s)


def size(b):
    return len(b)


def _wait_workers(client, n):
    deadline = time.monotonic() + 30
    while len(client.status()["workers"]) < n:
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not join")
        time.sleep(0.02)


class Sides:
    """A warmed-up cw cluster and process pool, shared by the throughput rows."""

    def __init__(self, encrypt: bool = False):
        self.encrypt = encrypt

    def __enter__(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="cw-bench-")
        self.lc = cw.LocalCluster(n_workers=WORKERS, cluster=os.path.join(self.tmp.name, "c"),
                                  encrypt=self.encrypt)  # fmt: skip
        self.client = self.lc.client()
        _wait_workers(self.client, WORKERS)
        self.pool = cf.ProcessPoolExecutor(WORKERS)
        for ex in (self.client, self.pool):  # warm up: imports, function caches
            [f.result() for f in [ex.submit(noop, i) for i in range(200)]]
        return self

    def __exit__(self, *exc):
        self.client.close()
        self.lc.close()
        self.pool.shutdown()
        self.tmp.cleanup()


def w1(s, n=10_000):
    out = []
    for ex in (s.client, s.pool):
        t = time.perf_counter()
        futs = [ex.submit(noop, i) for i in range(n)]
        for f in futs:
            f.result()
        out.append(n / (time.perf_counter() - t))
    return "W1 10,000 no-op jobs", "jobs/s", out, ">= 25,000", lambda v: v >= 25000, "{:,.0f}"


def w2(s, n=300):
    out = []
    for ex in (s.client, s.pool):
        lat = []
        for i in range(n):
            t = time.perf_counter()
            ex.submit(noop, i).result()
            lat.append((time.perf_counter() - t) * 1e6)
        lat.sort()
        out.append((statistics.median(lat), lat[int(0.99 * (n - 1))]))
    fmt = lambda v: f"{v[0]:,.0f} / {v[1]:,.0f}"  # noqa: E731
    return "W2 300 round trips", "median / p99 us", out, "median <= 300", lambda v: v[0] <= 300, fmt


def w3(s, n=200, secs=0.05):
    ideal = n * secs / WORKERS
    out = []
    for ex in (s.client, s.pool):
        t = time.perf_counter()
        for f in [ex.submit(nap, secs) for _ in range(n)]:
            f.result()
        out.append(ideal / (time.perf_counter() - t))
    return "W3 200 x sleep(50 ms)", f"efficiency vs {ideal:.1f} s", out, ">= 0.99", lambda v: v >= 0.99, "{:.3f}"


def w4(s, n=200, mb=1):
    blob = os.urandom(mb << 20)
    out = []
    for ex in (s.client, s.pool):
        t = time.perf_counter()
        for f in [ex.submit(size, blob) for _ in range(n)]:
            f.result()
        out.append(n * mb / (time.perf_counter() - t))
    return "W4 200 jobs x 1 MB argument", "MiB/s", out, ">= 800", lambda v: v >= 800, "{:,.0f}"


def w5(_s=None):
    out = []
    with tempfile.TemporaryDirectory(prefix="cw-bench-") as tmp:
        t = time.perf_counter()
        with cw.LocalCluster(n_workers=WORKERS, cluster=os.path.join(tmp, "c")) as lc:
            with lc.client() as c:
                c.submit(noop, 1).result()
                out.append(time.perf_counter() - t)
    t = time.perf_counter()
    with cf.ProcessPoolExecutor(WORKERS) as pool:
        pool.submit(noop, 1).result()
        out.append(time.perf_counter() - t)
    return "W5 start 2 workers -> first result", "seconds", out, "<= 0.4", lambda v: v <= 0.4, "{:.3f}"


ROWS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="*", default=list(ROWS), help="rows to run (default: all)")
    ap.add_argument("--encrypt", action="store_true", help="run cw's wire over CurveZMQ")
    args = ap.parse_args(argv)
    print(f"cw {cw.__version__} vs ProcessPoolExecutor, {WORKERS} workers, {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}{', encrypted wire' if args.encrypt else ''}")  # fmt: skip
    header = f"{'workload':<36} {'metric':<22} {'cw':>16} {'ProcessPool':>16}  {'target':<14} met"
    print(header)
    print("-" * len(header))
    with Sides(args.encrypt) as s:
        for name in args.rows:
            title, metric, (mine, theirs), target, ok, fmt = ROWS[name.upper()](s)
            f = fmt if callable(fmt) else fmt.format
            print(f"{title:<36} {metric:<22} {f(mine):>16} {f(theirs):>16}  {target:<14} "
                  f"{'yes' if ok(mine) else 'NO'}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
