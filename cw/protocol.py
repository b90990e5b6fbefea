"""The wire, in code: message kinds, framing, sessions and HMAC signing (docs/protocol.md).

Every message is a ZeroMQ multipart message::

    [version, kind, mac, seq, header, *blobs]

``header`` is compact JSON; ``blobs`` are opaque bytes (pickled functions,
arguments, results); ``seq`` is an 8-byte big-endian counter. ``mac`` is
HMAC-SHA256 over the length and bytes of version, kind, seq, header and every
blob. Each connection opens a session (OPEN, CHALLENGE): both sides derive a
session key from the cluster key and a nonce of each, and every later message,
both ways, is signed with it under a strictly increasing ``seq``
(:class:`Channel`). A receiver checks the frame count, version and MAC before
it parses JSON or unpickles anything, and drops a ``seq`` it has seen.
"""

from __future__ import annotations

import hmac
import json
import os
import struct
import time
from hashlib import sha256
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Tuple

from . import defaults, trace
from .errors import BadDigest, BadMAC, ProtocolError, Replayed

VERSION = b"CW3"

OPEN = b"OPEN"  # peer -> master, signed with the cluster key: opens a session (CHALLENGE answers)
CHALLENGE = b"CHALLENGE"  # master -> peer, signed with the cluster key: the session's other nonce
HELLO = b"HELLO"  # the first message of a client or worker on a session; WELCOME answers it
SUBMIT = b"SUBMIT"  # client -> master: jobs (SubmitSpec rows) and the functions they need
CANCEL = b"CANCEL"  # client -> master (seqs), master -> worker (job ids)
STATUS = b"STATUS"  # a request for the master's status document, and the answer
RETRY = b"RETRY"  # requeue a run's failed jobs; answered by STATUS {retried}
OUTPUT = b"OUTPUT"  # a finished job's stdout and stderr; answered by STATUS {status, stdout, stderr}
BYE = b"BYE"  # the sender is leaving, or the master tells a peer to go or say HELLO again
WELCOME = b"WELCOME"  # master -> peer: the answer to HELLO
ACK = b"ACK"  # master -> client: these submissions are committed
TASKS = b"TASKS"  # master -> worker: tasks (TaskSpec rows), functions and contexts
REJECT = b"REJECT"  # master -> peer, UNSIGNED: the master could not verify an OPEN
RESULT = b"RESULT"  # worker -> master (WorkerResult rows), master -> client (ClientResult rows)
HEARTBEAT = b"HEARTBEAT"  # both ways: alive; a worker's carries its counters
PAUSE = b"PAUSE"  # take no new jobs (and stop the running ones): client -> master -> worker; worker -> master
RESUME = b"RESUME"  # take jobs again, continue the stopped ones: the same hops
NEED = b"NEED"  # worker -> master: inputs and scattered data it lacks; client -> master: kept values
DATA = b"DATA"  # master -> worker: the inputs and scattered data it asked for, or a broadcast

KINDS = frozenset({OPEN, CHALLENGE, HELLO, SUBMIT, CANCEL, STATUS, RETRY, OUTPUT, BYE, WELCOME, ACK, TASKS,
                   REJECT, RESULT, HEARTBEAT, PAUSE, RESUME, NEED, DATA})


# -- the rows of batched headers, by name ----------------------------------------------
# A row travels as a JSON array in its record's field order. The per-job paths
# build and unpack rows as plain tuples, naming each field as the record does:
# making a NamedTuple costs about half a microsecond, some 5% of a no-op job.
class SubmitSpec(NamedTuple):
    """One job of a SUBMIT: a row of its header's ``j``."""

    seq: int  #: the client's own job number in its session
    fn: str  #: the function's hash
    key: Optional[str]  #: the job's identity in its run (stored results are reused)
    #: c: cache (default true), r: requirements, t: timeout s, m: max retries, o: output bytes,
    #: d: the seqs of the futures among its arguments, x: the scattered data it takes, p: parent job id
    opts: Optional[dict]


