"""The pipe from an agent to its executor: one batch a message, large blobs beside it.

A batch is pickled (protocol 5) with each large argument (``PickleBuffer``)
left out of band: the pickle goes first, prefixed by how many buffers follow,
then each buffer as a message of its own. A megabyte argument is so neither
copied into the agent's pickle nor out of the executor's: the executor
unpickles the batch around the very bytes it read from the pipe.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, Callable

from .. import defaults

_COUNT = struct.Struct("!I")


def out_of_band(blob: bytes) -> Any:
    """A blob as the batch should carry it: a large one by reference, out of band."""
    return pickle.PickleBuffer(blob) if len(blob) >= defaults.LARGE_BLOB_BYTES else blob


def send_batch(send: Callable[[Any], None], batch: Any) -> None:
    buffers: list = []
    data = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
    send(_COUNT.pack(len(buffers)) + data)
    for b in buffers:
        send(b.raw())


def recv_batch(recv: Callable[[], bytes]) -> tuple[Any, int]:
    """The next batch, and how many bytes it took (pickle and buffers)."""
    msg = recv()
    n = _COUNT.unpack_from(msg)[0]
    buffers = [recv() for _ in range(n)]
    return pickle.loads(memoryview(msg)[_COUNT.size :], buffers=buffers), len(msg) + sum(map(len, buffers))
