"""Same-node collectives over POSIX shared memory: the shm backend's algorithms.

All ranks map one segment (its lifecycle: ``shm_segment.py``) and wait on each
other through counters and doorbells in it (``shm_sync.py``); send/recv go
through per-pair channels (``shm_p2p.py``). This file owns the collectives.

All-reduce is reduce-scatter + all-gather, chunked through the slots so the
working set stays in cache: per chunk, rank ``r`` copies the pieces the other
ranks own into its slot, reduces its own piece from every rank's slot in rank
order ``((x0 op x1) op x2)...`` and publishes it, and copies the others'
results out; software-pipelined with one barrier per chunk. Consecutive chunks
use alternate buffer sets, so one chunk's writes never race a slow rank's
reads of the previous chunk. Small arrays take a one-barrier path (each rank
reduces the whole array itself, same order, same bits). Zero-copy buckets
(:meth:`ShmCommunicator.bucket`) live in the segment: each rank reduces its
slice straight from the ranks' inputs into one shared output.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from .base import (DEFAULT_TIMEOUT_S, OP_CODES, CollectiveMismatchError, Communicator,
                   check_ndarray, code_dtype, dtype_code, flat_view, normalize_op,
                   reduce_in_order, split_ranges)
from .shm_p2p import ShmChannels
from .shm_segment import HDR_WORDS, ShmSegment
from .shm_sync import OP_NAMES, OPS, ShmSync

__all__ = ["ShmCommunicator", "ShmBucket", "ShmArena"]

# allgather's header words: call number, op code, dtype code, ndim, then the shape, which
# must end inside the header (HDR_WORDS), with a few words to spare
_MAX_GATHER_NDIM = HDR_WORDS - 9


class ShmBucket:
    """A zero-copy all-reduce buffer in a shared segment (see ShmCommunicator.bucket).

    ``input``: this rank's array to fill; ``output``: the result, shared by all
    ranks; ``inputs``: every rank's input (read-only use); ``offset``: position
    in the arena.
    """

    __slots__ = ("input", "output", "inputs", "offset")

    def __init__(self, input, output, inputs, offset):
        self.input, self.output, self.inputs, self.offset = input, output, inputs, offset


def _default_slot_bytes(world_size: int, ncpu: int) -> int:
    # Chunks small enough that the exchanged data stays in cache between writer and
    # reader, large enough that barriers are rare (one per chunk). With a core per rank
    # a barrier costs microseconds and 1 MB per slot was best on the 2-core dev box.
    # With more ranks than cores every barrier waits for a rank to be scheduled again
    # (a context switch or a time slice): 4 MB per slot, 4x fewer barriers, took the 4-rank
    # 16 MB all-reduce from 1.5x to 2.9x gloo there (bench/allreduce.py --slot-bytes
    # re-tunes). DISTGRAD_SHM_SLOT_BYTES overrides.
    env = os.environ.get("DISTGRAD_SHM_SLOT_BYTES")
    if env:
        return int(env)
    return 1 << 20 if world_size <= ncpu else 4 << 20


class ShmCommunicator(Communicator):  # long: base's hooks over shared memory, and buckets
    """A rank of a same-node group communicating through one shared-memory segment.

    Every rank constructs it with the same ``name``; rank ``creator_rank``
    (default 0) creates the segment, the others attach; construction returns
    once all ``world_size`` ranks are attached (or raises
    :class:`CollectiveTimeoutError` naming the ranks that never came).

    Args:
        rank, world_size: this rank and the group size.
        name: segment name shared by the ranks (``distgrad_`` is prepended
            when missing); must be unique per live group. With ``store``, only the
            key under which the creator publishes the segment's real name.
        timeout_s: bound on every wait (default 30 s).
        group_name: used in error messages (default: ``name``).
        slot_bytes: per-rank chunk size (creator's value wins).
        small_bytes: all-reduce of arrays up to this size uses the one-barrier path.
        p2p_bytes: size of each send/recv channel.
        arena_bytes: per-rank space for zero-copy buckets (:meth:`bucket`); 0: none.
        init_timeout_s: bound on the rendezvous (default: ``timeout_s``).
        store: a rendezvous :class:`~.rendezvous.Store`. With one, the creator names the
            segment itself (random, retried under a fresh name if taken) and hands the
            name out through the store; without, a name that is taken is an error.

    The segment and its semaphores are mode 0600 (this user only). Stale-segment
    cleanup touches only this user's regular files.

    Example (in each of 2 processes)::

        comm = ShmCommunicator(rank, 2, "distgrad_demo")
        x = np.full(1000, rank + 1.0, np.float32)
        comm.allreduce(x)             # 3.0 everywhere
        comm.close()
    """

    def __init__(self, rank: int, world_size: int, name: str,
                 timeout_s: float = DEFAULT_TIMEOUT_S, group_name: Optional[str] = None,
                 slot_bytes: Optional[int] = None, small_bytes: int = 64 << 10,
                 p2p_bytes: int = 256 << 10, creator_rank: int = 0,
                 init_timeout_s: Optional[float] = None, arena_bytes: int = 0,
                 store=None):
        super().__init__(rank, world_size, group_name or name, timeout_s)
        self._seg = None                 # close() after a failed rendezvous has nothing to do
        self._small_bytes = int(small_bytes)
        ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
        self._seg = ShmSegment(
            rank, world_size, name, group_name=self._group_name, store=store,
            # rendezvous may wait for slow process start-up: its own bound
            init_timeout_s=float(init_timeout_s or timeout_s), creator_rank=creator_rank,
            slot_bytes=int(slot_bytes or _default_slot_bytes(world_size, ncpu)),
            p2p_bytes=int(p2p_bytes), arena_bytes=int(arena_bytes))
        # Spin briefly (a peer usually arrives within microseconds), then block on the
        # doorbell. More ranks than cores: no spinning, it would steal the late rank's CPU.
        spin = 0 if world_size > ncpu else 1000
        self._sync = ShmSync(self._seg, rank, world_size, self._group_name, self._timeout_s,
                             spin)
        self._p2p = ShmChannels(self._seg, self._sync, rank, world_size, self._group_name)
        self._arena = ShmArena(self._seg, self._sync, rank, world_size)

    @property
    def name(self) -> str:
        """The segment's name (random when the group was made with a ``store``)."""
        return self._seg.name

    def abort(self, detail=""):
        if not self._closed and self._seg is not None:
            self._sync.leave(detail)

    def close(self):
        """Detach from the segment (idempotent). The memory is freed when the last rank detaches."""
        if self._closed:
            return
        super().close()
        if self._seg is not None:
            self._seg.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown: nothing left to report to)
            pass

    def _begin(self, op, collective=True):
        self._check_open()
        self._sync.begin(op, collective)

    # -- collectives (the public methods, in base.Communicator, call these) -------
    def _allreduce_flat(self, flat, op):
        self._begin("allreduce")
        if flat.nbytes <= min(self._small_bytes, self._seg.lay["slot"]):
            self._allreduce_small(flat, op)
        else:
            ranges = split_ranges(flat.size, self._world_size)
            self._reduce_chunks("allreduce", flat, ranges, op, "all")

    def _allreduce_small(self, flat, op):
        """One barrier: every rank publishes its whole array, then reduces all of them
        itself (same rank order, same bits on every rank)."""
        st = self._sync.next_set()
        slots = self._seg.slots[st]
        b = flat.view(np.uint8)
        slots[self._rank][:b.size] = b
        self._sync.write_hdr(st, (OPS["allreduce_small"], flat.size, dtype_code(flat.dtype),
                                  OP_CODES[op]))
        self._sync.barrier("allreduce")
        self._sync.check_hdrs(st, 4, "allreduce")
        n = flat.nbytes
        reduce_in_order([s[:n].view(flat.dtype) for s in slots], op, flat)

    def _reduce_chunks(self, opname, flat, ranges, op, mode, root=-1, out=None):
        """Reduce-scatter (+ gather) of ``flat`` where rank k owns ``ranges[k]``.

        mode "all": every rank gets the full result in ``flat``; "root": only
        ``root`` does; "scatter": each rank gets its own range in ``out``.

        Software-pipelined, one barrier per chunk: before barrier c+1 a rank has
        published its result piece of chunk c and its inputs of chunk c+1 (in the
        other buffer set); after it, it copies out chunk c's results and reduces
        chunk c+1. Inputs (sub-slots j != k of rank k's slot) and results (sub-slot
        k) are disjoint, so chunk c+1's inputs never overwrite chunk c-1's
        results that a slow rank may still be copying.
        """
        n, r, sub = self._world_size, self._rank, self._seg.lay["sub"]
        all_slots, peers = self._seg.slots, self._sync.peers
        dt = flat.dtype
        item = dt.itemsize
        cs = sub // item
        nchunks = max(1, -(-max(e - s for s, e in ranges) // cs))
        gather = mode != "scatter"
        copy_out = mode == "all" or r == root
        my_s = ranges[r][0]

        def lens_of(c):
            base = c * cs
            return [max(0, min(e - s - base, cs)) for s, e in ranges]

        def write_inputs(c, st, lens):
            mine = all_slots[st][r]
            base = c * cs
            for j in peers:
                if lens[j]:
                    s0 = ranges[j][0] + base
                    np.copyto(mine[j * sub: j * sub + lens[j] * item].view(dt),
                              flat[s0: s0 + lens[j]])

        st = self._sync.next_set()
        lens = lens_of(0)
        write_inputs(0, st, lens)
        self._sync.write_hdr(st, (OPS[opname], flat.size, dtype_code(dt), OP_CODES[op], root))
        self._sync.barrier(opname)
        self._sync.check_hdrs(st, 5, opname)
        for c in range(nchunks):
            slots = all_slots[st]
            base = c * cs
            L = lens[r]
            if L:
                s0 = my_s + base
                lo = r * sub
                terms = [flat[s0: s0 + L] if k == r else slots[k][lo: lo + L * item].view(dt)
                         for k in range(n)]
                if gather:
                    res = slots[r][lo: lo + L * item].view(dt)
                    reduce_in_order(terms, op, res)
                    if copy_out:
                        np.copyto(flat[s0: s0 + L], res)
                else:
                    reduce_in_order(terms, op, out[base: base + L])
            last = c + 1 == nchunks
            if not last:
                nst = self._sync.next_set()
                nlens = lens_of(c + 1)
                write_inputs(c + 1, nst, nlens)
            if gather or not last:
                self._sync.barrier(opname)
            if gather and copy_out:
                for j in peers:
                    if lens[j]:
                        s0 = ranges[j][0] + base
                        np.copyto(flat[s0: s0 + lens[j]],
                                  slots[j][j * sub: j * sub + lens[j] * item].view(dt))
            if not last:
                st, lens = nst, nlens

    def _reducescatter_rows(self, array, op):
        rows = split_ranges(array.shape[0], self._world_size)
        row = math.prod(array.shape[1:])
        s, e = rows[self._rank]
        self._begin("reducescatter")
        flat, _ = flat_view(array)
        out = np.empty((e - s,) + array.shape[1:], array.dtype)
        self._reduce_chunks("reducescatter", flat, [(a * row, b * row) for a, b in rows], op,
                            "scatter", out=out.reshape(-1))
        return out

    def _reduce_flat(self, flat, root, op):
        self._begin("reduce")
        self._reduce_chunks("reduce", flat, split_ranges(flat.size, self._world_size), op,
                            "root", root=root)

    def _broadcast_flat(self, flat, root):
        self._begin("broadcast")
        b = flat.view(np.uint8)
        slot = self._seg.lay["slot"]
        nchunks = max(1, -(-b.size // slot))
        for c in range(nchunks):
            st = self._sync.next_set()
            src = self._seg.slots[st][root]
            lo, hi = c * slot, min(b.size, (c + 1) * slot)
            if self._rank == root:
                src[: hi - lo] = b[lo:hi]
            if c == 0:
                self._sync.write_hdr(st, (OPS["broadcast"], flat.nbytes,
                                          dtype_code(flat.dtype), root))
            self._sync.barrier("broadcast")
            if c == 0:
                self._sync.check_hdrs(st, 4, "broadcast")
            if self._rank != root:
                b[lo:hi] = src[: hi - lo]

    def _allgather(self, array):
        if array.ndim > _MAX_GATHER_NDIM:
            raise ValueError(f"allgather supports at most {_MAX_GATHER_NDIM} dimensions")
        self._begin("allgather")
        r = self._rank
        st = self._sync.next_set()
        self._sync.write_hdr(st, (OPS["allgather"], dtype_code(array.dtype), array.ndim)
                             + tuple(array.shape))
        self._sync.barrier("allgather")
        hdrs = self._sync.read_hdrs(st, 3 + _MAX_GATHER_NDIM)
        if any(h[:3] != hdrs[0][:3] for h in hdrs):
            desc = "; ".join(f"rank {k}: {OP_NAMES.get(h[1], h[1])} dtype "
                             f"{code_dtype(h[2]) if h[1] == OPS['allgather'] else '?'}"
                             for k, h in enumerate(hdrs))
            raise CollectiveMismatchError(f"collective group {self._group_name!r}: ranks "
                                          f"disagree in allgather: {desc}")
        shapes = [tuple(h[4: 4 + h[3]]) for h in hdrs]
        outs = [np.empty(shp, array.dtype) for shp in shapes]
        outs[r][...] = array
        mine = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        views = [o.reshape(-1).view(np.uint8) for o in outs]
        slot = self._seg.lay["slot"]
        nchunks = max(1, -(-max(v.size for v in views) // slot))
        for c in range(nchunks):
            st = self._sync.next_set()
            lo = c * slot
            if lo < mine.size:
                hi = min(mine.size, lo + slot)
                self._seg.slots[st][r][: hi - lo] = mine[lo:hi]
            self._sync.barrier("allgather")
            for k in self._sync.peers:
                v = views[k]
                if lo < v.size:
                    hi = min(v.size, lo + slot)
                    v[lo:hi] = self._seg.slots[st][k][: hi - lo]
        return outs

    def _barrier_all(self):
        self._begin("barrier")
        st = self._sync.next_set()
        self._sync.write_hdr(st, (OPS["barrier"],))
        self._sync.barrier("barrier")
        self._sync.check_hdrs(st, 1, "barrier")

    # -- zero-copy buckets (ShmArena below) ----------------------------------------------
    def bucket(self, shape, dtype=np.float32) -> "ShmBucket":
        """Allocate a zero-copy all-reduce bucket in the shared segment.

        Every rank must allocate the same buckets in the same order (a bump
        allocator over ``arena_bytes``). Write this rank's values into
        ``b.input``, call :meth:`allreduce_bucket`, read the result from
        ``b.output``: one region of the segment that all ranks share, so the
        all-reduce copies nothing in or out. ``b.output`` stays valid until the
        next ``allreduce_bucket(b)``.

        >>> b = comm.bucket((1000,), np.float32)     # doctest: +SKIP
        >>> b.input[:] = grads; comm.allreduce_bucket(b); use(b.output)  # doctest: +SKIP
        """
        self._check_open()
        return self._arena.allocate(shape, dtype)

    @property
    def arena_bytes(self) -> int:
        """Bytes each rank has for zero-copy buckets (:meth:`bucket`); 0 without an arena."""
        return self._seg.lay["arena"]

    def reset_buckets(self) -> None:
        """Forget every bucket (all ranks together); their arrays must no longer be used."""
        self._arena.used = 0

    def allreduce_bucket(self, bucket: "ShmBucket", op="sum") -> np.ndarray:
        """All-reduce ``bucket.input`` of every rank into the shared ``bucket.output``.

        Each rank reduces its 1/N slice straight from the ranks' input arenas into
        the output, in rank order; two barriers, no copies. Returns ``bucket.output``.

        >>> comm.allreduce_bucket(b)     # doctest: +SKIP
        """
        op = normalize_op(op)
        if self._world_size == 1:
            np.copyto(bucket.output, bucket.input)
        else:
            self._begin("allreduce_bucket")
            self._arena.allreduce(bucket, op)
        return bucket.output

    # -- point to point (through the channels in shm_p2p.py) --------------------------
    def send(self, array, dst):
        self._check_peer(dst, "dst")
        check_ndarray(array)
        self._begin(f"send to rank {dst}", collective=False)
        self._p2p.send(array, dst)

    def recv(self, array_or_shape, src, dtype=None):
        self._check_peer(src, "src")
        self._begin(f"recv from rank {src}", collective=False)
        return self._p2p.recv(array_or_shape, src, dtype)


class ShmArena:
    """The segment's bucket arenas (one input arena per rank, one shared output): a bump
    allocator of :class:`ShmBucket` views and the all-reduce that runs over them.

    Example (what :class:`ShmCommunicator` does)::

        arena = ShmArena(seg, sync, rank, world_size)
        b = arena.allocate((1000,), np.float32)
        b.input[...] = grads; arena.allreduce(b, "sum"); use(b.output)
    """

    def __init__(self, seg: ShmSegment, sync: ShmSync, rank: int, world_size: int):
        self._seg, self._sync, self._rank, self._world_size = seg, sync, rank, world_size
        self.used = 0            # bytes of each arena handed out (64-byte aligned)

    def allocate(self, shape, dtype) -> ShmBucket:
        """The next bucket of ``shape``/``dtype``; every rank allocates the same sequence."""
        dt = np.dtype(dtype)
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(d) for d in shape)
        nbytes = math.prod(shape) * dt.itemsize
        off, lay, u8 = self.used, self._seg.lay, self._seg.u8
        if off + nbytes > lay["arena"]:
            raise ValueError(f"bucket of {nbytes} bytes does not fit: arena_bytes is "
                             f"{lay['arena']}, {off} used (pass a larger arena_bytes)")
        self.used = off + -(-nbytes // 64) * 64

        def view(start):
            return u8[start + off: start + off + nbytes].view(dt).reshape(shape)
        ins = [view(lay["arena_off"] + k * lay["arena"]) for k in range(self._world_size)]
        return ShmBucket(ins[self._rank], view(lay["out_off"]), ins, off)

    def allreduce(self, bucket: ShmBucket, op: str) -> None:
        """Reduce this rank's 1/N slice of every rank's input into the shared output (in
        rank order); returns once the whole output is complete on every rank."""
        st = self._sync.next_set()
        self._sync.write_hdr(st, (OPS["allreduce_bucket"], bucket.offset, bucket.output.size,
                                  dtype_code(bucket.output.dtype), OP_CODES[op]))
        self._sync.barrier("allreduce_bucket")
        self._sync.check_hdrs(st, 5, "allreduce_bucket")
        s, e = split_ranges(bucket.output.size, self._world_size)[self._rank]
        if e > s:
            flat_out = bucket.output.reshape(-1)
            reduce_in_order([x.reshape(-1)[s:e] for x in bucket.inputs], op, flat_out[s:e])
        self._sync.barrier("allreduce_bucket")    # output complete; inputs free to refill
