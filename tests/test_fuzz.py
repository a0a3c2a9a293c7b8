"""Fuzzing the decoders: saved files, program messages, TCP frames (issue 12), the
driver's socket-channel frames.

Two kinds of tests:

- Seeded mutation campaigns (bit flips, truncation, inserted and deleted bytes,
  length fields overwritten with huge values, deep nesting, huge declared sizes) of
  valid saved files, encoded programs and TCP frames. They run in a child interpreter
  whose address space is capped (RLIMIT_AS = its size after start-up + 256 MB): an
  allocation that a file or a frame forces shows up there as a MemoryError, a crash
  as the child's exit signal, a hang as the parent's timeout.
- Hypothesis strategies for messages that are structurally valid but hostile
  (plausible fields with wrong types, huge or negative numbers, unknown names).

Every case must end in the decoder's own exception (SerializationError,
ProgramError, CollectiveError and its subclasses) or a valid result. A failing case
is reported with its campaign, seed and case number, which replay it exactly.
"""
import io
import os
import random
import subprocess
import sys
import threading
import time
import zlib

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import distgrad as dg
from distgrad import program as prog, serialization
from distgrad.program import ProgramError
from distgrad.serialization import SerializationError
from distgrad.workers.collective import CollectiveError
from distgrad.workers.collective import base, hierarchical, tcp
from distgrad.workers.collective.rendezvous import DictStore

HERE = os.path.abspath(__file__)
SLACK_BYTES = 256 << 20          # what a campaign may allocate beyond the child's start-up size
HYPO = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- mutations

