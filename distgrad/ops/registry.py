"""The op registry: one ``defop`` call holds every fact about an op.

This module is the bottom of the op stack and imports nothing of distgrad. The op
families (``math``, ``shape``, ``linalg``, ``nn``, ``collective``, ``fused`` in this
package) register into ``OPS``; the eager engine, the distributed recorder, the
workers and the tests all read that one table.

A fact an op declares here is read from here and nowhere else:

- ``forward(xp, *inputs, **attrs)`` returns an array (``xp`` is numpy or cupy);
- ``vjps[i](g, ans, *inputs, **attrs)`` is input i's gradient, written with tensor
  methods so that ``create_graph=True`` differentiates it again (``variadic_vjp(i, ...)``
  for ops taking any number of inputs). A missing VJP is an error naming the op;
  ``array_vjps``: the VJPs are plain arithmetic that runs on raw arrays too (a plain
  backward calls them so);
- ``placement``: the rule (a function from ``distgrad.placement`` or one defined beside
  the op) mapping input placements to the output placement;
- ``linear_in``: through which inputs a ``Partial`` (per-worker sum) value may flow
  without being all-reduced first;
- ``view``: for ops whose output may be a view of input 0, how an in-place write
  through that view hands its gradient back to the base;
- ``inplace`` / ``snapshot``: whether ``x.<op>_()`` exists, its fast kernel, and
  whether the VJP reads x's old value (so a recorded in-place call saves a copy);
- recorder facts: ``device_attr`` (the attr naming the output's device) and
  ``divides_by_count`` (a sum divided by the number of reduced elements).

``tests/test_registry.py`` walks the table and names any op missing a fact.
"""
import math
import sys

import numpy as np

OPS = {}

# linear_in values: how a Partial value may pass through the op (see OpDef).
LINEAR_ALL = "all"       # linear in every input, while the others are Replicate
LINEAR_EACH = "each"     # linear in each input alone (a product): one Partial at most
LINEAR_SUM = "sum"       # a sum of its inputs: stays Partial only when every input is Partial
_LINEAR_KINDS = (None, LINEAR_ALL, LINEAR_EACH, LINEAR_SUM)


class OpDef:
    """Everything known about one op (see the module docstring for each fact)."""

    __slots__ = ("name", "forward", "vjps", "variadic_vjp", "differentiable", "uses_output",
                 "placement", "linear_in", "view", "inplace", "snapshot", "device_attr",
                 "divides_by_count", "defined_at", "array_vjps")

    def __init__(self, name, forward, vjps=(), variadic_vjp=None, differentiable=True,
                 uses_output=False, placement=None, linear_in=None, view=None, inplace=None,
                 snapshot=None, device_attr=None, divides_by_count=False, defined_at=("?", 0),
                 array_vjps=False):
        self.name = name
        self.forward = forward
        self.vjps = tuple(vjps)
        self.variadic_vjp = variadic_vjp
        self.differentiable = differentiable
        self.uses_output = uses_output
        self.placement = placement
        self.linear_in = linear_in
        self.view = view
        self.inplace = inplace
        self.snapshot = snapshot
        self.device_attr = device_attr
        self.divides_by_count = divides_by_count
        self.defined_at = defined_at
        self.array_vjps = array_vjps

    def vjp(self, i, g, ans, inputs, attrs):
        if self.variadic_vjp is not None:
            return self.variadic_vjp(i, g, ans, *inputs, **attrs)
        fn = self.vjps[i] if i < len(self.vjps) else None
        if fn is None:
            raise NotImplementedError(f"op '{self.name}' has no VJP registered for input {i}")
        return fn(g, ans, *inputs, **attrs)

    @property
    def kernel(self):
        """The in-place kernel ``kernel(xp, x, *others, **attrs)``, or None."""
        return self.inplace if callable(self.inplace) else None

    def __repr__(self):
        return f"OpDef({self.name!r})"


def defop(name, forward, *vjps, variadic_vjp=None, differentiable=True, uses_output=False,
          placement=None, linear_in=None, view=None, inplace=None, snapshot=None,
          device_attr=None, divides_by_count=False, array_vjps=False):
    """Register an op with all its facts; returns its ``OpDef``. Example::

        defop("exp", lambda xp, x: xp.exp(x), lambda g, ans, x: g * ans, uses_output=True,
              placement=P.rule_elementwise, inplace=True, snapshot=False)

    ``placement`` is required for the op to run on distributed values (the registry test
    fails without it). ``linear_in`` is None (the default: Partial inputs are all-reduced
    first), ``LINEAR_ALL``, ``LINEAR_EACH``, ``LINEAR_SUM`` or a tuple of input indices.
    ``view(base, out, attrs) -> (op name, inputs, attrs)`` is given when the output may
    be a view of input 0: the op that maps a gradient of the view onto the base after an
    in-place write through the view (``out`` is the view). ``inplace`` is True, or the
    kernel ``inplace(xp, x, *others, **attrs)`` that writes into ``x`` itself when no
    graph is recorded (optimizer steps: no temporary, no copy); with it, ``snapshot``
    says whether the VJP reads input 0's value from before the write. ``array_vjps=True``
    says the VJPs use only arithmetic operators and this module's helpers, so they run on
    raw arrays as well: a plain backward (no ``create_graph``) calls them so, without a
    tensor per intermediate gradient (one VJP per input, no ``variadic_vjp``, no
    keyword-only attrs other than the op's own).
    """
    if name in OPS:
        raise ValueError(f"op '{name}' is already registered")
    if linear_in not in _LINEAR_KINDS and not isinstance(linear_in, tuple):
        raise ValueError(f"op '{name}': linear_in must be one of {_LINEAR_KINDS} or a tuple of "
                         f"input indices, got {linear_in!r}")
    caller = sys._getframe(1)
    OPS[name] = OpDef(name, forward, vjps, variadic_vjp, differentiable, uses_output, placement,
                      linear_in, view, inplace, snapshot, device_attr, divides_by_count,
                      (caller.f_code.co_filename, caller.f_lineno), array_vjps)
    return OPS[name]


