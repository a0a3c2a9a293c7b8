"""Collectives over TCP: the ring communicator (any ranks, any nodes).

:class:`TcpCommunicator` runs over the authenticated links of ``tcp_links.py``:
one socket to each ring neighbour (collectives) and one to every other rank
(send/recv). This file owns the framing and the algorithms.

All-reduce is the bandwidth-optimal ring: reduce-scatter (N-1 steps) then
all-gather (N-1 steps); each step sends one segment to the next rank on a
sender thread while the main thread receives the previous rank's segment in
chunks and reduces each chunk as it lands. Summation order is fixed for a world
size: segment j is reduced as ``((x_j op x_{j+1}) op ...) op x_{j-1}`` (ranks mod
N) and the all-gather copies the owner's bits, so every rank holds the same
bits. (For 2 ranks this equals rank order; for more it differs from the shm
backend's rank order in the last bits of floating-point sums.)

Wire format: each message is a :data:`_HDR` frame header (opcode, call number,
payload bytes, aux word), then the payload; arrays of a shape the receiver does
not know travel behind :func:`~.base.array_meta` words, checked by
:func:`~.base.parse_array_meta` before anything is allocated.
"""
from __future__ import annotations

import queue
import socket
import struct
import threading
import time
import zlib
from typing import List, Optional

import numpy as np

from .base import (DEFAULT_TIMEOUT_S, META_WORDS, REDUCE_OPS, CollectiveError,
                   CollectiveMismatchError, CollectiveTimeoutError, Communicator,
                   MalformedMessage, array_meta, check_ndarray, flat_view, parse_array_meta,
                   resolve_recv_target, split_ranges)
from .rendezvous import Store
from .tcp_links import PeerFailure, TcpLinks, recv_into, send_all

__all__ = ["TcpCommunicator", "MAX_MESSAGE_BYTES"]

_HDR = struct.Struct("<qqqq")            # opcode, sequence, payload bytes, aux
_OPS = {"allreduce": 1, "reducescatter": 2, "broadcast": 3, "allgather": 4,
        "allgather_meta": 5, "barrier": 6, "p2p": 7}
_OP_NAMES = {v: k for k, v in _OPS.items()}
_INLINE_SEND = 128 << 10                 # below this a send fits the socket buffer: no thread
MAX_MESSAGE_BYTES = 1 << 34              # largest array a peer may announce (16 GiB)


