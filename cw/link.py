"""A peer's connection to the master: one DEALER socket, found, gated, in session, kept alive.

The worker agent and the client's I/O thread each hold one :class:`Link` and
drive it from their own loop: they poll its sockets (:meth:`Link.readable`),
take verified messages from :meth:`Link.recv`, speak with :meth:`Link.send`,
and call :meth:`Link.keep_alive` once a turn, which reconnects with backoff
when the master falls silent (re-reading master.json: a restarted master may
have moved).

Each ZeroMQ connection passes the master's gate (a one-time token, or
CurveZMQ: :mod:`cw.security`), then opens a session: OPEN with our nonce,
CHALLENGE with the master's, and from then on every message both ways is
signed with the session's key under a strictly increasing sequence number
(:class:`cw.protocol.Channel`). A new connection (the master restarted, the
network broke) is a new session; nothing queued for the old one is sent.

:func:`ask` is the one-shot form: a single request answered by STATUS
(`cw status`, ``Client.status()``, the launchers).
"""

from __future__ import annotations

import logging
import struct
import time
from typing import Any, Callable, Iterator, Sequence

import zmq

from . import defaults
from . import protocol as P
from .discovery import ClusterDir, resolve_address
from .errors import AuthenticationError, ConfigError, NoMasterError, ProtocolError
from .security import secure_client

log = logging.getLogger(__name__)

_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
           | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)  # fmt: skip
_EVENT = struct.Struct("=Hi")
# plain ints: an enum's & costs microseconds, on every message
_POLLIN, _EVENTS_OPT = int(zmq.POLLIN), int(zmq.EVENTS)
_SNDMORE, _RCVMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.RCVMORE), int(zmq.NOBLOCK)


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


def send_frames(sock: zmq.Socket, frames: Sequence[Any], flags: int = 0, copy: bool = True) -> None:
    """``sock.send_multipart(frames, flags, copy=copy)``, at a quarter of its cost: pyzmq
    combines the flags of every frame as enums, some 3 us a frame (a message has 6 or more).

    A message is atomic in libzmq: once its first frame is taken, so are the others.
    """
    send, more, last = sock.send, flags | _SNDMORE, len(frames) - 1
    for i in range(last):
        send(frames[i], more, copy=copy)
    send(frames[last], flags, copy=copy)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[bytes]:
    """``sock.recv_multipart(flags)`` with plain-int options (see :func:`send_frames`)."""
    recv, more = sock.recv, sock.getsockopt
    frames = [recv(flags)]
    while more(_RCVMORE):
        frames.append(recv(flags))
    return frames


def recv_routed(sock: zmq.Socket, flags: int = 0) -> list[Any]:
    """A ROUTER's :func:`recv_frames` (routing id, head, blobs) that leaves large blobs
    where libzmq put them (memoryviews, not copies) when the head says it carries some
    (digests, ``"h":[``: only a hint, the MAC decides); the receiver copies them once."""
    recv, more = sock.recv, sock.getsockopt
    frames = [recv(flags)]
    if more(_RCVMORE):
        frames.append(recv(flags))
        if b'"h":[' not in frames[1]:
            while more(_RCVMORE):
                frames.append(recv(flags))
            return frames
        large = defaults.LARGE_BLOB_BYTES
        while more(_RCVMORE):
            f = recv(flags, copy=False)
            frames.append(f.buffer if len(f) >= large else f.bytes)
    return frames


