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
import math
import os
import struct
import tempfile
import zlib

import msgpack
import numpy as np

from . import _backend, _checks
from .parameter import Parameter
from .tensor import Tensor, Variable

MAGIC = b"DISTGRAD"
VERSION = 2
_HEADER = struct.Struct("<8sIQIQ")
_EXT_TENSOR, _EXT_NDARRAY, _EXT_TUPLE = 1, 2, 3
_KINDS = ("tensor", "variable", "parameter")


class SerializationError(RuntimeError):
    """The file is not a distgrad file, is truncated or corrupted, or holds unknown data."""


# ---------------------------------------------------------------- encode

def _array_ext(chunks, code, array, kind=None, requires_grad=False):
    a = np.asarray(_backend.to_numpy(array))
    if a.dtype.str[1:] not in _checks.PLAIN_DTYPES:   # object dtypes could smuggle code in
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
    if isinstance(obj, Tensor):
        if obj.store.lazy:
            obj = obj.detach()
            obj = Tensor(obj.numpy())      # a sync point: gather the distributed value
        kind = "parameter" if isinstance(obj, Parameter) else (
            "variable" if isinstance(obj, Variable) else "tensor")
        return _array_ext(chunks, _EXT_TENSOR, obj.store.array, kind, obj.requires_grad)
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
    # A Module (serialization sits below nn: the cluster's checkpoints use it).
    module = hasattr(obj, "state_dict") and hasattr(obj, "parameters")
    hint = " (save module.state_dict() instead)" if module else ""
    raise TypeError(f"dg.save: cannot save an object of type {type(obj).__name__} at "
                    f"{path or 'top level'}{hint}; supported: dict, list, tuple, str, bytes, "
                    "int, float, bool, None, tensors and numpy arrays")


def save(obj, f):
    """Save a state dict (nested dicts/lists/tuples of tensors, numbers, strings) to ``f``.

    ``f`` is a path (written atomically: temp file + rename) or a binary file object.

    Example::

        dg.save({"model": model.state_dict(), "epoch": 3}, "ckpt.dgt")
    """
    _checks.save_args(f)
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
# A file is untrusted input (checkpoints travel between machines): every length is checked
# against what the file still holds before anything is allocated, nesting is capped, and
# every failure is a SerializationError.

_READ_CHUNK = 64 << 20        # a stream of unknown size is read in pieces of this size


class _Source:
    """The open file and how many bytes it still holds (None: unknown, a pipe)."""

    def __init__(self, stream, name, size):
        self.stream, self.name, self.left = stream, name, size

    def need(self, n, what):
        if self.left is not None and n > self.left:
            raise SerializationError(f"{self.name}: file is truncated: {what} declares {n} "
                                     f"bytes, only {self.left} remain")

    def read(self, n, what):
        """``n`` bytes as a bytearray; reads in pieces when the size is unknown, so a
        declared length never allocates more than the stream really holds."""
        self.need(n, what)
        if self.left is not None:
            buf = bytearray(n)
            got = self.stream.readinto(buf) if n else 0
        else:
            buf = bytearray()
            while len(buf) < n:
                piece = self.stream.read(min(_READ_CHUNK, n - len(buf)))
                if not piece:
                    break
                buf += piece
            got = len(buf)
        if got != n:
            raise SerializationError(f"{self.name}: file is truncated inside {what}")
        if self.left is not None:
            self.left -= n
        return buf


def _read_array(data, src):
    """Read one array record's bytes from ``src`` (they follow the meta in order)."""
    name = src.name
    try:
        head = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise SerializationError(f"{name}: corrupted tensor record ({e})") from None
    if not (isinstance(head, list) and len(head) == 6):
        raise SerializationError(f"{name}: corrupted tensor record (not 6 fields)")
    dtype, shape, kind, requires_grad, nbytes, crc = head
    dt = _checks.plain_dtype(dtype)
    if dt is None:
        raise SerializationError(f"{name}: tensor dtype {dtype!r} is not allowed")
    if not (isinstance(shape, list) and len(shape) <= _checks.MAX_NDIM
            and all(type(n) is int and n >= 0 for n in shape)) \
            or type(nbytes) is not int or type(crc) is not int \
            or math.prod(shape) * dt.itemsize != nbytes:
        raise SerializationError(f"{name}: tensor record of dtype {dtype} and shape {shape!r} "
                                 f"does not match its {nbytes!r} bytes")
    src.need(nbytes, f"a tensor of shape {tuple(shape)}")
    if src.left is not None:
        array = np.empty(shape, dtype=dt)             # writable, owns its memory
        view = memoryview(array.reshape(-1)).cast("B")
        got = src.stream.readinto(view) if nbytes else 0
        if got != nbytes:
            raise SerializationError(f"{name}: file is truncated inside a tensor of shape "
                                     f"{tuple(shape)}")
        src.left -= nbytes
    else:
        raw = src.read(nbytes, f"a tensor of shape {tuple(shape)}")
        array = np.frombuffer(raw, dtype=dt).reshape(shape)   # writable: a bytearray
        view = raw
    if zlib.crc32(view) != crc:
        raise SerializationError(f"{name}: file is corrupted: checksum mismatch in a tensor of "
                                 f"shape {tuple(shape)}")
    return array, kind, requires_grad


