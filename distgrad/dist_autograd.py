"""Autograd on distributed values, recorded on the driver: backward, ``autograd.grad``,
custom ``Function``s and hooks.

The gradient graph lives on the workers, so what the local engine does with Python
code at backward time is traced here, at record time, into sub-programs of ops (as
``jax.custom_vjp`` traces both rules): a Function's ``backward`` and a hook's body run
once on the driver on placeholder values, and the ops they record travel with the
program. Workers need no user code. A body that needs a concrete value (``.item()``,
``.numpy()``, printing) raises one clear error naming it.

Gradient placements follow ``placement.cotangent``: a shard's gradient is sharded, a
replicated value's gradient is Partial (a term per worker), a Partial value's is
replicated. Traced results are brought to that placement (``to_partial`` or an
all-reduce), so they compose with the engine's exact-gradient rule.

Everything is recorded through the cluster's ``recorder`` (``distgrad.lazy``): its
current recording, its table of values and its ``tracing`` sub-programs.

Example::

    with dg.init(workers=2, backend="local") as cluster:
        X = cluster.shard(np.random.randn(8, 3))
        W = Variable(dg.randn(3, 1, dtype=dg.float64), requires_grad=True)
        W.register_hook(lambda g: g.clamp(-1, 1))          # traced, exact
        gW, = dg.autograd.grad((X @ W).tanh().sum(), [W])   # a Partial value
"""
import math

from . import engine, placement as pl
from .autograd.function import run_forward
from .ops import get_op
from .placement import REPLICATE, Partial, PlacementError, Replicate, Shard
from .recording import LazyNode
from .tensor import Tensor, Variable, to_array


# ---------------------------------------------------------------- tracing

def placeholder(cluster, shape, dtype, placement):
    """A stand-in for a value the sub-program receives when it runs (a gradient)."""
    store = cluster.recorder.new_storage(shape, dtype, placement)
    slot = cluster.recorder.rec.new_slot(store.vid)
    return Variable.from_storage(store), slot


def subprogram(cluster, sub, input_slots, result_slots):
    """(parent slots the sub-program captures, its structure)."""
    vid_of = {s: v for v, s in sub.slot_of.items()}
    captured = [sub.parent.ref(vid_of[s]) for s in sub.ext]
    structure = {"instrs": sub.instrs, "nslots": sub.nslots, "ext": sub.ext,
                 "inputs": list(input_slots), "results": list(result_slots)}
    return captured, structure


def coerce(cluster, value, shape, placement, who):
    """Slot (in the current sub-program) of ``value`` as a gradient of ``shape`` placed
    ``placement``; -1 for None."""
    if value is None:
        return -1
    if not isinstance(value, Tensor):
        raise TypeError(f"{who} returned a {type(value).__name__} where a gradient tensor of "
                        f"shape {tuple(shape)} was expected")
    if tuple(value.shape) != tuple(shape):
        raise RuntimeError(f"{who} returned a gradient of shape {tuple(value.shape)} for a value "
                           f"of shape {tuple(shape)}")
    store = value.store if value.store.lazy else cluster.recorder.local_replica(value.detach())
    have = store.placement
    if isinstance(placement, Shard):
        if not (isinstance(have, Shard) and have.dim == placement.dim and have.sizes == placement.sizes):
            raise PlacementError(f"{who} returned a {have!r} gradient for a value sharded "
                                 f"{placement!r} with sizes {placement.sizes}")
    elif isinstance(placement, Partial):
        if isinstance(have, Replicate):
            value = cluster.record_op(get_op("to_partial"), [_wrap(store)], {})
            store = value.store
        elif not isinstance(have, Partial):
            raise PlacementError(f"{who} returned a {have!r} gradient for a replicated value")
    elif isinstance(have, Partial):
        store = cluster.recorder.allreduce_partial(store).store
    elif not isinstance(have, Replicate):
        raise PlacementError(f"{who} returned a {have!r} gradient for a Partial value")
    return cluster.recorder.rec.ref(store.vid)


def _wrap(store):
    return Tensor.from_storage(store)


def _store_of(cluster, t):
    return cluster.recorder.store_of(t)


# ---------------------------------------------------------------- custom Functions

