"""A small float64 training loop shared by the failure tests (in pytest and in the
multi-node script): the parameters live on the workers, one sync per step."""
import numpy as np

import distgrad as dg
import distgrad.nn.functional as F
from distgrad.autograd import Variable
from distgrad.errors import RemoteError

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


def train_classifier(cluster, model, X, batches, make_optimizer, sizes=None):
    """Cross-entropy steps of ``model`` on rows ``X``, one per entry of ``batches`` (its
    labels); ``cluster=None`` trains in this process. A step the workers fail is skipped,
    as a user retrying the batch would. Returns the optimizer and, per step, its loss or
    the ``RemoteError`` it raised.

    Example: ``opt, losses = train_classifier(None, model, X, [y, y], lambda ps: SGD(ps, 0.1))``.
    """
    if cluster is not None:
        cluster.replicate(model)
    opt = make_optimizer(model.parameters())
    results = []
    for labels in batches:
        xb = cluster.shard(X, sizes=sizes) if cluster else dg.tensor(X)
        yb = cluster.shard(labels, sizes=sizes) if cluster else dg.tensor(labels)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        try:
            results.append(loss.item())
        except RemoteError as e:
            results.append(e)
    return opt, results
