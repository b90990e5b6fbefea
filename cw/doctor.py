"""``cw doctor``: why a worker or a client cannot reach the master, one finding a line.

:func:`examine` looks from where it runs: the cluster directory (there?
writable? on a shared filesystem? private?), the key (there? mode 0600? a
key?), master.json (there? its process alive?), the published address (does
its host resolve? does it connect?), which of the master host's interfaces
connect from here, the key again (a signed STATUS round trip), and the
versions of Python, cloudpickle and cw on both sides. :func:`from_node` runs
the same in a tiny batch job on a compute node, and adds what only the two
views together tell: whether the node sees what this host wrote in the
cluster directory, and whether their versions match. Every :class:`Finding`
says what is wrong and what to do about it.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import socket
import stat
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from . import defaults
from .discovery import ClusterDir, pid_alive
from .errors import AuthenticationError, ConfigError, CwError
from .version import __version__

OK, WARN, FAIL = "ok", "warn", "FAIL"

#: Filesystems that compute nodes share with the login node (by /proc/self/mountinfo's type).
SHARED_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "cephfs", "ceph",
             "fuse.glusterfs", "glusterfs", "panfs", "wekafs", "fuse.sshfs", "9p", "virtiofs", "afs")  # fmt: skip


@dataclass
class Finding:
    """One line of the diagnosis: what was checked, what was found, what to do."""

    level: str  #: OK, WARN or FAIL
    check: str  #: 'cluster directory', 'key', 'master.json', 'address', 'interfaces', 'round trip', 'versions'
    text: str
    where: str = ""  #: '' here; 'node vm (SLURM job 12)' for --from-node

    def line(self) -> str:
        where = f"[{self.where}] " if self.where else ""
        return f"{self.level:<4}  {where}{self.check}: {self.text}"


def versions() -> dict[str, str]:
    """Python, cloudpickle and cw here."""
    import cloudpickle

    return {"python": platform.python_version(), "cloudpickle": cloudpickle.__version__, "cw": __version__}


# ------------------------------------------------------------------------ the checks
def examine(cluster: ClusterDir, nonce: str | None = None) -> list[Finding]:
    """Every check, from this process's host; ``nonce`` names a file the login side wrote
    (``from_node``): seeing it proves the directory is shared."""
    out: list[Finding] = []
    if not _directory(cluster, nonce, out):
        return out
    key = _key(cluster, out)
    _trusted(cluster, out)
    info = _master_json(cluster, out)
    if info is None:
        return out
    versions_of_master = info.get("versions") or {"cw": info.get("version", "?")}
    address = str(info.get("address", ""))
    if _address(address, info, out) and key is not None:
        _round_trip(address, key, cluster, out)
    _versions(versions(), versions_of_master, "here", "on the master", out)
    return out


def _directory(cluster: ClusterDir, nonce: str | None, out: list[Finding]) -> bool:
    d, check = cluster.path, "cluster directory"
    if not d.is_dir():
        out.append(Finding(FAIL, check, f"{d} does not exist here: start a master on it (`cw master --cluster-dir"
                                        f" {d}`, `cw slurm up`), or point CW_HOME / CW_CLUSTER / --cluster-dir at"
                                        " the master's"))  # fmt: skip
        return False
    try:
        probe = d / f".doctor.{socket.gethostname()}.{os.getpid()}"
        probe.write_text("x")
        probe.unlink()
    except OSError as e:
        out.append(Finding(FAIL, check, f"{d} is not writable here ({e.strerror}): the master and the workers"
                                        " write there (master.json, logs): fix its owner or mode"))  # fmt: skip
    mode = stat.S_IMODE(d.stat().st_mode)
    if mode & 0o077:
        out.append(Finding(WARN, check, f"{d} has mode {mode:04o}: others can list it, and it holds the store"
                                        f" (every job's arguments and results): chmod 700 {d}"))  # fmt: skip
    fs, source = filesystem(d)
    if nonce is not None:
        seen = (d / "doctor" / f"{nonce}.here").exists()
        out.append(Finding(OK, check, f"{d} is shared: this node sees what the login host wrote there ({fs})")
                   if seen else Finding(FAIL, check, f"{d} is not the login host's: this node does not see the"
                                        " file the login host wrote there: put CW_HOME on a filesystem both"
                                        f" share (here it is {fs} {source})"))  # fmt: skip
    elif fs in SHARED_FS:
        out.append(Finding(OK, check, f"{d}: writable, on {fs} ({source}), a shared filesystem"))
    else:
        out.append(Finding(WARN, check, f"{d} is on a local {fs} filesystem ({source}): compute nodes other than"
                                        " this host will not see it; put CW_HOME on a shared filesystem"
                                        " (check with `cw doctor --from-node`)"))  # fmt: skip
    return True


def filesystem(path: Path) -> tuple[str, str]:
    """(type, source) of the filesystem holding ``path``, from /proc/self/mountinfo."""
    best, found = -1, ("unknown", "?")
    target = str(path.resolve())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 2:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > best:
            best, found = len(mount), (rest[0], rest[1])
    return found


def _key(cluster: ClusterDir, out: list[Finding]) -> bytes | None:
    """The key this side would sign with; its file's mode and owner checked first (the
    key is read here even when cw would refuse it, so that the other checks still run)."""
    path = cluster.key_path
    if os.environ.get("CW_KEY"):
        try:
            key = cluster.key()
        except ConfigError as e:
            out.append(Finding(FAIL, "key", f"{e}: unset CW_KEY, or set it to the master's key"))
            return None
        out.append(Finding(OK, "key", f"from $CW_KEY ({path} is not read here)"))
        return key
    if not path.exists():
        out.append(Finding(FAIL, "key", f"no key at {path}: a master creates it when it starts on this directory"))
        return None
    try:
        st = path.stat()
        text = path.read_text()
    except OSError as e:
        out.append(Finding(FAIL, "key", f"cannot read {path} ({e.strerror}): it must be yours, mode 0600"))
        return None
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) < 16:
        out.append(Finding(FAIL, "key", f"{path} holds no key (hex, 32 bytes): remove it and start the master"
                                        " again (it makes a new one)"))  # fmt: skip
        return None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        out.append(Finding(FAIL, "key", f"{path} has mode {mode:04o}: anyone on this system can read it and sign"
                                        f" messages as the master or its workers: chmod 600 {path}"))  # fmt: skip
    elif st.st_uid != os.getuid():
        out.append(Finding(FAIL, "key", f"{path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}):"
                                        " another user may have planted it; remove it and start the master"
                                        " again, or set CW_SHARED_CLUSTER=1 if the cluster is shared on purpose"))  # fmt: skip
    else:
        out.append(Finding(OK, "key", f"{path}: mode {mode:04o}"))
    return key


def _trusted(cluster: ClusterDir, out: list[Finding]) -> None:
    """What cw itself refuses before it reads the key or master.json (the directory's and
    the files' owners and modes), said once, unless the key check said it already."""
    try:
        cluster.check()
    except ConfigError as e:
        if str(cluster.key_path) not in str(e):
            out.append(Finding(FAIL, "cluster directory", f"cw refuses it: {e}"))


def _master_json(cluster: ClusterDir, out: list[Finding]) -> dict | None:
    path = cluster.master_json
    if not path.exists():
        out.append(Finding(FAIL, "master.json", f"none in {cluster.path}: no master has published itself here;"
                                                " start one (`cw master`, `cw slurm up`, `cw sge up`)"))  # fmt: skip
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or "address" not in info:
        out.append(Finding(FAIL, "master.json", f"{path} is not a master's record: remove it and start the master"))
        return None
    who = f"pid {info.get('pid')} on {info.get('host')}"
    if info.get("host") == socket.gethostname() and not _alive(info.get("pid")):
        out.append(Finding(FAIL, "master.json", f"names {who}, which is not running: the master died without"
                                                " withdrawing it; start a master on this directory again (it"
                                                " resumes from its store)"))  # fmt: skip
        return None
    age = time.time() - float(info.get("started") or time.time())
    out.append(Finding(OK, "master.json", f"master {who} at {info['address']}, up {age:.0f} s"))
    return info


def _alive(pid: Any) -> bool:
    """A process that runs (a zombie, dead but not reaped, does not)."""
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    except (OSError, ValueError, TypeError, IndexError):
        return pid_alive(pid)


def _address(address: str, info: dict, out: list[Finding]) -> bool:
    """Does the published address resolve and connect, and which interfaces do? True if it connects."""
    if address.startswith("ipc://"):
        there = Path(address[len("ipc://"):]).exists()
        out.append(Finding(OK if there else FAIL, "address", f"{address}" + ("" if there else
                           " does not exist here: an ipc:// master is reachable on its own host only")))  # fmt: skip
        return there
    host, _, port_text = address.rpartition("://")[2].rpartition(":")
    port = int(port_text) if port_text.isdigit() else 0
    bound = int(info.get("port") or port)
    if port != bound:
        out.append(Finding(FAIL, "address", f"{address} names port {port}, but the master bound port {bound}"
                                            " (master.json's port): the address was changed by hand; restart"
                                            " the master to publish it again"))  # fmt: skip
    reach = {name: _connects(ip, bound) for name, ip in (info.get("interfaces") or {}).items()}
    ifaces = info.get("interfaces") or {}
    ok_names = [n for n, r in reach.items() if r[0]]
    other = [n for n in ok_names if n != "lo"] or ok_names
    instead = (f"; from here it is reachable on {', '.join(f'{n} ({ifaces[n]})' for n in other)}: restart the"
               f" master with --interface {other[0]}") if other else ""  # fmt: skip
    try:
        ip = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError) as e:
        advice = instead or ": restart the master with --interface IFACE (it publishes that interface's IP) or --host NAME"
        out.append(Finding(FAIL, "address", f"the published host {host!r} does not resolve here ({e}){advice}"))
        _interfaces(ifaces, reach, out)
        return False
    ok, why = _connects(ip, port)
    if ok:
        out.append(Finding(OK, "address", f"{address} ({ip}) connects from here ({why})"))
    else:
        if "refused" in why and not instead:
            advice = ": nothing listens there: the master stopped (start it again), or listens elsewhere (--bind)"
        else:
            advice = instead or ": a firewall between here and the master, or a master listening elsewhere (--bind)"
        out.append(Finding(FAIL, "address", f"{address} ({ip}): {why} from here{advice}"))
    _interfaces(ifaces, reach, out)
    return ok


