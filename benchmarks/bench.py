"""cw beside concurrent.futures.ProcessPoolExecutor, same machine, same run.

    python -m benchmarks.bench            # the whole table
    python -m benchmarks.bench W1 W4      # some rows

Both sides get 2 worker processes. cw runs a real local cluster on loopback
(master + 2 workers + this client, 4 processes) and commits every job and
result to its SQLite store; the pool keeps everything in memory.

Each row also gives the CPU time per job, summed over every process of each
side (for cw: the master, the agents, their executors and this client), which
is much steadier than wall-clock figures on a shared machine. W2 is followed
by its per-hop breakdown: a second cluster, run with $CW_TRACE, notes when
each message is packed and when it arrives, in every process, on the host's
monotonic clock (cw.trace); the medians of the steps are printed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

import cw
from cw import trace

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

    def pids(self, ex) -> list[int]:
        """The processes of one side (this one included)."""
        if ex is self.pool:
            return [os.getpid(), *self.pool._processes]
        return [os.getpid(), *(p.pid for p in self.lc.procs)]

    def timed(self, ex, run, n: int) -> tuple[float, float]:
        """(seconds, CPU microseconds per job) of run(ex) over n jobs, on ex's side."""
        pids = self.pids(ex)
        c0, t = cpu_seconds(pids), time.perf_counter()
        run(ex)
        secs = time.perf_counter() - t
        return secs, (cpu_seconds(pids) - c0) / n * 1e6

    def __exit__(self, *exc):
        self.client.close()
        self.lc.close()
        self.pool.shutdown()
        self.tmp.cleanup()


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU of these processes and their descendants, so far."""
    total, seen = 0.0, set()
    for pid in pids:
        try:
            top = psutil.Process(pid)
            procs = [top] if pid == os.getpid() else [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
            if p.pid != os.getpid():  # and its children that ended (an executor replaced)
                total += t.children_user + t.children_system
    return total


def _each(s, n, run):
    """[(rate, CPU us per job)] for cw, then the pool."""
    out = []
    for ex in (s.client, s.pool):
        secs, cpu = s.timed(ex, run, n)
        out.append((n / secs, cpu))
    return out


def _rate(fmt="{:,.0f}"):
    return lambda v: f"{fmt.format(v[0])} ({v[1]:,.0f})"


def w1(s, n=10_000):
    def run(ex):
        for f in [ex.submit(noop, i) for i in range(n)]:
            f.result()

    return ("W1 10,000 no-op jobs, submit()", "jobs/s (CPU us/job)", _each(s, n, run), ">= 25,000",
            lambda v: v[0] >= 25000, _rate())  # fmt: skip


def w1m(s, n=100_000):
    def run(ex):
        if ex is s.pool:
            list(ex.map(noop, range(n), chunksize=1000))
        else:
            for f in ex.map(noop, range(n)):
                f.result()

    return ("W1m 100,000 no-op map() (pool: chunks of 1,000)", "jobs/s (CPU us/job)", _each(s, n, run), ">= 60,000",
            lambda v: v[0] >= 60000, _rate())  # fmt: skip


def w1e(s, n=100_000, chunk=100):
    out = []
    with cw.Executor(address=s.lc.address, cluster=s.lc.cluster.path) as ex:
        s_ex = [ex, s.pool]
        for e in s_ex:
            pids = s.pids(s.client if e is ex else s.pool)
            c0, t = cpu_seconds(pids), time.perf_counter()
            list(e.map(noop, range(n), chunksize=chunk))
            secs = time.perf_counter() - t
            out.append((n / secs, (cpu_seconds(pids) - c0) / n * 1e6))
    return (f"W1m Executor.map, chunksize={chunk}", "calls/s (CPU us/call)", out, "", lambda v: True, _rate())


def w1c(s, n=100_000):
    import threading

    out = []
    done = threading.Semaphore(0)
    c = cw.ClientThread(lambda j, r: None, s.lc.address, cluster=s.lc.cluster.path)
    c.start()
    try:
        pids = s.pids(s.client)
        c0, t = cpu_seconds(pids), time.perf_counter()
        for i in range(n):
            c.submit(noop, i)
        c.wait()
        secs = time.perf_counter() - t
        out.append((n / secs, (cpu_seconds(pids) - c0) / n * 1e6))
    finally:
        c.stop()
    del done
    secs, cpu = s.timed(s.pool, lambda ex: [f.add_done_callback(lambda f: None)
                                            for f in [ex.submit(noop, i) for i in range(n)]]
                        and ex.submit(noop, 0).result(), n)  # fmt: skip
    out.append((n / secs, cpu))
    return ("W1m 100,000 ClientThread callbacks", "jobs/s (CPU us/job)", out, "", lambda v: True, _rate())


def w2(s, n=300):
    out = []
    for ex in (s.client, s.pool):
        lat = []
        pids = s.pids(ex)
        c0 = cpu_seconds(pids)
        for i in range(n):
            t = time.perf_counter()
            ex.submit(noop, i).result()
            lat.append((time.perf_counter() - t) * 1e6)
        cpu = (cpu_seconds(pids) - c0) / n * 1e6
        lat.sort()
        out.append((statistics.median(lat), lat[int(0.99 * (n - 1))], cpu))
    fmt = lambda v: f"{v[0]:,.0f} / {v[1]:,.0f} ({v[2]:,.0f})"  # noqa: E731
    return ("W2 300 round trips", "median / p99 us (CPU)", out, "<= 450 / 1,000",
            lambda v: v[0] <= 450 and v[1] <= 1000, fmt)  # fmt: skip


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
    base = os.urandom(mb << 20)  # a distinct argument per job: nothing may be cached or shared
    blobs = [i.to_bytes(8, "little") + base[8:] for i in range(n)]

    def run(ex):
        for f in [ex.submit(size, b) for b in blobs]:
            f.result()

    out = [(n * mb / secs, cpu * 1e-3) for secs, cpu in (s.timed(ex, run, n) for ex in (s.client, s.pool))]
    return ("W4 200 jobs x 1 MB argument", "MiB/s (CPU ms/job)", out, ">= 800", lambda v: v[0] >= 800,
            lambda v: f"{v[0]:,.0f} ({v[1]:.1f})")  # fmt: skip


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


ROWS = {"W1": w1, "W1M": w1m, "W1E": w1e, "W1C": w1c, "W2": w2, "W3": w3, "W4": w4, "W5": w5}

# -- W2's per-hop breakdown --------------------------------------------------------------
#: The path of one round trip: (who, what was noted, message kind), in order, and the
#: name of the step that ends at each note.
PATH = [
    ("client", "submit", "", ""),
    ("client", "pack", "SUBMIT", "client: submit() to SUBMIT signed (user -> I/O thread)"),
    ("master", "unpack", "SUBMIT", "wire: client -> master"),
    ("master", "committed", "", "master: verify, store the job, commit"),
    ("master", "pack", "TASKS", "master: place it, sign TASKS"),
    ("worker", "unpack", "TASKS", "wire: master -> worker"),
    ("worker", "to executor", "", "agent: verify, queue, pipe to executor"),
    ("worker", "from executor", "", "executor: unpickle, run, answer"),
    ("worker", "pack", "RESULT", "agent: read the answer, sign RESULT"),
    ("master", "unpack", "RESULT", "wire: worker -> master"),
    ("master", "committed", "", "master: verify, store the result, commit"),
    ("master", "pack", "RESULT", "master: sign RESULT for the client"),
    ("client", "unpack", "RESULT", "wire: master -> client"),
    ("client", "result", "", "client: verify, complete the future, wake the caller"),
]


def trace_round_trips(n: int) -> None:
    """(Run with $CW_TRACE set.) n traced round trips; print each step's median, as JSON."""
    folder = os.environ["CW_TRACE"]
    with tempfile.TemporaryDirectory(prefix="cw-bench-") as tmp:
        with cw.LocalCluster(n_workers=WORKERS, cluster=os.path.join(tmp, "c")) as lc:
            master = lc.master.pid
            with lc.client() as c:
                _wait_workers(c, WORKERS)
                for i in range(200):
                    c.submit(noop, i).result()
                for i in range(n):
                    trace.mark("submit")
                    c.submit(noop, i).result()
                    trace.mark("result")
                    time.sleep(0.002)  # let heartbeats and late notes settle between trips
            mine = trace.trace_events()
    events = []  # (ns, who, what, kind)
    for name in os.listdir(folder):
        pid = int(name.split(".")[0])
        who = "master" if pid == master else "worker"
        with open(os.path.join(folder, name)) as f:
            events += [(ns, who, what, kind) for what, kind, ns in json.load(f)]
    events += [(ns, "client", what, kind) for what, kind, ns in mine]
    events.sort()
    steps: list[list[float]] = [[] for _ in PATH[1:]]
    starts = [i for i, e in enumerate(events) if e[1:3] == ("client", "submit")]
    for a in starts:
        at, times = a, [events[a][0]]
        for who, what, kind, _ in PATH[1:]:
            while at < len(events) and events[at][1:] != (who, what, kind):
                if events[at][1:3] == ("client", "submit") and at != a:
                    break
                at += 1
            if at >= len(events) or events[at][1:] != (who, what, kind):
                times = None
                break
            times.append(events[at][0])
        if times:
            for i in range(len(steps)):
                steps[i].append((times[i + 1] - times[i]) / 1e3)
    print(json.dumps({"trips": len(steps[0]), "steps": [statistics.median(x) if x else None for x in steps]}))


