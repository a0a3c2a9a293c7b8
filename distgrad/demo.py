"""``distgrad demo``: data-parallel training of a small network on built-in data.

Starts a local Ray instance with 2 workers (or joins a cluster), trains an MLP on a
generated 3-class spiral data set with a progress bar, reports accuracy, and checks on
one batch that the distributed gradients equal the single-process ones.
"""
import logging
import time

import numpy as np

log = logging.getLogger("distgrad")


def spiral_data(n_per_class=1000, classes=3, noise=0.2, seed=0):
    """A generated 2-D spiral classification set (no download). Returns (X, y)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(classes):
        r = np.linspace(0.05, 1.0, n_per_class)
        t = np.linspace(c * 4.0, (c + 1) * 4.0, n_per_class) + rng.standard_normal(n_per_class) * noise
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], 1))
        ys.append(np.full(n_per_class, c))
    X = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys).astype(np.int64)
    return X, y


def make_model(nn, hidden=64, classes=3):
    return nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def gradient_check(cluster, model, X, y, dg):
    """Max |distributed grad - single-process grad| over all parameters on one batch."""
    nn, F = dg.nn, dg.nn.functional
    local = make_model(nn)
    local.load_state_dict({k: dg.tensor(np.asarray(v.data.numpy())) for k, v in model.state_dict().items()})
    for m in (model, local):
        m.zero_grad()
    F.cross_entropy(model(cluster.shard(X)), cluster.shard(y)).backward()
    F.cross_entropy(local(dg.tensor(X)), dg.tensor(y)).backward()
    worst = 0.0
    for (name, p), q in zip(model.named_parameters(), local.parameters()):
        worst = max(worst, float(np.abs(p.grad.data.numpy() - q.grad.data.numpy()).max()))
    return worst


def run(workers=2, address=None, device="cpu", steps=300, backend="ray", batch_size=256, lr=0.1,
        seed=0, plot=None, timeline=None, progress=True):
    """Train and return a dict of results (accuracy, gradient check, throughput)."""
    import distgrad as dg
    from tqdm import tqdm
    nn, F = dg.nn, dg.nn.functional
    dg.manual_seed(seed)
    X, y = spiral_data(seed=seed)
    rng = np.random.default_rng(seed)
    t_start = time.time()
    with dg.init(workers=workers, device=device, address=address, backend=backend) as cluster:
        model = cluster.replicate(make_model(nn))
        opt = dg.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        losses, samples, t0 = [], 0, time.time()
        bar = tqdm(range(steps), desc=f"training on {workers} {backend} workers", disable=not progress,
                   unit="step")
        for step in bar:
            idx = rng.integers(0, len(X), batch_size)
            xb, yb = cluster.shard(X[idx]), cluster.shard(y[idx])
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            samples += batch_size
            bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_per_s=f"{samples / (time.time() - t0):,.0f}")
        pred = model(cluster.shard(X)).argmax(1).numpy()
        accuracy = float((pred == y).mean())
        worst = gradient_check(cluster, model, X[:512], y[:512], dg)
        if timeline:
            cluster.timeline(timeline)
        throughput = samples / (time.time() - t0)
    if plot:
        _plot(losses, plot)
    return {"accuracy": accuracy, "final_loss": losses[-1] if losses else None, "grad_max_diff": worst,
            "samples_per_s": throughput, "seconds": time.time() - t_start, "losses": losses}


def _plot(losses, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'distgrad[plot]'") from None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_yscale("log")
    ax.set_title("distgrad demo: training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
