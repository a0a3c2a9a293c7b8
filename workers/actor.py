"""The Ray actor around :class:`~distgrad.workers.worker.Worker` (``backend="ray"``)."""
import os

import numpy as np

from .shared_pages import release_shared_pages
from .worker import Worker


class WorkerActor:
    """One rank in a Ray actor. The scheduler calls ``setup`` on all ranks at once (the
    collective group forms only when every rank has joined), then ``execute`` per program."""

    def __init__(self, rank, world_size, device="cpu", bucket_cap_mb=25.0, timeout_s=60.0,
                 compress=None, blas_threads=None):
        if blas_threads:
            # numpy is loaded before the actor is made, so OMP_NUM_THREADS set now would come
            # too late: limit the loaded BLAS pools to this worker's CPU share instead (N
            # workers each with a thread per core oversubscribe the machine many times over).
            from threadpoolctl import threadpool_limits
            threadpool_limits(blas_threads)
        self.blas_threads = blas_threads
        self.rank, self.world_size = rank, world_size
        self.compress = compress
        self.device, self.bucket_cap_mb, self.timeout_s = device, bucket_cap_mb, timeout_s
        self.worker = None
        self.comm = None
        self.channel = None
        # The cores this process may use before any pinning (pin_cpus picks among them).
        self.available_cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else None

    def __repr__(self):
        # Ray prefixes each line this actor prints with its repr: "(rank 1 pid=...) ...".
        return f"rank {self.rank}"

    def threads(self):
        """The BLAS thread pools of this worker (threadpoolctl's view)."""
        from threadpoolctl import threadpool_info
        return [{"api": p["user_api"], "library": p["internal_api"], "threads": p["num_threads"]}
                for p in threadpool_info()]

    def node_id(self):
        import ray
        return ray.get_runtime_context().get_node_id()

    def host_address(self):
        import ray
        return ray.util.get_node_ip_address()

    def pin_cpus(self, index, count, per_worker):
        """Pin this worker to its share of the host's cores as the ``index``-th of ``count``
        workers there (see ``cpu_pinning``); the cores, or None when they do not all fit
        (then unpinned)."""
        from .cpu_pinning import cores_for, pin_process
        if not self.available_cpus:          # no affinity API here (not Linux)
            return None
        cores = cores_for(index, count, per_worker, self.available_cpus)
        pin_process(cores or self.available_cpus)     # unpinned again when it does not fit
        return cores

    def reset_comm(self, kind, options, rank, world_size):
        """Join a (new) collective group as ``rank`` of ``world_size``. A surviving worker
        keeps its values; a new one starts empty."""
        from .bucketing import OrderedComm
        from .collective import create_communicator
        if self.comm is not None:
            self.comm.close()
        self.rank, self.world_size = rank, world_size
        if kind in ("tcp", "hierarchical"):
            # Ranks on different nodes meet through Ray's KV store and talk over TCP.
            from .collective.rendezvous import RayKVStore
            options = dict(options, store=RayKVStore(), host=self.host_address())
            if kind == "hierarchical":
                options["node_id"] = self.node_id()
        if kind == "shm":
            # Room for one gradient bucket (which may overshoot the cap by one gradient)
            # in the shared segment, so buckets are all-reduced without copies.
            options = dict(options, arena_bytes=int(2 * self.bucket_cap_mb * (1 << 20)))
            # rank 0 names the segment at random and hands the name out through Ray's KV
            # store: a name squatted in /dev/shm is skipped, not fatal
            from .collective.rendezvous import RayKVStore
            options["store"] = RayKVStore()
        self.comm = (create_communicator(kind, rank=rank, world_size=world_size,
                                         timeout_s=self.timeout_s, **options)
                     if world_size > 1 else None)
        if self.worker is None:
            self.worker = Worker(rank, world_size, self.device, self.comm, self.bucket_cap_mb,
                                 self.timeout_s, compress=self.compress)
        else:
            if self.worker.comm is not None:
                self.worker.comm.close()
            self.worker.rank, self.worker.world_size = rank, world_size
            self.worker.comm = OrderedComm(self.comm, self.timeout_s) if self.comm else None
        return True

    def pid(self):
        return os.getpid()

    def set_slowdown(self, seconds):
        """Test hook: make this worker slower by ``seconds`` per program."""
        self.worker.slowdown_s = seconds
        return True

    def inject_failure(self, kind, seconds=0.0):
        self.worker.inject_failure(kind, seconds)
        return True

    def execute(self, payload, *side):
        # Arrays that came through the object store are read-only views: the worker copies
        # on write (Tensor._write), so they are used as they are. Once the program has run,
        # the object-store pages it read leave this worker's resident set (the data stays
        # in the store: a value still read in place faults its pages back in when read).
        side = [np.asarray(a) for a in side]
        try:
            return self.worker.execute(payload, side)
        finally:
            release_shared_pages(side)

    def open_channel(self, token, tcp=False):
        """Serve the driver's messages from a socket (``workers.socket_channel``): a Unix
        socket, or with ``tcp`` one on this node's address; returns the address. Messages
        that come that way run on the channel's thread, in order; the driver sends none by
        Ray calls while the channel is open."""
        from .socket_channel import SocketChannelServer
        if self.channel is not None:
            self.channel.close()
        self.channel = SocketChannelServer(token, self.worker.execute,
                                           self.host_address() if tcp else None)
        return self.channel.address

    def add_source(self, payload, obj, *side):
        """Register a data source (see ``Worker.add_source``)."""
        return self.worker.add_source(payload, [np.asarray(a) for a in side], obj)

    def stats(self):
        return self.worker.get_stats()

    def spans(self):
        return self.worker.get_spans()

    def close(self):
        if self.channel is not None:
            self.channel.close()
        if self.worker is not None:
            self.worker.close()
        if self.comm is not None:
            self.comm.close()
        return True
