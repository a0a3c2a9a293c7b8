"""Samplers with PyTorch's names: which indices a DataLoader reads, in which order."""
import numpy as np

from ... import random


class Sampler:
    """Base class: an iterable of dataset indices (``__iter__``, and ``__len__`` if known).

    Example::

        class Reversed(Sampler):
            def __init__(self, n): self.n = n
            def __iter__(self): return iter(range(self.n - 1, -1, -1))
            def __len__(self): return self.n
    """

    def __init__(self, data_source=None):
        pass

    def __iter__(self):
        raise NotImplementedError


class SequentialSampler(Sampler):
    """0, 1, ..., len(data_source) - 1. Example: ``SequentialSampler(ds)``."""

    def __init__(self, data_source):
        self.data_source = data_source

    def __iter__(self):
        return iter(range(len(self.data_source)))

    def __len__(self):
        return len(self.data_source)

    def order(self):
        """This epoch's indices as one array (what ``__iter__`` yields one by one)."""
        return np.arange(len(self.data_source))


class RandomSampler(Sampler):
    """A fresh random permutation every epoch (or ``num_samples`` draws with replacement),
    from ``generator`` or else the global generator (so ``dg.manual_seed`` fixes it).

    Example::

        RandomSampler(ds, generator=dg.Generator().manual_seed(0))
    """

    def __init__(self, data_source, replacement=False, num_samples=None, generator=None):
        self.data_source, self.replacement = data_source, bool(replacement)
        self._num_samples, self.generator = num_samples, generator
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples <= 0):
            raise ValueError(f"num_samples should be a positive integer value, but got "
                             f"num_samples={num_samples}")

    @property
    def num_samples(self):
        return len(self.data_source) if self._num_samples is None else self._num_samples

    def __iter__(self):
        return iter(self.order().tolist())

    def order(self):
        """This epoch's indices as one array (what ``__iter__`` yields one by one)."""
        n = len(self.data_source)
        if self.replacement:
            return random.integers(0, n, (self.num_samples,), generator=self.generator)
        reps, rest = divmod(self.num_samples, n)
        perms = [random.permutation(n, self.generator) for _ in range(reps + (rest > 0))]
        return np.concatenate(perms)[:self.num_samples] if perms else np.zeros(0, np.int64)

    def __len__(self):
        return self.num_samples


class SubsetRandomSampler(Sampler):
    """The given indices in a random order. Example: ``SubsetRandomSampler(range(0, 100, 2))``."""

    def __init__(self, indices, generator=None):
        self.indices, self.generator = list(indices), generator

    def __iter__(self):
        perm = random.permutation(len(self.indices), self.generator)
        return (self.indices[i] for i in perm.tolist())

    def __len__(self):
        return len(self.indices)


class BatchSampler(Sampler):
    """Groups another sampler's indices into lists of ``batch_size`` (the last one shorter
    unless ``drop_last``). Example: ``BatchSampler(SequentialSampler(ds), 32, False)``."""

    def __init__(self, sampler, batch_size, drop_last):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size should be a positive integer value, but got "
                             f"batch_size={batch_size}")
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, bool(drop_last)

    def __iter__(self):
        if hasattr(self.sampler, "order"):
            # The whole epoch's order at once: slices of it, not 60,000 Python-level yields.
            order = self.sampler.order()
            stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
            for start in range(0, stop, self.batch_size):
                yield order[start:start + self.batch_size].tolist()
            return
        batch = []
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
