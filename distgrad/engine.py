"""The backward engine: graph nodes, op application, and the iterative backward walk.

A node is created for every op whose inputs need gradients. Its class is named after
the op (``MulBackward``) so ``y.grad_fn`` reads like PyTorch. Nodes hold their
inputs and the version each had when the op ran; a VJP that reads an input modified
in place since then gets a clear error instead of a wrong gradient.

The engine sits below the tensor layer and never imports it: ``distgrad.tensor``
registers its ``Tensor`` class here once, at its own import (``register_tensor_type``),
so the engine can recognise tensors and wrap the arrays it hands to VJPs.
"""
import heapq
import itertools
import threading
import weakref
from contextlib import contextmanager

import numpy as np

from .ops.registry import NUMBER_OPERANDS
from .storage import StaleStorage, check_version  # noqa: F401  (check_version: part of this API)

class _GradMode(threading.local):
    """Grad mode per thread (local-backend workers are threads); on in a new thread."""

    def __init__(self):
        self.grad_enabled = True


_state = _GradMode()
_NUMBER_TYPES = frozenset((float, int))     # Python numbers (not bool) for number_operand
_seq = itertools.count()            # creation order = a valid topological order of the graph


def is_grad_enabled():
    return _state.grad_enabled


def set_grad_enabled(mode):
    _state.grad_enabled = bool(mode)


@contextmanager
def no_grad():
    """Context manager that disables graph recording.

    Example::

        with dg.no_grad():
            w -= lr * w.grad      # not recorded
    """
    prev = is_grad_enabled()
    set_grad_enabled(False)
    try:
        yield
    finally:
        set_grad_enabled(prev)


@contextmanager
def enable_grad():
    prev = is_grad_enabled()
    set_grad_enabled(True)
    try:
        yield
    finally:
        set_grad_enabled(prev)


class Node:
    """Base of every ``grad_fn``. ``next_nodes[i]`` receives the gradient of input i."""

    __slots__ = ("next_nodes", "seq", "pre_hooks", "released", "__weakref__")
    op_name = "?"

    def __init__(self, next_nodes):
        self.next_nodes = next_nodes
        self.seq = next(_seq)
        self.pre_hooks = None
        self.released = False

    def name(self):
        return type(self).__name__

    @property
    def next_functions(self):
        """PyTorch's view of the graph: ((node, input_nr), ...) for each input."""
        return tuple((n, 0) for n in self.next_nodes)

    def __repr__(self):
        return f"<distgrad.autograd.{type(self).__name__} object at {hex(id(self))}>"

    def register_prehook(self, fn):
        global _hooks_registered
        if self.pre_hooks is None:
            self.pre_hooks = []
        self.pre_hooks.append(fn)
        _hooks_registered = True

    def input_grads(self, grad):
        """Gradients for each entry of ``next_nodes`` (None where not needed)."""
        raise NotImplementedError

    def release(self):
        self.released = True


_node_classes = {}
# Set once any hook is registered: until then the distributed recorder skips looking for them.
_hooks_registered = False


def hooks_registered():
    return _hooks_registered


def node_class(name, base):
    """One Node subclass per op, named ``<Op>Backward`` (cached)."""
    key = (name, base)
    cls = _node_classes.get(key)
    if cls is None:
        camel = "".join(part[:1].upper() + part[1:] for part in name.split("_"))
        cls = type(f"{camel}Backward", (base,), {"__slots__": (), "op_name": name})
        _node_classes[key] = cls
    return cls


