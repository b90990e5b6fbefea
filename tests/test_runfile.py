"""Job files and job sets (`cw run-file`): a file half-run, killed and run again runs only
the rest; the joblog; a set's setup runs once per worker, and its failure stops the set
once; inputs in, outputs archived. Real workers, real commands."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import start_workers, wait_for

import cw
from cw.errors import ConfigError
from cw.jobfile import TEMPLATE, parse_lines, parse_set


def cw_cmd(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "cw", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)  # fmt: skip


@pytest.mark.timeout(180)
def test_a_job_file_killed_half_way_runs_only_the_rest(master, procs, tmp_path):
    start_workers(procs, 2)
    ran, gate = tmp_path / "ran", tmp_path / "gate"
    # lines 1-6 finish at once; the others wait for the gate
    lines = ["# a sweep", ""] + [
        f"test {n} -le 6 || while [ ! -e {gate} ]; do sleep 0.1; done; echo {n} >> {ran}" for n in range(1, 13)]
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("\n".join(lines) + "\n")
    first = subprocess.Popen([sys.executable, "-m", "cw", "run-file", str(jobs), "--run", "sweep"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_for(lambda: ran.exists() and len(ran.read_text().split()) == 6, timeout=60, what="six lines")
    finally:
        first.send_signal(signal.SIGKILL)  # killed half-way: its jobs run on at the master
        first.wait()
    dry = cw_cmd("run-file", str(jobs), "--run", "sweep", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "12 jobs, 6 to run (6 done already)" in dry.stdout
    assert dry.stdout.count("     done  line ") == 6 and "line 3: test 1 -le 6" in dry.stdout
    gate.touch()
    again = cw_cmd("run-file", str(jobs), "--run", "sweep")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "12 of 12 succeeded" in again.stderr
    assert sorted(map(int, ran.read_text().split())) == list(range(1, 13))  # each line ran once
    log = json.loads(cw_cmd("results", "sweep", "--format", "json").stdout)
    assert sorted(r["key"] for r in log) == sorted(f"{i + 3}: {line}" for i, line in enumerate(lines[2:]))
    assert {r["exit"] for r in log} == {0} and all(r["host"] and r["runtime"] is not None for r in log)
    table = cw_cmd("results", "sweep").stdout
    assert table.split("\n")[0].split() == ["job", "key", "status", "exit", "host", "runtime", "outputs", "error"]


@pytest.mark.timeout(120)
def test_failed_lines_fail_the_run_and_show_in_the_joblog(master, workers, tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("true\necho oops >&2; exit 3\n")
    p = cw_cmd("run-file", str(jobs), "--run", "bad", "-q")
    assert p.returncode == 1
    assert "line 2: FAILED (exit code 3)" in p.stderr and "1 of 2 succeeded, 1 failed" in p.stderr
    assert "its stderr ends:\n  oops\n" in p.stderr  # the tail the message announces follows it
    log = {r["key"]: r for r in json.loads(cw_cmd("results", "bad", "--format", "json").stdout)}
    assert log["2: echo oops >&2; exit 3"]["exit"] == 3 and log["1: true"]["exit"] == 0
    assert "oops" in log["2: echo oops >&2; exit 3"]["error"]


SET = """
run: {run}
requires: {{tags: [lab]}}
setup: |
  echo "$CW_SETUP_DIR" >> {d}/setups
  echo ready > marker
  {fail}
