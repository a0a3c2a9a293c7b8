"""The op registry: every op's forward (against ``xp``) beside its VJPs.

One table serves the eager engine, the distributed recorder, the workers and the
tests. ``defop(name, forward, *vjps)`` declares an op: ``forward(xp, *inputs, **attrs)``
returns an array; ``vjps[i](g, ans, *inputs, **attrs)`` returns the gradient for input
i, written with differentiable tensor ops so that ``create_graph=True`` gives higher
derivatives for free. A missing VJP is an error naming the op, never a silent zero.

``placement`` names the rule (``distgrad.placement``) that says how the op maps
input placements (Shard/Replicate/Partial) to its output placement.
"""
import math

import numpy as np

from . import _backend

OPS = {}


class OpDef:
    __slots__ = ("name", "forward", "vjps", "variadic_vjp", "differentiable", "uses_output",
                 "placement", "inplace")

    def __init__(self, name, forward, vjps, variadic_vjp, differentiable, uses_output, placement,
                 inplace=None):
        self.name = name
        self.inplace = inplace
        self.forward = forward
        self.vjps = vjps
        self.variadic_vjp = variadic_vjp
        self.differentiable = differentiable
        self.uses_output = uses_output
        self.placement = placement

    def vjp(self, i, g, ans, inputs, attrs):
        if self.variadic_vjp is not None:
            return self.variadic_vjp(i, g, ans, *inputs, **attrs)
        fn = self.vjps[i] if i < len(self.vjps) else None
        if fn is None:
            raise NotImplementedError(f"op '{self.name}' has no VJP registered for input {i}")
        return fn(g, ans, *inputs, **attrs)

    def __repr__(self):
        return f"OpDef({self.name!r})"


def defop(name, forward, *vjps, variadic_vjp=None, differentiable=True, uses_output=False,
          placement="elementwise", inplace=None):
    """Register an op. Example::

        defop("exp", lambda xp, x: xp.exp(x), lambda g, ans, x: g * ans, uses_output=True)

    ``inplace(xp, x, *others, **attrs)``, when given, writes the result into ``x`` itself:
    ``x.add_(y)`` uses it when no graph is recorded (optimizer steps), saving a temporary
    and a copy.
    """
    if name in OPS:
        raise ValueError(f"op '{name}' is already registered")
    OPS[name] = OpDef(name, forward, vjps, variadic_vjp, differentiable, uses_output, placement,
                      inplace)
    return OPS[name]


def get_op(name):
    try:
        return OPS[name]
    except KeyError:
        raise NotImplementedError(f"unknown op '{name}': no such op in the registry") from None


# ---------------------------------------------------------------- helpers

def shape_of(x):
    return tuple(x.shape) if hasattr(x, "shape") else ()


def unbroadcast(g, shape):
    """Sum ``g`` down to ``shape``: the one place broadcasting is undone."""
    shape = tuple(shape)
    if tuple(g.shape) == shape:
        return g
    lead = g.ndim - len(shape)
    dims = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape)
                                     if n == 1 and g.shape[i + lead] != 1)
    if dims:
        g = g.sum(dim=dims, keepdim=True)
    return g.reshape(shape)


def _axes(dim, ndim):
    """Normalize a ``dim`` attr to a sorted tuple of non-negative axes (None: all)."""
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(sorted(d % ndim if ndim else 0 for d in dims))


def _np_axis(dim):
    return tuple(dim) if isinstance(dim, (list, tuple)) else dim


def _keep(g, in_shape, dim, keepdim):
    """Reshape a reduction's gradient so it broadcasts against the input again."""
    if keepdim or dim is None and g.ndim == len(in_shape):
        return g
    shape = list(in_shape)
    for d in _axes(dim, len(in_shape)):
        shape[d] = 1
    return g.reshape(tuple(shape))


def _count(shape, dim):
    return int(np.prod([shape[d] for d in _axes(dim, len(shape))], dtype=np.int64))


def _log(x):
    return x.log() if hasattr(x, "log") else math.log(x)