class Link:
    """A DEALER to the master that opens a session on every connection, reconnects with
    backoff and understands refusals.

    ``hello`` is called once each session is open: the owner introduces itself
    there. A refusal of our key (the gate, or a REJECT) before the first
    WELCOME raises :class:`AuthenticationError` from :meth:`recv` or
    :meth:`keep_alive`; after it, another master has taken the address, so the
    link looks for ours again.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        poller: zmq.Poller,
        key: bytes,
        cluster: ClusterDir | None,
        explicit: str | None,
        *,
        who: str,
        hello: Callable[[], None],
        master_timeout: float = defaults.MASTER_TIMEOUT,
        give_up: float | None = None,
        max_message: int = defaults.MAX_MESSAGE,
        linger: int = 1000,
        encrypt: bool | None = None,
    ):
        self.ctx, self.poller, self.key = ctx, poller, key
        self.cluster, self.explicit, self.who, self.hello = cluster, explicit, who, hello
        self.master_timeout, self.give_up = master_timeout, give_up
        self.max_message, self.linger = max_message, linger
        self.encrypt = cluster.encrypted() if encrypt is None and cluster is not None else bool(encrypt)
        self.bad = RateLimited(log, "dropped bad messages from the master")
        self.sock: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.address = self._resolve()
        if self.address is None:
            where = self.cluster.path if self.cluster else "the cluster directory"
            raise ConfigError(f"no master address: none given, no master.json in {where}")
        self.channel: P.Channel | None = None  # the session of the current connection, once open
        self._nonces: list[bytes] = []  # our OPENs not answered yet
        self._opened = 0.0
        self._handshaken = False  # some connection of this socket passed the gate
        self.welcomed = False  # the current session has been welcomed
        self.ever_welcomed = False
        self.last_heard = self.last_sent = time.monotonic()
        self._lost_since: float | None = None
        self._retry_at = self._looked = 0.0
        self._backoff = defaults.BACKOFF

    def _resolve(self) -> str | None:
        if self.cluster is None:
            return self.explicit
        return resolve_address(self.explicit, self.cluster)

    # -- the socket -----------------------------------------------------------------
    def connect(self) -> None:
        """(Re)connect to the master's current address with a fresh socket and token; the
        session opens once the connection passes the master's gate."""
        self.address = self._resolve() or self.address
        self._close_sockets(0)
        sock = self.sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, self.linger)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message + defaults.HEADER_ROOM)
        # flow control is by acknowledgements and credit, never by dropping; and nothing
        # waits for a connection: a message signed for a session is no use to another one
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        secure_client(sock, self.key, self.encrypt)
        self.monitor = sock.get_monitor_socket(_EVENTS)
        sock.connect(self.address)
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.channel, self._nonces, self._handshaken = None, [], False
        self.welcomed = False

    def readable(self, events: Any) -> bool:
        """Whether a poll's events concern this link (its socket or its monitor)."""
        return self.sock in events or self.monitor in events

    @property
    def ready(self) -> bool:
        """A session is open: :meth:`send` sends."""
        return self.channel is not None

    def send(self, kind: bytes, header: Any = None, blobs: Sequence[bytes] = ()) -> bool:
        """Sign and send on the session; False (nothing sent) while none is open."""
        ch = self.channel
        if ch is None:
            return False
        frames = ch.pack(kind, header, blobs)
        try:
            send_frames(self.sock, frames, _NOBLOCK, sum(map(len, blobs)) < defaults.ZERO_COPY_BYTES)
        except zmq.Again:  # the connection just went: so did its session
            return False
        self.last_sent = time.monotonic()
        return True

    def _open(self) -> None:
        """Open a session on the current connection: OPEN with a fresh nonce."""
        n = P.nonce()
        self._nonces = [*self._nonces[-3:], n]
        self._opened = time.monotonic()
        try:
            self.sock.send_multipart(P.open_message(self.key, n), zmq.NOBLOCK)
        except zmq.Again:
            pass  # no connection: the next one opens its own

    def recv(self) -> Iterator[tuple[bytes, dict, list[bytes]]]:
        """Every verified message waiting on the socket: (kind, header, blobs)."""
        self._events()
        # asking is cheaper than the exception of an empty socket (and the owner may
        # replace the socket between two messages)
        while (sock := self.sock) is not None and sock.getsockopt(_EVENTS_OPT) & _POLLIN:
            frames = recv_frames(sock, _NOBLOCK)
            ch = self.channel
            if ch is not None:
                try:
                    kind, header, blobs = ch.unpack(frames)
                except ProtocolError:
                    pass  # perhaps the master's word outside our session: see below
                else:
                    self.last_heard = time.monotonic()
                    self._lost_since, self._backoff = None, defaults.BACKOFF
                    if kind == P.WELCOME:
                        self.welcomed = self.ever_welcomed = True
                    yield kind, header, blobs
                    continue
            if not self._outside_session(frames):
                return

    def _outside_session(self, frames: list[bytes]) -> bool:
        """A message not of our session: CHALLENGE, a BYE asking for a new session, a
        REJECT, or something to drop. False when the link dropped its connection."""
        why = P.is_reject(frames)
        if why is not None:
            self._refused(why)
            return False
        try:
            kind, header, _ = P.unpack(self.key, frames, 0, defaults.OPEN_MESSAGE)
        except ProtocolError as e:
            self.bad(str(e))
            return True
        now = time.monotonic()
        if kind == P.CHALLENGE:
            ch = P.accept_challenge(self.key, header, self._nonces)
            if ch is None:
                self.bad("a CHALLENGE to no OPEN of ours (replayed?)")
                return True
            self.channel, self._nonces, self.welcomed = ch, [], False
            self.last_heard = now
            self.hello()
        elif kind == P.BYE and header.get("rehello"):
            # the master knows no session of ours (it restarted, or forgot us): open one
            self.last_heard = now
            if self.channel is not None or now - self._opened > defaults.HANDSHAKE_RETRY:
                self.channel, self.welcomed = None, False
                self._open()
        else:
            self.bad(f"a {kind.decode(errors='replace')} signed with the cluster key")
        return True

    def _events(self) -> None:
        """What happened to the connection: passed the gate (open a session), refused, gone."""
        while self.monitor is not None and self.monitor.getsockopt(_EVENTS_OPT) & _POLLIN:
            kind, value = _EVENT.unpack(self.monitor.recv_multipart()[0][:6])
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshaken = True
                self.channel, self.welcomed, self._nonces = None, False, []
                self._open()
            elif kind == zmq.EVENT_DISCONNECTED:
                self.channel, self.welcomed = None, False  # the session died with its connection
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                if value == 300:  # the master is full: libzmq tries again by itself
                    log.warning("master at %s refuses new connections for now (too many open)", self.address)
                elif self._handshaken:  # our token was used: the next connection needs a new one
                    self.drop()
                    return
                else:
                    self._refused("the master's gate refused our token or key")
                    return
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self.bad(f"the ZeroMQ handshake with {self.address} failed: is the master"
                         f" {'not ' if self.encrypt else ''}encrypted (cw master --encrypt)?")  # fmt: skip

    def _refused(self, why: str) -> None:
        if not self.ever_welcomed:
            where = f" (key file {self.cluster.key_path})" if self.cluster else ""
            raise AuthenticationError(
                f"the master at {self.address} rejected {self.who}'s key ({why}): use the master's"
                f" cluster directory{where}, or its CW_KEY; if the key is right, this host's clock"
                f" may be more than {defaults.TOKEN_WINDOW:.0f} s off the master's"
            )
        log.warning("master at %s rejects our key now (%s): looking for ours", self.address, why)
        self.drop()

    def drop(self) -> None:
        """The master is gone (BYE, or another master at its address): reconnect at once
        the first time; while no master has answered since, with backoff (another master
        holding the address refuses each connection at once: no loop)."""
        self.welcomed = False
        self.channel = None
        self.last_heard = time.monotonic() - self.master_timeout - 1
        if self._lost_since is None:
            self._retry_at = 0.0

    def keep_alive(self, now: float) -> bool:
        """Reconnect, with backoff, once the master has been silent too long; open the
        session again if an OPEN went unanswered.

        False once it has been unreachable for ``give_up`` seconds. Raises
        AuthenticationError if the master's gate refuses our key before any WELCOME.
        """
        self._events()
        if (self.channel is None and self._handshaken and self.sock is not None
                and now - self._opened > defaults.HANDSHAKE_RETRY):  # fmt: skip
            self._open()
        if now - self.last_heard <= self.master_timeout:
            return True
        if now < self._retry_at and not self._moved(now):
            return True
        self._lost_since = self._lost_since or self.last_heard
        if self.give_up is not None and now - self._lost_since > self.give_up:
            log.error("master %s unreachable for %.0f s: giving up", self.address, now - self._lost_since)
            return False
        log.warning("master %s silent for %.0f s: reconnecting (next try in %.0f s)",
                    self.address, now - self._lost_since, self._backoff)  # fmt: skip
        self.connect()
        self._retry_at = now + self._backoff
        self._backoff = min(2 * self._backoff, defaults.BACKOFF_MAX)
        return True

    def _moved(self, now: float) -> bool:
        """While the master is lost, whether it published another address (a master
        restarted on another port): then there is no waiting out the backoff. Looked at
        once a second at most."""
        if self.cluster is None or now < self._looked + 1.0:
            return False
        self._looked = now
        return self._resolve() not in (None, self.address)

    def _close_sockets(self, linger: int) -> None:
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.disable_monitor()
            self.sock.close(linger=linger)
            self.sock = None
        if self.monitor is not None:
            self.poller.unregister(self.monitor)
            self.monitor.close(linger=0)
            self.monitor = None

    def close(self, linger: int | None = None) -> None:
        self._close_sockets(self.linger if linger is None else linger)


# ---------------------------------------------------------------------- one request
def ask(address: str, key: bytes, kind: bytes, header: dict, timeout: float = 5.0,
        encrypt: bool = False) -> dict:  # fmt: skip
    """One request to a live master on a session of its own, answered by a STATUS message."""
    ctx = zmq.Context()
    poller = zmq.Poller()
    link = Link(ctx, poller, key, None, address, who="this request", master_timeout=timeout,
                hello=lambda: link.send(kind, header), linger=200, encrypt=encrypt)  # fmt: skip
    try:
        link.connect()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoMasterError(f"no answer from a master at {address} within {timeout} s")
            events = dict(poller.poll(min(100, max(1, int(left * 1000)))))
            if link.readable(events):
                for got, h, _ in link.recv():
                    if got == P.STATUS:
                        link.send(P.BYE)  # the session ends here
                        return h
    finally:
        link.close()
        ctx.term()


def query_status(address: str, key: bytes, timeout: float = 5.0, encrypt: bool = False) -> dict:
    """A live master's status document."""
    return ask(address, key, P.STATUS, {}, timeout, encrypt)
