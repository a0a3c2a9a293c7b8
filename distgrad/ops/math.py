"""Elementwise arithmetic, comparisons, casts and copies, reductions and softmax.

Each ``defop`` call below is everything known about its op: forward (against ``xp``),
VJPs, placement rule, linearity, in-place and view behaviour (see ``registry``).
"""
import numpy as np

from .. import _backend, placement as P
from .registry import (LINEAR_ALL, LINEAR_EACH, LINEAR_SUM, count, defop, keep, log, np_axis,
                       shape_of, unbroadcast, unbroadcast_to)

ELEMENTWISE = P.rule_elementwise

# ---------------------------------------------------------------- elementwise arithmetic

defop("add", lambda xp, a, b: xp.add(a, b),
      lambda g, ans, a, b: unbroadcast_to(g, a),
      lambda g, ans, a, b: unbroadcast_to(g, b),
      placement=ELEMENTWISE, linear_in=LINEAR_SUM,
      inplace=lambda xp, a, b: xp.add(a, b, out=a), snapshot=False, array_vjps=True)
defop("sub", lambda xp, a, b: xp.subtract(a, b),
      lambda g, ans, a, b: unbroadcast_to(g, a),
      lambda g, ans, a, b: unbroadcast_to(-g, b),
      placement=ELEMENTWISE, linear_in=LINEAR_SUM,
      inplace=lambda xp, a, b: xp.subtract(a, b, out=a), snapshot=False, array_vjps=True)
defop("mul", lambda xp, a, b: xp.multiply(a, b),
      lambda g, ans, a, b: unbroadcast_to(g * b, a),
      lambda g, ans, a, b: unbroadcast_to(g * a, b),
      placement=ELEMENTWISE, linear_in=LINEAR_EACH,
      inplace=lambda xp, a, b: xp.multiply(a, b, out=a), snapshot=True, array_vjps=True)
defop("div", lambda xp, a, b: xp.true_divide(a, b),
      lambda g, ans, a, b: unbroadcast_to(g / b, a),
      lambda g, ans, a, b: unbroadcast_to(-g * a / (b * b), b),
      placement=ELEMENTWISE, linear_in=(0,), inplace=True, snapshot=True, array_vjps=True)
defop("pow", lambda xp, a, b: xp.power(a, b),
      lambda g, ans, a, b: unbroadcast(g * b * a ** (b - 1), shape_of(a)),
      lambda g, ans, a, b: unbroadcast(g * ans * log(a), shape_of(b)), uses_output=True,
      placement=ELEMENTWISE, inplace=True, snapshot=True)
defop("neg", lambda xp, x: xp.negative(x), lambda g, ans, x: -g,
      placement=ELEMENTWISE, linear_in=LINEAR_ALL, inplace=True, snapshot=False, array_vjps=True)
defop("exp", lambda xp, x: xp.exp(x), lambda g, ans, x: g * ans, uses_output=True,
      placement=ELEMENTWISE, inplace=True, snapshot=False, array_vjps=True)
defop("log", lambda xp, x: xp.log(x), lambda g, ans, x: g / x, placement=ELEMENTWISE,
      array_vjps=True)
defop("sqrt", lambda xp, x: xp.sqrt(x), lambda g, ans, x: g / (2 * ans), uses_output=True,
      placement=ELEMENTWISE, inplace=True, snapshot=False, array_vjps=True)
defop("abs", lambda xp, x: xp.abs(x), lambda g, ans, x: g * x.sign(), placement=ELEMENTWISE)
defop("sin", lambda xp, x: xp.sin(x), lambda g, ans, x: g * x.cos(), placement=ELEMENTWISE)
defop("cos", lambda xp, x: xp.cos(x), lambda g, ans, x: -g * x.sin(), placement=ELEMENTWISE)
defop("tanh", lambda xp, x: xp.tanh(x), lambda g, ans, x: g * (1 - ans * ans), uses_output=True,
      placement=ELEMENTWISE, array_vjps=True)


