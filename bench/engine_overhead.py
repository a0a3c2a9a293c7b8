"""Single-process engine overhead: distgrad against hand-written NumPy and against PyTorch.

Two cases, each measured against its baseline in the same run (alternating blocks, median
of the paired per-round ratios, see ``_results.paired``):

* MLP 784-1024-1024-10, batch 256, forward + backward of the cross-entropy, against the
  same arithmetic written by hand in NumPy (the floor any NumPy engine can reach).
  Target (issue 13): <= 1.10x.
* Tiny ops: a chain of 200 elementwise ops on a 4-element tensor with requires_grad,
  forward + backward, per-op cost against PyTorch's. Target: <= 1.0x.

    python bench/engine_overhead.py --threads 2
"""
import importlib.util
import os
import sys
import time


def _results_module():
    # Loaded by its path: importing distgrad.bench would load numpy before the threads are pinned.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_results.py")
    spec = importlib.util.spec_from_file_location("_bench_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_results = _results_module()


def _parse():
    return _results.parse_paired(_results.paired_parser(__doc__, 2,
                                                        "BLAS threads (and torch intra-op)"))


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    _results.pin_threads(ARGS.threads)        # before numpy is imported

import numpy as np  # noqa: E402

if not __package__:       # run as a file in a checkout: make distgrad importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distgrad as dg  # noqa: E402
import distgrad.nn.functional as F  # noqa: E402

SIZES = (784, 1024, 1024, 10)
BATCH = 256
CHAIN = 200


def numpy_mlp_step(x, y, layers):
    """Forward + backward of relu-MLP cross-entropy by hand; returns (loss, grads).

    ``layers`` is [(W, b), ...] with W of shape (out, in) as in nn.Linear.
    Example: ``loss, grads = numpy_mlp_step(x, y, [(W1, b1), (W2, b2)])``.
    """
    acts, pre = [x], []
    h = x
    for i, (w, b) in enumerate(layers):
        z = h @ w.T + b
        pre.append(z)
        h = np.maximum(z, 0) if i < len(layers) - 1 else z
        acts.append(h)
    z = acts[-1]
    shifted = z - z.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = -(shifted[rows, y] - np.log(s[:, 0])).mean()
    g = e / s
    g[rows, y] -= 1
    g /= len(y)
    grads = []
    for i in range(len(layers) - 1, -1, -1):
        w, _ = layers[i]
        grads.append((g.T @ acts[i], g.sum(axis=0)))
        if i:
            g = (g @ w) * (pre[i - 1] > 0)
    return loss, grads[::-1]


def mlp_case(rng):
    """(distgrad step, NumPy step) computing the same loss and gradients."""
    model = dg.nn.Sequential(*[m for i in range(len(SIZES) - 1) for m in
                               ([dg.nn.Linear(SIZES[i], SIZES[i + 1])] +
                                ([dg.nn.ReLU()] if i < len(SIZES) - 2 else []))])
    linears = [m for m in model if isinstance(m, dg.nn.Linear)]
    layers = [(lin.weight.data.numpy().copy(), lin.bias.data.numpy().copy()) for lin in linears]
    x = rng.standard_normal((BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], BATCH)
    dx, dy = dg.from_numpy(x), dg.from_numpy(y)

    def d_step():
        for p in model.parameters():
            p.grad = None
        F.cross_entropy(model(dx), dy).backward()

    def n_step():
        numpy_mlp_step(x, y, layers)

    # The baseline must compute what distgrad computes: check once, loudly.
    d_step()
    loss, grads = numpy_mlp_step(x, y, layers)
    for lin, (gw, gb) in zip(linears, grads):
        np.testing.assert_allclose(lin.weight.grad.numpy(), gw, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(lin.bias.grad.numpy(), gb, rtol=1e-3, atol=1e-5)
    return d_step, n_step


def tiny_case(lib, make):
    """A step of CHAIN tiny elementwise ops and their backward in ``lib`` (distgrad or torch)."""
    x = make()

    def step():
        y = x
        for _ in range(CHAIN // 2):
            y = y * 1.001 + 0.5
        y.sum().backward()
        x.grad = None
    return step


def main():
    torch = _results.require_baseline("torch", "PyTorch's per-op cost (tiny-op case)")
    torch.set_num_threads(ARGS.threads)
    from threadpoolctl import threadpool_limits
    threadpool_limits(ARGS.threads)
    rng = np.random.default_rng(0)
    d_mlp, n_mlp = mlp_case(rng)
    d_tiny = tiny_case(dg, lambda: dg.autograd.Variable(dg.randn(4), requires_grad=True))
    t_tiny = tiny_case(torch, lambda: torch.randn(4, requires_grad=True))
    lines = [f"single-process engine overhead, {ARGS.threads} thread(s), numpy {np.__version__}, "
             f"torch {torch.__version__}, load {os.getloadavg()[0]:.1f}",
             f"{'case':44s} {'distgrad':>10s} {'baseline':>10s} {'ratio':>7s} {'target':>7s}",
             "(times: best block of each; ratio: median of the paired per-round ratios)"]
    print("\n".join(lines), flush=True)
    cases = [("MLP 784-1024-1024-10 b256 fwd+bwd vs NumPy (ms)", d_mlp, n_mlp, 1e3, 1.10),
             (f"tiny op ({CHAIN}-op chain) vs PyTorch (us/op)", d_tiny, t_tiny, 1e6 / CHAIN, 1.0)]
    for name, d, base, scale, target in cases:
        best_d, best_b, ratio = _results.paired(d, base, ARGS.seconds, ARGS.rounds)
        verdict = "ok" if ratio <= target else "MISSED"
        lines.append(f"{name:44s} {best_d * scale:10.2f} {best_b * scale:10.2f} {ratio:6.2f}x "
                     f"{target:5.2f}x {verdict}")
        print(lines[-1], flush=True)
    _results.write("engine_overhead", "\n".join(lines), ARGS.save)


if __name__ == "__main__":
    main()
