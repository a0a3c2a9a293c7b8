"""Cross-node collectives over TCP, and the topology-aware hierarchical communicator.

:class:`TcpCommunicator` connects each rank to its ring neighbours (collectives)
and to every other rank (send/recv, separate sockets so point-to-point traffic
never interleaves with a collective). Addresses are exchanged through a
rendezvous :class:`~.rendezvous.Store` (listeners bind port 0: no fixed ports).

All-reduce is the bandwidth-optimal ring: reduce-scatter (N-1 steps) then
all-gather (N-1 steps); each step sends one segment to the next rank on a
sender thread while the main thread receives the previous rank's segment in
chunks and reduces each chunk as it lands. Summation order is fixed for a world
size: segment j is reduced as ``((x_j op x_{j+1}) op ...) op x_{j-1}`` (ranks mod
N) and the all-gather copies the owner's bits, so every rank holds the same
bits. (For 2 ranks this equals rank order; for more it differs from the shm
backend's rank order in the last bits of floating-point sums.)

:class:`HierarchicalCommunicator` picks the transport from the topology:
shared memory inside a node, the TCP ring between node leaders (node-local
reduce, cross-node ring all-reduce, node-local broadcast). One node: plain shm;
one rank per node: plain TCP ring.
"""
from __future__ import annotations

import hashlib
import math
import queue
import socket
import struct
import threading
import time
import zlib
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import auth
from .base import (DEFAULT_TIMEOUT_S, REDUCE_OPS, CollectiveError, CollectiveMismatchError,
                   CollectiveTimeoutError, Communicator, code_dtype, dtype_code, flat_view,
                   normalize_op, resolve_recv_target, split_ranges)
from .rendezvous import Store
from .shm import ShmCommunicator

__all__ = ["TcpCommunicator", "HierarchicalCommunicator"]

_HDR = struct.Struct("<qqqq")            # opcode, sequence, payload bytes, aux
_META_WORDS = 32                         # dtype, ndim, nbytes, shape..., rank (allgather / p2p)
_MAX_NDIM = _META_WORDS - 4
_CH_RING, _CH_P2P = 1, 2
_OPS = {"allreduce": 1, "reducescatter": 2, "broadcast": 3, "allgather": 4,
        "allgather_meta": 5, "barrier": 6, "p2p": 7}
_OP_NAMES = {v: k for k, v in _OPS.items()}
_INLINE_SEND = 128 << 10                 # below this a send fits the socket buffer: no thread
_SOCK_BUF = 4 << 20
MAX_MESSAGE_BYTES = 1 << 34              # largest array a peer may announce (16 GiB)


def _meta(array: np.ndarray) -> np.ndarray:
    if array.ndim > _MAX_NDIM:
        raise ValueError(f"at most {_MAX_NDIM} dimensions supported")
    m = np.zeros(_META_WORDS, np.int64)
    m[0], m[1], m[2] = dtype_code(array.dtype), array.ndim, array.nbytes
    m[3: 3 + array.ndim] = array.shape
    return m


class _BadFrame(Exception):
    """Internal: a peer's frame does not parse (corrupted or hostile)."""


def _unmeta(m: np.ndarray, limit: int):
    """(dtype, shape, nbytes) of a peer's meta words, checked before anything is allocated:
    a plain dtype, non-negative dims that multiply to nbytes, at most ``limit`` bytes."""
    dt, ndim, nbytes = code_dtype(int(m[0])), int(m[1]), int(m[2])
    if dt is None:
        raise _BadFrame(f"dtype word {int(m[0]):#x} names no plain numeric dtype")
    if not 0 <= ndim <= _MAX_NDIM:
        raise _BadFrame(f"{ndim} dimensions (at most {_MAX_NDIM})")
    shape = tuple(int(d) for d in m[3: 3 + ndim])
    if any(d < 0 for d in shape) or math.prod(shape) * dt.itemsize != nbytes:
        raise _BadFrame(f"shape {shape} of {dt} does not hold {nbytes} bytes")
    if nbytes > limit:
        raise _BadFrame(f"announces {nbytes} bytes, more than the limit of {limit} "
                        "(max_message_bytes)")
    return dt, shape, nbytes


