"""The global random generator behind ``dg.randn`` / ``dg.rand`` / ``dg.manual_seed``.

Values are drawn on the CPU with numpy's PCG64 and moved to the device, so a seed
gives the same numbers on every device and every worker.
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


def _draw(fn):
    with _lock:
        return fn(_generator)


def normal(shape, mean=0.0, std=1.0, dtype=np.float32):
    from .tensor import Tensor
    return Tensor._from_array(_draw(lambda g: g.normal(mean, std, size=tuple(shape))).astype(dtype))


def uniform(shape, low=0.0, high=1.0, dtype=np.float32):
    from .tensor import Tensor
    return Tensor._from_array(_draw(lambda g: g.uniform(low, high, size=tuple(shape))).astype(dtype))


def integers(low, high, shape, dtype=np.int64):
    from .tensor import Tensor
    return Tensor._from_array(_draw(lambda g: g.integers(low, high, size=tuple(shape))).astype(dtype))


def permutation(n):
    return _draw(lambda g: g.permutation(n))