_LEN_MARKERS = {0xc4: 1, 0xc5: 2, 0xc6: 4, 0xc7: 1, 0xc8: 2, 0xc9: 4, 0xd9: 1, 0xda: 2,
                0xdb: 4, 0xdc: 2, 0xdd: 4, 0xde: 2, 0xdf: 4}      # msgpack: marker -> length bytes


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random corruption of ``data``: what a disk, a network or an attacker may do."""
    b = bytearray(data)
    if not b:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
    kind = rng.randrange(7)
    if kind == 0:                                   # bit flips
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == 1:                                 # truncation
        del b[rng.randrange(len(b)):]
    elif kind == 2:                                 # bytes inserted
        at = rng.randrange(len(b) + 1)
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 3:                                 # bytes deleted
        at = rng.randrange(len(b))
        del b[at: at + rng.randint(1, 16)]
    elif kind == 4:                                 # a word overwritten with a huge value
        at = rng.randrange(len(b))
        width = rng.choice((1, 2, 4, 8))
        value = rng.choice((0xff, 0x7f, 0x80, 0)) if width == 1 else rng.choice(
            (2 ** (8 * width) - 1, 2 ** (8 * width - 1), 2 ** (8 * width - 1) - 1))
        b[at: at + width] = value.to_bytes(width, "little")[: len(b) - at]
    elif kind == 5:                                 # a msgpack length field overflowed
        spots = [i for i, x in enumerate(b) if x in _LEN_MARKERS]
        if spots:
            i = rng.choice(spots)
            n = _LEN_MARKERS[b[i]]
            b[i + 1: i + 1 + n] = b"\xff" * n
        else:
            b[rng.randrange(len(b))] = 0xdd
    else:                                           # a random slice duplicated (repeats)
        lo = rng.randrange(len(b))
        hi = min(len(b), lo + rng.randint(1, 64))
        b[hi:hi] = b[lo:hi] * rng.randint(1, 8)
    return bytes(b)


def nested_ext(code, depth, leaf):
    """msgpack bytes of ``depth`` ext records of type ``code`` wrapped in one another."""
    inner = msgpack.packb(leaf)
    for _ in range(depth):
        inner = msgpack.packb([msgpack.ExtType(code, inner)], use_bin_type=True)
    return msgpack.packb(msgpack.ExtType(code, inner), use_bin_type=True)


def nested_lists(depth):
    return b"\x91" * depth + b"\x01"                 # [[[...[1]...]]] in raw msgpack


# ---------------------------------------------------------------- saved files

def _valid_files():
    from distgrad.autograd import Variable
    w = Variable(dg.randn(3, 4), requires_grad=True)
    objs = [
        {"w": w, "b": dg.nn.Parameter(dg.zeros(4)), "epoch": 3, "name": "run"},
        {"opt": {"state": {0: {"m": np.arange(6, dtype=np.float64).reshape(2, 3)}},
                 "groups": [{"lr": 0.1, "params": [0, 1]}]},
         "t": (1, (2.5, (None, b"x")), np.ones(2, np.int8))},
        [dg.tensor([[1.0, 2.0]]), np.zeros((0, 3), np.float32), np.array(7, np.int64)],
    ]
    out = []
    for o in objs:
        buf = io.BytesIO()
        dg.save(o, buf)
        out.append(buf.getvalue())
    return out


def _file_blob(meta: bytes, data: bytes = b"", data_len=None) -> bytes:
    return serialization._HEADER.pack(serialization.MAGIC, serialization.VERSION, len(meta),
                                      zlib.crc32(meta), len(data) if data_len is None
                                      else data_len) + meta + data


def _fix_meta_crc(blob: bytes, rng: random.Random) -> bytes:
    """Mutate the table of contents and fix its checksum (what an attacker would do)."""
    h = serialization._HEADER
    magic, version, meta_len, _, data_len = h.unpack(blob[:h.size])
    meta = mutate(blob[h.size: h.size + meta_len], rng)
    return h.pack(magic, version, len(meta), zlib.crc32(meta), data_len) + meta + \
        blob[h.size + meta_len:]


def _header_overflow(blob: bytes, rng: random.Random) -> bytes:
    h = serialization._HEADER
    magic, version, meta_len, crc, data_len = h.unpack(blob[:h.size])
    huge = rng.choice((2 ** 64 - 1, 2 ** 63, 2 ** 40, 2 ** 31, meta_len + 1))
    if rng.random() < 0.5:
        meta_len = huge
    else:
        data_len = huge
    return h.pack(magic, version, meta_len, crc, data_len) + blob[h.size:]


class _Pipe(io.RawIOBase):
    """A non-seekable stream: its size is unknown to the reader."""

    def __init__(self, data):
        self._b = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buf):
        return self._b.readinto(buf)


def _hostile_files():
    rec = lambda dtype, shape, nbytes: msgpack.ExtType(   # noqa: E731
        1, msgpack.packb([dtype, shape, "tensor", False, nbytes, 0]))
    metas = [
        nested_ext(3, 200, [1]),                                  # the 746-byte segfault
        nested_ext(3, 5000, [1]),
        nested_lists(100),
        nested_lists(100_000),
        msgpack.packb({"x": rec("<f4", [1 << 32], 4 << 32)}),    # 16 GiB in a small file
        msgpack.packb({"x": rec("<f4", [1 << 62, 4], 0)}),       # overflowing shape product
        msgpack.packb({"x": rec("<f4", [-1], -4)}),
        msgpack.packb({"x": rec("|O", [1], 8)}),
        msgpack.packb({"x": rec("<f4", [1] * 40, 4)}),
        msgpack.packb({"x": rec(7, "shape", None)}),
        msgpack.packb({"x": msgpack.ExtType(1, b"\xdd\xff\xff\xff\xff")}),
        msgpack.packb({"x": msgpack.ExtType(3, msgpack.packb({"not": "a list"}))}),
        msgpack.packb({"x": msgpack.ExtType(99, b"")}),
    ]
    return [_file_blob(m, b"", 4 << 32 if i == 4 else None) for i, m in enumerate(metas)]


def _load_any(blob, how, tmpdir):
    if how == 0:
        return dg.load(io.BytesIO(blob))
    if how == 1:
        return dg.load(io.BufferedReader(_Pipe(blob)))
    path = os.path.join(tmpdir, "case.dgt")
    with open(path, "wb") as f:
        f.write(blob)
    return dg.load(path)


def campaign_files(seed, cases):
    import tempfile
    rng = random.Random(seed)
    valid = _valid_files()
    tally = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        blobs = [(f"hostile {i}", b) for i, b in enumerate(_hostile_files())]
        for n in range(cases):
            base = rng.choice(valid)
            pick = rng.randrange(4)
            blob = (mutate(base, rng) if pick == 0 else _fix_meta_crc(base, rng) if pick <= 2
                    else _header_overflow(base, rng))
            blobs.append((f"case {n}", blob))
        for i, (what, blob) in enumerate(blobs):
            _expect(lambda: _load_any(blob, i % 3, tmpdir), SerializationError,
                    f"files seed={seed} {what}", tally)
    return tally


# ---------------------------------------------------------------- program messages

def _valid_messages():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    big = np.ones(prog.INLINE_ARRAY_BYTES // 8 + 1, np.float64)
    structure = {
        "instrs": [["put", 1, 0, True],
                   ["op", "mul", [["s", 0], ["s", 1]], {}, 2, True],
                   ["op", "getitem", [["s", 2]], {"index": (slice(0, 2, None), Ellipsis)}, 3, True],
                   ["op", "astype", [["s", 3]], {"dtype": np.dtype("float64")}, 4, False],
                   ["op", "sum", [["s", 4]], {"axis": (0, 1), "keepdims": False}, 5, True],
                   ["assign", 1, 3],
                   ["op", "add", [["s", 1], ["c", 2.0]], {}, 6, False],
                   ["fetch", 6]],
        "nslots": 7, "ext": [0], "keep": [1]}
    msgs = [{"v": prog.PROTOCOL, "key": prog.structure_key(structure), "prog": structure,
             "bind": [10, 11], "inputs": [a], "free": [3, 4]},
            {"v": prog.PROTOCOL, "key": "0" * 40, "bind": [], "inputs": [a, a[:1]]},
            {"fetched": {5: a, 6: np.float64(2.5)}, "error": None, "busy_s": 0.01},
            {"control": "import", "values": {7: [a, True]}, "v": prog.PROTOCOL}]
    out = [(prog.encode(m), ()) for m in msgs]
    side = []
    out.append((prog.encode({"v": prog.PROTOCOL, "inputs": [big]}, side), tuple(side)))
    return out


def _hostile_messages():
    arr = lambda dtype, shape, raw: msgpack.ExtType(   # noqa: E731
        prog.EXT_ARRAY, msgpack.packb([dtype, shape, raw], use_bin_type=True))
    return [
        nested_ext(prog.EXT_TUPLE, 200, [1]),
        nested_ext(prog.EXT_SLICE, 300, [1, 2, 3]),
        nested_lists(100),
        nested_lists(100_000),
        msgpack.packb({"x": arr("<f4", [1 << 40], b"")}, use_bin_type=True),
        msgpack.packb({"x": arr("<f4", [1 << 62, 4], b"")}, use_bin_type=True),
        msgpack.packb({"x": arr("|O", [1], b"\0" * 8)}, use_bin_type=True),
        msgpack.packb({"x": arr("V16", [1], b"\0" * 16)}, use_bin_type=True),
        msgpack.packb({"x": msgpack.ExtType(prog.EXT_DTYPE, b"|O")}, use_bin_type=True),
        msgpack.packb({"x": msgpack.ExtType(prog.EXT_DTYPE, b"\xff\xfe")}, use_bin_type=True),
        msgpack.packb({"x": msgpack.ExtType(prog.EXT_SLICE, msgpack.packb([1] * 9))}),
        msgpack.packb({"x": msgpack.ExtType(prog.EXT_ARRAY_REF, msgpack.packb(10 ** 6))}),
        b"\xc6\xff\xff\xff\xff" + b"\0" * 8,                     # bin32 of 4 GiB, 8 bytes sent
        b"\xdd\xff\xff\xff\xff\x01",                             # array32 of 4G items
        b"\xdf\xff\xff\xff\xff\x01\x01",                         # map32 of 4G pairs
        msgpack.packb({"v": 1, "prog": {"instrs": [["fetch", 0]], "nslots": 10 ** 12,
                                        "ext": [0], "keep": []}}),
    ]


def _decode_and_validate(data, side):
    msg = prog.decode(data, side)
    structure = msg.get("prog") if isinstance(msg, dict) else msg
    if structure is not None:
        prog.validate(structure)
    return msg


def campaign_programs(seed, cases):
    rng = random.Random(seed)
    valid = _valid_messages()
    tally = {}
    for i, data in enumerate(_hostile_messages()):
        _expect(lambda: _decode_and_validate(data, ()), ProgramError,
                f"programs seed={seed} hostile {i}", tally)
    for n in range(cases):
        data, side = rng.choice(valid)
        bad = mutate(data, rng)
        _expect(lambda: _decode_and_validate(bad, side), ProgramError,
                f"programs seed={seed} case {n}", tally)
    return tally


# ---------------------------------------------------------------- TCP frames

def _pair(name, ws=2, timeout_s=2.0):
    """A TCP group of ``ws`` ranks in threads of this process (loopback)."""
    store = DictStore()
    comms = [None] * ws

    def make(r):
        comms[r] = tcp.TcpCommunicator(r, ws, store, name, timeout_s=timeout_s,
                                       init_timeout_s=20)
    ts = [threading.Thread(target=make, args=(r,)) for r in range(ws)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert all(c is not None for c in comms), "group did not form"
    return comms


def _valid_frames():
    """(kind, bytes a peer sends) for one recv and one allgather on 2 ranks."""
    a = np.arange(10, dtype=np.float32).reshape(2, 5)
    meta = base.array_meta(a).tobytes()
    p2p = tcp._HDR.pack(tcp._OPS["p2p"], 1, a.nbytes, 0) + meta + a.tobytes()
    ag = tcp._HDR.pack(tcp._OPS["allgather_meta"], 1, len(meta), 0) + meta
    return [("recv", p2p), ("allgather", ag)]


def _one_frame_case(name, kind, payload, timeout_s=2.0):
    """Rank 1 writes ``payload`` raw on its socket to rank 0 and closes; rank 0 runs the
    matching call. Returns rank 0's outcome; checks that the group is then broken."""
    c0, c1 = _pair(name, timeout_s=timeout_s)
    try:
        sock = c1._p2p[0] if kind == "recv" else c1._ring[0]
        sock.sendall(payload)
        c1.close()
        x = np.arange(10, dtype=np.float32).reshape(2, 5)
        t0 = time.monotonic()
        try:
            out = c0.recv(None, 1) if kind == "recv" else c0.allgather(x)
        except CollectiveError:
            took = time.monotonic() - t0
            assert took < timeout_s + 3, f"the failure took {took:.1f}s (timeout {timeout_s}s)"
            with pytest.raises(CollectiveError):        # the group stays broken
                c0.recv(None, 1) if kind == "recv" else c0.allgather(x)
            raise
        return out
    finally:
        c0.close()
        c1.close()


