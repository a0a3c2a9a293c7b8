"""``backend="local"``: N workers as threads of the driver process, same worker code,
an in-process collective. For tests, debugging and laptops without Ray."""
import concurrent.futures as cf
import time
import os

from threadpoolctl import threadpool_limits

from distgrad import program as prog
from distgrad._interrupt import atomic
from distgrad.workers.collective.inprocess import InProcessGroup
from distgrad.workers.worker import Worker

from .errors import WorkerTimeoutError


def usable_cores():
    """CPU cores this process may run on (its affinity mask where the OS has one).

    Example: ``threads_per_worker = max(1, usable_cores() // 2)``.
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class LocalGang:
    """Runs one message per worker, each on its own thread, and waits (with a timeout)."""

    def __init__(self, n, device="cpu", bucket_cap_mb=25.0, timeout_s=60.0, compress=None):
        self.n, self.timeout_s = n, timeout_s
        # N threads each running BLAS with a thread per core would oversubscribe the cores
        # N times over (5-20x slower on a busy 2-core box): give each its share instead.
        self.blas_threads = max(1, usable_cores() // n)
        self._thread_limits = threadpool_limits(self.blas_threads)
        group = InProcessGroup(n, group_name="distgrad-local", timeout_s=timeout_s)
        self.workers = [Worker(r, n, device, group.communicator(r), bucket_cap_mb, timeout_s,
                               compress=compress) for r in range(n)]
        # One thread per rank, kept for the gang's life: a rank always runs on its own thread.
        self._pools = [cf.ThreadPoolExecutor(1, thread_name_prefix=f"distgrad-worker-{r}")
                       for r in range(n)]

    def run(self, payloads, ranks=None):
        """Send ``payloads[i]`` to worker ``ranks[i]`` (default: all); return the replies."""
        ranks = list(range(self.n)) if ranks is None else list(ranks)
        futures = self.post(payloads, ranks)
        # Workers stuck in a collective with a failed peer give up after timeout_s themselves
        # and report it; the slack lets them, so only a worker that is itself late times out.
        return self._replies(futures, ranks, self.timeout_s * 1.5 + 1, "finish its program")

    def add_source(self, payloads, ranks):
        """Register a data source on workers ``ranks`` (see ``RayGang.add_source``)."""
        futures = [self._pools[r].submit(self.workers[r].add_source, data, side, obj)
                   for r, (data, side, obj) in zip(ranks, payloads)]
        return self._replies(futures, ranks, self.timeout_s, "set up its data source")

    def _replies(self, futures, ranks, wait_s, doing):
        """The workers' decoded replies in rank order; one not back within ``wait_s`` of now
        raises WorkerTimeoutError (which says it did not ``doing``)."""
        deadline = time.monotonic() + wait_s
        out = []
        for r, f in zip(ranks, futures):
            try:
                out.append(prog.decode(*f.result(timeout=max(deadline - time.monotonic(), 0))))
            except cf.TimeoutError:
                raise WorkerTimeoutError(f"worker {r} (local thread) did not {doing} "
                                         f"within {self.timeout_s:g}s", ranks=[r]) from None
        return out

    def repair(self):
        """A new collective group (a timed-out one stays broken): each worker switches to
        it after whatever it runs now, before any later message."""
        group = InProcessGroup(self.n, group_name="distgrad-local", timeout_s=self.timeout_s)
        for r, w in enumerate(self.workers):
            self._pools[r].submit(w.set_communicator, group.communicator(r))

    @atomic
    def post(self, payloads, ranks):
        """Queue messages behind whatever each worker runs now, to all of ``ranks`` or (on
        Ctrl-C) none; return the futures of the replies without waiting for them."""
        return [self._pools[r].submit(self.workers[r].execute, data, side)
                for r, (data, side) in zip(ranks, payloads)]

    def stats(self):
        return [w.get_stats() for w in self.workers]

    def spans(self):
        return [w.get_spans() for w in self.workers]

    def shutdown(self):
        for w in self.workers:
            w.close()
        for p in self._pools:
            p.shutdown(wait=False)
        if self._thread_limits is not None:
            self._thread_limits.restore_original_limits()
            self._thread_limits = None

    def __repr__(self):
        return f"LocalGang({self.n} threads)"