jobs:
"""


@pytest.mark.timeout(180)
def test_a_job_set_sets_up_once_per_worker_and_archives_outputs(master, procs, tmp_path):
    start_workers(procs, 2, "--tag", "lab")
    (tmp_path / "cases").mkdir()
    text = SET.format(run="lab", d=tmp_path, fail="")
    for n in range(6):
        (tmp_path / "cases" / f"in-{n}.txt").write_text(f"input {n}\n")
        text += (f"  - name: case-{n}\n    command: test -f $CW_SETUP_DIR/marker && cat in-{n}.txt > out.csv"
                 f" && echo $CW_JOBSET_DIR > where.log\n"
                 f"    inputs: [cases/in-{n}.txt]\n    outputs: ['*.csv', '*.log']\n")  # fmt: skip
    (tmp_path / "post.py").write_text(textwrap.dedent("""
        import os
        def summarize(name, upper=False):
            with open("summary.txt", "w") as f:
                f.write(name.upper() if upper else name)
            return os.getcwd()
    """))
    text += "  - name: summary\n    function: post:summarize\n    args: [lab]\n    kwargs: {upper: true}\n"
    text += "    outputs: [summary.txt]\n"
    (tmp_path / "set.yaml").write_text(text)
    p = cw_cmd("run-file", "set.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    setups = (tmp_path / "setups").read_text().split()
    assert 1 <= len(setups) <= 2 and len(set(setups)) == len(setups)  # once per worker
    files = {(r["key"], r["name"]) for r in json.loads(cw_cmd("results", "lab", "--outputs", "--format", "json").stdout)}
    assert files == {(f"case-{n}", x) for n in range(6) for x in ("out.csv", "where.log")} | {("summary", "summary.txt")}
    (case4,) = (master.path / "outputs" / "lab" / "case-4").iterdir()  # outputs/RUN/KEY/JOBID
    assert (case4 / "out.csv").read_text() == "input 4\n"
    assert (case4 / "where.log").read_text().strip() == str(tmp_path)
    assert [p.read_text() for p in (master.path / "outputs" / "lab" / "summary").glob("*/summary.txt")] == ["LAB"]
    again = cw_cmd("run-file", "set.yaml", "--dry-run", cwd=tmp_path)
    assert "7 jobs, 0 to run (7 done already)" in again.stdout


@pytest.mark.timeout(180)
def test_a_failed_setup_fails_the_set_once(master, procs, tmp_path):
    start_workers(procs, 2, "--tag", "lab")
    text = SET.format(run="broken", d=tmp_path, fail="echo the mesh is missing >&2; exit 5")
    text += "".join(f"  - name: j{n}\n    command: echo {n}\n" for n in range(20))
    (tmp_path / "set.yaml").write_text(text)
    p = cw_cmd("run-file", str(tmp_path / "set.yaml"))
    assert p.returncode == 1
    assert p.stderr.count("the setup of run 'broken' failed") == 1, p.stderr
    assert "exit code 5" in p.stderr and "the mesh is missing" in p.stderr
    # the summary counts what the store holds (cancels race with results on their way)
    stored = collections.Counter(r["status"] for r in json.loads(cw_cmd("results", "broken", "--format", "json").stdout))
    said = re.search(r"its setup failed \((\d+) jobs failed, (\d+) cancelled\)", p.stderr)
    assert said and (int(said[1]), int(said[2])) == (stored["error"], stored["cancelled"]), (p.stderr, stored)
    assert sum(stored.values()) == 20
    assert len((tmp_path / "setups").read_text().split()) <= 2  # once per worker, never per job


@pytest.mark.timeout(120)
def test_a_sets_function_is_imported_from_beside_the_set(master, procs, tmp_path):
    """A set's `function: mymod:f` with mymod.py beside the set runs on a pool started
    elsewhere, run from anywhere; a module found nowhere fails with RemoteImportError
    naming the host and the path tried."""
    start_workers(procs, 1)
    sets, elsewhere = tmp_path / "sets", tmp_path / "elsewhere"
    sets.mkdir()
    elsewhere.mkdir()
    (sets / "mymod_beside.py").write_text("def summarize(x):\n    return f'summary of {x}'\n")
    (sets / "set.yaml").write_text("run: fn\njobs:\n  - {name: s, function: 'mymod_beside:summarize', args: [fn]}\n"
                                   "  - {name: t, function: 'nowhere_mod:f'}\n")  # fmt: skip
    p = cw_cmd("run-file", str(sets / "set.yaml"), cwd=elsewhere)
    assert p.returncode == 1 and "1 of 2 succeeded" in p.stderr, p.stdout + p.stderr
    assert "s: ok" in p.stdout
    assert "t: FAILED (RemoteImportError) cannot import nowhere_mod:f on " in p.stderr
    assert "No module named 'nowhere_mod'" in p.stderr and "sys.path: [" in p.stderr
    log = {r["key"]: r for r in json.loads(cw_cmd("results", "fn", "--format", "json").stdout)}
    assert log["s"]["status"] == "done" and "summary of fn" in log["s"]["value"]


def test_job_files_and_sets_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="no command"):
        parse_lines("# only a comment\n\n", Path("x.txt"))
    specs = parse_lines("a\n  # c\n\n  b --x  \n", Path("x.txt")).jobs
    assert [(s.key, s.line, s.command) for s in specs] == [("1: a", 1, "a"), ("4: b --x", 4, "b --x")]
    bad = {
        "jobs: [{command: x}]": "has no `name`",
        "jobs: [{name: a, command: x}, {name: a, command: y}]": "taken by an earlier job",
        "jobs: [{name: a}]": "needs a `command` or a `function`",
        "jobs: [{name: a, command: x, function: m:f}]": "needs a `command` or a `function`",
        "jobs: [{name: a, function: 'not a path'}]": "import path",
        "jobs: [{name: a, command: x, inputs: [nope.txt]}]": "not found",
        "jobs: [{name: a, command: x, colour: red}]": "unknown field",
        "jobs: []": "must be a list of jobs",
        "run: r\nsetpu: x\njobs: [{name: a, command: x}]": "unknown field",
        "- just a list": "is a mapping",
        "jobs: [{name: a, command: x}": "not valid YAML",
        "requires: {gpus: lots}\njobs: [{name: a, command: x}]": "gpus='lots' must be a whole number",
        "requires: {mem: much}\njobs: [{name: a, command: x}]": "mem='much' is not an amount of memory",
        "retries: -1\njobs: [{name: a, command: x}]": "`retries` must be a whole number, 0 or more",
        "retries: true\njobs: [{name: a, command: x}]": "`retries` must be a whole number, 0 or more",
        "timeout: -5\njobs: [{name: a, command: x}]": "`timeout` is a duration",
        "timeout: [1]\njobs: [{name: a, command: x}]": "`timeout` is a duration",
        "jobs: [{name: a, command: x, outputs: ['../x.csv']}]": "job 'a': outputs pattern '../x.csv' climbs",
    }
    for text, why in bad.items():
        with pytest.raises(ConfigError, match=why):
            parse_set(text, tmp_path / "s.yaml")


def test_inputs_of_one_base_name_are_refused_naming_both(tmp_path):
    """Inputs are copied in by their base name: two of one name would leave one of them."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "params.txt").write_text(f"from {d}\n")
    (tmp_path / "s.yaml").write_text("run: inp\njobs:\n  - name: two\n    command: cat params.txt\n"
                                     "    inputs: [a/params.txt, b/params.txt]\n")  # fmt: skip
    p = cw_cmd("run-file", "s.yaml", "--dry-run", cwd=tmp_path)
    assert p.returncode == 1 and "job 'two': inputs a/params.txt and b/params.txt would both be copied" \
        " to params.txt" in p.stderr, p.stdout + p.stderr
    # the same file named twice, or two base names, are fine
    for inputs in ("[a/params.txt, a/params.txt]", "[a/params.txt, b]"):
        s = parse_set(f"jobs: [{{name: x, command: c, inputs: {inputs}}}]", tmp_path / "s.yaml")
        assert len(s.jobs[0].inputs) == 2