def campaign_frames(seed, cases):
    rng = random.Random(seed)
    tally = {}
    for n, words in enumerate(_hostile_metas(rng, cases * 4)):
        _expect(lambda: base.parse_array_meta(np.array(words, np.int64), 1 << 30),
                base.MalformedMessage,
                f"frames seed={seed} meta {n}", tally)
    packed = hierarchical._pack_arrays([(0, np.ones(3)), (1, np.zeros((2, 2), np.int8))])
    for n in range(cases * 2):
        buf = np.frombuffer(mutate(packed.tobytes(), rng), np.uint8)
        _expect(lambda: hierarchical._unpack_arrays(buf, 2), base.MalformedMessage,
                f"frames seed={seed} packed {n}", tally)
    valid = _valid_frames()
    for n in range(cases // 8):
        kind, frame = rng.choice(valid)
        bad = mutate(frame, rng)
        _expect(lambda: _one_frame_case(f"fz{seed}_{n}", kind, bad), CollectiveError,
                f"frames seed={seed} socket {n} ({kind}, {bad[:48].hex()}...)", tally)
    return tally


def _hostile_metas(rng, n):
    good = base.array_meta(np.ones((3, 4), np.float32))
    big = [2 ** 63 - 1, -2 ** 63, 2 ** 40, -1, 0, 1 << 62]
    for _ in range(n):
        w = [int(x) for x in good]
        for _ in range(rng.randint(1, 4)):
            w[rng.randrange(len(w))] = rng.choice(big + [rng.getrandbits(63)])
        yield w


def campaign_channel_frames(seed, cases):
    """The driver's socket channel: mutated frames fed in random pieces end in a frame,
    a wait for more bytes, or a FrameError (``distgrad.framing``)."""
    from distgrad.framing import FrameError, FrameReader, frame_buffers
    rng = random.Random(seed)
    tally = {}
    msg = prog.encode({"v": prog.PROTOCOL, "key": "k", "bind": [1, 2]})
    valid = [b"".join(bytes(b) for b in frame_buffers(msg, side)) for side in
             ([], [np.arange(6, dtype=np.float32).reshape(2, 3)],
              [np.ones(4, np.int64), np.zeros((2, 0)), np.array(1.5)])]

    def feed(data):
        reader = FrameReader()
        cut = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 3)))
        for a, b in zip([0] + cut, cut + [len(data)]):
            reader.feed(data[a:b])
            while reader.next_frame() is not None:
                pass
    for n in range(cases):
        bad = mutate(rng.choice(valid), rng)
        _expect(lambda: feed(bad), FrameError, f"channel seed={seed} case {n} ({bad[:48].hex()})",
                tally)
    return tally


