"""Frames on a byte stream: one message (msgpack bytes) and its side arrays, as raw data.

The driver and a worker on the same machine talk over a Unix socket
(``scheduler.socket_channel`` / ``workers.socket_channel``) instead of one Ray call per
program; these are the frames on it. A frame is::

    header   "<4sQI": magic, message length, number of side arrays
    message  the msgpack bytes (``program.encode``)
    each side array: "<I" descriptor length, msgpack [dtype, shape], the raw bytes (C order)

Nothing read is trusted: lengths are bounded before anything is allocated, dtypes must be
plain numbers (``_checks.plain_dtype``), and each array's byte count must match its shape.

Example::

    buffers = frame_buffers(b"msg", [np.ones(3)])
    reader = FrameReader()
    reader.feed(b"".join(bytes(b) for b in buffers))
    message, side = reader.next_frame()
"""
import hashlib
import hmac
import math
import secrets
import struct

import msgpack
import numpy as np

from . import _checks

MAGIC = b"DGF1"
HEADER = struct.Struct("<4sQI")
DESCRIPTOR = struct.Struct("<I")
MAX_MESSAGE_BYTES = 1 << 30      # the same cap as program.decode's
MAX_SIDE_ARRAYS = 1 << 16
MAX_DESCRIPTOR_BYTES = 1 << 10
MAX_ARRAY_BYTES = 1 << 40


HELLO = b"distgrad-channel-v1"
NONCE_BYTES = 32


class FrameError(ValueError):
    """Bytes on a channel that are not a valid frame (the stream cannot be trusted after)."""


class HelloError(ConnectionError):
    """The other end of a channel did not prove it holds the channel's token."""


def _proof(token, role, first, second):
    return hmac.new(token, b"|".join([HELLO, role, first, second]), hashlib.sha256).digest()


def _recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        more = sock.recv(n - len(buf))
        if not more:
            raise HelloError("the channel closed during its hello")
        buf += more
    return buf


def hello_server(sock, token, accepted=None):
    """The worker's side of a channel's challenge-response hello: both ends prove they
    hold ``token`` with an HMAC over both fresh nonces (roles differ, so a proof cannot be
    reflected; nonces are fresh, so a recorded hello cannot be replayed); the token never
    crosses the wire. ``accepted()`` runs once the driver's proof checked out, before the
    worker's goes back. Raises ``HelloError``. Example: ``hello_server(conn, token)``."""
    mine = secrets.token_bytes(NONCE_BYTES)
    sock.sendall(mine)
    theirs = _recv_exact(sock, NONCE_BYTES)
    if not hmac.compare_digest(_recv_exact(sock, 32), _proof(token, b"driver", mine, theirs)):
        raise HelloError("the driver's proof of the channel token is wrong")
    if accepted is not None:
        accepted()
    sock.sendall(_proof(token, b"worker", theirs, mine))


def hello_client(sock, token):
    """The driver's side of :func:`hello_server`. Example: ``hello_client(sock, token)``."""
    theirs = _recv_exact(sock, NONCE_BYTES)
    mine = secrets.token_bytes(NONCE_BYTES)
    sock.sendall(mine + _proof(token, b"driver", theirs, mine))
    if not hmac.compare_digest(_recv_exact(sock, 32), _proof(token, b"worker", mine, theirs)):
        raise HelloError("the worker's proof of the channel token is wrong")


def frame_buffers(message, side=()):
    """The buffers that make one frame of ``message`` (bytes) and ``side`` (numpy arrays),
    to be written in order; arrays are passed as views, not copied.

    Example: ``sock.sendall(b"".join(frame_buffers(b"hi")))``.
    """
    out = [HEADER.pack(MAGIC, len(message), len(side)), message]
    for a in side:
        a = np.asarray(a)
        if not a.flags.c_contiguous:        # (ascontiguousarray would make 0-d arrays 1-d)
            a = a.copy(order="C")
        desc = msgpack.packb([a.dtype.str, list(a.shape)])
        out += [DESCRIPTOR.pack(len(desc)), desc, memoryview(a.reshape(-1)).cast("B")]
    return out


