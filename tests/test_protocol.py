"""The wire: signing, verification, and refusal of anything unverified."""

import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest

from cw import protocol as P
from cw.errors import BadDigest, ProtocolError

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


@pytest.mark.parametrize("where", ["version", "mac", "seq", "kind", "header", "added", "blob"])
def test_any_changed_byte_is_refused(where):
    frames = P.pack(KEY, P.RESULT, {"r": []}, [b"blob"])
    head = bytearray(frames[0])
    at = {"version": 0, "mac": 3, "seq": 40, "kind": 45, "header": len(head) - 2}.get(where)
    if at is not None:
        head[at] ^= 1
    elif where == "added":
        head += b" "
    frames[0] = bytes(head)
    if where == "blob":
        frames[1] = b"blob!"
    with pytest.raises(ProtocolError):
        P.unpack(KEY, frames)


def test_frame_boundaries_are_signed():
    """Moving bytes between header and blob must break the MAC (lengths are signed)."""
    frames = P.pack(KEY, P.RESULT, {"r": []}, [b"ab"])
    moved = [frames[0] + b"a", b"b"]
    with pytest.raises(ProtocolError):
        P.unpack(KEY, moved)


def test_version_and_truncation():
    frames = P.pack(KEY, P.HELLO, {})
    with pytest.raises(ProtocolError, match="version"):
        P.unpack(KEY, [b"XX9" + frames[0][3:]])
    with pytest.raises(ProtocolError, match="malformed"):
        P.unpack(KEY, [frames[0][:30]])
    with pytest.raises(ProtocolError, match="empty"):
        P.unpack(KEY, [])


def test_header_is_parsed_only_after_the_mac(monkeypatch):
    calls = []
    monkeypatch.setattr(P.json, "loads", lambda s: calls.append(s) or json.loads(s))
    bad = P.pack(b"x" * 32, P.HELLO, {"a": 1})
    with pytest.raises(ProtocolError):
        P.unpack(KEY, bad)
    assert calls == []


def test_large_blobs_travel_by_signed_digest():
    """A large blob is signed by its SHA-256 in the header: a changed byte, a missing
    or extra digest, are refused; a relay (keep=True) gets it with its digest and sends
    it on without hashing it again."""
    big, small = bytes(range(256)) * 512, b"args"  # 128 KiB, over defaults.LARGE_BLOB_BYTES
    frames = P.Channel(KEY).pack(P.SUBMIT, {"j": []}, [small, big])
    header = header_of(frames)
    assert header["h"] == [hashlib.sha256(big).hexdigest()]
    kind, header, blobs = P.Channel(KEY).unpack(frames)
    assert header == {"j": []} and blobs == [small, big] and type(blobs[1]) is bytes

    changed = [*frames[:2], big[:-1] + b"!"]  # the MAC holds (lengths); the digest does not
    with pytest.raises(BadDigest):
        P.Channel(KEY).unpack(changed)
    # a key holder's message with a large blob and no digest for it in the header
    bare = P._sealed(P._signer(KEY), P.SUBMIT, 1, P.encode_header({"j": []}), [small, big])
    with pytest.raises(ProtocolError, match="digests"):
        P.Channel(KEY).unpack(bare)

    relay_in, relay_out = P.Channel(KEY), P.Channel(KEY)
    _, _, kept = relay_in.unpack(frames, keep=True)
    assert isinstance(kept[1], P.Digested) and kept[1].digest == header_digest(frames)
    kept[1].digest = "0" * 64  # a relay signs the digest it holds: it does not hash again
    with pytest.raises(BadDigest):
        P.Channel(KEY).unpack(relay_out.pack(P.TASKS, {}, kept))
    assert pickle.loads(pickle.dumps(kept[1])) == big  # pickled, plain bytes


def header_of(frames):
    head = frames[0]
    return json.loads(head[44 + head[43] :])


def header_digest(frames):
    return header_of(frames)["h"][0]


def test_reject_is_recognised():
    assert P.is_reject(P.reject("bad MAC")) == "bad MAC"
    assert P.is_reject(P.pack(KEY, P.HELLO, {})) is None


# -- docs/protocol.md says what protocol.py does ---------------------------------------
DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def _top_level_fields(cell: str) -> tuple[str, ...]:
    """'`{role: "client", context: {cwd, path}, waiting?}`' -> ('role', 'context', 'waiting?')."""
    m = re.search(r"`([^`]*)`", cell)
    assert m, cell
    text = m.group(1).strip()
    assert text.startswith("{") and text.endswith("}"), cell
    fields, depth, token = [], 0, ""
    for ch in text[1:-1] + ",":
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if depth == 0 and ch == ",":
            name = token.split(":")[0].strip()
            if name:
                fields.append(name)
            token = ""
        elif depth == 0 or ch not in ",":
            token += ch
    return tuple(fields)


def _documented() -> list[tuple[str, str, bytes, tuple[str, ...], str]]:
    rows, hop = [], None
    for line in DOC.read_text().splitlines():
        m = re.match(r"### (\w+) → (\w+)$", line)
        if m:
            hop = (m.group(1).lower(), m.group(2).lower())
            continue
        if line.startswith("#"):
            hop = None
        if hop and line.startswith("| ") and not line.startswith(("| kind", "|---")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            kind, _, note = cells[0].partition(" (")
            rows.append((*hop, kind.encode(), _top_level_fields(cells[1]), note.rstrip(")")))
    return rows


def test_protocol_doc_lists_every_message_with_its_fields():
    documented = _documented()
    in_code = [(m.sender, m.receiver, m.kind, m.fields, m.note) for m in P.MESSAGES]
    assert documented, "no message tables found in docs/protocol.md"
    assert sorted(documented) == sorted(in_code)


def test_every_kind_is_documented_and_named():
    assert {m.kind for m in P.MESSAGES} == P.KINDS


def test_record_fields_are_the_documented_row_layouts():
    text = DOC.read_text()
    for rec, where in ((P.SubmitSpec, "j"), (P.TaskSpec, "t"), (P.TaskInputs, "i"), (P.WorkerResult, "r"), (P.ClientResult, "r")):
        row = "[" + ", ".join(rec._fields) + "]"
        assert f"{where}: [{row}, ...]" in text or f"{where}?: [{row}, ...]" in text, \
            f"docs/protocol.md lacks `{where}: [{row}, ...]`"
