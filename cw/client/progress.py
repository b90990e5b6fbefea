"""Progress bars (``progress=True``): jobs done, failed and left, and the rate.

``tqdm.auto`` draws a widget in Jupyter and a text bar in a terminal. tqdm is
imported only when a bar is asked for, and futures get a done-callback only
then: with ``progress=False`` nothing here runs.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any, Iterable


def new_bar(total: int, desc: str = "jobs") -> Any:
    """A tqdm.auto bar counting jobs, showing how many failed beside the rate."""
    from tqdm.auto import tqdm  # only when a bar is asked for

    bar = tqdm(total=total, desc=desc, unit="job", dynamic_ncols=True, smoothing=0.1)
    bar.set_postfix_str("0 failed", refresh=False)
    return bar


class Progress:
    """A bar fed by the futures' completions (called back on the client's I/O thread)."""

    def __init__(self, futures: Iterable[cf.Future], desc: str = "jobs"):
        futures = list(futures)
        self.failed = 0
        self.done = 0
        self._lock = threading.Lock()
        self.bar = new_bar(len(futures), desc)
        self.total = len(futures)
        if not futures:
            self.close()
        for f in futures:
            f.add_done_callback(self._one)

    def _one(self, f: cf.Future) -> None:
        failed = f.cancelled() or f.exception() is not None
        with self._lock:
            self.done += 1
            if failed:
                self.failed += 1
                self.bar.set_postfix_str(f"{self.failed} failed", refresh=False)
            self.bar.update(1)
            if self.done >= self.total:
                self.bar.close()

    def close(self) -> None:
        """Stop drawing (the bar stays on screen where it got to)."""
        with self._lock:
            self.bar.close()


def track(futures: Iterable[cf.Future], desc: str = "jobs") -> Progress:
    """A bar for these futures; it closes by itself when the last one is done."""
    return Progress(futures, desc)
