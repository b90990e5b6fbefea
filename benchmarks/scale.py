"""A thousand workers on one master: a real master, simulated worker agents, loopback.

    python -m benchmarks.scale                    # 10, 100 and 1,000 workers
    python -m benchmarks.scale --workers 1000     # one size
    python -m benchmarks.scale --queue            # also 10^4, 10^5, 10^6 queued jobs (memory)

The master is the real one (``python -m cw.master``, its store on disk). The
workers are light: each is a :class:`cw.link.Link` (the gate's one-time
token, OPEN/CHALLENGE, a signed session, reconnection) speaking the worker's
side of the protocol (HELLO, HEARTBEAT, RESULT, BYE), many to a process and
one ZeroMQ context per process, so that 2 cores hold a thousand of them. A
task is answered at once with the pickled ``None`` a no-op returns, so the
figures are the master's (and the wire's), not the jobs'.

For each number of workers, on a fresh master:

- **storm**: every worker connects within 1 s (evenly spread); the time from
  the first connection until the last one is welcomed, and how many were
  refused (the gate, a REJECT) or had to open their session again;
- **idle**: the master's CPU over a quiet interval, less its CPU with no
  worker, per worker and heartbeat interval (a worker's HEARTBEAT in, the
  master's out);
- **dispatch**: a client maps no-op jobs over all the workers: jobs per second,
  and the master's CPU per job;
- **lost**: one worker's connection closes (its process died): how long until
  the master's status no longer lists it; and one worker falls silent with
  its connection open (a hung host): the same;
- the master's resident memory after the storm and its peak after dispatch.

``--queue`` runs ``benchmarks.memory --queue N`` for N = 10^4, 10^5, 10^6:
the master's and the client's peak memory with N jobs queued.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import zmq

import cw
from cw import defaults
from cw import protocol as P
from cw.discovery import ClusterDir
from cw.errors import AuthenticationError
from cw.launchers import environment
from cw.link import Link, query_status
from cw.serialize import runtime_versions

#: Simulated workers per process (one ZeroMQ context, one poller).
PER_PROCESS = 250
NONE = pickle.dumps(None, protocol=5)


def noop(x=None):
    return x


# -- the simulated workers (in their own processes) -------------------------------------
class SimWorker:
    """One worker agent's side of the protocol, on a real Link; answers every task at once."""

    def __init__(self, owner: Swarm, n: int):
        self.owner, self.n = owner, n
        self.id = f"sim-{os.getpid()}-{n}"
        self.link: Link | None = None
        self.counters = {"fn_received": 0, "tasks": 0, "results": 0, "crashes": 0}
        self.welcomed_at: float | None = None
        self.hellos = 0
        self.refused = ""
        self.epoch = None
        self.silent = False  # a hung host: no heartbeat, no answer, connection open

    def start(self) -> None:
        o = self.owner
        self.link = Link(o.ctx, o.poller, o.key, None, o.address, who=self.id, hello=self.hello,
                         linger=0)  # fmt: skip
        self.link.connect()
        o.index()

    def hello(self) -> None:
        self.hellos += 1
        self.link.send(P.HELLO, {
            "role": "worker", "id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
            "procs": 1, "caps": {"cpus": 1, "host": socket.gethostname(), "tags": [], "gpus": 0},
            "have": [], "holding": [], "running": [], "draining": False, "info": self.owner.info,
            "label": self.owner.label, "task": self.owner.task, "versions": self.owner.versions,
            "epoch": self.epoch,
        })  # fmt: skip

    def read(self) -> None:
        try:
            for kind, h, _blobs in self.link.recv():
                if self.silent:
                    continue
                if kind == P.TASKS:
                    rows = h["t"]
                    self.counters["fn_received"] += len(h.get("f") or ())
                    self.counters["tasks"] += len(rows)
                    self.counters["results"] += len(rows)
                    for i in range(0, len(rows), defaults.BATCH_JOBS):
                        part = rows[i : i + defaults.BATCH_JOBS]
                        self.link.send(P.RESULT, {"r": [(r[0], P.OK, 0.0, None, None) for r in part],
                                                  "running": []}, [NONE] * len(part))  # fmt: skip
                elif kind == P.WELCOME:
                    self.epoch = h.get("epoch")
                    if self.welcomed_at is None:
                        self.welcomed_at = time.time()
                elif kind == P.BYE and h.get("rehello"):
                    self.hello()
        except AuthenticationError as e:
            self.refused = str(e)
            self.close()

    def tick(self, now: float) -> None:
        if self.link is None or self.link.sock is None or self.silent:
            return
        try:
            if self.link.welcomed and now - self.link.last_sent >= defaults.HEARTBEAT:
                self.link.send(P.HEARTBEAT, {**self.counters, "running": []})
            sock = self.link.sock
            self.link.keep_alive(now)
            if self.link.sock is not sock:
                self.owner.index()
        except AuthenticationError as e:
            self.refused = str(e)
            self.close()

    def close(self) -> None:
        if self.link is not None and self.link.sock is not None:
            self.link.close(0)
        self.owner.index()


