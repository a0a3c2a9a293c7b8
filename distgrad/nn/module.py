"""``Module`` and the containers (``Sequential``, ``ModuleList``, ``ModuleDict``); ``Parameter``
(defined in ``distgrad/parameter.py``) is re-exported here.

Parameters are leaf Variables; everything a module does to them (``to``, ``zero_grad``,
``load_state_dict``) goes through tensor ops, so the same code works when the
distributed runtime turns parameters into proxies living on workers.
"""
import collections
import itertools

import numpy as np

from ..autograd import engine
from ..parameter import Parameter
from ..tensor import Tensor


class InputShapeError(RuntimeError):
    """A layer got an input of the wrong shape; the message names the layer and both shapes.

    Raised by ``nn.functional`` checks; ``Module.__call__`` adds which layer (and where in
    the model) it happened as the error travels out.
    """

    def __init__(self, message):
        super().__init__(message)
        self.message = message
        self.layer = None            # innermost module whose forward raised
        self.path = []               # attribute names from the outermost module down
        self._current = None

    def __str__(self):
        if self.layer is None:
            return self.message
        where = f" at '{'.'.join(self.path)}'" if self.path else ""
        return f"{_short_repr(self.layer)}{where}: {self.message}"


def check_not_foreign_array(x, who):
    """A numpy array or a torch tensor where a distgrad tensor belongs: a TypeError that
    says how to make one (other objects are left to the layer)."""
    cls = type(x)
    if cls is np.ndarray:
        raise TypeError(f"{who} is a numpy.ndarray; a distgrad tensor was expected: wrap it "
                        "with dg.from_numpy(a) (shares memory) or dg.tensor(a) (a copy)")
    if cls.__module__.split(".")[0] == "torch":
        raise TypeError(f"{who} is a {cls.__module__}.{cls.__name__}; a distgrad tensor was "
                        "expected: convert it with dg.from_numpy(t.detach().cpu().numpy())")


def _short_repr(module):
    extra = module.extra_repr()
    return f"{type(module).__name__}({extra})"


class RemovableHandle:
    """Returned by ``register_*_hook``; ``handle.remove()`` unregisters the hook."""

    _ids = itertools.count()

    def __init__(self, hooks):
        self.hooks, self.id = hooks, next(self._ids)

    def remove(self):
        """Unregister the hook. Example: ``h = m.register_forward_hook(f); h.remove()``."""
        self.hooks.pop(self.id, None)


_IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class Module:  # long: torch.nn.Module's API method for method, in its sections
    """Base class of every layer and model: subclass it and define ``forward``.

    Assigning a ``Parameter`` or a ``Module`` as an attribute registers it.

    Example::

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 2)

            def forward(self, x):
                return self.fc(x).relu()

        net = Net(); out = net(dg.randn(8, 4))
    """

    def __init__(self):
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_parameters", collections.OrderedDict())
        object.__setattr__(self, "_buffers", collections.OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", collections.OrderedDict())
        object.__setattr__(self, "_forward_hooks", collections.OrderedDict())
        object.__setattr__(self, "_forward_pre_hooks", collections.OrderedDict())

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward() defined")

    # ------------------------------------------------------------ calling
    def __call__(self, *args, **kwargs):
        for a in args:
            if not isinstance(a, Tensor):        # rare: check them all, naming the input
                for i, a in enumerate(args):
                    if not isinstance(a, Tensor):
                        check_not_foreign_array(a, f"{type(self).__name__}: input {i}")
                break
        if self._forward_pre_hooks:
            for hook in list(self._forward_pre_hooks.values()):
                res = hook(self, args)
                if res is not None:
                    args = res if isinstance(res, tuple) else (res,)
        try:
            out = self.forward(*args, **kwargs)
        except InputShapeError as e:
            self._annotate(e)
            raise
        if self._forward_hooks:
            for hook in list(self._forward_hooks.values()):
                res = hook(self, args, out)
                if res is not None:
                    out = res
        return out

    def _weight_and_bias(self, cls):
        """``self.weight, self.bias`` of a layer, read from the parameter table where the
        attribute lookup would end anyway (``self`` a ``cls`` itself, not a subclass that
        could define them otherwise, both registered): that lookup first fails on the
        instance and its class, ~1 us a read, on every call of the layer."""
        params = self._parameters
        if type(self) is cls and "weight" in params and "bias" in params:
            return params["weight"], params["bias"]
        return self.weight, self.bias

    def _annotate(self, err):
        """Name the failing layer (innermost) and its path from this module (outer ones)."""
        if err.layer is None:
            err.layer = self
        elif err._current is not None:
            for name, child in self._modules.items():
                if child is err._current:
                    err.path.insert(0, name)
                    break
        err._current = self

    def register_forward_hook(self, hook):
        """Call ``hook(module, inputs, output)`` after every forward; returns a handle."""
        h = RemovableHandle(self._forward_hooks)
        self._forward_hooks[h.id] = hook
        return h

    def register_forward_pre_hook(self, hook):
        """Call ``hook(module, inputs)`` before every forward; returns a handle."""
        h = RemovableHandle(self._forward_pre_hooks)
        self._forward_pre_hooks[h.id] = hook
        return h

    # ------------------------------------------------------------ registration
    def __setattr__(self, name, value):
        params = self.__dict__.get("_parameters")
        if isinstance(value, Parameter):
            if params is None:
                raise AttributeError("cannot assign parameters before Module.__init__() call")
            self._drop(name)
            params[name] = value
        elif isinstance(value, Module):
            if params is None:
                raise AttributeError("cannot assign a submodule before Module.__init__() call")
            self._drop(name)
            self._modules[name] = value
        elif params is not None and name in params:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} as parameter '{name}' "
                                "(nn.Parameter or None expected)")
            params[name] = None
        elif params is not None and name in self._buffers:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"cannot assign {type(value).__name__} as buffer '{name}'")
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def _drop(self, name):
        for d in (self.__dict__, self._parameters, self._buffers, self._modules):
            d.pop(name, None)

    def __getattr__(self, name):
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            if store in d and name in d[store]:
                return d[store][name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __delattr__(self, name):
        for store in (self._parameters, self._buffers, self._modules):
            if name in store:
                del store[name]
                return
        object.__delattr__(self, name)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._parameters) | set(self._buffers)
                      | set(self._modules))

    def register_parameter(self, name, param):
        """Register ``param`` (a ``Parameter`` or None) under ``name``."""
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"cannot assign {type(param).__name__} as parameter '{name}'")
        self._drop(name)
        self._parameters[name] = param

    def register_buffer(self, name, tensor, persistent=True):
        """Register a non-parameter tensor (e.g. BatchNorm's running mean) saved in state_dict.

        Example::

            self.register_buffer("running_mean", dg.zeros(4))
        """
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"cannot assign {type(tensor).__name__} as buffer '{name}'")
        self._drop(name)
        self._buffers[name] = tensor
        if persistent:
            self._non_persistent.discard(name)
        else:
            self._non_persistent.add(name)

    def add_module(self, name, module):
        """Register a child module. Example: ``self.add_module("fc", nn.Linear(2, 2))``."""
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a Module subclass")
        self._drop(name)
        self._modules[name] = module

    register_module = add_module

    def get_submodule(self, target):
        """The submodule at a dotted path. Example: ``net.get_submodule("features.0")``."""
        mod = self
        for part in target.split(".") if target else []:
            if part not in mod._modules:
                raise AttributeError(f"{type(mod).__name__} has no submodule '{part}' ({target})")
            mod = mod._modules[part]
        return mod

    # ------------------------------------------------------------ traversal
    def named_modules(self, memo=None, prefix=""):
        """(path, module) for self and every descendant, each once. Example: ``dict(net.named_modules())``."""
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m.named_modules(memo, f"{prefix}.{name}" if prefix else name)

    def modules(self):
        """Self and every descendant module. Example: ``[type(m) for m in net.modules()]``."""
        for _, m in self.named_modules():
            yield m

    def named_children(self):
        """(name, module) for the direct children. Example: ``dict(net.named_children())``."""
        seen = set()
        for name, m in self._modules.items():
            if m is not None and id(m) not in seen:
                seen.add(id(m))
                yield name, m

    def children(self):
        """The direct child modules. Example: ``list(net.children())``."""
        for _, m in self.named_children():
            yield m

    def _named_members(self, store, prefix, recurse, remove_duplicate=True):
        seen = set()
        mods = self.named_modules(prefix=prefix) if recurse else [(prefix, self)]
        for mod_prefix, mod in mods:
            for name, v in getattr(mod, store).items():
                if v is None or (remove_duplicate and id(v) in seen):
                    continue
                seen.add(id(v))
                yield (f"{mod_prefix}.{name}" if mod_prefix else name), v

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        """(name, Parameter) pairs, shared parameters once. Example: ``dict(m.named_parameters())``."""
        return self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse=True):
        """Every parameter (each shared one once). Example: ``SGD(model.parameters(), lr=0.1)``."""
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix="", recurse=True):
        """(name, buffer) pairs, e.g. BatchNorm running stats. Example: ``dict(bn.named_buffers())``."""
        return self._named_members("_buffers", prefix, recurse)

    def buffers(self, recurse=True):
        """Every buffer tensor. Example: ``list(bn.buffers())``."""
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    def apply(self, fn):
        """Call ``fn(module)`` on every submodule, then on self. Example: ``m.apply(init_fn)``."""
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    # ------------------------------------------------------------ modes and grads
    def train(self, mode=True):
        """Set training mode (Dropout, BatchNorm behave accordingly). Example: ``model.train()``."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        """Set evaluation mode. Example: ``model.eval()``."""
        return self.train(False)

    def requires_grad_(self, requires_grad=True):
        """Turn gradients on/off for every parameter. Example: ``backbone.requires_grad_(False)``."""
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none=True):
        """Clear every parameter's gradient (``None`` by default, as PyTorch does).

        Example::

            model.zero_grad()
        """
        for p in self.parameters():
            clear_grad(p, set_to_none)

    # ------------------------------------------------------------ devices and dtypes
    def _apply(self, fn):
        """Replace every parameter's data and every buffer by ``fn(tensor)``; keep identities."""
        for m in self.modules():
            for p in m._parameters.values():
                if p is None:
                    continue
                with engine.no_grad():
                    p.data = fn(p.data)
                    if p.grad is not None:
                        p.grad = fn(p.grad.detach())
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = fn(b)
        return self

    def to(self, *args, **kwargs):
        """Move parameters and buffers to a device and/or cast floats.

        Example::

            model.to("cuda"); model.to(dg.float64)
        """
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        for a in args:
            if isinstance(a, str):
                device = a
            elif isinstance(a, Tensor):
                device, dtype = a.device, a.dtype
            else:
                dtype = a

        def move(t):
            # Casts apply to floating tensors only (integer buffers keep their dtype).
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return self._apply(move)

    def cpu(self):
        """Move parameters and buffers to the CPU. Example: ``model.cpu()``."""
        return self.to("cpu")

    def cuda(self, device=None):
        """Move parameters and buffers to a GPU. Example: ``model.cuda()``."""
        return self.to("cuda" if device is None else f"cuda:{device}")

    def _cast(self, dtype):
        return self._apply(lambda t: t.astype(dtype) if t.is_floating_point() else t)

    def float(self):
        """Cast floating parameters and buffers to float32. Example: ``model.float()``."""
        return self._cast(np.float32)

    def double(self):
        """Cast floating parameters and buffers to float64. Example: ``model.double()``."""
        return self._cast(np.float64)

    def half(self):
        """Cast floating parameters and buffers to float16. Example: ``model.half()``."""
        return self._cast(np.float16)

    # ------------------------------------------------------------ state
    def state_dict(self, destination=None, prefix="", keep_vars=False):
        """Parameters and persistent buffers by dotted name (detached, sharing storage).

        Example::

            dg.save(model.state_dict(), "model.dgt")
        """
        out = collections.OrderedDict() if destination is None else destination
        for name, m in self.named_modules(prefix=prefix.rstrip(".")):
            pre = f"{name}." if name else ""
            for k, p in m._parameters.items():
                if p is not None:
                    out[pre + k] = p if keep_vars else p.detach()
            for k, b in m._buffers.items():
                if b is not None and k not in m._non_persistent:
                    out[pre + k] = b if keep_vars else b.detach()
        return out

    def load_state_dict(self, state_dict, strict=True):
        """Copy values from ``state_dict`` into this module's parameters and buffers.

        Checks everything before copying anything: with ``strict`` missing or unexpected
        keys are an error, and a shape mismatch always is; the error names each key.
        Returns ``(missing_keys, unexpected_keys)``.

        Example::

            model.load_state_dict(dg.load("model.dgt"))
        """
        own = self.state_dict(keep_vars=True)
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        errors = []
        if strict and unexpected:
            errors.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected))
        if strict and missing:
            errors.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing))
        for k, target in own.items():
            if k not in state_dict:
                continue
            shape = tuple(np.shape(state_dict[k])) if not isinstance(state_dict[k], Tensor) \
                else tuple(state_dict[k].shape)
            if shape != tuple(target.shape):
                errors.append(f"size mismatch for {k}: copying a param with shape {shape} from "
                              f"checkpoint, the shape in current model is {tuple(target.shape)}.")
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                               + "\n\t".join(errors))
        with engine.no_grad():
            for k, target in own.items():
                if k in state_dict:
                    target.data.copy_(state_dict[k])
        return _IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------------------ printing
    def extra_repr(self):
        """Text inside the parentheses of this module's repr (override in layers)."""
        return ""

    def __repr__(self):
        lines = [f"({name}): " + repr(m).replace("\n", "\n  ") for name, m in self._modules.items()]
        extra = self.extra_repr()
        if not lines:
            return f"{type(self).__name__}({extra})"
        body = "\n  ".join(([extra] if extra else []) + lines)
        return f"{type(self).__name__}(\n  {body}\n)"


