"""Tracing: where a message's time goes.

With ``$CW_TRACE`` set to a folder, each process notes when every message of a
session is packed and when one arrives (:mod:`cw.protocol` calls :func:`note`),
and whatever else calls :func:`mark`, on the system's monotonic clock, which
all processes of a host share; it writes the notes to ``<folder>/<pid>.json``
when it exits: benchmarks/bench.py's per-hop breakdown. Unset, it costs one
comparison per message.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
from typing import Any

from . import defaults

log = logging.getLogger(__name__)
#: This process's notes, (what, message kind, monotonic ns); None when not tracing.
events: list | None = None


def note(what: str, kind: Any = b"") -> None:
    if events is not None and len(events) < defaults.TRACE_EVENTS:
        events.append((what, bytes(kind).decode(errors="replace"), time.monotonic_ns()))


def mark(what: str) -> None:
    """Note an event of this process's path (nothing unless $CW_TRACE is set)."""
    if events is not None:
        note(what)


def trace_events() -> list:
    """This process's notes so far; [] when not tracing."""
    return list(events or ())


def _save(folder: str) -> None:
    if events and os.getpid() == _tracer:  # a forked executor leaves without saving
        try:
            with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as f:
                json.dump(events, f)
        except OSError as e:
            log.warning("cannot save the trace in %s: %s", folder, e)


_tracer = os.getpid()
if os.environ.get("CW_TRACE"):
    events = []
    atexit.register(_save, os.environ["CW_TRACE"])