class Swarm:
    """Simulated workers of one process, driven by commands on stdin (one JSON per line)."""

    def __init__(self, address: str, cluster: str, n: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.address, self.key = address, ClusterDir(cluster).key()
        env = environment()
        self.info, self.label, self.task, self.versions = env.info(), env.label(), env.task(), runtime_versions()
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)
        self.ctx.set(zmq.MAX_SOCKETS, 8 * n + 64)
        self.poller = zmq.Poller()
        self.poller.register(sys.stdin.fileno(), zmq.POLLIN)
        self.workers = [SimWorker(self, i) for i in range(n)]
        self.by_socket: dict = {}

    def index(self) -> None:
        """Which worker owns each socket (a link makes new ones when it reconnects)."""
        self.by_socket = {}
        for w in self.workers:
            if w.link is not None:
                for s in (w.link.sock, w.link.monitor):
                    if s is not None:
                        self.by_socket[s] = w

    def say(self, **what) -> None:
        sys.stdout.write(json.dumps(what) + "\n")
        sys.stdout.flush()

    def run(self) -> None:
        self.say(ready=True)
        starts: list[tuple[float, SimWorker]] = []
        next_tick = 0.0
        while True:
            events = self.poller.poll(20)
            now_wall = time.time()
            while starts and starts[0][0] <= now_wall:
                starts.pop(0)[1].start()
            for s, _ in events:
                if s == sys.stdin.fileno():
                    line = sys.stdin.readline()
                    if not line:
                        return
                    cmd = json.loads(line)
                    what = cmd["do"]
                    if what == "storm":  # connect each worker at its time, spread over cmd["spread"] s
                        starts = [(cmd["at"] + cmd["spread"] * (cmd["offset"] + i) / cmd["of"], w)
                                  for i, w in enumerate(self.workers)]  # fmt: skip
                    elif what == "report":
                        self.say(welcomed=[w.welcomed_at for w in self.workers],
                                 hellos=[w.hellos for w in self.workers],
                                 refused=[w.refused for w in self.workers if w.refused],
                                 results=sum(w.counters["results"] for w in self.workers))  # fmt: skip
                    elif what == "crash":  # its process died: the connection closes
                        w = self.workers[cmd["n"]]
                        w.close()
                        self.say(at=time.time(), id=w.id)
                    elif what == "hang":  # a hung host: silent, connection open
                        w = self.workers[cmd["n"]]
                        w.silent = True
                        self.say(at=time.time(), id=w.id)
                    elif what == "quit":
                        for w in self.workers:
                            if w.link is not None and w.link.sock is not None:
                                w.link.send(P.BYE, {"returned": [], "why": "benchmark over", "final": True})
                                w.close()
                        self.ctx.term()
                        return
                    continue
                w = self.by_socket.get(s)
                if w is not None:
                    w.read()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + 0.05
                for w in self.workers:
                    w.tick(now)


