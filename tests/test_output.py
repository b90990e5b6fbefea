"""Each job's own output: fds 1 and 2 captured per job, kept (bounded) in the store, read back
from Python (future.stdout(), ClientThread) and from the shell (cw logs); the store's schema
migration; timings of every attempt."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import traceback

import pytest
from conftest import start_workers, wait_for
from test_migrations import SCHEMA_1

import cw
import cw.client
from cw.store import SCHEMA_VERSION, Store
from cw.store.reader import StoreReader


def chatty(x):
    print(f"python says {x}")
    sys.stdout.flush()
    os.write(1, f"fd 1 says {x}\n".encode())
    subprocess.run(["sh", "-c", f"echo subprocess says {x}; echo subprocess err {x} >&2"], check=True)
    print(f"warning {x}", file=sys.stderr)
    return x


def silent(x):
    return x


def fails_loudly(x):
    for i in range(30):
        print(f"err line {i}", file=sys.stderr)
    raise ValueError(f"broken {x}")


def big(n):
    sys.stdout.write("".join(f"{i:09d}\n" for i in range(n)))


def crash_after_writing():
    os.write(2, b"about to abort\n")
    os.abort()


def test_future_stdout_and_stderr_catch_python_c_and_subprocess_output(master, workers, procs):
    with cw.Client() as c:
        f, quiet = c.submit(chatty, 7), c.submit(silent, 1)
        assert f.result(30) == 7 and quiet.result(30) == 1
        # python print, os.write on fd 1, and a subprocess, in the order written
        assert f.stdout() == "python says 7\nfd 1 says 7\nsubprocess says 7\n"
        assert f.stderr() == "subprocess err 7\nwarning 7\n"
        assert quiet.stdout() == "" and quiet.stderr() == ""
        # the next job of the same executor does not see the earlier output
        again = c.submit(silent, 2)
        again.result(30)
        assert again.stdout() == ""
        pending = c.submit(time.sleep, 5)
        assert pending.stdout() is None  # not finished yet
        c.cancel(pending)
    # still in the worker's log, each line after the job's id
    logs = "".join(procs.log(n) for n, _ in procs.procs if n.startswith("worker"))
    assert "] python says 7" in logs and "] subprocess err 7" in logs
    assert f"[job {_job_id(master, 'python says 7')}] python says 7" in logs


def _job_id(cluster, text):
    db = sqlite3.connect(cluster.store_path)
    return db.execute("SELECT job FROM results WHERE stdout LIKE ?", (f"%{text}%",)).fetchone()[0]


def test_a_failed_job_keeps_its_stderr_and_its_exception_shows_the_tail(master, workers):
    with cw.Client() as c:
        f = c.submit(fails_loudly, 3)
        exc = f.exception(30)
        assert isinstance(exc, ValueError)
        assert f.stderr().splitlines() == [f"err line {i}" for i in range(30)]
        shown = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        assert "err line 29" in shown and "err line 10" in shown  # the last 20 lines
        assert "err line 9\n" not in shown
        crashed = c.submit(crash_after_writing)
        with pytest.raises(cw.JobCrashedError):
            crashed.result(30)
        assert crashed.stderr() == "about to abort\n"  # read by the agent after the crash


def test_output_keeps_the_tail_per_client_and_per_submit(master, workers):
    with cw.Client(output_limit=100) as c:
        f = c.submit(big, 1000)  # 10,000 bytes
        f.result(30)
        out = f.stdout()
        assert out.startswith("[cw: 9900 earlier bytes cut; the last 100 bytes follow]\n")
        assert out.endswith("000000999\n") and len(out.split("\n", 1)[1]) == 100
        g = c.submit(big, 1000, output_limit=20000)
        g.result(30)
        assert g.stdout() == "".join(f"{i:09d}\n" for i in range(1000))


def test_client_thread_reads_output_by_job_id(master, workers):
    done = []
    t = cw.client.ClientThread(lambda j, r: done.append(j))
    t.start()
    try:
        jid = t.submit(chatty, 5)
        assert t.wait(30)
        assert "subprocess says 5" in t.stdout(jid) and "warning 5" in t.stderr(jid)
    finally:
        t.stop()


def test_client_thread_reads_the_output_of_a_stored_answer(master, workers):
    """A re-run's job answered from the store: stdout(id) is the answering job's output."""
    for attempt in range(2):
        t = cw.client.ClientThread(lambda j, r: None, run="ct-told")
        t.start()
        try:
            jid = t.submit(says_slowly, 7)
            assert t.wait(30)
            assert t.stdout(jid) == "said 7\n" and t.stderr(jid) == "", attempt
        finally:
            t.stop()


def test_cw_logs_prints_each_jobs_output_by_run_key_failed_and_follows(master, workers):
    with cw.Client(run="logs-run") as c:
        c.gather([c.submit(chatty, 1, key="first"), c.submit(silent, 2, key="second")], timeout=30)
        c.submit(fails_loudly, 9, key="third").exception(30)
    out = subprocess.run([sys.executable, "-c", "from cw.cli import main; main()", "logs", "logs-run"],
                         capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert "key first (done" in out and "python says 1" in out and "subprocess err 1" in out
    assert "key second (done" in out and "(no output)" in out
    assert "key third (error" in out and "broken 9" in out and "err line 29" in out
    one = _logs("logs", "logs-run", "first")
    assert "python says 1" in one and "third" not in one
    failed = _logs("logs", "logs-run", "--failed")
    assert "err line 0" in failed and "python says" not in failed
    # --follow prints jobs as they finish
    p = subprocess.Popen([sys.executable, "-c", "from cw.cli import main; main()", "logs", "logs-run", "-f"],
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        with cw.Client(run="logs-run") as c:
            c.submit(chatty, 42, key="late").result(30)
        seen = ""
        deadline = time.monotonic() + 20
        while "python says 42" not in seen and time.monotonic() < deadline:
            seen += p.stdout.readline()
        assert "python says 42" in seen
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(10)


def _logs(*args):
    r = subprocess.run([sys.executable, "-c", "from cw.cli import main; main()", *args],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


# -- the schema: a store made by the previous schema is migrated forward ---------------


def _v1_store(path):
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1 + "PRAGMA user_version = 1;")
    db.execute("INSERT INTO sessions VALUES ('s', 'old', '{}', 1.0)")
    for i in (1, 2):
        db.execute("INSERT INTO jobs (id, session, seq, run, key, fn, args, max_retries, submitted)"
                   " VALUES (?, 's', ?, 'old', ?, 'h', x'00', 3, 10.0)", (i, i, f"k{i}"))  # fmt: skip
    db.execute("INSERT INTO results VALUES (1, 1, x'', 'ValueError: x', 'tb', 'w1', 0.5, 12.0)")
    db.commit()
    db.close()


def test_a_store_of_the_previous_schema_is_read_and_migrated(tmp_path):
    path = tmp_path / "cw.sqlite"
    _v1_store(path)
    with StoreReader(path) as r:  # read as it is: no output, no attempts
        assert r.version == 1
        assert [x["job"] for x in r.results("old")] == [1]
        assert r.outputs("old") == []
        assert r.job(1)["attempts"][0]["status"] == "error"
    s = Store(path)  # the master opens it: migrated forward, nothing lost
    assert [q.id for q in s.pending()] == [2]
    s.add_results([(2, 0, b"", None, None, "w2", 0.1, 20.0, None, 19.0, "hello\n", None)])
    s.commit()
    assert len(s.retry_failed("old")) == 1
    s.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with StoreReader(path) as r:
        assert [o["stdout"] for o in r.outputs("old")] == ["hello\n"]
        job = r.job(1)
        assert [a["status"] for a in job["attempts"]] == ["error"]  # retried: kept as an attempt
        assert job["attempts"][0]["worker"] == "w1" and job["result"] is None
        two = r.job(2)["result"]
        assert two["queued"] == 10.0 and two["started"] == 19.0 and two["ended"] == 20.0


def test_a_newer_store_is_refused_clearly(tmp_path):
    path = tmp_path / "cw.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(cw.errors.StoreError, match="newer than this cw"):
        Store(path)


# -- timings: every attempt, with its worker ---------------------------------------------
def nap(s):
    time.sleep(s)
    return os.getpid()


def test_timings_of_every_attempt_and_in_cw_results(master, procs):
    victim = start_workers(procs, 1)[0]
    with cw.Client(run="timed") as c:
        f = c.submit(nap, 30, key="slow")
        wait_for(lambda: f.running(), timeout=20, what="the job to start")
        time.sleep(0.5)
        victim.send_signal(signal.SIGKILL)  # its job is charged an attempt and requeued
        start_workers(procs, 1)
        db = sqlite3.connect(master.store_path)
        jid = db.execute("SELECT id FROM jobs WHERE key = 'slow'").fetchone()[0]
        wait_for(lambda: db.execute("SELECT count(*) FROM attempts WHERE job = ?", (jid,)).fetchone()[0],
                 timeout=30, what="the lost attempt")  # fmt: skip
        c.cancel(f)
        g = c.submit(nap, 0.3, key="short")
        g.result(30)
    with StoreReader(master.store_path) as r:
        job = r.job(jid)
        assert job["attempts"][0]["status"] == "lost" and job["attempts"][0]["started"] is not None
        assert job["attempts"][0]["ended"] - job["attempts"][0]["started"] >= 0.5
        short = next(x for x in r.results("timed") if x["status"] == "done")
        assert 0.3 <= short["runtime"] < 5 and short["waited"] is not None and short["started"]
    out = _logs("results", "timed")
    assert "waited" in out and "runtime" in out


def prints_some(x):
    if x % 50 == 0:
        print(f"python {x}")
    return x


def writes_around_python(x):
    if x == 150:
        os.write(1, b"fd write 150\n")
    return x


def test_output_in_batches_of_short_jobs_is_neither_lost_nor_misplaced(master, procs):
    start_workers(procs, 1)
    with cw.Client(run="batched") as c:
        prints = c.map(prints_some, range(300))
        c.gather(prints, timeout=60)
        around = c.map(writes_around_python, range(300))
        c.gather(around, timeout=60)
        # print() is seen per job, however the jobs were batched
        assert [f.stdout() for f in prints[:101:50]] == ["python 0\n", "python 50\n", "python 100\n"]
        assert prints[1].stdout() == ""
    with StoreReader(master.store_path) as r:
        got = [(o["job"], o["stdout"]) for o in r.outputs("batched") if "fd write 150" in o["stdout"]]
    # written around Python by a function that never wrote before: kept once, by job 150 itself
    # or by the last job of its batch, which then says which jobs may have written it
    assert len(got) == 1, got
    text = got[0][1]
    assert text == "fd write 150\n" or (text.startswith("[cw: written by this job or by jobs ")
                                         and text.endswith("\nfd write 150\n")), text


def capture_files():
    """The distinct capture files this executor holds open."""
    seen = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "cw-output-" in os.readlink(f"/proc/self/fd/{fd}"):
                seen.add(os.stat(f"/proc/self/fd/{fd}").st_ino)
        except OSError:
            pass
    return len(seen)


def test_an_executor_holds_only_its_own_two_capture_files(master, procs):
    start_workers(procs, 1, "--procs", "3")
    with cw.Client() as c:
        c.submit(crash_after_writing).exception(30)  # one executor replaced
        assert set(c.gather([c.submit(capture_files) for _ in range(12)], timeout=30)) == {2}


def says_slowly(x, seconds=0.0):
    time.sleep(seconds)
    print(f"said {x}")
    return x


@pytest.mark.timeout(60)
def test_a_stored_or_attached_answer_has_its_jobs_output(master, workers):
    """A submission answered by an earlier job (its stored result, or attached to it while
    it runs) has that job's output: the output of the job that answered it."""
    with cw.Client(run="told") as first:
        assert first.submit(says_slowly, 1).result(30) == 1
        running = first.submit(says_slowly, 2, 2.0)
        with cw.Client(run="told") as again:
            stored, attached = again.submit(says_slowly, 1), again.submit(says_slowly, 2, 2.0)
            assert stored.result(30) == 1 and attached.result(30) == 2
            assert stored.stdout() == "said 1\n" and stored.stderr() == ""
            assert attached.stdout() == "said 2\n"
        assert running.result(30) == 2 and running.stdout() == "said 2\n"
        assert stored_output_has(master, "told", "said 1") and stored_output_has(master, "told", "said 2")


