"""The wire: signing, verification, and refusal of anything unverified."""

import json

import pytest

from cw import protocol as P
from cw.errors import ProtocolError

KEY = b"k" * 32


def test_round_trip():
    frames = P.pack(KEY, P.SUBMIT, {"j": [[0, "h", None, None]]}, [b"args", b"fn"])
    kind, header, blobs = P.unpack(KEY, frames)
    assert kind == P.SUBMIT
    assert header == {"j": [[0, "h", None, None]]}
    assert blobs == [b"args", b"fn"]


def test_wrong_key_is_refused():
    frames = P.pack(b"x" * 32, P.HELLO, {"role": "client"})
    with pytest.raises(ProtocolError, match="bad MAC"):
        P.unpack(KEY, frames)


@pytest.mark.parametrize("i", [1, 3, 4])
def test_any_changed_frame_is_refused(i):
    frames = P.pack(KEY, P.RESULT, {"r": []}, [b"blob"])
    frames[i] = frames[i] + b"!"
    with pytest.raises(ProtocolError):
        P.unpack(KEY, frames)


def test_frame_boundaries_are_signed():
    """Moving bytes between header and blob must break the MAC (lengths are signed)."""
    frames = P.pack(KEY, P.RESULT, {"r": []}, [b"ab"])
    moved = frames[:3] + [frames[3] + b"a", b"b"]
    with pytest.raises(ProtocolError):
        P.unpack(KEY, moved)


def test_version_and_truncation():
    frames = P.pack(KEY, P.HELLO, {})
    with pytest.raises(ProtocolError, match="version"):
        P.unpack(KEY, [b"XX9", *frames[1:]])
    with pytest.raises(ProtocolError, match="frames"):
        P.unpack(KEY, frames[:3])


def test_header_is_parsed_only_after_the_mac(monkeypatch):
    calls = []
    monkeypatch.setattr(P.json, "loads", lambda s: calls.append(s) or json.loads(s))
    bad = P.pack(b"x" * 32, P.HELLO, {"a": 1})
    with pytest.raises(ProtocolError):
        P.unpack(KEY, bad)
    assert calls == []


def test_reject_is_recognised():
    assert P.is_reject(P.reject("bad MAC")) == "bad MAC"
    assert P.is_reject(P.pack(KEY, P.HELLO, {})) is None