# -- the driver -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu(p: psutil.Process) -> float:
    """CPU seconds of a process's threads so far, to the nanosecond (schedstat) where
    Linux offers it: a few workers' heartbeats are below the 10 ms of a clock tick."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{p.pid}/task"):
            with open(f"/proc/{p.pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        t = p.cpu_times()
        return t.user + t.system


def rss_mb(pid: int, peak: bool = False) -> float:
    field = "VmHWM:" if peak else "VmRSS:"
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


class Run:
    """A fresh master and ``n`` simulated workers in processes of PER_PROCESS."""

    def __init__(self, n: int):
        self.n = n
        self.tmp = tempfile.TemporaryDirectory(prefix="cw-scale-")
        self.cluster = ClusterDir(os.path.join(self.tmp.name, "c"))
        self.cluster.key(create=True)
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.log = open(os.path.join(self.tmp.name, "master.log"), "wb")
        self.master = subprocess.Popen([sys.executable, "-m", "cw.master", "--cluster-dir", str(self.cluster.path),
                                        "--bind", self.address], stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip
        self.mp = psutil.Process(self.master.pid)
        self.key = self.cluster.key()
        self._wait(lambda: self.status() is not None, 30, "the master did not start")
        sizes = [min(PER_PROCESS, n - i) for i in range(0, n, PER_PROCESS)]
        self.swarms = [subprocess.Popen([sys.executable, "-m", "benchmarks.scale", "--swarm", str(k),
                                         self.address, str(self.cluster.path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                       for k in sizes]  # fmt: skip
        self.sizes = sizes
        for s in self.swarms:
            assert json.loads(s.stdout.readline())["ready"]

    def status(self) -> dict | None:
        try:
            return query_status(self.address, self.key, timeout=2.0)
        except Exception:
            return None

    def _wait(self, cond, timeout: float, why: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise RuntimeError(why)
            time.sleep(0.05)

    def tell(self, k: int, **cmd) -> dict | None:
        s = self.swarms[k]
        s.stdin.write(json.dumps(cmd) + "\n")
        s.stdin.flush()
        if cmd["do"] == "quit":
            return None
        return json.loads(s.stdout.readline())

    def storm(self, spread: float = 1.0) -> dict:
        at = time.time() + 0.5
        c0 = cpu(self.mp)
        offset = 0
        for s, k in zip(self.swarms, self.sizes):
            s.stdin.write(json.dumps({"do": "storm", "at": at, "spread": spread, "offset": offset,
                                      "of": self.n}) + "\n")  # fmt: skip
            s.stdin.flush()
            offset += k
        deadline = time.time() + 60
        while True:
            time.sleep(0.2)
            reports = [self.tell(k, do="report") for k in range(len(self.swarms))]
            welcomed = [t for r in reports for t in r["welcomed"]]
            refused = [x for r in reports for x in r["refused"]]
            if all(t is not None for t in welcomed) or refused or time.time() > deadline:
                break
        storm_cpu = cpu(self.mp) - c0
        done = [t for t in welcomed if t is not None]
        again = sum(h > 1 for r in reports for h in r["hellos"])
        listed = len((self.status() or {}).get("workers", ()))
        return {"storm_s": (max(done) - at) if len(done) == self.n else float("nan"), "welcomed": len(done),
                "refused": len(refused), "rehello": again, "listed": listed, "join_us": storm_cpu / self.n * 1e6,
                "master_mb": rss_mb(self.master.pid)}  # fmt: skip

    def idle(self, secs: float) -> float:
        """Master CPU seconds per second over a quiet interval."""
        c0, t0 = cpu(self.mp), time.monotonic()
        time.sleep(secs)
        return (cpu(self.mp) - c0) / (time.monotonic() - t0)

    def dispatch(self, jobs: int) -> dict:
        with cw.Client(self.address, cluster=str(self.cluster.path)) as c:
            [f.result() for f in c.map(noop, range(min(jobs, 2000)))]  # warm: the function, the sessions
            me = psutil.Process()
            c0, s0, m0 = cpu(self.mp), [cpu(psutil.Process(s.pid)) for s in self.swarms], cpu(me)
            t = time.perf_counter()
            futures = c.map(noop, range(jobs))
            for f in futures:
                f.result()
            secs = time.perf_counter() - t
            master_cpu = cpu(self.mp) - c0
            swarm_cpu = sum(cpu(psutil.Process(s.pid)) for s in self.swarms) - sum(s0)
            client_cpu = cpu(me) - m0
        reports = [self.tell(k, do="report") for k in range(len(self.swarms))]
        results = sum(r["results"] for r in reports)
        return {"jobs_s": jobs / secs, "master_us_job": master_cpu / jobs * 1e6,
                "workers_us_job": swarm_cpu / jobs * 1e6, "client_us_job": client_cpu / jobs * 1e6,
                "results": results,
                "master_peak_mb": rss_mb(self.master.pid, peak=True)}  # fmt: skip

    def lose(self, how: str) -> float:
        """Seconds until the master's log says that a worker that crashed or hung is lost.

        (Watched in the log, not by asking the master's status: each request is a
        connection that closes, and after a closed connection the master judges
        silence sooner; see WorkerHandlers._check_workers.)
        """
        # the last swarm's last worker crashes, the one before it hangs
        sent = self.tell(len(self.swarms) - 1, do=how, n=self.sizes[-1] - (1 if how == "crash" else 2))
        needle = f"worker {sent['id']} ".encode()
        path = self.log.name
        found: list[float] = []

        def seen() -> bool:
            with open(path, "rb") as f:
                if any(needle in line and b" lost (" in line for line in f):
                    found.append(time.time())
            return bool(found)

        self._wait(seen, 3 * defaults.WORKER_TIMEOUT, f"a {how} worker was never noticed")
        return found[0] - sent["at"]

    def close(self) -> None:
        for k in range(len(self.swarms)):
            try:
                self.tell(k, do="quit")
            except (BrokenPipeError, OSError):
                pass
        for s in self.swarms:
            try:
                s.wait(10)
            except subprocess.TimeoutExpired:
                s.kill()
        self.master.terminate()
        try:
            self.master.wait(15)
        except subprocess.TimeoutExpired:
            self.master.kill()
        self.log.close()
        self.tmp.cleanup()


def one_size(n: int, jobs: int, idle_s: float) -> dict:
    run = Run(n)
    try:
        base = run.idle(idle_s)
        out = run.storm()
        time.sleep(1.0)  # the storm's tail settles
        busy = run.idle(idle_s)
        # per worker and heartbeat interval: its HEARTBEAT in, the master's out
        out["hb_us"] = (busy - base) / n * defaults.HEARTBEAT * 1e6
        out["idle_cpu"] = busy
        out.update(run.dispatch(jobs))
        # silent first, once no connection has closed for WORKER_TIMEOUT (after one, the master
        # judges silence sooner for a while)
        time.sleep(defaults.WORKER_TIMEOUT + 1)
        out["lost_silent_s"] = run.lose("hang")
        out["lost_closed_s"] = run.lose("crash")
        return out
    finally:
        run.close()


ROWS = [
    ("storm: all welcomed (s), connecting within 1 s", "storm_s", "{:.2f}", "<= 5"),
    ("  welcomed / refused / opened again", None, None, "all / 0 / -"),
    ("  listed in the master's status", "listed", "{:,}", ""),
    ("  master CPU per worker joining (us)", "join_us", "{:,.0f}", ""),
    ("master CPU idle (share of one core)", "idle_cpu", "{:.1%}", ""),
    ("master CPU per heartbeat per worker (us)", "hb_us", "{:.0f}", ""),
    ("dispatch, no-op map (jobs/s)", "jobs_s", "{:,.0f}", ">= 20,000"),
    ("  master CPU per job (us)", "master_us_job", "{:.0f}", ""),
    ("  simulated workers' CPU per job (us)", "workers_us_job", "{:.0f}", ""),
    ("  client CPU per job (us)", "client_us_job", "{:.0f}", ""),
    ("lost worker noticed: connection closed (s)", "lost_closed_s", "{:.1f}", ""),
    ("lost worker noticed: silent, connected (s)", "lost_silent_s", "{:.1f}", ""),
    ("master memory after the storm (MB)", "master_mb", "{:.0f}", ""),
    ("master peak memory after dispatch (MB)", "master_peak_mb", "{:.0f}", ""),
]


def table(sizes: list[int], results: dict[int, dict]) -> None:
    head = f"{'workers':<48}" + "".join(f"{n:>12,}" for n in sizes) + "  target"
    print(head)
    print("-" * len(head))
    for title, key, fmt, target in ROWS:
        cells = []
        for n in sizes:
            r = results[n]
            if key is None:
                cells.append(f"{r['welcomed']:,}/{r['refused']}/{r['rehello']}")
            else:
                cells.append(fmt.format(r[key]))
        print(f"{title:<48}" + "".join(f"{c:>12}" for c in cells) + f"  {target}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="*", default=[10, 100, 1000])
    ap.add_argument("--jobs", type=int, default=100_000, help="no-op jobs mapped in the dispatch row")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of each idle CPU measurement")
    ap.add_argument("--queue", action="store_true", help="also memory with 10^4, 10^5, 10^6 queued jobs")
    ap.add_argument("--swarm", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.swarm:
        n, address, cluster = args.swarm
        Swarm(address, cluster, int(n)).run()
        return 0
    print(f"cw {cw.__version__}: one master, simulated workers ({PER_PROCESS} a process), {os.cpu_count()} CPUs,"
          f" loopback, heartbeat {defaults.HEARTBEAT:g} s, worker timeout {defaults.WORKER_TIMEOUT:g} s", flush=True)  # fmt: skip
    results = {}
    for n in args.workers:
        results[n] = one_size(n, args.jobs, args.idle)
        print(f"  {n:,} workers: {json.dumps({k: round(v, 3) for k, v in results[n].items()})}", flush=True)
    table(args.workers, results)
    if args.queue:
        print()
        for n in (10_000, 100_000, 1_000_000):
            subprocess.run([sys.executable, "-m", "benchmarks.memory", "--queue", str(n)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