def is_basic_index(index):
    """True for indices made only of ints, slices, None and Ellipsis (no scatter needed)."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, np.integer, slice)) for i in items)


# ---------------------------------------------------------------- elementwise arithmetic

defop("add", lambda xp, a, b: xp.add(a, b),
      lambda g, ans, a, b: unbroadcast(g, shape_of(a)),
      lambda g, ans, a, b: unbroadcast(g, shape_of(b)),
      inplace=lambda xp, a, b: xp.add(a, b, out=a))
defop("sub", lambda xp, a, b: xp.subtract(a, b),
      lambda g, ans, a, b: unbroadcast(g, shape_of(a)),
      lambda g, ans, a, b: unbroadcast(-g, shape_of(b)),
      inplace=lambda xp, a, b: xp.subtract(a, b, out=a))
defop("mul", lambda xp, a, b: xp.multiply(a, b),
      lambda g, ans, a, b: unbroadcast(g * b, shape_of(a)),
      lambda g, ans, a, b: unbroadcast(g * a, shape_of(b)),
      inplace=lambda xp, a, b: xp.multiply(a, b, out=a))
defop("div", lambda xp, a, b: xp.true_divide(a, b),
      lambda g, ans, a, b: unbroadcast(g / b, shape_of(a)),
      lambda g, ans, a, b: unbroadcast(-g * a / (b * b), shape_of(b)))
defop("pow", lambda xp, a, b: xp.power(a, b),
      lambda g, ans, a, b: unbroadcast(g * b * a ** (b - 1), shape_of(a)),
      lambda g, ans, a, b: unbroadcast(g * ans * _log(a), shape_of(b)), uses_output=True)
defop("neg", lambda xp, x: xp.negative(x), lambda g, ans, x: -g)
defop("exp", lambda xp, x: xp.exp(x), lambda g, ans, x: g * ans, uses_output=True)
defop("log", lambda xp, x: xp.log(x), lambda g, ans, x: g / x)
defop("sqrt", lambda xp, x: xp.sqrt(x), lambda g, ans, x: g / (2 * ans), uses_output=True)
defop("abs", lambda xp, x: xp.abs(x), lambda g, ans, x: g * x.sign())
defop("sin", lambda xp, x: xp.sin(x), lambda g, ans, x: g * x.cos())
defop("cos", lambda xp, x: xp.cos(x), lambda g, ans, x: -g * x.sin())
defop("tanh", lambda xp, x: xp.tanh(x), lambda g, ans, x: g * (1 - ans * ans), uses_output=True)


def _sigmoid(xp, x):
    # exp of a negative number only: stable for large |x|.
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


defop("sigmoid", _sigmoid, lambda g, ans, x: g * ans * (1 - ans), uses_output=True)
defop("relu", lambda xp, x: xp.maximum(x, 0).astype(x.dtype, copy=False),
      lambda g, ans, x: g.apply("relu_grad", ans), uses_output=True)
# relu's VJP as one op (PyTorch's threshold_backward): g where ans > 0. One dispatch and
# one temporary instead of a comparison and a multiply on the MLP's hot path. Linear in
# g; the mask is piecewise constant, so ans gets no gradient.
defop("relu_grad", lambda xp, g, ans: xp.multiply(g, ans > 0, dtype=g.dtype),
      lambda gg, ans, g, out: gg.apply("relu_grad", out), lambda gg, ans, g, out: None)
defop("clamp", lambda xp, x, min=None, max=None: xp.clip(x, min, max).astype(x.dtype, copy=False),
      lambda g, ans, x, min=None, max=None: g * _in_range(x, min, max))


def _in_range(x, lo, hi):
    mask = None
    if lo is not None:
        mask = x >= lo
    if hi is not None:
        upper = x <= hi
        mask = upper if mask is None else mask * upper
    return 1 if mask is None else mask


def _tie_split(g, a, b, pick_a):
    """Gradient of max/min for operand a: all where a wins, half on ties (PyTorch's rule)."""
    wins = (a > b) if pick_a else (a < b)
    return g * wins + g * (a == b) * 0.5


defop("maximum", lambda xp, a, b: xp.maximum(a, b),
      lambda g, ans, a, b: unbroadcast(_tie_split(g, a, b, True), shape_of(a)),
      lambda g, ans, a, b: unbroadcast(_tie_split(g, b, a, True), shape_of(b)))
defop("minimum", lambda xp, a, b: xp.minimum(a, b),
      lambda g, ans, a, b: unbroadcast(_tie_split(g, a, b, False), shape_of(a)),
      lambda g, ans, a, b: unbroadcast(_tie_split(g, b, a, False), shape_of(b)))
defop("where", lambda xp, c, a, b: xp.where(c, a, b),
      None,
      lambda g, ans, c, a, b: unbroadcast(g._masked(c, 0), shape_of(a)),
      lambda g, ans, c, a, b: unbroadcast(g._masked(c, 0, invert=True), shape_of(b)))
# ``where`` with the gradient on one side and zero on the other, as a differentiable op.
defop("mask_fill", lambda xp, g, c, value=0, invert=False:
      xp.where(c, value, g) if invert else xp.where(c, g, value),
      lambda gg, ans, g, c, value=0, invert=False: gg._masked(c, 0, invert=invert))

# Comparisons and other ops with no gradient.
for _name, _fn in [("lt", "less"), ("le", "less_equal"), ("gt", "greater"),
                   ("ge", "greater_equal"), ("eq", "equal"), ("ne", "not_equal"),
                   ("logical_and", "logical_and"), ("logical_or", "logical_or")]:
    defop(_name, (lambda f: lambda xp, a, b: getattr(xp, f)(a, b))(_fn), differentiable=False)
defop("logical_not", lambda xp, x: xp.logical_not(x), differentiable=False)
defop("sign", lambda xp, x: xp.sign(x), differentiable=False)
defop("floor", lambda xp, x: xp.floor(x), differentiable=False)
defop("argmax", lambda xp, x, dim=None, keepdim=False: xp.argmax(x, axis=dim, keepdims=keepdim),
      differentiable=False, placement="reduce")
defop("argmin", lambda xp, x, dim=None, keepdim=False: xp.argmin(x, axis=dim, keepdims=keepdim),
      differentiable=False, placement="reduce")
defop("astype", lambda xp, x, dtype: x.astype(dtype),
      lambda g, ans, x, dtype: g.astype(str(x.dtype)))
# Keeps the memory layout, as PyTorch's clone (preserve_format) does.
defop("clone", lambda xp, x: x.copy(order="K"), lambda g, ans, x: g)
# A constant shaped like x (zeros_like on a distributed value stays on the workers).
defop("full_like", lambda xp, x, value, dtype=None: xp.full(x.shape, value, dtype=dtype or x.dtype),
      differentiable=False, placement="like")
defop("copy_from", lambda xp, x, src: xp.broadcast_to(xp.asarray(src), x.shape).astype(x.dtype),
      lambda g, ans, x, src: g * 0,
      lambda g, ans, x, src: unbroadcast(g, shape_of(src)))
# Device copies are ops too, so gradients flow back across devices.
defop("to_device", lambda xp, x, device: _backend.to_device(x, device),
      lambda g, ans, x, device: g.to(_backend.device_of(x._store.array)), placement="identity")

# ---------------------------------------------------------------- reductions

defop("sum", lambda xp, x, dim=None, keepdim=False: x.sum(axis=_np_axis(dim), keepdims=keepdim),
      lambda g, ans, x, dim=None, keepdim=False: _keep(g, x.shape, dim, keepdim).expand(x.shape),
      placement="reduce")
defop("mean", lambda xp, x, dim=None, keepdim=False:
      xp.mean(x, axis=_np_axis(dim), keepdims=keepdim).astype(x.dtype, copy=False),
      lambda g, ans, x, dim=None, keepdim=False:
      _keep(g, x.shape, dim, keepdim).expand(x.shape) / _count(x.shape, dim),
      placement="reduce")


def _extreme_vjp(g, ans, x, dim=None, keepdim=False):
    # Ties share the gradient evenly (PyTorch's amax/amin rule).
    mask = (x == _keep(ans, x.shape, dim, keepdim)).astype(x.dtype)   # float: keeps g's dtype
    return _keep(g, x.shape, dim, keepdim) * mask / mask.sum(dim=dim, keepdim=True)


defop("amax", lambda xp, x, dim=None, keepdim=False: x.max(axis=_np_axis(dim), keepdims=keepdim),
      _extreme_vjp, uses_output=True, placement="reduce")
defop("amin", lambda xp, x, dim=None, keepdim=False: x.min(axis=_np_axis(dim), keepdims=keepdim),
      _extreme_vjp, uses_output=True, placement="reduce")
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
    return _keep(g, x.shape, dim, keepdim) * (at_zero + elsewhere)


defop("prod", lambda xp, x, dim=None, keepdim=False: xp.prod(x, axis=_np_axis(dim), keepdims=keepdim),
      _prod_vjp, placement="reduce")


def _norm_vjp(g, ans, x, dim=None, keepdim=False):
    n = _keep(ans, x.shape, dim, keepdim)
    # Subgradient 0 at the origin, like PyTorch, instead of 0/0.
    return (_keep(g, x.shape, dim, keepdim) * x / n)._masked(n == 0, 0, invert=True)


defop("norm", lambda xp, x, dim=None, keepdim=False:
      xp.sqrt(xp.sum(x * x, axis=_np_axis(dim), keepdims=keepdim)),
      _norm_vjp, uses_output=True, placement="reduce_nonlinear")


def _logsumexp(xp, x, dim=None, keepdim=False):
    axis = _np_axis(dim)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    out = xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdim else xp.squeeze(out, axis=axis if axis is not None else None)


defop("logsumexp", _logsumexp,
      lambda g, ans, x, dim=None, keepdim=False:
      _keep(g, x.shape, dim, keepdim) * (x - _keep(ans, x.shape, dim, keepdim)).exp(),
      uses_output=True, placement="reduce_nonlinear")


def _softmax(xp, x, dim):
    e = xp.exp(x - x.max(axis=dim, keepdims=True))
    e /= e.sum(axis=dim, keepdims=True)
    return e


def _log_softmax(xp, x, dim):
    # Array methods rather than xp.max/xp.sum: the loss runs these on small arrays,
    # where numpy's Python-level wrappers cost as much as the arithmetic.
    s = x - x.max(axis=dim, keepdims=True)
    s -= xp.log(xp.exp(s).sum(axis=dim, keepdims=True))
    return s


defop("softmax", _softmax,
      lambda g, ans, x, dim: ans * (g - (g * ans).sum(dim=dim, keepdim=True)),
      uses_output=True, placement="along_dim")
defop("log_softmax", _log_softmax,
      lambda g, ans, x, dim: g.apply("log_softmax_grad", ans, dim=dim),
      uses_output=True, placement="along_dim")


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
      placement="along_dim")

