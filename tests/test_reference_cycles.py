"""A training step leaves nothing of ours in a reference cycle. What a cycle holds waits for
the cyclic collector (which may not run for a long time once the objects are old): a
recording that named itself as its root kept each step's input arrays on the driver and,
through the storages of its sharded inputs, their values on the workers; checkpoint's
gather kept a whole model's exported parameters."""
import gc

import numpy as np

import distgrad as dg
import distgrad.nn.functional as F
from test_differential import Square  # noqa: E402  (tests/ is on sys.path)


def _ours(o):
    """Objects of this project, and arrays (what a cycle would keep of any size)."""
    if isinstance(o, np.ndarray):
        return True
    module = getattr(o, "__module__", None) or getattr(type(o), "__module__", "") or ""
    return module.split(".")[0] in ("distgrad", "workers", "scheduler")


def test_training_steps_leave_no_reference_cycles():
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((16, 5)).astype(np.float32), np.arange(16) % 3
    with dg.init(workers=2, backend="local") as cluster:
        dg.manual_seed(0)
        model = cluster.replicate(dg.nn.Sequential(dg.nn.Linear(5, 8), dg.nn.Tanh(),
                                                   dg.nn.Linear(8, 3)))
        model[0].weight.register_hook(lambda g: g * 0.5)
        opts = [dg.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9),
                dg.optim.Adam(model[2].parameters(), lr=0.01)]

        def step():
            h = Square.apply(model[0](cluster.shard(X)))
            loss = F.cross_entropy(model[2](h), cluster.shard(Y))
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
                opt.step()
            return loss.item()
        step()
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                step()
            dg.nn.Module.state_dict(model)
            cluster.gather(model[0].weight)
            from scheduler.checkpoint import gather
            gather(cluster, {"model": model.state_dict(), "opt": opts[1].state_dict()})
            gc.collect()
            left = [o for o in gc.garbage if _ours(o)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert not left, sorted({type(o).__qualname__ for o in left})
