"""Serialization in one place: functions by hash, arguments, results, exceptions."""

from __future__ import annotations

import pickle
import traceback
from collections import OrderedDict
from hashlib import blake2b
from typing import Any, Callable

import cloudpickle

from .errors import JobError, RemoteTraceback, SerializationError

PROTOCOL = 5  # readable by every supported Python (3.8+)
_FN_CACHE_SIZE = 256
_fn_cache: OrderedDict[Any, tuple[str, bytes]] = OrderedDict()


def _describe(obj: Any) -> str:
    r = repr(obj)
    return f"{type(obj).__qualname__} {r[:60] + '...' if len(r) > 60 else r}"


def dumps_function(fn: Callable) -> tuple[str, bytes]:
    """(hash, bytes) of a function; pickled once per function object, like dask does."""
    if not callable(fn):
        raise SerializationError(f"cannot submit {_describe(fn)}: it is not callable")
    try:
        hit = _fn_cache.get(fn)
    except TypeError:  # unhashable callable object: pickle it every time
        hit = None
    if hit is not None:
        return hit
    try:
        blob = cloudpickle.dumps(fn, protocol=PROTOCOL)
    except Exception as e:
        name = getattr(fn, "__qualname__", None) or _describe(fn)
        raise SerializationError(f"cannot pickle function {name}: {e}") from e
    out = (blake2b(blob, digest_size=16).hexdigest(), blob)
    try:
        _fn_cache[fn] = out
        if len(_fn_cache) > _FN_CACHE_SIZE:
            _fn_cache.popitem(last=False)
    except TypeError:
        pass
    return out


def dumps_args(args: tuple, kwargs: dict) -> bytes:
    """Pickled (args, kwargs); names the argument that cannot be pickled."""
    try:
        return cloudpickle.dumps((args, kwargs), protocol=PROTOCOL)
    except Exception as e:
        for where, value in [(f"argument {i}", a) for i, a in enumerate(args)] + [
            (f"keyword argument {k!r}", v) for k, v in kwargs.items()
        ]:
            try:
                cloudpickle.dumps(value, protocol=PROTOCOL)
            except Exception as inner:
                raise SerializationError(
                    f"cannot pickle {where} ({_describe(value)}): {inner}"
                ) from inner
        raise SerializationError(f"cannot pickle the arguments: {e}") from e


def job_key(fn_hash: str, args_blob: bytes) -> str:
    """The default key of a job: hash of (function hash, argument bytes)."""
    h = blake2b(fn_hash.encode(), digest_size=16)
    h.update(args_blob)
    return h.hexdigest()


loads = pickle.loads  # cloudpickle output is plain pickle data


def dumps_result(value: Any) -> bytes:
    return cloudpickle.dumps(value, protocol=PROTOCOL)


def dumps_exception(exc: BaseException) -> tuple[bytes, str, str]:
    """(blob, error text, traceback text) of an exception raised by a job."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text = f"{type(exc).__qualname__}: {exc}"
    try:
        blob = cloudpickle.dumps(exc, protocol=PROTOCOL)
        pickle.loads(blob)  # some exceptions pickle but cannot be rebuilt
    except Exception:
        blob = b""
    return blob, text, tb


def rebuild_exception(blob: bytes, error: str, tb: str) -> BaseException:
    """The exception a job raised, with its remote traceback as __cause__."""
    exc: BaseException
    try:
        exc = pickle.loads(blob) if blob else JobError(error)
    except Exception:
        exc = JobError(error)
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc
