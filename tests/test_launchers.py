"""The launchers' registry and job environments, without any batch system.

- the registry finds the backends of cw/launchers (SLURM, Grid Engine);
- a batch system is one file: a backend module dropped into the package
  gets its `cw <name> up | status | down` and is recognised inside its jobs;
- each backend's JobEnvironment reads its own variables, and only its own.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import click
import pytest
from click.testing import CliRunner

import cw.launchers
from cw.cli.launch import add_backends, format_status
from cw.errors import ConfigError
from cw.launchers import backends, environment, environment_of
from cw.launchers.base import BadOption, JobEnvironment, NoBatch, Option, Scheduler
from cw.launchers.sge import SGE, SGEEnvironment
from cw.launchers.slurm import Slurm, SlurmEnvironment

# What SLURM and Grid Engine set in a job (the variables these tests need, as the
# real clusters of scripts/slurm-up.sh and sge-up.sh set them), plus a login shell's.
LOGIN = {"PATH": "/usr/bin:/bin", "HOME": "/home/u", "SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}
SLURM_ARRAY_TASK = {**LOGIN, "SLURM_JOB_ID": "125", "SLURM_JOBID": "125", "SLURM_ARRAY_JOB_ID": "123",
                    "SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "8", "SLURM_MEM_PER_NODE": "4096",
                    "SLURM_JOB_PARTITION": "debug", "SLURM_CONF": "/etc/slurm/slurm.conf"}  # fmt: skip
SLURM_JOB = {**LOGIN, "SLURM_JOB_ID": "73", "SLURM_JOB_PARTITION": "debug", "SLURM_CPUS_ON_NODE": "1"}
SGE_ARRAY_TASK = {**LOGIN, "JOB_ID": "77", "SGE_TASK_ID": "3", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "4",
                  "NSLOTS": "4", "QUEUE": "all.q", "SGE_O_WORKDIR": "/home/u"}  # fmt: skip
SGE_JOB = {**LOGIN, "JOB_ID": "32", "SGE_TASK_ID": "undefined", "NSLOTS": "1", "QUEUE": "all.q"}


# ------------------------------------------------------------------- the registry
def test_the_registry_finds_slurm_and_sge():
    found = backends()
    assert found["slurm"] is Slurm and found["sge"] is SGE
    assert list(found) == sorted(found)  # asked in the order of their module names
    assert Slurm.environment is SlurmEnvironment and SGE.environment is SGEEnvironment
    for name, cls in found.items():
        assert cls.name == name == cls.environment.system
    assert not set(found) & cw.launchers.FRAMEWORK


def test_importing_the_registry_and_reading_the_environment_stays_light():
    """The worker imports cw.launchers at start: no click, no pool, no master."""
    code = textwrap.dedent("""
        import json, sys
        import cw
        before = set(sys.modules)
        import cw.launchers, cw.launchers.base
        cw.launchers.backends(); cw.launchers.environment().label()
        print(json.dumps(sorted(set(sys.modules) - before)))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    added = json.loads(p.stdout)
    heavy = [m for m in added if m.split(".")[0] in ("click", "zmq", "submitit")
             or m.startswith(("cw.launchers.pool", "cw.master", "cw.client", "cw.cli", "cw.worker"))]  # fmt: skip
    assert heavy == [], heavy
    assert "cw.launchers.slurm" in added and "cw.launchers.sge" in added


PBSFAKE = '''
"""A made-up PBS: what a new batch system's module defines, and nothing else."""

from __future__ import annotations

from .base import JobEnvironment, Option, Scheduler, positive_int


class PBSFakeEnvironment(JobEnvironment):
    system = "pbsfake"
    title = "PBS (fake)"
    reported = ("PBS_JOBID", "PBS_ARRAY_INDEX")

    @classmethod
    def activated(cls, env):
        return bool(env.get("PBS_JOBID"))

    def task(self):
        return self.env.get("PBS_JOBID", "").split(".")[0]

    def cpus(self):
        return positive_int(self.env.get("NCPUS"))


class PBSFake(Scheduler):
    name = "pbsfake"
    title = "PBS (fake)"
    environment = PBSFakeEnvironment
    options = (
        Option("queue", "Queue of the jobs.", short="-q", master=True),
        Option("walltime", "Walltime of each worker, e.g. 4:00:00.", key="time"),
        Option("ncpus", "CPUs per worker.", type=int, default=1, min=1, show_default=True),
    )

    def submit_master(self, script, spec):
        raise NotImplementedError

    def submit_workers(self, script, count, spec):
        raise NotImplementedError

    def tasks(self, jobs):
        return None

    def cancel(self, jobs):
        pass


BACKEND = PBSFake
'''


@pytest.fixture
def extra_backends(tmp_path, monkeypatch):
    """A directory added to the cw.launchers package: modules written there are its modules."""
    monkeypatch.setattr(cw.launchers, "__path__", [*cw.launchers.__path__, str(tmp_path)])
    cw.launchers.clear_cache()
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("cw.launchers.") and m.split(".")[-1] in ("pbsfake", "broken")]:
        del sys.modules[name]
    cw.launchers.clear_cache()


