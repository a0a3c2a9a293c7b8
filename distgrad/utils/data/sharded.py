"""A DataLoader's global batches, placed on a cluster split along dim 0.

Two ways, chosen by the dataset:

- A ``TensorDataset`` (default collate) is a worker-side source like any other
  (:mod:`distgrad.utils.data.sources`): on first use its arrays are sent once, worker r
  keeping samples r, r + W, r + 2W...; each step then sends only which rows each worker
  reads (the ``source`` instruction). A batch holds the same samples as without a cluster,
  grouped by worker: a worker reads the batch's samples it holds, so the split of a batch
  follows the data (a shuffled batch of B gives each worker about B/W rows; an
  unshuffled one exactly an even split).
- Anything else is STREAMED: the batch is collated here and each tensor in it is split
  evenly (``cluster.shard``) and sent with the step.

Either way no sample is dropped or repeated at the end of an epoch (the last batch
keeps its remainder, even if fewer rows than workers), and the batch is a GLOBAL batch:
a mean loss over it is the mean over all its samples, whatever the worker count.
"""
import numpy as np

from ...tensor import Tensor
from .sources import ArraySource


class ShardedBatches:
    """Turns the batches of one DataLoader into distributed values on ``cluster``.

    ``rows``: the TensorDataset to keep resident on the workers, or None to stream.

    Example::

        feeder = ShardedBatches(cluster, ds)
        xb, yb = feeder.batch([4, 0, 7], fetch=None)      # Shard(0) values on the workers
    """

    def __init__(self, cluster, rows=None):
        self.cluster, self.rows = cluster, rows
        self._source = None             # opened on the workers at the first batch

    def batch(self, indices, fetch):
        if self.rows is not None and indices is not None:
            if self._source is None:
                self._source = ArraySource(self.cluster, self.rows.tensors)
            return list(self._source.read(np.asarray(indices, dtype=np.int64)))
        return shard_batch(self.cluster, fetch())


def shard_batch(cluster, batch):
    """Split every local tensor in a (nested) batch along dim 0 across ``cluster``'s workers.

    Example: ``xb, yb = shard_batch(cluster, [dg.randn(8, 3), dg.zeros(8)])``.
    """
    if isinstance(batch, Tensor):
        if batch.store.lazy or batch.ndim == 0:
            return batch
        return cluster.shard(batch)
    if isinstance(batch, dict):
        return {k: shard_batch(cluster, v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(shard_batch(cluster, v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard_batch(cluster, v) for v in batch)
    return batch

