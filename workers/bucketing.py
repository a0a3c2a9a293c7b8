"""Gradient buckets: leaf gradients are all-reduced in fixed-size groups, launched as soon
as they are final (in the backward pass's order, the same on every worker) and run on
one communication thread while the rest of backward goes on (as DDP's ``bucket_cap_mb``).
"""
import concurrent.futures as cf
import time

import numpy as np

from distgrad import _backend

from .collective.base import CollectiveMismatchError


class OrderedComm:
    """Serialises every collective of one worker, in submission order: on one comm thread
    when they overlap the worker's compute (gradient buckets during backward), on the
    worker's own thread when it would only wait for them (``run`` with nothing queued).

    Both gradient buckets and collectives inside the program (forward all-reduce, its
    transpose in backward) go through it, so all workers issue the same sequence.
    """

    def __init__(self, comm, timeout_s):
        self.comm = comm
        self.rank, self.world_size = comm.rank, comm.world_size
        self.timeout_s = timeout_s
        self.bytes = 0                    # payload bytes all-reduced (for cluster.stats())
        self.wait_s = 0.0                 # time the worker's main thread spent blocked here
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix=f"distgrad-comm-{comm.rank}")
        self._last = None                 # the last job submitted (one thread: FIFO)

    def submit(self, fn, *args):
        self._last = self._pool.submit(fn, *args)
        return self._last

    def wait(self, fut):
        # The communicator enforces its own timeout; this one only guards against a stuck thread.
        start = time.perf_counter()
        try:
            return fut.result(timeout=self.timeout_s * 2 + 5)
        finally:
            self.wait_s += time.perf_counter() - start

    def run(self, fn, *args):
        """``fn(*args)`` in order after everything submitted, and its result; the caller
        blocks meanwhile. With nothing queued it runs on the calling thread: no hand-off to
        the comm thread and back (two wake-ups, each a wait for a core on a busy machine).
        Only the worker's thread submits, so nothing can be queued behind it meanwhile.

        Example: ``total = comm.run(comm.comm.allreduce, array, "sum")``.
        """
        if self._last is not None and not self._last.done():    # (one thread runs them in order)
            return self.wait(self.submit(fn, *args))
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.wait_s += time.perf_counter() - start

    def allreduce(self, array, op="sum"):
        self.bytes += array.nbytes
        return self.run(_host_call, self.comm.allreduce, array, op)

    def allgather(self, array):
        self.bytes += array.nbytes
        return self.run(_host_call, self.comm.allgather, array)

    def abort(self, detail=""):
        """Leave the current step's collectives (see ``Communicator.abort``)."""
        self.comm.abort(detail)

    def close(self):
        self._pool.shutdown(wait=False)


def _host_call(fn, array, *args):
    """Run a host (numpy) collective on a possibly-GPU array, copying through the host."""
    if not _backend.is_cupy_array(array) or getattr(getattr(fn, "__self__", None), "device_arrays", False):
        return fn(array, *args)
    device = _backend.device_of(array)
    out = fn(_backend.to_numpy(array), *args)
    if isinstance(out, list):
        return [_backend.to_device(o, device) for o in out]
    return _backend.to_device(out, device)


def _layouts(arrays, compress):
    """Which gradients go into the bucket in column-major order (nn.Linear's weights: in C
    order each would be a transposed copy, in and out of every bucket), and a signature
    of that choice. The signature travels as the bucket's last element: its sum tells
    every rank whether all of them chose alike, so a layout that differs on one worker
    (say after a recovery) fails the step instead of summing mismatched elements."""
    flips = [a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous for a in arrays]
    sig = float(sum((i + 1) ** 2 for i, f in enumerate(flips) if f))
    if compress or sig > 2 ** 20:     # not exact in the wire format: plain C order
        return [False] * len(arrays), 0.0
    return flips, sig


def _flat(a, flip):
    return a.T.reshape(-1) if flip else a.reshape(-1)


# The first bucket closes early (as DDP's 1 MB first bucket): the last layers' gradients,
# ready first, are summed while the backward pass still computes the earlier layers'.
# Otherwise a model smaller than one bucket would all-reduce only after its backward.
FIRST_BUCKET_BYTES = 1 << 20


