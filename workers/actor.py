"""The Ray actor around :class:`~distgrad.workers.worker.Worker` (``backend="ray"``)."""
import numpy as np

from .worker import Worker


class WorkerActor:
    """One rank in a Ray actor. The scheduler calls ``setup`` on all ranks at once (the
    collective group forms only when every rank has joined), then ``execute`` per program."""

    def __init__(self, rank, world_size, device="cpu", bucket_cap_mb=25.0, timeout_s=60.0):
        self.rank, self.world_size = rank, world_size
        self.device, self.bucket_cap_mb, self.timeout_s = device, bucket_cap_mb, timeout_s
        self.worker = None
        self.comm = None

    def node_id(self):
        import ray
        return ray.get_runtime_context().get_node_id()

    def host_address(self):
        import ray
        return ray.util.get_node_ip_address()

    def setup(self, kind, options):
        from .collective import create_communicator
        if self.world_size > 1:
            self.comm = create_communicator(kind, rank=self.rank, world_size=self.world_size,
                                            timeout_s=self.timeout_s, **options)
        self.worker = Worker(self.rank, self.world_size, self.device, self.comm,
                             self.bucket_cap_mb, self.timeout_s)
        return True

    def execute(self, payload, *side):
        # Arrays that came through the object store are read-only views: the worker copies
        # on write (Tensor._write), so they are used as they are.
        return self.worker.execute(payload, [np.asarray(a) for a in side])

    def stats(self):
        return self.worker.get_stats()

    def spans(self):
        return self.worker.get_spans()

    def close(self):
        if self.worker is not None:
            self.worker.close()
        if self.comm is not None:
            self.comm.close()
        return True
