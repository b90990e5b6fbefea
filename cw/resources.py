"""Requirements and what workers offer: one meaning for the client, the master and the worker.

A job's ``requires`` is checked and put in one form by the client
(:func:`requirements`): ``mem`` in bytes ("8G" is read as batch systems read
it), ``gpus`` a count, ``tags`` a list. A worker offers capabilities (CPUs,
memory, GPUs and their model, host, partition or queue, tags, and what it
was told with ``--cap``). A job can run on a worker whose capabilities
satisfy its requirements (:func:`satisfies`): numbers are minimums, tags
must all be there, anything else must be equal. The **counted** resources
(:data:`COUNTED`: GPUs and memory) are also reserved while a job holds them:
a worker with 2 GPUs holds at most two one-GPU jobs at once, and each sees
only its own device.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

from .errors import InvalidJobError

#: Resources a job holds while it runs (reserved on placement, given back with its result).
COUNTED = ("gpus", "mem")

_BINARY = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def parse_bytes(text: str | int | float, unit: str = "") -> int:
    """'8G', '8GB', '8 GiB', '512M', 1024 -> bytes; K, M, G, T count in powers of 1024,
    as batch systems do. A bare number is in ``unit`` ('' bytes, 'M' megabytes).

    Raises ValueError for anything else.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text * _BINARY[unit.upper()])
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMGTP]?)(I?B)?", str(text).strip(), re.IGNORECASE)
    if m is None:
        raise ValueError(f"{text!r} is not an amount of memory (e.g. 8G, 512M)")
    letter = m.group(2) or ("" if m.group(3) else unit)
    return int(float(m.group(1)) * _BINARY[letter.upper()])


def requirements(requires: Any) -> Optional[dict]:
    """A job's requirements, checked and in one form (mem in bytes, gpus a count, tags a
    list); None for none. InvalidJobError (a ValueError and a TypeError) says what is wrong."""
    if requires is None or (isinstance(requires, dict) and not requires):
        return None
    if not isinstance(requires, dict):
        raise InvalidJobError(f"requires must be a dict such as {{'gpus': 1, 'mem': '8G', 'tags': ['x']}}, not {requires!r}")
    out: dict = {}
    for k, v in requires.items():
        if not isinstance(k, str) or not k:
            raise InvalidJobError(f"requires: {k!r} is not a capability name")
        if k == "mem":
            try:
                out[k] = parse_bytes(v)
            except (ValueError, TypeError, KeyError):
                raise InvalidJobError(f"requires: mem={v!r} is not an amount of memory (8G, 512M, bytes)") from None
        elif k in ("gpus", "cpus"):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidJobError(f"requires: {k}={v!r} must be a whole number (0 or more)")
            out[k] = v
        elif k in ("tags", "tag"):
            tags = [v] if isinstance(v, str) else v
            if not isinstance(tags, (list, tuple, set)) or not all(isinstance(t, str) and t for t in tags):
                raise InvalidJobError(f"requires: tags={v!r} must be a list of names")
            out["tags"] = sorted(set(out.get("tags", [])) | set(tags))
        elif isinstance(v, bool) or isinstance(v, (int, float, str)) and v == v:
            out[k] = v  # compared as it is: a number is a minimum, anything else must be equal
        else:
            raise InvalidJobError(f"requires: {k}={v!r} must be a number, a word or true/false")
    return {k: out[k] for k in sorted(out) if not (k in COUNTED and out[k] == 0)} or None


def limits(timeout: Any = None, max_retries: Any = None, output_limit: Any = None) -> tuple:
    """A job's limits, checked: (timeout in seconds or None, max_retries or None, output_limit
    or None). InvalidJobError says which is wrong: a timeout is a positive number of seconds
    (None: no limit), retries and the output limit whole numbers, 0 or more."""
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (timeout > 0) or math.isinf(timeout):
            raise InvalidJobError(f"timeout={timeout!r}: a job's timeout is a number of seconds above 0 (None: no limit)")
        timeout = float(timeout)
    for name, v in (("max_retries", max_retries), ("output_limit", output_limit)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise InvalidJobError(f"{name}={v!r} must be a whole number, 0 or more")
    return timeout, max_retries, output_limit


def counted(requires: Optional[dict]) -> Optional[dict]:
    """The counted part of (normalized) requirements: what a job holds while it runs; None if nothing."""
    if not requires:
        return None
    need = {k: requires[k] for k in COUNTED if isinstance(requires.get(k), (int, float)) and requires[k] > 0}
    return need or None


def satisfies(caps: dict, requires: Optional[dict]) -> bool:
    """True if a worker with these capabilities can ever run a job with these requirements.

    Numbers are minimums, ``tags`` must all be present, anything else must be equal.
    """
    if not requires:
        return True
    for k, want in requires.items():
        have = caps.get(k)
        if k == "tags":
            if not set(want) <= set(have or ()):
                return False
        elif isinstance(want, (int, float)) and not isinstance(want, bool):
            if not isinstance(have, (int, float)) or have < want:
                return False
        elif have != want:
            return False
    return True


def describe(caps: dict) -> str:
    """What a worker offers, for people: 'cpus=4 mem=15.6G gpus=2 (NVIDIA A100) tags=a,b host=n1'."""
    parts = []
    for k in ("cpus", "mem", "gpus", "partition", "queue", "tags", "host"):
        v = caps.get(k)
        if v in (None, [], ""):
            continue
        if k == "mem":
            v = f"{v / 2**30:.1f}G"
        elif k == "gpus" and caps.get("gpu_model"):
            v = f"{v} ({caps['gpu_model']})"
        elif k == "tags":
            v = ",".join(v)
        parts.append(f"{k}={v}")
    skip = {"cpus", "mem", "gpus", "gpu_model", "partition", "queue", "tags", "host"}
    parts += [f"{k}={v}" for k, v in sorted(caps.items()) if k not in skip]
    return " ".join(parts)


def checked_key(key: Any) -> Optional[str]:
    """A job's ``key=``, checked: None, or a string (a whole number is taken as its text,
    as the store keeps it). InvalidJobError otherwise: a key names one job of a run."""
    if key is None or isinstance(key, str):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    raise InvalidJobError(f"key={key!r}: a key is a string (or a whole number), not a {type(key).__name__};"
                          " map(..., key=...) gives every job the same key")  # fmt: skip


def run_name(run: Any) -> Optional[str]:
    """A client's ``run=``, checked: None or a non-empty string."""
    if run is None or (isinstance(run, str) and run):
        return run
    raise InvalidJobError(f"run={run!r}: a run is named by a non-empty string, not a {type(run).__name__}")
