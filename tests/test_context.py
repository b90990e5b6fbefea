"""Jobs run where the client stands: cwd, import path, environment; and fail clearly when they cannot."""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import zmq
from conftest import start_workers, wait_for
from wire import RawPeer

import cw
from cw import protocol as P

MYLIB = """
import os, sys

def simulate(x):
    # imported by reference: the module is in the worker's sys.modules
    return x * 2, "{name}" in sys.modules, os.getcwd()

def read(path):
    with open(path) as f:
        return f.read()

def whoami():
    return "{tag}", open("data.txt").read(), os.getpid()

class Point:
    def __init__(self, x):
        self.x = x

def norm(p):
    return abs(p.x)
"""


def make_module(where, name, tag="a"):
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{name}.py").write_text(textwrap.dedent(MYLIB.format(name=name, tag=tag)))
    (where / "data.txt").write_text(f"data of {tag}")


@pytest.fixture
def elsewhere_workers(master, procs, tmp_path):
    """Workers started in another directory, with another sys.path."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    ps = []
    for i in range(2):
        ps.append(procs.start(f"w{i}", "-m", "cw.worker", "--heartbeat", "0.2", cwd=str(other)))
    return ps


@pytest.fixture
def in_project(tmp_path, monkeypatch):
    """The test stands in a project directory holding a module that is not installed."""
    proj = tmp_path / "proj"
    make_module(proj, "mylib_ctx")
    monkeypatch.chdir(proj)
    monkeypatch.syspath_prepend(str(proj))
    yield proj
    sys.modules.pop("mylib_ctx", None)


def test_module_from_the_client_directory_runs_on_workers_elsewhere(elsewhere_workers, in_project):
    mylib = importlib.import_module("mylib_ctx")
    with cw.Client() as c:
        value, imported, cwd = c.submit(mylib.simulate, 21).result(30)
        assert value == 42
        assert imported, "the function was not imported by reference on the worker"
        assert cwd == str(in_project)
        # a relative path opens the client's file
        assert c.submit(mylib.read, "data.txt").result(30) == "data of a"


def test_named_environment_variables_arrive(elsewhere_workers, monkeypatch):
    monkeypatch.setenv("PROJECT_ALPHA", "1")
    monkeypatch.setenv("PROJECT_BETA", "2")
    monkeypatch.setenv("NOT_NAMED", "secret")
    with cw.Client(env={"OMP_NUM_THREADS": "1"}, env_from=["PROJECT_*"]) as c:
        got = c.submit(lambda: {k: os.environ.get(k) for k in
                                ("OMP_NUM_THREADS", "PROJECT_ALPHA", "PROJECT_BETA", "NOT_NAMED")}).result(30)  # fmt: skip
    assert got == {"OMP_NUM_THREADS": "1", "PROJECT_ALPHA": "1", "PROJECT_BETA": "2", "NOT_NAMED": None}


CLIENT = """
import sys, cw
sys.path.insert(0, ".")
import mylib_two
with cw.Client() as c:
    out = c.gather([c.submit(mylib_two.whoami) for _ in range(30)], timeout=60)
tags = {t for t, _, _ in out}
data = {d for _, d, _ in out}
print(sorted(tags), sorted(data), len({p for _, _, p in out}))
"""


def test_two_clients_with_different_directories_each_see_their_own(master, procs, tmp_path):
    start_workers(procs, 1)  # one worker, one executor: both clients share it
    outs = []
    ps = []
    for tag in ("a", "b"):
        d = tmp_path / tag
        make_module(d, "mylib_two", tag=tag)
        (d / "client.py").write_text(CLIENT)
        ps.append(subprocess.Popen([sys.executable, "client.py"], cwd=d, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True))  # fmt: skip
    for p in ps:
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        outs.append(out.strip())
    assert outs[0].startswith("['a'] ['data of a']")
    assert outs[1].startswith("['b'] ['data of b']")


def test_module_not_on_the_workers_path_is_sent_by_value(elsewhere_workers, tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    make_module(gone, "mylib_gone")
    monkeypatch.syspath_prepend(str(gone))
    try:
        mod = importlib.import_module("mylib_gone")
        shutil.rmtree(gone)  # now no worker can import it: as on a host without this filesystem
        with cw.Client() as c:
            value, imported, _ = c.submit(mod.simulate, 4).result(30)
            assert value == 8 and not imported  # the by-value copy ran
            # a class of that module in the arguments cannot be imported either...
            with pytest.raises(cw.RemoteImportError) as ei:
                c.submit(mod.norm, mod.Point(-3)).result(30)
            msg = str(ei.value)
            assert "mylib_gone" in msg and "sys.path" in msg and os.uname().nodename in msg
        # ...unless the module is shipped by value, as asked
        with cw.Client(ship_modules=[mod]) as c:
            assert c.submit(mod.norm, mod.Point(-3)).result(30) == 3
    finally:
        import cloudpickle

        cloudpickle.unregister_pickle_by_value(sys.modules["mylib_gone"])
        sys.modules.pop("mylib_gone", None)


def test_version_mismatch_is_reported_before_a_job_is_lost(master, procs, caplog):
    key = master.key()
    ctx = zmq.Context()
    peer = RawPeer(ctx, master.master_address(), key, gate_key=key)  # a worker from another Python
    fake = peer.sock
    peer.open()
    peer.send(P.HELLO, {"role": "worker", "id": "old:1", "host": "oldhost", "pid": 1,
                        "procs": 4, "versions": {"python": "3.6.15", "cloudpickle": "1.6.0"}})  # fmt: skip
    try:
        with caplog.at_level(logging.WARNING, logger="cw"):
            with cw.Client() as c:
                wait_for(lambda: len(c.status()["workers"]) == 1, what="the old worker")
                f = c.submit(abs, -5)
                wait_for(lambda: any("cannot run this client's jobs" in r.getMessage() for r in caplog.records),
                         what="the warning")  # fmt: skip
                # the old worker never got the job
                got, until = [], time.monotonic() + 1.0
                while time.monotonic() < until:
                    if fake.poll(100):
                        got.append(P.kind_of(fake.recv_multipart()))
                assert got and P.TASKS not in got
                start_workers(procs, 1)
                assert f.result(30) == 5
        msg = next(r.getMessage() for r in caplog.records if "cannot run" in r.getMessage())
        v = sys.version_info
        assert "Python 3.6.15" in msg and f"Python {v.major}.{v.minor}.{v.micro}" in msg
    finally:
        fake.close()
        ctx.term()


def test_unimportable_function_names_function_host_and_path(elsewhere_workers, tmp_path, monkeypatch):
    """No by-value copy can be made (the function uses a lock), and the module is gone."""
    d = tmp_path / "locked"
    d.mkdir()
    (d / "mylib_locked.py").write_text("import threading\nLOCK = threading.Lock()\n"
                                       "def guarded(x):\n    with LOCK:\n        return x\n")
    monkeypatch.syspath_prepend(str(d))
    try:
        mod = importlib.import_module("mylib_locked")
        shutil.rmtree(d)
        with cw.Client() as c:
            with pytest.raises(cw.RemoteImportError) as ei:
                c.submit(mod.guarded, 1).result(30)
        msg = str(ei.value)
        assert "the function mylib_locked.guarded" in msg
        assert "No module named 'mylib_locked'" in msg
        assert os.uname().nodename in msg and "sys.path" in msg
    finally:
        sys.modules.pop("mylib_locked", None)