def _interfaces(ifaces: dict, reach: dict, out: list[Finding]) -> None:
    if not ifaces:
        out.append(Finding(WARN, "interfaces", "master.json lists none (a master older than this cw)"))
        return
    yes = [f"{n} {ifaces[n]}" for n, r in reach.items() if r[0]]
    no = [f"{n} {ifaces[n]}" for n, r in reach.items() if not r[0]]
    text = f"the master's host has {', '.join(f'{n} {ip}' for n, ip in ifaces.items())}; reachable from here:" \
           f" {', '.join(yes) or 'none'}"  # fmt: skip
    if no:
        text += f"; not: {', '.join(no)}"
    out.append(Finding(OK if yes else FAIL, "interfaces", text))


def _connects(ip: str, port: int) -> tuple[bool, str]:
    t0 = time.monotonic()
    try:
        with socket.create_connection((ip, port), timeout=defaults.DOCTOR_TIMEOUT):
            return True, f"{(time.monotonic() - t0) * 1000:.1f} ms"
    except socket.timeout:
        return False, f"no answer within {defaults.DOCTOR_TIMEOUT:g} s"
    except OSError as e:
        return False, (e.strerror or str(e)).lower()


def _round_trip(address: str, key: bytes, cluster: ClusterDir, out: list[Finding]) -> None:
    from .link import query_status

    source = "$CW_KEY" if os.environ.get("CW_KEY") else str(cluster.key_path)
    try:
        encrypt = cluster.encrypted()
    except ConfigError:  # said above; the setting is still what the master follows
        encrypt = cluster.curve_path.exists()
    t0 = time.monotonic()
    try:
        s = query_status(address, key, timeout=defaults.DOCTOR_TIMEOUT, encrypt=encrypt)
    except AuthenticationError:
        out.append(Finding(FAIL, "round trip", f"the master rejected our key (read from {source}): this side and"
                                               " the master use different keys (use the master's cluster"
                                               " directory, or unset CW_KEY), or this host's clock is more"
                                               f" than {defaults.TOKEN_WINDOW:.0f} s off the master's"))  # fmt: skip
        return
    except CwError as e:
        out.append(Finding(FAIL, "round trip", f"{e}: the port answers but no cw master does: another program"
                                               " holds it, or the master is stuck (see its log)"))  # fmt: skip
        return
    ms = (time.monotonic() - t0) * 1000
    ws = s.get("workers", [])
    out.append(Finding(OK, "round trip", f"signed STATUS answered in {ms:.1f} ms{' (encrypted)' if encrypt else ''}:"
                                         f" {len(ws)} workers, {s.get('queued', 0)} jobs queued"))  # fmt: skip
    mine = versions()
    odd = [w for w in ws if _clash(mine, w.get("versions") or {})]
    if odd:
        w = odd[0]
        out.append(Finding(WARN, "versions", f"{len(odd)} of {len(ws)} workers differ from here, e.g."
                                             f" {w.get('label') or w.get('id')}: {_show(w.get('versions') or {})}"
                                             f" (here {_show(mine)}): they get none of this side's jobs"))  # fmt: skip


