"""``Optimizer``: parameter groups, state, zero_grad and state_dict shared by SGD/Adam/AdamW.

Updates are tensor ops on the parameters' data and ``p.grad.data`` (never raw arrays), so
on distributed parameters they are recorded and run on the workers: as one instruction per
op for all parameters where an optimizer uses :mod:`.foreach`.
"""
import copy
import math

from ..autograd import engine
from ..nn.module import clear_grad
from ..tensor import Tensor


# A foreach op's temporaries live for every parameter of its call at once: updates go in
# chunks of this many bytes of parameters, so that a step's peak memory stays near that of
# a loop over parameters (a 48M-parameter MLP's Adam step in one call: +450 MB at its peak).
FOREACH_CHUNK_BYTES = 32 << 20


def _chunks(params):
    """``params`` in consecutive runs of at most FOREACH_CHUNK_BYTES (or one parameter)."""
    chunk, size = [], 0
    for p in params:
        store = p.store
        nbytes = math.prod(store.shape) * store.dtype.itemsize
        if chunk and size + nbytes > FOREACH_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += nbytes
    if chunk:
        yield chunk


class _Required:
    def __repr__(self):
        return "<required parameter>"


required = _Required()


class Optimizer:
    """Base class: holds ``param_groups`` (dicts of params and hyper-parameters) and ``state``.

    Example::

        opt = dg.optim.SGD([{"params": model.fc.parameters(), "lr": 0.1},
                            {"params": model.conv.parameters()}], lr=0.01)
    """

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.state = {}
        self.param_groups = []
        if isinstance(params, Tensor):
            raise TypeError("params argument given to the optimizer should be an iterable of "
                            f"Tensors or dicts, but got {type(params).__name__}")
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for g in groups:
            self.add_param_group(g)

    def add_param_group(self, group):
        """Add a group of parameters (with its own hyper-parameters) to optimise.

        Raises for a non-leaf tensor, or a parameter given twice (within or across groups).

        Example::

            opt.add_param_group({"params": head.parameters(), "lr": 0.1})
        """
        group = dict(group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen = set()
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but parameter {i} of the "
                                f"group is a {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError(f"can't optimize a non-leaf Tensor (parameter {i} of the group, "
                                 f"shape {tuple(p.shape)}, grad_fn {p.grad_fn.name()})")
            if id(p) in seen:
                raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) appears twice in the "
                                 "same parameter group")
            seen.add(id(p))
        for other in self.param_groups:
            if seen & {id(q) for q in other["params"]}:
                raise ValueError("some parameters appear in more than one parameter group")
        group["params"] = params
        for k, v in self.defaults.items():
            if v is required and k not in group:
                raise ValueError(f"parameter group didn't specify a value of required "
                                 f"optimization parameter {k}")
            group.setdefault(k, v)
        self.param_groups.append(group)

    def zero_grad(self, set_to_none=True):
        """Clear the gradients of every parameter (``None`` by default). Example: ``opt.zero_grad()``."""
        for group in self.param_groups:
            for p in group["params"]:
                clear_grad(p, set_to_none)

    def step(self, closure=None):
        """Update every parameter that has a gradient; ``closure`` re-evaluates the loss.

        Example::

            loss.backward(); opt.step()
        """
        loss = None
        if closure is not None:
            with engine.enable_grad():
                loss = closure()
        self._keep_for_rollback()
        with engine.no_grad():
            for group in self.param_groups:
                for params in _chunks([p for p in group["params"] if p.grad is not None]):
                    self._update_group(group, params, [p.grad.data for p in params],
                                       [self.state.setdefault(p, {}) for p in params])
        return loss

    def _update_group(self, group, params, grads, states):
        """Update the ``params`` of one group that have a gradient. Here one ``_update``
        per parameter; an optimizer whose arithmetic is the same for every parameter
        overrides it with :mod:`.foreach` calls (one instruction per update for all the
        parameters of a cluster)."""
        for p, grad, state in zip(params, grads, states):
            self._update(p, grad, state, group)

    def _keep_for_rollback(self):
        """On distributed parameters the update is recorded, not run: if the step then fails
        on a worker (and is rolled back there), the driver-side state (step counts, which
        moments exist) is put back too, so a retried step is applied exactly once."""
        clusters = {}
        for g in self.param_groups:
            for p in g["params"]:
                store = p.store
                if store.lazy:
                    clusters[id(store.cluster)] = store.cluster
        if not clusters:
            return
        saved = {p: dict(st) for p, st in self.state.items()}

        def restore():
            self.state.clear()
            self.state.update((p, dict(st)) for p, st in saved.items())
        for cluster in clusters.values():
            cluster.on_rollback(restore)

    def _update(self, p, grad, state, group):
        raise NotImplementedError

    # ------------------------------------------------------------ state
    def state_dict(self):
        """Hyper-parameters and per-parameter state, parameters referred to by index.

        Example::

            dg.save({"model": model.state_dict(), "opt": opt.state_dict()}, "ckpt.dgt")
        """
        index, groups = {}, []
        for g in self.param_groups:
            for p in g["params"]:
                index.setdefault(id(p), len(index))
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = [index[id(p)] for p in g["params"]]
            groups.append(packed)
        state = {index[id(p)]: dict(s) for p, s in self.state.items() if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore hyper-parameters and state saved by ``state_dict`` (same parameter layout)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups, the "
                             f"optimizer has {len(self.param_groups)}")
        params = []
        for i, (mine, theirs) in enumerate(zip(self.param_groups, groups)):
            if len(mine["params"]) != len(theirs["params"]):
                raise ValueError(f"parameter group {i}: loaded state dict has "
                                 f"{len(theirs['params'])} parameters, the optimizer has "
                                 f"{len(mine['params'])}")
            params.extend(zip(theirs["params"], mine["params"]))
        by_index = dict(params)
        new_state = {}
        for key, s in state_dict["state"].items():
            p = by_index.get(int(key))
            if p is None:
                raise ValueError(f"loaded optimizer state refers to parameter {key}, which the "
                                 "optimizer does not have")
            new_state[p] = {k: self._state_value(p, k, v) for k, v in s.items()}
        for mine, theirs in zip(self.param_groups, groups):
            mine.update({k: copy.deepcopy(v) for k, v in theirs.items() if k != "params"})
        self.state = new_state

    @staticmethod
    def _state_value(p, key, v):
        if not isinstance(v, Tensor):
            return v
        if tuple(v.shape) != tuple(p.shape):
            raise ValueError(f"optimizer state '{key}' has shape {tuple(v.shape)}, but its "
                             f"parameter has shape {tuple(p.shape)}")
        # A private copy on the parameter's device and dtype.
        return Tensor(v.detach().to(p.device).astype(p.dtype)).clone()

    def __repr__(self):
        lines = [type(self).__name__ + " ("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines.extend(f"    {k}: {v}" for k, v in sorted(g.items()) if k != "params")
        return "\n".join(lines + [")"])
