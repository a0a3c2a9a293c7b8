"""distgrad: define-by-run autograd on NumPy/CuPy with exact data-parallel gradients over Ray.

Example::

    import distgrad as dg
    from distgrad.autograd import Variable

    x = Variable(dg.ones(2, 2), requires_grad=True)
    out = ((x + 2) * (x + 2) * 3).mean()
    out.backward()          # x.grad == 4.5 everywhere
"""
import os as _os

import numpy as np

# In a source checkout the top-level workers/, scheduler/ and examples/ folders are what an
# install maps to distgrad.workers / .scheduler / .examples (pyproject's package-dir);
# let the same imports work uncompiled from the checkout.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "workers", "__init__.py")) and _root not in __path__:
    __path__.append(_root)

from . import heap as _heap
from . import autograd  # noqa: F401  (dg.autograd)
from .autograd import enable_grad, is_grad_enabled, no_grad, set_grad_enabled  # noqa: F401
from .autograd import no_grad as inference_mode  # noqa: F401  (no view/version tracking to skip)
from .factories import *  # noqa: F401,F403  (dg.ones, dg.randn, dg.tensor... see factories.__all__)
from ._backend import device  # noqa: F401
from .compat import missing as _missing
from .random import Generator, manual_seed  # noqa: F401
from .tensor import Size, Tensor, Variable, apply_op  # noqa: F401

__version__ = "0.1.0"

# Freed activations stay in the heap for the next step (glibc would hand them back and
# fault them in again: 10-15% of a training step; see distgrad/heap.py).
_heap.keep_freed_heap_unless_told_not_to()

float16, float32, float64 = np.float16, np.float32, np.float64
half, float, double = np.float16, np.float32, np.float64
int8, int16, int32, int64, uint8 = np.int8, np.int16, np.int32, np.int64, np.uint8
long, bool = np.int64, np.bool_


def is_tensor(x):
    return isinstance(x, Tensor)


def __getattr__(name):
    # Heavier subpackages load on first use so ``import distgrad`` stays fast.
    import importlib
    if name in ("nn", "optim", "distributed", "cuda", "accelerator", "utils"):
        return importlib.import_module(f".{name}", __name__)
    if name in ("save", "load"):
        return getattr(importlib.import_module(".serialization", __name__), name)
    if name in ("init", "Cluster", "Shard", "Replicate", "Partial"):
        return getattr(importlib.import_module(".distributed", __name__), name)
    raise _missing("torch", name)