# ---------------------------------------------------------------- the campaign runner

def _expect(fn, allowed, where, tally):
    try:
        fn()
        tally["ok"] = tally.get("ok", 0) + 1
    except allowed as e:
        tally[type(e).__name__] = tally.get(type(e).__name__, 0) + 1
    except BaseException as e:  # noqa: BLE001  (the failure this test looks for)
        raise AssertionError(f"{where}: {type(e).__name__}: {e}"[:2000]) from e


_CHILD = """
import importlib.util, resource, sys, json
spec = importlib.util.spec_from_file_location("fuzz_campaigns", {path!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
mod._valid_files(); mod._valid_messages()          # warm up before the cap
with open("/proc/self/status") as f:
    vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
cap = vm + {slack}
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
print(json.dumps(getattr(mod, {name!r})({seed}, {cases})))
"""


def _run_capped(name, seed, cases, timeout=240):
    code = _CHILD.format(path=HERE, slack=SLACK_BYTES, name=name, seed=seed, cases=cases)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=timeout, cwd=os.path.dirname(os.path.dirname(HERE)))
    assert r.returncode == 0, (f"{name} (seed {seed}) failed with exit status {r.returncode} "
                               f"(negative: killed by that signal):\n{r.stderr[-3000:]}")
    import json
    tally = json.loads(r.stdout.strip().splitlines()[-1])
    return tally


