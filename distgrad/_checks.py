"""Argument checks for the public entry points, and the shared limits of the decoders.

Each ``*_args`` function checks the arguments of one public call and raises one clear
exception naming the call, the argument, what it got and what is accepted (TypeError for
a wrong type, ValueError for a value out of range), so a bad value is reported where the
user passed it, not later on a worker. The call sites use them as one line::

    def init(workers=2, ...):
        _checks.init_args(workers, device, address, backend, bucket_cap_mb, ...)

The decoders (``dg.load``, program messages, collective frames) share :data:`MAX_DEPTH`,
:func:`plain_dtype` and :func:`too_deep`. Only numpy is imported here: this module sits
at the bottom of the layering.
"""
import math
import numbers
import os

import numpy as np

MAX_DEPTH = 64          # nesting of lists/dicts/tuples any decoder accepts
MAX_NDIM = 32           # dimensions of an array any decoder accepts (numpy allows 64)

# Plain numeric dtypes (no byte order): nothing else may come out of a decoder. An object
# dtype would carry pointers or pickles; structured and void dtypes need no support.
PLAIN_DTYPES = frozenset(np.dtype(t).str[1:] for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128))

COLLECTIVES = ("shm", "tcp", "hierarchical", "nccl")
BACKENDS = ("ray", "local")
COMPRESS = (None, "fp16")


# ---------------------------------------------------------------- decoder helpers

def plain_dtype(spec):
    """The numpy dtype for a dtype string such as ``"<f4"``, or None if it is not plain data.

    >>> plain_dtype("<f4"), plain_dtype("|O")
    (dtype('float32'), None)
    """
    if not isinstance(spec, str) or len(spec) > 8 or spec[1:] not in PLAIN_DTYPES \
            or spec[:1] not in "<>|=":
        return None
    return np.dtype(spec)


def too_deep(obj, limit=MAX_DEPTH):
    """True when lists/tuples/dicts nest deeper than ``limit`` inside ``obj``: a walk level
    by level (no recursion, so the check itself cannot overflow the stack). Meant for
    decoder output, whose containers are exactly list, tuple and dict.

    >>> too_deep([[1]], 2), too_deep([[[1]]], 2)
    (False, True)
    """
    level = [obj] if type(obj) in _CONTAINERS else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        inner = []
        for o in level:
            inner.extend([v for v in (o.values() if type(o) is dict else o)
                          if type(v) in _CONTAINERS])
        level = inner
    return False


_CONTAINERS = (list, tuple, dict)


# ---------------------------------------------------------------- argument helpers

def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(where, name, value, lo, hi=None):
    """``value`` must be an int (not a bool) with ``lo <= value`` (and ``<= hi``).

    >>> check_int("dg.init", "workers", 2, 1)
    2
    """
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    if not _is_int(value):
        raise TypeError(f"{where}: {name} must be an int {rng}, got {type(value).__name__} "
                        f"{value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{where}: {name} must be {rng}, got {value}")
    return int(value)


def check_positive(where, name, value):
    """``value`` must be a finite real number > 0 (not a bool).

    >>> check_positive("dg.init", "timeout_s", 1.5)
    1.5
    """
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: {name} must be a number > 0, got {type(value).__name__} "
                        f"{value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_choice(where, name, value, choices):
    """``value`` must be one of ``choices`` (compared with ==, types checked first).

    >>> check_choice("dg.init", "backend", "local", ("ray", "local"))
    'local'
    """
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ValueError(f"{where}: {name} must be one of {', '.join(map(repr, choices))}; "
                         f"got {value!r}")
    return value


def _check_plain_array(where, name, dtype):
    if np.dtype(dtype).kind not in "biufc":
        raise TypeError(f"{where}: {name} has dtype {np.dtype(dtype)}; only numeric and bool "
                        "arrays can be distributed (object, string and structured arrays "
                        "cannot)")


def _check_path(where, name, f, mode):
    if hasattr(f, mode):
        return
    if not isinstance(f, (str, bytes, os.PathLike)):
        want = "a writable binary file" if mode == "write" else "a readable binary file"
        raise TypeError(f"{where}: {name} must be a path (str or os.PathLike) or {want}, "
                        f"got {type(f).__name__}")


# ---------------------------------------------------------------- public entry points