def get_op(name):
    """The ``OpDef`` registered as ``name``. Example: ``get_op("mul").linear_in``."""
    try:
        return OPS[name]
    except KeyError:
        raise NotImplementedError(f"unknown op '{name}': no such op in the registry") from None


# ---------------------------------------------------------------- helpers for op definitions

def shape_of(x):
    """The shape of a tensor or array, ``()`` for a Python number. Example: ``shape_of(2.0)``."""
    shape = getattr(x, "shape", None)     # one read: a tensor's shape is a property
    return () if shape is None else tuple(shape)


class _NumberOperands(dict):
    """number_operand's cache, (Python number, float dtype) -> read-only 0-d array: a dict
    whose miss computes the answer, so a hit is one lookup and no Python call."""

    def __missing__(self, key):
        x, dtype = key
        if dtype.kind != "f" or not x or x != x or type(x) is int and not -2 ** 53 < x < 2 ** 53:
            return x
        with np.errstate(over="ignore"):
            arr = np.asarray(x, dtype)
        if not np.isfinite(arr):
            return x
        arr.flags.writeable = False
        if len(self) >= 4096:           # a program making ever new numbers: start again
            self.clear()
        self[key] = arr
        return arr


NUMBER_OPERANDS = _NumberOperands()


def number_operand(x, dtype):
    """A Python number as numpy uses it against an array of floating ``dtype`` (NEP 50: cast
    to that dtype), as a cached read-only 0-d array: the same result, without numpy's
    per-call conversion of a Python number, which costs more than the op on a small array.
    ``x`` itself where the cast could differ: not a float dtype, zero (its sign), or a value
    that does not fit the dtype. The per-op paths read ``NUMBER_OPERANDS[x, dtype]``, the
    same answer without this call.

    Example: ``number_operand(0.5, np.dtype(np.float32))`` is ``array(0.5, dtype=float32)``.
    """
    return NUMBER_OPERANDS[x, dtype]


def unbroadcast_to(g, x):
    """Sum ``g`` down to the shape of ``x`` (a tensor, an array or a Python number):
    ``unbroadcast(g, shape_of(x))`` in one call, ``g`` itself when the shapes match.

    Example: ``unbroadcast_to(g * b, a)`` in mul's VJP for ``a``.
    """
    shape = getattr(x, "shape", ())
    if g.shape == shape:
        return g
    return unbroadcast(g, shape)


def unbroadcast(g, shape):
    """Sum ``g`` down to ``shape``: the one place broadcasting is undone.

    Example: ``unbroadcast(g, (3,))`` for a gradient ``g`` of shape (2, 3).
    """
    shape = tuple(shape)
    gshape = g.shape
    if gshape == shape:                   # the common case: nothing was broadcast
        return g
    lead = g.ndim - len(shape)
    dims = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape)
                                     if n == 1 and gshape[i + lead] != 1)
    if dims:
        # A tensor, or a raw array in a plain backward (``array_vjps``).
        g = (g.sum(dim=dims, keepdim=True) if hasattr(g, "requires_grad")
             else g.sum(axis=dims, keepdims=True))
    return g.reshape(shape)


def axes(dim, ndim):
    """A ``dim`` attr as sorted non-negative axes (None: all). Example: ``axes(-1, 3) == (2,)``."""
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(sorted(d % ndim if ndim else 0 for d in dims))


def np_axis(dim):
    """A ``dim`` attr as numpy's ``axis`` argument. Example: ``np_axis([0, 1]) == (0, 1)``."""
    return tuple(dim) if isinstance(dim, (list, tuple)) else dim


def keep(g, in_shape, dim, keepdim):
    """Reshape a reduction's gradient so it broadcasts against the input again.

    Example: ``keep(g, (2, 3), 1, False)`` gives g of shape (2,) the shape (2, 1).
    """
    if keepdim or dim is None and g.ndim == len(in_shape):
        return g
    shape = list(in_shape)
    for d in axes(dim, len(in_shape)):
        shape[d] = 1
    return g.reshape(tuple(shape))


def count(shape, dim):
    """How many elements a reduction over ``dim`` combines. Example: ``count((2, 3), 1) == 3``."""
    return int(np.prod([shape[d] for d in axes(dim, len(shape))], dtype=np.int64))


def log(x):
    """Natural log of a tensor or a Python number. Example: ``log(2.0)``."""
    return x.log() if hasattr(x, "log") else math.log(x)


def is_basic_index(index):
    """True for indices made only of ints, slices, None and Ellipsis (no scatter needed).

    Example: ``is_basic_index((0, slice(None)))`` is True; an array index is not.
    """
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, np.integer, slice)) for i in items)
