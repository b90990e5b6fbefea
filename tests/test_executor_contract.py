"""cw.Executor keeps concurrent.futures' contract: each test body runs against
ProcessPoolExecutor too, so the test itself shows what the standard does."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from pathlib import Path

import pytest
from conftest import wait_for

import cw
from cw.store.reader import StoreReader


def nap(seconds, value):
    time.sleep(seconds)
    return value


def square(x):
    return x * x


def add(a, b):
    return a + b


def touch(folder, i):
    time.sleep(0.2)
    Path(folder, f"done-{i}").write_text("ok")
    return i


class Big:
    """A result a test can hold a weak reference to."""

    def __init__(self, i):
        self.i = i


def make_big(i):
    return Big(i)


class ExitsWhenUnpickled:
    def __reduce__(self):
        return (sys.exit, (3,))


def returns_exiter():
    return ExitsWhenUnpickled()


def exits(code):
    sys.exit(code)


def interrupts():
    raise KeyboardInterrupt("from the job")


@pytest.fixture(params=["ProcessPoolExecutor", "cw.Executor"])
def make(request):
    """A factory of executors with 2 workers: the standard one, or cw's on a real master."""
    if request.param == "ProcessPoolExecutor":
        made = []

        def pool():
            made.append(cf.ProcessPoolExecutor(2))
            return made[-1]

        yield pool
        for p in made:
            p.shutdown(wait=True, cancel_futures=True)
        return
    request.getfixturevalue("workers")  # a master and two one-slot workers
    made = []

    def executor():
        made.append(cw.Executor())
        return made[-1]

    yield executor
    for e in made:
        e.shutdown(wait=True, cancel_futures=True)


def wait_running(futs, n):
    return wait_for(lambda: (lambda r: r if len(r) >= n else None)([f for f in futs if f.running()]),
                    timeout=30, what=f"{n} running futures")  # fmt: skip


@pytest.mark.timeout(90)
def test_cancel_futures_cancels_only_pending_ones(make):
    ex = make()
    futs = [ex.submit(nap, 1.0, i) for i in range(8)]
    running = wait_running(futs, 2)
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futs)
    assert [f.result() for f in running] == [futs.index(f) for f in running]  # they finished
    assert not any(f.cancelled() for f in running)
    assert any(f.cancelled() for f in futs)
    assert all(f.cancelled() or f.result() == i for i, f in enumerate(futs))


@pytest.mark.timeout(60)
def test_shutdown_without_wait_lets_pending_work_finish(make):
    ex = make()
    futs = [ex.submit(nap, 0.3, i) for i in range(6)]
    it = ex.map(square, range(20))
    ex.shutdown(wait=False)
    assert not all(f.done() for f in futs)  # it returned at once ...
    assert [f.result(30) for f in futs] == list(range(6))  # ... and the work still ran
    assert list(it) == [i * i for i in range(20)]
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)


@pytest.mark.timeout(60)
def test_deleting_the_executor_does_not_cancel_a_map_being_iterated(make):
    ex = make()
    it = ex.map(square, range(10))
    del ex
    gc.collect()
    assert list(it) == [i * i for i in range(10)]


@pytest.mark.timeout(60)
def test_running_futures_are_running_and_cannot_be_cancelled(make):
    ex = make()
    f = ex.submit(nap, 1.0, "v")
    wait_for(f.running, timeout=30, what="the job to start")
    assert not f.cancel()
    assert f.result(30) == "v" and not f.cancelled()
    g = ex.submit(nap, 0, "w")
    assert g.result(30) == "w" and not g.running() and g.done()


@pytest.mark.timeout(60)
def test_map_drops_each_result_once_yielded(make):
    ex = make()
    it = ex.map(make_big, range(3))
    first = next(it)
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None, "the map still holds a result it has yielded"
    assert [b.i for b in it] == [1, 2]


@pytest.mark.timeout(60)
def test_map_chunksize(make):
    ex = make()
    with pytest.raises(ValueError, match="chunksize"):
        ex.map(square, [1], chunksize=0)
    assert list(ex.map(add, range(7), range(7), chunksize=3)) == [2 * i for i in range(7)]


