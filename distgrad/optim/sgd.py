"""Stochastic gradient descent with momentum, dampening, Nesterov and weight decay."""
from .foreach import foreach_
from .optimizer import Optimizer, required


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

    def _update_group(self, group, params, grads, states):
        # PyTorch's multi-tensor SGD: each update for all parameters at once (one
        # instruction on a cluster); every parameter's arithmetic is what a loop would do.
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        d_ps = [-g if group["maximize"] else g for g in grads]
        if wd:   # p itself, not p.data: grad recording is off here (no detach to record)
            d_ps = [d_p.axpby(p, 1.0, wd) for d_p, p in zip(d_ps, params)]
        if momentum:
            bufs = [state.get("momentum_buffer") for state in states]
            old = [i for i, buf in enumerate(bufs) if buf is not None]
            foreach_("axpby", [bufs[i] for i in old], [(d_ps[i],) for i in old], a=momentum,
                     b=1 - group["dampening"])
            for i, state in enumerate(states):
                if bufs[i] is None:      # the buffer starts as the first gradient
                    bufs[i] = state["momentum_buffer"] = d_ps[i].clone()
            d_ps = ([d_p.axpby(buf, 1.0, momentum) for d_p, buf in zip(d_ps, bufs)]
                    if group["nesterov"] else bufs)
        foreach_("axpby", params, [(d_p,) for d_p in d_ps], a=1.0, b=-lr)
