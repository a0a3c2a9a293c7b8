"""``distgrad demo``: data-parallel training of a small network on built-in data.

Starts a local Ray instance with 2 workers (or joins a cluster), trains an MLP on a
generated 3-class spiral data set (a held-out fifth kept aside), reports training and
held-out accuracy and throughput, and checks on one batch that the distributed gradients
equal the single-process ones. It says what it is doing as it goes.
"""
import contextlib
import logging
import sys
import time

import numpy as np

import distgrad as dg

log = logging.getLogger("distgrad")

HELD_OUT = 0.2                  # fraction of the data never trained on
PROGRESS_EVERY_S = 5.0          # a progress line this often when stdout is not a terminal


class MissingDependency(RuntimeError):
    """An optional package the chosen options need is not installed."""


def spiral_data(n_per_class=1000, classes=3, noise=0.2, seed=0):
    """A generated 2-D spiral classification set (no download). Returns (X, y).

    Example: ``X, y = spiral_data(100)`` gives 300 points of 3 classes.
    """
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


def split(X, y, held_out=HELD_OUT, seed=0):
    """Shuffle and split into (X_train, y_train, X_test, y_test); ``held_out`` of the rows
    go to the test part. Example: ``Xtr, ytr, Xte, yte = split(*spiral_data())``."""
    order = np.random.default_rng(seed).permutation(len(X))
    n_test = int(round(len(X) * held_out))
    test, train = order[:n_test], order[n_test:]
    return X[train], y[train], X[test], y[test]


def make_model(nn, hidden=64, classes=3):
    return nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def gradient_check(cluster, model, X, y):
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


def check_dependencies(plot=None):
    """Fail before training, not after, when an option needs a package that is missing.

    Example: ``check_dependencies(plot="loss.png")``.
    """
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise MissingDependency("--plot needs matplotlib: pip install matplotlib "
                                    "(or pip install '.[plot]' in the distgrad checkout)") from None


class _Progress:
    """A tqdm bar on a terminal; elsewhere (a file, a pipe, `ray job logs`) a plain line
    every few seconds. Both show the same samples/s figure as the summary."""

    def __init__(self, steps, desc, enabled=True, out=None):
        self.steps, self.desc, self.enabled = steps, desc, enabled
        self.out = out or sys.stdout
        self.bar = None
        if enabled and self.out.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=steps, desc=desc, unit="step", file=self.out)
        self.last_line = None

    def update(self, step, loss, samples_per_s):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{samples_per_s:,.0f}", refresh=False)
            return
        now = time.time()
        if self.last_line is None or now - self.last_line >= PROGRESS_EVERY_S or step == self.steps:
            self.last_line = now
            print(f"{self.desc}: step {step}/{self.steps}, loss {loss:.4f}, "
                  f"{samples_per_s:,.0f} samples/s", file=self.out, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _startup_messages(verbose, backend):
    """Show the scheduler's start-up steps (starting Ray, placing workers) as plain lines,
    and hide Ray's own start-up warnings unless ``verbose``."""
    if backend == "ray":
        # Importing Ray sets up its "ray" logger (level INFO): quiet it after that.
        from .scheduler import ray_gang  # noqa: F401
    sched = logging.getLogger("distgrad.scheduler")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ray_log = logging.getLogger("ray")
    saved = (sched.level, sched.propagate, ray_log.level)
    sched.addHandler(handler)
    sched.setLevel(logging.INFO)
    sched.propagate = False          # with -v the root handler would print each line twice
    if not verbose:
        ray_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        sched.removeHandler(handler)
        sched.setLevel(saved[0])
        sched.propagate = saved[1]
        ray_log.setLevel(saved[2])


def run(workers=2, address=None, device="cpu", steps=300, backend="ray", batch_size=256, lr=0.1,
        seed=0, plot=None, timeline=None, progress=True, verbose=False, log_to_driver=True,
        pin_cpus=False):
    """Train and return a dict of results (accuracies, gradient check, throughput, times).

    Example: ``run(workers=2, backend="local", steps=50, progress=False)["test_accuracy"]``.
    """
    check_dependencies(plot)
    nn, F = dg.nn, dg.nn.functional
    dg.manual_seed(seed)
    X_train, y_train, X_test, y_test = split(*spiral_data(seed=seed), seed=seed)
    rng = np.random.default_rng(seed)
    t_start = time.time()
    kwargs = {"log_to_driver": log_to_driver, "pin_cpus": pin_cpus} if backend == "ray" else {}
    with _startup_messages(verbose, backend):
        cluster = dg.init(workers=workers, device=device, address=address, backend=backend, **kwargs)
    with cluster:
        startup_s = time.time() - t_start
        model = cluster.replicate(make_model(nn))
        opt = dg.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        losses, samples = [], 0
        bar = _Progress(steps, f"training on {workers} {backend} workers", enabled=progress)
        t0 = time.time()
        for step in range(1, steps + 1):
            idx = rng.integers(0, len(X_train), batch_size)
            xb, yb = cluster.shard(X_train[idx]), cluster.shard(y_train[idx])
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            samples += batch_size
            bar.update(step, losses[-1], samples / (time.time() - t0))
        train_s = time.time() - t0
        bar.close()

        def accuracy(X, y):
            return float((model(cluster.shard(X)).argmax(1).numpy() == y).mean())
        train_acc, test_acc = accuracy(X_train, y_train), accuracy(X_test, y_test)
        worst = gradient_check(cluster, model, X_train[:512], y_train[:512])
        if timeline:
            cluster.timeline(timeline)
    if plot:
        _plot(losses, plot)
    return {"train_accuracy": train_acc, "test_accuracy": test_acc,
            "final_loss": losses[-1] if losses else None, "grad_max_diff": worst,
            "samples_per_s": samples / train_s if train_s > 0 else 0.0, "train_seconds": train_s,
            "startup_seconds": startup_s, "seconds": time.time() - t_start, "losses": losses,
            "n_train": len(X_train), "n_test": len(X_test)}


def _plot(losses, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_yscale("log")
    ax.set_title("distgrad demo: training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
