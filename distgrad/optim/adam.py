"""Adam and AdamW (decoupled weight decay), with optional AMSGrad."""
import math

from .foreach import foreach, foreach_
from .optimizer import Optimizer


class Adam(Optimizer):
    """Adam, step for step as PyTorch computes it.

    Example::

        opt = dg.optim.Adam(model.parameters(), lr=1e-3)
    """

    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, maximize=False):
        if lr < 0.0 or eps < 0.0:
            raise ValueError(f"invalid learning rate ({lr}) or epsilon ({eps})")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid beta parameters: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize))

    def _update_group(self, group, params, grads, states):
        # PyTorch's multi-tensor Adam: each op for all parameters at once (one instruction
        # on a cluster), each parameter's arithmetic what the single-tensor Adam computes.
        lr, wd = group["lr"], group["weight_decay"]
        if group["maximize"]:
            grads = foreach("neg", [(g,) for g in grads])
        if wd and self._decoupled:
            foreach_("mul", params, [(1 - lr * wd,)] * len(params))
        elif wd:      # p itself, not p.data: grad recording is off here (no detach to record)
            grads = foreach("axpby", [(g, p) for g, p in zip(grads, params)], a=1.0, b=wd)
        by_step = {}      # parameters that got their first gradient later are steps behind
        for i, state in enumerate(states):
            state["step"] = state.get("step", 0) + 1
            by_step.setdefault(state["step"], []).append(i)
        for step, ids in by_step.items():
            self._adam_steps(group, step, [params[i] for i in ids], [grads[i] for i in ids],
                             [states[i] for i in ids])

    @staticmethod
    def _adam_steps(group, step, params, grads, states):
        """The moments' and the parameters' update of parameters at one ``step``."""
        lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
        squares = foreach("mul", [(g, g) for g in grads])
        if step == 1:
            # Zero-initialised moments after one update, without materialising the zeros.
            ms = foreach("mul", [(g, 1 - b1) for g in grads])
            vs = foreach("mul", [(sq, 1 - b2) for sq in squares])
            for state, m, v in zip(states, ms, vs):
                state["exp_avg"], state["exp_avg_sq"] = m, v
        else:
            ms = [state["exp_avg"] for state in states]
            vs = [state["exp_avg_sq"] for state in states]
            foreach_("axpby", ms, [(g,) for g in grads], a=b1, b=1 - b1)
            foreach_("axpby", vs, [(sq,) for sq in squares], a=b2, b=1 - b2)
        if group["amsgrad"]:
            for i, state in enumerate(states):
                vmax = state.get("max_exp_avg_sq")
                vs[i] = state["max_exp_avg_sq"] = vs[i].clone() if vmax is None else vmax.maximum(vs[i])
        bc1 = 1 - b1 ** step
        bc2_sqrt = math.sqrt(1 - b2 ** step)
        denoms = foreach("div", [(r, bc2_sqrt) for r in foreach("sqrt", [(v,) for v in vs])])
        foreach_("add", denoms, [(eps,)] * len(denoms))
        foreach_("axpby", params, [(d,) for d in foreach("div", list(zip(ms, denoms)))],
                 a=1.0, b=-lr / bc1)


class AdamW(Adam):
    """Adam with decoupled weight decay (default 0.01), as PyTorch's AdamW.

    Example::

        opt = dg.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    """

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize)
