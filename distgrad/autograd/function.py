"""Custom differentiable ops: subclass ``Function`` with static forward/backward.

Example::

    class Exp(Function):
        @staticmethod
        def forward(ctx, x):
            y = x.exp()
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, grad):
            y, = ctx.saved_tensors
            return grad * y

    z = Exp.apply(x)
"""
from .. import engine
from ..tensor import Tensor, Variable, to_array


class FunctionCtx:
    """What ``forward`` leaves for ``backward``: saved tensors and any attributes."""

    def __init__(self):
        self._saved = ()
        self._versions = ()
        self.needs_input_grad = ()
        self._node = None

    def save_for_backward(self, *tensors):
        self._saved = tensors
        self._versions = tuple(None if t is None else t._store.version for t in tensors)

    @property
    def saved_tensors(self):
        if self._node is not None and self._node.released:
            raise RuntimeError(f"Trying to backward through the graph a second time "
                               f"({self._node.name()}); specify retain_graph=True.")
        return tuple(None if t is None else engine.saved_tensor(t, v, self._node)
                     for t, v in zip(self._saved, self._versions))


class FunctionNode(engine.Node):
    """grad_fn of a custom Function: calls its ``backward`` once for all inputs."""

    __slots__ = ("ctx", "fn_cls", "n_inputs")

    def input_grads(self, grad):
        grads = self.fn_cls.backward(self.ctx, grad)
        if not isinstance(grads, tuple):
            grads = (grads,)
        if len(grads) != self.n_inputs:
            raise RuntimeError(f"{self.fn_cls.__name__}.backward returned {len(grads)} gradients, "
                               f"but forward took {self.n_inputs} inputs")
        out = []
        for g, nxt in zip(grads, self.next_nodes):
            if g is not None and not isinstance(g, Tensor):
                g = Tensor.from_array(to_array(g))   # data, never a legacy size
            out.append(g if nxt is not None else None)
        return out

    def release(self):
        super().release()
        self.ctx._saved = ()


def run_forward(fn_cls, args, kwargs):
    """``fn_cls.forward`` on a fresh context with recording off: ``(ctx, out)``, where ``out``
    must be one tensor. ``Function.apply`` and the cluster's trace of a Function both start
    with it."""
    ctx = FunctionCtx()
    ctx.needs_input_grad = tuple(isinstance(a, Tensor) and a.requires_grad for a in args)
    with engine.no_grad():
        out = fn_cls.forward(ctx, *args, **kwargs)
    if not isinstance(out, Tensor):
        raise TypeError(f"{fn_cls.__name__}.forward must return a single tensor, got "
                        f"{type(out).__name__}")
    return ctx, out


class Function:
    """Base class of user-defined differentiable operations (see module docstring)."""

    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs):
        lazy = next((a._store for a in args if isinstance(a, Tensor) and a._store.lazy), None)
        if lazy is not None:
            # Distributed inputs: both rules are traced into the workers' program.
            return lazy.cluster.apply_function(cls, args, kwargs)
        ctx, out = run_forward(cls, args, kwargs)
        next_nodes = tuple(engine.next_node_of(a) if isinstance(a, Tensor) else None for a in args)
        if not engine.is_grad_enabled() or all(n is None for n in next_nodes):
            return out
        node_cls = engine.node_class(cls.__name__, FunctionNode)
        node = node_cls(next_nodes)
        node.ctx, node.fn_cls, node.n_inputs = ctx, cls, len(args)
        ctx._node = node
        result_cls = Variable if any(isinstance(a, Variable) for a in args) else type(out)
        result = result_cls.from_array(out._store.array, grad_fn=node, requires_grad=True)
        result._store = out._store       # one version counter: ctx may have saved ``out``
        return result
