"""The wire, in code: message kinds, framing and HMAC signing (docs/protocol.md).

Every message is a ZeroMQ multipart message::

    [version, kind, mac, header, *blobs]

``header`` is compact JSON; ``blobs`` are opaque bytes (pickled functions,
arguments, results). ``mac`` is HMAC-SHA256, keyed by the cluster's secret,
over the length and bytes of version, kind, header and every blob. A receiver
checks version and MAC before it parses JSON or unpickles anything.
"""

from __future__ import annotations

import hmac
import json
import logging
import struct
import time
from hashlib import sha256
from typing import Any, Sequence

from . import defaults
from .errors import ProtocolError

VERSION = b"CW1"

# client -> master
HELLO = b"HELLO"  # header: {role, session, ...}; the first message of a client or worker
SUBMIT = b"SUBMIT"  # header: {j: [[seq, fn, key, opts], ...], f: [fn, ...]}; blobs: args..., fns...
CANCEL = b"CANCEL"  # header: {s: [seq, ...]} (client) or {i: [job id, ...]} (master -> worker)
STATUS = b"STATUS"  # header: {} (request) or the status document (reply)
RETRY = b"RETRY"  # header: {run}: requeue the run's failed jobs; answered by STATUS {retried}
BYE = b"BYE"  # header: {}; the sender is leaving
# master -> client / worker
WELCOME = b"WELCOME"  # header: {master, ...}; answer to HELLO
ACK = b"ACK"  # header: {s: [seq, ...]}: committed submissions (RESULT may carry "s" too)
TASKS = b"TASKS"  # header: {t: [[id, fn, ctx, timeout], ...], f: [fn, ...], c: {ctx: {...}}}
REJECT = b"REJECT"  # UNSIGNED, header: {why}: the master could not verify a message
# worker -> master, master -> client
RESULT = b"RESULT"  # header: {r: [[id, status, runtime, error, traceback], ...]}; blobs: values
# both ways
HEARTBEAT = b"HEARTBEAT"  # header: {} or a worker's counters

KINDS = frozenset({HELLO, SUBMIT, CANCEL, STATUS, RETRY, BYE, WELCOME, ACK, TASKS, REJECT, RESULT, HEARTBEAT})

# job / result status codes carried in RESULT
OK = 0  # value blob is the pickled return value
RAISED = 1  # value blob is the pickled exception; error and traceback are text
CRASHED = 2  # the process running the job died; error names the signal or exit code
LOST = 3  # the job lost its worker too many times
TIMEOUT = 4  # the job ran past its timeout and was killed
CANCELLED = 5  # the job was cancelled
FAILED = 6  # the system could not run the job (result too large, ...); error says why
IMPORT = 7  # the worker could not import the function or what its arguments need
STATUS_NAMES = {
    OK: "done",
    RAISED: "error",
    CRASHED: "crashed",
    LOST: "lost",
    TIMEOUT: "timeout",
    CANCELLED: "cancelled",
    FAILED: "failed",
    IMPORT: "import-error",
}

_LEN = struct.Struct("!Q")
log = logging.getLogger(__name__)


def _mac(key: bytes, frames: Sequence[bytes]) -> bytes:
    m = hmac.new(key, digestmod=sha256)
    for f in frames:
        m.update(_LEN.pack(len(f)))
        m.update(f)
    return m.digest()


def encode_header(header: Any) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def pack(key: bytes, kind: bytes, header: Any = None, blobs: Sequence[bytes] = ()) -> list[bytes]:
    """Frames of a signed message (without any routing identity)."""
    h = encode_header(header if header is not None else {})
    return [VERSION, kind, _mac(key, (VERSION, kind, h, *blobs)), h, *blobs]


def unpack(key: bytes, frames: Sequence[bytes]) -> tuple[bytes, Any, list[bytes]]:
    """Verify and decode a message: (kind, header, blobs). Raises ProtocolError.

    Nothing of the message is parsed before its MAC checks out.
    """
    if len(frames) < 4:
        raise ProtocolError(f"{len(frames)} frames, need at least 4")
    version, kind, mac, h = frames[0], frames[1], frames[2], frames[3]
    if version != VERSION:
        raise ProtocolError(f"protocol version {bytes(version[:16])!r}, expected {VERSION!r}")
    blobs = list(frames[4:])
    if not hmac.compare_digest(mac, _mac(key, (version, kind, h, *blobs))):
        raise BadMAC("bad MAC (wrong key, or a corrupted message)")
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {bytes(kind[:16])!r}")
    try:
        header = json.loads(h)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"signed header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"signed header is a {type(header).__name__}, not an object")
    return kind, header, blobs


class BadMAC(ProtocolError):
    """The MAC does not verify: the sender's key is not ours (or the bytes were changed)."""


def reject(why: str) -> list[bytes]:
    """An unsigned REJECT: a hint to a peer whose message did not verify."""
    h = encode_header({"why": why})
    return [VERSION, REJECT, b"", h]


def is_reject(frames: Sequence[bytes]) -> str | None:
    """The reason, if frames are an (unsigned) REJECT from a master."""
    if len(frames) == 4 and frames[0] == VERSION and frames[1] == REJECT and frames[2] == b"":
        try:
            return str(json.loads(frames[3]).get("why", "rejected"))[:200]
        except Exception:  # unsigned bytes: anything may be in them
            return "rejected"
    return None


class RateLimited:
    """Counts events of one kind and logs at most one line per interval."""

    def __init__(self, logger: logging.Logger, what: str, every: float = defaults.LOG_EVERY):
        self.logger, self.what, self.every = logger, what, every
        self.count = 0
        self._logged = 0
        self._last = -1e9

    def __call__(self, detail: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= self.every:
            n = self.count - self._logged
            self.logger.warning("%s (%d since last report): %s", self.what, n, detail)
            self._last, self._logged = now, self.count
