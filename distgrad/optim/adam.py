"""Adam and AdamW (decoupled weight decay), with optional AMSGrad."""
import math

from .optimizer import Optimizer, axpby_


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

    def _update(self, p, grad, state, group):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if group["maximize"]:
            grad = -grad
        if wd and self._decoupled:
            p.data.mul_(1 - lr * wd)
        elif wd:
            grad = grad.axpby(p.data, 1.0, wd)
        step = state["step"] = state.get("step", 0) + 1
        if step == 1:
            # Zero-initialised moments after one update, without materialising the zeros.
            state["exp_avg"] = m = grad * (1 - b1)
            state["exp_avg_sq"] = v = grad * grad * (1 - b2)
        else:
            m, v = state["exp_avg"], state["exp_avg_sq"]
            axpby_(m, grad, b1, 1 - b1)
            axpby_(v, grad * grad, b2, 1 - b2)
        if group["amsgrad"]:
            vmax = state.get("max_exp_avg_sq")
            vmax = state["max_exp_avg_sq"] = v.clone() if vmax is None else vmax.maximum(v)
            v = vmax
        bc1 = 1 - b1 ** step
        bc2_sqrt = math.sqrt(1 - b2 ** step)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        axpby_(p.data, m / denom, 1.0, -lr / bc1)


class AdamW(Adam):
    """Adam with decoupled weight decay (default 0.01), as PyTorch's AdamW.

    Example::

        opt = dg.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    """

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize)
