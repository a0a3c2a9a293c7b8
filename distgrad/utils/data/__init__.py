"""``dg.utils.data``: datasets, samplers and the DataLoader, with PyTorch's names.

``DataLoader(..., cluster=cluster)`` yields batches already sharded across a cluster's
workers (global-batch semantics; a TensorDataset is sent to the workers once).

Example::

    from distgrad.utils.data import DataLoader, TensorDataset
    loader = DataLoader(TensorDataset(X, y), batch_size=64, shuffle=True)
"""
from ._collate import default_collate, default_convert  # noqa: F401
from .dataloader import DataLoader  # noqa: F401
from .dataset import (ConcatDataset, Dataset, IterableDataset, Subset,  # noqa: F401
                      TensorDataset, random_split)
from .sampler import (BatchSampler, RandomSampler, Sampler, SequentialSampler,  # noqa: F401
                      SubsetRandomSampler)
from ...compat import missing as _missing


def __getattr__(name):
    raise _missing("torch.utils.data", name)       # a PyTorch name we lack: say so, and what to use
