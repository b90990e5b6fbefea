"""Speaking the wire by hand, and listening to it: a raw peer, a capturing proxy, ZMTP frames."""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time

import zmq

from cw import protocol as P
from cw.security import secure_client


class RawPeer:
    """A DEALER that passes the master's gate (with the key) and opens a session by hand."""

    def __init__(self, ctx: zmq.Context, address: str, key: bytes, *, gate_key: bytes | None = None,
                 encrypt: bool = False, hwm: int = 0):  # fmt: skip
        self.key = key
        s = self.sock = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.RCVHWM, hwm)
        if gate_key is not None:
            secure_client(s, gate_key, encrypt)
        s.connect(address)
        self.channel: P.Channel | None = None

    def open(self, timeout: float = 10.0) -> P.Channel:
        """OPEN, then wait for the CHALLENGE: the session's channel."""
        n = P.nonce()
        self.sock.send_multipart(P.open_message(self.key, n))
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.sock.poll(100):
                kind, h, _ = P.unpack(self.key, self.sock.recv_multipart())
                if kind == P.CHALLENGE:
                    self.channel = P.accept_challenge(self.key, h, [n])
                    assert self.channel is not None
                    return self.channel
        raise AssertionError("no CHALLENGE from the master")

    def send(self, kind: bytes, header: dict | None = None, blobs=()) -> None:
        self.sock.send_multipart(self.channel.pack(kind, header, blobs))

    def read(self, want: bytes, timeout: float = 10.0):
        """(header, blobs) of the next message of kind ``want`` on our session, or None."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.sock.poll(100):
                frames = self.sock.recv_multipart()
                try:
                    kind, h, blobs = self.channel.unpack(frames)
                except Exception:
                    continue
                if kind == want:
                    return h, blobs
        return None

    def close(self) -> None:
        self.sock.close(linger=0)


# -- listening to the wire ------------------------------------------------------------
class Tap:
    """A TCP proxy on loopback that records every byte both ways, per connection: what an
    attacker on the network would capture."""

    def __init__(self, target: str):
        host, port = target[len("tcp://") :].rsplit(":", 1)
        self.target = (host if host not in ("*", "") else "127.0.0.1", int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.streams: list[dict[str, bytearray]] = []  # per connection: "up" (to the master), "down"
        self._stop = False
        self._sel = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.listener.setblocking(False)
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        while not self._stop:
            for key, _ in self._sel.select(0.1):
                if key.data is None:
                    client, _ = self.listener.accept()
                    upstream = socket.create_connection(self.target)
                    rec = {"up": bytearray(), "down": bytearray()}
                    self.streams.append(rec)
                    self._sel.register(client, selectors.EVENT_READ, (upstream, rec["up"]))
                    self._sel.register(upstream, selectors.EVENT_READ, (client, rec["down"]))
                    continue
                other, buf = key.data
                try:
                    data = key.fileobj.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    for s in (key.fileobj, other):
                        try:
                            self._sel.unregister(s)
                        except (KeyError, ValueError):
                            pass
                        s.close()
                    continue
                buf += data
                other.sendall(data)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.listener.close()


def zmtp_messages(stream: bytes) -> list[list[bytes]]:
    """The messages of one direction of a ZMTP 3 connection (commands and greeting skipped)."""
    out, frames, i = [], [], 64  # the greeting is 64 bytes
    while i < len(stream):
        flags = stream[i]
        if flags & 0x02:
            size, i = int.from_bytes(stream[i + 1 : i + 9], "big"), i + 9
        else:
            size, i = stream[i + 1], i + 2
        body, i = bytes(stream[i : i + size]), i + size
        if flags & 0x04:  # a command: the handshake (PLAIN, READY), heartbeats
            continue
        frames.append(body)
        if not flags & 0x01:
            out.append(frames)
            frames = []
    return out


def raw_connection(address: str) -> socket.socket:
    """A plain TCP connection to a tcp:// address."""
    host, port = address[len("tcp://") :].rsplit(":", 1)
    return socket.create_connection(("127.0.0.1" if host in ("*", "") else host, int(port)))


def junk(n: int) -> bytes:
    return os.urandom(n)
