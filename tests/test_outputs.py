"""Scratch and archived outputs: a job's scratch is gone after success, failure, a kill
and a kill -9 of its worker; outputs land under the run and key, recorded in the store,
and `cw pull` fetches them. Real workers, real files."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import start_workers, wait_for
from test_migrations import SCHEMA_1

import cw
from cw import job
from cw.discovery import ClusterDir
from cw.store import Store
from cw.store.schema import MIGRATIONS, SCHEMA_VERSION


def cw_cmd(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "cw", *args], capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def use_scratch(mode, note=None):
    """Writes a file into its scratch; then returns, raises or hangs (after writing the path to note)."""
    d = cw.scratch()
    (d / "big.bin").write_bytes(os.urandom(1024))
    assert cw.scratch() == d and sorted(p.name for p in d.iterdir()) == ["big.bin"]
    if note:
        with open(note, "w") as f:
            f.write(str(d))
    if mode == "raise":
        raise ValueError(str(d))
    if mode == "hang":
        time.sleep(300)
    return str(d)


def make_outputs(n):
    out = cw.outputs()
    (out / f"table-{n}.csv").write_text(f"n,{n}\n")
    (out / "logs").mkdir()
    (out / "logs" / "run.log").write_text("log " * n)
    return n


@pytest.mark.timeout(90)
def test_scratch_is_gone_after_success_failure_and_timeout(master, procs, tmp_path):
    start_workers(procs, 1, "--scratch-dir", str(tmp_path / "scr"))
    with cw.Client() as c:
        path = c.submit(use_scratch, "return").result(30)
        assert path.startswith(str(tmp_path / "scr")) and not os.path.exists(path)
        with pytest.raises(ValueError) as e:
            c.submit(use_scratch, "raise").result(30)
        assert not os.path.exists(str(e.value))
        note = tmp_path / "note"
        f = c.submit(use_scratch, "hang", str(note), timeout=1)
        with pytest.raises(cw.TimeoutError):
            f.result(30)
        assert note.exists()
        wait_for(lambda: not os.path.exists(note.read_text()), what="the killed job's scratch to go")
        r = c.submit_shell("pwd; echo $CW_SCRATCH; touch here", scratch=True).result(30)
        cwd, var = r.stdout.split()
        assert cwd == var and cwd.startswith(str(tmp_path / "scr")) and not os.path.exists(cwd)


@pytest.mark.timeout(90)
def test_scratch_a_killed_worker_left_is_wiped_by_the_next(master, procs, tmp_path):
    scr = str(tmp_path / "scr")
    (first,) = start_workers(procs, 1, "--scratch-dir", scr)
    note = tmp_path / "note"
    with cw.Client() as c:
        c.submit(use_scratch, "hang", str(note))
        path = wait_for(lambda: note.exists() and note.read_text(), what="the job's scratch")
        assert os.path.exists(path)
        first.kill()  # kill -9: nothing wipes it now
        first.wait()
        time.sleep(0.5)
        assert os.path.exists(path)
        start_workers(procs, 1, "--scratch-dir", scr)  # the next worker on this node
        wait_for(lambda: not os.path.exists(path), timeout=30, what="the dead worker's scratch to go")
        # the new worker's own directory stays, beside its lock
        left = sorted(os.listdir(os.path.join(scr, f"cw-{os.getuid()}")))
        assert len(left) == 2 and left[1] == left[0] + ".lock", left


@pytest.mark.timeout(120)
def test_outputs_arrive_under_the_run_and_cw_pull_fetches_them(master, procs, tmp_path):
    start_workers(procs, 2, "--scratch-dir", str(tmp_path / "scr"))
    with cw.Client(run="sweep") as c:
        assert c.gather([c.submit(make_outputs, n, key=f"case-{n}") for n in (1, 2)], timeout=60) == [1, 2]
        r = c.submit_shell("echo 1 > a.csv; echo 2 > b.dat; mkdir -p sub; echo 3 > sub/c.csv;"
                           " echo extra > $CW_OUTPUTS/extra.txt; exit 3",
                           scratch=True, outputs=["*.csv", "sub/*.csv"], key="shell 1", check=False).result(30)  # fmt: skip
        assert r.returncode == 3  # a failed command's outputs are archived too
    archive = master.path / "outputs" / "sweep"
    assert sorted(p.name for p in archive.iterdir()) == sorted(["case-1", "case-2", job.slug("shell 1", "")])
    listed = json.loads(cw_cmd("results", "sweep", "--outputs", "--format", "json").stdout)
    case2 = next(master.path / r["dir"] for r in listed if r["key"] == "case-2")
    assert case2.parent == archive / "case-2" and case2.name == str(next(r["job"] for r in listed if r["key"] == "case-2"))
    assert (case2 / "table-2.csv").read_text() == "n,2\n"
    assert (case2 / "logs" / "run.log").read_text() == "log log "
    by_key = {}
    for row in listed:
        by_key.setdefault(row["key"], []).append(row["name"])
    assert by_key == {"case-1": ["logs/run.log", "table-1.csv"], "case-2": ["logs/run.log", "table-2.csv"],
                      "shell 1": ["a.csv", "extra.txt", "sub/c.csv"]}  # fmt: skip
    assert all(r["sha256"] == job.sha256(master.path / r["dir"] / r["name"]) for r in listed)
    results = json.loads(cw_cmd("results", "sweep", "--format", "json").stdout)
    assert sorted(r["outputs"] for r in results) == [2, 2, 3]
    # --match: only what matches
    dest = tmp_path / "pulled"
    out = cw_cmd("pull", "sweep", str(dest), "--match", r"\.csv$").stdout
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["case-1/table-1.csv", "case-2/table-2.csv", f"{job.slug('shell 1', '')}/a.csv",
                   f"{job.slug('shell 1', '')}/sub/c.csv"], out  # fmt: skip
    # --job: one job's, and a second pull finds them there already
    dest2 = tmp_path / "one"
    cw_cmd("pull", "sweep", str(dest2), "--job", "case-1")
    assert sorted(str(p.relative_to(dest2)) for p in dest2.rglob("*") if p.is_file()) == [
        "case-1/logs/run.log", "case-1/table-1.csv"]
    assert "already there" in cw_cmd("pull", "sweep", str(dest2), "--job", "case-1").stdout
    # a file damaged in the archive is refused
    case1 = next(master.path / r["dir"] for r in listed if r["key"] == "case-1")
    (case1 / "table-1.csv").write_text("tampered\n")
    p = cw_cmd("pull", "sweep", str(tmp_path / "three"), "--job", "case-1", check=False)
    assert p.returncode == 1 and "differs" in p.stderr
    # the damaged copy is not left in DEST, under its name or another
    assert sorted(str(p.relative_to(tmp_path / "three")) for p in (tmp_path / "three").rglob("*")
                  if p.is_file()) == ["case-1/logs/run.log"]  # fmt: skip
    # a pull that copies nothing leaves no empty folders behind
    p = cw_cmd("pull", "sweep", str(tmp_path / "four"), "--job", "case-1", "--match", "table", check=False)
    assert p.returncode == 1 and not (tmp_path / "four").exists()
    # and a good copy pulled before is kept (it is what the job archived)
    assert "2 already there" in cw_cmd("pull", "sweep", str(dest2), "--job", "case-1").stdout
    assert (dest2 / "case-1" / "table-1.csv").read_text() == "n,1\n"
    assert sorted(os.listdir(dest2 / "case-1")) == ["logs", "table-1.csv"]
    assert "no archived outputs" in cw_cmd("pull", "nosuchrun", str(tmp_path / "x"), check=False).stderr


@pytest.mark.timeout(90)
def test_a_job_whose_outputs_cannot_be_archived_fails_saying_so(master, procs, tmp_path):
    start_workers(procs, 1, "--scratch-dir", str(tmp_path / "scr"))
    (master.path / "outputs").mkdir()
    (master.path / "outputs" / "blocked").write_text("a file where the run's directory would go")
    with cw.Client(run="blocked") as c:
        with pytest.raises(cw.OutputsError, match=r"cannot archive the job's outputs to .*outputs/blocked/k/\d+"):
            c.submit(make_outputs, 1, key="k").result(30)
        path = c.submit(use_scratch, "return").result(30)  # jobs that archive nothing are unaffected
        assert path and not os.path.exists(path)
    with cw.Client(run="open") as c:  # other runs archive as before
        assert c.submit(make_outputs, 3, key="k").result(30) == 3
    assert [p.name for p in (master.path / "outputs" / "open" / "k").glob("*/table-3.csv")] == ["table-3.csv"]


def test_serial_jobs_have_scratch_and_outputs(cw_home):
    with cw.Client(serial=True, run="ser") as c:
        path = c.submit(use_scratch, "return").result()
        assert not os.path.exists(path)
        c.submit(make_outputs, 4, key="s4").result()
    found = list((ClusterDir().path / "outputs" / "ser" / "s4").glob("*/table-4.csv"))
    assert [p.read_text() for p in found] == ["n,4\n"]
    with pytest.raises(cw.OutputsError, match="while it runs"):
        cw.scratch()


def test_a_store_of_the_previous_schema_is_migrated(tmp_path):
    path = tmp_path / "cw.sqlite"
    db = sqlite3.connect(path)
    old = SCHEMA_1 + MIGRATIONS[1] + MIGRATIONS[2]  # schema 3: before archived outputs
    db.executescript(f"{old} PRAGMA user_version = 3;")
    db.execute("INSERT INTO jobs (id, session, seq, fn, args) VALUES (1, 's', 0, 'f', x'00')")
    db.commit()
    db.close()
    store = Store(path)
    store.add_outputs([(1, "outputs/_/job-1", "a.txt", 3, "0" * 64)])
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("SELECT job, name FROM outputs").fetchall() == [(1, "a.txt")]


def test_a_result_sent_again_after_a_broken_link_carries_what_its_job_archived():
    """A master killed right after a RESULT may not have stored it: the worker sends it again
    with its `o` row, so the archived files are recorded with the result either way."""
    from cw import protocol as P
    from cw.worker.sent import SentResults

    sent = SentResults()
    rows = [(1, P.OK, 0.1, None, None), (2, P.RAISED, 0.1, "boom", "tb"), (3, P.OK, 0.1, None, None)]
    files = [[1, "outputs/r/k1", [["a.txt", 3, "0" * 64]]], [2, "outputs/r/k2", [["b.txt", 4, "1" * 64]]]]
    sent.add(time.monotonic(), rows, [b"x", b"", b"y"], files)
    assert sent.since(time.monotonic(), 1.0) == [1, 3]  # successes only: a failure may be retried
    (again, blobs, archived), = list(sent.batches())
    assert [r[0] for r in again] == [1, 3] and blobs == [b"x", b"y"]
    assert archived == [files[0]]


def write_result(text):
    (cw.outputs() / "result.csv").write_text(text)
    return text


def write_other_result(text):
    (cw.outputs() / "result.csv").write_text(f"other {text}")
    return text


@pytest.mark.timeout(120)
def test_two_jobs_of_one_key_keep_their_own_archives(master, procs, tmp_path):
    """The same key on two functions names two jobs: each archives into a directory of
    its own, and `cw pull` gives each its own (KEY/JOBID) where the key is shared."""
    start_workers(procs, 1, "--scratch-dir", str(tmp_path / "scr"))
    with cw.Client(run="twice") as c:
        a = c.submit(write_result, "first", key="case-7")
        b = c.submit(write_other_result, "second", key="case-7")
        assert c.gather([a, b], timeout=60) == ["first", "second"]
        c.submit(write_result, "alone", key="case-8").result(30)
    listed = json.loads(cw_cmd("results", "twice", "--outputs", "--format", "json").stdout)
    dirs = {r["job"]: r["dir"] for r in listed}
    assert len(set(dirs.values())) == 3
    texts = sorted((master.path / r["dir"] / r["name"]).read_text() for r in listed)
    assert texts == ["alone", "first", "other second"]
    dest = tmp_path / "pulled"
    out = cw_cmd("pull", "twice", str(dest))
    got = {str(p.relative_to(dest)): p.read_text() for p in dest.rglob("*") if p.is_file()}
    ids = sorted(r["job"] for r in listed if r["key"] == "case-7")
    assert got == {f"case-7/{ids[0]}/result.csv": "first", f"case-7/{ids[1]}/result.csv": "other second",
                   "case-8/result.csv": "alone"}, out.stdout  # fmt: skip


@pytest.mark.timeout(90)
def test_output_globs_that_leave_the_job_directory_are_refused_at_submit(master, procs, tmp_path):
    start_workers(procs, 1, "--scratch-dir", str(tmp_path / "scr"))
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "x.txt").write_text("outside\n")
    with cw.Client(run="dd") as c:
        for pattern in ("../../x.txt", "sub/../../x.txt", str(tmp_path / "x.txt"), "~/x.txt"):
            with pytest.raises(cw.errors.OutputsPatternError, match="outputs pattern") as e:
                c.submit_shell("touch ran", cwd=str(tmp_path / "a" / "b"), outputs=[pattern], key="k")
            assert isinstance(e.value, ValueError)
        # a '..' inside a name is a name, not a climb
        r = c.submit_shell("echo 1 > a..b.csv", scratch=True, outputs=["a..b.csv"], key="ok").result(30)
        assert r.returncode == 0
    assert not (tmp_path / "a" / "b" / "ran").exists()  # nothing ran
    assert sorted(os.listdir(master.path / "outputs" / "dd")) == ["ok"]
    assert sorted(p.name for p in master.path.iterdir() if p.name == "x.txt") == []


def test_archiving_and_pull_refuse_names_outside_their_directory(cw_home, tmp_path):
    """What reached the archive by another way than a checked glob cannot leave it either."""
    src = tmp_path / "x.txt"
    src.write_text("data\n")
    dest = tmp_path / "arch" / "outputs" / "r" / "k" / "1"
    with pytest.raises(cw.OutputsError, match="outside the job's archive"):
        job.archive([(src, "../../../x.txt")], dest)
    assert not (tmp_path / "arch" / "outputs" / "x.txt").exists() and not dest.exists()
    assert job.archive([(src, "sub/x.txt")], dest) == [("sub/x.txt", 5, job.sha256(src))]
    # a store row naming a file outside DEST: cw pull copies it nowhere, and says so
    cdir = ClusterDir()
    (cdir.path / "outputs" / "r" / "k" / "1").mkdir(parents=True)
    (cdir.path / "outputs" / "r" / "k" / "1" / "ok.txt").write_text("data\n")
    Store(cdir.store_path).close()
    db = sqlite3.connect(cdir.store_path)
    db.execute("INSERT INTO jobs (id, session, seq, run, key, fn, args) VALUES (1, 's', 0, 'r', 'k', 'f', x'00')")
    db.commit()
    db.close()
    store = Store(cdir.store_path)
    store.add_outputs([(1, "outputs/r/k/1", "../../../x.txt", 5, job.sha256(src)),
                       (1, "outputs/r/k/1", "ok.txt", 5, job.sha256(src))])  # fmt: skip
    store.close()
    pulled = tmp_path / "p" / "q" / "dest"
    p = cw_cmd("pull", "r", str(pulled), "--cluster-dir", str(cdir.path), check=False)
    assert p.returncode == 1 and "leads outside" in p.stderr, p.stdout + p.stderr
    assert [str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*") if f.is_file() and "x.txt" in f.name] == [
        "x.txt", "arch/outputs/r/k/1/sub/x.txt"]
    assert (pulled / "k" / "ok.txt").read_text() == "data\n"
