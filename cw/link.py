"""A peer's connection to the master: one DEALER socket, found, signed, checked, kept alive.

The worker agent and the client's I/O thread each hold one :class:`Link` and
drive it from their own loop: they poll its socket, take verified messages
from :meth:`Link.recv`, speak with :meth:`Link.send`, and call
:meth:`Link.keep_alive` once a turn, which reconnects with backoff when the
master falls silent (re-reading master.json: a restarted master may have moved).

:func:`ask` is the one-shot form: a single signed request answered by STATUS
(`cw status`, ``Client.status()``, the launchers).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator, Sequence

import zmq

from . import defaults
from . import protocol as P
from .discovery import ClusterDir, resolve_address
from .errors import AuthenticationError, ConfigError, NoMasterError, ProtocolError

log = logging.getLogger(__name__)


class Link:
    """A DEALER to the master that reconnects with backoff and understands REJECT.

    ``hello`` is called after every (re)connection: the owner introduces
    itself there. A REJECT (the master could not verify us) before the first
    WELCOME raises :class:`AuthenticationError` from :meth:`recv`; after it,
    another master has taken the address, so the link looks for ours again.
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
    ):
        self.ctx, self.poller, self.key = ctx, poller, key
        self.cluster, self.explicit, self.who, self.hello = cluster, explicit, who, hello
        self.master_timeout, self.give_up = master_timeout, give_up
        self.max_message, self.linger = max_message, linger
        self.bad = P.RateLimited(log, "dropped bad messages from the master")
        self.sock: zmq.Socket | None = None
        self.address = self._resolve()
        if self.address is None:
            where = self.cluster.path if self.cluster else "the cluster directory"
            raise ConfigError(f"no master address: none given, no master.json in {where}")
        self.welcomed = False  # the current connection has been welcomed
        self.ever_welcomed = False
        self.last_heard = self.last_sent = time.monotonic()
        self._lost_since: float | None = None
        self._retry_at = 0.0
        self._backoff = defaults.BACKOFF

    def _resolve(self) -> str | None:
        if self.cluster is None:
            return self.explicit
        return resolve_address(self.explicit, self.cluster)

    # -- the socket -----------------------------------------------------------------
    def connect(self) -> None:
        """(Re)connect to the master's current address, then say hello."""
        self.address = self._resolve() or self.address
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close(linger=0)
        sock = self.sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, self.linger)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message + defaults.HEADER_ROOM)
        # flow control is by acknowledgements and credit, never by dropping
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(self.address)
        self.poller.register(sock, zmq.POLLIN)
        self.welcomed = False
        self.hello()

    def send(self, kind: bytes, header: Any = None, blobs: Sequence[bytes] = ()) -> None:
        frames = P.pack(self.key, kind, header, blobs)
        self.sock.send_multipart(frames, copy=sum(map(len, blobs)) < defaults.ZERO_COPY_BYTES)
        self.last_sent = time.monotonic()

    def recv(self) -> Iterator[tuple[bytes, dict, list[bytes]]]:
        """Every verified message waiting on the socket: (kind, header, blobs)."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                kind, header, blobs = P.unpack(self.key, frames)
            except ProtocolError as e:
                why = P.is_reject(frames)
                if why is None:
                    self.bad(str(e))
                    continue
                if not self.ever_welcomed:
                    where = f" (key file {self.cluster.key_path})" if self.cluster else ""
                    raise AuthenticationError(
                        f"the master at {self.address} rejected {self.who}'s key ({why}): use the"
                        f" master's cluster directory{where}, or its CW_KEY"
                    ) from None
                log.warning("master at %s rejects our key now (%s): looking for ours", self.address, why)
                self.drop()
                return
            self.last_heard = time.monotonic()
            self._lost_since, self._backoff = None, defaults.BACKOFF
            if kind == P.WELCOME:
                self.welcomed = self.ever_welcomed = True
            yield kind, header, blobs

    def drop(self) -> None:
        """The master is gone (BYE, or another master at its address): reconnect at once."""
        self.welcomed = False
        self.last_heard = time.monotonic() - self.master_timeout - 1
        self._retry_at = 0.0

    def keep_alive(self, now: float) -> bool:
        """Reconnect, with backoff, once the master has been silent too long.

        False once it has been unreachable for ``give_up`` seconds.
        """
        if now - self.last_heard <= self.master_timeout or now < self._retry_at:
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

    def close(self, linger: int | None = None) -> None:
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close(linger=self.linger if linger is None else linger)
            self.sock = None


# ---------------------------------------------------------------------- one request
def ask(address: str, key: bytes, kind: bytes, header: dict, timeout: float = 5.0) -> dict:
    """One signed request to a live master, answered by a STATUS message."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, defaults.MAX_MESSAGE + defaults.HEADER_ROOM)
    try:
        sock.connect(address)
        sock.send_multipart(P.pack(key, kind, header))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sock.poll(100):
                frames = sock.recv_multipart()
                why = P.is_reject(frames)
                if why:
                    raise AuthenticationError(f"the master at {address} rejected our key: {why}")
                got, h, _ = P.unpack(key, frames)
                if got == P.STATUS:
                    return h
        raise NoMasterError(f"no answer from a master at {address} within {timeout} s")
    finally:
        sock.close()
        ctx.term()


def query_status(address: str, key: bytes, timeout: float = 5.0) -> dict:
    """A live master's status document."""
    return ask(address, key, P.STATUS, {}, timeout)