def test_fuzz_saved_files():
    tally = _run_capped("campaign_files", seed=12, cases=300)
    assert sum(tally.values()) >= 300 and tally.get("SerializationError", 0) > 200, tally


def test_fuzz_program_messages():
    tally = _run_capped("campaign_programs", seed=12, cases=400)
    assert sum(tally.values()) >= 400 and tally.get("ProgramError", 0) > 200, tally


def test_fuzz_tcp_frames():
    tally = _run_capped("campaign_frames", seed=12, cases=200)
    assert sum(tally.values()) >= 1200 and tally.get("MalformedMessage", 0) > 300, tally
    assert tally.get("CollectiveError", 0) + tally.get("CollectiveTimeoutError", 0) \
        + tally.get("CollectiveMismatchError", 0) >= 15, tally


def test_fuzz_channel_frames():
    tally = _run_capped("campaign_channel_frames", seed=12, cases=600)
    assert sum(tally.values()) >= 600 and tally.get("FrameError", 0) > 100, tally


def test_the_memory_cap_is_real():
    """The campaigns' cap catches a forced allocation: a 1 GiB array fails in the child."""
    code = _CHILD.format(path=HERE, slack=SLACK_BYTES, name="_allocate_1gib", seed=0, cases=0)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "MemoryError" in r.stderr, r.stderr[-2000:]


