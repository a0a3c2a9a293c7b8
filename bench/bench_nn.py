"""Training-step benchmark: distgrad vs PyTorch CPU at equal thread count, printed as ratios.

Two steps (forward, backward, SGD-with-momentum update), each measured for both
libraries in the same run:

* MLP  784-512-256-10, batch 128, cross-entropy
* LeNet-5-sized CNN (conv 6@5x5, pool, conv 16@5x5, pool, fc 120-84-10), batch 64, 28x28

    python bench/bench_nn.py --threads 2

Thread counts are pinned before numpy and torch load: OMP/OPENBLAS/MKL env vars for
numpy's BLAS (threadpoolctl too when installed), ``torch.set_num_threads`` for torch.
Targets (issue 3): MLP <= 1.0x, CNN <= 1.5x PyTorch.
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
    ap = _results.paired_parser(__doc__, os.cpu_count() or 1,
                                "threads for both libraries (BLAS, torch intra-op)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time, robust to other load on a shared machine "
                         "(meaningful with --threads 1 only)")
    return _results.parse_paired(ap)    # --quick: 1 s per case, 5 rounds at least; --save


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    _results.pin_threads(ARGS.threads)      # before numpy is imported

import numpy as np  # noqa: E402

if not __package__:       # run as a file in a checkout: make distgrad importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distgrad as dg  # noqa: E402
import distgrad.nn.functional as F  # noqa: E402
import distgrad.optim as optim  # noqa: E402


def _mlp(lib):
    return lib.nn.Sequential(lib.nn.Linear(784, 512), lib.nn.ReLU(), lib.nn.Linear(512, 256),
                             lib.nn.ReLU(), lib.nn.Linear(256, 10))


class _LeNet:
    """The same LeNet layout for either library (lib is distgrad or torch)."""

    @staticmethod
    def build(lib):
        n = lib.nn
        return n.Sequential(n.Conv2d(1, 6, 5), n.ReLU(), n.MaxPool2d(2), n.Conv2d(6, 16, 5),
                            n.ReLU(), n.MaxPool2d(2), n.Flatten(), n.Linear(16 * 4 * 4, 120),
                            n.ReLU(), n.Linear(120, 84), n.ReLU(), n.Linear(84, 10))


def _copy_weights(src_torch, dst):
    for pt, pd in zip(src_torch.parameters(), dst.parameters()):
        pd.data.copy_(dg.from_numpy(pt.detach().numpy().copy()))


def _step_fns(torch, build, x, y):
    """A training step for torch and one for distgrad, from the same weights and data."""
    tm = build(torch)
    dm = build(dg)
    _copy_weights(tm, dm)
    topt = torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9)
    dopt = optim.SGD(dm.parameters(), lr=0.01, momentum=0.9)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    dx, dy = dg.from_numpy(x), dg.from_numpy(y)
    tloss = torch.nn.functional.cross_entropy

    def t_step():
        topt.zero_grad()
        loss = tloss(tm(tx), ty)
        loss.backward()
        topt.step()
        return loss

    def d_step():
        dopt.zero_grad()
        loss = F.cross_entropy(dm(dx), dy)
        loss.backward()
        dopt.step()
        return loss
    return t_step, d_step


def measure(name, torch, build, x, y, seconds, rounds):
    """Each library's best block, and the median of the per-round ratios.

    Blocks alternate (distgrad, torch, distgrad, torch...) so a change of load on a shared
    machine hits both alike; the ratio of the two blocks of one round is a paired
    measurement, and its median over all rounds is the figure reported (the minimum of
    each library's blocks is shown in ms for scale).
    """
    t_step, d_step = _step_fns(torch, build, x, y)
    clock = time.process_time if ARGS.clock == "cpu" else time.perf_counter
    best_d, best_t, ratio = _results.paired(d_step, t_step, seconds, rounds, clock=clock)
    return name, best_d, best_t, ratio


def main():
    if ARGS.clock == "cpu" and ARGS.threads != 1:
        raise SystemExit("--clock cpu sums the CPU time of all threads: use it with --threads 1")
    torch = _results.require_baseline("torch", "PyTorch's training step at the same thread count")
    torch.set_num_threads(ARGS.threads)
    from threadpoolctl import threadpool_limits
    threadpool_limits(ARGS.threads)             # numpy's BLAS, in case it was loaded already
    rng = np.random.default_rng(0)
    cases = [
        ("MLP 784-512-256-10, batch 128", _mlp,
         rng.standard_normal((128, 784)).astype(np.float32), rng.integers(0, 10, 128)),
        ("LeNet CNN, batch 64, 1x28x28", _LeNet.build,
         rng.standard_normal((64, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 64)),
    ]
    targets = [1.0, 1.5]
    lines = [f"training step (forward + backward + SGD momentum), {ARGS.threads} thread(s), "
             f"{ARGS.clock} clock, numpy {np.__version__}, torch {torch.__version__}",
             f"{'case':34s} {'distgrad ms':>12s} {'torch ms':>10s} {'ratio':>7s} {'target':>7s}",
             "(ms: best block of each; ratio: median of the paired per-round ratios)"]
    print("\n".join(lines), flush=True)
    for (name, build, x, y), target in zip(cases, targets):
        name, d, t, ratio = measure(name, torch, build, x, y, ARGS.seconds, ARGS.rounds)
        ok = "ok" if ratio <= target else "MISSED"
        lines.append(f"{name:34s} {d * 1e3:12.3f} {t * 1e3:10.3f} {ratio:6.2f}x {target:5.1f}x {ok}")
        print(lines[-1], flush=True)
    _results.write("bench_nn", "\n".join(lines), ARGS.save)


if __name__ == "__main__":
    main()
