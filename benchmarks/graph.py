"""A 10,000-leaf tree reduction: cw beside dask's local scheduler, same machine, same run.

    python -m benchmarks.graph                 # 10,000 leaves
    python -m benchmarks.graph --leaves 2000

Each leaf returns a 1 KB value and the tree merges them pairwise (19,999
jobs). cw runs a real local cluster on loopback (master + 2 workers + this
client) and commits every job, edge and result to its SQLite store; dask runs
the same graph of ``dask.delayed`` calls on its multiprocessing scheduler
with 2 workers, which passes every task's inputs and result through this
process. "client bytes" are the bytes this process sent and received: for cw
the pickled jobs out and the results in (Client.traffic); for dask what its
scheduler pickled to and unpickled from its workers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import cw

WORKERS = 2
SIZE = 1000


def leaf(i):
    return i, b"x" * SIZE


def merge(a, b):
    return a[0] + b[0], a[1]


def run_cw(n: int) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory(prefix="cw-bench-") as tmp:
        with cw.LocalCluster(n_workers=WORKERS, cluster=os.path.join(tmp, "c")) as lc, lc.client() as c:
            while len(c.status()["workers"]) < WORKERS:
                time.sleep(0.02)
            c.reduce(merge, (c.submit(leaf, i) for i in range(64))).result()  # warm up
            before = c.traffic
            t = time.perf_counter()
            value = c.reduce(merge, (c.submit(leaf, i) for i in range(n))).result()
            elapsed = time.perf_counter() - t
            after = c.traffic
    assert value == (sum(range(n)), b"x" * SIZE)
    moved = after["sent"] - before["sent"] + after["received"] - before["received"]
    return (2 * n - 1) / elapsed, elapsed, moved


_MOVED = [0]  # bytes this process pickled for dask's workers and unpickled from them


def _dumps(obj):
    import cloudpickle

    blob = cloudpickle.dumps(obj)
    _MOVED[0] += len(blob)  # (in a worker process this counts there, not here)
    return blob


def _loads(blob):
    import cloudpickle

    _MOVED[0] += len(blob)
    return cloudpickle.loads(blob)


def run_dask(n: int) -> tuple[float, float, int] | None:
    try:
        import dask
        import dask.multiprocessing
    except ImportError:
        return None
    moved = _MOVED
    level = [dask.delayed(leaf)(i) for i in range(n)]
    while len(level) > 1:
        level = [dask.delayed(merge)(*level[i : i + 2]) if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]  # fmt: skip
    graph = level[0]
    dask.compute(dask.delayed(merge)(dask.delayed(leaf)(0), dask.delayed(leaf)(1)), scheduler="processes",
                 num_workers=WORKERS)  # warm up the pool  # fmt: skip
    moved[0] = 0
    t = time.perf_counter()
    (value,) = dask.compute(graph, scheduler=dask.multiprocessing.get, num_workers=WORKERS,
                            func_dumps=_dumps, func_loads=_loads)  # fmt: skip
    elapsed = time.perf_counter() - t
    assert value == (sum(range(n)), b"x" * SIZE)
    return (2 * n - 1) / elapsed, elapsed, moved[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--leaves", type=int, default=10_000)
    args = ap.parse_args(argv)
    n = args.leaves
    print(f"cw {cw.__version__}: a {n:,}-leaf tree reduction ({2 * n - 1:,} jobs, {SIZE} B a leaf), {WORKERS}"
          f" workers, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")  # fmt: skip
    header = f"{'':<28} {'jobs/s':>10} {'seconds':>9} {'client bytes':>14}"
    print(header)
    print("-" * len(header))
    rows = [("cw (local cluster)", run_cw(n))]
    dask_row = run_dask(n)
    rows.append(("dask (multiprocessing)", dask_row))
    for name, r in rows:
        if r is None:
            print(f"{name:<28} {'not installed':>10}")
        else:
            print(f"{name:<28} {r[0]:>10,.0f} {r[1]:>9.2f} {r[2]:>14,}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
