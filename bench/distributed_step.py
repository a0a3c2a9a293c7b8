"""A data-parallel training step (MLP 784-512-512-10, SGD momentum) on 1 process vs
2 workers (threads in-process, and Ray actors), reported as ratios to the single-process
step measured in the same run, plus the driver-side recording overhead.

    python bench/distributed_step.py [--quick]
"""
import os
import statistics
import sys
import time

import numpy as np

if not __package__:       # run as a file in a checkout: make distgrad importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distgrad as dg  # noqa: E402
from distgrad.bench._results import parser, publish, timings  # noqa: E402
import distgrad.nn as nn  # noqa: E402
import distgrad.nn.functional as F  # noqa: E402


def model():
    dg.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def main():
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=2048, help="rows per training step")
    args = ap.parse_args()
    n = 5 if args.quick else 15
    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.batch, 784)).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    rows = []

    m = model()
    opt = dg.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

    def local_step():
        loss = F.cross_entropy(m(dg.tensor(X)), dg.tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()
    base = statistics.median(timings(local_step, n, warmup=3))
    rows.append(("single process", base, None))

    for backend in ("local", "ray"):
        with dg.init(workers=2, backend=backend) as cluster:
            dm = cluster.replicate(model())
            dopt = dg.optim.SGD(dm.parameters(), lr=0.01, momentum=0.9)
            record = []
            t = statistics.median(timings(training_step(cluster, dm, dopt, X, y, record), n,
                                          warmup=3))
            rows.append((f"2 workers, backend={backend}", t, statistics.median(record)))
    sched_lines = scheduler_recording(X, y, n)
    lines = [f"| MLP 784-512-512-10 step, batch {args.batch} | median s | ratio to single process | driver recording s |",
             "|---|---|---|---|"]
    for name, t, rec in rows:
        lines.append(f"| {name} | {t:.4f} | {t / base:.2f}x | {'' if rec is None else f'{rec:.4f}'} |")
    text = "\n".join(lines + [""] + sched_lines)
    publish("distributed_step", text, args.save)


def training_step(cluster, dm, dopt, X, y, record, sched=None):
    """A step function for ``timings``: one distributed training step (and a scheduler
    step), whose driver time up to the loss's value (recording) it appends to ``record``."""
    def step():
        t = time.perf_counter()
        loss = F.cross_entropy(dm(cluster.shard(X)), cluster.shard(y))
        dopt.zero_grad()
        loss.backward()
        dopt.step()
        if sched is not None:
            sched.step()
        record.append(time.perf_counter() - t)
        return loss.item()
    return step


def scheduler_recording(X, y, n):
    """Adam with and without StepLR on 2 local workers: driver recording per step and
    program cache hits. Learning rates and bias corrections are message scalars, so a
    scheduler must not make every step a new program."""
    rows = []
    for with_sched in (False, True):
        with dg.init(workers=2, backend="local") as cluster:
            dm = cluster.replicate(model())
            dopt = dg.optim.Adam(dm.parameters(), lr=1e-3)
            sched = dg.optim.lr_scheduler.StepLR(dopt, step_size=1, gamma=0.9) if with_sched else None
            record = []
            timings(training_step(cluster, dm, dopt, X, y, record, sched), n, warmup=3)
            hits = min(s["cache_hits"] for s in cluster.stats())
            rows.append(("Adam + StepLR" if with_sched else "Adam", statistics.median(record[3:]),
                         hits, len(record)))
    base = rows[0][1]
    lines = ["| 2 local workers, cached steps | driver recording s (median) | ratio to no scheduler | cache hits / steps |",
             "|---|---|---|---|"]
    for name, rec, hits, steps in rows:
        lines.append(f"| {name} | {rec:.5f} | {rec / base:.2f}x | {hits} / {steps} |")
    return lines


if __name__ == "__main__":
    main()
