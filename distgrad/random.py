"""The global random generator behind ``dg.randn`` / ``dg.rand`` / ``dg.manual_seed``.

Values are drawn on the CPU with numpy's PCG64 and moved to the device, so a seed
gives the same numbers on every device and every worker. The draws are numpy arrays:
this module sits below the tensor layer (``dg.randn`` and ``Tensor.normal_`` wrap them).
"""
import threading

import numpy as np

_lock = threading.Lock()
_generator = np.random.default_rng(0)


def manual_seed(seed):
    """Seed the global generator. Example: ``dg.manual_seed(0)``."""
    global _generator
    with _lock:
        _generator = np.random.default_rng(int(seed))
    return _generator


def generator():
    return _generator


class Generator:
    """A random generator of its own, as ``torch.Generator`` (a DataLoader's shuffling,
    ``dg.randperm(n, generator=g)``), independent of the global one.

    Example::

        g = dg.Generator().manual_seed(0)
        loader = DataLoader(ds, batch_size=32, shuffle=True, generator=g)
    """

    def __init__(self, device="cpu"):
        self.device = device
        self._seed = int(np.random.SeedSequence().entropy % (2 ** 63))
        self.rng = np.random.default_rng(self._seed)

    def manual_seed(self, seed):
        """Reseed; returns the generator itself, as PyTorch's does."""
        self._seed = int(seed)
        self.rng = np.random.default_rng(self._seed)
        return self

    def seed(self):
        """Reseed from fresh entropy; returns the new seed."""
        self.manual_seed(np.random.SeedSequence().entropy % (2 ** 63))
        return self._seed

    def initial_seed(self):
        return self._seed


def _draw(fn, generator=None):
    if generator is not None:
        return fn(generator.rng)
    with _lock:
        return fn(_generator)


def normal(shape, mean=0.0, std=1.0, dtype=np.float32):
    """Normal samples from the global generator. Example: ``normal((2, 3))`` (an array)."""
    return _draw(lambda g: g.normal(mean, std, size=tuple(shape))).astype(dtype)


def uniform(shape, low=0.0, high=1.0, dtype=np.float32):
    """Uniform samples in [low, high). Example: ``uniform((4,), 0.0, 1.0)`` (an array)."""
    return _draw(lambda g: g.uniform(low, high, size=tuple(shape))).astype(dtype)


def integers(low, high, shape, dtype=np.int64, generator=None):
    """Integers in [low, high). Example: ``integers(0, 10, (5,))`` (an array)."""
    return _draw(lambda g: g.integers(low, high, size=tuple(shape)), generator).astype(dtype)


def permutation(n, generator=None):
    """A permutation of 0..n-1. Example: ``permutation(5, g)`` (an array)."""
    return _draw(lambda g: g.permutation(n), generator)
