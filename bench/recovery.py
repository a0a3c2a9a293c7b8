"""Recovery time after a SIGKILL on a local Ray cluster, beside the cost of an undisturbed step.

Target (issue 6): detection + restart + re-run <= 10 s. Prints a table and writes
bench/results/recovery.md.

    python bench/recovery.py [--quick]
"""
import os
import signal
import statistics
import sys
import time

import numpy as np

if not __package__:       # run as a file in a checkout: make distgrad importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distgrad as dg  # noqa: E402
from distgrad.bench._results import parser, publish, timings  # noqa: E402
from distgrad.autograd import Variable  # noqa: E402


def step(c, W, X, Y):
    loss = ((c.shard(X) @ W).tanh() - c.shard(Y)).pow(2).mean()
    W.grad = None
    loss.backward()
    with dg.no_grad():
        W.data.sub_(W.grad.data * 0.1)
    return loss.item()


def main():
    ap = parser(__doc__)
    ap.add_argument("--workers", type=int, default=2, help="Ray workers; one of them is killed per trial")
    args = ap.parse_args()
    trials = 3 if args.quick else 5
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((4096, 256)).astype(np.float32), rng.standard_normal((4096, 1)).astype(np.float32)
    with dg.init(workers=args.workers, backend="ray", timeout_s=5) as c:
        W = c.replicate(Variable(dg.randn(256, 1) * 0.1, requires_grad=True))
        normal = statistics.median(timings(lambda: step(c, W, X, Y), 10, warmup=3))
        recov = []
        for i in range(trials):
            os.kill(c.gang.pid(1), signal.SIGKILL)
            t = time.perf_counter()
            step(c, W, X, Y)           # detection + replacement + re-hydration + re-run
            recov.append(time.perf_counter() - t)
        worst = max(recov)
    lines = [
        "| measure | seconds | ratio to a step |",
        "|---|---|---|",
        f"| undisturbed step (median of 10) | {normal:.4f} | 1.0 |",
        f"| step with a SIGKILLed worker (median of {trials}) | {statistics.median(recov):.3f} | "
        f"{statistics.median(recov) / normal:.0f}x |",
        f"| worst recovery | {worst:.3f} | {worst / normal:.0f}x |",
        "",
        f"target: recovery <= 10 s -> {'met' if worst <= 10 else 'NOT met'} ({args.workers} workers, local Ray)",
    ]
    text = "\n".join(lines)
    publish("recovery", text, args.save)


if __name__ == "__main__":
    main()