def _sigmoid(xp, x):
    # exp of a negative number only: stable for large |x|.
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


defop("sigmoid", _sigmoid, lambda g, ans, x: g * ans * (1 - ans), uses_output=True,
      placement=ELEMENTWISE, array_vjps=True)
defop("relu", lambda xp, x: xp.maximum(x, 0).astype(x.dtype, copy=False),
      lambda g, ans, x: g.apply("relu_grad", ans), uses_output=True,
      placement=ELEMENTWISE, inplace=True, snapshot=False)
# relu's VJP as one op (PyTorch's threshold_backward): g where ans > 0. One dispatch and
# one temporary instead of a comparison and a multiply on the MLP's hot path. Linear in
# g; the mask is piecewise constant, so ans gets no gradient.
defop("relu_grad", lambda xp, g, ans: xp.multiply(g, ans > 0, dtype=g.dtype),
      lambda gg, ans, g, out: gg.apply("relu_grad", out), lambda gg, ans, g, out: None,
      placement=ELEMENTWISE, linear_in=(0,))


def _in_range(x, lo, hi):
    mask = None
    if lo is not None:
        mask = x >= lo
    if hi is not None:
        upper = x <= hi
        mask = upper if mask is None else mask * upper
    return 1 if mask is None else mask


defop("clamp", lambda xp, x, min=None, max=None: xp.clip(x, min, max).astype(x.dtype, copy=False),
      lambda g, ans, x, min=None, max=None: g * _in_range(x, min, max),
      placement=ELEMENTWISE, inplace=True, snapshot=True)
# PyTorch's hardtanh: clamp to [min_val, max_val], with a gradient only strictly inside.
defop("hardtanh", lambda xp, x, min_val=-1.0, max_val=1.0:
      xp.clip(x, min_val, max_val).astype(x.dtype, copy=False),
      lambda g, ans, x, min_val=-1.0, max_val=1.0: g * ((x > min_val) & (x < max_val)),
      placement=ELEMENTWISE, inplace=True, snapshot=True)


def _tie_split(g, a, b, pick_a):
    """Gradient of max/min for operand a: all where a wins, half on ties (PyTorch's rule)."""
    wins = (a > b) if pick_a else (a < b)
    return g * wins + g * (a == b) * 0.5


defop("maximum", lambda xp, a, b: xp.maximum(a, b),
      lambda g, ans, a, b: unbroadcast(_tie_split(g, a, b, True), shape_of(a)),
      lambda g, ans, a, b: unbroadcast(_tie_split(g, b, a, True), shape_of(b)),
      placement=ELEMENTWISE)
defop("minimum", lambda xp, a, b: xp.minimum(a, b),
      lambda g, ans, a, b: unbroadcast(_tie_split(g, a, b, False), shape_of(a)),
      lambda g, ans, a, b: unbroadcast(_tie_split(g, b, a, False), shape_of(b)),
      placement=ELEMENTWISE)
defop("where", lambda xp, c, a, b: xp.where(c, a, b),
      None,
      lambda g, ans, c, a, b: unbroadcast(g._masked(c, 0), shape_of(a)),
      lambda g, ans, c, a, b: unbroadcast(g._masked(c, 0, invert=True), shape_of(b)),
      placement=ELEMENTWISE)
# ``where`` with the gradient on one side and zero on the other, as a differentiable op.
defop("mask_fill", lambda xp, g, c, value=0, invert=False:
      xp.where(c, value, g) if invert else xp.where(c, g, value),
      lambda gg, ans, g, c, value=0, invert=False: gg._masked(c, 0, invert=invert),
      placement=ELEMENTWISE, inplace=True, snapshot=False)

# Comparisons and other ops with no gradient.
for _name, _fn in [("lt", "less"), ("le", "less_equal"), ("gt", "greater"),
                   ("ge", "greater_equal"), ("eq", "equal"), ("ne", "not_equal"),
                   ("logical_and", "logical_and"), ("logical_or", "logical_or")]:
    defop(_name, (lambda f: lambda xp, a, b: getattr(xp, f)(a, b))(_fn), differentiable=False,
          placement=ELEMENTWISE)
