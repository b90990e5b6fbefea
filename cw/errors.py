"""Every exception cw raises, each with a message a user can act on."""

from __future__ import annotations

import shlex
import signal
import subprocess

from .defaults import STDERR_LINES


class CwError(Exception):
    """Base class of all cw errors."""


class ConfigError(CwError):
    """The cluster directory, key or an option is missing or malformed."""


class NoMasterError(CwError, ConnectionError):
    """No master answered at the address that was tried, before the deadline."""


class AuthenticationError(CwError):
    """The master rejected our messages: the secret keys differ."""


class InvalidJobError(CwError, ValueError, TypeError):
    """A job's options are malformed (``requires=``, ``timeout=``, ``max_retries=``,
    ``output_limit=``): refused at submit, before anything is sent; the message says which
    option and what it takes. A ValueError and a TypeError too."""


class ClientError(CwError, RuntimeError):
    """The client cannot go on: it is closed, or its connection failed for good."""


class ProtocolError(CwError):
    """A message could not be decoded (bad frames, bad version, bad MAC)."""


class BadMAC(ProtocolError):
    """The MAC does not verify: the sender's key is not ours (or the bytes were changed)."""


class BadDigest(ProtocolError):
    """A large blob does not match the SHA-256 its signed header gives (changed on the way)."""


class Replayed(ProtocolError):
    """A message whose sequence number was seen already on its session: replayed, or stale."""


class StoreReplacedError(ClientError):
    """The master now serves another store: jobs submitted to the one it replaced are gone."""


class SerializationError(CwError, TypeError):
    """A function, argument or result could not be pickled or unpickled."""


class NeedsReferences(SerializationError):
    """An object that travels only by reference (a cw Future, scattered data) was pickled outside
    a job's arguments; within them, the client pickles it as a reference."""


class RemoteImportError(CwError, ImportError):
    """A worker could not import the job's function, or a class its arguments need."""


class MessageTooLargeError(CwError, ValueError):
    """A job's arguments or result exceed the largest message the cluster accepts."""


class JobCrashedError(CwError):
    """The process running the job died (signal or exit code); the job did not return."""


class WorkerLostError(CwError):
    """The job lost its worker more times than it may be retried."""


class TimeoutError(CwError, TimeoutError):  # noqa: A001 - cw's typed subclass of the builtin
    """A job ran past its timeout and was killed, or a wait ran out."""


class UnsatisfiableError(CwError):
    """No connected worker could ever run the job (its requirements), for longer than the
    client's ``unsatisfiable_timeout``: the message lists what each worker offers."""


class RemoteTraceback(Exception):
    """Holds the traceback text of an exception raised on a worker.

    Attached as ``__cause__`` of the re-raised exception, so Python prints the
    remote traceback above the local one, as concurrent.futures does.
    """

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class StoreError(CwError):
    """The store cannot be used: disk full, I/O error, read-only, damaged, or a newer schema.

    ``reason`` says which, in a word ("damaged", "full", "read-only", "io", "moved"),
    when it is known; ``reported`` is true once the master has logged it.
    """

    reported = False

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason

    # SQLite's primary result codes (the low byte of sqlite_errorcode, Python 3.11+)
    _CODES = {11: "damaged", 26: "damaged", 13: "full", 8: "read-only", 10: "io", 14: "io"}
    _WORDS = (("malformed", "damaged"), ("not a database", "damaged"), ("disk is full", "full"),
              ("no space left", "full"), ("readonly", "read-only"), ("read-only", "read-only"))  # fmt: skip

    @classmethod
    def describe(cls, path: object, e: BaseException) -> StoreError:
        """A StoreError naming the store, what is wrong with it, and what to do."""
        text = str(e)
        reason = cls._CODES.get((getattr(e, "sqlite_errorcode", None) or 0) & 0xFF)
        reason = reason or next((r for w, r in cls._WORDS if w in text.lower()), None)
        if reason == "damaged":
            what = ("is damaged ({}). `cw store check` tells what is wrong; `cw store recover`"
                    " rebuilds it with SQLite's own .recover and keeps the damaged file beside it")  # fmt: skip
        elif reason == "full":
            what = ("cannot grow: disk full ({}). Nothing committed is lost: free space on its"
                    " filesystem and start the master again")  # fmt: skip
        elif reason == "read-only":
            what = ("is read-only ({}): the master writes it, and the -wal and -shm files beside"
                    " it; make the file and its directory writable by this user")  # fmt: skip
        elif reason == "io":
            what = "cannot be read or written ({}): check its disk and filesystem"
        else:
            return cls(f"store {path}: {text}")
        return cls(f"the store {path} {what.format(text)}", reason)


