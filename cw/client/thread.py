"""``ClientThread``: the original Cluster-Workers API, ``callback(jobid, result)`` as jobs finish."""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from typing import Any, Callable

from ..command import run_command
from .client import Client, shell_job
from .progress import new_bar

log = logging.getLogger(__name__)


class ClientThread(threading.Thread):
    """The original Cluster-Workers API: ``callback(jobid, result)`` as jobs finish.

    ``start()`` connects, ``submit(func, *args, **kwargs)`` returns this thread's
    number for the job at once (0, 1, 2, ...: the ``jobid`` its callback gets, not
    the job's id in the store that error messages and ``cw logs`` show), ``wait()`` blocks until every submitted job has called back,
    ``stop()`` disconnects. Callbacks run on this thread, one at a time. A job
    that failed calls back with its exception as the result, unless an
    ``error_callback(jobid, exception)`` is given.
    """

    def __init__(self, callback: Callable[[int, Any], None], host: str | None = None,
                 port: int | None = None, *, error_callback: Callable | None = None,
                 **client_kwargs: Any):  # fmt: skip
        super().__init__(name="cw-callbacks", daemon=True)
        self.callback, self.error_callback = callback, error_callback
        self.address = f"{host}:{port}" if host and port else host
        self.client_kwargs = client_kwargs
        self.client: Client | None = None
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._outstanding = 0
        self._submitted = self._failed = 0  # for a progress bar
        self._idle = threading.Condition()

    def start(self) -> None:
        self.client = Client(self.address, **self.client_kwargs)
        super().start()

    def submit_shell(self, cmd: Any, **kwargs: Any) -> int:
        """Run a command on the cluster (see :meth:`cw.Client.submit_shell`); a job id at
        once. The callback gets its :class:`cw.CompletedCommand` (or its CommandError)."""
        options = {k: kwargs.pop(k) for k in ("key", "cache", "requires", "timeout", "max_retries", "output_limit")
                   if k in kwargs}
        args, kw = shell_job(cmd, **kwargs)
        if options.get("output_limit") is not None:
            kw["output_limit"] = int(options["output_limit"])
        return self._submit_job(run_command, args, kw, options)

    def submit(self, func: Callable, /, *args: Any, **kwargs: Any) -> int:
        return self._submit_job(func, args, kwargs, {})

    def _submit_job(self, func: Callable, args: tuple, kwargs: dict, options: dict) -> int:
        if self.client is None:
            raise RuntimeError("call start() before submit()")
        with self._idle:
            self._outstanding += 1
            self._submitted += 1
        try:
            return self.client._submit(func, args, kwargs, sink=self._deliver, **options).jobid
        except BaseException:
            with self._idle:
                self._outstanding -= 1
                self._submitted -= 1
            raise

    def _deliver(self, jobid: int, value: Any, failed: bool) -> None:
        self._done.put((jobid, value, failed))

    def run(self) -> None:
        while True:
            item = self._done.get()
            if item is None:
                return
            jobid, value, failed = item
            try:
                if failed and self.error_callback is not None:
                    self.error_callback(jobid, value)
                else:
                    self.callback(jobid, value)
            except Exception:
                log.error("callback for job %s raised:\n%s", jobid, traceback.format_exc())
            finally:
                with self._idle:
                    self._outstanding -= 1
                    self._failed += failed
                    self._idle.notify_all()

    def wait(self, timeout: float | None = None, progress: bool = False) -> bool:
        """Block until every submitted job has called back; False on timeout.

        ``progress=True`` draws a bar (tqdm.auto) over the jobs submitted so far:
        called back, failed, total and the rate.
        """
        if progress:
            return self._wait_with_bar(timeout)
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    def _wait_with_bar(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            base = self._submitted - self._outstanding  # called back before this wait
            failed0 = self._failed
            bar = new_bar(self._outstanding)
            try:
                while True:
                    done = self._submitted - self._outstanding - base
                    bar.total = self._submitted - base  # jobs submitted meanwhile count too
                    if self._failed > failed0:
                        bar.set_postfix_str(f"{self._failed - failed0} failed", refresh=False)
                    bar.update(done - bar.n)
                    if self._outstanding == 0:
                        return True
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._idle.wait(0.2 if left is None else min(0.2, left))
            finally:
                bar.close()

    def stdout(self, jobid: int) -> str | None:
        """What job ``jobid`` wrote to its stdout (the tail kept); None until it finished."""
        return self._client().output(jobid)[0]

    def stderr(self, jobid: int) -> str | None:
        """What job ``jobid`` wrote to its stderr (the tail kept); None until it finished."""
        return self._client().output(jobid)[1]

    def _client(self) -> Client:
        if self.client is None:
            raise RuntimeError("call start() first")
        return self.client

    def stop(self) -> None:
        """Disconnect; the callback thread ends after the callbacks already due."""
        self._done.put(None)
        if self.client is not None:
            self.client.close()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(10)
