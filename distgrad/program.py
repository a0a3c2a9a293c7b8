"""The program IR and its msgpack wire format.

A program is a list of instructions over numbered slots; it is what the driver
records from ops on distributed values and what every worker runs. Instructions:

    ["op", name, args, attrs, out_slot, grad_enabled]   args: ["s", slot] or ["c", constant]
    ["put", slot, input_index, requires_grad]           a new value from the message's arrays
    ["update", slot, input_index]                       new data for an existing value
    ["assign", target_slot, source_slot]                in-place write (optimizer steps)
    ["backward", root, seed, root_placement, retain, [[leaf, prev_grad, new_grad, replicated]..]]
    ["fetch", slot]                                     send the local value back

Slots listed in ``ext`` are bound to values of earlier programs; slots in ``keep`` are
stored for later programs. The structure (instructions, slot count, ext, keep) is
hashed to a key: a worker caches it, so a repeated step sends only the key, the bound
value ids and its new arrays. Arrays travel as ext types (dtype, shape, bytes), or by
index into a side list that the transport carries (Ray object references for big ones).
Nothing is ever unpickled.
"""
import hashlib

import msgpack
import numpy as np

from .ops import OPS

PROTOCOL = 1
EXT_ARRAY, EXT_ARRAY_REF, EXT_SLICE, EXT_ELLIPSIS, EXT_TUPLE, EXT_DTYPE = 1, 2, 3, 4, 5, 6
MAX_MESSAGE_BYTES = 1 << 30           # inline limit; bigger arrays go by reference
INLINE_ARRAY_BYTES = 1 << 20          # arrays above this travel in the side list
MAX_INSTRUCTIONS = 1_000_000
PROGRAM_CACHE_SIZE = 256              # programs a worker keeps; the driver mirrors its LRU
NOT_CACHED = "is not cached on this worker"


class ProgramError(ValueError):
    """A malformed, oversized or invalid program (reported back to the driver)."""


def _array_bytes(a):
    a = np.ascontiguousarray(a)
    return msgpack.packb([a.dtype.str, list(a.shape), a.tobytes()], use_bin_type=True)


def encode(obj, side=None):
    """msgpack bytes for a message; big arrays are appended to ``side`` (if given)."""
    def default(o):
        if isinstance(o, np.ndarray):
            if side is not None and o.nbytes > INLINE_ARRAY_BYTES:
                side.append(o)
                return msgpack.ExtType(EXT_ARRAY_REF, msgpack.packb(len(side) - 1))
            return msgpack.ExtType(EXT_ARRAY, _array_bytes(o))
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, tuple):
            return msgpack.ExtType(EXT_TUPLE, msgpack.packb(list(o), default=default,
                                                            strict_types=True, use_bin_type=True))
        if isinstance(o, slice):
            return msgpack.ExtType(EXT_SLICE, msgpack.packb([o.start, o.stop, o.step], default=default))
        if o is Ellipsis:
            return msgpack.ExtType(EXT_ELLIPSIS, b"")
        if isinstance(o, np.dtype):
            return msgpack.ExtType(EXT_DTYPE, o.str.encode())
        if hasattr(o, "__array__") and hasattr(o, "shape"):      # cupy arrays: sent as host data
            return default(np.asarray(o.get() if hasattr(o, "get") else o))
        raise TypeError(f"cannot encode {type(o).__name__} in a program")
    return msgpack.packb(obj, default=default, strict_types=True, use_bin_type=True)