def _cw() -> click.Group:
    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    def cli() -> None:
        pass

    add_backends(cli)
    return cli


def test_a_batch_system_is_one_file(extra_backends):
    (extra_backends / "pbsfake.py").write_text(PBSFAKE)
    assert list(backends()) == ["pbsfake", "sge", "slurm"]
    cli, runner = _cw(), CliRunner()
    out = runner.invoke(cli, ["--help"]).output
    assert "pbsfake" in out and "A pool of cw workers on PBS (fake): up, status, down." in out
    assert "slurm" in out and "sge" in out
    up = runner.invoke(cli, ["pbsfake", "up", "--help"])
    assert up.exit_code == 0, up.output
    for flag in ("-q, --queue TEXT", "--walltime TEXT", "--ncpus INTEGER RANGE", "--workers", "--no-heal",
                 "--master-here", "--cluster-dir"):  # fmt: skip
        assert flag in up.output, up.output
    assert "[default: 1; x>=1]" in up.output
    for verb in ("status", "down"):
        assert runner.invoke(cli, ["pbsfake", verb, "--help"]).exit_code == 0
    bad = runner.invoke(cli, ["pbsfake", "up", "-n", "1", "--walltime", "four hours"])
    assert bad.exit_code == 2 and "Invalid value for --walltime: 'four hours' is not a time limit" in bad.output
    # inside one of its jobs, the registry names it
    env = {**LOGIN, "PBS_JOBID": "5[3].server", "PBS_ARRAY_INDEX": "3", "NCPUS": "2"}
    e = environment(env)
    assert type(e).__name__ == "PBSFakeEnvironment"
    assert (e.label(), e.task(), e.cpus()) == ("PBSFAKE job 5[3]", "5[3]", 2)
    assert type(environment_of(e.info())).__name__ == "PBSFakeEnvironment"
    # ... and SLURM's and Grid Engine's jobs are still theirs
    assert isinstance(environment(SLURM_ARRAY_TASK), SlurmEnvironment)
    assert isinstance(environment(SGE_ARRAY_TASK), SGEEnvironment)


def test_a_broken_backend_module_is_skipped_with_a_warning(extra_backends, caplog):
    (extra_backends / "broken.py").write_text("raise RuntimeError('half-written')\n")
    (extra_backends / "pbsfake.py").write_text(PBSFAKE)
    with caplog.at_level(logging.WARNING, logger="cw.launchers"):
        found = backends()
    assert list(found) == ["pbsfake", "sge", "slurm"]
    assert any("broken" in r.getMessage() and "half-written" in r.getMessage() for r in caplog.records)
    assert "pbsfake" in CliRunner().invoke(_cw(), ["--help"]).output


# --------------------------------------------------------------- job environments
def test_slurm_environment():
    e = environment(SLURM_ARRAY_TASK)
    assert isinstance(e, SlurmEnvironment) and (e.system, e.title) == ("slurm", "SLURM")
    assert (e.label(), e.task()) == ("SLURM job 123_2", "123_2")
    assert (e.cpus(), e.memory(), e.partition()) == (8, 4096 * 2**20, "debug")
    assert e.info() == {"SLURM_JOB_ID": "125", "SLURM_ARRAY_JOB_ID": "123", "SLURM_ARRAY_TASK_ID": "2"}
    again = environment_of(json.loads(json.dumps(e.info())))  # as the master gets it
    assert isinstance(again, SlurmEnvironment) and again.label() == "SLURM job 123_2"
    e = environment(SLURM_JOB)
    assert (e.label(), e.task(), e.cpus(), e.memory()) == ("SLURM job 73", "73", None, None)
    assert environment_of({"SLURM_JOB_ID": "73"}).label() == "SLURM job 73"


def test_sge_environment():
    e = environment(SGE_ARRAY_TASK)
    assert isinstance(e, SGEEnvironment) and (e.system, e.title) == ("sge", "Grid Engine")
    assert (e.label(), e.task()) == ("SGE job 77.3", "77.3")
    assert (e.cpus(), e.memory(), e.partition()) == (4, None, "all.q")
    assert e.info() == {"JOB_ID": "77", "SGE_TASK_ID": "3"}
    assert environment_of(e.info()).label() == "SGE job 77.3"
    e = environment(SGE_JOB)  # not an array: SGE_TASK_ID is 'undefined'
    assert (e.label(), e.task(), e.cpus()) == ("SGE job 32", "32", 1)
    assert isinstance(environment_of(e.info()), SGEEnvironment)


