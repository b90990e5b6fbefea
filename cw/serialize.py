"""Serialization in one place: functions by hash, arguments, results, exceptions."""

from __future__ import annotations

import collections
import io
import os
import pickle
import sys
import sysconfig
import threading
import traceback
import types
from collections import OrderedDict
from hashlib import blake2b
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator, Optional

import cloudpickle

from . import defaults
from .errors import JobError, NeedsReferences, RemoteTraceback, SerializationError
from .version import __version__

PROTOCOL = 5  # readable by every supported Python (3.8+)
_FN_CACHE_SIZE = 256
_by_value_lock = threading.Lock()
_SYSTEM_DIRS = tuple(
    os.path.realpath(p) + os.sep
    for p in {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
)


def _describe(obj: Any) -> str:
    r = repr(obj)
    return f"{type(obj).__qualname__} {r[:60] + '...' if len(r) > 60 else r}"


def user_module(fn: Callable) -> ModuleType | None:
    """The module a function comes from, if it is the user's own: not __main__
    (cloudpickle sends that by value anyway), not the standard library, not an
    installed package."""
    name = getattr(fn, "__module__", None)
    if not name or name == "__main__" or name == "cw" or name.startswith("cw."):
        return None  # (cw is installed on every worker: its own functions go by reference)
    mod = sys.modules.get(name)
    path = getattr(mod, "__file__", None)
    if not path:
        return None
    return None if os.path.realpath(path).startswith(_SYSTEM_DIRS) else mod


def ship_modules(modules: Iterable[ModuleType | str]) -> None:
    """Send these modules' functions and classes by value from now on (no import on workers)."""
    for m in modules:
        cloudpickle.register_pickle_by_value(sys.modules[m] if isinstance(m, str) else m)


class _Canonical(pickle._Pickler):  # type: ignore[name-defined]
    """cloudpickle's reductions on the Python pickler, with every set in sorted order.

    A set's order follows its elements' hashes, which change with each interpreter
    (PYTHONHASHSEED), and so would a job's function hash and default key: a re-run
    of a named run would miss its stored results. The C pickler writes sets before
    any hook could order them; this one asks ``reducer_override`` first.
    """

    dispatch_table = cloudpickle.Pickler.dispatch_table
    _function_reduce = cloudpickle.Pickler._function_reduce
    _dynamic_function_reduce = cloudpickle.Pickler._dynamic_function_reduce
    _function_getnewargs = cloudpickle.Pickler._function_getnewargs

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=PROTOCOL)
        self.globals_ref: dict = {}
        self.proto = PROTOCOL

    def reducer_override(self, obj: Any) -> Any:
        t = type(obj)
        if t is set or t is frozenset:
            try:
                items = sorted(obj)
            except TypeError:  # elements of several types: by their own (canonical) bytes
                items = sorted(obj, key=_canonical)
            return t, (items,)
        return cloudpickle.Pickler.reducer_override(self, obj)


def _canonical(obj: Any) -> bytes:
    with io.BytesIO() as f:
        _Canonical(f).dump(obj)
        return f.getvalue()


def _has_set(blob: bytes) -> bool:
    """Whether a pickle (protocol 4+) may hold a set: EMPTY_SET or FROZENSET, then MEMOIZE."""
    return b"\x8f\x94" in blob or b"\x91\x94" in blob


def _stable(obj: Any, blob: bytes) -> bytes:
    """The pickle of obj with its sets in sorted order when it may hold one, else blob."""
    if not _has_set(blob) or len(blob) > defaults.CANONICAL_KEY_BYTES:
        return blob
    try:
        return _canonical(obj)
    except Exception:  # what only the C pickler takes: its bytes, then
        return blob


class FunctionCache:
    """Functions pickled by one client: each once, with the globals it reads then (as
    dask does), by function object. A new client pickles them anew."""

    def __init__(self, size: int = _FN_CACHE_SIZE):
        self.size = size
        self.items: OrderedDict[Any, tuple[str, bytes]] = OrderedDict()

    def get(self, fn: Any) -> tuple[str, bytes] | None:
        return self.items.get(fn)

    def put(self, fn: Any, out: tuple[str, bytes]) -> None:
        self.items[fn] = out
        if len(self.items) > self.size:
            self.items.popitem(last=False)


