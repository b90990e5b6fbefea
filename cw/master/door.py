"""Who may speak to the master, and what a stranger costs: the gate, the connection cap,
handshakes and the live sessions.

Part of :class:`cw.master.server.Master` (a component it holds). In order:

1. **The gate** (ZAP, during the ZeroMQ handshake, before any message is read):
   a fresh token or the peers' CurveZMQ key (:class:`cw.security.Gate`), and a
   cap on open connections, counted with the socket monitor. A refusal costs
   a log line (rate-limited) and nothing else.
2. **Handshakes**: an OPEN signed with the cluster key is answered by a
   CHALLENGE; the peer's next message, signed with the session key, makes the
   session live. Pending handshakes are capped and expire.
3. **Live sessions**: one :class:`cw.protocol.Channel` per routing id; the
   master's loop verifies every message with it (a replay repeats a seq and
   is dropped).

Nothing a peer without a session sends is parsed or answered beyond that: no
REJECT except to an OPEN that does not verify, and every reply to a stranger is
rate-limited per connection and in all.
"""

from __future__ import annotations

import logging
import resource
import struct
import time
from typing import Any

import zmq

from .. import defaults
from .. import protocol as P
from ..errors import BadMAC, ProtocolError
from ..link import RateLimited
from ..security import Gate, secure_server

log = logging.getLogger(__name__)

_ZAP = "inproc://zeromq.zap.01"
_COUNTED = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
_EVENT = struct.Struct("=Hi")  # a monitor event: its kind, then its value (here a descriptor)


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            log.info("open-file limit raised from %d to %d", soft, want)
            soft = want
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, want, e)
    return soft


class Replies:
    """Which strangers may be answered now: once per STRANGER_EVERY per routing id, at most
    STRANGER_REPLIES over its life, and ``rate`` a second in all (``budget``, which
    replies of several kinds may share)."""

    def __init__(self, budget: list[float], rate: float = defaults.STRANGER_RATE):
        self.last: dict[bytes, tuple[float, int]] = {}
        self.budget, self.rate = budget, rate  # budget: [tokens, when last refilled]

    def allow(self, ident: bytes, now: float) -> bool:
        t, n = self.last.get(ident, (-1e9, 0))
        if now - t < defaults.STRANGER_EVERY or n >= defaults.STRANGER_REPLIES:
            return False
        b = self.budget
        b[0] = min(self.rate, b[0] + (now - b[1]) * self.rate)
        b[1] = now
        if b[0] < 1:
            return False
        b[0] -= 1
        if len(self.last) >= 4 * defaults.MAX_CONNECTIONS:  # bounded: forget the quiet ones
            self.last = {i: v for i, v in self.last.items() if now - v[0] < 60}
        self.last[ident] = (now, n + 1)
        return True


