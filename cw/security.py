"""The gate in front of the wire: who may finish a ZeroMQ handshake with a master.

libzmq reads a whole message, of any number of frames (``MAXMSGSIZE`` bounds
each frame, not their count), before the master sees any of it: no check made
after receipt can bound what a stranger costs. So every connection to a master
proves, during the ZeroMQ (ZMTP) handshake and before a single message is read,
that it comes from a holder of the cluster key:

- in the clear, the ZMTP PLAIN mechanism carries a one-time **token**: a time,
  a random nonce, and their HMAC under the cluster key. The master's ZAP
  handler (:class:`Gate`, run by ``cw.master.door``) accepts a token once,
  within ``TOKEN_WINDOW`` of its time. Nothing secret crosses the wire, and a
  captured token cannot be used again.
- with encryption (``cw master --encrypt``), CurveZMQ: the master's key pair
  and the peers' key pair derive from the cluster key (nothing new to
  configure), a peer must know the master's public key to connect at all, and
  the master accepts only the peers' public key. Everything on the wire is
  then encrypted too.

Sessions and sequence numbers (:class:`cw.protocol.Channel`) stand behind the
gate: a message that passes it is still verified, and a replayed one dropped.
"""

from __future__ import annotations

import collections
import hmac
import os
import time
from hashlib import sha256

import zmq
from zmq.utils import z85

from . import defaults

#: The ZAP domain of a master's socket (libzmq calls the handler only when one is set).
DOMAIN = b"cw"
_TOKEN = b"cw2"


def token(key: bytes, now: float | None = None) -> tuple[bytes, bytes]:
    """A one-time connection token: (username, password) for ZMTP PLAIN."""
    user = b"%s %d %s" % (_TOKEN, int(time.time() if now is None else now), os.urandom(16).hex().encode())
    return user, _sign(key, user)


def _sign(key: bytes, user: bytes) -> bytes:
    return hmac.new(key, b"cw gate " + user, sha256).hexdigest().encode()


def curve_keys(key: bytes, role: str) -> tuple[bytes, bytes]:
    """(public, secret), Z85, of the master's (``role="master"``) or the peers' (``"peer"``)
    CurveZMQ key pair: derived from the cluster key, so nothing new is stored or typed."""
    secret = z85.encode(hmac.new(key, b"cw curve " + role.encode(), sha256).digest())
    return zmq.curve_public(secret), secret


def secure_client(sock: zmq.Socket, key: bytes, encrypt: bool) -> None:
    """Socket options of a peer's connection to a master: a fresh token, or CurveZMQ keys.

    Set before ``connect``: libzmq keeps them for every reconnection of this
    socket, so a peer makes a new socket when the master refuses a token it used.
    """
    if encrypt:
        sock.curve_serverkey = curve_keys(key, "master")[0]
        sock.curve_publickey, sock.curve_secretkey = curve_keys(key, "peer")
    else:
        sock.plain_username, sock.plain_password = token(key)


def secure_server(sock: zmq.Socket, key: bytes, encrypt: bool) -> None:
    """Socket options of the master's socket: PLAIN or CurveZMQ, checked by the ZAP handler."""
    sock.zap_domain = DOMAIN
    if encrypt:
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = curve_keys(key, "master")
    else:
        sock.plain_server = True


class Gate:
    """The master's decisions on ZAP requests: a valid, fresh, unused token, or the peers'
    CurveZMQ key. Remembers the tokens it accepted (each is good once)."""

    def __init__(self, key: bytes, encrypt: bool, window: float = defaults.TOKEN_WINDOW,
                 remember: int = defaults.TOKEN_CACHE):  # fmt: skip
        self.key, self.encrypt, self.window, self.remember = key, encrypt, window, remember
        self.peer_key = z85.decode(curve_keys(key, "peer")[0]) if encrypt else b""
        self.used: collections.OrderedDict[bytes, float] = collections.OrderedDict()  # token -> expiry

    def check(self, mechanism: bytes, credentials: list[bytes], now: float | None = None) -> str | None:
        """None if the connection may go on; else why not (for the master's log)."""
        if self.encrypt:
            if mechanism != b"CURVE":
                return f"a {mechanism.decode(errors='replace')} connection to an encrypted master"
            if not credentials or not hmac.compare_digest(credentials[0], self.peer_key):
                return "an unknown CurveZMQ key (another cluster key)"
            return None
        if mechanism != b"PLAIN" or len(credentials) != 2:
            return f"a {mechanism.decode(errors='replace')} connection without a cw token"
        user, password = credentials
        if not hmac.compare_digest(password, _sign(self.key, user)):
            return "a token signed with another key"
        parts = user.split(b" ")
        now = time.time() if now is None else now
        try:
            skew = int(parts[1]) - now
        except (IndexError, ValueError):
            return "a malformed token"
        if abs(skew) > self.window:
            return (f"a token from a clock {skew:+.0f} s off this host's (more than {self.window:.0f} s):"
                    " synchronize the clocks (NTP)")  # fmt: skip
        if user in self.used:
            return "a token used before (a replayed connection)"
        self._forget(now)
        self.used[user] = now + 2 * self.window
        return None

    def _forget(self, now: float) -> None:
        used = self.used
        while used and (next(iter(used.values())) < now or len(used) >= self.remember):
            used.popitem(last=False)