@pytest.mark.timeout(60)
def test_bad_counts_and_durations_are_refused_before_anything_runs(cw_home, tmp_path):
    """A bad --requires, a set's bad requires/retries/timeout: one line naming the option or
    the file, under --dry-run and on a real run alike; no job is submitted, no traceback."""
    (tmp_path / "jobs.txt").write_text("touch ran\n")
    (tmp_path / "set.yaml").write_text("run: r\nrequires: {gpus: lots}\njobs:\n  - {name: a, command: touch ran}\n")
    (tmp_path / "t.yaml").write_text("run: r\ntimeout: '0'\njobs:\n  - {name: a, command: touch ran}\n")
    cases = [(["jobs.txt", "--run", "r", "--requires", "gpus=lots"], "Invalid value for --requires: requires: gpus="),
             (["jobs.txt", "--run", "r", "--requires", "mem=lots"], "Invalid value for --requires: requires: mem="),
             (["jobs.txt", "--run", "r", "--timeout", "0"], "Invalid value for --timeout"),
             (["set.yaml"], "set.yaml: requires: gpus='lots' must be a whole number"),
             (["t.yaml"], "t.yaml: `timeout` '0' is not longer than 0")]  # fmt: skip
    for args, why in cases:
        for dry in (["--dry-run"], []):
            p = cw_cmd("run-file", *args, *dry, cwd=tmp_path, timeout=60)
            assert p.returncode in (1, 2) and why in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
    assert not (tmp_path / "ran").exists() and not cw_home.exists()  # nothing ran, no cluster was started
    with cw.Client(serial=True) as c:
        with pytest.raises(cw.errors.InvalidJobError, match="gpus='lots'") as e:
            c.submit_shell("true", requires={"gpus": "lots"})
        assert isinstance(e.value, ValueError) and isinstance(e.value, cw.CwError)


