"""Stochastic gradient descent with momentum, dampening, Nesterov and weight decay."""
from .foreach import foreach, foreach_
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
        # PyTorch's multi-tensor SGD: each op for all parameters at once (one instruction
        # on a cluster); every parameter's arithmetic is what a loop would do.
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        d_ps = foreach("neg", [(g,) for g in grads]) if group["maximize"] else grads
        if wd:   # p itself, not p.data: grad recording is off here (no detach to record)
            d_ps = foreach("axpby", list(zip(d_ps, params)), a=1.0, b=wd)
        if momentum:
            bufs = [state.get("momentum_buffer") for state in states]
            old = [i for i, buf in enumerate(bufs) if buf is not None]
            new = [i for i, buf in enumerate(bufs) if buf is None]
            foreach_("axpby", [bufs[i] for i in old], [(d_ps[i],) for i in old], a=momentum,
                     b=1 - group["dampening"])
            # a new buffer starts as the first gradient
            for i, buf in zip(new, foreach("clone", [(d_ps[i],) for i in new])):
                bufs[i] = states[i]["momentum_buffer"] = buf
            d_ps = (foreach("axpby", list(zip(d_ps, bufs)), a=1.0, b=momentum)
                    if group["nesterov"] else bufs)
        foreach_("axpby", params, [(d_p,) for d_p in d_ps], a=1.0, b=-lr)