def init_args(workers, device, address, backend, bucket_cap_mb, timeout_s,
              num_cpus_per_worker, collective, compress):
    """Check the arguments of ``dg.init`` (see there).

    >>> init_args(2, "cpu", None, "local", 25.0, 60.0, 1, None, None)
    """
    w = "dg.init"
    check_int(w, "workers", workers, 1)
    if device is not None and not isinstance(device, str):
        raise TypeError(f"{w}: device must be 'cpu', 'cuda' or 'cuda:N', got "
                        f"{type(device).__name__} {device!r}")
    if address is not None and not isinstance(address, str):
        raise TypeError(f"{w}: address must be None, 'auto' or 'host:port', got "
                        f"{type(address).__name__} {address!r}")
    check_choice(w, "backend", backend, BACKENDS)
    check_positive(w, "bucket_cap_mb", bucket_cap_mb)
    check_positive(w, "timeout_s", timeout_s)
    check_positive(w, "num_cpus_per_worker", num_cpus_per_worker)
    check_choice(w, "collective", collective, (None,) + COLLECTIVES)
    check_choice(w, "compress", compress, COMPRESS)


def shard_args(data, dim, sizes, world_size):
    """Check the arguments of ``Cluster.shard``; return ``dim`` as an int in range.

    >>> shard_args(np.ones((4, 3)), -1, None, 2)
    -1
    """
    w = "shard"
    shape, dtype = getattr(data, "shape", None), getattr(data, "dtype", None)
    if shape is None or not isinstance(dtype, np.dtype):
        try:                                    # lists, scalars, torch tensors: as numpy sees them
            a = np.asarray(data)
        except (ValueError, TypeError) as e:
            raise TypeError(f"{w}: data must be an array, a tensor or a Variable ({e})") from None
        shape, dtype = a.shape, a.dtype
    _check_plain_array(w, "data", dtype)
    ndim = len(shape)
    if ndim == 0:
        return dim                    # shard reports this itself (a PlacementError)
    check_int(w, "dim", dim, -ndim, ndim - 1)
    if sizes is None or (isinstance(sizes, str) and sizes == "auto"):
        return dim
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__"):
        raise (ValueError if isinstance(sizes, str) else TypeError)(
            f"{w}: sizes must be None, 'auto' or a list of {world_size} ints, got {sizes!r}")
    if len(sizes) != world_size:
        raise ValueError(f"{w}: sizes must have one entry per worker ({world_size}), got "
                         f"{len(sizes)}")
    for k, s in enumerate(sizes):
        check_int(w, f"sizes[{k}]", s, 0, shape[dim])
    return dim


def replicate_args(obj, cluster):
    """Check the argument of ``Cluster.replicate``: a tensor or a module, not one that lives
    on another cluster.

    >>> replicate_args(None, None)
    Traceback (most recent call last):
    TypeError: replicate: expected a Tensor, Variable or Module, got NoneType
    """
    store = getattr(obj, "store", None) if not hasattr(obj, "parameters") else None
    if store is None and not hasattr(obj, "parameters"):
        raise TypeError(f"replicate: expected a Tensor, Variable or Module, got "
                        f"{type(obj).__name__}")
    tensors = [obj] if store is not None else list(obj.parameters()) + [
        b for b in (obj.buffers() if hasattr(obj, "buffers") else ()) if b is not None]
    for t in tensors:
        if t.store.lazy and t.store.cluster is not cluster:
            raise ValueError("replicate: a tensor of shape "
                             f"{tuple(t.store.shape)} already lives on another cluster; "
                             "gather it (cluster.gather) or replicate a local copy")
        if not t.store.lazy:
            _check_plain_array("replicate", "a tensor", t.store.dtype)


def resize_args(n):
    """Check the type of ``Cluster.resize``'s argument: an int (``resize`` itself reports a
    count it cannot run with as a ResizeError).

    >>> resize_args(3)
    3
    """
    if not _is_int(n):
        raise TypeError(f"resize: n must be an int >= 1, got {type(n).__name__} {n!r}")
    return int(n)


def save_args(f):
    """Check the target of ``dg.save``: a path or a binary file object open for writing.

    >>> save_args("ckpt.dgt")
    """
    _check_path("dg.save", "f", f, "write")


def load_args(f, map_location):
    """Check the arguments of ``dg.load``: a path or a readable binary file, and a
    ``map_location`` of None, 'cpu', 'cuda' or 'cuda:N'.

    >>> load_args("ckpt.dgt", "cpu")
    """
    _check_path("dg.load", "f", f, "read")
    if map_location is not None and not (isinstance(map_location, str) and (
            map_location in ("cpu", "cuda") or map_location.startswith("cuda:"))):
        raise ValueError(f"dg.load: map_location must be None, 'cpu', 'cuda' or 'cuda:N', "
                         f"got {map_location!r}")