@pytest.mark.timeout(90)
def test_an_interpreter_that_exits_without_shutdown_waits_for_the_work(make, tmp_path, request):
    kind = request.node.callspec.params["make"]
    factory = "cf.ProcessPoolExecutor(2)" if kind == "ProcessPoolExecutor" else "cw.Executor()"
    out = tmp_path / "out"
    out.mkdir()
    script = textwrap.dedent(f"""
        import concurrent.futures as cf, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import cw
        from test_executor_contract import touch
        ex = {factory}
        for i in range(6):
            ex.submit(touch, {str(out)!r}, i)
    """)  # exits without shutdown(): the standard waits for the jobs
    if kind == "cw.Executor":
        make()  # the fixture's master and workers
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in out.iterdir()) == [f"done-{i}" for i in range(6)]


# -- cw's own: what the standard pool has no word for ---------------------------------
@pytest.mark.timeout(60)
def test_client_futures_cancel_kills_running_jobs_as_dask_does(workers):
    with cw.Client() as c:
        f = c.submit(nap, 30, "never")
        wait_for(f.running, timeout=30, what="the job to start")
        assert f.cancel() and f.cancelled()
        with pytest.raises(cf.CancelledError):
            f.result(1)
        assert list(cf.as_completed([f], timeout=5)) == [f]  # waiters hear of it
    with cw.Executor() as ex:
        g = ex.submit(nap, 30, "never")
        wait_for(g.running, timeout=30, what="the job to start")
        assert not g.cancel()  # the standard refuses ...
        assert ex.client.cancel([g]) == 1 and g.cancelled()  # ... the explicit verb kills


@pytest.mark.timeout(60)
def test_the_client_survives_a_result_that_exits_when_unpickled(workers):
    with cw.Client() as c:
        with pytest.raises(cw.SerializationError, match="SystemExit"):
            c.submit(returns_exiter).result(30)
        assert c.submit(square, 3).result(30) == 9  # the I/O thread lives on
        with pytest.raises(cw.JobError, match="SystemExit") as e:
            c.submit(exits, 4).result(30)
        assert isinstance(e.value.original, SystemExit) and e.value.original.code == 4
        with pytest.raises(cw.JobError, match="KeyboardInterrupt") as e:  # not the user's Ctrl-C
            c.gather([c.submit(interrupts)])
        assert isinstance(e.value.original, KeyboardInterrupt)
        assert c.gather([c.submit(square, 5)]) == [25]


def size_of(blob):
    return len(blob)


@pytest.mark.timeout(90)
def test_close_leaves_what_was_submitted_at_the_master(master, workers, procs):
    """close() right after submitting: the pending futures are cancelled, and every job
    is at the master (it runs on and lands in the store), even when the master has not
    read them yet when close() is called."""
    m = procs.procs[0][1]
    c = cw.Client(run="closed")
    assert c.submit(size_of, b"").result(30) == 0
    m.send_signal(signal.SIGSTOP)  # busy elsewhere: nothing is read for a while
    try:
        futures = [c.submit(size_of, bytes(500_000) + bytes([i])) for i in range(60)]  # 30 MB
        closer = threading.Thread(target=c.close)
        closer.start()
        time.sleep(2.0)  # longer than a socket's linger
    finally:
        m.send_signal(signal.SIGCONT)
    closer.join(60)
    assert not closer.is_alive() and all(f.done() for f in futures)  # finished, or cancelled

    def stored():
        with StoreReader(master.store_path) as r:
            return r.results("closed")

    wait_for(lambda: len(stored()) == 61, timeout=60, what="every job in the store")
    assert {row["status"] for row in stored()} == {"done"}


def test_submit_after_close_says_the_client_is_closed(cw_home):
    c = cw.Client(serial=True)
    c.close()
    assert c.submit(square, 2).result() == 4  # serial: no connection to lose
    with cw.LocalCluster(n_workers=1) as lc:
        c = cw.Client(lc)
        c.close()
        with pytest.raises(cw.errors.ClientError, match="closed"):
            c.submit(square, 2)
        t = cw.ClientThread(lambda *a: None, host=lc.address, cluster=str(lc.cluster.path))
        t.start()
        t.stop()
        with pytest.raises(cw.errors.ClientError, match="closed"):
            t.submit(square, 2)
