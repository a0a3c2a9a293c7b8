"""Tensor factories: ``dg.ones``, ``dg.randn``, ``dg.tensor``, ``dg.FloatTensor`` ..."""
import numpy as np

from . import _backend, random
from .tensor import DEFAULT_DTYPE, Tensor, _dims, apply_op


def _make(array, dtype, device, requires_grad):
    if dtype is not None:
        array = array.astype(np.dtype(dtype), copy=False)
    if device is not None and _backend.normalize_device(device) != "cpu":
        array = _backend.to_device(array, device)
    t = Tensor._from_array(array)
    if requires_grad:
        t._init_requires_grad(True)
    return t


def _factory(np_fn, doc):
    def make(*size, dtype=None, device=None, requires_grad=False):
        return _make(np_fn(_dims(size), dtype or DEFAULT_DTYPE), dtype, device, requires_grad)
    make.__doc__ = doc
    return make


zeros = _factory(np.zeros, "Zeros of the given size. Example: ``dg.zeros(2, 3)``.")
ones = _factory(np.ones, "Ones of the given size. Example: ``dg.ones(2, 2)``.")
empty = _factory(np.zeros, "An (initialised to zero) tensor of the given size. Example: ``dg.empty(3)``.")


def full(size, fill_value, dtype=None, device=None, requires_grad=False):
    """A tensor filled with one value. Example: ``dg.full((2, 2), 7.0)``."""
    return _make(np.full(tuple(size), fill_value, dtype=dtype or DEFAULT_DTYPE), dtype, device,
                 requires_grad)


def randn(*size, dtype=None, device=None, requires_grad=False):
    """Standard normal samples. Example: ``dg.randn(3, 4)``."""
    return _make(random.normal(_dims(size))._store.array, dtype, device, requires_grad)


def rand(*size, dtype=None, device=None, requires_grad=False):
    """Uniform samples in [0, 1). Example: ``dg.rand(3)``."""
    return _make(random.uniform(_dims(size))._store.array, dtype, device, requires_grad)


def randint(low, high=None, size=(), dtype=None, device=None):
    """Random integers in [low, high). Example: ``dg.randint(0, 10, (5,))``."""
    if high is None:
        low, high = 0, low
    return _make(random.integers(low, high, size)._store.array, dtype, device, False)


def randperm(n, device=None):
    """A random permutation of 0..n-1. Example: ``dg.randperm(5)``."""
    return _make(random.permutation(n).astype(np.int64), None, device, False)


def arange(start, end=None, step=1, dtype=None, device=None, requires_grad=False):
    """Evenly spaced values. Example: ``dg.arange(5)``; ints give int64, floats float32."""
    if end is None:
        start, end = 0, start
    a = np.arange(start, end, step)
    if dtype is None and a.dtype == np.float64:
        a = a.astype(DEFAULT_DTYPE)
    return _make(a, dtype, device, requires_grad)


def linspace(start, end, steps, dtype=None, device=None, requires_grad=False):
    """``steps`` evenly spaced values from start to end. Example: ``dg.linspace(0, 1, 5)``."""
    return _make(np.linspace(start, end, steps).astype(dtype or DEFAULT_DTYPE), dtype, device,
                 requires_grad)


def eye(n, m=None, dtype=None, device=None, requires_grad=False):
    """Identity matrix. Example: ``dg.eye(3)``."""
    return _make(np.eye(n, m, dtype=dtype or DEFAULT_DTYPE), dtype, device, requires_grad)


def tensor(data, dtype=None, device=None, requires_grad=False):
    """A new tensor (a copy) from data. Example: ``dg.tensor([[1., 2.], [3., 4.]])``.

    Python floats give float32; Python ints int64; numpy arrays keep their dtype.
    """
    t = Tensor(data, dtype=dtype, device=device)
    if isinstance(data, (Tensor, np.ndarray)) or _backend.is_cupy_array(data):
        t = Tensor._from_array(t._store.array.copy())
    if requires_grad:
        t._init_requires_grad(True)
    return t