class _PeerFailure(Exception):
    """Internal: a socket op with ``peer`` failed (timeout or connection lost)."""

    def __init__(self, peer, detail, timed_out):
        super().__init__(detail)
        self.peer, self.detail, self.timed_out = peer, detail, timed_out


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


class TcpCommunicator(Communicator):
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
        self._init_timeout_s = float(init_timeout_s or timeout_s)
        self._max_bytes = int(max_message_bytes)
        self._store = store
        self._host = host
        self._chunk = max(4096, int(chunk_bytes) // 64 * 64)
        self._tmp = np.empty(self._chunk, np.uint8)   # receive buffer, reused (stays in cache)
        self._ring_enabled = ring
        self._key = f"{key_prefix}/{group_name}/tcp"
        # socket waits leave ~20% of the timeout to find out who is missing (_who_is_missing)
        self._io_timeout = max(0.05, self._timeout_s - min(2.0, 0.2 * self._timeout_s))
        self._digest = hashlib.sha256(group_name.encode()).digest()[:16]
        self._ring: Dict[int, socket.socket] = {}
        self._p2p: Dict[int, socket.socket] = {}
        self._seq = 0
        self._p2p_seq_out = [0] * world_size
        self._p2p_seq_in = [0] * world_size
        self._broken: Optional[CollectiveError] = None
        self._sender = None
        n = world_size
        self._next, self._prev = (rank + 1) % n, (rank - 1) % n
        if n > 1:
            self._connect_all()
            if ring:
                self._sender = _Sender()

    # -- setup --------------------------------------------------------------------
    def _expected(self):
        """{(peer, channel)} this rank must hold after setup."""
        n, r = self._world_size, self._rank
        need = {(j, _CH_P2P) for j in range(n) if j != r}
        if self._ring_enabled:
            need |= {(self._next, _CH_RING), (self._prev, _CH_RING)}
        return need

    def _connect_all(self):
        deadline = time.monotonic() + self._init_timeout_s
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        acceptor = None
        secret_key = f"{self._key}/secret"
        try:
            lst.bind((self._host, 0))
            lst.listen(4 * self._world_size + 8)
            port = lst.getsockname()[1]
            self._secret = auth.group_secret(self._store, secret_key, self._rank, deadline,
                                             self._group_name, self._init_timeout_s)
            self._store.set(f"{self._key}/{self._rank}", f"{self._host}:{port}".encode())
            need = self._expected()
            # connect to lower ranks (rank 0 first: its hello confirms our secret), accept
            # higher ones (the kernel backlog completes TCP handshakes, so connecting
            # before the peer accepts cannot deadlock)
            for peer, ch in sorted(need):
                if peer < self._rank:
                    self._connect(peer, ch, deadline)
            acceptor = auth.Acceptor(
                lst, self._digest, self._rank, self._secret,
                lambda p, c: p > self._rank and (p, c) in need and (p, c) not in self._have(),
                handshake_s=min(auth.HANDSHAKE_S, self._init_timeout_s))
            while True:
                missing = {(p, c) for p, c in need if p > self._rank} - set(self._have())
                if not missing:
                    break
                if time.monotonic() > deadline:
                    raise CollectiveTimeoutError(
                        self._group_name, "init (tcp connect)", self._rank,
                        sorted({p for p, _ in missing}), self._init_timeout_s)
                for peer, ch, sock in acceptor.poll(0.2):
                    self._tune(sock)
                    (self._ring if ch == _CH_RING else self._p2p)[peer] = sock
        except BaseException:
            self._close_sockets()
            if self._rank == 0:
                self._store.delete(secret_key)
            raise
        finally:
            if acceptor is not None:
                acceptor.close()
            lst.close()
        self._store.delete(f"{self._key}/{self._rank}")
        if self._rank == 0:
            # every rank proved it holds the secret to rank 0 (the p2p mesh is complete),
            # so it can leave the store; a stale one would only slow a later group's hello
            self._store.delete(secret_key)

    def _have(self):
        return [(p, _CH_RING) for p in self._ring] + [(p, _CH_P2P) for p in self._p2p]

    def _tune(self, sock):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF)
        sock.settimeout(self._io_timeout)

    def _connect(self, peer, ch, deadline):
        sleep = 0.01
        while True:
            left = deadline - time.monotonic()
            addr = self._store.wait(f"{self._key}/{peer}", max(0.0, left))
            if addr is None:
                raise CollectiveTimeoutError(self._group_name, "init (tcp rendezvous)",
                                             self._rank, [peer], self._init_timeout_s,
                                             "no address published")
            ok = False
            try:
                host, port = addr.decode().rsplit(":", 1)
                sock = socket.create_connection((host, int(port)), timeout=max(0.1, left))
            except (OSError, ValueError, UnicodeDecodeError):
                sock = None           # stale address of an earlier group, or not listening yet
            if sock is not None:
                self._tune(sock)
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                # a secret read before rank 0 replaced a stale one fails the hello: re-read
                secret = self._store.get(f"{self._key}/secret") or self._secret
                try:
                    ok = auth.client_handshake(sock, secret, self._digest, self._rank, peer, ch)
                except (OSError, struct.error):
                    ok = False
                if ok:
                    self._secret = secret
                    sock.settimeout(self._io_timeout)
                    (self._ring if ch == _CH_RING else self._p2p)[peer] = sock
                    return
                sock.close()          # not this group's rank (a stale address): retry
            if time.monotonic() > deadline:
                raise CollectiveTimeoutError(self._group_name, "init (tcp handshake)",
                                             self._rank, [peer], self._init_timeout_s,
                                             f"no authenticated hello from {addr!r:.60}")
            time.sleep(sleep)
            sleep = min(sleep * 2, 0.2)

    # -- low level I/O ----------------------------------------------------------------
    def _recv_into(self, sock, peer, view):
        """Fill the writable byte memoryview ``view`` from ``sock``."""
        got, n = 0, len(view)
        try:
            while got < n:
                k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
                if k == 0:
                    raise _PeerFailure(peer, f"rank {peer} closed the connection (died?)", False)
                got += k
        except socket.timeout:
            raise _PeerFailure(peer, "", True) from None
        except OSError as e:
            raise _PeerFailure(peer, f"connection to rank {peer} failed: {e}", False) from None

    def _send(self, sock, peer, bufs):
        try:
            for b in bufs:
                sock.sendall(b)
        except socket.timeout:
            raise _PeerFailure(peer, "send blocked", True) from None
        except OSError as e:
            raise _PeerFailure(peer, f"connection to rank {peer} failed: {e}", False) from None

    def _recv_hdr(self, sock, peer, opname, nbytes, aux=0):
        b = bytearray(_HDR.size)
        self._recv_into(sock, peer, memoryview(b))
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
            self._send(nxt, self._next, [hdr, send_view])
        try:
            n = recv_view if on_chunk is not None else len(recv_view)
            self._recv_hdr(prv, self._prev, opname, n, aux)
            if on_chunk is None:
                self._recv_into(prv, self._prev, recv_view)
            else:
                buf = self._tmp
                for lo in range(0, n, self._chunk):
                    hi = min(n, lo + self._chunk)
                    self._recv_into(prv, self._prev, memoryview(buf)[: hi - lo])
                    on_chunk(lo, hi, buf)
        finally:
            if threaded:
                err = self._sender.wait(self._timeout_s + 1)
                if err is not None and not isinstance(err[1], _PeerFailure):
                    peer, e = err
                    raise _PeerFailure(self._next, f"send to rank {self._next} failed: {e}",
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
        except _BadFrame as e:
            self._bad_frame(opname, self._prev, e)
        except _PeerFailure as f:
            # close first: peers blocked on us fail now and leave their notes in time
            self._close_sockets()
            missing = self._who_is_missing(f.peer)
            detail = f.detail or (f"waited on rank {f.peer}" if missing != [f.peer] else "")
            err = CollectiveTimeoutError(self._group_name, opname, self._rank, missing,
                                         self._timeout_s, detail)
            self._broken = err
            raise err from None

    def _bad_frame(self, opname, peer, e):
        """A peer's frame does not parse: the byte stream cannot be trusted any more. Break
        the group and close the sockets, so the other ranks fail now, not at their timeout."""
        self._close_sockets()
        err = CollectiveError(f"collective group {self._group_name!r}: {opname} on rank "
                              f"{self._rank}: malformed frame from rank {peer}: {e}; the "
                              "group is broken")
        self._broken = err
        raise err from None

    def _who_is_missing(self, peer):
        """After a failed wait: which ranks never entered this op?

        In a ring a rank only sees its neighbour, which may itself be stuck. So every
        rank that fails publishes "I reached op #seq" in the store, waits a short
        grace period for the others' notes, and names the ranks without one.
        """
        try:
            self._store.set(f"{self._key}/arrived/{self._rank}", str(self._seq).encode())
            grace = min(2.0, 0.2 * self._timeout_s)
            deadline = time.monotonic() + grace
            seen = set()                  # notes may be deleted again when a peer closes
            while True:
                for k in range(self._world_size):
                    v = self._store.get(f"{self._key}/arrived/{k}")
                    if v is not None and int(v) >= self._seq:
                        seen.add(k)
                missing = [k for k in range(self._world_size) if k not in seen]
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(min(0.05, grace / 10))
            return missing or [peer]
        except Exception:  # noqa: BLE001  (the store is only a diagnostic aid here)
            return [peer]

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

    def allreduce(self, array, op="sum"):
        op = normalize_op(op)
        flat, writeback = flat_view(array)
        if self._world_size == 1:
            return array
        if self._chunk % flat.dtype.itemsize:
            raise ValueError("chunk_bytes must be a multiple of the item size")
        segs = split_ranges(flat.size, self._world_size)
        self._run("allreduce", self._ring_allreduce, flat, segs, op, "allreduce")
        writeback()
        return array

    def reducescatter(self, array, op="sum"):
        op = normalize_op(op)
        if not isinstance(array, np.ndarray) or array.ndim == 0:
            raise ValueError("reducescatter needs a numpy array with at least one dimension")
        n, r = self._world_size, self._rank
        rows = split_ranges(array.shape[0], n)
        if n == 1:
            return array.copy()
        row = int(np.prod(array.shape[1:], dtype=np.int64))
        work = np.ascontiguousarray(array).reshape(-1).copy()
        # rank r ends owning segs[r + 1]: shift so that is its own rows
        segs = [(rows[(j - 1) % n][0] * row, rows[(j - 1) % n][1] * row) for j in range(n)]
        self._run("reducescatter", self._ring_allreduce, work, segs, op, "reducescatter", False)
        s, e = rows[r]
        return work[s * row: e * row].reshape((e - s,) + array.shape[1:])

    def broadcast(self, array, root=0):
        self._check_root(root)
        flat, writeback = flat_view(array)
        if self._world_size == 1:
            return array
        self._run("broadcast", self._chain_broadcast, flat.view(np.uint8), root)
        if self._rank != root:
            writeback()
        return array

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
                self._recv_into(prv, self._prev, mv[lo:hi])
            if self._rank != last:
                self._send(nxt, self._next, [_HDR.pack(_OPS["broadcast"], self._seq, hi - lo, n),
                                            mv[lo:hi]])

    def _ring_allgather_bytes(self, opname, blocks: List[memoryview]):
        """blocks[k] (writable, sizes known) end up holding rank k's block everywhere."""
        n, r = self._world_size, self._rank
        for step in range(n - 1):
            si, ri = (r - step) % n, (r - step - 1) % n
            self._step(opname, blocks[si], blocks[ri])

    def allgather(self, array):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"collectives take numpy arrays, got {type(array).__name__}")
        if self._world_size == 1:
            return [array.copy()]
        return self._run("allgather", self._allgather, array)

    def _allgather(self, array):
        n, r = self._world_size, self._rank
        metas = np.zeros((n, _META_WORDS), np.int64)
        metas[r] = _meta(array)
        self._ring_allgather_bytes("allgather_meta", [memoryview(m).cast("B") for m in metas])
        infos = [_unmeta(m, self._max_bytes) for m in metas]
        if sum(nb for _, _, nb in infos) > self._max_bytes:
            raise _BadFrame(f"allgather of {sum(nb for _, _, nb in infos)} bytes in all, more "
                            f"than the limit of {self._max_bytes} (max_message_bytes)")
        if any(dt != array.dtype for dt, _, _ in infos):
            raise CollectiveMismatchError(
                f"collective group {self._group_name!r}: allgather dtypes differ: "
                + ", ".join(f"rank {k}: {dt}" for k, (dt, _, _) in enumerate(infos)))
        outs = [np.empty(shape, dt) for dt, shape, _ in infos]
        outs[r][...] = array
        self._ring_allgather_bytes("allgather", [memoryview(o.reshape(-1).view(np.uint8))
                                                 for o in outs])
        return outs

    def barrier(self):
        if self._world_size == 1:
            return
        tok = np.zeros(self._world_size, np.int64)
        self._run("barrier", self._ring_allgather_bytes, "barrier",
                  [memoryview(tok[k:k + 1]).cast("B") for k in range(self._world_size)])

    # -- point to point -------------------------------------------------------------------
    def send(self, array, dst):
        self._check_peer(dst, "dst")
        self._check_usable()
        if not isinstance(array, np.ndarray):
            raise TypeError(f"collectives take numpy arrays, got {type(array).__name__}")
        a = np.ascontiguousarray(array)
        self._p2p_seq_out[dst] += 1
        hdr = _HDR.pack(_OPS["p2p"], self._p2p_seq_out[dst], a.nbytes, 0)
        try:
            self._send(self._p2p[dst], dst, [hdr, _meta(a).tobytes(),
                                             memoryview(a.reshape(-1).view(np.uint8))])
        except _PeerFailure as f:
            raise CollectiveTimeoutError(self._group_name, f"send to rank {dst}", self._rank,
                                         [dst], self._timeout_s, f.detail) from None

    def _drain(self, sock, peer, n):
        """Read and drop ``n`` bytes (at most max_message_bytes) through the reused buffer."""
        buf = memoryview(self._tmp)
        while n > 0:
            k = min(n, len(buf))
            self._recv_into(sock, peer, buf[:k])
            n -= k

    def recv(self, array_or_shape, src, dtype=None):
        self._check_peer(src, "src")
        self._check_usable()
        sock = self._p2p[src]
        self._p2p_seq_in[src] += 1
        try:
            head = bytearray(_HDR.size + 8 * _META_WORDS)
            self._recv_into(sock, src, memoryview(head))
            op, seq, nbytes, _ = _HDR.unpack(head[:_HDR.size])
            if op != _OPS["p2p"] or seq != self._p2p_seq_in[src]:
                raise _BadFrame(f"expected message #{self._p2p_seq_in[src]}, got opcode {op} "
                                f"#{seq}")
            dt, shape, size = _unmeta(np.frombuffer(bytes(head[_HDR.size:]), np.int64),
                                      self._max_bytes)
            if size != nbytes:
                raise _BadFrame(f"header says {nbytes} bytes, meta says {size}")
            try:
                out = resolve_recv_target(array_or_shape, dtype, dt, shape,
                                          self._group_name, src)
            except CollectiveMismatchError:
                self._drain(sock, src, nbytes)     # so the stream stays in step
                raise
            flat, writeback = flat_view(out)
            self._recv_into(sock, src, memoryview(flat.view(np.uint8)))
            writeback()
            return out
        except _BadFrame as e:
            self._bad_frame(f"recv from rank {src}", src, e)
        except _PeerFailure as f:
            raise CollectiveTimeoutError(self._group_name, f"recv from rank {src}", self._rank,
                                         [src], self._timeout_s, f.detail) from None

    # -- teardown ---------------------------------------------------------------------------
    def _close_sockets(self):
        for d in (self._ring, self._p2p):
            for s in d.values():
                try:
                    s.close()
                except OSError:
                    pass
            d.clear()

    def close(self):
        if self._closed:
            return
        super().close()
        if self._sender is not None:
            self._sender.stop()
        self._close_sockets()
        try:
            self._store.delete(f"{self._key}/arrived/{self._rank}")
        except Exception:  # noqa: BLE001  (store may be gone at shutdown)
            pass


