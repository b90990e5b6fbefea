"""Bad input gets a clear, typed error at submit and loses nothing: malformed job options
are refused by the client (InvalidJobError) before anything is sent, and by the master
for a message that skipped the client's check, without stopping it; a malformed job
already in a store fails alone when a master takes it in."""

from __future__ import annotations

import pytest
from conftest import start_workers, wait_for

import cw
from cw.discovery import ClusterDir
from cw.errors import InvalidJobError
from cw.serialize import dumps_args, dumps_function
from cw.store import NewJob, Store
from cw.store.reader import StoreReader


def one():
    return 1


@pytest.mark.parametrize("options", [
    {"requires": "gpus"}, {"requires": ["gpus"]}, {"requires": {"tags": 5}}, {"requires": {"cpus": "x"}},
    {"requires": {"partition": ["a"]}}, {"timeout": 0}, {"timeout": -1}, {"timeout": float("nan")},
    {"timeout": "10"}, {"max_retries": -1}, {"max_retries": 1.5}, {"output_limit": -5},
])  # fmt: skip
def test_malformed_options_are_refused_at_submit(workers, options):
    with cw.Client() as c:
        with pytest.raises(InvalidJobError) as e:
            c.submit(one, **options)
        assert isinstance(e.value, (ValueError, TypeError)) and next(iter(options)) in str(e.value)
        assert c.submit(one).result(30) == 1  # nothing else is lost


@pytest.mark.timeout(60)
def test_keys_and_runs_of_another_type_are_refused_at_submit(master, workers, procs):
    """key= and run= name jobs in the store: a list, a dict, bytes or an object is refused
    at once (nothing sent); a whole number is its text; the master refuses what skipped it."""
    for bad in (["a"], ("a", 1), {"a": 1}, b"x", object(), True):
        with pytest.raises(InvalidJobError, match="key="):
            cw.Client(serial=True).submit(one, key=bad)
        for run in (["a"], {"a": 1}, b"x", ""):
            with pytest.raises(InvalidJobError, match="run="):
                cw.Client(serial=True, run=run)
    with cw.Client(run="typed") as c:
        with pytest.raises(InvalidJobError, match="key="):
            c.submit(one, key=["a", "b"])
        assert c.submit(one, key=2**70).result(30) == 1 and c.submit(one, key=5).result(30) == 1
        fn_hash, fn_blob = dumps_function(one)
        bad = c._conn.submit(fn_hash, fn_blob, dumps_args((), {}), ["a"], {})  # as another client might
        with pytest.raises(cw.JobError, match="refused by the master"):
            bad.result(30)
        assert c.submit(one).result(30) == 1
    assert procs.procs[0][1].poll() is None, procs.log("master")
    with cw.Client(run="typed") as again:  # a re-run finds the job of key 5 as "5"
        assert again.submit(one, key="5").result(30) == 1


def test_a_named_cluster_without_a_master_starts_nothing_else(cw_home, tmp_path):
    """Client(cluster=...) or a closed cluster object: NoMasterError, not the embedded cluster."""
    with pytest.raises(cw.errors.NoMasterError, match="no master is running"):
        cw.Client(cluster="nobody-here")
    lc = cw.LocalCluster(n_workers=1, cluster=str(tmp_path / "gone"))
    lc.close()
    with pytest.raises(cw.errors.NoMasterError):
        cw.Client(lc)
    assert not (cw_home / "local").exists()  # the embedded cluster never started
    for bad in (-1, "x", 1.5, True):
        with pytest.raises(cw.errors.ConfigError, match="n_workers"):
            cw.LocalCluster(n_workers=bad)
    with cw.LocalCluster(n_workers=0, cluster="named") as lc:  # a name, as for the other clusters
        assert lc.cluster.path == cw_home / "named"


def test_client_defaults_are_checked_when_made(cw_home):
    for options in ({"timeout": 0}, {"max_retries": -2}, {"output_limit": "lots"}):
        with pytest.raises(InvalidJobError, match=next(iter(options))):
            cw.Client(serial=True, **options)


def test_the_master_refuses_what_skipped_the_clients_check(master, workers, procs):
    """A SUBMIT whose options no policy could read (another client, another version) fails
    its own job; the master serves on, and the jobs beside it run."""
    with cw.Client() as c:
        fn_hash, fn_blob = dumps_function(one)
        bad = [c._conn.submit(fn_hash, fn_blob, dumps_args((), {}), None, opts)
               for opts in ({"r": "gpus"}, {"r": {"tags": 5}}, {"t": 0}, {"t": "x"}, {"m": -1})]  # fmt: skip
        good = c.submit(one)
        for f in bad:
            with pytest.raises(cw.JobError, match="refused by the master"):
                f.result(30)
        assert good.result(30) == 1
        assert procs.procs[0][1].poll() is None, procs.log("master")
        assert c.submit(one, requires={"cpus": 1}).result(30) == 1


def test_a_malformed_stored_job_fails_alone(cw_home, procs):
    """A store holding a job that a master without these checks took in: the next master
    fails that job alone when it takes it in, and serves on."""
    cluster = ClusterDir()
    cluster.make()
    store = Store(cluster.store_path)
    fn_hash, fn_blob = dumps_function(one)
    store.add_session("s1", None, {})
    store.add_functions([(fn_hash, fn_blob)])
    bad, good = store.add_jobs([NewJob("s1", 0, None, None, fn_hash, dumps_args((), {}), "gpus", None, 0, None),
                                NewJob("s1", 1, None, None, fn_hash, dumps_args((), {}), None, None, 0, None)])
    store.commit()
    store.close()
    m = procs.start("master", "-m", "cw.master", "--port", "0", "--heartbeat", "0.2")
    wait_for(lambda: cluster.master_address() or m.poll() is not None, what="master.json")
    start_workers(procs, 1)

    def finished():
        with StoreReader(cluster.store_path) as r:
            return {row["job"]: row for row in r.results(None)}

    wait_for(lambda: len(finished()) == 2 or m.poll() is not None, timeout=30, what="both stored jobs")
    assert m.poll() is None, procs.log("master")
    rows = finished()
    assert rows[bad]["status"] == "failed" and "requires must be a dict" in rows[bad]["error"]
    assert rows[good]["status"] == "done"
