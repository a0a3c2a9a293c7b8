"""Gradient buckets: leaf gradients are all-reduced in fixed-size groups, launched as soon
as they are final (in the backward pass's order, the same on every worker) and run on
one communication thread while the rest of backward goes on (as DDP's ``bucket_cap_mb``).
"""
import concurrent.futures as cf
import time

import numpy as np

from distgrad import _backend


class OrderedComm:
    """Serialises every collective of one worker on a single thread, in submission order.

    Both gradient buckets and collectives inside the program (forward all-reduce, its
    transpose in backward) go through it, so all workers issue the same sequence.
    """

    def __init__(self, comm, timeout_s):
        self.comm = comm
        self.rank, self.world_size = comm.rank, comm.world_size
        self.timeout_s = timeout_s
        self.bytes = 0                    # payload bytes all-reduced (for cluster.stats())
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix=f"distgrad-comm-{comm.rank}")

    def submit(self, fn, *args):
        return self._pool.submit(fn, *args)

    def wait(self, fut):
        # The communicator enforces its own timeout; this one only guards against a stuck thread.
        return fut.result(timeout=self.timeout_s * 2 + 5)

    def allreduce(self, array, op="sum"):
        self.bytes += array.nbytes
        return self.wait(self.submit(_host_call, self.comm.allreduce, array, op))

    def allgather(self, array):
        self.bytes += array.nbytes
        return self.wait(self.submit(_host_call, self.comm.allgather, array))

    def close(self):
        self._pool.shutdown(wait=False)


def _host_call(fn, array, *args):
    """Run a host (numpy) collective on a possibly-GPU array, copying through the host."""
    if not _backend.is_cupy_array(array):
        return fn(array, *args)
    device = _backend.device_of(array)
    out = fn(_backend.to_numpy(array), *args)
    if isinstance(out, list):
        return [_backend.to_device(o, device) for o in out]
    return _backend.to_device(out, device)


class Bucketer:
    """Collects final leaf gradients and all-reduces them in buckets of ``cap_bytes``."""

    def __init__(self, comm, cap_bytes, replicated, compress=None, on_span=None):
        self.comm = comm
        self.on_span = on_span
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
        xp = _backend.array_module(arrays[0])
        flat = xp.concatenate([a.astype(dtype, copy=False).ravel() for a in arrays])
        self.comm.bytes += flat.nbytes
        fut = self.comm.submit(self._reduce, flat, len(self._launched))
        self._launched.append((fut, leaves))

    def _reduce(self, flat, index):
        start = time.time()
        if self.compress:
            wire = flat.astype(np.float16 if self.compress == "fp16" else flat.dtype)
            out = _host_call(self.comm.comm.allreduce, wire, "sum").astype(flat.dtype)
        else:
            out = _host_call(self.comm.comm.allreduce, flat, "sum")
        if self.on_span is not None:
            self.on_span(f"allreduce bucket {index} ({flat.nbytes >> 10} KiB)", start)
        return out

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