def test_each_environment_recognises_its_own_jobs_only():
    assert SlurmEnvironment.activated(SLURM_ARRAY_TASK) and SlurmEnvironment.activated(SLURM_JOB)
    assert SGEEnvironment.activated(SGE_ARRAY_TASK) and SGEEnvironment.activated(SGE_JOB)
    for env in (SLURM_ARRAY_TASK, SLURM_JOB):  # SGE_ROOT in the login shell: still a SLURM job
        assert not SGEEnvironment.activated(env)
    for env in (SGE_ARRAY_TASK, SGE_JOB):
        assert not SlurmEnvironment.activated(env)
    # a JOB_ID some other tool set, or a login shell: no batch job
    for env in (LOGIN, {**LOGIN, "JOB_ID": "77"}, {**LOGIN, "JOB_ID": "build-7", "SGE_TASK_ID": "1"}, {}):
        assert isinstance(environment(env), NoBatch), env


def test_outside_any_batch_system():
    e = environment(LOGIN)
    assert isinstance(e, NoBatch) and e.system == ""
    assert (e.label(), e.task(), e.info()) == ("", "", {})
    assert (e.cpus(), e.memory(), e.partition(), e.deadline(), e.post_mortem()) == (None,) * 5
    assert isinstance(environment_of({}), NoBatch) and isinstance(environment_of(None), NoBatch)
    assert isinstance(environment(), JobEnvironment)  # os.environ


class Counting(JobEnvironment):
    system, title = "counting", "Counting"
    asked = 0

    @classmethod
    def activated(cls, env):
        return True

    def query_deadline(self):
        Counting.asked += 1
        if self.env.get("FAIL"):
            raise RuntimeError("scheduler said something odd")
        return 1900000000.0

    def query_post_mortem(self):
        raise RuntimeError("accounting is down")


def test_deadline_is_cached_per_instance_and_never_raises(monkeypatch):
    Counting.asked = 0
    e = Counting({})
    assert e.deadline() == e.deadline() == 1900000000.0
    assert Counting.asked == 1  # cached for DEADLINE_CACHE seconds
    monkeypatch.setattr("cw.launchers.base.DEADLINE_CACHE", 0.0)
    assert e.deadline() == 1900000000.0 and Counting.asked == 2
    assert Counting({"FAIL": "1"}).deadline() is None
    assert Counting({}).post_mortem() is None


# -------------------------------------------------------------- options as data
def test_up_options_and_the_masters_options():
    opts = Slurm.up_options({"partition": "debug", "time": "4:00:00", "cpus_per_task": 2, "mem": None,
                             "account": None, "extra": ""})  # fmt: skip
    assert opts == {"partition": "debug", "time": "4:00:00", "cpus_per_task": 2}
    assert Slurm.master_options({**opts, "extra": "--qos=x"}) == {"partition": "debug", "extra": "--qos=x", "long": True}
    assert Slurm.master_options(opts, "1-00:00:00") == {"partition": "debug", "time": "1-00:00:00"}
    assert SGE.up_options({"pe": ("smp", 4), "queue": None, "time": "14400"}) == {"pe": ["smp", 4], "time": "14400"}
    assert SGE.master_options({"queue": "all.q", "pe": ["smp", 4], "mem": "2G"}) == {"queue": "all.q", "long": True}
    with pytest.raises(ConfigError, match="is not a time limit"):
        Slurm.up_options({"time": "four hours"})
    with pytest.raises(BadOption) as e:
        SGE.up_options({"time": "1:2:3:4"})
    assert e.value.option == "time" and "4:00:00 or 14400" in str(e.value)
    with pytest.raises(BadOption):
        SGE.up_options({"pe": ("smp", 0)})
    assert {o.key for o in Slurm.options} == {"partition", "time", "cpus_per_task", "mem", "account", "extra"}
    assert Option("extra-qsub", "h", key="extra").key == "extra" and Option("cpus-per-task", "h").key == "cpus_per_task"
    assert Scheduler.seconds("1:30:00") == 5400 and Scheduler.seconds("UNLIMITED") is None


def test_status_names_each_workers_job():
    doc = {"master": {"job": "9", "state": "running", "detail": "RUNNING", "node": "vm"}, "address": "tcp://vm:1",
           "arrays": [{"job": "10", "tasks": 2, "pending": 0, "running": 2, "ended": 0}],
           "target": 2, "heal": True, "heals": 0, "max_heals": 20,
           "connected": {"queued": 0, "running": 1, "done": 5, "workers": [
               {"id": "vm:1", "slots": 1, "running": 1, "info": {"SLURM_JOB_ID": "11", "SLURM_ARRAY_JOB_ID": "10",
                                                                 "SLURM_ARRAY_TASK_ID": "0"}},
               {"id": "vm:2", "slots": 1, "running": 0, "task": "10_1", "info": {}, "draining": True},
               {"id": "vm:3", "slots": 2, "running": 0, "info": {}}]}}  # fmt: skip
    text = format_status(Slurm(), doc)
    assert "master: SLURM job 9, RUNNING on vm, at tcp://vm:1" in text
    assert "SLURM job 10: 2 tasks, 2 running, 0 pending, 0 ended" in text
    lines = text.splitlines()[-3:]
    assert lines[0].split()[:2] == ["vm:1", "10_0"]  # from its info
    assert lines[1].split()[:2] == ["vm:2", "10_1"] and lines[1].endswith("draining")  # from the master
    assert lines[2].split()[:2] == ["vm:3", "-"]