# ---------------------------------------------------------------- linear algebra


def _mm_operands(g, a, b):
    """Promote 1-D operands of matmul to matrices, as matmul itself does."""
    A = a.unsqueeze(0) if a.ndim == 1 else a
    B = b.unsqueeze(-1) if b.ndim == 1 else b
    G = g.unsqueeze(-2) if a.ndim == 1 else g
    G = G.unsqueeze(-1) if b.ndim == 1 else G
    return G, A, B


def _matmul_vjp_a(g, ans, a, b):
    if a.ndim == 1 and b.ndim == 1:
        return g * b
    G, A, B = _mm_operands(g, a, b)
    return unbroadcast(G @ B.mT, A.shape).reshape(a.shape)


def _matmul_vjp_b(g, ans, a, b):
    if a.ndim == 1 and b.ndim == 1:
        return g * a
    G, A, B = _mm_operands(g, a, b)
    return unbroadcast(A.mT @ G, B.shape).reshape(b.shape)


defop("matmul", lambda xp, a, b: xp.matmul(a, b), _matmul_vjp_a, _matmul_vjp_b,
      placement="matmul")

# ---------------------------------------------------------------- shape and indexing

defop("reshape", lambda xp, x, shape: xp.reshape(x, shape),
      lambda g, ans, x, shape: g.reshape(x.shape), placement="reshape")
