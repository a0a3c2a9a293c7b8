"""Stochastic gradient descent with momentum, dampening, Nesterov and weight decay."""
from .optimizer import Optimizer, axpby_, required


class SGD(Optimizer):
    """SGD as PyTorch computes it (momentum buffer starts as the first gradient).

    Example::

        opt = dg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt.zero_grad(); loss.backward(); opt.step()
    """

    def __init__(self, params, lr=required, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, maximize=False):
        if lr is not required and lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if momentum < 0.0 or weight_decay < 0.0:
            raise ValueError(f"invalid momentum ({momentum}) or weight_decay ({weight_decay})")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize))

    def _update(self, p, grad, state, group):
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        d_p = -grad if group["maximize"] else grad
        if wd:
            d_p = d_p.axpby(p.data, 1.0, wd)
        if momentum:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d_p.clone()
            else:
                axpby_(buf, d_p, momentum, 1 - group["dampening"])
            d_p = d_p.axpby(buf, 1.0, momentum) if group["nesterov"] else buf
        axpby_(p.data, d_p, 1.0, -lr)
