"""dg.save / dg.load: bit-exact round trips, atomic writes, clear errors for bad files."""
import io
import os
import struct

import numpy as np
import pytest

import distgrad as dg
import distgrad.nn as nn
from distgrad import serialization
from distgrad.autograd import Variable
from distgrad.serialization import SerializationError

DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_]


def _rand(dtype, shape, rng):
    if dtype == np.bool_:
        return rng.random(shape) > 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 1e3).astype(dtype)


def _assert_same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dg.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad
        assert a.detach().numpy().tobytes() == b.detach().numpy().tobytes()   # bit-exact
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b)
    else:
        assert a == b


def test_roundtrip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, np.finfo(np.float32).max],
                       dtype=np.float32)
    obj = {
        "tensors": {str(np.dtype(d)): dg.from_numpy(_rand(d, (3, 4), rng)) for d in DTYPES},
        "scalar": dg.tensor(3.5), "empty": dg.zeros(0, 3), "special": dg.from_numpy(special),
        "non_contiguous": dg.from_numpy(np.arange(12.0).reshape(3, 4).T),
        "variable": Variable(dg.randn(2), requires_grad=True),
        "param": nn.Parameter(dg.randn(2, 2)),
        "frozen": nn.Parameter(dg.randn(2), requires_grad=False),
        "numpy": rng.standard_normal((2, 3)), "nested": [1, 2.5, "s", None, True, (1, (2, [3]))],
        "bytes": b"\x00\xff", 7: "int key", "big": 2 ** 62, "nan": float("nan"),
        "big_endian": np.arange(3, dtype=">i4"),
    }
    path = tmp_path / "obj.dgt"
    dg.save(obj, path)
    back = dg.load(path)
    expected = dict(obj, big_endian=np.arange(3, dtype="<i4"))   # stored little-endian
    _assert_same(expected, back)
    assert back["param"].requires_grad and not back["frozen"].requires_grad
    back["tensors"]["float32"].add_(1)                           # loaded arrays are writable