def _clash(a: dict, b: dict) -> list[str]:
    """What differs in a way that matters: Python's minor version, cloudpickle's major, cw's."""
    out = []
    if a.get("python") and b.get("python") and a["python"].split(".")[:2] != b["python"].split(".")[:2]:
        out.append("python")
    if a.get("cloudpickle") and b.get("cloudpickle") and a["cloudpickle"].split(".")[0] != b["cloudpickle"].split(".")[0]:
        out.append("cloudpickle")
    if a.get("cw") and b.get("cw") and a["cw"] != b["cw"]:
        out.append("cw")
    return out


def _show(v: dict) -> str:
    return ", ".join(f"{k} {v[k]}" for k in ("python", "cloudpickle", "cw") if v.get(k))


def _versions(mine: dict, theirs: dict, me: str, them: str, out: list[Finding]) -> None:
    clash = _clash(mine, theirs)
    if not clash:
        out.append(Finding(OK, "versions", f"{_show(mine)} {me}; {_show(theirs)} {them}"))
        return
    what = {"python": "Python's minor version", "cloudpickle": "cloudpickle's major version", "cw": "cw's version"}
    out.append(Finding(FAIL, "versions", f"{_show(mine)} {me}, but {_show(theirs)} {them}:"
                                         f" {' and '.join(what[c] for c in clash)} must match, or jobs pickled on"
                                         " one side do not load on the other: install the same versions on both"
                                         " sides (the same interpreter), then restart the master"))  # fmt: skip