def stored_output_has(cluster, run, text):
    with StoreReader(cluster.store_path) as r:
        return any(text in row["stdout"] for row in r.outputs(run))


def exits_after_saying(x):
    print(f"call {x}", flush=True)
    if x == 2:
        os._exit(3)
    return x


class Unloadable:
    def __reduce__(self):
        return (int, ("x",))


def unloadable():
    return Unloadable()


@pytest.mark.timeout(60)
def test_a_future_knows_its_jobs_number_in_the_store(master, workers):
    """One number: future.jobid is the id error messages and cw logs use, whatever the
    session (a second client numbers its submissions from 0 again)."""
    with cw.Client(run="ids") as c:
        c.submit(exits_after_saying, 0).result(30)
    with cw.Client(run="ids") as c2:
        ok, crash = c2.submit(exits_after_saying, 1), c2.submit(exits_after_saying, 2)
        assert ok.result(30) == 1
        with pytest.raises(cw.JobCrashedError) as e:
            crash.result(30)
        assert crash.jobid is not None and str(e.value).startswith(f"job {crash.jobid} ")
        bad = c2.submit(unloadable)
        assert f"result of job {bad.exception(30) and bad.jobid}:" in str(bad.exception())
    with StoreReader(master.store_path) as r:
        out = {row["job"]: row["stdout"] for row in r.outputs("ids")}
    assert out[ok.jobid] == "call 1\n" and out[crash.jobid] == "call 2\n"
    logs = subprocess.run([sys.executable, "-m", "cw", "logs", "ids", str(ok.jobid)], capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert "call 1" in logs.stdout and "call 0" not in logs.stdout, logs.stdout + logs.stderr
