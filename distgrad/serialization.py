"""``dg.save`` / ``dg.load``: state dicts in a msgpack file, atomically, without pickle.

File layout::

    magic   8 bytes   b"DISTGRAD"
    version 4 bytes   little-endian uint32 (this writer: 1)
    length  8 bytes   little-endian uint64, bytes of payload
    sha256 32 bytes   of the payload
    payload           msgpack of the object

Tensors and numpy arrays travel as msgpack ext types: a small msgpack header
``[dtype, shape, kind, requires_grad]`` followed by the raw little-endian bytes.
Only plain data is accepted (dicts, lists, tuples, str, bytes, numbers, bool, None,
tensors, numpy arrays): nothing can execute code on load. A file is written to a
temporary name in the same folder, flushed to disk and renamed over the target,
so a crash leaves either the old file or the new one, never a torn one.
"""
import hashlib
import os
import struct
import tempfile

import msgpack
import numpy as np

from . import _backend

MAGIC = b"DISTGRAD"
VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")
_EXT_TENSOR, _EXT_NDARRAY, _EXT_TUPLE = 1, 2, 3
_KINDS = ("tensor", "variable", "parameter")
# Plain numeric dtypes only: an object dtype could smuggle code in.
_ALLOWED_DTYPES = {np.dtype(t).str.lstrip("<>|=") for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128)}


class SerializationError(RuntimeError):
    """The file is not a distgrad file, is truncated or corrupted, or holds unknown data."""


# ---------------------------------------------------------------- encode

def _array_ext(code, array, kind=None, requires_grad=False):
    a = np.asarray(_backend.to_numpy(array))
    if a.dtype.str.lstrip("<>|=") not in _ALLOWED_DTYPES:
        raise TypeError(f"dg.save: arrays of dtype {a.dtype} cannot be saved (object and "
                        "structured dtypes are not plain data)")
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    # astype(order="C") keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d).
    a = a.astype(dt, order="C", copy=False)
    head = msgpack.packb([dt.str, list(a.shape), kind, bool(requires_grad)])
    return msgpack.ExtType(code, struct.pack("<I", len(head)) + head + a.tobytes())