class OpNode(Node):
    """grad_fn of a registry op: calls the op's per-input VJPs."""

    # out_array, out_store, out_version: only for an op whose VJPs read its output (set by
    # make_node; apply_op sets the output's storage and version for the in-place check).
    __slots__ = ("op", "inputs", "versions", "attrs", "out_array", "out_store", "out_version")

    def __init__(self, op, inputs, attrs, next_nodes, versions):
        # Node.__init__ written out: this runs once per recorded op.
        self.next_nodes = next_nodes
        self.seq = next(_seq)
        self.pre_hooks = None
        self.released = False
        self.op = op
        self.inputs = inputs
        self.versions = versions
        self.attrs = attrs

    def input_grads(self, grad):
        """The VJPs' gradients for the inputs. In a plain backward (grad mode off) an op
        whose VJPs run on arrays (``array_vjps``) gets and returns raw arrays: no tensor
        per intermediate gradient; otherwise ``grad`` is a tensor (wrapped if need be)."""
        if self.released:
            raise RuntimeError(
                f"Trying to backward through the graph a second time ({self.name()}), but its "
                "saved values were already freed. Specify retain_graph=True on the first backward.")
        op = self.op
        if not op.array_vjps or _state.grad_enabled:
            return self._tensor_grads(grad)
        g_array = grad._store.array if isinstance(grad, _Tensor) else grad
        arrays = []
        for x, v in zip(self.inputs, self.versions):
            if v is None:                     # a Python number: as numpy casts it against
                arrays.append(NUMBER_OPERANDS[x, g_array.dtype]   # the gradient
                              if type(x) in _NUMBER_TYPES else x)
                continue
            store = x._store
            if store.counter[0] != v:         # modified in place since the forward: the
                return self._tensor_grads(grad)   # tensor path raises where a VJP reads it
            arrays.append(store.array)
        grad = g_array
        ans = self._output() if op.uses_output else None
        vjps, attrs, out = op.vjps, self.attrs, []
        for i, nxt in enumerate(self.next_nodes):
            if nxt is None:
                out.append(None)
                continue
            g = vjps[i](grad, ans, *arrays, **attrs) if attrs else vjps[i](grad, ans, *arrays)
            if type(g) is not np.ndarray and g is not None and not hasattr(g, "shape"):
                g = np.asarray(g)             # a Python number: an array, as apply_op makes
            out.append(g)
        return out

    def _tensor_grads(self, grad):
        """input_grads on tensors: differentiable again under create_graph."""
        op = self.op
        if not isinstance(grad, _Tensor):
            grad = as_gradient(self, grad)
        saved = self.inputs
        for x, v in zip(saved, self.versions):
            if v is not None and x._store.version != v:     # modified in place since: stand-ins
                saved = tuple([x if v is None or x._store.version == v else saved_tensor(x, v, self)
                               for x, v in zip(self.inputs, self.versions)])
                break
        ans = None
        if op.uses_output:
            # Differentiable under create_graph: the output depends on the inputs through
            # this very node, which higher-order gradients must follow.
            ans = _Tensor.from_array(self._output(), grad_fn=self, requires_grad=_state.grad_enabled)
        attrs, vjps = self.attrs, op.vjps
        plain = op.variadic_vjp is None and not attrs
        out = []
        for i, nxt in enumerate(self.next_nodes):
            if nxt is None:
                out.append(None)
            elif plain and i < len(vjps) and vjps[i] is not None:
                out.append(vjps[i](grad, ans, *saved))
            else:
                out.append(op.vjp(i, grad, ans, saved, attrs))
        return out

    def _output(self):
        """The saved output, checked against in-place writes since the forward."""
        store = self.out_store
        if store is not None and store.version != self.out_version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by "
                f"an inplace operation: the output of {self.name()} (shape "
                f"{tuple(store.shape)}) is at version {store.version}; expected version "
                f"{self.out_version} instead.")
        return self.out_array

    def release(self):
        self.released = True
        self.inputs = self.out_array = self.out_store = None


class AccumulateGrad(Node):
    """Sink node of a leaf tensor: adds the incoming gradient into ``leaf.grad``."""

    __slots__ = ("variable",)

    def __init__(self, variable):
        super().__init__(())
        self.variable = variable

    def check(self, grad):
        leaf = self.variable
        if grad._store.shape != leaf._store.shape:
            raise RuntimeError(f"gradient of shape {tuple(grad.shape)} does not match leaf of shape "
                               f"{tuple(leaf.shape)}")

    def accumulate(self, grad, create_graph, owned=False):
        self.check(grad)
        self.variable._accumulate_grad(grad, create_graph, owned and not self.pre_hooks)


class _Owners:
    """Decides which gradient arrays a leaf may take without a copy: a fresh array (not a
    view) that no other leaf took in this backward pass. Nothing in the engine writes a
    gradient buffer in place, so the rest of the walk can still read it."""

    def __init__(self):
        self.taken = set()

    def take(self, grad):
        arr = grad._store.array
        if getattr(arr, "base", None) is not None or id(arr) in self.taken:
            return False
        self.taken.add(id(arr))
        return True


def next_node_of(t):
    """The node that receives the gradient of tensor ``t`` (None if it needs none)."""
    if not t.requires_grad:
        return None
    if t.grad_fn is not None:
        return t.grad_fn
    acc = t._accum_ref() if t._accum_ref is not None else None
    if acc is None:
        acc = AccumulateGrad(t)
        t._accum_ref = weakref.ref(acc)
    return acc