defop("transpose", lambda xp, x, dim0, dim1: xp.swapaxes(x, dim0, dim1),
      lambda g, ans, x, dim0, dim1: g.transpose(dim0, dim1), placement="permute")
defop("permute", lambda xp, x, dims: xp.transpose(x, dims),
      lambda g, ans, x, dims: g.permute(*np.argsort([d % x.ndim for d in dims]).tolist()),
      placement="permute")
defop("squeeze", lambda xp, x, dim=None: xp.squeeze(x, axis=_squeezable(x.shape, dim)),
      lambda g, ans, x, dim=None: g.reshape(x.shape), placement="reshape")
defop("unsqueeze", lambda xp, x, dim: xp.expand_dims(x, dim),
      lambda g, ans, x, dim: g.reshape(x.shape), placement="reshape")
defop("expand", lambda xp, x, shape: xp.broadcast_to(x, _expand_shape(x.shape, shape)),
      lambda g, ans, x, shape: unbroadcast(g, x.shape), placement="expand")


def _squeezable(shape, dim):
    # PyTorch ignores a squeeze dim whose size is not 1; numpy raises.
    if dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(d for d in dims if shape[d] == 1)


def _expand_shape(shape, sizes):
    lead = len(sizes) - len(shape)
    if lead < 0:
        raise ValueError(f"expand: cannot expand shape {tuple(shape)} to {tuple(sizes)}")
    return tuple(shape[i - lead] if s == -1 else s for i, s in enumerate(sizes))


