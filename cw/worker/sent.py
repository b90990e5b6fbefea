"""Results a worker sent since it last heard from the master: sent again after a broken link.

A master killed (or stopped) right after a worker's RESULT may never have
stored it. The agent keeps its recent successes (failures are not kept: `cw
retry` may run their jobs again, and an old failure must not answer for
them), names them in its next HELLO's ``holding`` and sends them again after
WELCOME; a master that has them already ignores them.
"""

from __future__ import annotations

import collections
from typing import Deque

from .. import defaults
from .. import protocol as P


class SentResults:
    """(when, WorkerResult row, blob, what it archived) of recent successes, bounded in age and bytes."""

    def __init__(self):
        self.items: Deque[tuple] = collections.deque()
        self.size = 0

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, now: float, rows: list, blobs: list[bytes], files: list = ()) -> None:
        """Keep the successes among these rows (``files``: RESULT ``o`` rows, what jobs archived)."""
        archived = {f[0]: f for f in files} if files else {}
        for row, blob in zip(rows, blobs):
            if row[1] == P.OK:
                self.items.append((now, row, blob, archived.get(row[0])))
                self.size += len(blob)
        items = self.items
        while items and (now - items[0][0] > defaults.RESULT_RESEND_SECONDS
                         or self.size > defaults.RESULT_RESEND_BYTES):  # fmt: skip
            self.size -= len(items.popleft()[2])

    def since(self, heard: float, heartbeat: float) -> list[int]:
        """Keep those sent after the master was last heard from (less two heartbeats: what it
        read in its last turn may not be committed); their job ids."""
        items, cutoff = self.items, heard - 2 * heartbeat
        while items and items[0][0] < cutoff:
            self.size -= len(items.popleft()[2])
        return [r[1][0] for r in items]

    def batches(self):
        """(rows, blobs, archived outputs) to send again, in batches."""
        items = list(self.items)
        for part in P.batches([len(r[2]) for r in items]):
            yield ([r[1] for r in items[part]], [r[2] for r in items[part]],
                   [r[3] for r in items[part] if r[3] is not None])  # fmt: skip
