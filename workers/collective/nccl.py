"""NCCL for GPU workers (``device="cuda"``): cupy arrays all-reduced on the device through
``ray.util.collective``'s NCCL backend, behind the same :class:`Communicator` interface.

Only meaningful inside Ray actors that own a GPU each (the scheduler reserves one per
worker). The timeouts of the other backends do not apply inside NCCL calls; a dead peer
is caught by the driver's step timeout instead.
"""
from __future__ import annotations

from .base import DEFAULT_TIMEOUT_S, Communicator, normalize_op

_OPS = {"sum": "SUM", "prod": "PRODUCT", "min": "MIN", "max": "MAX"}


class NcclCommunicator(Communicator):
    """One rank of an NCCL group made with ``ray.util.collective``.

    Example (in each GPU actor)::

        comm = NcclCommunicator(rank, world_size, group_name="distgrad_grads")
        comm.allreduce(cupy_array)            # in place, on the GPU
    """

    device_arrays = True      # takes cupy arrays as they are (no copy through the host)

    def __init__(self, rank: int, world_size: int, group_name: str = "distgrad_nccl",
                 timeout_s: float = DEFAULT_TIMEOUT_S, **_ignored):
        super().__init__(rank, world_size, group_name, timeout_s)
        import ray.util.collective as col
        self._col = col
        col.init_collective_group(world_size, rank, backend="nccl", group_name=group_name)

    def _op(self, op):
        from ray.util.collective.types import ReduceOp
        return getattr(ReduceOp, _OPS[normalize_op(op)])

    def allreduce(self, array, op="sum"):
        self._check_open()
        self._col.allreduce(array, self.group_name, op=self._op(op))
        return array

    def allgather(self, array):
        self._check_open()
        parts = [array.copy() for _ in range(self.world_size)]
        self._col.allgather(parts, array, self.group_name)
        return parts

    def reducescatter(self, array, op="sum"):
        self._check_open()
        import cupy as cp          # only GPU workers use this backend
        chunks = [cp.ascontiguousarray(c) for c in cp.array_split(array, self.world_size, axis=0)]
        out = cp.empty_like(chunks[self.rank])
        if len({c.shape for c in chunks}) == 1:
            self._col.reducescatter(out, chunks, self.group_name, op=self._op(op))
            return out
        # NCCL needs equal chunks: reduce everything, keep this rank's rows.
        total = self.allreduce(array.copy(), op)
        return cp.ascontiguousarray(cp.array_split(total, self.world_size, axis=0)[self.rank])

    def broadcast(self, array, root=0):
        self._check_open()
        self._check_root(root)
        self._col.broadcast(array, root, self.group_name)
        return array

    def reduce(self, array, root=0, op="sum"):
        self._check_open()
        self._check_root(root)
        self._col.reduce(array, root, self.group_name, op=self._op(op))
        return array

    def barrier(self):
        self._check_open()
        self._col.barrier(self.group_name)

    def send(self, array, dst):
        self._check_open()
        self._check_peer(dst, "dst")
        self._col.send(array, dst, self.group_name)

    def recv(self, array_or_shape, src, dtype=None):
        self._check_open()
        self._check_peer(src, "src")
        import cupy as cp
        out = array_or_shape if hasattr(array_or_shape, "shape") else \
            cp.empty(array_or_shape, dtype=dtype)
        self._col.recv(out, src, self.group_name)
        return out

    def close(self):
        if not self.closed:
            self._col.destroy_collective_group(self.group_name)
        super().close()