class _Sender(threading.Thread):
    """Persistent thread that runs large sends while the caller receives (full duplex)."""

    def __init__(self):
        super().__init__(daemon=True, name="distgrad-tcp-sender")
        self._jobs = queue.SimpleQueue()
        self._done = threading.Event()
        self._err = None
        self.start()

    def submit(self, sock, bufs, peer):
        self._err = None
        self._done.clear()
        self._jobs.put((sock, bufs, peer))

    def run(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            sock, bufs, peer = job
            try:
                for b in bufs:
                    sock.sendall(b)
            except Exception as e:  # noqa: BLE001  (handed to the waiting caller)
                self._err = (peer, e)
            finally:
                self._done.set()

    def wait(self, timeout):
        if not self._done.wait(timeout):
            return ("?", TimeoutError("send did not finish"))
        return self._err

    def stop(self):
        self._jobs.put(None)


def _missing_ranks(store, key, rank, world_size, seq, timeout_s):
    """After a failed wait in call ``seq``: which ranks never entered it? ([] if unknown)

    In a ring a rank only sees its neighbour, which may itself be stuck. So every
    rank that fails publishes "I reached op #seq" in the store, waits a short
    grace period for the others' notes, and names the ranks without one.
    """
    try:
        store.set(f"{key}/arrived/{rank}", str(seq).encode())
        grace = min(2.0, 0.2 * timeout_s)
        deadline = time.monotonic() + grace
        seen = set()                  # notes may be deleted again when a peer closes
        while True:
            for k in range(world_size):
                v = store.get(f"{key}/arrived/{k}")
                if v is not None and int(v) >= seq:
                    seen.add(k)
            missing = [k for k in range(world_size) if k not in seen]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(min(0.05, grace / 10))
    except Exception:  # noqa: BLE001  (the store is only a diagnostic aid here)
        return []


class TcpCommunicator(Communicator):  # long: the hooks of base.Communicator over a TCP ring, with send/recv
    """A rank of a group connected by TCP (ring collectives + point-to-point mesh).

    Args:
        rank, world_size: this rank and the group size.
        store: rendezvous :class:`~.rendezvous.Store` shared by all ranks.
        group_name: names the group (store keys, error messages).
        timeout_s: bound on every wait.
        host: address to listen on and advertise (this node's IP; loopback in tests).
        ring: set False for a send/recv-only mesh.
        chunk_bytes: receive/reduce granularity.
        init_timeout_s: bound on the rendezvous (default: ``timeout_s``).
        max_message_bytes: largest array a peer may announce in allgather or recv (a
            frame that announces more breaks the group instead of allocating it).

    Peers authenticate when they connect (a per-group secret from the store and a
    challenge-response hello, see :mod:`.auth`); a malformed frame afterwards breaks
    the group: the collective fails on this rank with :class:`CollectiveError` and,
    since its sockets close, on the others within their timeout.

    Example (each of 2 processes)::

        store = FileStore("/tmp/rdv")
        comm = TcpCommunicator(rank, 2, store, group_name="demo")
        comm.allreduce(x)
    """

    def __init__(self, rank: int, world_size: int, store: Store, group_name: str = "tcp",
                 timeout_s: float = DEFAULT_TIMEOUT_S, host: str = "127.0.0.1",
                 ring: bool = True, chunk_bytes: int = 512 << 10, key_prefix: str = "distgrad",
                 init_timeout_s: Optional[float] = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        super().__init__(rank, world_size, group_name, timeout_s)
        self._max_bytes = int(max_message_bytes)
        self._store = store
        self._chunk = max(4096, int(chunk_bytes) // 64 * 64)
        self._tmp = np.empty(self._chunk, np.uint8)   # receive buffer, reused (stays in cache)
        self._key = f"{key_prefix}/{group_name}/tcp"
        self._seq = 0
        self._p2p_seq_out = [0] * world_size
        self._p2p_seq_in = [0] * world_size
        self._broken: Optional[CollectiveError] = None
        self._sender = None
        self._next, self._prev = (rank + 1) % world_size, (rank - 1) % world_size
        self._links = TcpLinks(
            rank, world_size, store, self._key, group_name, host,
            # socket waits leave ~20% of the timeout to find out who is missing
            # (_missing_ranks)
            io_timeout=max(0.05, self._timeout_s - min(2.0, 0.2 * self._timeout_s)),
            init_timeout_s=float(init_timeout_s or timeout_s), ring=ring)
        self._ring, self._p2p = self._links.ring, self._links.p2p    # sockets by peer rank
        if world_size > 1 and ring:
            self._sender = _Sender()

    # -- low level I/O ----------------------------------------------------------------
    def _recv_hdr(self, sock, peer, opname, nbytes, aux=0):
        b = bytearray(_HDR.size)
        recv_into(sock, peer, memoryview(b))
        op, seq, n, a = _HDR.unpack(b)
        want = (_OPS[opname], self._seq, nbytes, aux)
        if (op, seq, n, a) != want:
            what = ("the arguments (array size, dtype, op or root) differ"
                    if (op, seq) == want[:2] else
                    f"rank {peer} is in {_OP_NAMES.get(op, op)} (call #{seq})")
            err = CollectiveMismatchError(
                f"collective group {self._group_name!r}: ranks disagree in {opname} "
                f"(call #{self._seq}) on rank {self._rank} and rank {peer}: {what}")
            self._broken = err            # the byte stream is out of step now
            raise err
        return n

    def _step(self, opname, send_view, recv_view, on_chunk=None, aux=0):
        """One ring step: send ``send_view`` to next while receiving from prev.

        Without ``on_chunk`` the message lands in ``recv_view``. With it,
        ``recv_view`` is just the expected length (an int): each chunk lands in a
        small reused buffer and ``on_chunk(lo, hi, buf)`` consumes bytes [lo, hi).
        """
        nxt, prv = self._ring[self._next], self._ring[self._prev]
        hdr = _HDR.pack(_OPS[opname], self._seq, len(send_view), aux)
        threaded = len(send_view) > _INLINE_SEND
        if threaded:
            self._sender.submit(nxt, [hdr, send_view], self._next)
        else:
            send_all(nxt, self._next, [hdr, send_view])
        try:
            n = recv_view if on_chunk is not None else len(recv_view)
            self._recv_hdr(prv, self._prev, opname, n, aux)
            if on_chunk is None:
                recv_into(prv, self._prev, recv_view)
            else:
                buf = self._tmp
                for lo in range(0, n, self._chunk):
                    hi = min(n, lo + self._chunk)
                    recv_into(prv, self._prev, memoryview(buf)[: hi - lo])
                    on_chunk(lo, hi, buf)
        finally:
            if threaded:
                err = self._sender.wait(self._timeout_s + 1)
                if err is not None and not isinstance(err[1], PeerFailure):
                    peer, e = err
                    raise PeerFailure(self._next, f"send to rank {self._next} failed: {e}",
                                      isinstance(e, (socket.timeout, TimeoutError)))

    def _check_usable(self):
        self._check_open()
        if self._broken is not None:
            raise CollectiveError(f"collective group {self._group_name!r}: unusable after an "
                                  f"earlier failure: {self._broken}")

    def _run(self, opname, fn, *args):
        """Run a collective body, turning socket failures into CollectiveTimeoutError and
        malformed frames into CollectiveError (both break the group)."""
        self._check_usable()
        self._seq += 1
        try:
            return fn(*args)
        except MalformedMessage as e:
            self._bad_frame(opname, self._prev, e)
        except PeerFailure as f:
            # close first: peers blocked on us fail now and leave their notes in time
            self._links.close()
            missing = _missing_ranks(self._store, self._key, self._rank, self._world_size,
                                     self._seq, self._timeout_s) or [f.peer]
            detail = f.detail or (f"waited on rank {f.peer}" if missing != [f.peer] else "")
            err = CollectiveTimeoutError(self._group_name, opname, self._rank, missing,
                                         self._timeout_s, detail)
            self._broken = err
            raise err from None

    def _bad_frame(self, opname, peer, e):
        """A peer's frame does not parse: the byte stream cannot be trusted any more. Break
        the group and close the sockets, so the other ranks fail now, not at their timeout."""
        self._links.close()
        err = CollectiveError(f"collective group {self._group_name!r}: {opname} on rank "
                              f"{self._rank}: malformed frame from rank {peer}: {e}; the "
                              "group is broken")
        self._broken = err
        raise err from None

    # -- collectives -------------------------------------------------------------------
    def _ring_allreduce(self, flat, segs, op, opname, gather=True):
        """Ring reduce-scatter (+ all-gather) of ``flat``; rank r ends owning segs[r+1]."""
        n, r = self._world_size, self._rank
        # every message carries a checksum of the call's arguments: a rank whose
        # neighbour called with another size/dtype/op sees it at the first message
        sig = zlib.crc32(f"{flat.nbytes}|{flat.dtype.str}|{op}".encode())
        ufunc = REDUCE_OPS[op]
        item = flat.dtype.itemsize
        b = flat.view(np.uint8)
        mv = memoryview(b)
        for step in range(n - 1):
            si, ri = (r - step) % n, (r - step - 1) % n
            s0, e0 = segs[ri]
            dst = flat[s0:e0]

            def reduce_chunk(lo, hi, buf, dst=dst):
                part = buf[: hi - lo].view(flat.dtype)
                own = dst[lo // item: hi // item]
                ufunc(part, own, out=own)      # (partial from earlier ranks) op mine

            self._step(opname, mv[segs[si][0] * item: segs[si][1] * item],
                       (e0 - s0) * item, reduce_chunk, sig)
        if gather:
            for step in range(n - 1):
                si, ri = (r + 1 - step) % n, (r - step) % n
                self._step(opname, mv[segs[si][0] * item: segs[si][1] * item],
                           mv[segs[ri][0] * item: segs[ri][1] * item], None, sig)

    # the public collectives (base.Communicator) check arguments and call these hooks
    def _allreduce_flat(self, flat, op):
        if self._chunk % flat.dtype.itemsize:
            raise ValueError("chunk_bytes must be a multiple of the item size")
        segs = split_ranges(flat.size, self._world_size)
        self._run("allreduce", self._ring_allreduce, flat, segs, op, "allreduce")

    def _reducescatter_rows(self, array, op):
        n, r = self._world_size, self._rank
        rows = split_ranges(array.shape[0], n)
        row = int(np.prod(array.shape[1:], dtype=np.int64))
        work = np.ascontiguousarray(array).reshape(-1).copy()
        # rank r ends owning segs[r + 1]: shift so that is its own rows
        segs = [(rows[(j - 1) % n][0] * row, rows[(j - 1) % n][1] * row) for j in range(n)]
        self._run("reducescatter", self._ring_allreduce, work, segs, op, "reducescatter", False)
        s, e = rows[r]
        return work[s * row: e * row].reshape((e - s,) + array.shape[1:])

    def _broadcast_flat(self, flat, root):
        self._run("broadcast", self._chain_broadcast, flat.view(np.uint8), root)

    def _chain_broadcast(self, b, root):
        mv = memoryview(b)
        n = len(mv)
        last = (root - 1) % self._world_size
        nxt, prv = self._ring[self._next], self._ring[self._prev]
        chunk = max(self._chunk, 1 << 20)
        for i, lo in enumerate(range(0, max(n, 1), chunk)):
            hi = min(n, lo + chunk)
            if self._rank != root:
                self._recv_hdr(prv, self._prev, "broadcast", hi - lo, n)
                recv_into(prv, self._prev, mv[lo:hi])
            if self._rank != last:
                send_all(nxt, self._next, [_HDR.pack(_OPS["broadcast"], self._seq, hi - lo, n),
                                            mv[lo:hi]])

    def _ring_allgather_bytes(self, opname, blocks: List[memoryview]):
        """blocks[k] (writable, sizes known) end up holding rank k's block everywhere."""
        n, r = self._world_size, self._rank
        for step in range(n - 1):
            si, ri = (r - step) % n, (r - step - 1) % n
            self._step(opname, blocks[si], blocks[ri])

    def _allgather(self, array):
        return self._run("allgather", self._ring_allgather, array)

    def _ring_allgather(self, array):
        n, r = self._world_size, self._rank
        metas = np.zeros((n, META_WORDS), np.int64)
        metas[r] = array_meta(array)
        self._ring_allgather_bytes("allgather_meta", [memoryview(m).cast("B") for m in metas])
        infos = [parse_array_meta(m, self._max_bytes) for m in metas]
        if sum(nb for _, _, nb in infos) > self._max_bytes:
            raise MalformedMessage(f"allgather of {sum(nb for _, _, nb in infos)} bytes in all, "
                                   f"more than the limit of {self._max_bytes} "
                                   "(max_message_bytes)")
        if any(dt != array.dtype for dt, _, _ in infos):
            raise CollectiveMismatchError(
                f"collective group {self._group_name!r}: allgather dtypes differ: "
                + ", ".join(f"rank {k}: {dt}" for k, (dt, _, _) in enumerate(infos)))
        outs = [np.empty(shape, dt) for dt, shape, _ in infos]
        outs[r][...] = array
        self._ring_allgather_bytes("allgather", [memoryview(o.reshape(-1).view(np.uint8))
                                                 for o in outs])
        return outs

    def _barrier_all(self):
        tok = np.zeros(self._world_size, np.int64)
        self._run("barrier", self._ring_allgather_bytes, "barrier",
                  [memoryview(tok[k:k + 1]).cast("B") for k in range(self._world_size)])

    # -- point to point -------------------------------------------------------------------
    def send(self, array, dst):
        self._check_peer(dst, "dst")
        self._check_usable()
        check_ndarray(array)
        a = np.ascontiguousarray(array)
        self._p2p_seq_out[dst] += 1
        hdr = _HDR.pack(_OPS["p2p"], self._p2p_seq_out[dst], a.nbytes, 0)
        try:
            send_all(self._p2p[dst], dst, [hdr, array_meta(a).tobytes(),
                                             memoryview(a.reshape(-1).view(np.uint8))])
        except PeerFailure as f:
            raise CollectiveTimeoutError(self._group_name, f"send to rank {dst}", self._rank,
                                         [dst], self._timeout_s, f.detail) from None

    def _drain(self, sock, peer, n):
        """Read and drop ``n`` bytes (at most max_message_bytes) through the reused buffer."""
        buf = memoryview(self._tmp)
        while n > 0:
            k = min(n, len(buf))
            recv_into(sock, peer, buf[:k])
            n -= k

    def recv(self, array_or_shape, src, dtype=None):
        self._check_peer(src, "src")
        self._check_usable()
        sock = self._p2p[src]
        self._p2p_seq_in[src] += 1
        try:
            head = bytearray(_HDR.size + 8 * META_WORDS)
            recv_into(sock, src, memoryview(head))
            op, seq, nbytes, _ = _HDR.unpack(head[:_HDR.size])
            if op != _OPS["p2p"] or seq != self._p2p_seq_in[src]:
                raise MalformedMessage(f"expected message #{self._p2p_seq_in[src]}, got "
                                       f"opcode {op} #{seq}")
            dt, shape, size = parse_array_meta(np.frombuffer(bytes(head[_HDR.size:]), np.int64),
                                      self._max_bytes)
            if size != nbytes:
                raise MalformedMessage(f"header says {nbytes} bytes, meta says {size}")
            try:
                out = resolve_recv_target(array_or_shape, dtype, dt, shape,
                                          self._group_name, src)
            except CollectiveMismatchError:
                self._drain(sock, src, nbytes)     # so the stream stays in step
                raise
            flat, writeback = flat_view(out)
            recv_into(sock, src, memoryview(flat.view(np.uint8)))
            writeback()
            return out
        except MalformedMessage as e:
            self._bad_frame(f"recv from rank {src}", src, e)
        except PeerFailure as f:
            raise CollectiveTimeoutError(self._group_name, f"recv from rank {src}", self._rank,
                                         [src], self._timeout_s, f.detail) from None

    # -- teardown ---------------------------------------------------------------------------
    def close(self):
        if self._closed:
            return
        super().close()
        if self._sender is not None:
            self._sender.stop()
        self._links.close()
        try:
            self._store.delete(f"{self._key}/arrived/{self._rank}")
        except Exception:  # noqa: BLE001  (store may be gone at shutdown)
            pass
