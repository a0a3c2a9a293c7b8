"""Shared by the worker-side data tests (in pytest and in the two-node script): a dataset
on disk whose column 0 is the row number, and a float64 softmax regression trained over
global batches, on a cluster or in this process."""
import os

import numpy as np

import distgrad as dg
import distgrad.nn.functional as F
from distgrad.autograd import Variable

D, CLASSES = 5, 3


def rows_dataset(n, d=D, seed=0, dtype=np.float64):
    """X (n, d) with X[:, 0] the row number, y = row number % CLASSES."""
    X = np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)
    X[:, 0] = np.arange(n)
    return X, (np.arange(n) % CLASSES).astype(np.int64)


def write_npy(root, X, y, cuts=(0.3, 0.31, 0.7)):
    """X as a directory of uneven .npy shards (one of a single row), y as one .npy file."""
    os.makedirs(os.path.join(root, "x"), exist_ok=True)
    bounds = [0] + [int(c * len(X)) for c in cuts] + [len(X)]
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.save(os.path.join(root, "x", f"part-{k:03d}.npy"), X[a:b])
    np.save(os.path.join(root, "y.npy"), y)
    return {"x": os.path.join(root, "x"), "y": os.path.join(root, "y.npy")}


def fit(batches, cluster=None, d=D, seen=None, on_step=None):
    """SGD with momentum over ``batches`` ((x, y) pairs); returns (W, b). ``seen`` collects
    the row numbers of every batch (column 0), fetched from the workers."""
    rng = np.random.default_rng(1)
    W = Variable(dg.tensor(rng.standard_normal((d, CLASSES)) * 0.1), requires_grad=True)
    b = Variable(dg.tensor(np.zeros(CLASSES)), requires_grad=True)
    if cluster is not None:
        cluster.replicate(W)
        cluster.replicate(b)
    opt = dg.optim.SGD([W, b], lr=0.05, momentum=0.9)
    for i, (xb, yb) in enumerate(batches):
        if on_step is not None:
            on_step(i)
        # Column 0 (the row number) scaled down so it does not dominate the features.
        loss = F.cross_entropy(xb @ W * 0.01 + b, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
        if seen is not None:
            seen.extend(int(v) for v in xb[:, 0].numpy())
    return W.detach().numpy().copy(), b.detach().numpy().copy()


def local_batches(ds, X, y, epochs):
    """The global batches ``ds`` reads, made from the in-memory arrays in this process."""
    out = []
    for e in range(epochs):
        for k in range(len(ds)):
            rows = ds.batch_rows(e, k)
            out.append((dg.tensor(X[rows]), dg.tensor(y[rows])))
    return out


def epochs_of(ds, epochs):
    for _ in range(epochs):
        yield from ds
