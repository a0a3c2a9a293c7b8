"""Gradient buckets: leaf gradients are all-reduced in fixed-size groups, launched as soon
as they are final (in the backward pass's order, the same on every worker) and run on
one communication thread while the rest of backward goes on (as DDP's ``bucket_cap_mb``).
"""
import concurrent.futures as cf

import numpy as np


class OrderedComm:
    """Serialises every collective of one worker on a single thread, in submission order.

    Both gradient buckets and collectives inside the program (forward all-reduce, its
    transpose in backward) go through it, so all workers issue the same sequence.
    """

    def __init__(self, comm, timeout_s):
        self.comm = comm
        self.rank, self.world_size = comm.rank, comm.world_size
        self.timeout_s = timeout_s
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix=f"distgrad-comm-{comm.rank}")

    def submit(self, fn, *args):
        return self._pool.submit(fn, *args)

    def wait(self, fut):
        # The communicator enforces its own timeout; this one only guards against a stuck thread.
        return fut.result(timeout=self.timeout_s * 2 + 5)

    def allreduce(self, array, op="sum"):
        return self.wait(self.submit(self.comm.allreduce, array, op))

    def allgather(self, array):
        return self.wait(self.submit(self.comm.allgather, array))

    def close(self):
        self._pool.shutdown(wait=False)


class Bucketer:
    """Collects final leaf gradients and all-reduces them in buckets of ``cap_bytes``."""

    def __init__(self, comm, cap_bytes, replicated, compress=None):
        self.comm = comm
        self.cap = max(1, int(cap_bytes))
        self.replicated = replicated          # ids of leaves whose gradient is summed
        self.compress = compress              # None, "fp16" or "bf16"
        self._bucket, self._bytes, self._launched = [], 0, []

    def add(self, leaf):
        if id(leaf) not in self.replicated or self.comm.world_size == 1:
            return
        g = leaf._grad._store.array
        self._bucket.append(leaf)
        self._bytes += g.nbytes
        if self._bytes >= self.cap:
            self._launch()

    def _launch(self):
        if not self._bucket:
            return
        leaves, self._bucket, self._bytes = self._bucket, [], 0
        arrays = [leaf._grad._store.array for leaf in leaves]
        dtype = np.result_type(*arrays)
        flat = np.concatenate([np.asarray(a, dtype=dtype).ravel() for a in arrays])
        fut = self.comm.submit(self._reduce, flat)
        self._launched.append((fut, leaves))

    def _reduce(self, flat):
        if self.compress:
            wire = flat.astype(np.float16)
            return self.comm.comm.allreduce(wire, "sum").astype(flat.dtype)
        return self.comm.comm.allreduce(flat, "sum")

    def finish(self):
        """Launch the last bucket, wait for all, and write the sums back into ``.grad``."""
        self._launch()
        for fut, leaves in self._launched:
            flat = self.comm.wait(fut)
            offset = 0
            for leaf in leaves:
                arr = leaf._grad._store.array
                n = arr.size
                leaf._grad._store.array = flat[offset:offset + n].reshape(arr.shape).astype(arr.dtype, copy=False)
                offset += n
        self._launched = []
