"""Tensor factories: ``dg.ones``, ``dg.randn``, ``dg.tensor``, ``dg.FloatTensor`` ..."""
import functools
import warnings

import numpy as np

from . import _backend, random
from . import engine
from .tensor import DEFAULT_DTYPE, Tensor, apply_op, check_dtype, legacy_new, shape_args, to_array


def _make(array, dtype, device, requires_grad):
    if dtype is not None:
        array = array.astype(np.dtype(dtype), copy=False)
    if device is not None and _backend.normalize_device(device) != "cpu":
        array = _backend.to_device(array, device)
    t = Tensor.from_array(array)
    if requires_grad:
        t.init_requires_grad(True)
    return t


def _factory(np_fn, doc):
    def make(*size, dtype=None, device=None, requires_grad=False):
        return _make(np_fn(shape_args(size), dtype or DEFAULT_DTYPE), dtype, device, requires_grad)
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
    return _make(random.normal(shape_args(size)), dtype, device, requires_grad)


def rand(*size, dtype=None, device=None, requires_grad=False):
    """Uniform samples in [0, 1). Example: ``dg.rand(3)``."""
    return _make(random.uniform(shape_args(size)), dtype, device, requires_grad)


def randint(low, high=None, size=(), dtype=None, device=None, generator=None):
    """Random integers in [low, high). Example: ``dg.randint(0, 10, (5,))``."""
    if high is None:
        low, high = 0, low
    return _make(random.integers(low, high, size, generator=generator), dtype,
                 device, False)


def randperm(n, device=None, generator=None, dtype=None):
    """A random permutation of 0..n-1. Example: ``dg.randperm(5, generator=g)``."""
    return _make(random.permutation(n, generator).astype(np.int64), dtype, device, False)


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
    arr = to_array(data, dtype, device)
    if isinstance(data, (Tensor, np.ndarray)) or _backend.is_cupy_array(data):
        arr = arr.copy()
    t = Tensor.from_array(arr)
    if requires_grad:
        t.init_requires_grad(True)
    return t