def breakdown(n: int = 300) -> None:
    with tempfile.TemporaryDirectory(prefix="cw-trace-") as folder:
        env = {**os.environ, "CW_TRACE": folder}
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--trace", str(n)], env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    if out.returncode != 0:
        print(f"  (no breakdown: {out.stderr.strip()[-500:]})")
        return
    got = json.loads(out.stdout.strip().splitlines()[-1])
    total = sum(x for x in got["steps"] if x)
    print(f"  W2 per hop, medians of {got['trips']} traced round trips (us; they add up to {total:,.0f}):")
    for (_, _, _, name), us in zip(PATH[1:], got["steps"]):
        print(f"    {name:<58} {'-' if us is None else f'{us:8,.0f}'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="*", default=list(ROWS), help="rows to run (default: all)")
    ap.add_argument("--encrypt", action="store_true", help="run cw's wire over CurveZMQ")
    ap.add_argument("--trace", type=int, metavar="N", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trace:
        trace_round_trips(args.trace)
        return 0
    print(f"cw {cw.__version__} vs ProcessPoolExecutor, {WORKERS} workers, {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}{', encrypted wire' if args.encrypt else ''}")  # fmt: skip
    header = f"{'workload':<46} {'metric':<22} {'cw':>20} {'ProcessPool':>20}  {'target':<14} met"
    print(header)
    print("-" * len(header))
    with Sides(args.encrypt) as s:
        for name in args.rows:
            title, metric, (mine, theirs), target, ok, fmt = ROWS[name.upper()](s)
            f = fmt if callable(fmt) else fmt.format
            print(f"{title:<46} {metric:<22} {f(mine):>20} {f(theirs):>20}  {target:<14} "
                  f"{('yes' if ok(mine) else 'NO') if target else ''}", flush=True)  # fmt: skip
            if name.upper() == "W2" and not args.encrypt:
                breakdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