# ---------------------------------------------------------------------------------------------

def _pack_arrays(items: Sequence[tuple]) -> np.ndarray:
    """[(rank, array)] -> one uint8 buffer (no pickle): per item its meta words, then bytes."""
    parts = []
    for rank, a in items:
        m = _meta(a)
        m[-1] = rank
        parts.append(m.view(np.uint8))
        raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        parts.append(raw)
        parts.append(np.zeros((-raw.size) % 8, np.uint8))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def _unpack_arrays(buf: np.ndarray, world_size: int) -> List[np.ndarray]:
    """Inverse of :func:`_pack_arrays` for ranks 0..world_size-1, each exactly once; every
    declared size is checked against the bytes left (``_BadFrame`` otherwise)."""
    out, i = {}, 0
    while i < buf.size:
        if buf.size - i < 8 * _META_WORDS:
            raise _BadFrame(f"packed arrays: {buf.size - i} stray bytes at the end")
        m = buf[i: i + 8 * _META_WORDS].copy().view(np.int64)
        i += 8 * _META_WORDS
        dt, shape, nbytes = _unmeta(m, buf.size - i)
        rank = int(m[-1])
        if not 0 <= rank < world_size or rank in out:
            raise _BadFrame(f"packed arrays: rank {rank} is out of range or repeated")
        out[rank] = buf[i: i + nbytes].copy().view(dt).reshape(shape)
        i += nbytes + (-nbytes) % 8
    if len(out) != world_size:
        raise _BadFrame(f"packed arrays: ranks {sorted(set(range(world_size)) - set(out))} "
                        "are missing")
    return [out[k] for k in range(world_size)]