defop("logical_not", lambda xp, x: xp.logical_not(x), differentiable=False, placement=ELEMENTWISE)
defop("sign", lambda xp, x: xp.sign(x), differentiable=False, placement=ELEMENTWISE)
defop("floor", lambda xp, x: xp.floor(x), differentiable=False, placement=ELEMENTWISE)
defop("argmax", lambda xp, x, dim=None, keepdim=False: xp.argmax(x, axis=dim, keepdims=keepdim),
      differentiable=False, placement=P.rule_reduce)
defop("argmin", lambda xp, x, dim=None, keepdim=False: xp.argmin(x, axis=dim, keepdims=keepdim),
      differentiable=False, placement=P.rule_reduce)

# ---------------------------------------------------------------- casts, copies, devices

defop("astype", lambda xp, x, dtype: x.astype(dtype),
      lambda g, ans, x, dtype: g.astype(str(x.dtype)),
      placement=ELEMENTWISE, linear_in=LINEAR_ALL)
# Keeps the memory layout, as PyTorch's clone (preserve_format) does.
defop("clone", lambda xp, x: x.copy(order="K"), lambda g, ans, x: g,
      placement=ELEMENTWISE, linear_in=LINEAR_ALL, array_vjps=True)
# A constant shaped like x (zeros_like on a distributed value stays on the workers).
defop("full_like", lambda xp, x, value, dtype=None: xp.full(x.shape, value, dtype=dtype or x.dtype),
      differentiable=False, placement=P.rule_like)
defop("copy_from", lambda xp, x, src: xp.broadcast_to(xp.asarray(src), x.shape).astype(x.dtype),
      lambda g, ans, x, src: g * 0,
      lambda g, ans, x, src: unbroadcast(g, shape_of(src)),
      placement=ELEMENTWISE, inplace=True, snapshot=False)
# Device copies are ops too, so gradients flow back across devices.
defop("to_device", lambda xp, x, device: _backend.to_device(x, device),
      lambda g, ans, x, device: g.to(x.device),
      placement=P.rule_identity, linear_in=LINEAR_ALL, device_attr="device")

# ---------------------------------------------------------------- reductions

defop("sum", lambda xp, x, dim=None, keepdim=False: x.sum(axis=np_axis(dim), keepdims=keepdim),
      lambda g, ans, x, dim=None, keepdim=False: keep(g, x.shape, dim, keepdim).expand(x.shape),
      placement=P.rule_reduce_linear, linear_in=LINEAR_ALL)
defop("mean", lambda xp, x, dim=None, keepdim=False:
      xp.mean(x, axis=np_axis(dim), keepdims=keepdim).astype(x.dtype, copy=False),
      lambda g, ans, x, dim=None, keepdim=False:
      keep(g, x.shape, dim, keepdim).expand(x.shape) / count(x.shape, dim),
      placement=P.rule_reduce_linear, linear_in=LINEAR_ALL, divides_by_count=True)


def _extreme_vjp(g, ans, x, dim=None, keepdim=False):
    # Ties share the gradient evenly (PyTorch's amax/amin rule).
    mask = (x == keep(ans, x.shape, dim, keepdim)).astype(x.dtype)   # float: keeps g's dtype
    return keep(g, x.shape, dim, keepdim) * mask / mask.sum(dim=dim, keepdim=True)


defop("amax", lambda xp, x, dim=None, keepdim=False: x.max(axis=np_axis(dim), keepdims=keepdim),
      _extreme_vjp, uses_output=True, placement=P.rule_reduce)
defop("amin", lambda xp, x, dim=None, keepdim=False: x.min(axis=np_axis(dim), keepdims=keepdim),
      _extreme_vjp, uses_output=True, placement=P.rule_reduce)


