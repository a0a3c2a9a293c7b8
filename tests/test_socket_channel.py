"""The driver's direct channel to workers on its machine: frames, the socket ends, and a
Ray cluster whose steps over the channel equal its steps over Ray calls, bit for bit."""
import os
import secrets
import struct
import threading
import time

import msgpack
import numpy as np
import pytest

from distgrad.errors import WorkerError, WorkerTimeoutError
from distgrad.framing import HEADER, MAGIC, FrameError, FrameReader, HelloError, frame_buffers
from distgrad.scheduler.socket_channel import SocketChannel, drain, wait_all
from distgrad.workers.socket_channel import SocketChannelServer


def _frame_bytes(message, side=()):
    return b"".join(bytes(b) for b in frame_buffers(message, side))


def _read_all(data, piece):
    reader, frames = FrameReader(), []
    for i in range(0, len(data), piece):
        reader.feed(data[i:i + piece])
        while (f := reader.next_frame()) is not None:
            frames.append(f)
    return frames, reader


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 30])
def test_frames_survive_any_split_of_the_stream(piece):
    rng = np.random.default_rng(0)
    sides = [[], [rng.standard_normal((3, 4)).astype(np.float32)],
             [np.arange(5, dtype=np.int64), np.zeros((0, 2)), np.array(2.5),
              rng.standard_normal((6, 5)).T]]          # a non-contiguous one too
    data = b"".join(_frame_bytes(f"m{i}".encode(), s) for i, s in enumerate(sides))
    frames, reader = _read_all(data, piece)
    assert [m for m, _ in frames] == [b"m0", b"m1", b"m2"]
    for (_, got), want in zip(frames, sides):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w)
            assert not g.flags.writeable          # as Ray's read-only arrays: copy on write
    assert reader.buf == bytearray()


def _bad(header=None, desc=None, raw=b""):
    header = header or HEADER.pack(MAGIC, 0, 1 if desc is not None else 0)
    if desc is None:
        return header
    d = msgpack.packb(desc) if not isinstance(desc, bytes) else desc
    return header + struct.pack("<I", len(d)) + d + raw


@pytest.mark.parametrize("data, words", [
    (HEADER.pack(b"XXXX", 0, 0), "not b'DGF1'"),
    (HEADER.pack(MAGIC, 1 << 40, 0), "message bytes"),
    (HEADER.pack(MAGIC, 0, 1 << 20), "arrays"),
    (_bad(desc=["|O", [1]]), "not accepted"),
    (_bad(desc=["<f4", [-1]]), "shape"),
    (_bad(desc=["<f4", [1] * 40]), "shape"),
    (_bad(desc=["<f4", [1 << 30, 1 << 30]]), "larger than"),
    (_bad(desc=b"\xc1"), "malformed array descriptor"),
    (_bad(desc=["<f4"]), "expected [dtype, shape]"),
    (HEADER.pack(MAGIC, 0, 1) + struct.pack("<I", 1 << 20), "descriptor of"),
])
def test_hostile_frames_are_refused_before_anything_is_allocated(data, words):
    reader = FrameReader()
    reader.feed(data)
    with pytest.raises(FrameError, match=words.replace("[", r"\[").replace("]", r"\]")):
        reader.next_frame()


def test_a_truncated_frame_waits_for_the_rest():
    data = _frame_bytes(b"abc", [np.ones(10)])
    reader = FrameReader()
    reader.feed(data[:-1])
    assert reader.next_frame() is None
    reader.feed(data[-1:])
    msg, (a,) = reader.next_frame()
    assert msg == b"abc" and np.array_equal(a, np.ones(10))


@pytest.fixture(params=["unix", "tcp"])
def echo_pair(request):
    """A server that echoes (upper-cased) with its side arrays doubled, and a connected
    driver end: over a Unix socket, and over TCP (a worker on another node)."""
    calls, gate = [], threading.Event()
    gate.set()

    def handle(message, side):
        gate.wait()
        calls.append(message)
        return message.upper(), [a * 2 for a in side]

    token = secrets.token_bytes(32)
    server = SocketChannelServer(token, handle, "127.0.0.1" if request.param == "tcp" else None)
    ch = SocketChannel(server.address, token, rank=3, timeout_s=5)
    yield server, ch, calls, gate
    gate.set()
    ch.close()
    server.close()