class Bucketer:
    """Collects final leaf gradients and all-reduces them in buckets of ``cap_bytes`` (the
    first one ``FIRST_BUCKET_BYTES`` at most), in the order the backward pass finishes them."""

    def __init__(self, comm, cap_bytes, replicated, compress=None, on_span=None):
        self.comm = comm
        self.on_span = on_span
        self.cap = max(1, int(cap_bytes))
        self.first_cap = min(self.cap, FIRST_BUCKET_BYTES)
        self.replicated = replicated          # ids of leaves whose gradient is summed
        self.compress = compress              # None or "fp16": buckets travel as float16
        self._bucket, self._bytes, self._launched = [], 0, []

    def add(self, leaf):
        if id(leaf) not in self.replicated or self.comm.world_size == 1:
            return
        g = leaf.grad.store.array
        self._bucket.append(leaf)
        self._bytes += g.nbytes
        if self._bytes >= (self.cap if self._launched else self.first_cap):
            self._launch()

    def _launch(self):
        if not self._bucket:
            return
        leaves, self._bucket, self._bytes = self._bucket, [], 0
        fut = self.comm.submit(self._reduce, leaves, len(self._launched))
        self._launched.append(fut)

    def _reduce(self, leaves, index):
        """On the communication thread: sum the leaves' gradients over all workers and
        write the sums back into their (leaf-owned) arrays."""
        start = time.time()
        arrays = [leaf.grad.store.array for leaf in leaves]
        dtype = np.result_type(*arrays)
        n = sum(a.size for a in arrays)
        comm = self.comm.comm
        flips, sig = _layouts(arrays, self.compress)
        zero_copy = self._zero_copy(comm, arrays, (n + 1) * dtype.itemsize)
        if zero_copy:
            # The bucket lives in the shared segment: copy in once, read the shared result.
            comm.reset_buckets()          # the previous bucket finished on every rank
            bucket = comm.bucket((n + 1,), dtype)
            np.concatenate([_flat(a, f) for a, f in zip(arrays, flips)] + [np.full(1, sig, dtype)],
                           out=bucket.input)
            total = comm.allreduce_bucket(bucket, "sum")
        else:
            xp = _backend.array_module(arrays[0])
            flat = xp.concatenate([_flat(a.astype(dtype, copy=False), f) for a, f in zip(arrays, flips)]
                                  + [xp.full(1, sig, dtype)])
            if self.compress:
                total = _host_call(comm.allreduce, flat.astype(np.float16), "sum").astype(dtype)
            else:
                total = _host_call(comm.allreduce, flat, "sum")
        if float(total[n]) != sig * self.comm.world_size:
            # Ranks flattened some gradient in different orders: the sums are mixed up.
            raise CollectiveMismatchError(
                f"gradient bucket {index}: worker {self.comm.rank} holds its gradients in other "
                "memory layouts than its peers (the step is rolled back)")
        offset = 0
        for a, f in zip(arrays, flips):
            part = total[offset:offset + a.size]
            if f:                         # column-major: written back through its transpose
                a.T[...] = part.reshape(a.T.shape)
            else:
                a[...] = part.reshape(a.shape)
            offset += a.size
        self.comm.bytes += n * dtype.itemsize
        if self.on_span is not None:
            how = ", shm zero-copy" if zero_copy else ""
            self.on_span(f"allreduce bucket {index} ({n * dtype.itemsize >> 10} KiB{how})", start)

    def _zero_copy(self, comm, arrays, nbytes):
        return (not self.compress and hasattr(comm, "allreduce_bucket")
                and not _backend.is_cupy_array(arrays[0])
                and nbytes <= getattr(comm, "arena_bytes", 0))

    def finish(self):
        """Sum the last bucket and wait until every sum is written back into ``.grad``: the
        earlier buckets first, then the last one on this thread (nothing is left to overlap)."""
        launched, self._launched = self._launched, []
        for fut in launched:
            self.comm.wait(fut)
        if self._bucket:
            leaves, self._bucket, self._bytes = self._bucket, [], 0
            self.comm.run(self._reduce, leaves, len(launched))