def clear_grad(p, set_to_none=True):
    """Drop a parameter's gradient, or zero it in place with a tensor op."""
    if p.grad is None:
        return
    if set_to_none:
        p.grad = None
    else:
        g = p.grad.detach() if p.grad.grad_fn is not None else p.grad
        g.requires_grad = False
        with engine.no_grad():
            g.zero_()
        p.grad = g


class Sequential(Module):
    """Modules applied in order. Example: ``nn.Sequential(nn.Linear(4, 8), nn.ReLU())``.

    Also takes an ``OrderedDict`` of name -> module.
    """

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], collections.OrderedDict):
            for name, m in modules[0].items():
                self.add_module(name, m)
        else:
            for i, m in enumerate(modules):
                self.add_module(str(i), m)

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return Sequential(collections.OrderedDict(list(self._modules.items())[idx]))
        return list(self._modules.values())[idx]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def append(self, module):
        """Add a module at the end. Example: ``layers.append(nn.ReLU())``."""
        self.add_module(str(len(self)), module)
        return self


class ModuleList(Module):
    """A list of modules whose parameters are registered. Example: ``nn.ModuleList([l1, l2])``."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        """Add a module at the end. Example: ``layers.append(nn.ReLU())``."""
        self.add_module(str(len(self._modules)), module)
        return self

    def extend(self, modules):
        """Append several modules. Example: ``layers.extend([nn.Linear(2, 2), nn.ReLU()])``."""
        for m in modules:
            self.append(m)
        return self

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return ModuleList(list(self._modules.values())[idx])
        return list(self._modules.values())[idx]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class ModuleDict(Module):
    """A dict of modules whose parameters are registered. Example: ``nn.ModuleDict({"a": l1})``."""

    def __init__(self, modules=None):
        super().__init__()
        for k, m in (modules or {}).items():
            self.add_module(k, m)

    def __getitem__(self, key):
        return self._modules[key]

    def __setitem__(self, key, module):
        self.add_module(key, module)

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def keys(self):
        return self._modules.keys()

    def values(self):
        return self._modules.values()

    def items(self):
        return self._modules.items()
