"""Fused arithmetic: one op where the hot paths would otherwise pay several dispatches.

``axpby``: a*x + b*y. Optimizers update parameters and state with it (one dispatch per
update instead of three), in place through its kernel, and the distributed recorder
sees an ordinary elementwise op.
"""
import numpy as np

from .. import placement as P
from .registry import defop, shape_of, unbroadcast


def _axpby(xp, x, y, a=1.0, b=1.0):
    if np.broadcast_shapes(np.shape(x), np.shape(y)) != np.shape(x):
        return (a * x + b * y).astype(np.result_type(x, y), copy=False)
    # Two passes and no temporary when either coefficient is 1 (SGD's two updates).
    if b == 1.0 or a != 1.0:
        out = xp.multiply(x, a, dtype=x.dtype)
        out += y if b == 1.0 else xp.multiply(y, b, dtype=x.dtype)
    else:
        out = xp.multiply(y, b, dtype=x.dtype)
        out += x
    return out


def _axpby_inplace(xp, x, y, a=1.0, b=1.0):
    if a != 1.0:
        xp.multiply(x, a, out=x)
    xp.add(x, y if b == 1.0 else xp.multiply(y, b, dtype=x.dtype), out=x)


defop("axpby", _axpby,
      lambda g, ans, x, y, a=1.0, b=1.0: unbroadcast(g * a, shape_of(x)),
      lambda g, ans, x, y, a=1.0, b=1.0: unbroadcast(g * b, shape_of(y)),
      placement=P.rule_elementwise, inplace=_axpby_inplace, snapshot=True)
