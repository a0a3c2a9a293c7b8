"""The worker's autograd instructions: ``backward`` and ``grad`` (with gradient buckets
all-reduced while the backward pass runs), ``custom`` (a custom Function's traced backward
as a node), and the hooks the driver traced, run as sub-programs of the step.

``AutogradSteps`` is a part of :class:`~distgrad.workers.worker.Worker` (it uses the
worker's communicator, undo log, device module and ``_step``).
"""
import functools
import time

from distgrad.autograd import engine
from distgrad.tensor import Tensor, Variable, apply_op

from .bucketing import Bucketer


class AutogradSteps:
    """The backward-pass instructions of a worker (mixed into ``Worker``). Example::

        self._backward(["backward", roots, seeds, codes, retain, leaves, False, []], env, [])
    """

    def _run_subprogram(self, structure, captured, inputs, scalars):
        """Run a traced sub-program on ``inputs``; its results (None where -1)."""
        env = [None] * structure["nslots"]
        for s, v in zip(structure["ext"], captured):
            env[s] = v
        for s, v in zip(structure["inputs"], inputs):
            env[s] = v
        for ins in structure["instrs"]:
            self._step(ins, env, (), None, scalars, traced=True)
        return [env[s] if s >= 0 else None for s in structure["results"]]

    def _custom(self, ins, env, scalars):
        """A custom Function's output gets a grad_fn that runs its traced backward."""
        _, name, arg_slots, out_slot, res_slot, captured, structure = ins
        out = env[out_slot]
        args = [env[s] if s >= 0 else None for s in arg_slots]
        next_nodes = tuple(engine.next_node_of(a) if isinstance(a, Tensor) else None for a in args)
        if not any(next_nodes):
            env[res_slot] = out
            return
        node = engine.node_class(name, TracedNode)(next_nodes)
        node.run = functools.partial(self._run_subprogram, structure, scalars=scalars)
        node.captured = [env[s] for s in captured]
        node.versions = [c.store.version if isinstance(c, Tensor) else None for c in node.captured]
        result = Variable.from_array(None, grad_fn=node, requires_grad=True)
        result.set_store(out.store)         # one version counter, as a local Function's
        env[res_slot] = result

    def _install_hooks(self, hooks, env, scalars):
        """Hooks on intermediate values become pre-hooks of their nodes for this pass;
        returns (leaf hooks by id of the leaf, a function removing the pre-hooks)."""
        leaf_hooks, installed = {}, []
        for slot, is_leaf, captured, structure in hooks:
            target = env[slot]
            fn = functools.partial(_run_hook, self._run_subprogram, structure,
                                   [env[s] for s in captured], scalars)
            if is_leaf:
                leaf_hooks[id(target)] = fn
                continue
            node = target.grad_fn
            if node is not None:
                node.register_prehook(fn)
                installed.append((node, fn))

        def remove():
            for node, fn in installed:
                node.pre_hooks.remove(fn)
        return leaf_hooks, remove

    def _seeds(self, env, roots, seeds, codes):
        out = []
        for root, seed_slot, code in zip(roots, seeds, codes):
            seed = (env[seed_slot] if seed_slot >= 0 else
                    Tensor.from_array(self.xp.ones(root.shape, dtype=root.dtype)))
            if code == "R":
                # The cotangent of a replicated value is a sum over workers: rank 0 carries it.
                seed = apply_op("to_partial", seed)
            out.append(seed)
        return out

    def _backward(self, ins, env, scalars):
        _, root_slots, seed_slots, codes, retain, leaves, create_graph, hooks = ins
        t0 = time.perf_counter()
        roots = [env[s] for s in root_slots]
        seeds = self._seeds(env, roots, seed_slots, codes)
        prev, replicated = [], set()
        for leaf_slot, prev_slot, _new, is_rep in leaves:
            leaf = env[leaf_slot]
            prev.append(env[prev_slot] if prev_slot >= 0 else None)
            self.undo.grad(leaf)
            leaf.grad = None                 # this backward's gradient alone is all-reduced
            if is_rep:
                replicated.add(id(leaf))
        leaf_hooks, remove_hooks = self._install_hooks(hooks, env, scalars)
        # Under create_graph the sums are ops of the graph (below), not in-place buckets.
        bucketer = (Bucketer(self.comm, self.bucket_cap, replicated, self.compress, self.span)
                    if self.comm and not create_graph else None)
        try:
            engine.run_backward(roots, seeds, retain_graph=bool(retain), create_graph=bool(create_graph),
                                on_leaf_ready=bucketer.add if bucketer else None)
            if bucketer:
                bucketer.finish()
        finally:
            remove_hooks()
        with engine.enable_grad() if create_graph else engine.no_grad():
            for (leaf_slot, _p, new_slot, is_rep), old in zip(leaves, prev):
                leaf = env[leaf_slot]
                g = leaf.grad
                if g is not None and create_graph and is_rep and self.comm is not None:
                    g = apply_op("allreduce", g)
                if g is not None and id(leaf) in leaf_hooks:
                    g = leaf_hooks[id(leaf)](g)
                if old is not None:
                    g = old if g is None else (old + g if create_graph else
                                               Variable.from_array(old.store.array + g.store.array))
                if g is None:
                    g = Variable.from_array(self.xp.zeros(leaf.shape, dtype=leaf.dtype))
                leaf.grad = g
                env[new_slot] = g
        self.stats["backward_s"] += time.perf_counter() - t0

    def _grad(self, ins, env, scalars):
        """``autograd.grad``: gradients of the inputs, left in slots (nothing accumulates)."""
        _, root_slots, seed_slots, codes, retain, create_graph, input_slots, out_slots, hooks = ins
        t0 = time.perf_counter()
        roots = [env[s] for s in root_slots]
        inputs = [env[s] for s in input_slots]
        leaf_hooks, remove_hooks = self._install_hooks(hooks, env, scalars)
        try:
            grads = engine.run_backward(roots, self._seeds(env, roots, seed_slots, codes),
                                        retain_graph=bool(retain), create_graph=bool(create_graph),
                                        inputs=inputs)
        finally:
            remove_hooks()
        with engine.enable_grad() if create_graph else engine.no_grad():
            for x, g, slot in zip(inputs, grads, out_slots):
                if g is None:
                    g = Variable.from_array(self.xp.zeros(x.shape, dtype=x.dtype))
                elif x.grad_fn is None and id(x) in leaf_hooks:
                    g = leaf_hooks[id(x)](g)
                env[slot] = g if isinstance(g, Variable) else Variable.from_array(g.store.array)
        self.stats["backward_s"] += time.perf_counter() - t0


class TracedNode(engine.Node):
    """grad_fn of a custom Function on a worker: runs the backward rule the driver traced
    (``run``) on the values it captured, checking they were not modified in place."""

    __slots__ = ("run", "captured", "versions")

    def input_grads(self, grad):
        if self.released:
            raise RuntimeError(f"Trying to backward through the graph a second time "
                               f"({self.name()}); specify retain_graph=True.")
        for t, v in zip(self.captured, self.versions):
            if v is not None:
                engine.check_version(t, v, self)
        return self.run(self.captured, [grad])

    def release(self):
        super().release()
        self.captured = ()


def _run_hook(run, structure, captured, scalars, grad):
    return run(structure, captured, [grad], scalars)[0]
