"""``backward`` and ``grad``: the autograd entry points, local or distributed.

For local tensors they seed the roots and run the engine's backward walk; for
distributed ones they hand the call to the value's cluster, which records it for the
workers (``distgrad.dist_autograd``).
"""
from .. import _backend
from ..engine import run_backward
from ..tensor import Tensor, Variable, to_array


def _seeds(tensors, grad_tensors, create_graph, who):
    seeds = []
    for i, t in enumerate(tensors):
        g = grad_tensors[i] if grad_tensors is not None else None
        if g is None:
            if t.numel() != 1:
                raise RuntimeError(f"{who}: grad can be implicitly created only for scalar outputs; "
                                   f"output {i} has shape {tuple(t.shape)}: pass gradient=")
            xp_arr = t._store.array
            seeds.append(Tensor.from_array(_ones_like(xp_arr)))
            continue
        if not isinstance(g, Tensor):
            g = Tensor.from_array(to_array(g))     # data, never a legacy size
        if tuple(g.shape) != tuple(t.shape):
            raise RuntimeError(f"{who}: gradient of shape {tuple(g.shape)} does not match "
                               f"output {i} of shape {tuple(t.shape)}")
        # The engine may hand a seed through unchanged (x + 0): keep the user's tensor out of it.
        if create_graph and g.requires_grad:
            seeds.append(g)
            continue
        arr = g._store.array.astype(t.dtype, copy=True)
        if not t._store.lazy and g.device != t.device:
            arr = _backend.to_device(arr, t.device)     # a CPU gradient for a CUDA output
        seeds.append(Tensor.from_array(arr))
    return seeds


def _ones_like(arr):
    return _backend.array_module(arr).ones(arr.shape, dtype=arr.dtype)


def _check_requires_grad(tensors):
    for i, t in enumerate(tensors):
        if not t.requires_grad:
            raise RuntimeError(f"element {i} of tensors does not require grad and does not have a grad_fn")


def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    """Accumulate gradients of ``tensors`` into the leaves' ``.grad``.

    Example::

        dg.autograd.backward([loss])
    """
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    if grad_tensors is not None and not isinstance(grad_tensors, (list, tuple)):
        grad_tensors = [grad_tensors]
    lazy = next((t._store for t in tensors if t._store.lazy), None)
    if lazy is not None:     # distributed: recorded for the workers (distgrad.dist_autograd)
        if inputs is not None:
            inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        return lazy.cluster.record_backward(tensors, grad_tensors, retain_graph, create_graph,
                                            inputs)
    _check_requires_grad(tensors)
    retain_graph = create_graph if retain_graph is None else retain_graph
    seeds = _seeds(tensors, grad_tensors, create_graph, "backward")
    if inputs is not None:
        inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        grads = run_backward(tensors, seeds, retain_graph, create_graph, inputs=inputs)
        for x, g in zip(inputs, grads):
            if g is not None:
                x._accumulate_grad(g, create_graph)
        return None
    run_backward(tensors, seeds, retain_graph, create_graph)
    return None


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False,
         allow_unused=False):
    """Gradients of ``outputs`` w.r.t. ``inputs``, returned (not accumulated).

    Example::

        gx, = dg.autograd.grad((x ** 3).sum(), [x], create_graph=True)   # 3x^2
        ggx, = dg.autograd.grad(gx.sum(), [x])                            # 6x
    """
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if grad_outputs is not None and not isinstance(grad_outputs, (list, tuple)):
        grad_outputs = [grad_outputs]
    lazy = next((t._store for t in outputs if t._store.lazy), None)
    if lazy is not None:     # distributed: the gradients stay on the workers
        return lazy.cluster.record_grad(outputs, inputs, grad_outputs, retain_graph,
                                        create_graph, allow_unused)
    _check_requires_grad(outputs)
    for i, x in enumerate(inputs):
        if not x.requires_grad:
            raise RuntimeError(f"grad: input {i} (shape {tuple(x.shape)}) does not require grad")
    retain_graph = create_graph if retain_graph is None else retain_graph
    seeds = _seeds(outputs, grad_outputs, create_graph, "grad")
    grads = run_backward(outputs, seeds, retain_graph, create_graph, inputs=inputs)
    for i, g in enumerate(grads):
        if g is None and not allow_unused:
            raise RuntimeError(f"grad: input {i} (shape {tuple(inputs[i].shape)}) was not used in "
                               "the graph; pass allow_unused=True if this is intended")
    return tuple(None if g is None else (g if isinstance(g, Variable) or create_graph
                                          else Variable.from_array(g._store.array))
                 for g in grads)
