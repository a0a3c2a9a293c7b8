"""The program IR and its msgpack wire format.

A program is a list of instructions over numbered slots; it is what the driver
records from ops on distributed values and what every worker runs. Instructions:

    ["op", name, args, attrs, out_slot, grad_enabled(, {attr: scalar_index})]
                                                        args: ["s", slot], ["c", constant] or
                                                        ["k", scalar_index]; float operands and
                                                        float attrs are message scalars
    ["put", slot, input_index, requires_grad]           a new value from the message's arrays
    ["update", slot, input_index]                       new data for an existing value
    ["assign", target_slot, source_slot]                in-place write (optimizer steps)
    ["foreach", name, [args, ...], attrs, {attr: scalar_index}, out_slots]
                                                        op(*args) for each args, into its out
                                                        slot, or (no out slots) into args[0]'s
    ["detach", source_slot, out_slot, requires_grad]    the value without its history
    ["backward", roots, seeds, root_placements, retain, leaves, create_graph, hooks]
                                                        leaves: [[leaf, prev_grad, new_grad,
                                                        replicated], ...]; seeds -1: ones
    ["grad", roots, seeds, root_placements, retain, create_graph, inputs, out_slots, hooks]
    ["custom", name, arg_slots, out_slot, result_slot, captured, sub_program]
                                                        a custom Function; its traced backward
    ["fetch", slot]                                     send the local value back
    ["source", [slot, ...], source_id, input_index, ahead_index]
                                                        rows of a worker-side data source (one slot
                                                        per column); the input names which rows, the
                                                        ahead input (-1: none) the next step's

Slots listed in ``ext`` are bound to values of earlier programs; slots in ``keep`` are
stored for later programs. The structure (instructions, slot count, ext, keep) is
hashed to a key: a worker caches it, so a repeated step sends only the key, the bound
value ids and its new arrays. Arrays travel as ext types (dtype, shape, bytes), or by
index into a side list that the transport carries (Ray object references for big ones).
Nothing is ever unpickled.
"""
import hashlib
import math

import msgpack
import numpy as np

from . import _checks
from .ops import OPS

PROTOCOL = 1
EXT_ARRAY, EXT_ARRAY_REF, EXT_SLICE, EXT_ELLIPSIS, EXT_TUPLE, EXT_DTYPE = 1, 2, 3, 4, 5, 6
MAX_MESSAGE_BYTES = 1 << 30           # inline limit; bigger arrays go by reference
INLINE_ARRAY_BYTES = 1 << 20          # arrays above this travel in the side list
MAX_INSTRUCTIONS = 1_000_000
MAX_DEPTH = _checks.MAX_DEPTH         # nesting of lists/dicts/tuples a message may have
PROGRAM_CACHE_SIZE = 256              # programs a worker keeps; the driver mirrors its LRU
NOT_CACHED = "is not cached on this worker"


class ProgramError(ValueError):
    """A malformed, oversized or invalid program (reported back to the driver)."""


def _array_bytes(a):
    # tobytes() is C order whatever the layout (ascontiguousarray would make 0-d arrays 1-d)
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
    try:
        return msgpack.packb(obj, default=default, strict_types=True, use_bin_type=True)
    finally:
        default = None   # it holds itself and ``side``: no cycle left behind