def _topo_order(roots):
    """All nodes reachable from ``roots``, consumers before producers (by creation seq)."""
    seen = set()
    stack = [r for r in roots if r is not None]
    nodes = []
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        nodes.append(n)
        stack.extend(m for m in n.next_nodes if m is not None and id(m) not in seen)
    # A node is always created after the nodes of its inputs, so descending seq is a
    # topological order from outputs to inputs.
    nodes.sort(key=lambda n: n.seq, reverse=True)
    return nodes


def _needed(order, targets):
    """Ids of nodes on some path to a target node (for autograd.grad's pruning)."""
    need = set(id(t) for t in targets)
    for n in reversed(order):          # producers first
        if any(m is not None and id(m) in need for m in n.next_nodes):
            need.add(id(n))
    return need


def _seed(roots, root_grads, inputs):
    """The walk's start: gradients waiting (by node id), the heap of nodes to visit, the
    nodes whose gradient ``autograd.grad`` captures, and (with ``inputs``) the ids of the
    nodes on a path to one of them."""
    buffers, heap, capture = {}, [], {}
    if inputs is not None:
        for t in inputs:
            capture[id(next_node_of(t) if t.requires_grad else None)] = None
    root_nodes = []
    for t, g in zip(roots, root_grads):
        node = next_node_of(t)
        if node is None:
            raise RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
        root_nodes.append(node)
        _receive(buffers, heap, node, g)
    need = (_needed(_topo_order(root_nodes), [next_node_of(t) for t in inputs])
            if inputs is not None else None)
    return buffers, heap, capture, need


def _add(a, b):
    """Two gradients of one node summed: tensors, raw arrays (OpNode's plain path) or one of each."""
    if isinstance(a, _Tensor) is isinstance(b, _Tensor):
        return a + b
    # Only in a plain backward (raw arrays never reach a create_graph walk): arrays.
    return (a._store.array if isinstance(a, _Tensor) else a) + (
        b._store.array if isinstance(b, _Tensor) else b)


def run_backward(roots, root_grads, retain_graph=False, create_graph=False, inputs=None,
                 on_leaf_ready=None):
    """Propagate ``root_grads`` from ``roots`` (tensors) to the leaves.

    With ``inputs`` given, returns their gradients instead of accumulating into
    ``.grad`` (``autograd.grad``). ``on_leaf_ready(leaf)`` is called as soon as a leaf's
    gradient is final: the distributed worker launches its all-reduce buckets from it.
    """
    buffers, heap, capture, need = _seed(roots, root_grads, inputs)
    ready, owners = [], _Owners()
    prev_mode = is_grad_enabled()
    set_grad_enabled(create_graph)
    try:
        _walk(buffers, heap, capture, need, ready, owners, retain_graph, create_graph,
              on_leaf_ready)
        # Leaves are written only once the whole walk succeeded: an error anywhere in the
        # backward pass (a freed graph, a modified saved tensor) leaves no partial .grad.
        for node, grad in ready:
            node.check(grad)
        for node, grad in ready:
            node.accumulate(grad, create_graph, owners.take(grad))
    finally:
        set_grad_enabled(prev_mode)
    if inputs is not None:
        return [capture.get(id(next_node_of(t)) if t.requires_grad else None) for t in inputs]
    return None


def _walk(buffers, heap, capture, need, ready, owners, retain_graph, create_graph, on_leaf_ready):
    """run_backward's loop: visit nodes consumers first, each once all its gradients came.

    A node whose gradients all went to one node, with nothing else pending (a chain), hands
    it on directly (``follow``): nothing else can still reach that node, so it is next.
    """
    heappop = heapq.heappop
    follow = None
    while follow is not None or heap:
        if follow is None:
            node = heappop(heap)[1]
            grad = buffers.pop(id(node))
        else:
            node, grad, follow = follow, follow_grad, None
        if need is not None and id(node) not in need:
            continue
        # The common node, an op's with no hook and nothing captured, skips this block.
        if node.pre_hooks or capture or not isinstance(node, OpNode):
            if not isinstance(grad, _Tensor):
                grad = as_gradient(node, grad)     # a raw array (see OpNode) leaves the walk
            if node.pre_hooks:
                for hook in node.pre_hooks:
                    res = hook(grad)
                    if res is not None:
                        grad = res
            key = id(node)
            if capture and key in capture:
                capture[key] = grad
                if isinstance(node, AccumulateGrad):
                    continue
            if isinstance(node, AccumulateGrad):
                if on_leaf_ready is None:
                    ready.append((node, grad))   # written after the walk (see run_backward)
                    continue
                node.accumulate(grad, create_graph, owners.take(grad))
                on_leaf_ready(node.variable)
                continue
        grads = node.input_grads(grad)
        if not retain_graph:
            node.release()
        for nxt, g in zip(node.next_nodes, grads):
            if nxt is None or g is None or need is not None and id(nxt) not in need:
                continue
            if follow is None and not heap:
                follow, follow_grad = nxt, g     # maybe the only one: kept off the heap
                continue
            if follow is not None:           # not the only one after all
                _receive(buffers, heap, follow, follow_grad)
                follow = None
            _receive(buffers, heap, nxt, g)


