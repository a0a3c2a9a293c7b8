"""Point-to-point messages over a shared-memory segment (``send``/``recv`` of the shm backend).

Each ordered pair of ranks (src, dst) owns one channel: a buffer of ``p2p_bytes``
in the segment's data area and a control header of two counter lines: at word 0
the chunks src has published (then the message's size, dtype code, ndim and
shape), at word :data:`~.shm_segment.LINE` the chunks dst has taken. A message
larger than the buffer goes through in chunks, each written once the receiver
acknowledged the previous one.
"""
from __future__ import annotations

import numpy as np

from .base import (CollectiveError, CollectiveMismatchError, code_dtype, dtype_code, flat_view,
                   resolve_recv_target)
from .shm_segment import HDR_WORDS, LINE, ShmSegment
from .shm_sync import ShmSync, fence

__all__ = ["ShmChannels", "MAX_NDIM"]

# The shape words of a channel's header sit between its size/dtype/rank words and the
# receiver's acknowledgement counter at word LINE: a longer shape would overwrite it.
MAX_NDIM = LINE - 4


class ShmChannels:
    """One rank's ends of the point-to-point channels in a segment.

    Example (what :class:`~.shm.ShmCommunicator` does)::

        chans = ShmChannels(seg, sync, rank, world_size, "demo")
        chans.send(np.arange(3.0), dst=1)      # on rank 0
        chans.recv(None, src=0)                # on rank 1
    """

    def __init__(self, seg: ShmSegment, sync: ShmSync, rank: int, world_size: int,
                 group_name: str):
        self._seg, self._sync = seg, sync
        self._rank, self._world_size, self._group_name = rank, world_size, group_name
        self._sent = [0] * world_size       # chunks sent to / received from each peer
        self._recvd = [0] * world_size

    def _chan(self, src, dst):
        lay = self._seg.lay
        ctl = lay["p2p_ctl"] + (src * self._world_size + dst) * HDR_WORDS
        off = lay["p2p_off"] + (src * self._world_size + dst) * lay["p2p"]
        return ctl, self._seg.u8[off: off + lay["p2p"]]

    def send(self, array, dst):
        """Send ``array`` to rank ``dst`` through the channel (rank, dst), chunk by chunk,
        each once the receiver has taken the previous one."""
        if array.ndim > MAX_NDIM:
            raise ValueError(f"send supports at most {MAX_NDIM} dimensions")
        op = f"send to rank {dst}"
        ctl, buf = self._chan(self._rank, dst)
        q = self._seg.q
        b = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        cap = buf.size
        nchunks = max(1, -(-b.size // cap))
        for c in range(nchunks):
            # channel free once the receiver acknowledged everything sent so far
            sent = self._sent[dst]
            if q[ctl + LINE] < sent:
                self._sync.wait_ge(ctl + LINE, sent, op, dst, lambda: [dst])
            lo, hi = c * cap, min(b.size, (c + 1) * cap)
            buf[: hi - lo] = b[lo:hi]
            if c == 0:
                q[ctl + 1] = b.size
                q[ctl + 2] = dtype_code(array.dtype)
                q[ctl + 3] = array.ndim
                for i, d in enumerate(array.shape):
                    q[ctl + 4 + i] = d
            self._sent[dst] = sent + 1
            q[ctl] = sent + 1
            fence()
            self._sync.ring(dst)

    def recv(self, array_or_shape, src, dtype=None):
        """Receive the next message from rank ``src`` (see :meth:`Communicator.recv`)."""
        op = f"recv from rank {src}"
        ctl, buf = self._chan(src, self._rank)
        q = self._seg.q
        cap = buf.size
        got = self._recvd[src]
        if q[ctl] <= got:
            self._sync.wait_ge(ctl, got + 1, op, src, lambda: [src])
        nbytes = q[ctl + 1]
        sent_dt = code_dtype(q[ctl + 2])
        if sent_dt is None:
            raise CollectiveError(f"collective group {self._group_name!r}: {op}: the message "
                                  "header names no plain numeric dtype (corrupted channel)")
        shape = tuple(q[ctl + 4: ctl + 4 + q[ctl + 3]].tolist())
        nchunks = max(1, -(-nbytes // cap))
        try:
            out = resolve_recv_target(array_or_shape, dtype, sent_dt, shape,
                                      self._group_name, src)
        except CollectiveMismatchError as e:
            out, err = None, e         # drain the message so the channel stays in step
            b = writeback = None
        else:
            err = None
            flat, writeback = flat_view(out)
            b = flat.view(np.uint8)
        for c in range(nchunks):
            if c and q[ctl] <= got:
                self._sync.wait_ge(ctl, got + 1, op, src, lambda: [src])
            lo, hi = c * cap, min(nbytes, (c + 1) * cap)
            if b is not None:
                b[lo:hi] = buf[: hi - lo]
            got += 1
            self._recvd[src] = got
            q[ctl + LINE] = got
            fence()
            self._sync.ring(src)
        if err is not None:
            raise err
        writeback()
        return out
