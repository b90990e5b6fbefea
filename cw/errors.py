"""Every exception cw raises, each with a message a user can act on."""

from __future__ import annotations


class CwError(Exception):
    """Base class of all cw errors."""


class ConfigError(CwError):
    """The cluster directory, key or an option is missing or malformed."""


class NoMasterError(CwError, ConnectionError):
    """No master answered at the address that was tried, before the deadline."""


class AuthenticationError(CwError):
    """The master rejected our messages: the secret keys differ."""


class ClientError(CwError, RuntimeError):
    """The client cannot go on: it is closed, or its connection failed for good."""


class ProtocolError(CwError):
    """A message could not be decoded (bad frames, bad version, bad MAC)."""


class BadMAC(ProtocolError):
    """The MAC does not verify: the sender's key is not ours (or the bytes were changed)."""


class SerializationError(CwError, TypeError):
    """A function, argument or result could not be pickled or unpickled."""


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
    """The store cannot be used: disk full, I/O error, read-only, corrupt, or a newer schema."""


class StoreConflict(StoreError):
    """A write broke one of the store's rules (a job stored twice): the request is bad, the store is fine."""


class SchedulerError(CwError):
    """A scheduler command failed or could not be run (sbatch, qsub, ...)."""


class JobError(CwError):
    """A job raised an exception that could not be re-created on the client."""
