"""What this machine allows: the floors under benchmarks.bench's targets.

    python -m benchmarks.floors

Each figure is one mechanism cw's path cannot do without, measured alone on
this machine with no cw code in it (except the store's own verbs): a ZeroMQ
round trip between two processes, a pipe round trip (agent and executor),
a hand-off between two threads (a client's caller and its I/O thread), one
SQLite commit, SHA-256 and a copy of a megabyte, and the store's cost of a
job's row and its result's row. Then each target is set beside the floor its
path adds up to: a target below its floor cannot be met by tuning cw, only
by taking a mechanism out of the path.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import pickle
import queue
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time

import zmq

from cw.store import Store

N = 2000


def _median(run, n: int = N) -> float:
    """Median microseconds of run() over n calls (after 10% warm-up)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times[n // 10 :]) * 1e6


def _echo_zmq(address: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(address)
    while True:
        frames = s.recv_multipart()
        if frames[-1] == b"stop":
            return
        s.send_multipart(frames)


def zmq_round_trip(frames: int) -> float:
    address = f"tcp://127.0.0.1:{_free_port()}"
    p = mp.get_context("fork").Process(target=_echo_zmq, args=(address,))
    p.start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(address)
    msg = [b"x" * 64] * frames

    def run():
        s.send_multipart(msg)
        s.recv_multipart()

    _median(run, 200)
    us = _median(run)
    s.send_multipart([b"stop"])
    p.join()
    s.close()
    ctx.term()
    return us


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _echo_pipe(conn) -> None:
    while True:
        m = conn.recv_bytes()
        if m == b"stop":
            return
        conn.send_bytes(m)


def pipe_round_trip() -> float:
    a, b = mp.get_context("fork").Pipe()
    p = mp.get_context("fork").Process(target=_echo_pipe, args=(b,))
    p.start()
    us = _median(lambda: (a.send_bytes(b"x" * 64), a.recv_bytes()))
    a.send_bytes(b"stop")
    p.join()
    return us


def thread_round_trip() -> float:
    there, back = queue.Queue(), queue.Queue()

    def other():
        while (m := there.get()) is not None:
            back.put(m)

    t = threading.Thread(target=other)
    t.start()
    us = _median(lambda: (there.put(1), back.get()))
    there.put(None)
    t.join()
    return us


def store_costs() -> tuple[float, float, float]:
    """(one job stored and committed alone, us; per job row and per result row in batches of 1,000, us)."""
    with tempfile.TemporaryDirectory() as d:
        store = Store(os.path.join(d, "s.db"))
        sess, fn, args = secrets.token_hex(16), secrets.token_hex(32), pickle.dumps(((1,), {}))
        store.add_session(sess, None, {})
        seq = iter(range(10**9))

        def one():
            store.add_jobs([(sess, next(seq), None, None, fn, args, None, None, None, None)])
            store.commit()

        alone = _median(one, 1000)
        first = store.add_jobs([(sess, next(seq), None, None, fn, args, None, None, None, None)])[0]
        t = time.perf_counter()
        ids = []
        for _ in range(20):
            ids += store.add_jobs([(sess, next(seq), None, None, fn, args, None, None, None, None)
                                   for _ in range(1000)])  # fmt: skip
            store.commit()
        per_job = (time.perf_counter() - t) / len(ids) * 1e6
        now = time.time()
        t = time.perf_counter()
        for i in range(0, len(ids), 1000):
            store.add_results([(j, 0, b"\x80\x05N.", None, None, "w:1", 0.001, now, now, None, None, None)
                               for j in ids[i : i + 1000]])  # fmt: skip
            store.commit()
        per_result = (time.perf_counter() - t) / len(ids) * 1e6
        del first
        store.close()
        return alone, per_job, per_result


def megabyte_costs() -> tuple[float, float]:
    """(SHA-256 of 1 MiB, a copy of 1 MiB), in ms."""
    blob = os.urandom(1 << 20)
    sha = _median(lambda: hashlib.sha256(blob).digest(), 200) / 1e3
    copy = _median(lambda: bytes(bytearray(blob)), 200) / 1e3 / 2  # bytearray() and bytes(): two copies
    return sha, copy


def main() -> int:
    print(f"floors on this machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, pyzmq {zmq.__version__}")
    z1, z5 = zmq_round_trip(1), zmq_round_trip(5)
    pipe, thread = pipe_round_trip(), thread_round_trip()
    alone, per_job, per_result = store_costs()
    sha, copy = megabyte_costs()
    rows = [
        ("ZeroMQ round trip, 2 processes, 1-frame messages", f"{z1:,.0f} us"),
        ("ZeroMQ round trip, 2 processes, 5-frame messages", f"{z5:,.0f} us"),
        ("pipe round trip, 2 processes (agent <-> executor)", f"{pipe:,.0f} us"),
        ("thread hand-off round trip (caller <-> I/O thread)", f"{thread:,.0f} us"),
        ("store: one job stored and committed alone", f"{alone:,.0f} us"),
        ("store: a job's row, in batches of 1,000", f"{per_job:,.1f} us"),
        ("store: a result's row, in batches of 1,000", f"{per_result:,.1f} us"),
        ("SHA-256 of 1 MiB", f"{sha:.2f} ms"),
        ("a copy of 1 MiB", f"{copy:.2f} ms"),
    ]
    for name, v in rows:
        print(f"  {name:<56} {v:>10}")
    w2 = 2 * z1 + pipe + thread + 2 * alone
    print("\nwhat each target's path adds up to, with no other work in it:")
    print(f"  W2 round trip: 2 ZeroMQ round trips (client-master, master-worker) + a pipe round trip"
          f" + a thread hand-off + 2 commits = {w2:,.0f} us (target 450)")  # fmt: skip
    print(f"  W1m bulk map: the master's one thread stores a row per job and per result:"
          f" at most {1e6 / (per_job + per_result):,.0f} jobs/s before reading a message (target 60,000)")  # fmt: skip
    w4 = 3 * sha + 9 * copy  # into and out of the kernel at 3 process boundaries, pickle, unpickle, the file
    print(f"  W4 1 MiB arguments: 3 SHA-256 (client, master, worker) + 9 copies = {w4:.2f} ms of CPU a job;"
          f" on {os.cpu_count()} CPUs at most {os.cpu_count() / w4 * 1e3:,.0f} MiB/s (target 800)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
