"""`cw doctor`: what stands between this host (or a compute node) and the master."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from ..defaults import DOCTOR_WAIT
from .common import cluster_from, cluster_options


@click.command("doctor")
@cluster_options
@click.option("--from-node", is_flag=True,
              help="Also look from a compute node: submit a tiny job that runs these checks there.")
@click.option("--backend", default=None, metavar="NAME",
              help="The batch system for --from-node (default: the pool's, from pool.json).")
@click.option("--extra", default=None, metavar="FLAGS",
              help="With --from-node: more flags for its job (default: the pool's master job options).")
@click.option("--wait", type=float, default=DOCTOR_WAIT, show_default=True,
              help="With --from-node: seconds to wait for its job.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option("--node-report", default=None, hidden=True)
@click.option("--nonce", default=None, hidden=True)
def doctor_cmd(cluster_name, cluster_dir, from_node, backend, extra, wait, as_json, node_report, nonce):
    """Check that workers and clients can reach the master, and say what to do if not.

    Checks the cluster directory, the key, master.json, the published address and
    the master host's interfaces, a signed round trip, and the versions of Python,
    cloudpickle and cw on each side. Exits 1 if any check fails.
    """
    from ..doctor import FAIL, examine
    from ..doctor import from_node as look_from_node
    from ..doctor import node_report as write_report
    from ..launchers import backends
    from ..launchers.pool import Pool

    cluster = cluster_from(cluster_name, cluster_dir)
    if node_report:  # inside the job that --from-node submitted
        doc = write_report(cluster, nonce or "", Path(node_report))
        click.echo(json.dumps(doc, indent=2))
        return
    findings = examine(cluster)
    if from_node:
        rec = Pool(None, cluster).read()  # type: ignore[arg-type]
        name = backend or rec.get("scheduler")
        cls = backends().get(name or "")
        if cls is None:
            raise click.UsageError(f"--from-node: say which batch system with --backend"
                                   f" ({', '.join(backends())}); {cluster.path} holds no pool")  # fmt: skip
        options = dict(rec.get("master_options") or {}) if rec.get("scheduler") == cls.name else {}
        options.pop("long", None)
        if extra:
            options["extra"] = extra
        try:
            findings += look_from_node(cluster, cls(), options, wait, report=lambda s: click.echo(s, err=True))
        except Exception as e:  # a scheduler that refuses the job is itself a finding
            from ..doctor import Finding

            findings.append(Finding(FAIL, "node", f"cannot submit the job: {e}"))
    if as_json:
        click.echo(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        for f in findings:
            click.echo(f.line())
    if any(f.level == FAIL for f in findings):
        raise SystemExit(1)