def test_replies_come_back_in_order_and_unwaited_ones_are_dropped(echo_pair):
    server, ch, calls, _ = echo_pair
    if isinstance(server.address, str):      # a Unix socket's name goes once the driver is in
        assert not os.path.exists(os.path.dirname(server.address))
    ch.post(b"commit")                                       # posted, never waited on
    tickets = [ch.post(f"m{i}".encode(), [np.arange(i + 1.0)]) for i in range(5)]
    wait_all(tickets, time.time() + 10, "its program")
    for i, t in enumerate(tickets):
        msg, (a,) = t.reply
        assert msg == f"M{i}".encode() and np.array_equal(a, 2 * np.arange(i + 1.0))
    assert calls == [b"commit"] + [f"m{i}".encode() for i in range(5)]
    assert not ch.waiting and not ch.pending


def test_a_late_worker_is_reported_hung_and_drain_waits_for_it(echo_pair):
    _, ch, calls, gate = echo_pair
    gate.clear()
    t = ch.post(b"slow")
    with pytest.raises(WorkerTimeoutError, match=r"workers \[0\] did not finish its program") as e:
        wait_all([t], time.time() + 0.2, "its program")
    assert e.value.ranks == (0,)
    with pytest.raises(WorkerTimeoutError) as e:
        drain(ch, time.time() + 0.2, "its queued messages")
    assert e.value.ranks == (3,)              # drain names the channel's worker
    gate.set()
    drain(ch, time.time() + 10, "its queued messages")
    assert calls == [b"slow"] and not ch.pending


def test_a_worker_that_goes_away_is_reported_dead_at_once(echo_pair):
    server, ch, _, gate = echo_pair
    gate.clear()
    t = ch.post(b"x")
    server.close()                          # as a killed process's socket closes
    gate.set()
    with pytest.raises(WorkerError, match="died during its program") as e:
        wait_all([t], time.time() + 30, "its program")
    assert not isinstance(e.value, WorkerTimeoutError)     # seen as gone, not at the deadline
    # later messages fail the same way, without blocking
    with pytest.raises(WorkerError, match="died"):
        wait_all([ch.post(b"y")], time.time() + 30, "its program")


@pytest.mark.parametrize("host", [None, "127.0.0.1"])
def test_a_connection_without_the_token_is_refused(host):
    token = secrets.token_bytes(32)
    server = SocketChannelServer(token, lambda m, s: (m, s), host)
    try:
        with pytest.raises(HelloError):
            SocketChannel(server.address, secrets.token_bytes(32), rank=0, timeout_s=5)
        ch = SocketChannel(server.address, token, rank=0, timeout_s=5)     # the driver still gets in
        t = ch.post(b"hello")
        wait_all([t], time.time() + 10, "its program")
        assert t.reply[0] == b"hello"
        ch.close()
    finally:
        server.close()


def test_a_bad_token_length_is_refused_at_once():
    with pytest.raises(ValueError, match="32 bytes"):
        SocketChannelServer(b"short", lambda m, s: (m, s))


@pytest.mark.ray
def test_steps_over_the_channel_equal_steps_over_ray_calls(ray_session):
    """Differential: the same training run with programs over the Unix socket and over Ray
    actor calls gives bitwise-equal parameters and losses (the transport changes nothing)."""
    import distgrad as dg
    import distgrad.nn.functional as F

    rng = np.random.default_rng(1)
    X = rng.standard_normal((64, 20)).astype(np.float32)
    Y = rng.integers(0, 5, 64)
    runs = {}
    for direct in (True, False):
        with dg.init(workers=2, timeout_s=60, driver_socket=direct) as cluster:
            assert all((ch is not None) == direct for ch in cluster.gang.channels)
            dg.manual_seed(0)
            model = cluster.replicate(dg.nn.Sequential(dg.nn.Linear(20, 16), dg.nn.ReLU(),
                                                       dg.nn.Linear(16, 5)))
            opt = dg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            losses = []
            for step in range(4):
                xs, ys = cluster.shard(X[step::2]), cluster.shard(Y[step::2])
                loss = F.cross_entropy(model(xs), ys)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            runs[direct] = (losses, [p.detach().numpy().copy() for p in model.parameters()])
    assert runs[True][0] == runs[False][0]
    for a, b in zip(runs[True][1], runs[False][1]):
        assert np.array_equal(a, b)
