"""``dg.save`` / ``dg.load``: state dicts in a msgpack file, atomically, without pickle.

File layout::

    magic    8 bytes  b"DISTGRAD"
    version  4 bytes  little-endian uint32 (this writer: 2)
    meta_len 8 bytes  little-endian uint64
    meta_crc 4 bytes  crc32 of the meta block
    data_len 8 bytes  little-endian uint64, bytes of array data
    meta              msgpack of the object; each array is an ext record
                      [dtype, shape, kind, requires_grad, nbytes, crc32]
    data              the arrays' raw little-endian bytes, in the records' order

Arrays are streamed straight from their memory to the file and back (no copy into a
message), and each carries its own crc32, so a 100 MB checkpoint costs about what
``numpy.save`` does while any flipped byte is still caught. Only plain data is accepted
(dicts, lists, tuples, str, bytes, numbers, bool, None, tensors, numpy arrays): nothing
can execute code on load. A file is written to a temporary name in the same folder,
flushed to disk and renamed over the target, so a crash leaves either the old file or
the new one, never a torn one.
"""
import os
import struct
import tempfile
import zlib

import msgpack
import numpy as np

from . import _backend

MAGIC = b"DISTGRAD"
VERSION = 2
_HEADER = struct.Struct("<8sIQIQ")
_EXT_TENSOR, _EXT_NDARRAY, _EXT_TUPLE = 1, 2, 3
_KINDS = ("tensor", "variable", "parameter")
# Plain numeric dtypes only: an object dtype could smuggle code in.
_ALLOWED_DTYPES = {np.dtype(t).str.lstrip("<>|=") for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128)}


class SerializationError(RuntimeError):
    """The file is not a distgrad file, is truncated or corrupted, or holds unknown data."""


# ---------------------------------------------------------------- encode

def _array_ext(chunks, code, array, kind=None, requires_grad=False):
    a = np.asarray(_backend.to_numpy(array))
    if a.dtype.str.lstrip("<>|=") not in _ALLOWED_DTYPES:
        raise TypeError(f"dg.save: arrays of dtype {a.dtype} cannot be saved (object and "
                        "structured dtypes are not plain data)")
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    # astype(order="C") keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d).
    a = a.astype(dt, order="C", copy=False)
    data = memoryview(a.reshape(-1)).cast("B")
    chunks.append(data)
    head = [dt.str, list(a.shape), kind, bool(requires_grad), data.nbytes, zlib.crc32(data)]
    return msgpack.ExtType(code, msgpack.packb(head))


def _encode(obj, path, chunks):
    from .tensor import Tensor, Variable
    if isinstance(obj, Tensor):
        if obj._store.lazy:
            obj = obj.detach()
            obj = Tensor(obj.numpy())      # a sync point: gather the distributed value
        from .nn.module import Parameter
        kind = "parameter" if isinstance(obj, Parameter) else (
            "variable" if isinstance(obj, Variable) else "tensor")
        return _array_ext(chunks, _EXT_TENSOR, obj._store.array, kind, obj.requires_grad)
    if isinstance(obj, np.ndarray):
        return _array_ext(chunks, _EXT_NDARRAY, obj)
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
            out[k] = _encode(v, f"{path}[{k!r}]", chunks)
        return out
    if isinstance(obj, list):
        return [_encode(v, f"{path}[{i}]", chunks) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        items = [_encode(v, f"{path}[{i}]", chunks) for i, v in enumerate(obj)]
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
    chunks = []
    meta = msgpack.packb(_encode(obj, "", chunks), use_bin_type=True)
    header = _HEADER.pack(MAGIC, VERSION, len(meta), zlib.crc32(meta), sum(c.nbytes for c in chunks))

    def write(out):
        out.write(header)
        out.write(meta)
        for c in chunks:
            out.write(c)
    if hasattr(f, "write"):
        write(f)
        return
    path = os.fspath(f)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
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

def _read_array(data, stream, name):
    """Read one array record's bytes from ``stream`` (they follow the meta in order)."""
    try:
        dtype, shape, kind, requires_grad, nbytes, crc = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise SerializationError(f"{name}: corrupted tensor record ({e})") from None
    if dtype.lstrip("<>|=") not in _ALLOWED_DTYPES:
        raise SerializationError(f"{name}: tensor dtype {dtype!r} is not allowed")
    dt = np.dtype(dtype)
    if any(not isinstance(n, int) or n < 0 for n in shape) or \
            int(np.prod(shape, dtype=np.int64)) * dt.itemsize != nbytes:
        raise SerializationError(f"{name}: tensor of dtype {dtype} and shape {tuple(shape)} "
                                 f"does not have {nbytes} bytes")
    array = np.empty(shape, dtype=dt)                 # writable, owns its memory
    view = memoryview(array.reshape(-1)).cast("B")
    got = stream.readinto(view) if nbytes else 0
    if got != nbytes:
        raise SerializationError(f"{name}: file is truncated inside a tensor of shape "
                                 f"{tuple(shape)}")
    if zlib.crc32(view) != crc:
        raise SerializationError(f"{name}: file is corrupted: checksum mismatch in a tensor of "
                                 f"shape {tuple(shape)}")
    return array, kind, requires_grad


def _make_hook(map_location, stream, name):
    def hook(code, data):
        if code == _EXT_TUPLE:
            return tuple(msgpack.unpackb(data, ext_hook=hook, raw=False, strict_map_key=False))
        if code not in (_EXT_TENSOR, _EXT_NDARRAY):
            raise SerializationError(f"unknown record type {code} in file")
        array, kind, requires_grad = _read_array(data, stream, name)
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
        return _load_stream(f, getattr(f, "name", "<stream>"), map_location, None)
    name = os.fspath(f)
    with open(name, "rb") as fh:
        return _load_stream(fh, name, map_location, os.fstat(fh.fileno()).st_size)


def _load_stream(stream, name, map_location, size):
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        if not MAGIC.startswith(head[:len(MAGIC)]):
            raise SerializationError(f"{name}: not a distgrad file (bad magic)")
        raise SerializationError(f"{name}: file is truncated: {len(head)} bytes, shorter than "
                                 f"the {_HEADER.size}-byte header")
    magic, version, meta_len, meta_crc, data_len = _HEADER.unpack(head)
    if magic != MAGIC:
        raise SerializationError(f"{name}: not a distgrad file (bad magic {magic!r})")
    if version > VERSION:
        raise SerializationError(f"{name}: format version {version} is newer than this "
                                 f"distgrad supports ({VERSION}); upgrade distgrad")
    if version < VERSION:
        raise SerializationError(f"{name}: format version {version} is no longer supported")
    if size is not None:
        expected = _HEADER.size + meta_len + data_len
        if size < expected:
            raise SerializationError(f"{name}: file is truncated: expected {expected} bytes, "
                                     f"found {size}")
        if size > expected:
            raise SerializationError(f"{name}: file is corrupted: {size - expected} unexpected "
                                     "bytes after the data")
    meta = stream.read(meta_len)
    if len(meta) < meta_len:
        raise SerializationError(f"{name}: file is truncated inside its table of contents")
    if zlib.crc32(meta) != meta_crc:
        raise SerializationError(f"{name}: file is corrupted: checksum mismatch")
    try:
        return msgpack.unpackb(meta, ext_hook=_make_hook(map_location, stream, name), raw=False,
                               strict_map_key=False)
    except SerializationError:
        raise
    except Exception as e:          # checksum passed but content is malformed: a writer bug
        raise SerializationError(f"{name}: malformed contents ({type(e).__name__}: {e})") from None