class TaskSpec(NamedTuple):
    """One task of a TASKS: a row of its header's ``t``."""

    id: int  #: the store's job id
    fn: str  #: the function's hash
    ctx: Optional[str]  #: the client context to run in (a key of the header's ``c``), or None
    timeout: Optional[float]  #: seconds, or None
    output: Optional[int]  #: bytes of stdout and of stderr to keep (None: the client's, else 1 MiB)
    key: Optional[str]  #: the job's key in its run: its outputs are archived under it
    needs: Optional[dict]  #: the counted resources it holds (gpus, mem): its devices are chosen by them


class TaskInputs(NamedTuple):
    """What one task of a TASKS takes besides its arguments: a row of its header's ``i``."""

    id: int  #: the store's job id
    inputs: list  #: the job ids whose results are its inputs, in the order its arguments name them
    refs: list  #: the hashes of the scattered data its arguments name


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
    job: Optional[int] = None  #: the store's id of the job that answered (an earlier one's, for a stored result)


class Message(NamedTuple):
    """One kind of message on one hop: who sends it, and the fields of its header."""

    sender: str
    receiver: str
    kind: bytes
    fields: Tuple[str, ...]  #: a trailing "?" marks a field that may be absent
    note: str = ""  #: tells apart two uses of one kind on one hop