def _make_hook(map_location, src):
    depth = [0]            # tuples nest by recursive unpacking: capped before the C stack is

    def hook(code, data):
        if code == _EXT_TUPLE:
            if depth[0] >= _checks.MAX_DEPTH:
                raise SerializationError(f"{src.name}: records nest deeper than "
                                         f"{_checks.MAX_DEPTH} levels")
            depth[0] += 1
            try:
                items = msgpack.unpackb(data, ext_hook=hook, raw=False, strict_map_key=False)
            finally:
                depth[0] -= 1
            if not isinstance(items, list):
                raise SerializationError(f"{src.name}: corrupted tuple record")
            return tuple(items)
        if code not in (_EXT_TENSOR, _EXT_NDARRAY):
            raise SerializationError(f"{src.name}: unknown record type {code} in file")
        array, kind, requires_grad = _read_array(data, src)
        if code == _EXT_NDARRAY:
            return array
        if kind not in _KINDS:
            raise SerializationError(f"{src.name}: unknown tensor kind {kind!r} in file")
        if map_location not in (None, "cpu"):
            array = _backend.to_device(array, map_location)
        if kind == "parameter":
            return Parameter(Tensor.from_array(array), requires_grad=bool(requires_grad))
        cls = Variable if kind == "variable" else Tensor
        t = cls.from_array(array)
        if requires_grad:
            t.requires_grad_(True)
        return t
    return hook


def load(f, map_location=None):
    """Load an object saved by ``dg.save``; tensors land on ``map_location`` (default CPU).

    Raises ``SerializationError`` for a file that is not a distgrad file, was written by
    a newer format version, or is truncated, corrupted or hostile (nesting deeper than
    64 levels, a length larger than the file): no file makes it allocate more than the
    file holds.

    Example::

        state = dg.load("ckpt.dgt"); model.load_state_dict(state["model"])
    """
    _checks.load_args(f, map_location)
    if hasattr(f, "read"):
        return _load_stream(f, getattr(f, "name", "<stream>"), map_location, _stream_left(f))
    name = os.fspath(f)
    with open(name, "rb") as fh:
        return _load_stream(fh, name, map_location, os.fstat(fh.fileno()).st_size)


def _stream_left(f):
    """Bytes left in a seekable stream, None for a pipe or socket."""
    try:
        if not f.seekable():
            return None
        here = f.tell()
        end = f.seek(0, os.SEEK_END)
        f.seek(here)
        return end - here
    except (AttributeError, OSError, ValueError):
        return None


def _load_stream(stream, name, map_location, size):
    src = _Source(stream, name, size)
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        if not MAGIC.startswith(head[:len(MAGIC)]):
            raise SerializationError(f"{name}: not a distgrad file (bad magic)")
        raise SerializationError(f"{name}: file is truncated: {len(head)} bytes, shorter than "
                                 f"the {_HEADER.size}-byte header")
    if src.left is not None:
        src.left -= _HEADER.size
    magic, version, meta_len, meta_crc, data_len = _HEADER.unpack(head)
    if magic != MAGIC:
        raise SerializationError(f"{name}: not a distgrad file (bad magic {magic!r})")
    if version > VERSION:
        raise SerializationError(f"{name}: format version {version} is newer than this "
                                 f"distgrad supports ({VERSION}); upgrade distgrad")
    if version < VERSION:
        raise SerializationError(f"{name}: format version {version} is no longer supported")
    if src.left is not None:
        expected = meta_len + data_len
        if src.left < expected:
            raise SerializationError(f"{name}: file is truncated: expected "
                                     f"{_HEADER.size + expected} bytes, found "
                                     f"{_HEADER.size + src.left}")
        if src.left > expected:
            raise SerializationError(f"{name}: file is corrupted: {src.left - expected} "
                                     "unexpected bytes after the data")
    meta = src.read(meta_len, "its table of contents")
    if zlib.crc32(meta) != meta_crc:
        raise SerializationError(f"{name}: file is corrupted: checksum mismatch")
    if src.left is None:
        src.left = data_len     # a pipe: the arrays may take no more than the header says
    else:
        src.left = min(src.left, data_len)
    try:
        obj = msgpack.unpackb(meta, ext_hook=_make_hook(map_location, src), raw=False,
                              strict_map_key=False)
    except SerializationError:
        raise
    except Exception as e:          # checksum passed but content is malformed: hostile or a bug
        raise SerializationError(f"{name}: malformed contents ({type(e).__name__}: {e})") from None
    if _checks.too_deep(obj):
        raise SerializationError(f"{name}: contents nest deeper than {_checks.MAX_DEPTH} levels")
    return obj
