"""Tensor and Variable: an array (numpy or cupy) plus autograd state.

Every operation goes through ``apply_op``, which runs the op's registry forward and,
when a gradient is needed, records a node. ``Variable`` is a ``Tensor`` that prints
as ``Variable containing:``, as in the classic tutorial; ``.data`` is a plain
``Tensor`` sharing the same storage and version counter.

What lives elsewhere: values and version counters in ``storage``, the view and
in-place bookkeeping in ``views``, graph nodes in ``engine``, what each op is in
``ops``. Two layers above this one install themselves here: ``distgrad.autograd`` at its
import (``set_backward``: what ``Tensor.backward`` runs) and the distributed layer when a
``Cluster`` is made (``set_lazy_dispatch``: what records ops on distributed values).
"""
import collections
import numbers
import warnings

import numpy as np

from . import _backend, engine, random, views
from ._printing import format_tensor, parse_type_name, type_name
from .engine import _state as _grad_mode
from .ops.registry import NUMBER_OPERANDS, OPS, get_op
from .placement import Shard
from .storage import StaleStorage, Storage  # noqa: F401  (Storage: the distributed layer reuses its protocol)

DEFAULT_DTYPE = np.dtype(np.float32)
# Operand types that are never a GPU array (apply_op's per-operand test skips them).
_HOST_TYPES = frozenset((np.ndarray, float, int, bool))
_NUMBER_TYPES = frozenset((float, int))     # not bool: True * x keeps numpy's own rule
MaxResult = collections.namedtuple("MaxResult", ["values", "indices"])
# Set by the distributed layer: called for ops that touch a lazy (distributed) tensor.
lazy_dispatch = None


def set_lazy_dispatch(fn):
    """Install the recorder for ops on distributed values (``distgrad.distributed``).

    Example: ``set_lazy_dispatch(recorder.record_op)`` once, when that layer is imported.
    """
    global lazy_dispatch
    lazy_dispatch = fn


# Set by distgrad.autograd (a layer above) at its import: ``Tensor.backward`` calls it.
_backward = None


def set_backward(fn):
    """Install ``autograd.backward`` as what ``Tensor.backward`` runs.

    Example: ``set_backward(backward)`` at the end of ``distgrad/autograd/__init__.py``.
    """
    global _backward
    _backward = fn


def _is_tensor(x):
    return isinstance(x, Tensor)


def to_array(data, dtype=None, device=None):
    """Convert user data (lists, numbers, arrays, tensors) to an array on ``device``.

    Example: ``to_array([1.0, 2.0]).dtype == np.float32`` (Python floats become float32).
    """
    if isinstance(data, Tensor):
        arr = data._store.array
        if dtype is not None:
            arr = arr.astype(np.dtype(dtype))
    else:
        if _backend.is_cupy_array(data):
            arr = data
        else:
            arr = np.asarray(data, dtype=None if dtype is None else np.dtype(dtype))
            if dtype is None and arr.dtype == np.float64 and not isinstance(data, (np.ndarray, np.generic)):
                arr = arr.astype(DEFAULT_DTYPE)      # Python floats -> default float32
        if dtype is not None:
            arr = arr.astype(np.dtype(dtype), copy=False)
    check_dtype(arr.dtype)
    if device is not None:
        arr = _backend.to_device(arr, device)
    return arr


def check_dtype(dtype):
    """Raise ``TypeError`` for a dtype tensors cannot hold. Example: ``check_dtype(np.float32)``."""
    if np.dtype(dtype).kind not in "biuf":
        raise TypeError(f"unsupported dtype {dtype}: distgrad tensors hold bool, integer or "
                        f"floating-point numbers")


def _index_arg(index):
    """Tensors inside an index become arrays (the registry stores plain indices)."""
    if isinstance(index, tuple):
        return tuple(_index_arg(i) for i in index)
    if isinstance(index, Tensor):
        return index._store.array
    if isinstance(index, list):
        return np.asarray(index)
    return index