class StoreConflict(StoreError):
    """A write broke one of the store's rules (a job stored twice): the request is bad, the store is fine."""


class OutputsError(CwError, OSError):
    """A job's scratch or outputs directory cannot be used, or its outputs cannot be archived
    (disk full, permission): the message says which file and where."""


class OutputsPatternError(CwError, ValueError):
    """An ``outputs=`` glob would reach outside the directory the job runs in (an absolute
    pattern, or one with ``..``): refused when the job is submitted."""


class SchedulerError(CwError):
    """A scheduler command failed or could not be run (sbatch, qsub, ...)."""


class JobError(CwError):
    """A job raised an exception that could not be re-created on the client."""


class CommandError(CwError, subprocess.CalledProcessError):
    """A shell-command job exited with a non-zero code (or was killed by a signal).

    A :class:`subprocess.CalledProcessError` too: ``returncode``, ``cmd``,
    ``stdout`` and ``stderr`` (the tails the job kept), and ``host``, where it ran.
    """

    def __init__(self, returncode: int, cmd: object, stdout: str | None = None,
                 stderr: str | None = None, host: str | None = None):  # fmt: skip
        subprocess.CalledProcessError.__init__(self, returncode, cmd, stdout, stderr)
        self.host = host
        self.args = (returncode, cmd, stdout, stderr, host)  # what pickle rebuilds it from

    def __str__(self) -> str:
        shown = self.cmd if isinstance(self.cmd, str) else shlex.join(map(str, self.cmd))
        if self.returncode < 0:
            try:
                how = f"was killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                how = f"was killed by signal {-self.returncode}"
        else:
            how = f"exited with code {self.returncode}"
        text = f"command {shown!r} {how}{f' on {self.host}' if self.host else ''}"
        lines = (self.stderr or "").rstrip("\n").splitlines()
        if lines:
            text += "; its stderr ends:\n" + "\n".join(
                "  " + line for line in lines[-STDERR_LINES :])
        else:
            text += " (its stderr is empty)"
        return text


class SetupError(CwError):
    """A job set's setup step failed on a worker: the jobs of that run fail there with it,
    and `cw run-file` stops the set, saying so once."""

    @classmethod
    def of(cls, run: str, returncode: int, stderr: str, host: str) -> SetupError:
        lines = (stderr or "").rstrip("\n").splitlines()[-STDERR_LINES:]
        tail = "; its stderr ends:\n" + "\n".join("  " + line for line in lines) if lines else " (its stderr is empty)"
        return cls(f"the setup of run {run!r} failed on {host} (exit code {returncode}){tail}")


class DependencyError(CwError):
    """An input of the job (a future passed as one of its arguments) did not succeed.

    ``jobid`` is the failed input's ``Future.jobid`` (its id in the store) when it
    is this client's, None when it belongs to another client; ``job`` its id in
    the store; ``error`` the exception that input raised (or the error
    that stopped it: crashed, lost, timed out). The job itself never ran.
    """

    def __init__(self, message: str, jobid: int | None = None, job: int | None = None,
                 error: BaseException | None = None):  # fmt: skip
        super().__init__(message)
        self.jobid, self.job, self.error = jobid, job, error

    def __reduce__(self):
        return (type(self), (str(self), self.jobid, self.job, self.error))
