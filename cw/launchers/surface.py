"""What every cluster object shares (``LocalCluster``, ``SlurmCluster``, ``SGECluster``):
the context manager, ``logs()``, a readable ``repr`` and an HTML one for Jupyter, and the
durations and ranges people type (``idle_timeout="5m"``).

A cluster object has ``address`` and ``cluster`` (its
:class:`~cw.discovery.ClusterDir`), which ``cw.Client(cluster)`` connects
to, and ``scale``, ``adapt``, ``status``, ``close``; this base class builds
the rest from :meth:`ClusterSurface.facts`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..discovery import ClusterDir
from ..errors import ConfigError


def seconds_of(value: Any, what: str = "duration") -> float:
    """90, '90', '90s', '5m', '2h', '1d', '1:30:00' -> seconds; ConfigError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{what}: {value} is negative")
        return float(value)
    text = str(value).strip()
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*(s|m|h|d|ms)?", text)
    if m:
        unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]
        return float(m.group(1)) * unit
    parts = text.split(":")
    if 1 < len(parts) <= 3 and all(p.replace(".", "", 1).isdigit() for p in parts):
        return float(sum(float(p) * 60**i for i, p in enumerate(reversed(parts))))
    raise ConfigError(f"{what}: {value!r} is not a duration (e.g. 300, '5m', '1:00:00')")


def short_duration(secs: float) -> str:
    """300 -> '5m', 90 -> '90s', 7200 -> '2h'."""
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= n and secs % n == 0:
            return f"{int(secs // n)}{unit}"
    return f"{secs:g}s"


class ClusterSurface:
    """The surface every cluster object shares; subclasses give :meth:`facts`."""

    cluster: ClusterDir
    kind = "cluster"

    @property
    def logs_dir(self) -> Path:
        return self.cluster.path / "logs"

    def facts(self, live: bool = True) -> list[tuple[str, str]]:
        """(label, value) pairs describing the cluster now; ``live=False``: no network."""
        raise NotImplementedError

    def logs(self, tail: int | None = None) -> dict[str, str]:
        """The logs of the master and the workers, by file name (the last ``tail`` lines of each)."""
        out = {}
        for f in sorted(self.logs_dir.glob("*")) if self.logs_dir.is_dir() else ():
            if f.is_file():
                text = f.read_text(errors="replace")
                out[f.name] = "\n".join(text.splitlines()[-tail:]) if tail else text
        return out

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        try:
            facts = self.facts(live=True)
        except Exception as e:  # a repr must never raise
            facts = [("error", repr(e))]
        body = ", ".join(f"{k}={v}" if k else v for k, v in facts)
        return f"<{type(self).__name__} {body}>"

    def _repr_html_(self) -> str:
        import html  # here: every worker imports this module, and none shows HTML

        try:
            facts = self.facts(live=True)
        except Exception as e:
            facts = [("error", repr(e))]
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(k or '')}</th>"
                       f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in facts)  # fmt: skip
        return (f"<div><strong>{html.escape(type(self).__name__)}</strong>"
                f"<table>{rows}</table></div>")  # fmt: skip