def dumps_function(fn: Callable, cache: FunctionCache | None = None) -> tuple[str, bytes]:
    """(hash, bytes) of a function; pickled once per function object and cache (a
    client's), like dask does.

    A function from the user's own module travels by reference (the worker
    imports it, so module state and classes stay the module's own), with a
    by-value copy beside it for a worker that cannot import the module. The
    same function pickles to the same bytes in every interpreter (sets sorted),
    so its hash names it across re-runs.
    """
    if not callable(fn):
        raise SerializationError(f"cannot submit {_describe(fn)}: it is not callable")
    # Only plain functions are cached: a bound method or callable object carries
    # state that may change between submits. (A function's globals are captured
    # when it is first pickled: pass what changes as arguments.)
    cacheable = isinstance(fn, types.FunctionType)
    hit = cache.get(fn) if cacheable and cache is not None else None
    if hit is not None:
        return hit
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', None) or _describe(fn)}"
    try:
        primary = _stable(fn, cloudpickle.dumps(fn, protocol=PROTOCOL))
    except Exception as e:
        raise SerializationError(f"cannot pickle function {name}: {e}") from e
    fallback = None
    mod = user_module(fn)
    if mod is not None:
        with _by_value_lock:
            already = mod.__name__ in getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", ())
            if not already:
                cloudpickle.register_pickle_by_value(mod)
                try:
                    fallback = _stable(fn, cloudpickle.dumps(fn, protocol=PROTOCOL))
                except Exception:
                    fallback = None  # by reference only, then
                finally:
                    cloudpickle.unregister_pickle_by_value(mod)
    blob = pickle.dumps((name, primary, fallback), protocol=PROTOCOL)
    out = (blake2b(blob, digest_size=16).hexdigest(), blob)
    if cacheable and cache is not None:
        cache.put(fn, out)
    return out


_PLAIN = (int, float, str, bytes, bool, type(None), complex, bytearray)


class _RefPickler(cloudpickle.CloudPickler):
    def __init__(self, file: Any, persistent_id: Callable[[Any], Any]):
        super().__init__(file, protocol=PROTOCOL)
        self._pid = persistent_id

    def persistent_id(self, obj: Any) -> Any:  # noqa: D102 - pickle's hook
        return self._pid(obj)


def dumps_args(args: tuple, kwargs: dict, persistent_id: Callable[[Any], Any] | None = None) -> bytes:
    """Pickled (args, kwargs); names the argument that cannot be pickled.

    Plain values (numbers, strings, bytes) take the C pickler directly, several
    times faster than cloudpickle's; anything else goes through cloudpickle,
    which sends what lives in ``__main__`` by value. ``persistent_id`` (pickle's
    hook) replaces objects that travel by reference (futures, scattered data);
    without it, such an object raises :class:`NeedsReferences`.
    """
    if persistent_id is None and all(type(a) in _PLAIN for a in args) and all(
            type(v) in _PLAIN for v in kwargs.values()):  # fmt: skip
        return pickle.dumps((args, kwargs), protocol=PROTOCOL)
    try:
        if persistent_id is None:
            return cloudpickle.dumps((args, kwargs), protocol=PROTOCOL)
        buf = io.BytesIO()
        _RefPickler(buf, persistent_id).dump((args, kwargs))
        return buf.getvalue()
    except NeedsReferences:
        raise
    except Exception as e:
        for where, value in [(f"argument {i}", a) for i, a in enumerate(args)] + [
            (f"keyword argument {k!r}", v) for k, v in kwargs.items()
        ]:
            try:
                if persistent_id is None:
                    cloudpickle.dumps(value, protocol=PROTOCOL)
                else:
                    _RefPickler(io.BytesIO(), persistent_id).dump(value)
            except NeedsReferences:
                raise
            except Exception as inner:
                raise SerializationError(
                    f"cannot pickle {where} ({_describe(value)}): {inner}"
                ) from inner
        raise SerializationError(f"cannot pickle the arguments: {e}") from e


