"""`cw top`: a live terminal view of the master, its runs, its workers and the latest failures.

Drawn with rich; one STATUS request to the master per refresh, and the store
read-only (with no master running, the store alone). Keys: q quits, s sorts
the workers by the next column, f shows the next run only (then all again).
"""

from __future__ import annotations

import os
import select
import sys
import time
from datetime import datetime
from typing import Any

import click

from .common import cluster_from, cluster_options
from .views import Watcher, duration, size

#: The workers table's columns `s` cycles through: (title, sort key, reverse)
SORTS = (
    ("worker", lambda w: w["id"], False),
    ("busy", lambda w: w["running"] / max(1, w["slots"]), True),
    ("job time", lambda w: max([j[1] or 0 for j in w.get("jobs") or []] or [0]), True),
    ("RSS", lambda w: (w.get("counters") or {}).get("rss") or 0, True),
    ("CPU", lambda w: (w.get("counters") or {}).get("cpu") or 0, True),
)



def state(w: dict) -> str:
    """A worker's state in a word or two: draining, paused (its jobs stopped), busy or idle."""
    if w.get("draining"):
        return "draining"
    p = w.get("paused")
    if p:
        return "paused, jobs stopped" if p.get("stopped") else "paused"
    return "busy" if w["running"] else "idle"
class Top:
    """The view's state: what to sort by, which run to show."""

    def __init__(self, watcher: Watcher, sort: str = "worker", run: str | None = None):
        self.watcher = watcher
        self.sort = next((i for i, s in enumerate(SORTS) if s[0].replace(" ", "") == sort.replace(" ", "")), 0)
        self.run = run
        self.snap: dict[str, Any] = {}

    def refresh(self) -> None:
        self.snap = self.watcher.snapshot()

    def key(self, ch: str) -> bool:
        """React to a key; False to quit."""
        if ch in ("q", "Q", "\x03"):
            return False
        if ch == "s":
            self.sort = (self.sort + 1) % len(SORTS)
        elif ch == "f":
            names = [r["run"] for r in self.snap.get("runs", [])]
            if self.run is None:
                self.run = names[0] if names else None
            else:
                i = names.index(self.run) + 1 if self.run in names else len(names)
                self.run = names[i] if i < len(names) else None
        return True

    def render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        snap, st = self.snap, self.snap.get("status")
        parts: list[Any] = []
        if st:
            r = st.get("rates") or {}
            head = Text.assemble(
                ("cw top  ", "bold"), f"master {st['master']} at {st['address']}   up {duration(st['uptime'])}"
                f"   store {size(st.get('store_bytes'))}\n",
                f"jobs/s in {r.get('in_10s', 0):.1f} out {r.get('out_10s', 0):.1f} (10 s)   "
                f"in {r.get('in_60s', 0):.1f} out {r.get('out_60s', 0):.1f} (1 min)   "
                f"queued {st['queued']}   running {st['running']}   done {st['done'] - st.get('failed', 0)}"
                f"   failed {st.get('failed', 0)}"
                f"   workers {len(st['workers'])}",
            )  # fmt: skip
        else:
            head = Text.assemble(("cw top  ", "bold"), (f"{snap.get('error') or 'no master'}", "yellow"),
                                 f": the store alone ({snap.get('store') or 'none'}), read-only")  # fmt: skip
        parts.append(head)

        runs = Table(title="runs", expand=True, title_justify="left")
        for col in ("run", "queued", "running", "done", "failed", "progress", "rate", "ETA"):
            runs.add_column(col, justify="left" if col in ("run", "progress") else "right")
        for r in snap.get("runs", []):
            if self.run is not None and r["run"] != self.run:
                continue
            finished = r["done"] + r["failed"] + r["cancelled"]
            frac = finished / r["jobs"] if r["jobs"] else 0.0
            bar = "█" * int(frac * 20) + "·" * (20 - int(frac * 20))
            runs.add_row(r["run"] or "(none)", str(r["queued"]), str(r["running"]), str(r["done"]),
                         str(r["failed"]), f"{bar} {frac:4.0%}",
                         "-" if r["rate"] is None else f"{r['rate']:.1f}/s", duration(r["eta"]))  # fmt: skip
        parts.append(runs)

        title, keyf, rev = SORTS[self.sort]
        workers = Table(title=f"workers (sorted by {title})", expand=True, title_justify="left")
        for col in ("worker", "host", "batch job", "busy", "state", "job", "for", "RSS", "CPU"):
            workers.add_column(col, justify="right" if col in ("busy", "for", "RSS", "CPU") else "left")
        for w in sorted((st or {}).get("workers", []), key=keyf, reverse=rev):
            c = w.get("counters") or {}
            jobs = w.get("jobs") or []
            workers.add_row(
                w["id"], w["host"], w.get("label") or "-", f"{w['running']}/{w['slots']}",
                state(w),
                ", ".join(str(j[0]) for j in jobs[:3]) or "-", duration(max([j[1] or 0 for j in jobs] or [0]))
                if jobs else "-", size(c.get("rss")), "-" if c.get("cpu") is None else f"{c['cpu']:.0f}%",
            )  # fmt: skip
        if not st:
            for w in snap.get("workers_seen", [])[-10:]:
                workers.add_row(w["id"], w["host"] or "?", "-", "-", "left" if w["left"] else "?", "-", "-", "-", "-")
        parts.append(workers)

        fails = Table(title="latest failures", expand=True, title_justify="left")
        for col in ("when", "job", "run", "status", "worker", "error"):
            fails.add_column(col, overflow="ellipsis", no_wrap=col == "error")
        for f in (snap.get("failures") or [])[:8]:
            when = f.get("at") or f.get("finished")
            fails.add_row(datetime.fromtimestamp(when).strftime("%H:%M:%S") if when else "-",
                          str(f.get("id", f.get("job"))), f.get("run") or "-", f.get("status") or "-",
                          f.get("worker") or "-", (f.get("error") or "").strip().split("\n")[0])  # fmt: skip
        parts.append(fails)
        parts.append(Text(f"q quit   s sort workers (by {title})   f run filter ({self.run or 'all runs'})",
                          style="reverse"))  # fmt: skip
        return Panel(Group(*parts), border_style="blue")