def apply_function(cluster, fn_cls, args, kwargs):
    """``fn_cls.apply(*args)`` on distributed values: the forward is recorded as the ops
    it makes; the backward is traced into the program, as the worker's grad_fn."""
    name = fn_cls.__name__
    args = list(args)
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and a.store.lazy and isinstance(a.store.placement, Partial):
            # A Function is not known to be linear: its inputs are whole values.
            args[i] = cluster.recorder.allreduce_partial(a.store, type(a), a.requires_grad, a)
    ctx, out = run_forward(fn_cls, args, kwargs)
    if not engine.is_grad_enabled() or not any(ctx.needs_input_grad):
        return out
    out_store = _store_of(cluster, out.detach())
    with cluster.recorder.tracing(f"{name}.backward") as sub:
        g, g_slot = placeholder(cluster, out_store.shape, out_store.dtype,
                                pl.cotangent(out_store.placement))
        grads = fn_cls.backward(ctx, g)
        if not isinstance(grads, tuple):
            grads = (grads,)
        if len(grads) != len(args):
            raise RuntimeError(f"{name}.backward returned {len(grads)} gradients, but forward "
                               f"took {len(args)} inputs")
        results = []
        for i, (a, gi) in enumerate(zip(args, grads)):
            if not (isinstance(a, Tensor) and a.requires_grad):
                results.append(-1)
                continue
            p = a.store.placement if a.store.lazy else REPLICATE
            results.append(coerce(cluster, gi, a.shape, pl.cotangent(p),
                                  f"{name}.backward (input {i})"))
    captured, structure = subprogram(cluster, sub, [g_slot], results)
    resolved = [cluster.recorder.arg(a) if isinstance(a, Tensor) else None for a in args]
    arg_slots = [-1 if r is None else r[0][1] for r in resolved]
    leaves = frozenset().union(*(r[3].leaves for r in resolved if r is not None))
    rec = cluster.recorder.rec
    store = cluster.recorder.new_storage(out_store.shape, out_store.dtype, out_store.placement, leaves,
                                 out_store.device)
    out_slot = rec.ref(out_store.vid)
    res_slot = rec.new_slot(store.vid)
    rec.instrs.append(["custom", name, arg_slots, out_slot, res_slot, captured, structure])
    node = engine.node_class(name, LazyNode)(
        tuple(engine.next_node_of(a) if isinstance(a, Tensor) else None for a in args))
    node.vid = store.vid
    cls = Variable if any(isinstance(a, Variable) for a in args) else type(out)
    return cls.from_storage(store, grad_fn=node, requires_grad=True)


# ---------------------------------------------------------------- backward and grad

def _reachable(roots):
    """Every driver-side node reachable from ``roots`` (ids -> node)."""
    seen = {}
    stack = [r for r in roots if r is not None]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen[id(n)] = n
        stack.extend(m for m in n.next_nodes if m is not None and id(m) not in seen)
    return seen


def _seed_for(cluster, g, store, i, who):
    """The upstream gradient ``g`` of root ``i``, placed as that root's cotangent is seeded:
    sharded like a sharded root, whole on every worker otherwise (a replicated root's seed
    is cut to rank 0 by the worker). A seed that requires grad stays differentiable."""
    g = g if isinstance(g, Tensor) else Tensor.from_array(to_array(g))
    if tuple(g.shape) != store.shape:
        raise RuntimeError(f"{who}: gradient of shape {tuple(g.shape)} does not match "
                           f"output {i} of shape {store.shape}")
    p = store.placement
    if not g.store.lazy:
        if isinstance(p, Shard) and not g.requires_grad:
            return cluster.shard(g.detach(), p.dim, p.sizes)     # only each worker's rows travel
        g = g if g.requires_grad else g.detach()
    gp = _store_of(cluster, g).placement
    if isinstance(gp, Partial):
        g = cluster.recorder.allreduce_partial(g.store, type(g), g.requires_grad, g)
        gp = REPLICATE
    if isinstance(p, Shard):
        if isinstance(gp, Replicate):
            return cluster.record_op(get_op("shard_rows"), [g], {"dim": p.dim, "sizes": list(p.sizes)})
        if gp.dim != p.dim or gp.sizes != p.sizes:
            raise PlacementError(f"{who}: the gradient of output {i} is sharded {gp!r} with sizes "
                                 f"{gp.sizes}, the output {p!r} with sizes {p.sizes}")
    elif isinstance(gp, Shard):
        raise PlacementError(f"{who}: a sharded gradient for the {p!r} output {i}")
    return g if g.store.lazy else _wrap(_store_of(cluster, g))


