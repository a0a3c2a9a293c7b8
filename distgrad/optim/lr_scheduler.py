"""Learning-rate schedules: ``StepLR``, ``MultiStepLR``, ``ExponentialLR``, ``LambdaLR``,
``CosineAnnealingLR``. Call ``scheduler.step()`` once per epoch, after ``optimizer.step()``.

Example::

    sched = dg.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)
    for epoch in range(30):
        train(...); sched.step()
"""
import bisect
import math

from ..compat import missing as _missing


class LRScheduler:
    """Base class: sets each group's ``lr`` from ``get_lr()`` at every ``step()``."""

    def __init__(self, optimizer, last_epoch=-1):
        self.optimizer = optimizer
        if last_epoch == -1:
            for g in optimizer.param_groups:
                g.setdefault("initial_lr", g["lr"])
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def lr_at(self, base_lr, epoch):
        """The learning rate of a group with ``base_lr`` at ``epoch`` (closed form)."""
        raise NotImplementedError

    def get_lr(self):
        """The rates for the current epoch, one per group. Example: ``sched.get_lr()``."""
        return [self.lr_at(b, self.last_epoch) for b in self.base_lrs]

    def get_last_lr(self):
        """The learning rates set by the last ``step()``."""
        return list(self._last_lr)

    def step(self):
        """Advance one epoch and set each group's lr. Example: ``opt.step(); sched.step()``."""
        self.last_epoch += 1
        for g, lr in zip(self.optimizer.param_groups, self.get_lr()):
            g["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        """Everything but the optimizer, for checkpoints. Example: ``dg.save(sched.state_dict(), p)``."""
        return {k: v for k, v in self.__dict__.items() if k != "optimizer" and not callable(v)}

    def load_state_dict(self, state_dict):
        """Restore from ``state_dict()``. Example: ``sched.load_state_dict(dg.load(p))``."""
        self.__dict__.update(state_dict)


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (epoch // step_size). Example: ``StepLR(opt, 30, gamma=0.1)``."""

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** (epoch // self.step_size)


class MultiStepLR(LRScheduler):
    """Multiply by gamma at each milestone. Example: ``MultiStepLR(opt, [30, 80])``."""

    def __init__(self, optimizer, milestones, gamma=0.1, last_epoch=-1):
        self.milestones, self.gamma = sorted(milestones), gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** bisect.bisect_right(self.milestones, epoch)


class ExponentialLR(LRScheduler):
    """lr = base_lr * gamma ** epoch. Example: ``ExponentialLR(opt, 0.95)``."""

    def __init__(self, optimizer, gamma, last_epoch=-1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.gamma ** epoch


class LambdaLR(LRScheduler):
    """lr = base_lr * fn(epoch). Example: ``LambdaLR(opt, lambda e: 0.95 ** e)``."""

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        self.lr_lambda = lr_lambda
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return base_lr * self.lr_lambda(epoch)


class CosineAnnealingLR(LRScheduler):
    """Cosine from base_lr down to eta_min over T_max epochs. Example: ``CosineAnnealingLR(opt, 50)``."""

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr, epoch):
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2


_LRScheduler = LRScheduler


def __getattr__(name):
    raise _missing("torch.optim.lr_scheduler", name)       # a PyTorch name we lack: say so, and what to use
