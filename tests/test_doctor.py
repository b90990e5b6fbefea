"""`cw doctor`: each check made to fail for real, and the advice read back.

A real master runs on a cluster directory; the test then breaks one thing at
a time (the key's mode, the address in master.json, the master itself, the
version of cw on the master's side, the key this side holds) and reads what
`cw doctor` says. `--from-node` runs on the real SLURM and Grid Engine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
from clusters import require, run
from conftest import wait_for

from cw.discovery import ClusterDir

ROOT = Path(__file__).resolve().parent.parent


def doctor(cluster: ClusterDir, *args: str, env: dict | None = None) -> tuple[int, list[str]]:
    p = run([sys.executable, "-m", "cw", "doctor", "--cluster-dir", str(cluster.path), *args], timeout=120,
            env={**os.environ, **(env or {})})  # fmt: skip
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout.splitlines()


def line(lines: list[str], level: str, check: str) -> str:
    found = [x for x in lines if x.startswith(level) and f" {check}: " in x]
    assert found, f"no {level} {check} line in:\n" + "\n".join(lines)
    return found[0]


def start_master(procs, cluster: ClusterDir, name: str = "master", env: dict | None = None):
    # from the cluster's parent: `python -m` puts the working directory first on the path
    p = procs.start(name, "-m", "cw.master", "--cluster-dir", str(cluster.path), "--port", "0", env=env,
                    cwd=str(cluster.path.parent))  # fmt: skip
    wait_for(lambda: cluster.master_address() or p.poll() is not None, what="master.json")
    assert p.poll() is None, procs.log(name)
    return p


def test_a_healthy_cluster_and_each_check_broken_once(tmp_path, procs, cw_home):
    cluster = ClusterDir(path=tmp_path / "c")
    master = start_master(procs, cluster)
    rc, lines = doctor(cluster)
    assert rc == 0, lines
    for check in ("key", "master.json", "address", "interfaces", "round trip", "versions"):
        line(lines, "ok", check)
    assert "mode 0600" in line(lines, "ok", "key") and "0 workers" in line(lines, "ok", "round trip")
    assert any(x.split()[0] in ("ok", "warn") and " cluster directory: " in x for x in lines)  # local disk: a warning
    rc, out = doctor(cluster, "--json")
    assert rc == 0 and {f["check"] for f in json.loads("\n".join(out))} >= {"key", "address", "versions"}

    # the key readable by others
    cluster.key_path.chmod(0o644)
    rc, lines = doctor(cluster)
    assert rc == 1 and "has mode 0644" in line(lines, "FAIL", "key")
    assert f"chmod 600 {cluster.key_path}" in line(lines, "FAIL", "key")
    cluster.key_path.chmod(0o600)

    # this side holds another key
    rc, lines = doctor(cluster, env={"CW_KEY": "ab" * 32})
    assert rc == 1 and "the master rejected our key" in line(lines, "FAIL", "round trip")
    assert "unset CW_KEY" in line(lines, "FAIL", "round trip")

    # a wrong address in master.json: its host does not resolve, but an interface of the master's host answers
    good = cluster.master_json.read_text()
    info = json.loads(good)
    info["address"] = f"tcp://no-such-host.invalid:{info['port']}"
    cluster.master_json.write_text(json.dumps(info))
    rc, lines = doctor(cluster)
    text = line(lines, "FAIL", "address")
    assert rc == 1 and "'no-such-host.invalid' does not resolve here" in text
    assert "reachable on" in text and "restart the master with --interface" in text, text
    ifaces = line(lines, "ok", "interfaces")
    assert all(f"{name} {ip}" in ifaces for name, ip in info["interfaces"].items())
    # ... or a port nobody listens on
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    info["address"], info["port"] = f"tcp://127.0.0.1:{free}", free
    cluster.master_json.write_text(json.dumps(info))
    rc, lines = doctor(cluster)
    assert rc == 1 and "connection refused" in line(lines, "FAIL", "address")
    assert "nothing listens there" in line(lines, "FAIL", "address")
    cluster.master_json.write_text(good)
    assert doctor(cluster)[0] == 0

    # the master is down (killed: master.json stays behind)
    master.kill()
    master.wait()
    rc, lines = doctor(cluster)
    assert rc == 1 and f"names pid {master.pid} on {socket.gethostname()}, which is not running" in line(
        lines, "FAIL", "master.json")
    assert "start a master on this directory again" in line(lines, "FAIL", "master.json")


def test_a_master_of_another_cw_version(tmp_path, procs, cw_home):
    # a real master from another copy of cw, whose version differs
    other = tmp_path / "other"
    shutil.copytree(ROOT / "cw", other / "cw", ignore=shutil.ignore_patterns("__pycache__"))
    (other / "cw" / "version.py").write_text('"""cw\'s version."""\n\n__version__ = "0.0.1+old"\n')
    cluster = ClusterDir(path=tmp_path / "c")
    start_master(procs, cluster, env={"PYTHONPATH": str(other)})
    assert cluster.read_master()["version"] == "0.0.1+old"
    rc, lines = doctor(cluster)
    text = line(lines, "FAIL", "versions")
    assert rc == 1 and "cw 0.0.1+old on the master" in text and "cw's version must match" in text
    assert "install the same versions on both sides" in text
    line(lines, "ok", "round trip")  # the wire itself still works


def test_no_cluster_directory_and_no_master(tmp_path, cw_home):
    rc, lines = doctor(ClusterDir(path=tmp_path / "nowhere"))
    assert rc == 1 and "does not exist here" in line(lines, "FAIL", "cluster directory")
    cluster = ClusterDir(path=tmp_path / "empty")
    cluster.make()
    rc, lines = doctor(cluster)
    assert "no key at" in line(lines, "FAIL", "key")
    assert "no master has published itself here" in line(lines, "FAIL", "master.json")


@pytest.mark.parametrize("system", [pytest.param("slurm", marks=pytest.mark.slurm),
                                    pytest.param("sge", marks=pytest.mark.sge)])  # fmt: skip
@pytest.mark.timeout(120)
def test_from_a_node(system, tmp_path, procs, cw_home):
    require(system)
    cluster = ClusterDir(path=tmp_path / "c")
    start_master(procs, cluster)
    rc, lines = doctor(cluster, "--from-node", "--backend", system)
    assert rc == 0, lines
    title = {"slurm": "SLURM", "sge": "SGE"}[system]
    node = [x for x in lines if x.startswith(f"ok    [node {socket.gethostname()} ({title} job ")]
    assert any("cluster directory: " in x and "is shared: this node sees what the login host wrote" in x
               for x in node), lines  # fmt: skip
    for check in ("key", "master.json", "address", "round trip", "versions"):
        assert any(f" {check}: " in x for x in node), (check, lines)
    assert not list((cluster.path / "doctor").glob("*"))  # it cleans up after itself