class Door:
    """The master's admission of peers: the ZAP gate, the connection count, handshakes, sessions."""

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket, key: bytes, encrypt: bool,
                 bad: RateLimited, max_connections: int = defaults.MAX_CONNECTIONS):  # fmt: skip
        self.sock, self.key, self.encrypt, self.bad = sock, key, encrypt, bad
        self.epoch = ""  # the store's, set by the master once the store is open
        self.gate = Gate(key, encrypt)
        # the ZAP handler must exist before the master's socket accepts anyone
        self.zap = ctx.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(_ZAP)
        secure_server(sock, key, encrypt)
        sock.setsockopt(zmq.HANDSHAKE_IVL, defaults.HANDSHAKE_IVL)
        self.monitor = sock.get_monitor_socket(_COUNTED)
        self.cap = min(max_connections, raise_fd_limit() - defaults.FD_RESERVE)
        if self.cap < max_connections:
            log.warning("at most %d connections (the open-file limit allows no more)", self.cap)
        self.conns: set[int] = set()  # file descriptors of open connections
        self.disconnected_at = 0.0
        self.refused = RateLimited(log, "refused connections")
        self.channels: dict[bytes, P.Channel] = {}  # routing id -> live session
        self.pending: dict[bytes, tuple[P.Channel, float]] = {}  # routing id -> (session, since)
        # a CHALLENGE answers a verified OPEN on a gated connection (and the pending
        # handshakes are capped): its own, larger budget lets a registration storm through;
        # BYE and REJECT share the strangers' one
        now = time.monotonic()
        self.opens = Replies([float(defaults.CHALLENGE_RATE), now], defaults.CHALLENGE_RATE)
        strangers = [float(defaults.STRANGER_RATE), now]
        self.rejects, self.byes = Replies(strangers), Replies(strangers)

    # -- the gate ----------------------------------------------------------------------
    def service(self) -> None:
        """Count connections, then answer the ZAP requests waiting (the monitor first: a
        request comes after its connection's ACCEPTED event)."""
        self._drain_monitor()
        while True:
            try:
                req = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._zap(req)
            except Exception as e:  # a malformed request must not stop the master
                log.error("ZAP request not understood: %r", e)

    def _zap(self, req: list[bytes]) -> None:
        version, rid, _domain, address, _identity, mechanism, *creds = req
        where = address.decode(errors="replace") or "a local peer"
        if len(self.conns) > self.cap:
            code, why = b"300", f"{len(self.conns)} connections open, the cap is {self.cap}"
            self.refused(f"from {where}: {why} (--max-connections; idle ones close after"
                         f" {defaults.HANDSHAKE_IVL / 1000:.0f} s)")  # fmt: skip
        else:
            why = self.gate.check(mechanism, creds)
            code = b"200" if why is None else b"400"
            if why:
                self.refused(f"from {where}: {why}")
        self.zap.send_multipart([version, rid, code, (why or "OK").encode(), b"", b""])

    def _drain_monitor(self) -> None:
        while True:
            try:
                event, endpoint = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                continue
            kind, fd = _EVENT.unpack(event[:6])
            if kind == zmq.EVENT_ACCEPTED:
                self.conns.add(fd)
            elif kind == zmq.EVENT_DISCONNECTED:
                self.conns.discard(fd)
                self.disconnected_at = time.monotonic()

    # -- handshakes ----------------------------------------------------------------------
    def stranger(self, ident: bytes, frames: list[bytes],
                 failed: ProtocolError | None = None) -> tuple[bytes, Any, list[bytes]] | None:  # fmt: skip
        """A message that no live session of this routing id verifies (``failed``: why the
        live one did not).

        The first message of a pending handshake makes it live and is returned
        (kind, header, blobs) for the master to handle; an OPEN is answered; any
        other message is dropped (ProtocolError). A peer whose session we do not
        know at all (we restarted, or forgot it) gets a BYE asking it to open one.
        """
        now = time.monotonic()
        pend = self.pending.get(ident)
        is_open = P.kind_of(frames, 1) == P.OPEN
        if failed is not None and pend is None and not is_open:
            raise failed  # forged, replayed or corrupt, on a live session
        if pend is not None and not is_open:
            del self.pending[ident]  # one try: a wrong MAC ends the handshake
            got = pend[0].unpack(frames, 1, defaults.HELLO_MESSAGE)
            self.channels[ident] = pend[0]
            return got
        if is_open:
            self._open(ident, frames, now)
            return None
        if self.byes.allow(ident, now):
            self.sock.send_multipart([ident, *P.pack(self.key, P.BYE, {"why": "no such session: open one",
                                                                          "rehello": True})])  # fmt: skip
        raise ProtocolError("a message outside any session")

    def _open(self, ident: bytes, frames: list[bytes], now: float) -> None:
        try:
            _, header, _ = P.unpack(self.key, frames, 1, defaults.OPEN_MESSAGE)
        except BadMAC as e:  # a cw peer with another key: tell it, sometimes
            if self.rejects.allow(ident, now):
                self.sock.send_multipart([ident, *P.reject(str(e))])
            raise
        if not self.opens.allow(ident, now):
            return
        if len(self.pending) >= defaults.PENDING_MAX:
            self.expire(now)
            if len(self.pending) >= defaults.PENDING_MAX:
                self.refused(f"{len(self.pending)} handshakes pending: an OPEN waits for a retry")
                return
        channel, reply = P.challenge(self.key, header, self.epoch)
        self.pending[ident] = (channel, now)
        self.sock.send_multipart([ident, *reply])

    def forget(self, ident: bytes | None) -> None:
        """The session on this routing id is over (BYE, or its peer replaced it)."""
        if ident is not None:
            self.channels.pop(ident, None)
            self.pending.pop(ident, None)

    def expire(self, now: float, idle: float = defaults.SESSION_IDLE) -> list[bytes]:
        """Drop handshakes older than HANDSHAKE_TIMEOUT and sessions silent for ``idle``
        seconds; the routing ids of the sessions dropped."""
        for ident in [i for i, (_, t) in self.pending.items() if now - t > defaults.HANDSHAKE_TIMEOUT]:
            del self.pending[ident]
        gone = [i for i, ch in self.channels.items() if now - ch.heard > idle]
        for ident in gone:
            del self.channels[ident]
        return gone

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.zap.close(linger=0)