def test_model_state_dict_roundtrip(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    model(dg.randn(4, 1, 4, 4))                                  # non-trivial running stats
    dg.save(model.state_dict(), str(tmp_path / "m.dgt"))
    other = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    other.load_state_dict(dg.load(str(tmp_path / "m.dgt")))
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert a.numpy().tobytes() == b.numpy().tobytes(), k


def test_file_objects():
    buf = io.BytesIO()
    dg.save({"w": dg.ones(2)}, buf)
    buf.seek(0)
    np.testing.assert_array_equal(dg.load(buf)["w"].numpy(), [1, 1])


def _saved_bytes(tmp_path):
    path = tmp_path / "ok.dgt"
    dg.save({"w": dg.randn(10, 10), "step": 3}, path)
    return path.read_bytes()


@pytest.mark.parametrize("keep", [0, 5, 20, 52, 60, -1])
def test_truncated_file_is_a_clear_error(tmp_path, keep):
    blob = _saved_bytes(tmp_path)
    bad = tmp_path / "bad.dgt"
    bad.write_bytes(blob[:keep] if keep >= 0 else blob[:-1])
    with pytest.raises(SerializationError, match="truncated|not a distgrad file"):
        dg.load(bad)


@pytest.mark.parametrize("where", [60, 200, -1])
def test_corrupted_file_is_a_clear_error(tmp_path, where):
    blob = bytearray(_saved_bytes(tmp_path))
    blob[where] ^= 0x40
    bad = tmp_path / "bad.dgt"
    bad.write_bytes(bytes(blob))
    with pytest.raises(SerializationError, match="corrupted: checksum mismatch"):
        dg.load(bad)


def test_wrong_magic_newer_version_and_trailing_bytes(tmp_path):
    blob = _saved_bytes(tmp_path)
    bad = tmp_path / "bad.dgt"
    bad.write_bytes(b"PK\x03\x04" + blob[4:])                    # e.g. a zip / torch file
    with pytest.raises(SerializationError, match="not a distgrad file"):
        dg.load(bad)
    bad.write_bytes(blob[:8] + struct.pack("<I", 99) + blob[12:])
    with pytest.raises(SerializationError, match="version 99 is newer"):
        dg.load(bad)
    bad.write_bytes(blob + b"junk")
    with pytest.raises(SerializationError, match="unexpected bytes"):
        dg.load(bad)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.dgt"
    dg.save({"v": 1}, path)

    def crash(src, dst):
        raise OSError("disk went away")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        dg.save({"v": 2}, path)
    monkeypatch.undo()
    assert dg.load(path) == {"v": 1}                              # old file intact
    assert os.listdir(tmp_path) == ["ckpt.dgt"]                   # no temp file left


def test_unsupported_objects_are_refused_without_pickle(tmp_path):
    with pytest.raises(TypeError, match=r"type Linear at \['model'\].*state_dict"):
        dg.save({"model": nn.Linear(2, 2)}, tmp_path / "x.dgt")
    with pytest.raises(TypeError, match=r"type object at \['a'\]\[1\]"):
        dg.save({"a": [1, object()]}, tmp_path / "x.dgt")
    with pytest.raises(TypeError, match="object"):
        dg.save({"a": np.array([object()])}, tmp_path / "x.dgt")
    assert not (tmp_path / "x.dgt").exists()


def test_object_dtype_in_a_crafted_file_is_rejected(tmp_path):
    """A file written by hand with an object dtype must not reach numpy's unpickler."""
    import zlib

    import msgpack
    data = b"\x80\x04N."                                   # a pickle, where the bytes would be
    head = msgpack.packb(["|O", [1], "tensor", False, len(data), zlib.crc32(data)])
    meta = msgpack.packb({"x": msgpack.ExtType(1, head)}, use_bin_type=True)
    blob = serialization._HEADER.pack(serialization.MAGIC, serialization.VERSION, len(meta),
                                      zlib.crc32(meta), len(data)) + meta + data
    (tmp_path / "evil.dgt").write_bytes(blob)
    with pytest.raises(SerializationError, match="dtype '|O' is not allowed"):
        dg.load(tmp_path / "evil.dgt")


def test_decoding_a_message_leaves_no_cycle_holding_its_side_arrays():
    """The side arrays of a decoded message (a model's parameters, a batch) go as soon as
    nothing references them, not when the cyclic collector happens to run."""
    import gc
    import weakref
    from distgrad import program as prog

    def decode_and_drop():
        big = np.ones(300_000)                   # beside the message (over the inline limit)
        side = []
        data = prog.encode({"v": 1, "x": big, "t": (1, 2)}, side)
        msg = prog.decode(data, side)
        same = len(side) == 1 and msg["x"] is big
        return weakref.ref(big), same            # big, side, msg: dropped on return

    gc.disable()
    try:
        ref, same = decode_and_drop()
        alive = ref() is not None
    finally:
        gc.enable()
    assert same and not alive


@pytest.mark.parametrize("a", [np.array(2.5, np.float32), np.arange(3.0), np.arange(6).reshape(2, 3).T,
                               np.arange(24.0).reshape(4, 6)[::2, 1::2], np.zeros((0, 3), np.int8)],
                         ids=["0-d", "1-d", "transposed", "strided", "empty"])
def test_program_messages_keep_every_array_shape(a):
    """An inline array arrives with its own shape, values and dtype (a 0-d one stayed 1-d
    through ascontiguousarray: a replicated scalar reached the workers as shape (1,))."""
    from distgrad import program
    back = program.decode(program.encode({"a": a}))["a"]
    assert back.shape == a.shape and back.dtype == a.dtype
    np.testing.assert_array_equal(back, a)


def test_a_replicated_scalar_is_0_d_on_the_workers():
    with dg.init(workers=2, backend="local") as cluster:
        s = cluster.replicate(dg.tensor(3.0))
        v = cluster.shard(np.arange(4.0, dtype=np.float32))
        stacked = dg.stack([s, s])          # (2,) here; (2, 1) where the workers held (1,)
        assert cluster.gather(stacked).numpy().tolist() == [3.0, 3.0]
        # each worker holds the replicated value in its global shape: (2,), not (2, 1)
        held = cluster.executor.control([0, 1], {"control": "export", "vids": [stacked.store.vid]})
        assert [np.shape(h[stacked.store.vid][0]) for h in held] == [(2,), (2,)]
        np.testing.assert_array_equal(cluster.gather(v * s).numpy(), np.arange(4.0) * 3)
