"""A DataLoader's global batches, placed on a cluster split along dim 0.

Two ways, chosen by the dataset:

- A ``TensorDataset`` (default collate) is RESIDENT: on first use each of its tensors is
  sent once, worker r keeping samples r, r + W, r + 2W... (its shard). Each step then
  sends one small index per worker: the positions, in its shard, of the batch's samples
  it holds, and the workers pick those rows (the ``take_rows`` op). A batch holds the
  same samples as without a cluster, grouped by worker: a worker holds the batch's
  samples that live on it, so the split of a batch follows the data (a shuffled batch of
  B gives each worker about B/W rows; an unshuffled one exactly an even split).
- Anything else is STREAMED: the batch is collated here and each tensor in it is split
  evenly (``cluster.shard``) and sent with the step.

Either way no sample is dropped or repeated at the end of an epoch (the last batch
keeps its remainder, even if fewer rows than workers), and the batch is a GLOBAL batch:
a mean loss over it is the mean over all its samples, whatever the worker count.
"""
import numpy as np

from ... import _backend
from ...tensor import Tensor


class ShardedBatches:
    """Turns the batches of one DataLoader into distributed values on ``cluster``.

    ``rows``: the TensorDataset to keep resident on the workers, or None to stream.

    Example::

        feeder = ShardedBatches(cluster, ds)
        xb, yb = feeder.batch([4, 0, 7], fetch=None)      # Shard(0) values on the workers
    """

    def __init__(self, cluster, rows=None):
        self.cluster, self.rows = cluster, rows
        self._resident = None           # ([distributed tensors], position of each sample)

    def batch(self, indices, fetch):
        if self.rows is not None and indices is not None:
            return self._take(indices)
        return shard_batch(self.cluster, fetch())

    def _ship(self):
        """Send the dataset once; worker r keeps samples r, r + W, ... (its even share)."""
        if self._resident is None:
            n, w = len(self.rows), self.cluster.world_size
            order = np.concatenate([np.arange(r, n, w) for r in range(w)])
            position = np.empty(n, np.int64)
            position[order] = np.arange(n)
            data = [self.cluster.shard(_host(t)[order]) for t in self.rows.tensors]
            self._resident = (data, position)
        return self._resident

    def _take(self, indices):
        data, position = self._ship()
        rows = position[np.asarray(indices, dtype=np.int64)]
        # Who holds each row now (a resize re-splits the shards; positions stay valid).
        sizes = data[0].placement.sizes
        owner = np.searchsorted(np.cumsum(sizes), rows, side="right")
        order = np.argsort(owner, kind="stable")
        counts = np.bincount(owner, minlength=len(sizes)).tolist()
        index = self.cluster.shard(rows[order], sizes=counts)
        return [t.apply("take_rows", index) for t in data]


def shard_batch(cluster, batch):
    """Split every local tensor in a (nested) batch along dim 0 across ``cluster``'s workers.

    Example: ``xb, yb = shard_batch(cluster, [dg.randn(8, 3), dg.zeros(8)])``.
    """
    if isinstance(batch, Tensor):
        if batch._store.lazy or batch.ndim == 0:
            return batch
        return cluster.shard(batch)
    if isinstance(batch, dict):
        return {k: shard_batch(cluster, v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(shard_batch(cluster, v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard_batch(cluster, v) for v in batch)
    return batch


def _host(t):
    return _backend.to_numpy(t._store.array)
