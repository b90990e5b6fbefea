"""The cluster directory is its owner's alone: made private whatever the umask, and a
directory, key or master.json that someone else could have planted is refused."""

from __future__ import annotations

import logging
import os
import pwd

import pytest

import cw
from cw.discovery import ClusterDir
from cw.errors import ConfigError

NOBODY = pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def loose_umask():
    old = os.umask(0o002)
    yield
    os.umask(old)


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_made_private_whatever_the_umask(tmp_path, loose_umask, monkeypatch):
    monkeypatch.delenv("CW_KEY", raising=False)
    c = ClusterDir(path=tmp_path / "home" / "c")
    c.key(create=True)
    c.publish({"address": "tcp://h:1", "host": "h", "pid": 1})
    assert mode(tmp_path / "home") == 0o700 and mode(c.path) == 0o700
    assert mode(c.key_path) == 0o600
    assert mode(c.master_json) == 0o644  # readable, changed by nobody else
    assert mode(c.subdir("logs")) == 0o700


def test_an_existing_readable_directory_is_made_private(tmp_path, caplog):
    d = tmp_path / "c"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    with caplog.at_level(logging.WARNING, logger="cw.discovery"):
        ClusterDir(path=d).make()
    assert mode(d) == 0o700 and "made" in caplog.text and "private" in caplog.text


@pytest.mark.parametrize("bits, fix", [(0o770, "chmod g-w"), (0o707, "chmod o-w")])
def test_a_directory_others_can_write_is_refused(tmp_path, bits, fix, monkeypatch):
    monkeypatch.delenv("CW_KEY", raising=False)
    c = ClusterDir(path=tmp_path / "c")
    c.key(create=True)
    os.chmod(c.path, bits)
    with pytest.raises(ConfigError, match=fix) as e:
        c.key()
    assert str(c.path) in str(e.value)


def test_a_planted_cluster_directory_is_refused_by_clients_and_workers(tmp_path, monkeypatch, procs):
    """A group member renamed the victim's folder and made one of their own, with their
    key and master.json: the victim's client and worker refuse it, naming the path."""
    home = tmp_path / "home"
    monkeypatch.setenv("CW_HOME", str(home))
    monkeypatch.delenv("CW_KEY", raising=False)
    monkeypatch.delenv("CW_ADDRESS", raising=False)
    planted = ClusterDir(path=home / "default")
    planted.key(create=True)
    planted.publish({"address": "tcp://127.0.0.1:9", "host": "elsewhere", "pid": 1})
    for p in (planted.path, planted.key_path, planted.master_json):
        os.chown(p, NOBODY, -1)
    with pytest.raises(ConfigError, match="belongs to uid") as e:
        cw.Client(connect_timeout=2)
    assert str(planted.path) in str(e.value)
    w = procs.start("worker", "-m", "cw.worker")
    assert w.wait(30) != 0 and "belongs to uid" in procs.log("worker")


def test_a_planted_key_or_master_json_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("CW_KEY", raising=False)
    c = ClusterDir(path=tmp_path / "c")
    c.key(create=True)
    c.publish({"address": "tcp://h:1", "host": "h", "pid": 1})
    os.chown(c.master_json, NOBODY, -1)
    with pytest.raises(ConfigError, match="master.json belongs to uid"):
        c.read_master()
    os.chown(c.master_json, os.getuid(), -1)
    os.chmod(c.key_path, 0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        c.key()


def test_sticky_home_is_fine_and_shared_clusters_can_opt_out(tmp_path, monkeypatch):
    monkeypatch.delenv("CW_KEY", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(home, 0o1777)  # as /tmp: others cannot rename what is ours
    c = ClusterDir(path=home / "c")
    c.key(create=True)
    assert c.read_master() is None
    os.chmod(c.path, 0o770)
    os.chown(c.key_path, NOBODY, -1)
    with pytest.raises(ConfigError):
        c.key()
    monkeypatch.setenv("CW_SHARED_CLUSTER", "1")
    assert len(c.key()) == 32  # a group's cluster, on purpose
    os.chmod(c.path, 0o777)
    with pytest.raises(ConfigError, match="writable by everyone"):
        c.key()