def from_numpy(a):
    """A tensor sharing memory with a numpy array. Example: ``dg.from_numpy(np.ones(3))``."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"from_numpy expects a numpy.ndarray, got {type(a).__name__}")
    from .tensor import _check_dtype
    _check_dtype(a.dtype)
    return Tensor._from_array(a)


def _typed(dtype, name):
    def make(*args, device=None):
        """A tensor of this type from a list (``FloatTensor([1, 2])``) or a size (``FloatTensor(2, 3)``)."""
        if len(args) == 1 and not isinstance(args[0], (int, np.integer)):
            return Tensor(args[0], dtype=dtype, device=device)
        return _make(np.zeros(_dims(args), dtype=dtype), None, device, False)
    make.__name__ = make.__qualname__ = name
    return make


FloatTensor = _typed(np.float32, "FloatTensor")
DoubleTensor = _typed(np.float64, "DoubleTensor")
LongTensor = _typed(np.int64, "LongTensor")
IntTensor = _typed(np.int32, "IntTensor")
BoolTensor = _typed(np.bool_, "BoolTensor")
ByteTensor = _typed(np.uint8, "ByteTensor")


def full_like(t, fill_value, dtype=None, device=None, requires_grad=False):
    """A tensor shaped like ``t`` filled with a value. Example: ``dg.full_like(x, 2.0)``.

    On a distributed ``t`` the result is made on the workers (optimizer state stays there).
    """
    if t._store.lazy:
        out = apply_op("full_like", t, value=fill_value, dtype=None if dtype is None else str(np.dtype(dtype)))
    else:
        out = full(t.shape, fill_value, dtype=dtype or t.dtype, device=device or t.device)
    if requires_grad:
        out._init_requires_grad(True)
    return out


def zeros_like(t, dtype=None, device=None, requires_grad=False):
    """Zeros shaped like ``t``. Example: ``dg.zeros_like(x)``."""
    return full_like(t, 0, dtype, device, requires_grad)


def ones_like(t, dtype=None, device=None, requires_grad=False):
    """Ones shaped like ``t``. Example: ``dg.ones_like(x)``."""
    return full_like(t, 1, dtype, device, requires_grad)


def randn_like(t, dtype=None, device=None, requires_grad=False):
    return randn(*t.shape, dtype=dtype or t.dtype, device=device or t.device, requires_grad=requires_grad)


def cat(tensors, dim=0):
    """Concatenate along ``dim``. Example: ``dg.cat([a, b], dim=0)``."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat: expected a non-empty list of tensors")
    return apply_op("cat", *tensors, dim=dim)


def stack(tensors, dim=0):
    """Stack along a new ``dim``. Example: ``dg.stack([a, b])``."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack: expected a non-empty list of tensors")
    return apply_op("stack", *tensors, dim=dim)


def where(condition, x, y):
    """Elementwise ``x if condition else y``. Example: ``dg.where(a > 0, a, 0)``."""
    return apply_op("where", condition, x, y)


def maximum(a, b):
    return apply_op("maximum", a, b)


def minimum(a, b):
    return apply_op("minimum", a, b)


def matmul(a, b):
    return apply_op("matmul", a, b)


def _unary(name):
    def fn(x, *args, **kwargs):
        return getattr(x, name)(*args, **kwargs)
    fn.__name__ = name
    fn.__doc__ = f"``dg.{name}(x)`` is ``x.{name}()``."
    return fn


_UNARY = ["exp", "log", "sqrt", "abs", "sin", "cos", "tanh", "sigmoid", "relu", "sum", "mean",
           "prod", "norm", "var", "std", "logsumexp", "softmax", "log_softmax", "max", "min",
           "amax", "amin", "argmax", "argmin", "clamp", "reshape", "transpose", "permute",
           "squeeze", "unsqueeze", "flatten", "split", "chunk", "sign", "floor", "clone", "t"]
for _n in _UNARY:
    globals()[_n] = _unary(_n)

__all__ = ["zeros", "ones", "empty", "full", "randn", "rand", "randint", "randperm", "arange",
           "linspace", "eye", "tensor", "from_numpy", "FloatTensor", "DoubleTensor", "LongTensor",
           "IntTensor", "BoolTensor", "ByteTensor", "full_like", "zeros_like", "ones_like",
           "randn_like", "cat", "stack", "where", "maximum", "minimum", "matmul"] + _UNARY
