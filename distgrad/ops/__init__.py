"""``distgrad.ops``: the op registry (``registry``) and the op families that fill it.

Importing this package registers every op; ``OPS``, ``defop``, ``get_op`` and the
helpers for writing ops are re-exported from ``registry``. The families sit below the
tensor layer: their VJPs use tensor methods (``g.apply(...)``) and never import it.

Example::

    from distgrad.ops import OPS, get_op
    get_op("mul").linear_in        # 'each'
"""
from . import collective, fused, linalg, math, nn, shape  # noqa: F401  (each registers its ops)
from .registry import (LINEAR_ALL, LINEAR_EACH, LINEAR_SUM, OPS, OpDef, defop, get_op,  # noqa: F401
                       is_basic_index, shape_of, unbroadcast)
