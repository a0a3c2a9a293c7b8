"""Adadelta (Zeiler 2012), step for step as PyTorch computes it."""
from .foreach import foreach, foreach_
from .optimizer import Optimizer


class Adadelta(Optimizer):
    """Adadelta: per-parameter step sizes from running averages of squared gradients and
    squared updates, scaled by ``lr`` (PyTorch's default 1.0).

    Example::

        opt = dg.optim.Adadelta(model.parameters(), lr=1.0, rho=0.9)
    """

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, maximize=False):
        if lr < 0.0 or eps < 0.0:
            raise ValueError(f"invalid learning rate ({lr}) or epsilon ({eps})")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"invalid rho value: {rho}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize))

    def _update_group(self, group, params, grads, states):
        # Each op for all parameters at once (one instruction on a cluster), each
        # parameter's arithmetic what the single-tensor Adadelta computes.
        lr, rho, eps, wd = group["lr"], group["rho"], group["eps"], group["weight_decay"]
        if group["maximize"]:
            grads = foreach("neg", [(g,) for g in grads])
        if wd:        # p itself, not p.data: grad recording is off here (no detach to record)
            grads = foreach("axpby", [(g, p) for g, p in zip(grads, params)], a=1.0, b=wd)
        new = [i for i, state in enumerate(states) if "square_avg" not in state]
        zeros = foreach("mul", [(grads[i], 0) for i in new] * 2)
        for k, i in enumerate(new):
            states[i]["square_avg"], states[i]["acc_delta"] = zeros[k], zeros[k + len(new)]
        for state in states:
            state["step"] = state.get("step", 0) + 1
        square_avgs = [state["square_avg"] for state in states]
        acc_deltas = [state["acc_delta"] for state in states]
        foreach_("axpby", square_avgs, [(sq,) for sq in foreach("mul", [(g, g) for g in grads])],
                 a=rho, b=1 - rho)
        # delta = (acc_delta + eps).sqrt() / (square_avg + eps).sqrt() * grad
        roots = [foreach("sqrt", [(s,) for s in foreach("add", [(a, eps) for a in avgs])])
                 for avgs in (acc_deltas, square_avgs)]
        deltas = foreach("mul", list(zip(foreach("div", list(zip(*roots))), grads)))
        foreach_("axpby", acc_deltas, [(sq,) for sq in foreach("mul", [(d, d) for d in deltas])],
                 a=rho, b=1 - rho)
        foreach_("axpby", params, [(d,) for d in deltas], a=1.0, b=-lr)