def _array_from(payload):
    """An inline array record ``[dtype, shape, bytes]``, checked before anything is allocated."""
    rec = msgpack.unpackb(payload, raw=False)
    if not (isinstance(rec, list) and len(rec) == 3):
        raise ProgramError("malformed array record (expected [dtype, shape, bytes])")
    dtype, shape, raw = rec
    dt = _checks.plain_dtype(dtype)
    if dt is None:
        raise ProgramError(f"array dtype {dtype!r} is not accepted (plain numeric dtypes only)")
    if not (isinstance(shape, list) and len(shape) <= _checks.MAX_NDIM
            and all(type(n) is int and n >= 0 for n in shape)) or not isinstance(raw, bytes):
        raise ProgramError(f"malformed array record: shape {shape!r}")
    expected = math.prod(shape) * dt.itemsize        # Python ints: no overflow
    if expected != len(raw):
        raise ProgramError(f"array of shape {tuple(shape)} and dtype {dt} needs {expected} "
                           f"bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=dt).reshape(shape).copy()


def decode(data, side=(), max_bytes=MAX_MESSAGE_BYTES):
    """Inverse of ``encode``, with limits; raises ``ProgramError`` on bad input.

    Messages come from other processes (programs from the driver, replies from workers),
    so nothing in them is trusted: nesting is capped at ``MAX_DEPTH``, every declared
    length is bounded by the bytes that carry it, arrays must be plain numeric data.

    Example::

        decode(encode({"v": 1, "x": np.ones(2)}))     # {'v': 1, 'x': array([1., 1.])}
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProgramError(f"message must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProgramError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    depth = [0]           # ext records nest by recursive unpacking: capped before the C stack

    def nested(payload):
        if depth[0] >= MAX_DEPTH:
            raise ProgramError(f"message nests deeper than {MAX_DEPTH} levels")
        depth[0] += 1
        try:
            return msgpack.unpackb(payload, ext_hook=hook, raw=False, strict_map_key=False)
        finally:
            depth[0] -= 1

    def hook(code, payload):
        if code == EXT_ARRAY:
            return _array_from(payload)
        if code == EXT_ARRAY_REF:
            i = msgpack.unpackb(payload)
            if type(i) is not int or not 0 <= i < len(side):
                raise ProgramError(f"array reference {i!r} out of range ({len(side)} arrays sent)")
            return side[i]
        if code == EXT_TUPLE:
            items = nested(payload)
            if not isinstance(items, list):
                raise ProgramError("malformed tuple record")
            return tuple(items)
        if code == EXT_SLICE:
            parts = nested(payload)
            if not (isinstance(parts, list) and len(parts) == 3):
                raise ProgramError("malformed slice record (expected [start, stop, step])")
            return slice(*parts)
        if code == EXT_ELLIPSIS:
            return Ellipsis
        if code == EXT_DTYPE:
            dt = _checks.plain_dtype(payload.decode("ascii", "replace"))
            if dt is None:
                raise ProgramError(f"dtype {payload[:16]!r} is not accepted (plain numeric "
                                   "dtypes only)")
            return dt
        raise ProgramError(f"unknown ext type {code}")
    try:
        unpacker = msgpack.Unpacker(ext_hook=hook, raw=False, strict_map_key=False,
                                    max_buffer_size=max(len(data), 1))
        unpacker.feed(data)
        out = unpacker.unpack()
        if unpacker.tell() != len(data):
            raise ProgramError(f"trailing bytes after the message ({len(data) - unpacker.tell()})")
    except ProgramError:
        raise
    except Exception as e:         # msgpack raises several types for malformed input
        raise ProgramError(f"malformed message: {type(e).__name__}: {e}") from None
    finally:
        # hook and nested hold each other (closure cells): a reference cycle that kept
        # ``side`` (a message's big arrays: a model's parameters, a batch) alive until the
        # cyclic collector ran, 200 MB of a worker's resident memory at times.
        hook = nested = None
    if _checks.too_deep(out, MAX_DEPTH):
        raise ProgramError(f"message nests deeper than {MAX_DEPTH} levels")
    return out


def structure_key(structure):
    return hashlib.sha1(encode(structure)).hexdigest()


class _Checker:
    """State of one ``validate`` run: the slot count and the slots defined so far."""

    def __init__(self, nslots, ext, depth=0):
        self.nslots = nslots
        self.defined = set(ext)
        self.fields = len(ext)        # slot fields seen: nslots may not exceed them
        self.depth = depth            # nesting of sub-programs
        self.n = 0                    # the instruction being checked
        self.last = None              # slot -> last instruction naming it (release_points)

    def slot(self, s, where, must_exist=True):
        """``s`` as a slot in range (and defined, unless ``must_exist`` is False)."""
        self.fields += 1
        if self.last is not None:
            self.last[s] = self.n
        if type(s) is not int or not 0 <= s < self.nslots:
            raise ProgramError(f"{where}: slot {s!r} out of range (program has {self.nslots} "
                               "slots)")
        if must_exist and s not in self.defined:
            raise ProgramError(f"{where}: slot {s} is used before it is defined")
        return s

    def define(self, s, where):
        self.defined.add(self.slot(s, where, False))

    def optional(self, s, where):
        """A slot field that may be -1 (absent)."""
        if s != -1:
            self.slot(s, where)

    @staticmethod
    def index(i, where, what="input index"):
        if type(i) is not int or i < 0:
            raise ProgramError(f"{where}: bad {what} {i!r}")


def _check_op(ins, c, where):
    name, args, attrs, out = ins[1:5]
    _check_op_call(name, args, attrs, ins[6] if len(ins) > 6 else {}, c, where)
    c.define(out, where)


def _check_op_call(name, args, attrs, floats, c, where):
    """An op's name, arguments, attrs and float attrs (name -> index of a message scalar)."""
    if not isinstance(name, str) or name not in OPS:
        raise ProgramError(f"{where}: unknown op {name!r}")
    if not isinstance(args, list) or not isinstance(attrs, dict):
        raise ProgramError(f"{where}: args must be a list and attrs a dict")
    if not all(isinstance(k, str) for k in attrs):
        raise ProgramError(f"{where}: attribute names must be strings")
    for a in args:
        if not (isinstance(a, list) and len(a) == 2 and a[0] in ("s", "c", "k")):
            raise ProgramError(f"{where}: bad argument {a!r:.80}")
        if a[0] == "s":
            c.slot(a[1], where)
        elif a[0] == "k":
            c.index(a[1], where, "scalar index")
    if not (isinstance(floats, dict) and all(isinstance(k, str) for k in floats)):
        raise ProgramError(f"{where}: scalar attrs must map names to indices")
    for i in floats.values():
        c.index(i, where, "scalar index")


def _check_foreach(ins, c, where):
    _, name, groups, attrs, floats, outs = ins
    if not _list(groups, where, "argument lists"):
        raise ProgramError(f"{where}: a foreach names at least one argument list")
    if _list(outs, where, "output slots") and len(outs) != len(groups):
        raise ProgramError(f"{where}: one output slot per argument list, or none (in place)")
    for args in groups:
        _check_op_call(name, args, attrs, floats, c, where)
        if not outs and not (args and args[0][0] == "s"):
            raise ProgramError(f"{where}: each argument list starts with the slot written")
    for s in outs:
        c.define(s, where)


def _check_put(ins, c, where):
    c.define(ins[1], where)
    c.index(ins[2], where)


def _check_update(ins, c, where):
    c.slot(ins[1], where)
    c.index(ins[2], where)


def _check_assign(ins, c, where):
    c.slot(ins[1], where)
    c.slot(ins[2], where)


def _check_fetch(ins, c, where):
    c.slot(ins[1], where)


def _check_source(ins, c, where):
    _, outs, sid, idx, ahead = ins
    if not _list(outs, where, "column slots"):
        raise ProgramError(f"{where}: a data source read defines at least one column")
    for s in outs:
        c.define(s, where)
    c.index(sid, where, "data source id")
    c.index(idx, where)
    if ahead != -1:
        c.index(ahead, where)


def _list(v, where, what):
    if not isinstance(v, list):
        raise ProgramError(f"{where}: {what} must be a list")
    return v


def _check_roots(roots, seeds, codes, c, where):
    """The roots of a backward pass, their seeds (-1: ones) and placement codes."""
    roots, seeds, codes = (_list(v, where, w) for v, w in
                           ((roots, "roots"), (seeds, "seeds"), (codes, "root placements")))
    if not roots or not len(roots) == len(seeds) == len(codes):
        raise ProgramError(f"{where}: roots, seeds and placements must be non-empty and alike "
                           "in length")
    for r, sd, code in zip(roots, seeds, codes):
        c.slot(r, where)
        c.optional(sd, where)
        if code not in ("S", "R", "P"):
            raise ProgramError(f"{where}: bad root placement {code!r:.40}")


def _check_hooks(hooks, c, where):
    """Traced hooks: ``[slot, is_leaf, captured slots, sub-program]`` each."""
    for h in _list(hooks, where, "hooks"):
        if not (isinstance(h, list) and len(h) == 4 and h[1] in (0, 1)):
            raise ProgramError(f"{where}: bad hook entry {h!r:.80}")
        c.slot(h[0], where)
        _check_subprogram(h[2], h[3], 1, c, where)


def _check_subprogram(captured, sub, n_inputs, c, where):
    """A traced sub-program (custom backward or hook): its captured parent slots and its
    own structure, validated like a program (ops, in-place writes, nested customs)."""
    for s in _list(captured, where, "captured slots"):
        c.slot(s, where)
    if not (isinstance(sub, dict) and {"instrs", "nslots", "ext", "inputs", "results"} <= set(sub)):
        raise ProgramError(f"{where}: a sub-program must be a dict with instrs, nslots, ext, "
                           "inputs, results")
    if c.depth >= MAX_DEPTH:
        raise ProgramError(f"{where}: sub-programs nest deeper than {MAX_DEPTH}")
    ext, inputs = _slot_list(sub, "ext"), _slot_list(sub, "inputs")
    if len(ext) != len(captured) or len(inputs) != n_inputs:
        raise ProgramError(f"{where}: sub-program binds {len(ext)} captured values and "
                           f"{len(inputs)} inputs; expected {len(captured)} and {n_inputs}")
    nslots, instrs = sub["nslots"], sub["instrs"]
    if type(nslots) is not int or nslots < 0 or not isinstance(instrs, list):
        raise ProgramError(f"{where}: bad sub-program header")
    inner = _Checker(nslots, ext + inputs, c.depth + 1)
    for s in ext + inputs:
        inner.slot(s, where, False)
    _check_instructions(instrs, inner, SUBPROGRAM_INSTRUCTIONS, f"{where}: sub-program ")
    for s in _list(sub["results"], where, "results"):
        inner.optional(s, where)
    if nslots > inner.fields + 1:
        raise ProgramError(f"{where}: sub-program declares {nslots} slots but names only "
                           f"{inner.fields}")


def _check_backward(ins, c, where):
    _, roots, seeds, codes, _retain, leaves, _create, hooks = ins
    _check_roots(roots, seeds, codes, c, where)
    for leaf in _list(leaves, where, "leaves"):
        if not (isinstance(leaf, list) and len(leaf) == 4):
            raise ProgramError(f"{where}: bad leaf entry {leaf!r:.80}")
        c.slot(leaf[0], where)
        c.optional(leaf[1], where)
        c.define(leaf[2], where)
    _check_hooks(hooks, c, where)


def _check_grad(ins, c, where):
    _, roots, seeds, codes, _retain, _create, inputs, outs, hooks = ins
    _check_roots(roots, seeds, codes, c, where)
    if len(_list(inputs, where, "inputs")) != len(_list(outs, where, "outputs")):
        raise ProgramError(f"{where}: one output slot per input is needed")
    for s in inputs:
        c.slot(s, where)
    _check_hooks(hooks, c, where)
    for s in outs:
        c.define(s, where)


def _check_detach(ins, c, where):
    c.slot(ins[1], where)
    c.define(ins[2], where)


def _check_custom(ins, c, where):
    _, name, args, out, result, captured, sub = ins
    if not isinstance(name, str):
        raise ProgramError(f"{where}: the Function's name must be a string")
    for s in _list(args, where, "arguments"):
        c.optional(s, where)
    c.slot(out, where)
    _check_subprogram(captured, sub, 1, c, where)
    if len(sub["results"]) != len(args):
        raise ProgramError(f"{where}: one gradient per argument is needed")
    c.define(result, where)


# One checker per instruction kind: kind -> (number of fields, checker). A new kind adds
# its entry here; validate() rejects kinds not in the table.
INSTRUCTIONS = {
    "op": (6, _check_op),
    "put": (4, _check_put),
    "update": (3, _check_update),
    "assign": (3, _check_assign),
    "foreach": (6, _check_foreach),
    "fetch": (2, _check_fetch),
    "backward": (8, _check_backward),
    "grad": (9, _check_grad),
    "custom": (7, _check_custom),
    "detach": (4, _check_detach),
    "source": (5, _check_source),
}
# What a traced sub-program may hold: no inputs, fetches or nested backward passes.
SUBPROGRAM_INSTRUCTIONS = {k: INSTRUCTIONS[k] for k in ("op", "assign", "custom", "detach")}


def _slot_list(structure, key):
    v = structure[key]
    if not isinstance(v, list) or not all(type(s) is int for s in v):
        raise ProgramError(f"program {key} must be a list of slot numbers")
    return v


def _check_instructions(instrs, c, table, prefix=""):
    for n, ins in enumerate(instrs):
        kind = ins[0] if isinstance(ins, list) and ins else None
        if not isinstance(kind, str) or kind not in table:
            raise ProgramError(f"{prefix}instruction {n}: unknown instruction {kind!r:.40}; "
                               f"known: {', '.join(table)}")
        arity, check = table[kind]
        # An op may carry a 7th field: its float attrs, as message scalars.
        if len(ins) != arity and not (kind == "op" and len(ins) == arity + 1):
            raise ProgramError(f"{prefix}instruction {n} ({kind}): expected {arity} fields, "
                               f"got {len(ins)}")
        named = kind in ("op", "custom", "foreach") and isinstance(ins[1], str)
        c.n = n
        check(ins, c, f"{prefix}instruction {n} ({kind}{' ' + ins[1][:40] if named else ''})")


def release_points(structure):
    """For each instruction of a validated program, the slots no later instruction names:
    a worker drops its references there, so a step holds each temporary (activations
    outside the graph, optimizer intermediates) only while it is needed. Kept slots are
    never dropped.

    Example::

        release_points({"instrs": [["fetch", 0]], "nslots": 1, "ext": [0], "keep": []})  # [[0]]
    """
    c = _Checker(structure["nslots"], structure["ext"])
    c.last = {}
    _check_instructions(structure["instrs"], c, INSTRUCTIONS)
    keep = set(structure["keep"])
    drops = [[] for _ in structure["instrs"]]
    for s, n in c.last.items():
        if s not in keep:
            drops[n].append(s)
    return drops


def validate(structure):
    """Check a decoded program structure; raise ``ProgramError`` naming what is wrong.

    Any structure a message can carry gives either the structure back or a
    ``ProgramError``: wrong types, unknown instructions or ops, slots out of range or used
    before being defined, and a slot count larger than the program uses (a worker
    allocates one entry per slot).

    Example::

        validate({"instrs": [["fetch", 0]], "nslots": 1, "ext": [0], "keep": []})
    """
    if not isinstance(structure, dict) or not {"instrs", "nslots", "ext", "keep"} <= set(structure):
        raise ProgramError("program structure must be a dict with instrs, nslots, ext, keep")
    instrs, nslots = structure["instrs"], structure["nslots"]
    if type(nslots) is not int or nslots < 0 or not isinstance(instrs, list):
        raise ProgramError("bad program header: nslots must be an int >= 0 and instrs a list")
    if len(instrs) > MAX_INSTRUCTIONS:
        raise ProgramError(f"program of {len(instrs)} instructions exceeds {MAX_INSTRUCTIONS}")
    c = _Checker(nslots, _slot_list(structure, "ext"))
    for s in c.defined:
        c.slot(s, "ext", False)
    _check_instructions(instrs, c, INSTRUCTIONS)
    for s in _slot_list(structure, "keep"):
        c.slot(s, "keep")
    if nslots > c.fields + 1:
        raise ProgramError(f"program declares {nslots} slots but names only {c.fields}")
    return structure