def _roots_and_seeds(cluster, tensors, grad_tensors, who):
    """Slots of the roots, of their seeds (-1: ones) and the roots' placement codes."""
    rec = cluster.recorder.rec
    roots, seeds, codes = [], [], []
    for i, root in enumerate(tensors):
        if not root.requires_grad:
            raise RuntimeError(f"element {i} of tensors does not require grad and does not have a grad_fn")
        store = _store_of(cluster, root)
        g = grad_tensors[i] if grad_tensors is not None and i < len(grad_tensors) else None
        if g is None:
            if math.prod(store.shape) != 1:
                raise RuntimeError(f"{who}: grad can be implicitly created only for scalar outputs; "
                                   f"output {i} has shape {store.shape}: pass gradient=")
            seeds.append(-1)
        else:
            g = _seed_for(cluster, g, store, i, who)
            seeds.append(rec.ref(g.store.vid))
        roots.append(rec.ref(store.vid))
        codes.append(pl.encode(store.placement)[0])
    return roots, seeds, codes


def _trace_hooks(cluster, nodes, leaf_placement):
    """Trace the hooks of reachable nodes: ``[slot, is_leaf, captured, structure]`` each.

    An intermediate value's hook runs during the workers' backward walk, on its
    gradient (placed ``cotangent``); a leaf's runs on the leaf's gradient of this pass,
    placed as ``leaf_placement(store)`` says."""
    entries = []
    for node in sorted(nodes, key=lambda n: -n.seq):
        is_leaf = isinstance(node, engine.AccumulateGrad)
        if is_leaf:
            store = _store_of(cluster, node.variable)
            placement = leaf_placement(store)
        else:
            store = cluster.recorder.live.get(node.vid) or getattr(node, "hold", None)
            if store is None:
                continue
            placement = pl.cotangent(store.placement)
        what = f"a hook on a {store.placement!r} value of shape {store.shape}"
        with cluster.recorder.tracing(what) as sub:
            g, g_slot = placeholder(cluster, store.shape, store.dtype, placement)
            for fn in node.pre_hooks:
                res = fn(g)
                if res is not None:
                    g = res
            result = coerce(cluster, g, store.shape, placement, what)
        captured, structure = subprogram(cluster, sub, [g_slot], [result])
        entries.append([cluster.recorder.rec.ref(store.vid), int(is_leaf), captured, structure])
    return entries


def _edges(roots, seeds):
    """Driver-side edges of a gradient computed with create_graph: it depends on the roots'
    graphs and on any seed that requires grad."""
    nodes = [r.grad_fn or engine.next_node_of(r) for r in roots]
    nodes += [engine.next_node_of(g) for g in seeds or () if isinstance(g, Tensor) and g.requires_grad]
    return tuple(nodes)


def _grad_values(cluster, shapes_dtypes, placements, create_graph, roots, leaves, seeds=None):
    """Driver tensors for gradients the workers compute (requiring grad under create_graph)."""
    rec = cluster.recorder.rec
    out, slots = [], []
    for (shape, dtype), p in zip(shapes_dtypes, placements):
        store = cluster.recorder.new_storage(shape, dtype, p, leaves if create_graph else frozenset())
        slots.append(rec.new_slot(store.vid))
        grad_fn = None
        if create_graph:
            # The workers know the real graph; the driver only needs what it reaches.
            grad_fn = engine.node_class("grad", LazyNode)(_edges(roots, seeds))
            grad_fn.vid = store.vid
        out.append(Variable.from_storage(store, grad_fn=grad_fn, requires_grad=create_graph))
    return out, slots


