"""Adadelta (Zeiler 2012), step for step as PyTorch computes it."""
from .optimizer import Optimizer, axpby_


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

    def _update(self, p, grad, state, group):
        lr, rho, eps, wd = group["lr"], group["rho"], group["eps"], group["weight_decay"]
        if group["maximize"]:
            grad = -grad
        if wd:
            grad = grad.axpby(p.data, 1.0, wd)
        state["step"] = state.get("step", 0) + 1
        if "square_avg" not in state:
            state["square_avg"] = grad * 0
            state["acc_delta"] = grad * 0
        square_avg, acc_delta = state["square_avg"], state["acc_delta"]
        axpby_(square_avg, grad * grad, rho, 1 - rho)
        delta = (acc_delta + eps).sqrt() / (square_avg + eps).sqrt() * grad
        axpby_(acc_delta, delta * delta, rho, 1 - rho)
        axpby_(p.data, delta, 1.0, -lr)