class HierarchicalCommunicator(Communicator):
    """Topology-aware group: shm within a node, TCP ring across node leaders.

    Every rank passes its ``node_id`` (e.g. Ray's node id); ranks with the same
    id share a node. All-reduce = node-local shm reduce to the node leader (its
    lowest rank), ring all-reduce among leaders, node-local broadcast. With one
    node this is the shm backend, with one rank per node the TCP ring.
    Reduction order: rank order inside a node, then the ring order over the node
    partials; bits are identical on every rank.

    Timeout errors name global ranks. A rank waiting on its own node leader while
    that leader waits on another node names its leader (its wait is local); the
    leader names the missing node's leader.

    Args:
        rank, world_size, store: as for :class:`TcpCommunicator`.
        node_id: ranks with equal ``node_id`` share memory (default: host name).
        group_name, timeout_s, host, init_timeout_s: as for :class:`TcpCommunicator`.
        shm_kw, tcp_kw: extra arguments for the node-local / leader communicators.

    Example (each rank)::

        comm = HierarchicalCommunicator(rank, world_size, RayKVStore(), node_id=node,
                                        group_name="grads", host=node_ip)
        comm.allreduce(bucket)
    """

    def __init__(self, rank: int, world_size: int, store: Store, node_id: Optional[str] = None,
                 group_name: str = "hier", timeout_s: float = DEFAULT_TIMEOUT_S,
                 host: str = "127.0.0.1", shm_kw: Optional[dict] = None,
                 tcp_kw: Optional[dict] = None, key_prefix: str = "distgrad",
                 init_timeout_s: Optional[float] = None):
        super().__init__(rank, world_size, group_name, timeout_s)
        init_timeout_s = float(init_timeout_s or timeout_s)
        node_id = str(node_id if node_id is not None else socket.gethostname())
        self._store = store
        key = f"{key_prefix}/{group_name}/hier"
        self._shm = self._cross = self._mesh = None
        deadline = time.monotonic() + init_timeout_s
        store.set(f"{key}/node/{rank}", node_id.encode())
        nodes = []
        for k in range(world_size):
            v = store.wait(f"{key}/node/{k}", max(0.0, deadline - time.monotonic()))
            if v is None:
                missing = [j for j in range(world_size) if store.get(f"{key}/node/{j}") is None]
                raise CollectiveTimeoutError(group_name, "init (topology exchange)", rank,
                                             missing, init_timeout_s)
            nodes.append(v.decode())
        order = []                               # node ids ordered by their lowest rank
        for nd in nodes:
            if nd not in order:
                order.append(nd)
        self.node_index = order.index(node_id)
        self.num_nodes = len(order)
        self.local_ranks = [k for k in range(world_size) if nodes[k] == node_id]
        self.local_rank = self.local_ranks.index(rank)
        self.leaders = [nodes.index(nd) for nd in order]     # global rank of each node's leader
        self._node_of = [order.index(nodes[k]) for k in range(world_size)]
        self._local_index = [[j for j in range(world_size) if nodes[j] == nodes[k]].index(k)
                             for k in range(world_size)]
        self.is_leader = self.local_rank == 0
        try:
            if len(self.local_ranks) > 1:
                # the node leader names the segment (random) and hands the name out
                self._shm = self._sub_call(lambda: ShmCommunicator(
                    self.local_rank, len(self.local_ranks), f"{key}/shm/{self.node_index}",
                    timeout_s=timeout_s, group_name=f"{group_name}/node{self.node_index}",
                    init_timeout_s=max(0.1, deadline - time.monotonic()), store=store,
                    **(shm_kw or {})), self.local_ranks)
            if self.num_nodes > 1:
                if self.is_leader:
                    self._cross = self._sub_call(lambda: TcpCommunicator(
                        self.node_index, self.num_nodes, store, f"{group_name}/leaders",
                        timeout_s, host, key_prefix=key_prefix,
                        init_timeout_s=max(0.1, deadline - time.monotonic()), **(tcp_kw or {})),
                        self.leaders)
                # cross-node send/recv go over a direct mesh (no ring sockets)
                self._mesh = self._sub_call(lambda: TcpCommunicator(
                    rank, world_size, store, f"{group_name}/mesh", timeout_s, host, ring=False,
                    key_prefix=key_prefix, init_timeout_s=max(0.1, deadline - time.monotonic())),
                    list(range(world_size)))
            self.barrier()               # everyone is connected: the keys can go
        except BaseException:
            self.close()
            raise
        finally:
            store.delete(f"{key}/node/{rank}")

    def _sub_call(self, fn, ranks: List[int]):
        """Run fn, renaming a sub-group's ranks in timeout errors to global ranks."""
        try:
            return fn()
        except CollectiveTimeoutError as e:
            missing = [ranks[k] if 0 <= k < len(ranks) else k for k in e.missing_ranks]
            raise CollectiveTimeoutError(self._group_name, e.op, self._rank, missing,
                                         self._timeout_s, str(e)) from None

    def _local(self, method, *args):
        return self._sub_call(lambda: getattr(self._shm, method)(*args), self.local_ranks)

    def _leaders(self, method, *args):
        return self._sub_call(lambda: getattr(self._cross, method)(*args), self.leaders)

    @property
    def topology(self) -> str:
        """"shm", "tcp" or "hierarchical": what this group actually uses."""
        if self.num_nodes == 1:
            return "shm" if self._shm is not None else "single"
        return "tcp" if self._shm is None and len(self.leaders) == self._world_size \
            else "hierarchical"

    def allreduce(self, array, op="sum"):
        op = normalize_op(op)
        self._check_open()
        if self.num_nodes == 1:
            return self._local("allreduce", array, op) if self._shm else array
        flat, writeback = flat_view(array)
        if self._shm is not None:
            self._local("reduce", flat, 0, op)
        if self.is_leader:
            self._leaders("allreduce", flat, op)
        if self._shm is not None:
            self._local("broadcast", flat, 0)
        writeback()
        return array

    def reducescatter(self, array, op="sum"):
        if not isinstance(array, np.ndarray) or array.ndim == 0:
            raise ValueError("reducescatter needs a numpy array with at least one dimension")
        if self.num_nodes == 1 and self._shm is not None:
            return self._local("reducescatter", array, op)
        tmp = self.allreduce(np.array(array, copy=True), op)
        return np.array_split(tmp, self._world_size, axis=0)[self._rank].copy()

    def broadcast(self, array, root=0):
        self._check_root(root)
        self._check_open()
        root_node = self._node_of[root]
        if self._shm is not None and self.node_index == root_node:
            self._local("broadcast", array, self._local_index[root])
        if self._cross is not None:
            self._leaders("broadcast", array, root_node)
        if self._shm is not None and self.node_index != root_node:
            self._local("broadcast", array, 0)
        return array

    def allgather(self, array):
        self._check_open()
        if self.num_nodes == 1:
            return self._local("allgather", array) if self._shm else [array.copy()]
        local = self._local("allgather", array) if self._shm else [array]
        if self.is_leader:
            packed = _pack_arrays(list(zip(self.local_ranks, local)))
            per_node = self._leaders("allgather", packed)
            full = np.concatenate(per_node)
            size = np.array([full.size], np.int64)
        else:
            size = np.zeros(1, np.int64)
        if self._shm is not None:
            self._local("broadcast", size, 0)
            if not self.is_leader:
                full = np.empty(int(size[0]), np.uint8)
            self._local("broadcast", full, 0)
        try:
            return _unpack_arrays(full, self._world_size)
        except _BadFrame as e:
            raise CollectiveError(f"collective group {self._group_name!r}: allgather on rank "
                                  f"{self._rank}: malformed data from the node leaders: {e}") \
                from None

    def barrier(self):
        self._check_open()
        if self._shm is not None:
            self._local("barrier")
        if self._cross is not None:
            self._leaders("barrier")
        if self._shm is not None:
            self._local("barrier")

    def send(self, array, dst):
        self._check_peer(dst, "dst")
        if self._shm is not None and dst in self.local_ranks:
            return self._local("send", array, self.local_ranks.index(dst))
        return self._mesh.send(array, dst)

    def recv(self, array_or_shape, src, dtype=None):
        self._check_peer(src, "src")
        if self._shm is not None and src in self.local_ranks:
            return self._local("recv", array_or_shape, self.local_ranks.index(src), dtype)
        return self._mesh.recv(array_or_shape, src, dtype)

    def close(self):
        if self._closed:
            return
        super().close()
        for c in (self._shm, self._cross, self._mesh):
            if c is not None:
                c.close()