def record_backward(cluster, tensors, grad_tensors, retain_graph, create_graph, inputs=None):
    """``backward()`` of distributed roots: one instruction; leaves get their ``.grad``."""
    cluster.recorder.check_open()
    retain_graph = create_graph if retain_graph is None else retain_graph
    roots, seeds, codes = _roots_and_seeds(cluster, tensors, grad_tensors, "backward")
    rec = cluster.recorder.rec
    only = None if inputs is None else {id(x) for x in inputs}
    if only is not None and any(not x.is_leaf for x in inputs):
        raise NotImplementedError("backward(inputs=...) with non-leaf inputs is not supported "
                                  "on distributed values: use dg.autograd.grad")
    leaf_vids = frozenset().union(*(_store_of(cluster, t).leaves for t in tensors))
    hooks = []                   # traced first: a hook that fails leaves nothing half-recorded
    if engine.hooks_registered():
        nodes = _reachable([t.grad_fn or engine.next_node_of(t) for t in tensors])
        hooked = [n for n in nodes.values() if n.pre_hooks and (
            not isinstance(n, engine.AccumulateGrad) or only is None or id(n.variable) in only)]
        hooks = _trace_hooks(cluster, hooked, lambda store: store.placement)
    leaves = []
    for vid in sorted(leaf_vids):
        ref = cluster.recorder.leaf_objects.get(vid)
        obj = ref() if ref is not None else None
        if obj is None or (only is not None and id(obj) not in only):
            continue
        leaf_store = _store_of(cluster, obj)
        prev = obj.grad
        if prev is not None and not prev.store.lazy:
            prev = cluster.replicate(prev.detach())
        new = cluster.recorder.new_storage_like(
            leaf_store, leaf_store.leaves | leaf_vids if create_graph else frozenset())
        leaves.append([rec.ref(leaf_store.vid), -1 if prev is None else rec.ref(prev.store.vid),
                       rec.new_slot(new.vid), isinstance(leaf_store.placement, Replicate)])
        grad_fn = None
        if create_graph:
            grad_fn = engine.node_class("grad", LazyNode)(_edges(tensors, grad_tensors))
            grad_fn.vid = new.vid
        grad = Variable.from_storage(new, grad_fn=grad_fn, requires_grad=create_graph)
        cluster.on_rollback(lambda obj=obj, old=obj.grad: setattr(obj, "grad", old))
        obj.grad = grad
    rec.instrs.append(["backward", roots, seeds, codes, bool(retain_graph), leaves,
                       bool(create_graph), hooks])


def record_grad(cluster, outputs, inputs, grad_outputs, retain_graph, create_graph, allow_unused):
    """``dg.autograd.grad`` on distributed outputs: the gradients stay on the workers, as
    distributed values (a replicated input's gradient is Partial: no communication until
    it is used)."""
    cluster.recorder.check_open()
    retain_graph = create_graph if retain_graph is None else retain_graph
    for i, x in enumerate(inputs):
        if not x.requires_grad:
            raise RuntimeError(f"grad: input {i} (shape {tuple(x.shape)}) does not require grad")
    roots, seeds, codes = _roots_and_seeds(cluster, outputs, grad_outputs, "grad")
    nodes = _reachable([t.grad_fn or engine.next_node_of(t) for t in outputs])
    rec = cluster.recorder.rec
    used, stores = [], []
    for i, x in enumerate(inputs):
        node = x.grad_fn if x.grad_fn is not None else engine.next_node_of(x)
        if id(node) not in nodes:
            if not allow_unused:
                raise RuntimeError(f"grad: input {i} (shape {tuple(x.shape)}) was not used in "
                                   "the graph; pass allow_unused=True if this is intended")
            used.append(False)
            stores.append(None)
            continue
        used.append(True)
        stores.append(_store_of(cluster, x))
    live = [s for s in stores if s is not None]
    hooks = []
    if engine.hooks_registered():
        wanted = {id(x.grad_fn if x.grad_fn is not None else engine.next_node_of(x))
                  for x, u in zip(inputs, used) if u}
        hooked = [n for n in nodes.values() if n.pre_hooks and (
            not isinstance(n, engine.AccumulateGrad) or id(n) in wanted)]
        hooks = _trace_hooks(cluster, hooked, lambda store: pl.cotangent(store.placement))
    leaves = frozenset().union(*(_store_of(cluster, t).leaves for t in outputs), *(
        _store_of(cluster, g).leaves for g in grad_outputs or () if isinstance(g, Tensor) and g.requires_grad))
    grads, out_slots = _grad_values(cluster, [(s.shape, s.dtype) for s in live],
                                    [pl.cotangent(s.placement) for s in live], create_graph,
                                    outputs, leaves, grad_outputs)
    rec.instrs.append(["grad", roots, seeds, codes, bool(retain_graph), bool(create_graph),
                       [rec.ref(s.vid) for s in live], out_slots, hooks])
    it = iter(grads)
    return tuple(next(it) if u else None for u in used)
