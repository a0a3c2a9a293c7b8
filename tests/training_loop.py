"""A small float64 training loop shared by the failure tests (in pytest and in the
multi-node script): the parameters live on the workers, one sync per step."""
import numpy as np

import distgrad as dg
from distgrad.autograd import Variable

rng = np.random.default_rng(0)
XN, YN, W0 = rng.standard_normal((64, 5)), rng.standard_normal((64, 1)), rng.standard_normal((5, 1))


def train(cluster, steps, on_step=None):
    """Train W on batches of 32 rows; ``cluster=None`` trains in this process."""
    shard = cluster.shard if cluster is not None else dg.tensor
    W = Variable(dg.tensor(W0), requires_grad=True)
    if cluster is not None:
        W = cluster.replicate(W)
    for i in range(steps):
        if on_step is not None:
            on_step(i)
        s = (i * 7) % 32
        loss = ((shard(XN[s:s + 32]) @ W).tanh() - shard(YN[s:s + 32])).pow(2).mean()
        W.grad = None
        loss.backward()
        with dg.no_grad():
            W.data.sub_(W.grad.data * 0.1)
        loss.item()
    return W.data.numpy().copy()