def job_key(fn_hash: str, args_blob: bytes, input_keys: Iterable[str] = (), value: tuple | None = None) -> str:
    """The default key of a job: hash of (function hash, argument bytes, and the keys of
    the jobs whose results are its inputs, in order). Given the arguments (``value``:
    args and kwargs), bytes that may hold a set are made again with sets in sorted
    order, so that the key is the same in every interpreter."""
    h = blake2b(fn_hash.encode(), digest_size=16)
    h.update(args_blob if value is None else _stable(value, args_blob))
    for k in input_keys:
        h.update(b"\0" + k.encode())
    return h.hexdigest()


def data_hash(blob: bytes) -> str:
    """The hash scattered data is known by: BLAKE2b-128 of its pickle."""
    return blake2b(blob, digest_size=16).hexdigest()


loads = pickle.loads  # cloudpickle output is plain pickle data


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, persistent_load: Callable[[Any], Any]):
        super().__init__(file)
        self._load = persistent_load

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102 - pickle's hook
        return self._load(pid)


def loads_args(blob: bytes, persistent_load: Callable[[Any], Any]) -> Any:
    """Unpickle arguments whose futures and scattered data travelled by reference."""
    return _RefUnpickler(io.BytesIO(blob), persistent_load).load()


def loads_function(blob: bytes) -> tuple[str, Callable]:
    """(name, function) from dumps_function's bytes: by reference, else by value."""
    name, primary, fallback = pickle.loads(blob)
    try:
        return name, pickle.loads(primary)
    except (ImportError, AttributeError):
        if fallback is None:
            raise
    return name, pickle.loads(fallback)


def runtime_versions() -> dict:
    """What must match between a client and a worker for pickles to travel."""
    return {
        "python": ".".join(map(str, sys.version_info[:3])),
        "cloudpickle": cloudpickle.__version__,
        "cw": __version__,
    }


def dumps_result(value: Any) -> bytes:
    if type(value) in _PLAIN:
        return pickle.dumps(value, protocol=PROTOCOL)
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
    except BaseException:  # noqa: B036 - a payload may raise anything while it unpickles
        exc = JobError(error)
    if not isinstance(exc, BaseException):
        exc = JobError(error)
    if tb:
        exc.__cause__ = RemoteTraceback(tb)
    return exc


def incompatibility(client: dict, worker: dict) -> str | None:
    """Why a worker cannot unpickle this client's jobs, or None.

    Functions pickled by value carry bytecode, which only the same Python
    minor version reads; cloudpickle's format changes between major versions.
    """

    def minor(v: str) -> str:
        return ".".join(str(v).split(".")[:2])

    cp, wp = client.get("python"), worker.get("python")
    if cp and wp and minor(cp) != minor(wp):
        return f"it runs Python {wp}, this client Python {cp}: pickled functions need the same Python minor version"
    cc, wc = client.get("cloudpickle"), worker.get("cloudpickle")
    if cc and wc and str(cc).split(".")[0] != str(wc).split(".")[0]:
        return f"it has cloudpickle {wc}, this client cloudpickle {cc}: install the same version on both"
    return None


class DataCache:
    """Blobs by key (a job id: its value; a hash: scattered data), the most recently used,
    up to a number of bytes."""

    def __init__(self, limit: int):
        self.limit, self.size = limit, 0
        self.items: collections.OrderedDict[Any, bytes] = collections.OrderedDict()

    def __contains__(self, key: Any) -> bool:
        return key in self.items

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __getitem__(self, key: Any) -> bytes:
        return self.items[key]  # without making it the most recent (get does)

    def get(self, key: Any) -> Optional[bytes]:
        blob = self.items.get(key)
        if blob is not None:
            self.items.move_to_end(key)
        return blob

    def put(self, key: Any, blob: bytes) -> None:
        if len(blob) > self.limit:
            return
        old = self.items.pop(key, None)
        if old is not None:
            self.size -= len(old)
        self.items[key] = blob
        self.size += len(blob)
        while self.size > self.limit:
            self.size -= len(self.items.popitem(last=False)[1])
