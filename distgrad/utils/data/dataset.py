"""Datasets with PyTorch's names: ``Dataset``, ``IterableDataset``, ``TensorDataset``,
``Subset``, ``ConcatDataset`` and ``random_split``."""
import bisect
import math

import numpy as np

from ... import random
from ...tensor import Tensor


class Dataset:
    """A map-style dataset: subclass it and define ``__getitem__`` and ``__len__``.

    Example::

        class Squares(Dataset):
            def __len__(self):
                return 10

            def __getitem__(self, i):
                return dg.tensor([float(i)]), dg.tensor([float(i * i)])
    """

    def __getitem__(self, index):
        raise NotImplementedError(f"{type(self).__name__} has no __getitem__ defined")

    def __add__(self, other):
        return ConcatDataset([self, other])


class IterableDataset(Dataset):
    """A dataset read as a stream: subclass it and define ``__iter__``.

    Example::

        class Counter(IterableDataset):
            def __iter__(self):
                return iter(range(100))
    """

    def __iter__(self):
        raise NotImplementedError(f"{type(self).__name__} has no __iter__ defined")


def _as_tensor(a):
    if isinstance(a, Tensor):
        return a
    if isinstance(a, np.ndarray):
        return Tensor.from_array(a)
    raise TypeError(f"TensorDataset: expected distgrad tensors or numpy arrays, got "
                    f"{type(a).__name__}")


class TensorDataset(Dataset):
    """Samples are rows of equally long tensors (or numpy arrays): ``ds[i]`` is
    ``(x[i], y[i])``. A DataLoader fetches a whole batch of rows in one indexing, and a
    sharded one (``cluster=``) sends each worker its rows once.

    Example::

        ds = TensorDataset(dg.randn(100, 3), dg.randint(0, 2, (100,)))
        x, y = ds[0]
    """

    def __init__(self, *tensors):
        if not tensors:
            raise ValueError("TensorDataset needs at least one tensor")
        self.tensors = tuple(_as_tensor(t) for t in tensors)
        n = self.tensors[0].shape[0] if self.tensors[0].ndim else None
        if any(t.ndim == 0 or t.shape[0] != n for t in self.tensors):
            raise ValueError("Size mismatch between tensors: TensorDataset needs tensors with the "
                             f"same first dimension, got shapes {[tuple(t.shape) for t in self.tensors]}")

    def __getitem__(self, index):
        return tuple(t[index] for t in self.tensors)

    def __len__(self):
        return self.tensors[0].shape[0]

    def take(self, indices):
        """The collated batch of rows ``indices``, as the DataLoader yields it: one fancy
        index per tensor instead of a stack of single rows. Example: ``x, y = ds.take([3, 1])``."""
        idx = np.asarray(indices, dtype=np.int64)
        return [Tensor.from_array(t.store.array[idx]) for t in self.tensors]


class Subset(Dataset):
    """The samples of ``dataset`` at ``indices``. Example: ``Subset(ds, range(10))``."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __getitem__(self, i):
        if isinstance(i, list):
            return [self.dataset[self.indices[j]] for j in i]
        return self.dataset[self.indices[i]]

    def __len__(self):
        return len(self.indices)


class ConcatDataset(Dataset):
    """Datasets one after another. Example: ``ConcatDataset([train, extra])``."""

    def __init__(self, datasets):
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("ConcatDataset: datasets should not be an empty iterable")
        for d in self.datasets:
            if isinstance(d, IterableDataset):
                raise TypeError("ConcatDataset does not support IterableDataset")
        self.cumulative_sizes = list(np.cumsum([len(d) for d in self.datasets]))

    def __len__(self):
        return int(self.cumulative_sizes[-1])

    def __getitem__(self, i):
        if i < 0:
            if -i > len(self):
                raise IndexError("absolute value of index should not exceed dataset length")
            i += len(self)
        k = bisect.bisect_right(self.cumulative_sizes, i)
        start = 0 if k == 0 else int(self.cumulative_sizes[k - 1])
        return self.datasets[k][i - start]


def random_split(dataset, lengths, generator=None):
    """Split into non-overlapping random subsets of the given lengths (or fractions).

    Example::

        train, val = random_split(ds, [0.8, 0.2], generator=dg.Generator().manual_seed(0))
    """
    n = len(dataset)
    lengths = list(lengths)
    if math.isclose(sum(lengths), 1) and sum(lengths) <= 1:
        counts = [int(math.floor(n * f)) for f in lengths]
        for i in range(n - sum(counts)):         # leftovers round-robin, as PyTorch
            counts[i % len(counts)] += 1
        lengths = counts
    if sum(lengths) != n:
        raise ValueError(f"random_split: sum of input lengths ({sum(lengths)}) does not equal "
                         f"the length of the input dataset ({n})")
    perm = random.permutation(n, generator).tolist()
    out, start = [], 0
    for k in lengths:
        out.append(Subset(dataset, perm[start:start + k]))
        start += k
    return out