def _allocate_1gib(seed, cases):
    return {"ok": int(np.ones(1 << 27).sum())}


# ---------------------------------------------------------------- hypothesis: valid shape, hostile content

_msgpack_ints = st.integers(-2 ** 63, 2 ** 64 - 1)      # every int msgpack can carry
_hostile_scalars = st.one_of(
    _msgpack_ints, st.sampled_from([-1, 0, 1, 2 ** 31, 2 ** 63 - 1]),
    st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=8), st.none(),
    st.booleans())
_hostile_values = st.recursive(_hostile_scalars,
                               lambda inner: st.lists(inner, max_size=4)
                               | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                               max_leaves=12)


@st.composite
def hostile_programs(draw):
    """Program structures with the right instruction kinds and field counts, hostile fields."""
    instrs = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(sorted(prog.INSTRUCTIONS) + ["nop", ""]))
        arity = prog.INSTRUCTIONS.get(kind, (3, None))[0]
        fields = [draw(st.one_of(st.integers(-3, 12), _hostile_values)) for _ in range(arity - 1)]
        if kind == "op" and draw(st.booleans()):
            fields[0] = draw(st.sampled_from(["add", "mul", "getitem", "no_such_op"]))
        instrs.append([kind] + fields)
    return {"instrs": instrs,
            "nslots": draw(st.one_of(st.integers(0, 16), st.sampled_from([2 ** 40, -1]),
                                     _hostile_values)),
            "ext": draw(st.one_of(st.lists(st.integers(-2, 16), max_size=4), _hostile_values)),
            "keep": draw(st.one_of(st.lists(st.integers(-2, 16), max_size=4), _hostile_values))}


@HYPO
@given(structure=hostile_programs())
def test_validate_raises_only_program_error(structure):
    try:
        prog.validate(structure)
    except ProgramError:
        return
    # accepted: then it is well formed, and a worker allocates at most what it names
    assert structure["nslots"] <= 1 + len(structure["ext"]) + sum(_leaves(i) for i in
                                                                     structure["instrs"])


def _leaves(value):
    """How many scalars a nested list holds: a bound on the slots an instruction names."""
    return sum(map(_leaves, value)) if isinstance(value, list) else 1


@HYPO
@given(structure=hostile_programs())
def test_hostile_programs_survive_the_wire(structure):
    """encode -> decode -> validate: only ProgramError, whatever the structure holds."""
    try:
        data = prog.encode({"v": prog.PROTOCOL, "prog": structure})
    except (TypeError, ValueError, OverflowError):
        return                       # the encoder refuses it: nothing goes on the wire
    try:
        prog.validate(prog.decode(data)["prog"])
    except ProgramError:
        pass


_dtype_specs = st.sampled_from(["<f4", ">f8", "|b1", "<i8", "|u1", "<c16", "|O", "V8", "<U4",
                                "f4,f4", "<M8[ns]", "(2,)f4", "S3", "<f2", "", "x"])


@HYPO
@given(dtype=st.one_of(_dtype_specs, _msgpack_ints, st.none()),
       shape=st.one_of(st.lists(st.integers(-2, 2 ** 62), max_size=4), _hostile_values),
       raw=st.binary(max_size=64))
def test_hostile_array_records(dtype, shape, raw):
    data = msgpack.packb({"a": msgpack.ExtType(prog.EXT_ARRAY, msgpack.packb(
        [dtype, shape, raw], use_bin_type=True))}, use_bin_type=True)
    try:
        a = prog.decode(data)["a"]
    except ProgramError:
        return
    assert a.nbytes == len(raw) and a.dtype.kind in "biufc"


@HYPO
@given(dtype=st.one_of(_dtype_specs, _msgpack_ints), shape=st.one_of(
    st.lists(st.integers(-2, 2 ** 62), max_size=4), _hostile_values),
    kind=st.sampled_from(["tensor", "variable", "parameter", "module", 3]),
    nbytes=st.one_of(st.integers(-1, 64), st.sampled_from([2 ** 34, 2 ** 63])),
    data=st.binary(max_size=64))
