"""``nn.DataParallel`` / ``nn.parallel.DistributedDataParallel``: thin wrappers that run a
model written for PyTorch's data parallelism on the active distgrad cluster.

The wrapper replicates the module on the cluster's workers and shards every local
tensor it is called with along dim 0; the rest is distgrad's usual exact data
parallelism. Which cluster: the active one (``dg.init`` first), else one created with
``dg.init()``'s defaults when the wrapper is built (shut down at exit).

Differences from PyTorch, by design:

- The loss over a wrapper's output is the GLOBAL mean over the whole batch, so the
  gradient is the single-process gradient and does not depend on the worker count
  (PyTorch's DDP averages per-process means: equal only for equal shards).
- The driver records ``forward`` once for all workers: a ``print`` in ``forward`` shows
  the global batch, once, not one shard per process.
- ``no_sync()`` accumulates the same (exact) gradients; it does not skip communication.

Example::

    cluster = dg.init(workers=2)
    model = nn.parallel.DistributedDataParallel(Net())
    loss = F.cross_entropy(model(x), y)      # x is split across the workers
    loss.backward(); opt.step()
"""
import atexit
import contextlib

from .. import distributed
from ..utils.data.sharded import shard_batch
from .module import Module


def active_cluster():
    """The cluster this process is using: the active one, else a new one with ``dg.init()``'s
    defaults (shut down when the process exits). Example: ``cluster = active_cluster()``."""
    cluster = distributed.current_cluster()
    if cluster is None:
        cluster = distributed.init()
        atexit.register(cluster.shutdown)
    return cluster


class DistributedDataParallel(Module):
    """Run ``module`` data-parallel on the cluster: inputs split along dim 0, gradients exact.

    PyTorch's process-group arguments (``device_ids``, ``output_device``,
    ``process_group``, ``bucket_cap_mb``...) are accepted and have no effect: the cluster
    already decides devices and buckets (``dg.init(bucket_cap_mb=...)``). ``cluster=``
    picks a cluster explicitly.

    Example::

        ddp = nn.parallel.DistributedDataParallel(model)
        out = ddp(x)                      # Shard(0) across the workers
        ddp.module is model               # True
    """

    def __init__(self, module, device_ids=None, output_device=None, dim=0,
                 broadcast_buffers=True, process_group=None, bucket_cap_mb=None,
                 find_unused_parameters=False, check_reduction=False,
                 gradient_as_bucket_view=False, static_graph=False, *, cluster=None, **kwargs):
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__} wraps an nn.Module, got {type(module).__name__}")
        if dim != 0:
            raise NotImplementedError(f"{type(self).__name__}(dim={dim}): distgrad shards inputs "
                                      "along dim 0 only; transpose the batch to dim 0")
        self.cluster = cluster if cluster is not None else active_cluster()
        self.module = self.cluster.replicate(module)
        self.dim = 0

    def forward(self, *inputs, **kwargs):
        return self.module(*shard_batch(self.cluster, inputs),
                           **shard_batch(self.cluster, kwargs))

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation, as PyTorch's ``no_sync``: gradients of backward passes in
        (and after) the block add up in ``.grad``. They are exact global gradients at
        every step, so nothing is deferred (and no communication is saved).

        Example::

            with ddp.no_sync():
                F.cross_entropy(ddp(x1), y1).backward()
            F.cross_entropy(ddp(x2), y2).backward(); opt.step()
        """
        yield


class DataParallel(DistributedDataParallel):
    """``nn.DataParallel``: the same wrapper (the batch split along dim 0 across the
    cluster's workers, the exact global gradient).

    Example::

        model = nn.DataParallel(Net())
        loss = F.nll_loss(model(x), y)
    """

    def __init__(self, module, device_ids=None, output_device=None, dim=0, *, cluster=None):
        super().__init__(module, device_ids, output_device, dim, cluster=cluster)