#: Every message on the wire, as docs/protocol.md's tables list them (a test compares them).
MESSAGES = (
    Message("client", "master", OPEN, ("n",)),
    Message("client", "master", HELLO, (
        "role", "session", "run", "context", "versions", "waiting?", "unsatisfiable?")),
    Message("client", "master", SUBMIT, ("j", "f?", "x?", "resend?")),
    Message("client", "master", CANCEL, ("s",)),
    Message("client", "master", STATUS, ()),
    Message("client", "master", RETRY, ("run",)),
    Message("client", "master", OUTPUT, ("session", "seq", "job?")),
    Message("client", "master", PAUSE, ("host?", "worker?", "seconds?", "stop?")),
    Message("client", "master", RESUME, ("host?", "worker?")),
    Message("client", "master", NEED, ("s",)),
    Message("client", "master", HEARTBEAT, ()),
    Message("client", "master", BYE, ()),
    Message("master", "client", CHALLENGE, ("n", "p", "epoch")),
    Message("master", "client", WELCOME, ("master", "heartbeat", "epoch", "store")),
    Message("master", "client", ACK, ("s", "g?")),
    Message("master", "client", RESULT, ("r", "s?", "g?", "k?")),
    Message("master", "client", HEARTBEAT, ("workers", "queued", "notices?")),
    Message("master", "client", STATUS, (
        "master", "address", "store", "uptime", "queued", "held", "in_memory", "running", "prefetched",
        "done", "failed", "submitted", "rates", "store_bytes", "bad_messages", "sessions", "sent", "queues", "runs",
        "failures", "workers"), "answer to STATUS"),
    Message("master", "client", STATUS, ("retried",), "answer to RETRY"),
    Message("master", "client", STATUS, ("status", "stdout", "stderr"), "answer to OUTPUT"),
    Message("master", "client", STATUS, ("paused", "ambiguous?"), "answer to PAUSE"),
    Message("master", "client", STATUS, ("resumed", "ambiguous?"), "answer to RESUME"),
    Message("master", "client", BYE, ("why", "rehello?", "fatal?")),
    Message("master", "client", REJECT, ("why",)),
    Message("worker", "master", OPEN, ("n",)),
    Message("worker", "master", HELLO, (
        "role", "id", "host", "pid", "procs", "caps", "have", "refs?", "holding", "running", "blocked?",
        "draining", "info", "label", "task", "versions", "epoch", "paused?")),
    Message("worker", "master", RESULT, ("r", "running", "o?", "blocked?")),
    Message("worker", "master", HEARTBEAT, (
        "fn_received", "tasks", "results", "crashes", "running", "rss?", "cpu?", "blocked?")),
    Message("worker", "master", NEED, ("i?", "x?")),
    Message("worker", "master", BYE, ("returned", "why", "final?")),
    Message("worker", "master", PAUSE, ("returned", "until", "stopped")),
    Message("worker", "master", RESUME, ()),
    Message("master", "worker", CHALLENGE, ("n", "p", "epoch")),
    Message("master", "worker", WELCOME, ("master", "heartbeat", "epoch", "store")),
    Message("master", "worker", TASKS, ("t", "f", "c?", "i?", "x?", "k?")),
    Message("master", "worker", DATA, ("i?", "x?")),
    Message("master", "worker", CANCEL, ("i",)),
    Message("master", "worker", PAUSE, ("seconds?", "stop?")),
    Message("master", "worker", RESUME, ()),
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
UNSATISFIABLE = 8  # no connected worker could ever run it (its requirements), past the client's deadline
DEPENDENCY = 9  # an input (a future among its arguments) did not succeed; the job never ran
STATUS_NAMES = {
    OK: "done",
    RAISED: "error",
    CRASHED: "crashed",
    LOST: "lost",
    TIMEOUT: "timeout",
    CANCELLED: "cancelled",
    FAILED: "failed",
    IMPORT: "import-error",
    UNSATISFIABLE: "unsatisfiable",
    DEPENDENCY: "dependency",
}

_LEN = struct.Struct("!Q")
_SEQ = struct.Struct("!Q")
_SEQ0 = _SEQ.pack(0)
_KINDS = KINDS  # a local name for the hot path
#: Bytes of randomness each side puts into a session.
NONCE_BYTES = 16
_now = time.monotonic


def _signer(key: bytes) -> Any:
    """An HMAC-SHA256 state keyed once; each message signs a copy of it."""
    return hmac.new(key, digestmod=sha256)


#: The head frame: version (3 bytes), MAC (32), seq (8), the kind's length (1), the
#: kind, then the header. One frame, not five: each frame of a message costs every
#: hop a few microseconds.
_MAC_AT, _SEQ_AT, _KIND_AT = 3, 35, 43
_HEAD_MIN = 44


def _mac(signer: Any, rest: Any, blobs: Sequence[bytes]) -> bytes:
    """MAC over the version, the head after its MAC (seq, kind, header) and each blob:
    every part preceded by its length, so that no bytes can move between them.

    A large blob (``defaults.LARGE_BLOB_BYTES``) is signed by its length only: its
    SHA-256 is in the signed header (``h``), computed once by whoever made it and
    checked by each receiver, and a master that passes it on does not hash it again.
    """
    m = signer.copy()
    update, pack, large = m.update, _LEN.pack, defaults.LARGE_BLOB_BYTES
    update(VERSION)
    update(pack(len(rest)))
    update(rest)
    for f in blobs:
        n = len(f)
        update(pack(n))
        if n < large:
            update(f)
    return m.digest()


def encode_header(header: Any) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def _sealed(signer: Any, kind: bytes, seq: int, header: bytes, blobs: Sequence[bytes]) -> list[bytes]:
    rest = b"".join((_SEQ.pack(seq), bytes((len(kind),)), kind, header))
    return [b"".join((VERSION, _mac(signer, rest, blobs), rest)), *blobs]


def _frames(signer: Any, kind: bytes, header: Any, blobs: Sequence[bytes], seq: int) -> list[bytes]:
    header = header if header is not None else {}
    large = defaults.LARGE_BLOB_BYTES
    if blobs and max(map(len, blobs)) >= large:  # their digests go in the signed header
        header = {**header, "h": [digest_of(b) for b in blobs if len(b) >= large]}
    return _sealed(signer, kind, seq, encode_header(header), blobs)


def kind_of(frames: Sequence[bytes], start: int = 0) -> bytes:
    """A message's kind as it claims it, unverified (b"" if it has none): for routing a
    handshake and for tracing, never for trusting."""
    head = frames[start] if len(frames) > start else b""
    if len(head) < _HEAD_MIN:
        return b""
    return bytes(head[_KIND_AT + 1 : _KIND_AT + 1 + head[_KIND_AT]])


class Digested(bytes):
    """A large blob whose SHA-256 is known (hex): it came in a verified message, or the
    store kept the digest beside it. Whoever sends it on signs that digest instead of
    hashing the bytes again. Pickled, it is plain bytes."""

    digest: str = ""

    def __reduce__(self):
        return (bytes, (bytes(self),))


def digested(blob: Any, digest: str) -> Digested:
    d = Digested(blob)
    d.digest = digest
    return d


def digest_of(blob: bytes) -> str:
    """A large blob's SHA-256 (hex): known already for a Digested one, computed otherwise."""
    return getattr(blob, "digest", None) or sha256(blob).hexdigest()


def _blobs(header: dict, frames: Sequence[bytes], start: int, keep: bool = False) -> list:
    """The blobs of a message whose MAC checked out; each large one checked against its
    digest in the signed header (BadDigest if it does not match), and with ``keep``
    (a master, which sends them on) kept with it as a Digested."""
    blobs = list(frames[start + 1 :])
    given = header.pop("h", None)
    large = defaults.LARGE_BLOB_BYTES
    where = [i for i, b in enumerate(blobs) if len(b) >= large]
    if not where and given is None:
        return blobs
    if (not isinstance(given, list) or len(given) != len(where)
            or not all(isinstance(d, str) and len(d) == 64 for d in given)):  # fmt: skip
        raise ProtocolError("large blobs without their signed digests")
    for i, d in zip(where, given):
        if sha256(blobs[i]).hexdigest() != d:
            raise BadDigest(f"a blob of {len(blobs[i])} bytes does not match its signed digest"
                            " (altered or corrupted on the way)")  # fmt: skip
        if keep:
            blobs[i] = digested(blobs[i], d)
    return blobs


def _verify(signer: Any, frames: Sequence[bytes], start: int,
            max_bytes: int | None) -> tuple[bytes, int, bytes]:  # fmt: skip
    """Check frame count, version, size, layout and MAC, in that order; (kind, seq,
    header bytes). Raises ProtocolError.

    Everything before the MAC costs O(1) per frame and reads no content: a
    stranger's message costs its length, never a parse.
    """
    n = len(frames) - start
    if n < 1:
        raise ProtocolError("an empty message")
    if n > defaults.MAX_FRAMES:
        raise ProtocolError(f"{n} frames, more than {defaults.MAX_FRAMES}")
    head = frames[start]
    if head[:_MAC_AT] != VERSION:
        raise ProtocolError(f"protocol version {bytes(head[:16])!r}, expected {VERSION!r}")
    if max_bytes is not None:
        size = sum(len(frames[i]) for i in range(start, len(frames)))
        if size > max_bytes:
            raise ProtocolError(f"{size} bytes before a session, more than {max_bytes}")
    if len(head) < _HEAD_MIN or len(head) < _HEAD_MIN + head[_KIND_AT]:
        raise ProtocolError("malformed head frame")
    if not hmac.compare_digest(head[_MAC_AT:_SEQ_AT], _mac(signer, memoryview(head)[_SEQ_AT:], frames[start + 1 :])):
        raise BadMAC("bad MAC (another key or session, or a corrupted message)")
    k = _HEAD_MIN + head[_KIND_AT]
    return head[_HEAD_MIN:k], _SEQ.unpack(head[_SEQ_AT:_KIND_AT])[0], head[k:]


def _decode(kind: bytes, h: bytes) -> Any:
    if kind not in _KINDS:
        raise ProtocolError(f"unknown message kind {bytes(kind[:16])!r}")
    try:
        header = json.loads(h)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"signed header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"signed header is a {type(header).__name__}, not an object")
    return header


def pack(key: bytes, kind: bytes, header: Any = None, blobs: Sequence[bytes] = ()) -> list[bytes]:
    """Frames of a message signed with the cluster key itself (seq 0): OPEN, CHALLENGE and
    the BYE that asks a stranger to open a session. Everything else travels on a Channel."""
    return _frames(_signer(key), kind, header, blobs, 0)


def unpack(key: bytes, frames: Sequence[bytes], start: int = 0,
           max_bytes: int | None = None) -> tuple[bytes, Any, list[bytes]]:  # fmt: skip
    """Verify and decode a message signed with the cluster key: (kind, header, blobs).

    Its seq must be 0 (a session's messages never are). Raises ProtocolError;
    nothing of the message is parsed before its MAC checks out.
    """
    kind, seq, h = _verify(_signer(key), frames, start, max_bytes)
    if seq != 0:
        raise ProtocolError(f"seq {seq} in a message signed with the cluster key")
    header = _decode(kind, h)
    return kind, header, _blobs(header, frames, start)


class Channel:
    """One session, seen from one end: its key and the sequence numbers of both directions.

    :meth:`pack` signs under the next ``seq``; :meth:`unpack` verifies, then
    refuses a ``seq`` not above the last one accepted (a replay, or a message
    of a session that is over). The one place sessions live: the master's
    peers, :class:`cw.link.Link` and :func:`cw.link.ask` each hold one.
    """

    __slots__ = ("key", "sent", "seen", "heard", "_signer")

    def __init__(self, key: bytes):
        self.key = key
        self._signer = _signer(key)
        self.sent = 0  #: seq of the last message packed
        self.seen = 0  #: seq of the last message accepted
        self.heard = _now()  #: when the last message was accepted (monotonic)

    def pack(self, kind: bytes, header: Any = None, blobs: Sequence[bytes] = ()) -> list[bytes]:
        self.sent += 1
        frames = _frames(self._signer, kind, header, blobs, self.sent)
        if trace.events is not None:
            trace.note("pack", kind)
        return frames

    def unpack(self, frames: Sequence[bytes], start: int = 0, max_bytes: int | None = None,
               keep: bool = False) -> tuple[bytes, Any, list[bytes]]:  # fmt: skip
        """Verify a message of this session (from ``frames[start]`` on): (kind, header, blobs).

        Raises BadMAC (not this session), Replayed (a seq seen already), BadDigest or
        ProtocolError. ``keep``: large blobs come as Digested (see :func:`_blobs`).
        """
        if trace.events is not None:
            trace.note("unpack", kind_of(frames, start))
        kind, seq, h = _verify(self._signer, frames, start, max_bytes)
        if seq <= self.seen:
            raise Replayed(f"seq {seq} is not above {self.seen}: a replayed or stale message")
        header = _decode(kind, h)
        blobs = _blobs(header, frames, start, keep)
        self.seen, self.heard = seq, _now()
        return kind, header, blobs


def nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def session_key(key: bytes, peer_nonce: bytes, master_nonce: bytes, epoch: str) -> bytes:
    """The key of one session: fresh for each pair of nonces, bound to the store's epoch."""
    return hmac.new(key, b"cw session" + peer_nonce + master_nonce + epoch.encode(), sha256).digest()


def open_message(key: bytes, peer_nonce: bytes) -> list[bytes]:
    """A peer's OPEN: its nonce, signed with the cluster key."""
    return pack(key, OPEN, {"n": peer_nonce.hex()})


def challenge(key: bytes, header: dict, epoch: str) -> tuple[Channel, list[bytes]]:
    """The master's answer to a verified OPEN: the session's Channel and the CHALLENGE frames."""
    peer = _nonce_of(header, "n")
    mine = nonce()
    frames = pack(key, CHALLENGE, {"n": mine.hex(), "p": peer.hex(), "epoch": epoch})
    return Channel(session_key(key, peer, mine, epoch)), frames


def accept_challenge(key: bytes, header: dict, mine: Sequence[bytes]) -> Channel | None:
    """The peer's side: the session's Channel, if the CHALLENGE answers one of our own
    OPENs (``mine``: our nonces still waiting); None for a replayed or stray one."""
    try:
        p = _nonce_of(header, "p")
        theirs = _nonce_of(header, "n")
        epoch = str(header["epoch"])
    except (KeyError, ProtocolError):
        return None
    if not any(hmac.compare_digest(p, n) for n in mine):
        return None
    return Channel(session_key(key, p, theirs, epoch))


def _nonce_of(header: dict, field: str) -> bytes:
    try:
        n = bytes.fromhex(header[field])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError(f"no nonce in {field!r}") from None
    if len(n) != NONCE_BYTES:
        raise ProtocolError(f"a nonce of {len(n)} bytes in {field!r}")
    return n


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
    """An unsigned REJECT (a MAC of zeros): a hint to a peer whose OPEN did not verify."""
    rest = b"".join((_SEQ0, bytes((len(REJECT),)), REJECT, encode_header({"why": why})))
    return [VERSION + bytes(32) + rest]


def is_reject(frames: Sequence[bytes]) -> str | None:
    """The reason, if frames are an (unsigned) REJECT from a master."""
    if len(frames) == 1 and kind_of(frames) == REJECT and frames[0][:_SEQ_AT] == VERSION + bytes(32):
        try:
            return str(json.loads(frames[0][_HEAD_MIN + len(REJECT) :]).get("why", "rejected"))[:200]
        except Exception:  # unsigned bytes: anything may be in them
            return "rejected"
    return None