def apply_op(name, *inputs, **attrs):
    """Run registry op ``name`` on tensors/scalars, recording a node when needed.

    Example::

        y = apply_op("mul", x, 3)      # same as x * 3
    """
    op = OPS.get(name)
    if op is None:
        op = get_op(name)                 # the error naming the unknown op
    # One pass over the inputs: this runs for every op, so it is kept plain.
    tensors, arrays, on_host, cls = [], [], True, Tensor
    for x in inputs:
        if isinstance(x, Tensor):
            tensors.append(x)
            if isinstance(x, Variable):
                cls = Variable
            store = x._store
            if store.lazy:
                return lazy_dispatch(op, inputs, attrs)
            x = store.array
        if on_host and type(x) not in _HOST_TYPES and _backend.is_cupy_array(x):
            on_host = False
        arrays.append(x)
    if op.array_vjps and len(arrays) == 2 and on_host and len(tensors) == 1:
        # Arithmetic with a Python number: a cached 0-d array of the tensor's float dtype
        # (numpy's own cast of the number, without its per-call cost).
        a, b = arrays
        if type(b) in _NUMBER_TYPES:
            arrays[1] = NUMBER_OPERANDS[b, a.dtype]
        elif type(a) in _NUMBER_TYPES:
            arrays[0] = NUMBER_OPERANDS[a, b.dtype]
    xp = np
    if not on_host:                     # the CPU-only case skips this
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise RuntimeError(f"{name}: expected all tensors on one device, got {sorted(devices)}")
        xp = _backend.array_module(*arrays)
    try:
        # Without attrs (most arithmetic), no keyword dict is built for the call.
        out = op.forward(xp, *arrays, **attrs) if attrs else op.forward(xp, *arrays)
    except (ValueError, IndexError, TypeError) as e:
        shapes = " and ".join(str(tuple(t.shape)) for t in tensors)
        raise RuntimeError(f"{name}: cannot apply to tensors of shapes {shapes}: {e}") from None
    if type(out) is not np.ndarray:
        if not hasattr(out, "dtype") or not hasattr(out, "shape"):
            out = xp.asarray(out)
        elif not hasattr(out, "flags") and not _backend.is_cupy_array(out):
            out = np.asarray(out)          # numpy scalar -> 0-d array
    # Under no_grad (every VJP of a plain backward) no node is asked for.
    node = (engine.record_node(op, inputs, attrs, out)
            if op.differentiable and _grad_mode.grad_enabled else None)
    result = cls.__new__(cls)             # from_array(out, node, ...) without the call
    result._store = Storage(out)
    if node is not None:
        result.grad_fn, result.requires_grad = node, True
    if op.view is not None:
        views.track_view(result, inputs[0], op, attrs, out, arrays[0], xp)
    if node is not None and op.uses_output:
        # The VJP reads the output: an in-place write to it must fail backward, not corrupt it.
        node.out_store, node.out_version = result._store, result._store.version
    return result


def constant_like(t, array):
    """``array`` (``t``'s global shape, or one that broadcasts against it) as a constant
    tensor placed like ``t``: on its device, or split across the workers as ``t`` is.

    Example: ``x * constant_like(x, mask)`` (dropout's mask, the one a single process
    would draw, so a sharded run drops exactly the same elements).
    """
    store = t._store
    if not store.lazy:
        return Tensor.from_array(_backend.to_device(array, str(t.device)))
    p = store.placement
    if isinstance(p, Shard):
        return store.cluster.shard(array, dim=p.dim, sizes=p.sizes)
    return store.cluster.replicate(Tensor.from_array(array))


def legacy_new(args, dtype):
    """The data of PyTorch's legacy constructors (``Tensor(2, 3)``, ``FloatTensor([1, 2])``).

    Integers (or one ``Size``) are a shape, filled with zeros (PyTorch leaves it
    uninitialised); no argument is an empty tensor; one other argument is data, where
    Python numbers become ``dtype`` (PyTorch's float32 for ``Tensor``) and numpy arrays
    keep their own dtype. Example: ``legacy_new((2, 3), np.float32).shape == (2, 3)``.
    """
    if not args:
        return np.zeros(0, dtype)
    if isinstance(args[0], Size) and len(args) == 1 or all(
            isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_)) for a in args):
        return np.zeros(shape_args(args), dtype)
    if len(args) > 1:
        raise TypeError(f"expected integer sizes or one piece of data, got arguments of types "
                        f"{', '.join(type(a).__name__ for a in args)}")
    data = args[0]
    if isinstance(data, (np.ndarray, Tensor)) or _backend.is_cupy_array(data):
        return data
    return np.asarray(data, dtype=dtype)


