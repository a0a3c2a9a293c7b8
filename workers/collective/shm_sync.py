"""Waiting over a shared-memory segment: counters, doorbells, the barrier, the abort flag,
and the per-op headers by which ranks check that they run the same collective.

Synchronisation is by monotonically increasing counters in the segment's control
block: a waiter spins briefly, then blocks on its own POSIX named semaphore (a
"doorbell") that the writer of the counter rings when it sees the waiter's
sleeping flag, so ranks never burn a core another rank needs (more ranks than
cores, or a busy machine). No Ray or socket call per collective.

A peer that dies or stops calling gives :class:`CollectiveTimeoutError` naming
it, within the timeout (sooner when its process is seen dead), and the failing
rank raises the abort flag so every other rank fails fast too.

Memory ordering: counters are written after the data with plain stores; this
relies on x86-64's store ordering (TSO), like most shared-memory Python code.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

from .base import CollectiveAbortedError, CollectiveMismatchError, CollectiveTimeoutError
from .shm_segment import ABORT, HDR_WORDS, LINE, RANKS, ShmSegment, pid_alive

__all__ = ["ShmSync", "OPS", "OP_NAMES", "fence"]

_FENCE_LOCK = threading.Lock()


def fence():
    """Full memory barrier (a lock round trip is a locked instruction): orders our
    store of a flag/counter before our load of the other side's (Dekker-style
    sleep/wake handshake).

    >>> q[my_flag] = 1; fence(); peer_counter = q[peer_idx]   # doctest: +SKIP
    """
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


# op codes in the headers (names in mismatch errors)
OPS = {"allreduce": 1, "allreduce_small": 2, "reducescatter": 3, "reduce": 4,
        "broadcast": 5, "allgather": 6, "barrier": 7, "allreduce_bucket": 8}
OP_NAMES = {v: k for k, v in OPS.items()}


class ShmSync:
    """One rank's waits over a :class:`~.shm_segment.ShmSegment`: barrier, doorbells, abort,
    op headers. Once a wait fails the group is broken (``broken`` says how) and every
    later :meth:`begin` raises.

    Example (what a collective does)::

        sync.begin("barrier")
        st = sync.next_set()
        sync.write_hdr(st, (OPS["barrier"],))
        sync.barrier("barrier")
        sync.check_hdrs(st, 1, "barrier")
    """

    def __init__(self, seg: ShmSegment, rank: int, world_size: int, group_name: str,
                 timeout_s: float, spin: int):
        self._seg = seg
        self._rank, self._world_size = rank, world_size
        self._group_name, self._timeout_s = group_name, timeout_s
        self._spin = spin
        self.broken: Optional[tuple] = None
        self._nsync = 0          # barriers entered
        self._nset = 0           # buffer sets taken (its parity selects the set)
        self._opseq = 0
        self._ctr = RANKS + rank * LINE
        self._sleep_idx = self._ctr + 3
        self.peers = [k for k in range(world_size) if k != rank]
        self._peer_ctr = [(k, RANKS + k * LINE) for k in self.peers]

    def fail(self, op, missing, detail=""):
        """Give up on ``op``: raise the abort flag (naming ``missing``), wake every peer so
        it fails fast too, break the group and raise :class:`CollectiveTimeoutError`."""
        self._raise_flag(missing, left=False)
        self.broken = (op, list(missing), detail)
        raise CollectiveTimeoutError(self._group_name, op, self._rank, missing,
                                     self._timeout_s, detail)

    def leave(self, detail=""):
        """This rank leaves the step (``Communicator.abort``): raise the abort flag naming
        itself, marked as a departure, so every peer waiting for it fails now."""
        self._raise_flag([self._rank], left=True)
        self.broken = ("the step", [self._rank], detail)

    def _raise_flag(self, missing, left):
        q = self._seg.q
        if q is not None and q[ABORT] == 0:
            mask = 0
            for k in missing:
                if k < 63:
                    mask |= 1 << k
            q[ABORT + 1] = mask
            q[ABORT + 2] = 1 if left else 0
            q[ABORT] = self._rank + 1
            fence()
            for k in self.peers:
                self.ring(k)

    def check_abort(self, op):
        """Raise (and break the group) if another rank has raised the abort flag."""
        q = self._seg.q
        if q[ABORT]:
            who, mask = q[ABORT] - 1, q[ABORT + 1]
            missing = [k for k in range(min(self._world_size, 63)) if mask >> k & 1]
            left = q[ABORT + 2] == 1
            detail = "its step failed" if left else f"rank {who} gave up"
            self.broken = (op, missing, detail)
            cls = CollectiveAbortedError if left else CollectiveTimeoutError
            raise cls(self._group_name, op, self._rank, missing, self._timeout_s, detail)

    def wait_ge(self, idx, target, op, who, missing_fn):
        """Wait until word ``idx`` >= ``target``; ``who`` is the rank that writes it."""
        q = self._seg.q
        for _ in range(self._spin):
            if q[idx] >= target:
                return
        # Sleep on our doorbell. Handshake: we set our sleeping flag, fence, re-check;
        # the writer stores the word, fences, and rings the bell if our flag is set.
        # A short acquire timeout backs up the handshake and drives the checks below.
        flag = self._sleep_idx
        bell = self._seg.bells[self._rank]
        deadline = time.monotonic() + self._timeout_s
        next_check = time.monotonic() + 0.05
        q[flag] = 1
        try:
            while True:
                fence()
                while bell.acquire(False):      # drop stale rings
                    pass
                if q[idx] >= target:
                    return
                bell.acquire(True, 0.01)
                if q[idx] >= target:
                    return
                now = time.monotonic()
                if now >= next_check:
                    self.check_abort(op)
                    pid = self._seg.pids[who]
                    if not pid_alive(pid):
                        self.fail(op, missing_fn(), f"rank {who} (pid {pid}) died")
                    if now > deadline:
                        self.fail(op, missing_fn())
                    next_check = now + 0.05
        finally:
            q[flag] = 0

    def ring(self, k):
        """Wake rank ``k`` if it sleeps (call after storing what it may wait for)."""
        if self._seg.q[RANKS + k * LINE + 3]:
            self._seg.bells[k].release()

    def barrier(self, op):
        """Return once every rank has entered as many barriers as this one (``op`` names
        the collective in a timeout error)."""
        self._nsync += 1
        my = self._nsync
        q = self._seg.q
        q[self._ctr] = my
        fence()
        for k, idx in self._peer_ctr:
            if q[idx + 3]:
                self._seg.bells[k].release()
        for k, idx in self._peer_ctr:
            if q[idx] < my:
                self.wait_ge(idx, my, op, k, lambda: [
                    j for j, i in self._peer_ctr if q[i] < my])

    def begin(self, op, collective=True):
        """Start op ``op`` (a collective counts towards the header's call number); raise
        if an earlier wait broke the group."""
        if self.broken is not None:
            bop, missing, detail = self.broken
            raise CollectiveTimeoutError(self._group_name, op, self._rank, missing,
                                         self._timeout_s,
                                         f"group broken by an earlier failure in {bop}" +
                                         (f": {detail}" if detail else ""))
        if collective:
            self._opseq += 1

    def next_set(self):
        """The buffer set (0 or 1) of the next chunk: consecutive chunks alternate, so one
        chunk's writes never race a slow rank's reads of the previous one."""
        self._nset += 1
        return self._nset & 1

    def write_hdr(self, st, words):
        """Publish this rank's header of the op using buffer set ``st``: the call number,
        then ``words`` (op code, sizes, dtype code, root...)."""
        h = self._seg.lay["hdr_off"] + (st * self._world_size + self._rank) * HDR_WORDS
        q = self._seg.q
        q[h + 1] = self._opseq
        for i, w in enumerate(words):
            q[h + 2 + i] = int(w)
        return h

    def read_hdrs(self, st, nwords):
        """Every rank's header for set ``st``: call number and ``nwords`` words."""
        base = self._seg.lay["hdr_off"] + st * self._world_size * HDR_WORDS
        q = self._seg.q
        return [q[base + k * HDR_WORDS + 1: base + k * HDR_WORDS + 2 + nwords].tolist()
                for k in range(self._world_size)]

    def check_hdrs(self, st, nwords, opname):
        """Raise :class:`CollectiveMismatchError` unless every rank wrote the same header
        (after the barrier that follows :meth:`write_hdr`)."""
        hdrs = self.read_hdrs(st, nwords)
        if any(h != hdrs[0] for h in hdrs):
            def show(h):
                name = OP_NAMES.get(h[1], f"op#{h[1]}")
                return f"{name} {h[2:]}"
            desc = "; ".join(f"rank {k}: {show(h)}" for k, h in enumerate(hdrs))
            raise CollectiveMismatchError(
                f"collective group {self._group_name!r}: ranks disagree in {opname} "
                f"(op, sizes, dtype, root): {desc}")