def test_the_template_is_a_valid_job_set(tmp_path):
    out = cw_cmd("template")
    assert out.returncode == 0 and out.stdout == TEMPLATE
    for n in (1, 2):
        os.makedirs(tmp_path / "cases" / str(n))
        (tmp_path / "cases" / str(n) / "params.txt").write_text("x")
    s = parse_set(out.stdout, tmp_path / "t.yaml")
    assert s.run == "foam-sweep" and s.setup and s.requires["tags"] == ["openfoam"] and s.retries == 2
    assert [j.key for j in s.jobs] == ["case-1", "case-2", "summary"]
    assert s.jobs[2].function == "mypackage.post:summarize" and s.jobs[1].command[0] == "simpleFoam"
    # an argv list runs with no shell: the template's shows no variable a shell would expand
    assert not any("$" in a for j in s.jobs if isinstance(j.command, list) for a in j.command)


@pytest.mark.timeout(120)
def test_with_no_master_the_embedded_cluster_runs_it_and_the_reading_commands_find_it(cw_home, tmp_path):
    """No master anywhere: `cw run-file` starts the embedded local cluster, and `cw results`,
    `cw logs`, `cw status` and a dry run, given no cluster, read that cluster's store."""
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("echo first\necho second >&2\n")
    run = cw_cmd("run-file", str(jobs), "--run", "lonely")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 of 2 succeeded" in run.stderr
    log = json.loads(cw_cmd("results", "lonely", "--format", "json").stdout)
    assert sorted(r["key"] for r in log) == ["1: echo first", "2: echo second >&2"]
    logs = cw_cmd("logs", "lonely")
    assert logs.returncode == 0 and "first" in logs.stdout and "second" in logs.stdout, logs.stdout + logs.stderr
    dry = cw_cmd("run-file", str(jobs), "--run", "lonely", "--dry-run")
    assert "2 jobs, 0 to run (2 done already)" in dry.stdout, dry.stdout + dry.stderr
    status = cw_cmd("status")
    assert status.returncode == 0 and "lonely" in status.stdout, status.stdout + status.stderr
    assert cw_cmd("status", "--cluster", "default").returncode != 0  # a named cluster is read as named
