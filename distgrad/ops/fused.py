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
    # Large arrays go a cache-sized block at a time, with the same ufuncs per element (the
    # same bits): b*y's temporary never reaches memory, so an SGD step moves 3 bytes per
    # parameter byte instead of 5 (issue 13: 2.7 -> 2.2 ms for the MLP's 7 MB beside a
    # busy core). Otherwise the whole array is the one block.
    for xs, ys, tmp in _blocks(xp, x, y, b):
        if a != 1.0:
            xp.multiply(xs, a, out=xs)
        xp.add(xs, ys if b == 1.0 else xp.multiply(ys, b, dtype=xs.dtype, out=tmp), out=xs)


BLOCK_ELEMENTS = 1 << 15      # 128 KB of float32: a block and its temporary stay in L2


def _blocks(xp, x, y, b):
    """``(x part, y part, temporary or None)`` triples covering ``x`` and ``y``: cache-sized
    blocks of flat views in one memory order where blocking pays and gives the same bits
    as whole-array ufuncs (same shape, dtype and layout, no overlap), else the arrays whole."""
    order = None
    if (xp is np and b != 1.0 and x.size >= 4 * BLOCK_ELEMENTS and type(y) is np.ndarray
            and y.shape == x.shape and y.dtype == x.dtype and not np.may_share_memory(x, y)):
        order = ("C" if x.flags.c_contiguous and y.flags.c_contiguous else
                 "F" if x.flags.f_contiguous and y.flags.f_contiguous else None)
    if order is None:
        yield x, y, None
        return
    xf, yf = x.reshape(-1, order=order), y.reshape(-1, order=order)
    tmp = np.empty(BLOCK_ELEMENTS, x.dtype)
    for lo in range(0, xf.size, BLOCK_ELEMENTS):
        xs = xf[lo:lo + BLOCK_ELEMENTS]
        yield xs, yf[lo:lo + BLOCK_ELEMENTS], tmp[:xs.size]


defop("axpby", _axpby,
      lambda g, ans, x, y, a=1.0, b=1.0: unbroadcast(g * a, shape_of(x)),
      lambda g, ans, x, y, a=1.0, b=1.0: unbroadcast(g * b, shape_of(y)),
      placement=P.rule_elementwise, inplace=_axpby_inplace, snapshot=True)
