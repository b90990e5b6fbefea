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
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Tuple

from . import defaults
from .errors import BadMAC, ProtocolError

VERSION = b"CW1"

HELLO = b"HELLO"  # the first message of a client or worker; WELCOME answers it
SUBMIT = b"SUBMIT"  # client -> master: jobs (SubmitSpec rows) and the functions they need
CANCEL = b"CANCEL"  # client -> master (seqs), master -> worker (job ids)
STATUS = b"STATUS"  # a request for the master's status document, and the answer
RETRY = b"RETRY"  # requeue a run's failed jobs; answered by STATUS {retried}
OUTPUT = b"OUTPUT"  # a finished job's stdout and stderr; answered by STATUS {status, stdout, stderr}
BYE = b"BYE"  # the sender is leaving, or the master tells a peer to go or say HELLO again
WELCOME = b"WELCOME"  # master -> peer: the answer to HELLO
ACK = b"ACK"  # master -> client: these submissions are committed
TASKS = b"TASKS"  # master -> worker: tasks (TaskSpec rows), functions and contexts
REJECT = b"REJECT"  # master -> peer, UNSIGNED: the master could not verify a message
RESULT = b"RESULT"  # worker -> master (WorkerResult rows), master -> client (ClientResult rows)
HEARTBEAT = b"HEARTBEAT"  # both ways: alive; a worker's carries its counters

KINDS = frozenset({HELLO, SUBMIT, CANCEL, STATUS, RETRY, OUTPUT, BYE, WELCOME, ACK, TASKS, REJECT, RESULT, HEARTBEAT})


# -- the rows of batched headers, by name ----------------------------------------------
# A row travels as a JSON array in its record's field order. The per-job paths
# build and unpack rows as plain tuples, naming each field as the record does:
# making a NamedTuple costs about half a microsecond, some 5% of a no-op job.
class SubmitSpec(NamedTuple):
    """One job of a SUBMIT: a row of its header's ``j``."""

    seq: int  #: the client's own job number in its session
    fn: str  #: the function's hash
    key: Optional[str]  #: the job's identity in its run (stored results are reused)
    opts: Optional[dict]  #: c: cache (default true), r: requirements, t: timeout s, m: max retries, o: output bytes


class TaskSpec(NamedTuple):
    """One task of a TASKS: a row of its header's ``t``."""

    id: int  #: the store's job id
    fn: str  #: the function's hash
    ctx: Optional[str]  #: the client context to run in (a key of the header's ``c``), or None
    timeout: Optional[float]  #: seconds, or None
    output: Optional[int]  #: bytes of stdout and of stderr to keep (None: the client's, else 1 MiB)


class WorkerResult(NamedTuple):
    """One result a worker sends: a row of its RESULT header's ``r``."""

    id: int
    status: int  #: one of the status codes below
    runtime: Optional[float]  #: seconds the job ran, if it ran
    error: Optional[str]  #: one line, for a job that did not succeed
    traceback: Optional[str]
    stdout: Optional[str] = None  #: the job's output: present (both) only if it wrote any
    stderr: Optional[str] = None


class ClientResult(NamedTuple):
    """One result the master sends a client: a row of its RESULT header's ``r``."""

    seq: int
    status: int
    error: Optional[str]
    traceback: Optional[str]


class Message(NamedTuple):
    """One kind of message on one hop: who sends it, and the fields of its header."""

    sender: str
    receiver: str
    kind: bytes
    fields: Tuple[str, ...]  #: a trailing "?" marks a field that may be absent
    note: str = ""  #: tells apart two uses of one kind on one hop


#: Every message on the wire, as docs/protocol.md's tables list them (a test compares them).
MESSAGES = (
    Message("client", "master", HELLO, ("role", "session", "run", "context", "versions", "waiting?")),
    Message("client", "master", SUBMIT, ("j", "f?", "resend?")),
    Message("client", "master", CANCEL, ("s",)),
    Message("client", "master", STATUS, ()),
    Message("client", "master", RETRY, ("run",)),
    Message("client", "master", OUTPUT, ("session", "seq")),
    Message("client", "master", HEARTBEAT, ()),
    Message("client", "master", BYE, ()),
    Message("master", "client", WELCOME, ("master", "heartbeat")),
    Message("master", "client", ACK, ("s", "g?")),
    Message("master", "client", RESULT, ("r", "s?", "g?")),
    Message("master", "client", HEARTBEAT, ("workers", "queued", "notices?")),
    Message("master", "client", STATUS, (
        "master", "address", "store", "uptime", "queued", "in_memory", "running", "prefetched",
        "done", "failed", "submitted", "rates", "store_bytes", "bad_messages", "sessions", "queues", "runs",
        "failures", "workers"), "answer to STATUS"),
    Message("master", "client", STATUS, ("retried",), "answer to RETRY"),
    Message("master", "client", STATUS, ("status", "stdout", "stderr"), "answer to OUTPUT"),
    Message("master", "client", BYE, ("why", "rehello?", "fatal?")),
    Message("master", "client", REJECT, ("why",)),
    Message("worker", "master", HELLO, (
        "role", "id", "host", "pid", "procs", "caps", "have", "holding", "running", "draining",
        "info", "label", "task", "versions")),
    Message("worker", "master", RESULT, ("r", "running")),
    Message("worker", "master", HEARTBEAT, (
        "fn_received", "tasks", "results", "crashes", "running", "rss?", "cpu?")),
    Message("worker", "master", BYE, ("returned", "why", "final?")),
    Message("master", "worker", WELCOME, ("master", "heartbeat")),
    Message("master", "worker", TASKS, ("t", "f", "c?")),
    Message("master", "worker", CANCEL, ("i",)),
    Message("master", "worker", HEARTBEAT, ()),
    Message("master", "worker", BYE, ("why", "rehello?")),
    Message("master", "worker", REJECT, ("why",)),
)  # fmt: skip

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


def batches(sizes: Sequence[int], max_items: int = defaults.BATCH_JOBS,
            max_bytes: int = defaults.BATCH_BYTES) -> Iterator[slice]:  # fmt: skip
    """Slices of a list of items, by their sizes in bytes: at most ``max_items`` items
    and ``max_bytes`` bytes a message (an item larger than that travels alone).
    Every hop sends its batches this way."""
    i, n = 0, len(sizes)
    while i < n:
        j, size = i + 1, sizes[i]
        while j < n and j - i < max_items and size + sizes[j] <= max_bytes:
            size += sizes[j]
            j += 1
        yield slice(i, j)
        i = j


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