# -------------------------------------------------------------------- from a node
def node_report(cluster: ClusterDir, nonce: str, path: Path) -> dict:
    """What ``cw doctor --node-report`` writes, inside the job: the node's findings."""
    from .launchers import environment

    env = environment()
    doc = {"host": socket.gethostname(), "label": env.label(), "python": sys.executable, "versions": versions(),
           "findings": [asdict(f) for f in examine(cluster, nonce)]}  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, path)
    except OSError as e:
        doc["write_error"] = str(e)
    return doc


def from_node(cluster: ClusterDir, scheduler: Any, options: dict, wait: float = defaults.DOCTOR_WAIT,
              report: Callable[[str], Any] = print) -> list[Finding]:  # fmt: skip
    """Submit a tiny job that runs the checks on a compute node; its findings, and what
    the two views together tell (is the directory shared, do the versions match)."""
    from .launchers.base import ENDED, PENDING, JobSpec
    from .launchers.pool import Pool

    nonce = secrets.token_hex(4)
    where = cluster.subdir("doctor")
    (where / f"{nonce}.here").write_text(f"{socket.gethostname()} {time.time():.0f}\n")
    result = where / f"{nonce}.json"
    pool = Pool(scheduler, cluster)
    argv = [sys.executable, "-m", "cw", "doctor", "--cluster-dir", str(cluster.path), "--node-report",
            str(result), "--nonce", nonce]  # fmt: skip
    script = pool._script("doctor", argv, "cw doctor, from a compute node")
    logs = cluster.subdir("logs")
    spec = JobSpec(pool.job_name("doctor"), str(cluster.path), logs, {**options, "time": "0:05:00"}, "doctor")
    job = scheduler.submit_master(script, spec)
    report(f"submitted {scheduler.describe(job)} to look from a compute node; waiting for it")
    deadline, said, state = time.monotonic() + wait, "", ""
    try:
        while not result.exists():
            tasks = scheduler.tasks([job]) or []
            t = next((t for t in tasks if t.job == job), None)
            state = t.detail if t else "gone from the queue"
            if t is None or t.state == ENDED:
                time.sleep(2.0)  # its report may still be on its way (an NFS client's cache)
                break
            if t.state == PENDING and t.reason and t.reason != said:
                said = t.reason
                report(f"{scheduler.describe(job)} is pending ({t.reason})")
            if time.monotonic() > deadline:
                return [Finding(FAIL, "node", f"{scheduler.describe(job)} did not run within {wait:.0f} s"
                                              f" ({state}{f': {said}' if said else ''}): the queue is busy or"
                                              " the job cannot run there; pass --wait, or the batch options"
                                              " the queue needs (pool.json's, or --extra)")]  # fmt: skip
            time.sleep(1.0)
    finally:
        scheduler.cancel([job])
    try:
        doc = json.loads(result.read_text())
    except (OSError, ValueError):
        log_files = sorted(logs.glob(f"doctor*{job}*"))
        tail = (log_files[0].read_text(errors="replace").strip().splitlines() or ["(empty)"])[-1] if log_files else ""
        return [Finding(FAIL, "node", f"{scheduler.describe(job)} ended ({state}) without a report in {where}: the"
                                      f" node does not see the cluster directory, or could not run {sys.executable}"
                                      f"{f' (its log: {log_files[0]}: {tail})' if log_files else ''}")]  # fmt: skip
    for f in (result, where / f"{nonce}.here"):
        try:
            f.unlink()
        except OSError:
            pass
    label = doc.get("label")
    node = f"node {doc['host']}" + (f" ({label})" if label else "")
    findings = [Finding(**{**f, "where": node}) for f in doc["findings"]]
    mine = versions()
    if _clash(mine, doc["versions"]):
        _versions(doc["versions"], mine, f"on the node ({doc['python']})", "here", findings)
        findings[-1].where = node
    return findings