def _getitem(xp, x, index):
    out = x[index]
    if not isinstance(out, xp.ndarray) and is_basic_index(index):
        # numpy gives a scalar copy for a full integer index: take a 0-d view instead, so
        # that x[0] aliases x as it does in PyTorch.
        out = x[(index if isinstance(index, tuple) else (index,)) + (Ellipsis,)]
    return out


def _scatter_add(xp, g, shape, index):
    """Zeros of ``shape`` with ``g`` added at ``index``; repeated indices accumulate."""
    out = xp.zeros(shape, dtype=g.dtype)
    if is_basic_index(index):
        out[index] = g
    else:
        _backend.add_at(out, index, g)
    return out


defop("getitem", _getitem,
      lambda g, ans, x, index: g.scatter_add_zeros(x.shape, index), placement="getitem")
defop("scatter_add_zeros", _scatter_add,
      lambda gg, ans, g, shape, index: gg[index], placement="scatter")


def _index_put(xp, x, value, index):
    out = x.copy()
    out[index] = value
    return out


defop("index_put", _index_put,
      lambda g, ans, x, value, index: g.index_put(0, index),
      lambda g, ans, x, value, index: unbroadcast(g[index], shape_of(value)),
      placement="index_put")


def _cat_vjp(i, g, ans, *xs, dim=0):
    start = sum(x.shape[dim] for x in xs[:i])
    sl = [slice(None)] * g.ndim
    sl[dim] = slice(start, start + xs[i].shape[dim])
    return g[tuple(sl)]


def _stack_vjp(i, g, ans, *xs, dim=0):
    sl = [slice(None)] * g.ndim
    sl[dim % g.ndim] = i
    return g[tuple(sl)]


defop("cat", lambda xp, *xs, dim=0: xp.concatenate(xs, axis=dim), variadic_vjp=_cat_vjp,
      placement="cat")
defop("stack", lambda xp, *xs, dim=0: xp.stack(xs, axis=dim), variadic_vjp=_stack_vjp,
      placement="stack")

from . import collective_ops  # noqa: E402,F401  (collectives register into the same table)
from . import ops_nn  # noqa: E402,F401  (nn ops register into the same table)