def shape_args(args):
    """Accept both f(2, 3) and f((2, 3)) for shape arguments. Example: ``shape_args(((2, 3),))``."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    return tuple(args)


class Size(tuple):
    """Shape of a tensor (a tuple), printed like torch.Size."""

    def __repr__(self):
        return f"distgrad.Size({list(self)})"

    def numel(self):
        return int(np.prod(self, dtype=np.int64))


class Tensor:  # long: torch.Tensor's methods, mostly one-line apply_op calls (work: ops/)
    """An n-dimensional array on the CPU (numpy) or a GPU (cupy) with autograd support.

    Example::

        t = dg.Tensor([[1., 2.], [3., 4.]], requires_grad=True)
        (t * t).sum().backward()      # t.grad == 2 * t
    """

    __array_priority__ = 100          # numpy scalar op tensor -> our reflected method
    # The autograd fields' values for a tensor outside the graph: ``from_array`` (every
    # op's result) sets only those that differ.
    grad_fn = None
    requires_grad = False
    _grad = None
    _accum_ref = None
    _retains_grad = False
    volatile = False

    def __init__(self, data=None, *sizes, requires_grad=False, dtype=None, device=None,
                 volatile=False):
        if type(self) is Tensor and not isinstance(data, Tensor):
            # dg.Tensor(...) is PyTorch's legacy constructor: Tensor(5, 3) is a shape.
            data = legacy_new((() if data is None else (data,)) + sizes, dtype or DEFAULT_DTYPE)
        elif sizes:
            raise TypeError(f"{type(self).__name__}() takes one data argument, got "
                            f"{1 + len(sizes)} positional arguments")
        if isinstance(data, Tensor) and dtype is None and device is None:
            self._store = data._store            # share storage, as Variable(tensor) does
        else:
            self._store = Storage(to_array([] if data is None else data, dtype, device))
        self._init_autograd(None, requires_grad)
        self.volatile = bool(volatile)

    def _init_autograd(self, grad_fn, requires_grad):
        if requires_grad and grad_fn is None and not self.is_floating_point():
            raise RuntimeError(f"only floating point tensors can require gradients (got {self.dtype})")
        self.grad_fn = grad_fn
        self.requires_grad = bool(requires_grad)
        self._grad = None
        self._accum_ref = None
        self._retains_grad = False
        self.volatile = False

    @classmethod
    def from_array(cls, array, grad_fn=None, requires_grad=False):
        """A tensor on ``array`` itself (no copy, no conversion): the internal constructor.

        Example: ``Tensor.from_array(np.zeros(3))``.
        """
        t = cls.__new__(cls)
        t._store = Storage(array)
        if requires_grad:
            if grad_fn is None:
                t._init_autograd(None, True)      # a leaf: checks the dtype
                return t
            t.grad_fn = grad_fn                   # the rest: the class's defaults
            t.requires_grad = True
        elif grad_fn is not None:
            t.grad_fn = grad_fn
        return t

    @classmethod
    def from_storage(cls, store, grad_fn=None, requires_grad=False):
        """A tensor on ``store`` itself: a :class:`Storage`, or a cluster's ``LazyStorage``
        (flags as given, unchecked): how the distributed layer wraps a value it records.

        Example: ``Variable.from_storage(recorder.new_storage((4,), np.float64, REPLICATE))``.
        """
        t = cls.__new__(cls)
        t._store = store
        t._init_autograd(grad_fn, False)
        t.requires_grad = bool(requires_grad)
        return t

    @property
    def store(self):
        """Where the values live: a :class:`Storage` (``.array``, ``.version``) or, on a
        cluster, a ``LazyStorage`` (``.lazy`` is True; ``.vid``, ``.placement``, ``.cluster``).
        Read-only; :meth:`set_store` points the tensor elsewhere."""
        return self._store

    def set_store(self, store):
        """Point this tensor at ``store``, keeping its identity, flags, gradient and history:
        how a cluster moves a driver tensor onto its workers (``Cluster.replicate``)."""
        self._store = store

    # ------------------------------------------------------------ metadata
    @property
    def shape(self):
        return Size(self._store.shape)

    def size(self, dim=None):
        return self.shape if dim is None else self._store.shape[dim]

    @property
    def dtype(self):
        return self._store.dtype

    @property
    def ndim(self):
        return len(self._store.shape)

    def dim(self):
        return self.ndim

    def numel(self):
        return int(np.prod(self._store.shape, dtype=np.int64))

    nelement = numel

    @property
    def device(self):
        if self._store.lazy:
            return self._store.device
        return _backend.device_of(self._store.array)

    @property
    def is_cuda(self):
        return str(self.device).startswith("cuda")

    def is_floating_point(self):
        """Whether the dtype is a floating-point one. Example: ``dg.ones(2).is_floating_point()``."""
        store = self._store
        if not store.lazy and store.array is None:     # being constructed
            return True
        # np.issubdtype without its Python calls; no fetch for distributed values
        return issubclass(np.dtype(store.dtype).type, np.floating)

    def type(self, dtype=None, non_blocking=False):
        """The type name (``'distgrad.FloatTensor'``), or a cast to a type as in PyTorch.

        Example::

            x.type()                          # 'distgrad.FloatTensor'
            x.type(dg.DoubleTensor); x.type('torch.LongTensor'); x.type(dg.float64)
        """
        if dtype is None:
            return type_name(self.dtype, self.device)
        if isinstance(dtype, str) and "Tensor" in dtype:
            dtype, device = parse_type_name(dtype)
        elif isinstance(dtype, (type, np.dtype, str)):
            device = None
        else:                     # a legacy type object (dg.FloatTensor) carries its device
            dtype, device = dtype.dtype, dtype.device
        out = self.astype(dtype)
        if device is not None and (device == "cpu") != (str(self.device) == "cpu"):
            out = out.to(device)
        return out

    @property
    def placement(self):
        """Shard(dim) / Replicate() / Partial() for a distributed value; None for a local one."""
        return self._store.placement if self._store.lazy else None

    @property
    def is_leaf(self):
        return self.grad_fn is None

    # ------------------------------------------------------------ data and grad
    @property
    def data(self):
        """A plain tensor on the same storage, outside the graph."""
        t = Tensor.__new__(Tensor)
        t._store = self._store
        if self.requires_grad and self._store.lazy:
            # The workers' value carries the graph: cut it there as well.
            t._store = self._store.cluster.record_detach(self)
        t._init_autograd(None, False)
        return t

    @data.setter
    def data(self, value):
        value = value if isinstance(value, Tensor) else Tensor(value)
        self._store = value._store

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, value):
        if value is not None:
            value = value if isinstance(value, Tensor) else Variable(value)
            if value.shape != self.shape:
                raise RuntimeError(f"assigned grad has shape {tuple(value.shape)}, "
                                   f"but the tensor has shape {tuple(self.shape)}")
        self._grad = value

    def _accumulate_grad(self, grad, create_graph, owned=False):
        """Add a gradient into ``.grad``: the leaf's own array, never an alias of another
        (``owned``: the engine vouches that ``grad``'s array is this leaf's to keep)."""
        if self._grad is None:
            if create_graph:
                self._grad = grad if isinstance(grad, Variable) else Variable(grad)
            else:
                arr = grad._store.array
                # A copy keeps the gradient's layout (PyTorch matches it to the leaf's).
                self._grad = Variable.from_array(arr if owned else arr.copy(order="K"))
        elif create_graph or self._grad.requires_grad:
            self._grad = self._grad + grad
        else:
            self._grad._store.array += grad._store.array
            self._grad._store.version += 1

    def requires_grad_(self, requires_grad=True):
        if not self.is_leaf:
            raise RuntimeError("requires_grad_ can only change the flag of a leaf tensor")
        self.init_requires_grad(requires_grad)
        store = self._store
        if store.lazy and bool(requires_grad) != bool(store.leaves):
            # A new leaf on the workers too (the driver's flag alone would not reach them),
            # whose gradients the cluster delivers to self.grad.
            self._store = store.cluster.record_detach(self, bool(requires_grad))
        return self

    def init_requires_grad(self, flag):
        """Set ``requires_grad`` as the constructor does: checked for a floating dtype, with
        no leaf check and nothing told to a cluster (``requires_grad_`` does both)."""
        if flag and not self.is_floating_point():
            raise RuntimeError(f"only floating point tensors can require gradients (got {self.dtype})")
        self.requires_grad = bool(flag)


    def detach(self):
        """A tensor on the same storage with no history."""
        t = type(self).__new__(Variable if isinstance(self, Variable) else Tensor)
        t._store = self._store
        if self.requires_grad and self._store.lazy:
            t._store = self._store.cluster.record_detach(self)
        t._init_autograd(None, False)
        return t

    def detach_(self):
        if self.requires_grad and self._store.lazy:
            self._store = self._store.cluster.record_detach(self)
        self.grad_fn = None
        self.requires_grad = False
        return self

    def retain_grad(self):
        """Keep ``.grad`` for this non-leaf tensor after backward."""
        if self.is_leaf or self._retains_grad:
            return self
        if self._store.lazy:
            raise NotImplementedError(
                "retain_grad() on a distributed value is not supported: its gradient stays on "
                "the workers; use dg.autograd.grad(loss, [value]) to get it as a distributed value")

        def hook(g):
            # A copy: the same buffer may become a leaf's .grad, which later updates in place.
            self._grad = g.detach().clone() if self._grad is None else self._grad + g.detach()
        self.grad_fn.register_prehook(hook)
        self._retains_grad = True
        return self

    def register_hook(self, fn):
        """Call ``fn(grad)`` when this tensor's gradient is computed; a return value replaces it.

        Example::

            x.register_hook(lambda g: g * 2)
        """
        if not self.requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that doesn't require gradient")
        node = self.grad_fn if self.grad_fn is not None else engine.next_node_of(self)
        if self.grad_fn is None:
            self._hook_node = node                # keep the leaf's accumulator alive
        elif self._store.lazy:
            node.hold = self._store               # the workers must keep the hooked value
        node.register_prehook(fn)
        return fn

    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        Example::

            out = (x * x).sum(); out.backward()     # x.grad == 2 * x
        """
        _backward([self], None if gradient is None else [gradient], retain_graph, create_graph,
                 inputs=inputs)

    # ------------------------------------------------------------ conversion
    def numpy(self):
        if self.requires_grad:
            raise RuntimeError("Can't call numpy() on a tensor that requires grad. "
                               "Use tensor.detach().numpy() instead.")
        if self.is_cuda:
            raise TypeError("can't convert a cuda tensor to numpy: use .cpu() first")
        return self._store.array

    def tolist(self):
        return _backend.to_numpy(self._store.array).tolist()

    def item(self):
        if self.numel() != 1:
            raise ValueError(f"only one element tensors can be converted to Python scalars "
                             f"(got shape {tuple(self.shape)})")
        return _backend.to_numpy(self._store.array).reshape(()).item()

    def __array__(self, dtype=None, copy=None):
        a = _backend.to_numpy(self._store.array)
        return a if dtype is None else a.astype(dtype)

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __index__(self):
        if np.issubdtype(self.dtype, np.integer) and self.numel() == 1:
            return int(self.item())
        raise TypeError("only integer tensors of a single element can be converted to an index")

    def __bool__(self):
        if self.numel() != 1:
            raise RuntimeError(f"Boolean value of a tensor with {self.numel()} values is ambiguous")
        return bool(self.item())

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self._store.shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    __hash__ = object.__hash__

    def __repr__(self):
        a = _backend.to_numpy(self._store.array)
        return format_tensor(a, self.dtype, self.device, isinstance(self, Variable))

    def __format__(self, spec):
        # As PyTorch: a 0-dim tensor formats as its number ('{:.4f}'.format(loss)).
        if self.ndim == 0 or self.numel() == 1 and spec:
            return format(self.item(), spec)
        return repr(self)

    # ------------------------------------------------------------ new_* (same dtype and device)
    def new_full(self, size, fill_value, dtype=None, device=None, requires_grad=False):
        """A new tensor of ``size`` filled with a value, of this dtype and device unless given.

        Example: ``x.new_full((2, 3), 7.0)``.
        """
        xp = _backend.xp_for_device(device or self.device)
        out = Tensor.from_array(xp.full(shape_args((size,)), fill_value,
                                         dtype=np.dtype(dtype or self.dtype)))
        return out.requires_grad_(requires_grad) if requires_grad else out

    def new_zeros(self, *size, dtype=None, device=None, requires_grad=False):
        """Zeros like ``x.new_zeros(2, 3)``: this tensor's dtype and device."""
        return self.new_full(shape_args(size), 0, dtype, device, requires_grad)

    def new_ones(self, *size, dtype=None, device=None, requires_grad=False):
        """Ones like ``x.new_ones(2, 3)``: this tensor's dtype and device."""
        return self.new_full(shape_args(size), 1, dtype, device, requires_grad)

    def new_empty(self, *size, dtype=None, device=None, requires_grad=False):
        """An (initialised to zero) tensor: ``x.new_empty(2, 3)``."""
        return self.new_full(shape_args(size), 0, dtype, device, requires_grad)

    def new_tensor(self, data, dtype=None, device=None, requires_grad=False):
        """A copy of ``data`` with this tensor's dtype and device: ``x.new_tensor([1, 2])``."""
        arr = to_array(data, dtype or self.dtype, device or self.device)
        out = Tensor.from_array(arr.copy())
        return out.requires_grad_(requires_grad) if requires_grad else out

    def to(self, *args, dtype=None, device=None):
        """Move to a device and/or cast: ``t.to('cuda')``, ``t.to(dg.float64)``."""
        for a in args:
            if isinstance(a, str) and not _is_dtype_name(a):
                device = a                     # 'cpu', 'cuda:1'; anything else fails clearly
            elif isinstance(a, Tensor):
                device, dtype = a.device, a.dtype
            else:
                dtype = a
        out = self
        if dtype is not None and np.dtype(dtype) != self.dtype:
            out = out.astype(dtype)
        if device is not None and _backend.normalize_device(device) != str(out.device):
            out = apply_op("to_device", out, device=_backend.normalize_device(device))
        return out

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device=None):
        return self.to("cuda" if device is None else f"cuda:{device}")

    def astype(self, dtype):
        dtype = np.dtype(dtype)
        return self if dtype == self.dtype else apply_op("astype", self, dtype=str(dtype))

    def float(self):
        return self.astype(np.float32)

    def double(self):
        return self.astype(np.float64)

    def half(self):
        return self.astype(np.float16)

    def long(self):
        return self.astype(np.int64)

    def int(self):
        return self.astype(np.int32)

    def bool(self):
        return self.astype(np.bool_)

    # ------------------------------------------------------------ arithmetic
    def __add__(self, o): return apply_op("add", self, o)
    def __radd__(self, o): return apply_op("add", o, self)
    def __sub__(self, o): return apply_op("sub", self, o)
    def __rsub__(self, o): return apply_op("sub", o, self)
    def __mul__(self, o): return apply_op("mul", self, o)
    def __rmul__(self, o): return apply_op("mul", o, self)
    def __truediv__(self, o): return apply_op("div", self, o)
    def __rtruediv__(self, o): return apply_op("div", o, self)
    def __pow__(self, o): return apply_op("pow", self, o)
    def __rpow__(self, o): return apply_op("pow", o, self)
    def __matmul__(self, o): return apply_op("matmul", self, o)
    def __rmatmul__(self, o): return apply_op("matmul", o, self)
    def __neg__(self): return apply_op("neg", self)
    def __pos__(self): return self
    def __abs__(self): return apply_op("abs", self)
    def __lt__(self, o): return apply_op("lt", self, o)
    def __le__(self, o): return apply_op("le", self, o)
    def __gt__(self, o): return apply_op("gt", self, o)
    def __ge__(self, o): return apply_op("ge", self, o)
    def __eq__(self, o): return apply_op("eq", self, o)
    def __ne__(self, o): return apply_op("ne", self, o)
    def __and__(self, o): return apply_op("logical_and", self, o)
    def __or__(self, o): return apply_op("logical_or", self, o)
    def __invert__(self): return apply_op("logical_not", self)

    def __getitem__(self, index):
        if self.ndim == 0 and _is_zero(index):
            # PyTorch 0.4 kept 0.3's ``loss.data[0]`` working on a 0-dim loss, with this warning.
            warnings.warn("invalid index of a 0-dim tensor. Use tensor.item() to convert a 0-dim "
                          "tensor to a Python number", UserWarning, stacklevel=2)
            index = ()
        return apply_op("getitem", self, index=_index_arg(index))

    def __setitem__(self, index, value):
        self._inplace("index_put", value, index=_index_arg(index))

    def add(self, o, alpha=1): return self + (o if alpha == 1 else o * alpha)
    def sub(self, o, alpha=1): return self - (o if alpha == 1 else o * alpha)
    def mul(self, o): return self * o
    def div(self, o): return self / o
    def pow(self, o): return self ** o
    def neg(self): return -self
    def matmul(self, o): return self @ o
    mm = matmul
    def exp(self): return apply_op("exp", self)
    def log(self): return apply_op("log", self)
    def sqrt(self): return apply_op("sqrt", self)
    def abs(self): return apply_op("abs", self)
    def sin(self): return apply_op("sin", self)
    def cos(self): return apply_op("cos", self)
    def tanh(self): return apply_op("tanh", self)
    def sigmoid(self): return apply_op("sigmoid", self)
    def relu(self): return apply_op("relu", self)
    def sign(self): return apply_op("sign", self)
    def floor(self): return apply_op("floor", self)
    def clone(self): return apply_op("clone", self)
    def eq(self, o): return self == o
    def ne(self, o): return self != o
    def lt(self, o): return self < o
    def le(self, o): return self <= o
    def gt(self, o): return self > o
    def ge(self, o): return self >= o

    def clamp(self, min=None, max=None):
        return apply_op("clamp", self, min=min, max=max)

    clip = clamp

    def maximum(self, o): return apply_op("maximum", self, o)
    def minimum(self, o): return apply_op("minimum", self, o)

    def where(self, condition, other):
        """``self`` where ``condition`` holds, else ``other`` (PyTorch's ``Tensor.where``)."""
        return apply_op("where", condition, self, other)

    def masked_fill(self, mask, value):
        return apply_op("mask_fill", self, mask, value=value, invert=True)

    def _masked(self, cond, value, invert=False):
        return apply_op("mask_fill", self, cond, value=value, invert=invert)

    # ------------------------------------------------------------ reductions
    def sum(self, dim=None, keepdim=False):
        return apply_op("sum", self, dim=_dim_attr(dim), keepdim=keepdim)

    def mean(self, dim=None, keepdim=False):
        return apply_op("mean", self, dim=_dim_attr(dim), keepdim=keepdim)

    def prod(self, dim=None, keepdim=False):
        return apply_op("prod", self, dim=_dim_attr(dim), keepdim=keepdim)

    def amax(self, dim=None, keepdim=False):
        return apply_op("amax", self, dim=_dim_attr(dim), keepdim=keepdim)

    def amin(self, dim=None, keepdim=False):
        return apply_op("amin", self, dim=_dim_attr(dim), keepdim=keepdim)

    def max(self, dim=None, keepdim=False):
        """``max()`` -> scalar; ``max(dim)`` -> (values, indices); ``max(tensor)`` -> maximum."""
        if isinstance(dim, Tensor):
            return self.maximum(dim)
        if dim is None:
            return self.amax()
        return MaxResult(self.amax(dim, keepdim), self.argmax(dim, keepdim))

    def min(self, dim=None, keepdim=False):
        if isinstance(dim, Tensor):
            return self.minimum(dim)
        if dim is None:
            return self.amin()
        return MaxResult(self.amin(dim, keepdim), self.argmin(dim, keepdim))

    def argmax(self, dim=None, keepdim=False):
        return apply_op("argmax", self, dim=dim, keepdim=keepdim)

    def argmin(self, dim=None, keepdim=False):
        return apply_op("argmin", self, dim=dim, keepdim=keepdim)

    def norm(self, p=2, dim=None, keepdim=False):
        """The p-norm (default 2, Frobenius for matrices) over ``dim`` (None: all)."""
        dim = _dim_attr(dim)
        if p in (2, "fro"):
            return apply_op("norm", self, dim=dim, keepdim=keepdim)
        if p == 1:
            return self.abs().sum(dim, keepdim)
        if p == float("inf"):
            return self.abs().amax(dim, keepdim)
        return (self.abs() ** p).sum(dim, keepdim) ** (1.0 / p)

    def var(self, dim=None, unbiased=True, keepdim=False, correction=None):
        dim = _dim_attr(dim)
        correction = (1 if unbiased else 0) if correction is None else correction
        n = int(np.prod([self.shape[d] for d in _norm_dims(dim, self.ndim)], dtype=np.int64))
        d = self - self.mean(dim, keepdim=True)
        return (d * d).sum(dim, keepdim) / max(n - correction, 0)

    def std(self, dim=None, unbiased=True, keepdim=False, correction=None):
        return self.var(dim, unbiased, keepdim, correction).sqrt()

    def logsumexp(self, dim, keepdim=False):
        return apply_op("logsumexp", self, dim=_dim_attr(dim), keepdim=keepdim)

    def softmax(self, dim):
        return apply_op("softmax", self, dim=dim)

    def log_softmax(self, dim):
        return apply_op("log_softmax", self, dim=dim)

    # ------------------------------------------------------------ shape
    def reshape(self, *shape):
        shape = shape_args(shape)
        return self if shape == tuple(self.shape) else apply_op("reshape", self, shape=shape)

    view = reshape

    def view_as(self, other):
        return self.reshape(other.shape)

    reshape_as = view_as

    def flatten(self, start_dim=0, end_dim=-1):
        if self.ndim == 0:
            return self.reshape(1)
        s, e = start_dim % self.ndim, end_dim % self.ndim
        shape = tuple(self.shape)
        return self.reshape(shape[:s] + (-1,) + shape[e + 1:])

    def transpose(self, dim0, dim1):
        return apply_op("transpose", self, dim0=dim0, dim1=dim1)

    def t(self):
        if self.ndim > 2:
            raise RuntimeError(f"t() expects a tensor with <= 2 dimensions, got {self.ndim}")
        return self if self.ndim < 2 else self.transpose(0, 1)

    @property
    def T(self):
        return self.permute(*range(self.ndim - 1, -1, -1)) if self.ndim > 1 else self

    @property
    def mT(self):
        return self.transpose(-2, -1)

    def permute(self, *dims):
        return apply_op("permute", self, dims=shape_args(dims))

    def squeeze(self, dim=None):
        return apply_op("squeeze", self, dim=dim)

    def unsqueeze(self, dim):
        return apply_op("unsqueeze", self, dim=dim)

    def expand(self, *sizes):
        sizes = shape_args(sizes)
        return self if sizes == tuple(self.shape) else apply_op("expand", self, shape=sizes)

    def expand_as(self, other):
        return self.expand(other.shape)

    def contiguous(self):
        return self

    def split(self, split_size, dim=0):
        """Split into pieces of ``split_size`` (an int or a list of sizes) along ``dim``."""
        n = self.shape[dim]
        if isinstance(split_size, int):
            sizes = [min(split_size, n - s) for s in range(0, n, split_size)]
        else:
            sizes = list(split_size)
            if sum(sizes) != n:
                raise ValueError(f"split: sizes {sizes} do not add up to {n} (dim {dim})")
        out, start = [], 0
        for s in sizes:
            index = (slice(None),) * (dim % self.ndim) + (slice(start, start + s),)
            out.append(self[index])
            start += s
        return tuple(out)

    def chunk(self, chunks, dim=0):
        return self.split(-(-self.shape[dim] // chunks), dim)

    def apply(self, op_name, *others, **attrs):
        """Apply registry op ``op_name`` with this tensor as first input."""
        return apply_op(op_name, self, *others, **attrs)

    def apply_(self, op_name, *others, **attrs):
        """``apply`` written into this tensor in place (the op must declare ``inplace=``).

        Example: ``x.apply_("hardtanh", min_val=-1.0, max_val=1.0)`` (``F.hardtanh(x, inplace=True)``).
        """
        return self._inplace(op_name, *others, **attrs)

    def scatter_add_zeros(self, shape, index):
        return apply_op("scatter_add_zeros", self, shape=tuple(shape), index=index)

    def index_put(self, value, index):
        return apply_op("index_put", self, value, index=index)

    # ------------------------------------------------------------ in place
    def _inplace(self, name, *args, **attrs):
        recording = engine.is_grad_enabled()
        if self.requires_grad and self.is_leaf and recording:
            raise RuntimeError(f"a leaf Variable that requires grad is being used in an in-place "
                               f"operation ({name}); wrap it in dg.no_grad() or use .data")
        view = getattr(self, "_view_of", None)
        if view is not None and recording:
            root = views.view_root(self)
            if root.requires_grad and root.is_leaf:
                raise RuntimeError(f"a view of a leaf Variable that requires grad is being used in "
                                   f"an in-place operation ({name}); wrap it in dg.no_grad()")
        op = get_op(name)
        if not op.inplace:
            raise NotImplementedError(f"op '{name}' has no in-place form: declare inplace= in its "
                                      f"defop ({op.defined_at[0]})")
        if self._fast_inplace(op, recording, args, attrs):
            return self
        src = self
        if recording and op.snapshot and (self.requires_grad or any(
                isinstance(a, Tensor) and a.requires_grad for a in args)):
            # The VJP reads the value before the write (mul_, pow_, clamp_...): save a copy
            # that carries this tensor's history, not the storage about to be overwritten.
            if self._store.lazy:
                src = self.clone()      # recorded: the workers keep the copy, not the driver
            else:
                src = Tensor.from_array(self._store.array.copy(), grad_fn=self.grad_fn,
                                         requires_grad=self.requires_grad)
                src._accum_ref = self._accum_ref
        result = apply_op(name, src, *args, **attrs)
        self.overwrite(result, name)
        if result.grad_fn is not None and views.is_view_or_viewed(self):
            views.rebase(self)
        return self

    def _fast_inplace(self, op, recording, args, attrs):
        """Run the op's own in-place kernel when there is no graph to record and every
        operand is a local array on this device; False means take the general path."""
        store = self._store
        if op.kernel is None or store.lazy:
            return False
        if recording and (self.requires_grad or any(isinstance(a, Tensor) and a.requires_grad
                                                    for a in args)):
            return False
        arr = store.array
        if getattr(arr, "flags", None) is not None and not arr.flags.writeable:
            return False
        others = []
        for a in args:
            if isinstance(a, Tensor):
                if a._store.lazy or a.device != self.device:
                    return False
                a = a._store.array
            others.append(a)
        try:
            # numpy checks casting and broadcasting before it writes anything.
            op.kernel(_backend.array_module(arr), arr, *others, **attrs)
        except (TypeError, ValueError):
            return False        # the general path raises the error with a clear message
        store.version += 1
        return True

    def overwrite(self, result, name):
        """Copy ``result`` into this tensor's storage and take over its history: how every
        in-place op ends (``name`` says which, in errors). A worker applies an ``assign``
        with it."""
        store = self._store
        if store.lazy:
            store.assign(result)
        else:
            if tuple(result.shape) != tuple(store.shape):
                raise RuntimeError(f"{name}_: result of shape {tuple(result.shape)} cannot be written "
                                   f"in place into a tensor of shape {tuple(store.shape)}")
            if not np.can_cast(result.dtype, store.dtype, "same_kind"):
                raise RuntimeError(f"{name}_: result type {result.dtype} can't be cast to the "
                                   f"desired output type {store.dtype}")
            arr = store.array
            if getattr(arr, "flags", None) is not None and not arr.flags.writeable:
                store.array = result._store.array.astype(store.dtype, copy=True)
                views.detach_from_base(self)      # no longer shares memory with a base
            else:
                arr[...] = result._store.array
        store.version += 1
        if result.grad_fn is not None:
            self.grad_fn = result.grad_fn
            self.requires_grad = True


    def add_(self, o, alpha=1): return self._inplace("add", o if alpha == 1 else o * alpha)
    def sub_(self, o, alpha=1): return self._inplace("sub", o if alpha == 1 else o * alpha)
    def mul_(self, o): return self._inplace("mul", o)
    def div_(self, o): return self._inplace("div", o)
    def pow_(self, o): return self._inplace("pow", o)
    def clamp_(self, min=None, max=None): return self._inplace("clamp", min=min, max=max)
    def exp_(self): return self._inplace("exp")
    def sqrt_(self): return self._inplace("sqrt")
    def neg_(self): return self._inplace("neg")
    def relu_(self): return self._inplace("relu")
    # a*self + b*o in one op (distgrad/ops/fused.py "axpby"): optimizers' fused update, one dispatch.
    def axpby(self, o, a=1.0, b=1.0): return apply_op("axpby", self, o, a=a, b=b)
    def axpby_(self, o, a=1.0, b=1.0): return self._inplace("axpby", o, a=a, b=b)
    __iadd__ = add_
    __isub__ = sub_
    __imul__ = mul_
    __itruediv__ = div_

    def zero_(self):
        return self.fill_(0)

    def fill_(self, value):
        return self._inplace("mask_fill", True, value=value, invert=True)

    def copy_(self, src):
        src = src if isinstance(src, Tensor) else Tensor(src)
        if src.device != self.device and not self._store.lazy:
            src = src.to(self.device)
        return self._inplace("copy_from", src)

    def uniform_(self, a=0.0, b=1.0):
        return self._inplace_random(random.uniform(self.shape, a, b))

    def normal_(self, mean=0.0, std=1.0):
        return self._inplace_random(random.normal(self.shape, mean, std))

    def _inplace_random(self, values):
        with engine.no_grad():
            return self.copy_(Tensor.from_array(values).astype(self.dtype))


class Variable(Tensor):
    """A tensor in the classic autograd API: ``Variable(tensor, requires_grad=True)``.

    Example::

        x = Variable(dg.ones(2, 2), requires_grad=True)
        (x + 2).mean().backward()
    """

    def __init__(self, data=None, requires_grad=False, volatile=False, dtype=None, device=None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype, device=device)
        self.volatile = bool(volatile)


def _is_zero(index):
    return type(index) is int and index == 0 or (
        isinstance(index, tuple) and len(index) == 1 and type(index[0]) is int and index[0] == 0)


def _is_dtype_name(s):
    try:
        np.dtype(s)
        return True
    except TypeError:
        return False


def _dim_attr(dim):
    """dims as int, tuple or None (lists become tuples so programs hash the same)."""
    if isinstance(dim, list):
        return tuple(dim)
    if isinstance(dim, Tensor):
        return int(dim.item())
    return dim


def _norm_dims(dim, ndim):
    if dim is None:
        return tuple(range(ndim))
    return tuple(d % ndim for d in ((dim,) if isinstance(dim, numbers.Integral) else dim))


engine.register_tensor_type(Tensor, Variable)