def test_hostile_tensor_records_in_files(dtype, shape, kind, nbytes, data):
    """A file whose table of contents is well formed, checksum right, records hostile."""
    head = msgpack.packb([dtype, shape, kind, False, nbytes, zlib.crc32(data)],
                         use_bin_type=True)
    blob = _file_blob(msgpack.packb({"x": msgpack.ExtType(1, head)}, use_bin_type=True), data)
    try:
        out = dg.load(io.BytesIO(blob))
    except SerializationError:
        return
    x = out["x"]
    assert x.numpy().nbytes == len(data) == nbytes


@HYPO
@given(words=st.lists(st.integers(-2 ** 63, 2 ** 63 - 1), min_size=32, max_size=32))
def test_hostile_frame_metas(words):
    try:
        dt, shape, nbytes = base.parse_array_meta(np.array(words, np.int64), 1 << 30)
    except base.MalformedMessage:
        return
    assert dt.kind in "biufc" and nbytes <= 1 << 30 and int(np.prod(shape)) * dt.itemsize == nbytes


# ---------------------------------------------------------------- regressions named in the issue

def test_deeply_nested_file_is_an_error_not_a_segfault(tmp_path):
    blob = _file_blob(nested_ext(3, 200, [1]))
    assert len(blob) < 1000
    (tmp_path / "deep.dgt").write_bytes(blob)
    with pytest.raises(SerializationError, match="nest deeper than 64"):
        dg.load(tmp_path / "deep.dgt")
    with pytest.raises(ProgramError, match="nests deeper than 64"):
        prog.decode(nested_ext(prog.EXT_TUPLE, 200, [1]))
    with pytest.raises(ProgramError, match="nests deeper than 64"):
        prog.decode(nested_lists(100))


def test_a_small_file_cannot_reserve_gigabytes(tmp_path):
    blob = _hostile_files()[4]
    assert len(blob) < 100
    for src in (io.BytesIO(blob), io.BufferedReader(_Pipe(blob))):
        with pytest.raises(SerializationError, match="truncated"):
            dg.load(src)


def test_nested_tuples_within_the_limit_still_load(tmp_path):
    obj = {"t": ((((1, 2), (3,)),),), "deep": [[[[[[np.ones(2)]]]]]]}
    dg.save(obj, tmp_path / "ok.dgt")
    back = dg.load(tmp_path / "ok.dgt")
    assert back["t"] == obj["t"] and back["deep"][0][0][0][0][0][0].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("structure,match", [
    ({"instrs": [["fetch", 0]], "nslots": 10 ** 12, "ext": [0], "keep": []}, "declares"),
    ({"instrs": [["fetch", [0]]], "nslots": 1, "ext": [0], "keep": []}, "out of range"),
    ({"instrs": [["op", "add", None, None, 0, True]], "nslots": 1, "ext": [], "keep": []},
     "args must be a list"),
    ({"instrs": [["op", ["add"], [], {}, 0, True]], "nslots": 1, "ext": [], "keep": []},
     "unknown op"),
    ({"instrs": [[["x"]]], "nslots": 1, "ext": [], "keep": []}, "unknown instruction"),
    ({"instrs": [], "nslots": 1, "ext": [[0]], "keep": []}, "ext must be a list of slot"),
    ({"instrs": [], "nslots": 1, "ext": {}, "keep": 5}, "ext must be a list of slot"),
    ({"instrs": [["put", 0, -5, True]], "nslots": 1, "ext": [], "keep": []},
     "bad input index"),
    ({"instrs": [["op", "add", [], {1: 2}, 0, True]], "nslots": 1, "ext": [], "keep": []},
     "attribute names"),
    ({"instrs": [["foreach", "axpby", [], {}, {}, []]], "nslots": 1, "ext": [0], "keep": []},
     "at least one argument list"),
    ({"instrs": [["foreach", "axpby", [[["c", 1.0], ["s", 0]]], {}, {}, []]], "nslots": 1,
      "ext": [0], "keep": []}, "starts with the slot written"),
    ({"instrs": [["foreach", "no_such_op", [[["s", 0]]], {}, {}, []]], "nslots": 1, "ext": [0],
      "keep": []}, "unknown op"),
    ({"instrs": [["foreach", "axpby", [[["s", 0], ["s", 1]]], {}, {"a": -1}, []]], "nslots": 2,
      "ext": [0, 1], "keep": []}, "bad scalar index"),
    ({"instrs": [["foreach", "axpby", [[["s", 0], ["s", 3]]], {}, {}, []]], "nslots": 2,
      "ext": [0, 1], "keep": []}, "out of range"),
    ({"instrs": [["foreach", "sqrt", [[["s", 0]], [["s", 0]]], {}, {}, [1]]], "nslots": 2,
      "ext": [0], "keep": []}, "one output slot per argument list"),
    ({"instrs": [["foreach", "sqrt", [[["s", 0]]], {}, {}, [5]]], "nslots": 2,
      "ext": [0], "keep": []}, "out of range"),
])
def test_validate_reports_malformed_structures_as_program_errors(structure, match):
    with pytest.raises(ProgramError, match=match):
        prog.validate(structure)


