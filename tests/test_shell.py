"""Shell-command jobs: results like subprocess.run's, errors with the stderr tail, and a
command's process group that dies with it on timeout and cancel. Real workers, real kills."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from conftest import start_workers, wait_for

import cw
from cw import defaults


def in_group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                out.append(int(name))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


# the command leads its group; a grandchild in a session of its own writes its pid too
HANG = ("echo $$ > {d}/group; sleep 300 & sleep 300 & "
        "setsid sh -c 'echo $$ > {d}/escaped; exec sleep 300' & wait")  # fmt: skip


def read_int(path) -> int:
    return wait_for(lambda: path.exists() and path.read_text().strip() and int(path.read_text()),
                    timeout=30, what=str(path))  # fmt: skip


@pytest.mark.timeout(90)
def test_results_like_subprocess_run(workers, tmp_path):
    with cw.Client() as c:
        r = c.submit_shell("echo out; echo err >&2").result(30)
        assert isinstance(r, cw.CompletedCommand) and isinstance(r, subprocess.CompletedProcess)
        assert (r.args, r.returncode, r.stdout, r.stderr) == ("echo out; echo err >&2", 0, "out\n", "err\n")
        assert r.host and r.runtime >= 0
        # an argv list is run as it is: no shell splits its arguments
        r = c.submit_shell([sys.executable, "-c", "import sys; print(sys.argv[1:])", "a b", "$HOME"]).result(30)
        assert r.stdout == "['a b', '$HOME']\n" and r.args[-2:] == ["a b", "$HOME"]
        # cwd, env on top of the job's own (None removes), stdin
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "here.txt").write_text("x")
        r = c.submit_shell("echo *; echo $CW_T1 ${PATH:+path} ${HOME:-nohome}; read x; echo $x", cwd=tmp_path / "d",
                           env={"CW_T1": "one", "HOME": None}, input="from stdin").result(30)  # fmt: skip
        assert r.stdout.split() == ["here.txt", "one", "path", "nohome", "from", "stdin"]
        # check=False: the exit code is a value
        r = c.submit_shell("exit 7", check=False).result(30)
        assert r.returncode == 7
        with pytest.raises(cw.CommandError) as e:
            c.submit_shell("for i in $(seq 1 50); do echo line$i >&2; done; exit 3").result(30)
        err = e.value
        assert isinstance(err, subprocess.CalledProcessError) and err.returncode == 3 and err.host
        text = str(err)
        assert "exited with code 3" in text and "line50" in text and "line30" not in text  # the tail
        assert err.stderr.count("\n") == 50  # the whole (bounded) stderr is kept
        with pytest.raises(cw.CommandError, match="killed by SIGKILL"):
            c.submit_shell("kill -9 $$").result(30)
        with pytest.raises(FileNotFoundError):
            c.submit_shell(["/no/such/program"]).result(30)


@pytest.mark.timeout(90)
def test_output_is_bounded_to_its_tail(workers):
    n = defaults.OUTPUT_LIMIT * 3
    with cw.Client() as c:
        r = c.submit_shell(f"head -c {n} /dev/zero | tr '\\0' a; printf END").result(60)
    head, _, tail = r.stdout.partition("\n")
    assert head == f"[cw: {n + 3 - defaults.OUTPUT_LIMIT} earlier bytes cut; the last {defaults.OUTPUT_LIMIT} bytes follow]"
    assert len(tail) == defaults.OUTPUT_LIMIT and tail.endswith("aaaEND")


@pytest.mark.timeout(90)
def test_the_jobs_own_output_says_how_much_of_the_commands_was_cut(workers):
    """The job's output (future.stdout(), cw logs) is the command's tail: its note counts
    the bytes the command printed and nobody kept, as the result's does."""
    with cw.Client(run="cut") as c:
        big = c.submit_shell("yes | head -c 5000000", key="big")
        small = c.submit_shell("seq 1 1000", output_limit=100, key="small")
        for f, limit in ((big, defaults.OUTPUT_LIMIT), (small, 100)):
            r = f.result(60)
            printed = 5000000 if f is big else len("".join(f"{i}\n" for i in range(1, 1001)))
            note = f"[cw: {printed - limit} earlier bytes cut; the last {limit} bytes follow]"
            assert r.stdout.splitlines()[0] == note
            assert f.stdout() == r.stdout  # the same text, the same note
    logs = subprocess.run([sys.executable, "-m", "cw", "logs", "cut", "small"], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert "[cw: 3793 earlier bytes cut; the last 100 bytes follow]" in logs.stdout, logs.stdout + logs.stderr


@pytest.mark.timeout(90)
def test_the_commands_output_is_the_jobs_own_too(workers):
    with cw.Client() as c:
        f = c.submit_shell("echo to-out; echo to-err >&2; head -c 5000 /dev/zero | tr '\\0' b", output_limit=1000)
        r = f.result(30)
        assert r.stderr == "to-err\n" and len(r.stdout.split("\n", 1)[1]) == 1000  # bounded by output_limit
        assert f.stdout().endswith("b" * 100) and f.stderr() == "to-err\n"  # future.stdout(), cw logs
        g = c.submit_shell("echo failing >&2; exit 1")
        with pytest.raises(cw.CommandError):
            g.result(30)
        assert g.stderr() == "failing\n"


@pytest.mark.timeout(90)
def test_leftover_processes_end_with_the_command(workers):
    with cw.Client() as c:
        r = c.submit_shell("sleep 300 & echo $!").result(30)  # returns at once, though the pipes stay open
        pid = int(r.stdout)
        wait_for(lambda: not alive(pid), what="the command's background process to end")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_a_killed_command_leaves_no_process_of_its_group(master, procs, tmp_path, how):
    start_workers(procs, 1)
    with cw.Client() as c:
        f = c.submit_shell(HANG.format(d=tmp_path), timeout=2 if how == "timeout" else None)
        pgid, escaped = read_int(tmp_path / "group"), read_int(tmp_path / "escaped")
        assert len(in_group(pgid)) >= 3 and alive(escaped)
        if how == "timeout":
            with pytest.raises(cw.TimeoutError):
                f.result(30)
        else:
            assert f.cancel()
        wait_for(lambda: not in_group(pgid) and not alive(escaped), timeout=10,
                 what="every process of the command to end")  # fmt: skip
        assert c.submit_shell("echo again").result(30).stdout == "again\n"  # the worker goes on


@pytest.mark.timeout(90)
def test_executor_and_client_thread_run_commands(workers):
    with cw.Executor() as ex:
        f = ex.submit_shell(["echo", "from", "executor"], timeout=30)
        assert f.result(30).stdout == "from executor\n"
    got, done = [], threading.Event()
    t = cw.ClientThread(lambda jid, r: (got.append(r), done.set()))
    t.start()
    try:
        t.submit_shell("exit 4")
        assert t.wait(30)
    finally:
        t.stop()
    assert isinstance(got[0], cw.CommandError) and got[0].returncode == 4


def test_bad_commands_are_refused_at_submit():
    with cw.Client(serial=True) as c:
        with pytest.raises(TypeError, match="string or a list"):
            c.submit_shell(42)
        with pytest.raises(ValueError, match="empty"):
            c.submit_shell("  ")
        with pytest.raises(TypeError, match="env"):
            c.submit_shell("true", env={"N": 1})
        with pytest.raises(TypeError, match="input"):
            c.submit_shell("cat", input=3)
        assert c.submit_shell("echo serial").result().stdout == "serial\n"  # serial runs them too