def from_numpy(a):
    """A tensor sharing memory with a numpy array. Example: ``dg.from_numpy(np.ones(3))``."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"from_numpy expects a numpy.ndarray, got {type(a).__name__}")
    check_dtype(a.dtype)
    return Tensor.from_array(a)


class TensorType:
    """A legacy tensor type (``dg.FloatTensor``, ``dg.cuda.LongTensor``...), as in PyTorch:
    a constructor, a cast target for ``t.type(...)`` and a type for ``isinstance``.

    ``FloatTensor(2, 3)`` is a (zero-filled) 2x3 tensor, ``FloatTensor([1, 2])`` one made
    of data (Python numbers cast to the type; numpy arrays too).

    Example::

        x = dg.FloatTensor(2, 3); y = dg.LongTensor([1, 2])
        isinstance(y, dg.LongTensor)            # True
        x.type(dg.DoubleTensor).dtype           # float64
    """

    def __init__(self, dtype, name, device="cpu"):
        self.dtype, self.device = np.dtype(dtype), device
        self.__name__ = self.__qualname__ = name

    def __call__(self, *args, device=None):
        data = legacy_new(args, self.dtype)
        return Tensor(data, dtype=self.dtype, device=device or self.device)

    def __instancecheck__(self, obj):
        return (isinstance(obj, Tensor) and obj.dtype == self.dtype
                and str(obj.device).startswith(self.device))

    def __repr__(self):
        prefix = "distgrad.cuda." if self.device == "cuda" else "distgrad."
        return f"<class '{prefix}{self.__name__}'>"


def legacy_types(device):
    """The legacy type objects of one device, by name (``{"FloatTensor": TensorType(...)}``)."""
    names = {"FloatTensor": np.float32, "DoubleTensor": np.float64, "HalfTensor": np.float16,
             "LongTensor": np.int64, "IntTensor": np.int32, "ShortTensor": np.int16,
             "CharTensor": np.int8, "ByteTensor": np.uint8, "BoolTensor": np.bool_}
    return {name: TensorType(dtype, name, device) for name, dtype in names.items()}


globals().update(legacy_types("cpu"))


def full_like(t, fill_value, dtype=None, device=None, requires_grad=False):
    """A tensor shaped like ``t`` filled with a value. Example: ``dg.full_like(x, 2.0)``.

    On a distributed ``t`` the result is made on the workers (optimizer state stays there).
    """
    if t.store.lazy:
        out = apply_op("full_like", t, value=fill_value, dtype=None if dtype is None else str(np.dtype(dtype)))
    else:
        out = full(t.shape, fill_value, dtype=dtype or t.dtype, device=device or t.device)
    if requires_grad:
        out.init_requires_grad(True)
    return out


def zeros_like(t, dtype=None, device=None, requires_grad=False):
    """Zeros shaped like ``t``. Example: ``dg.zeros_like(x)``."""
    return full_like(t, 0, dtype, device, requires_grad)


def ones_like(t, dtype=None, device=None, requires_grad=False):
    """Ones shaped like ``t``. Example: ``dg.ones_like(x)``."""
    return full_like(t, 1, dtype, device, requires_grad)


def randn_like(t, dtype=None, device=None, requires_grad=False):
    return randn(*t.shape, dtype=dtype or t.dtype, device=device or t.device, requires_grad=requires_grad)


def rand_like(t, dtype=None, device=None, requires_grad=False):
    """Uniform samples shaped like ``t``. Example: ``dg.rand_like(x)``."""
    return rand(*t.shape, dtype=dtype or t.dtype, device=device or t.device, requires_grad=requires_grad)


def bmm(a, b):
    """Batched matrix product of (b, n, m) and (b, m, p). Example: ``dg.bmm(a, b)``."""
    if a.ndim != 3 or b.ndim != 3:
        raise RuntimeError(f"bmm: expected 3-D tensors, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return apply_op("matmul", a, b)


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


def _method(name):
    def fn(x, *args, **kwargs):
        return getattr(x, name)(*args, **kwargs)
    fn.__name__ = name
    fn.__doc__ = f"``dg.{name}(x, ...)`` is ``x.{name}(...)``; ``out=`` as in PyTorch."
    return fn


# Functions that are the first argument's method (dg.add(x, y) is x.add(y)).
_UNARY = ["exp", "log", "sqrt", "abs", "sin", "cos", "tanh", "sigmoid", "relu", "sum", "mean",
           "prod", "norm", "var", "std", "logsumexp", "softmax", "log_softmax", "max", "min",
           "amax", "amin", "argmax", "argmin", "clamp", "reshape", "transpose", "permute",
           "squeeze", "unsqueeze", "flatten", "split", "chunk", "sign", "floor", "clone", "t",
           "add", "sub", "mul", "div", "pow", "neg", "mm"]
for _n in _UNARY:
    globals()[_n] = _method(_n)


def _write_out(result, out, name):
    """Write ``result`` into the caller's ``out=`` tensor(s) as PyTorch does; return ``out``."""
    if isinstance(out, (tuple, list)):
        results = result if isinstance(result, tuple) else (result,)
        if len(out) != len(results):
            raise TypeError(f"{name}(): out= needs {len(results)} tensors, got {len(out)}")
        return type(out)(_write_out(r, o, name) for r, o in zip(results, out))
    if not isinstance(out, Tensor):
        raise TypeError(f"{name}(): out= must be a distgrad tensor, got {type(out).__name__}")
    if result.requires_grad and engine.is_grad_enabled():
        raise RuntimeError(f"{name}(): functions with out=... arguments don't support automatic "
                           "differentiation, but one of the arguments requires grad")
    if not np.can_cast(result.dtype, out.dtype, "same_kind"):
        raise RuntimeError(f"{name}(): result type {result.dtype} can't be cast to the desired "
                           f"output type {out.dtype}")
    with engine.no_grad():
        if tuple(out.shape) == tuple(result.shape):
            out.copy_(result)
        else:
            if out.numel():
                warnings.warn(f"{name}(): an output with one or more elements was resized since "
                              f"it had shape {tuple(out.shape)}, which does not match the "
                              f"required output shape {tuple(result.shape)}", UserWarning,
                              stacklevel=3)
            out.data = result.astype(out.dtype).clone()
    return out


def _with_out(fn):
    """``fn`` with PyTorch's ``out=`` keyword (the result is written into ``out``)."""
    @functools.wraps(fn)
    def wrapper(*args, out=None, **kwargs):
        result = fn(*args, **kwargs)
        return result if out is None else _write_out(result, out, fn.__name__)
    return wrapper


_OUT = ["zeros", "ones", "empty", "full", "randn", "rand", "randint", "randperm", "arange",
        "linspace", "eye", "cat", "stack", "where", "maximum", "minimum", "matmul", "bmm"] + _UNARY
for _n in _OUT:
    globals()[_n] = _with_out(globals()[_n])

__all__ = ["zeros", "ones", "empty", "full", "randn", "rand", "randint", "randperm", "arange",
           "linspace", "eye", "tensor", "from_numpy", "FloatTensor", "DoubleTensor", "HalfTensor",
           "LongTensor", "IntTensor", "ShortTensor", "CharTensor", "BoolTensor", "ByteTensor",
           "full_like", "zeros_like", "ones_like",
           "randn_like", "rand_like", "cat", "stack", "where", "maximum", "minimum", "matmul", "bmm",
           "TensorType"] + _UNARY