def _prod_vjp(g, ans, x, dim=None, keepdim=False):
    # d prod / d x_i is the product of the other factors. ans / x would give nan at a zero
    # factor, so take the product p of the non-zero factors: with no zero in the slice the
    # gradient is p / x; with exactly one zero it is p at the zero and 0 elsewhere; with
    # more it is 0 (PyTorch's result). No data-dependent branch: the graph stays static.
    zero = x == 0
    nz = x._masked(zero, 1, invert=True)
    p = nz.prod(dim=dim, keepdim=True)
    n0 = zero.sum(dim=dim, keepdim=True)
    at_zero = (p * (n0 == 1)).expand(x.shape)._masked(zero, 0)
    elsewhere = (p / nz * (n0 == 0))._masked(zero, 0, invert=True)
    return keep(g, x.shape, dim, keepdim) * (at_zero + elsewhere)


defop("prod", lambda xp, x, dim=None, keepdim=False:
      xp.prod(x, axis=np_axis(dim), keepdims=keepdim),
      _prod_vjp, placement=P.rule_reduce)


def _norm_vjp(g, ans, x, dim=None, keepdim=False):
    n = keep(ans, x.shape, dim, keepdim)
    # Subgradient 0 at the origin, like PyTorch, instead of 0/0.
    return (keep(g, x.shape, dim, keepdim) * x / n)._masked(n == 0, 0, invert=True)


defop("norm", lambda xp, x, dim=None, keepdim=False:
      xp.sqrt(xp.sum(x * x, axis=np_axis(dim), keepdims=keepdim)),
      _norm_vjp, uses_output=True, placement=P.rule_reduce)


def _logsumexp(xp, x, dim=None, keepdim=False):
    axis = np_axis(dim)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    out = xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdim else xp.squeeze(out, axis=axis if axis is not None else None)


defop("logsumexp", _logsumexp,
      lambda g, ans, x, dim=None, keepdim=False:
      keep(g, x.shape, dim, keepdim) * (x - keep(ans, x.shape, dim, keepdim)).exp(),
      uses_output=True, placement=P.rule_reduce)

# ---------------------------------------------------------------- softmax


def softmax_forward(xp, x, dim):
    """The softmax kernel (cross_entropy's gradient reuses it).

    Example: ``softmax_forward(np, a, 1)``.
    """
    e = xp.exp(x - x.max(axis=dim, keepdims=True))
    e /= e.sum(axis=dim, keepdims=True)
    return e


def log_softmax_forward(xp, x, dim):
    """The log_softmax kernel (cross_entropy reuses it).

    Example: ``log_softmax_forward(np, a, 1)``.
    """
    # Array methods rather than xp.max/xp.sum: the loss runs these on small arrays,
    # where numpy's Python-level wrappers cost as much as the arithmetic.
    s = x - x.max(axis=dim, keepdims=True)
    s -= xp.log(xp.exp(s).sum(axis=dim, keepdims=True))
    return s


defop("softmax", softmax_forward,
      lambda g, ans, x, dim: ans * (g - (g * ans).sum(dim=dim, keepdim=True)),
      uses_output=True, placement=P.rule_along_dim)
defop("log_softmax", log_softmax_forward,
      lambda g, ans, x, dim: g.apply("log_softmax_grad", ans, dim=dim),
      uses_output=True, placement=P.rule_along_dim)


def _log_softmax_grad(xp, g, logp, dim):
    out = xp.exp(logp)
    out *= -g.sum(axis=dim, keepdims=True)
    out += g
    return out


# log_softmax's VJP, g - softmax * sum(g), as one op (PyTorch's _log_softmax_backward_data):
# one dispatch instead of four on every classifier's backward. Its own VJPs keep
# create_graph working: out_j = g_j - p_j * sum_k g_k with p = exp(logp).
defop("log_softmax_grad", _log_softmax_grad,
      lambda gg, ans, g, logp, dim: gg - (gg * logp.exp()).sum(dim=dim, keepdim=True),
      lambda gg, ans, g, logp, dim: -gg * logp.exp() * g.sum(dim=dim, keepdim=True),
      placement=P.rule_along_dim, linear_in=(0,))