def _receive(buffers, heap, node, g):
    """A gradient for ``node``: the first one queues it, later ones add up."""
    key = id(node)
    prev = buffers.get(key)
    if prev is None:
        buffers[key] = g
        # A node is created after the nodes of its inputs: popping the highest seq first
        # visits every consumer before its producers (seq is unique: the tuples never
        # compare nodes).
        heapq.heappush(heap, (-node.seq, node))
    else:
        buffers[key] = _add(prev, g)


_Tensor = None      # distgrad.tensor.Tensor, registered by that module at its import
_Variable = None    # and its Variable


def register_tensor_type(cls, variable_cls=None):
    """Called once by ``distgrad.tensor`` (the layer above) with its ``Tensor`` class (and
    ``Variable``, the class of the gradients of Variables).

    Example: ``engine.register_tensor_type(Tensor, Variable)`` at the end of ``distgrad/tensor.py``.
    """
    global _Tensor, _Variable
    _Tensor, _Variable = cls, variable_cls or cls


def as_gradient(node, array):
    """A raw gradient array (an ``array_vjps`` op's plain backward) as a tensor, for what
    needs one (a hook, a leaf, another kind of node), of the class of the value whose
    gradient it is: a Variable's gradient is a Variable.

    Example: ``as_gradient(y.grad_fn, np.ones(3))`` is a Variable when ``y`` is one.
    """
    if isinstance(node, OpNode):      # its output's class, as apply_op chose it
        cls = _Variable if any(isinstance(x, _Variable) for x in node.inputs or ()) else _Tensor
    elif isinstance(node, AccumulateGrad):
        cls = _Variable if isinstance(node.variable, _Variable) else _Tensor
    else:
        cls = _Tensor
    return cls.from_array(array)


def saved_tensor(tensor, version, node):
    """A node's saved input, or a stand-in that raises if it was modified in place.

    Example: ``saved_tensor(x, node.versions[0], node)`` is ``x`` while nothing wrote to it.
    """
    if tensor._store.version == version:
        return tensor
    try:
        check_version(tensor, version, node)
    except RuntimeError as err:
        stale = _Tensor.from_array(None, grad_fn=tensor.grad_fn, requires_grad=tensor.requires_grad)
        stale._store = StaleStorage(tensor._store, err)
        stale._accum_ref = tensor._accum_ref
        return stale


def make_node(op, inputs, attrs, out_array):
    """Record a node for an op application, or None if no input needs a gradient.

    Example: ``node = make_node(get_op("mul"), (x, 2.0), {}, x.numpy() * 2)``.
    """
    if not op.differentiable or not _state.grad_enabled:
        return None
    return record_node(op, inputs, attrs, out_array)


def record_node(op, inputs, attrs, out_array):
    """``make_node`` for a caller that has checked that ``op`` is differentiable and grad
    mode is on (``apply_op``, which runs for every op, reads the mode once).

    Example: ``record_node(op, (x, 2.0), {}, out) if op.differentiable and is_grad_enabled()
    else None``.
    """
    # One pass over the inputs (this runs for every recorded op): the node each input's
    # gradient goes to, and the version of each tensor input for the in-place check.
    next_nodes, versions, wanted = [], [], False
    for x in inputs:
        if isinstance(x, _Tensor):
            versions.append(x._store.counter[0])   # its version (Storage.version, read direct)
            if x.requires_grad:
                nxt = x.grad_fn
                next_nodes.append(nxt if nxt is not None else next_node_of(x))
                wanted = True
                continue
        else:
            versions.append(None)
        next_nodes.append(None)
    if not wanted:
        return None
    cls = _op_node_classes.get(op)
    if cls is None:
        cls = _op_node_classes[op] = node_class(op.name, OpNode)
    node = cls(op, inputs, attrs, tuple(next_nodes), versions)
    if op.uses_output:
        node.out_array, node.out_store, node.out_version = out_array, None, 0
    return node


_op_node_classes = {}       # OpDef -> its OpNode subclass: node_class without building a key