@click.command("top")
@cluster_options
@click.option("--interval", default=1.0, show_default=True, type=float, help="Seconds between refreshes.")
@click.option("--sort", default="worker", show_default=True, type=click.Choice([s[0].replace(" ", "") for s in SORTS]),
              help="Sort the workers by this column (s cycles).")
@click.option("--run", default=None, help="Show this run only (f cycles).")
@click.option("--once", is_flag=True, help="Print one snapshot and exit (no keys).")
def top_cmd(cluster_name, cluster_dir, interval, sort, run, once):
    """A live view: the master, each run, each worker, the latest failures (q quits)."""
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        raise click.ClickException("cw top needs rich: pip install 'cw[top]'") from None
    top = Top(Watcher(cluster_from(cluster_name, cluster_dir, read=True)), sort, run)
    console = Console()
    top.refresh()
    if once or not sys.stdin.isatty():
        console.print(top.render())
        return
    with _cbreak(), Live(top.render(), console=console, screen=True, auto_refresh=False) as live:
        next_at = time.monotonic() + interval
        while True:
            ready, _, _ = select.select([sys.stdin], [], [], max(0.0, next_at - time.monotonic()))
            if ready:
                ch = os.read(sys.stdin.fileno(), 1).decode(errors="ignore")
                if not top.key(ch):
                    return
            if time.monotonic() >= next_at:
                top.refresh()
                next_at = time.monotonic() + interval
            live.update(top.render(), refresh=True)


class _cbreak:
    """Keys arrive one at a time, unechoed, while the view runs."""

    def __enter__(self) -> None:
        import termios
        import tty

        self.fd = sys.stdin.fileno()
        self.saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd)

    def __exit__(self, *exc: Any) -> None:
        import termios

        termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