def send_frame(sock, message, side=()):
    """Write one frame to a blocking socket: header and message in one write, each side
    array from its own memory (no joined copy of big data).

    Example: ``send_frame(sock, program.encode(msg, side), side)``.
    """
    buffers = frame_buffers(message, side)
    sock.sendall(b"".join(buffers[:2]))
    for buf in buffers[2:]:
        sock.sendall(buf)


class FrameReader:
    """Reassembles frames from bytes fed in any pieces. Its state lives in one buffer, so a
    read interrupted between two ``feed`` calls (Ctrl-C) loses nothing.

    Example::

        reader.feed(sock.recv(1 << 20))
        frame = reader.next_frame()          # None until a whole frame has arrived
    """

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data

    def next_frame(self):
        """``(message bytes, [side arrays])`` of the next whole frame, or None; raises
        ``FrameError`` on bytes that cannot be a frame."""
        buf = self.buf
        if len(buf) < HEADER.size:
            return None
        magic, nbytes, nside = HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            raise FrameError(f"frame starts with {bytes(magic)!r}, not {MAGIC!r}")
        if nbytes > MAX_MESSAGE_BYTES or nside > MAX_SIDE_ARRAYS:
            raise FrameError(f"frame declares {nbytes} message bytes and {nside} arrays "
                             f"(at most {MAX_MESSAGE_BYTES} and {MAX_SIDE_ARRAYS})")
        at = HEADER.size + nbytes
        if len(buf) < at:
            return None
        specs = []
        for _ in range(nside):
            if len(buf) < at + DESCRIPTOR.size:
                return None
            (dlen,) = DESCRIPTOR.unpack_from(buf, at)
            if dlen > MAX_DESCRIPTOR_BYTES:
                raise FrameError(f"array descriptor of {dlen} bytes (at most {MAX_DESCRIPTOR_BYTES})")
            at += DESCRIPTOR.size
            if len(buf) < at + dlen:
                return None
            dtype, shape = _descriptor(bytes(buf[at:at + dlen]))
            at += dlen
            n = math.prod(shape) * dtype.itemsize
            specs.append((dtype, shape, at))
            at += n
            if len(buf) < at:
                return None
        with memoryview(buf) as view:
            message = bytes(view[HEADER.size:HEADER.size + nbytes])
        side = []
        for dtype, shape, start in specs:
            a = np.frombuffer(buf, dtype, math.prod(shape), start).reshape(shape).copy()
            a.flags.writeable = False     # as an array from Ray's object store: copy on write
            side.append(a)
        # A fresh buffer for what follows (at most the start of the next frame): deleting
        # from the front would keep the capacity of the biggest frame ever read (a
        # replicated model's 200 MB) allocated for as long as the channel lives.
        self.buf = buf[at:]      # (a bytearray's slice is a new bytearray)
        return message, side


def _descriptor(raw):
    try:
        rec = msgpack.unpackb(raw, raw=False)
    except Exception as e:
        raise FrameError(f"malformed array descriptor: {type(e).__name__}") from None
    if not (isinstance(rec, list) and len(rec) == 2):
        raise FrameError("malformed array descriptor (expected [dtype, shape])")
    spec, shape = rec
    dtype = _checks.plain_dtype(spec)
    if dtype is None:
        raise FrameError(f"array dtype {spec!r} is not accepted (plain numeric dtypes only)")
    if not (isinstance(shape, list) and len(shape) <= _checks.MAX_NDIM
            and all(type(n) is int and n >= 0 for n in shape)):
        raise FrameError(f"malformed array shape {shape!r}")
    if math.prod(shape) * dtype.itemsize > MAX_ARRAY_BYTES:
        raise FrameError(f"array of shape {tuple(shape)} is larger than {MAX_ARRAY_BYTES} bytes")
    return dtype, shape