def test_validate_is_a_table_of_checkers():
    """New instruction kinds plug in as one entry: kind -> (fields, checker)."""
    assert {"op", "put", "update", "assign", "fetch", "backward"} <= set(prog.INSTRUCTIONS)
    for kind, (arity, check) in prog.INSTRUCTIONS.items():
        assert isinstance(arity, int) and callable(check), kind
    with pytest.raises(ProgramError, match="expected 2 fields"):
        prog.validate({"instrs": [["fetch", 0, 1]], "nslots": 1, "ext": [0], "keep": []})


def test_decoders_keep_working_on_valid_messages():
    for data, side in _valid_messages():
        msg = prog.decode(data, side)
        if isinstance(msg, dict) and "prog" in msg:
            prog.validate(msg["prog"])
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    back = prog.decode(prog.encode({"a": a, "t": (1, (2, slice(None, 3, None)), Ellipsis),
                                    "d": np.dtype("float16")}))
    assert back["a"].tolist() == a.tolist() and back["t"] == (1, (2, slice(None, 3, None)),
                                                              Ellipsis)
    assert back["d"] == np.float16


def test_a_bad_frame_breaks_the_group_on_every_rank():
    """3 ranks: rank 1 sends rank 2 an allgather meta announcing 1 PiB. Rank 2 (and rank 0,
    which rank 2 forwards it to or whose neighbour closes) fail within the timeout, with
    CollectiveError, allocating nothing; the group is broken afterwards."""
    comms = _pair(f"bad_frame_{os.getpid()}", ws=3, timeout_s=3.0)
    words = base.array_meta(np.ones(4, np.float32))
    words[1], words[2], words[3] = 1, 1 << 50, 1 << 48
    frame = tcp._HDR.pack(tcp._OPS["allgather_meta"], 1, 8 * base.META_WORDS, 0) + \
        words.tobytes()
    errors, took = {}, {}

    def honest(r):
        t0 = time.monotonic()
        try:
            comms[r].allgather(np.full(4, float(r), np.float32))
        except CollectiveError as e:
            errors[r] = e
        took[r] = time.monotonic() - t0

    ts = [threading.Thread(target=honest, args=(r,)) for r in (0, 2)]
    for t in ts:
        t.start()
    comms[1]._ring[2].sendall(frame * 2)      # both of its allgather_meta steps
    for t in ts:
        t.join(30)
    try:
        assert set(errors) == {0, 2}, errors
        assert "malformed frame from rank 1" in str(errors[2]), errors[2]
        assert max(took.values()) < 3.0 + 3, took
        with pytest.raises(CollectiveError, match="unusable after an earlier failure"):
            comms[2].allreduce(np.ones(3))
    finally:
        for c in comms:
            c.close()