def _encode(obj, path):
    from .tensor import Tensor, Variable
    if isinstance(obj, Tensor):
        if obj._store.lazy:
            obj = obj.detach()
            obj = Tensor(obj.numpy())      # a sync point: gather the distributed value
        from .nn.module import Parameter
        kind = "parameter" if isinstance(obj, Parameter) else (
            "variable" if isinstance(obj, Variable) else "tensor")
        return _array_ext(_EXT_TENSOR, obj._store.array, kind, obj.requires_grad)
    if isinstance(obj, np.ndarray):
        return _array_ext(_EXT_NDARRAY, obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"dg.save: dict key {k!r} at {path or 'top level'} has type "
                                f"{type(k).__name__}; keys must be str, int, float, bool or None")
            out[k] = _encode(v, f"{path}[{k!r}]")
        return out
    if isinstance(obj, list):
        return [_encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        items = [_encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return msgpack.ExtType(_EXT_TUPLE, msgpack.packb(items, use_bin_type=True))
    from .nn.module import Module
    hint = " (save module.state_dict() instead)" if isinstance(obj, Module) else ""
    raise TypeError(f"dg.save: cannot save an object of type {type(obj).__name__} at "
                    f"{path or 'top level'}{hint}; supported: dict, list, tuple, str, bytes, "
                    "int, float, bool, None, tensors and numpy arrays")


def save(obj, f):
    """Save a state dict (nested dicts/lists/tuples of tensors, numbers, strings) to ``f``.

    ``f`` is a path (written atomically: temp file + rename) or a binary file object.

    Example::

        dg.save({"model": model.state_dict(), "epoch": 3}, "ckpt.dgt")
    """
    payload = msgpack.packb(_encode(obj, ""), use_bin_type=True)
    blob = _HEADER.pack(MAGIC, VERSION, len(payload), hashlib.sha256(payload).digest()) + payload
    if hasattr(f, "write"):
        f.write(blob)
        return
    path = os.fspath(f)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(blob)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:                                   # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# ---------------------------------------------------------------- decode

def _decode_array(data, where):
    if len(data) < 4:
        raise SerializationError(f"{where}: corrupted tensor record (too short)")
    (n,) = struct.unpack_from("<I", data)
    try:
        dtype, shape, kind, requires_grad = msgpack.unpackb(data[4:4 + n], raw=False)
    except Exception as e:
        raise SerializationError(f"{where}: corrupted tensor header ({e})") from None
    if dtype.lstrip("<>|=") not in _ALLOWED_DTYPES:
        raise SerializationError(f"{where}: tensor dtype {dtype!r} is not allowed")
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    raw = data[4 + n:]
    if any(not isinstance(s, int) or s < 0 for s in shape) or len(raw) != count * dt.itemsize:
        raise SerializationError(f"{where}: tensor of dtype {dtype} and shape {tuple(shape)} needs "
                                 f"{count * dt.itemsize} bytes, the record has {len(raw)}")
    array = np.frombuffer(raw, dtype=dt).reshape(shape).copy()   # writable, owns its memory
    return array, kind, requires_grad


def _make_hook(map_location):
    def hook(code, data):
        if code == _EXT_TUPLE:
            return tuple(msgpack.unpackb(data, ext_hook=hook, raw=False, strict_map_key=False))
        if code not in (_EXT_TENSOR, _EXT_NDARRAY):
            raise SerializationError(f"unknown record type {code} in file")
        array, kind, requires_grad = _decode_array(data, "dg.load")
        if code == _EXT_NDARRAY:
            return array
        if kind not in _KINDS:
            raise SerializationError(f"unknown tensor kind {kind!r} in file")
        from .tensor import Tensor, Variable
        if map_location not in (None, "cpu"):
            array = _backend.to_device(array, map_location)
        if kind == "parameter":
            from .nn.module import Parameter
            return Parameter(Tensor._from_array(array), requires_grad=requires_grad)
        cls = Variable if kind == "variable" else Tensor
        t = cls._from_array(array)
        if requires_grad:
            t._init_requires_grad(True)
        return t
    return hook


def load(f, map_location=None):
    """Load an object saved by ``dg.save``; tensors land on ``map_location`` (default CPU).

    Raises ``SerializationError`` for a file that is not a distgrad file, was written by
    a newer format version, or is truncated or corrupted.

    Example::

        state = dg.load("ckpt.dgt"); model.load_state_dict(state["model"])
    """
    if hasattr(f, "read"):
        blob, name = f.read(), getattr(f, "name", "<stream>")
    else:
        name = os.fspath(f)
        with open(name, "rb") as fh:
            blob = fh.read()
    if len(blob) < _HEADER.size:
        if not MAGIC.startswith(blob[:len(MAGIC)]):
            raise SerializationError(f"{name}: not a distgrad file (bad magic)")
        raise SerializationError(f"{name}: file is truncated: {len(blob)} bytes, shorter than "
                                 f"the {_HEADER.size}-byte header")
    magic, version, length, digest = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise SerializationError(f"{name}: not a distgrad file (bad magic {magic!r})")
    if version > VERSION:
        raise SerializationError(f"{name}: format version {version} is newer than this "
                                 f"distgrad supports ({VERSION}); upgrade distgrad")
    payload = blob[_HEADER.size:]
    if len(payload) < length:
        raise SerializationError(f"{name}: file is truncated: expected {length} bytes of data, "
                                 f"found {len(payload)}")
    if len(payload) > length:
        raise SerializationError(f"{name}: file is corrupted: {len(payload) - length} unexpected "
                                 "bytes after the data")
    if hashlib.sha256(payload).digest() != digest:
        raise SerializationError(f"{name}: file is corrupted: checksum mismatch")
    try:
        return msgpack.unpackb(payload, ext_hook=_make_hook(map_location), raw=False,
                               strict_map_key=False)
    except SerializationError:
        raise
    except Exception as e:          # checksum passed but content is malformed: a writer bug
        raise SerializationError(f"{name}: malformed contents ({type(e).__name__}: {e})") from None
