"""In-process collectives: N ranks as N threads of one process (``backend="local"``).

One :class:`InProcessGroup` is shared by the threads; each thread takes its
handle with ``group.communicator(rank)``. Ranks exchange array references
through the group object and synchronise on a condition variable, so no data is
copied twice. Every wait has the group's timeout; once a rank times out the
group is broken and every other rank's pending or later call raises the same
:class:`CollectiveTimeoutError`.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import List

import numpy as np

from .base import (DEFAULT_TIMEOUT_S, CollectiveAbortedError, CollectiveMismatchError,
                   CollectiveTimeoutError,
                   Communicator, check_ndarray, reduce_in_order, resolve_recv_target,
                   split_ranges)

__all__ = ["InProcessGroup", "InProcessCommunicator"]


class InProcessGroup:
    """Shared state of an in-process group of ``world_size`` thread ranks.

    Example::

        group = InProcessGroup(2, timeout_s=5)
        def work(r):
            with group.communicator(r) as comm:
                x = np.full(3, r + 1.0)
                comm.allreduce(x)        # [3, 3, 3] on both ranks
        threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    """

    def __init__(self, world_size: int, group_name: str = "inprocess",
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = int(world_size)
        self.group_name = str(group_name)
        self.timeout_s = float(timeout_s)
        self._cond = threading.Condition()
        self._arrivals = [0] * self.world_size      # syncs each rank has entered
        self._broken = None                          # (op, missing, detail) once failed
        self._aborted = False                        # broken by a rank leaving (abort)
        # Data posted for sync number m lives in slot m % 2: a writer for sync m+2
        # has passed sync m+1, so every reader of slot m % 2 is done with it.
        self._posts = [[None] * self.world_size for _ in range(2)]
        self._mail = {}                               # (src, dst) -> deque of arrays
        self._taken = set()

    def communicator(self, rank: int, timeout_s: float = None) -> "InProcessCommunicator":
        """Return rank ``rank``'s communicator (once per rank).

        >>> comm = InProcessGroup(1).communicator(0)
        """
        with self._cond:
            if rank in self._taken:
                raise ValueError(f"rank {rank} of in-process group {self.group_name!r} "
                                 "already has a communicator")
            comm = InProcessCommunicator(self, rank, timeout_s or self.timeout_s)
            self._taken.add(rank)
        return comm

    # -- synchronisation (called by communicators) -------------------------------
    def _raise_broken(self, rank: int):
        op, missing, detail, timeout_s = self._broken
        cls = CollectiveAbortedError if self._aborted else CollectiveTimeoutError
        raise cls(self.group_name, op, rank, missing, timeout_s, detail)

    def _abort(self, rank: int, detail: str, timeout_s: float):
        """Rank ``rank`` leaves: every wait of the group raises now (see Communicator.abort)."""
        with self._cond:
            if self._broken is None:
                self._broken = ("the step", [rank], detail, timeout_s)
                self._aborted = True
            self._cond.notify_all()

    def _sync(self, rank: int, op: str, timeout_s: float) -> int:
        """Enter sync point number m (returned) and wait until every rank has."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if self._broken is not None:
                self._raise_broken(rank)
            self._arrivals[rank] += 1
            m = self._arrivals[rank]
            self._cond.notify_all()
            while min(self._arrivals) < m:
                if self._broken is not None:
                    self._raise_broken(rank)
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [j for j, a in enumerate(self._arrivals) if a < m]
                    self._broken = (op, missing, "", timeout_s)
                    self._cond.notify_all()
                    self._raise_broken(rank)
                self._cond.wait(left)
            return m


