"""``DataLoader``: batches from a dataset, as PyTorch's, and sharded across a cluster.

Loading runs in the calling process (``num_workers > 0`` is accepted with a warning: the
batches are the same). With ``cluster=`` each batch comes out already split on dim 0
across the cluster's workers (see :mod:`distgrad.utils.data.sharded`).
"""
import warnings

from .dataset import IterableDataset, TensorDataset
from ._collate import default_collate, default_convert
from .sampler import BatchSampler, RandomSampler, SequentialSampler
from .sharded import ShardedBatches


class DataLoader:
    """Iterate over ``dataset`` in batches, with PyTorch's arguments and behaviour.

    ``cluster=``: yield every batch sharded on dim 0 across that cluster's workers, with
    distgrad's global-batch semantics: the batch is the same as without ``cluster``
    (``batch_size`` is the GLOBAL batch, the loss its mean, the last batch keeps every
    remaining sample however it divides among the workers). A ``TensorDataset`` is sent
    to the workers once (each keeps its rows); each step then sends only row indices.

    Example::

        loader = DataLoader(TensorDataset(X, y), batch_size=64, shuffle=True,
                            generator=dg.Generator().manual_seed(0))
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)

        sharded = DataLoader(TensorDataset(X, y), batch_size=256, shuffle=True, cluster=cluster)
    """

    def __init__(self, dataset, batch_size=1, shuffle=None, sampler=None, batch_sampler=None,
                 num_workers=0, collate_fn=None, pin_memory=False, drop_last=False, timeout=0,
                 worker_init_fn=None, multiprocessing_context=None, generator=None, *,
                 prefetch_factor=None, persistent_workers=False, pin_memory_device="",
                 in_order=True, cluster=None):
        if num_workers < 0:
            raise ValueError("num_workers option should be non-negative; use num_workers=0 to "
                             "disable multiprocessing.")
        if num_workers > 0:
            # Same batches, same order: only the loading runs in this process.
            warnings.warn(f"DataLoader(num_workers={num_workers}): distgrad loads batches in "
                          "the main process (num_workers=0); the batches are the same",
                          UserWarning, stacklevel=2)
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        self.drop_last, self.generator, self.timeout = drop_last, generator, timeout
        self._iterable = isinstance(dataset, IterableDataset)
        if self._iterable:
            if shuffle or sampler is not None or batch_sampler is not None:
                raise ValueError("DataLoader with IterableDataset: expected unspecified shuffle, "
                                 "sampler and batch_sampler options")
        elif batch_sampler is not None:
            if batch_size != 1 or shuffle or sampler is not None or drop_last:
                raise ValueError("batch_sampler option is mutually exclusive with batch_size, "
                                 "shuffle, sampler, and drop_last")
            batch_size, drop_last = None, False
        elif batch_size is None and drop_last:
            raise ValueError("batch_size=None option disables auto-batching and is mutually "
                             "exclusive with drop_last")
        if sampler is not None and shuffle:
            raise ValueError("sampler option is mutually exclusive with shuffle")
        if not self._iterable and sampler is None:
            sampler = (RandomSampler(dataset, generator=generator) if shuffle
                       else SequentialSampler(dataset))
        if not self._iterable and batch_sampler is None and batch_size is not None:
            batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        self.batch_size, self.sampler, self.batch_sampler = batch_size, sampler, batch_sampler
        self.collate_fn = collate_fn or (default_collate if self._auto_batching else default_convert)
        # Batches of a TensorDataset are rows picked by index (one fancy index per tensor).
        self._rows = (isinstance(dataset, TensorDataset) and self.collate_fn is default_collate
                      and self.batch_sampler is not None)
        self.cluster = cluster
        self._sharded = None if cluster is None else ShardedBatches(
            cluster, dataset if self._rows else None)

    @property
    def _auto_batching(self):
        return self.batch_sampler is not None or (self._iterable and self.batch_size is not None)

    def __len__(self):
        if self._iterable:
            n = len(self.dataset)         # raises TypeError for a stream without a length
            if self.batch_size is None:
                return n
            return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return len(self.batch_sampler if self.batch_sampler is not None else self.sampler)

    def __iter__(self):
        for indices, fetch in self._batches():
            if self._sharded is not None:
                yield self._sharded.batch(indices, fetch)
            else:
                yield fetch()

    def _batches(self):
        """(indices or None, a function that fetches and collates the batch) per batch."""
        ds, collate = self.dataset, self.collate_fn
        if self._iterable:
            yield from ((None, (lambda b=b: b)) for b in self._stream_batches())
            return
        if self.batch_sampler is None:
            for i in self.sampler:
                yield None, (lambda i=i: collate(ds[i]))
            return
        for indices in self.batch_sampler:
            indices = list(indices)
            if self._rows:
                yield indices, (lambda b=indices: ds.take(b))
            else:
                yield indices, (lambda b=indices: collate([ds[i] for i in b]))

    def _stream_batches(self):
        collate = self.collate_fn
        if self.batch_size is None:
            yield from (collate(s) for s in self.dataset)
            return
        batch = []
        for sample in self.dataset:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch and not self.drop_last:
            yield collate(batch)