def decode(data, side=(), max_bytes=MAX_MESSAGE_BYTES):
    """Inverse of ``encode``, with size limits; raises ``ProgramError`` on bad input."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProgramError(f"message must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProgramError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")

    def hook(code, payload):
        if code == EXT_ARRAY:
            dtype, shape, raw = msgpack.unpackb(payload, raw=False)
            dtype = np.dtype(dtype)
            if dtype.hasobject:
                raise ProgramError("object arrays are not accepted")
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if expected != len(raw):
                raise ProgramError(f"array of shape {shape} and dtype {dtype} needs {expected} "
                                   f"bytes, got {len(raw)}")
            return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        if code == EXT_ARRAY_REF:
            i = msgpack.unpackb(payload)
            if not isinstance(i, int) or not 0 <= i < len(side):
                raise ProgramError(f"array reference {i!r} out of range ({len(side)} arrays sent)")
            return side[i]
        if code == EXT_TUPLE:
            return tuple(msgpack.unpackb(payload, ext_hook=hook, raw=False, strict_map_key=False))
        if code == EXT_SLICE:
            return slice(*msgpack.unpackb(payload, ext_hook=hook, raw=False))
        if code == EXT_ELLIPSIS:
            return Ellipsis
        if code == EXT_DTYPE:
            return np.dtype(payload.decode())
        raise ProgramError(f"unknown ext type {code}")
    try:
        unpacker = msgpack.Unpacker(ext_hook=hook, raw=False, strict_map_key=False,
                                    max_buffer_size=max_bytes)
        unpacker.feed(data)
        out = unpacker.unpack()
        if unpacker.tell() != len(data):
            raise ProgramError(f"trailing bytes after the message ({len(data) - unpacker.tell()})")
        return out
    except ProgramError:
        raise
    except Exception as e:         # msgpack raises several types for malformed input
        raise ProgramError(f"malformed message: {type(e).__name__}: {e}") from None


def structure_key(structure):
    return hashlib.sha1(encode(structure)).hexdigest()


_ARITY = {"put": 4, "update": 3, "assign": 3, "backward": 6, "fetch": 2, "op": 6}


def validate(structure):
    """Check a decoded program structure; raise ``ProgramError`` naming what is wrong."""
    if not isinstance(structure, dict) or not {"instrs", "nslots", "ext", "keep"} <= set(structure):
        raise ProgramError("program structure must be a dict with instrs, nslots, ext, keep")
    instrs, nslots = structure["instrs"], structure["nslots"]
    if not isinstance(nslots, int) or nslots < 0 or not isinstance(instrs, list):
        raise ProgramError("bad program header")
    if len(instrs) > MAX_INSTRUCTIONS:
        raise ProgramError(f"program of {len(instrs)} instructions exceeds {MAX_INSTRUCTIONS}")
    defined = set(structure["ext"])

    def slot(s, where, must_exist=True):
        if not isinstance(s, int) or not 0 <= s < nslots:
            raise ProgramError(f"{where}: slot {s!r} out of range (program has {nslots} slots)")
        if must_exist and s not in defined:
            raise ProgramError(f"{where}: slot {s} is used before it is defined")
        return s

    for n, ins in enumerate(instrs):
        if not isinstance(ins, list) or not ins or ins[0] not in _ARITY:
            raise ProgramError(f"instruction {n}: unknown instruction {ins[:1] if isinstance(ins, list) else ins!r}")
        kind = ins[0]
        if len(ins) != _ARITY[kind]:
            raise ProgramError(f"instruction {n} ({kind}): expected {_ARITY[kind]} fields, got {len(ins)}")
        where = f"instruction {n} ({kind}{' ' + str(ins[1]) if kind == 'op' else ''})"
        if kind == "op":
            _, name, args, attrs, out, _grad = ins
            if name not in OPS:
                raise ProgramError(f"{where}: unknown op '{name}'")
            if not isinstance(args, list) or not isinstance(attrs, dict):
                raise ProgramError(f"{where}: args must be a list and attrs a dict")
            for a in args:
                if not (isinstance(a, list) and len(a) == 2 and a[0] in ("s", "c")):
                    raise ProgramError(f"{where}: bad argument {a!r}")
                if a[0] == "s":
                    slot(a[1], where)
            defined.add(slot(out, where, False))
        elif kind in ("put", "update"):
            if kind == "update":
                slot(ins[1], where)
            defined.add(slot(ins[1], where, False))
            if not isinstance(ins[2], int) or ins[2] < 0:
                raise ProgramError(f"{where}: bad input index {ins[2]!r}")
        elif kind == "assign":
            slot(ins[1], where)
            slot(ins[2], where)
        elif kind == "fetch":
            slot(ins[1], where)
        elif kind == "backward":
            _, root, seed, placement, _retain, leaves = ins
            slot(root, where)
            if seed != -1:
                slot(seed, where)
            if placement not in ("S", "R", "P"):
                raise ProgramError(f"{where}: bad root placement {placement!r}")
            for leaf in leaves:
                if not (isinstance(leaf, list) and len(leaf) == 4):
                    raise ProgramError(f"{where}: bad leaf entry {leaf!r}")
                slot(leaf[0], where)
                if leaf[1] != -1:
                    slot(leaf[1], where)
                defined.add(slot(leaf[2], where, False))
    for s in structure["keep"]:
        slot(s, "keep")
    return structure