class InProcessCommunicator(Communicator):
    """A thread rank of an :class:`InProcessGroup` (see :class:`Communicator`)."""

    def __init__(self, group: InProcessGroup, rank: int, timeout_s: float):
        super().__init__(rank, group.world_size, group.group_name, timeout_s)
        self._g = group
        self._next = 0          # number of the next sync this rank will enter

    # posts for the next sync go to slot (next sync number) % 2
    def _post(self, meta, data=None):
        self._g._posts[(self._next + 1) % 2][self._rank] = (meta, data)

    def _sync(self, op):
        self._check_open()
        m = self._g._sync(self._rank, op, self._timeout_s)
        self._next = m
        return self._g._posts[m % 2]

    def _check_meta(self, posts, op):
        metas = [p[0] for p in posts]
        if any(m != metas[0] for m in metas):
            desc = "; ".join(f"rank {i}: {m}" for i, m in enumerate(metas))
            raise CollectiveMismatchError(
                f"collective group {self._group_name!r}: ranks disagree in {op}: {desc}")

    # -- collectives (the public methods, in base.Communicator, call these) -------
    def _allreduce_flat(self, flat, op):
        self._post(("allreduce", op, flat.dtype.str, flat.size), flat)
        posts = self._sync("allreduce")
        self._check_meta(posts, "allreduce")
        # Each rank reduces its 1/N slice (numpy drops the GIL: threads run in parallel).
        ranges = split_ranges(flat.size, self._world_size)
        s, e = ranges[self._rank]
        part = np.empty(e - s, flat.dtype)
        reduce_in_order([p[1][s:e] for p in posts], op, part)
        self._post(None, part)
        parts = self._sync("allreduce")
        for (s, e), p in zip(ranges, parts):
            flat[s:e] = p[1]

    def _exchange(self, op, meta, array):
        """Post ``array`` under ``meta``, return every rank's array once all have posted.
        The caller reads them, then calls :meth:`_done_reading` (the arrays stay alive and
        unmodified until every rank has read them)."""
        self._post((op,) + meta, array)
        posts = self._sync(op)
        self._check_meta(posts, op)
        return [p[1] for p in posts]

    def _done_reading(self, op):
        self._post(None)
        self._sync(op)

    def _reducescatter_rows(self, array, op):
        s, e = split_ranges(array.shape[0], self._world_size)[self._rank]
        ins = self._exchange("reducescatter", (op, array.dtype.str, array.shape), array)
        out = np.empty((e - s,) + array.shape[1:], array.dtype)
        reduce_in_order([a[s:e] for a in ins], op, out)
        self._done_reading("reducescatter")
        return out

    def _allgather(self, array) -> List[np.ndarray]:
        ins = self._exchange("allgather", (array.dtype.str,), array)
        out = [np.array(a, copy=True) for a in ins]
        self._done_reading("allgather")
        return out

    def _broadcast_flat(self, flat, root):
        ins = self._exchange("broadcast", (root, flat.dtype.str, flat.size), flat)
        if self._rank != root:
            flat[...] = ins[root]
        self._done_reading("broadcast")

    def _reduce_flat(self, flat, root, op):
        ins = self._exchange("reduce", (root, op, flat.dtype.str, flat.size), flat)
        res = None
        if self._rank == root:
            res = np.empty_like(flat)
            reduce_in_order(ins, op, res)
        self._done_reading("reduce")    # nobody may modify its input before root has read it
        if res is not None:
            flat[...] = res

    def _barrier_all(self):
        self._exchange("barrier", (), None)

    def send(self, array, dst):
        self._check_peer(dst, "dst")
        self._check_open()
        check_ndarray(array)
        g = self._g
        with g._cond:
            # Copied now, so the sender may reuse its buffer at once (eager send).
            g._mail.setdefault((self._rank, dst), collections.deque()).append(array.copy())
            g._cond.notify_all()

    def recv(self, array_or_shape, src, dtype=None):
        self._check_peer(src, "src")
        self._check_open()
        g = self._g
        deadline = time.monotonic() + self._timeout_s
        with g._cond:
            while True:
                box = g._mail.get((src, self._rank))
                if box:
                    msg = box.popleft()
                    break
                if g._broken is not None:
                    g._raise_broken(self._rank)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CollectiveTimeoutError(self._group_name, f"recv from rank {src}",
                                                 self._rank, [src], self._timeout_s)
                g._cond.wait(left)
        out = resolve_recv_target(array_or_shape, dtype, msg.dtype, msg.shape,
                                  self._group_name, src)
        out[...] = msg.reshape(out.shape)
        return out

    def abort(self, detail=""):
        self._g._abort(self._rank, detail, self._timeout_s)

    def close(self):
        if not self._closed:
            super().close()
            with self._g._cond:
                self._g._taken.discard(self._rank)
