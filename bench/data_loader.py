"""What a DataLoader adds to a training epoch on a 2-worker cluster: MLP 784-512-10 over an
in-memory dataset of 60,000 x 784 float32, with DataLoader(..., shuffle=True, cluster=cluster)
against the same epoch over batches already placed on the workers (no loading at all),
measured in the same run in alternating blocks of steps and reported as a ratio of epoch
times (target <= 1.05), with the load average.

    python bench/data_loader.py [--quick] [--backend ray|local] [--batch 128]
"""
import itertools
import os
import statistics
import sys
import time

import numpy as np

if not __package__:       # run as a file in a checkout: make distgrad importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distgrad as dg  # noqa: E402
from distgrad.bench._results import parser, publish  # noqa: E402
import distgrad.nn as nn  # noqa: E402
import distgrad.nn.functional as F  # noqa: E402
from distgrad.utils.data import DataLoader, TensorDataset  # noqa: E402

BLOCK = 20          # steps per timed block; blocks of the two kinds alternate


def main():
    ap = parser(__doc__)
    ap.add_argument("--backend", default="ray", choices=["ray", "local"], help="where the 2 workers run")
    ap.add_argument("--batch", type=int, default=128, help="global batch size")
    ap.add_argument("--rows", type=int, default=60_000, help="dataset rows")
    ap.add_argument("--pairs", type=int, default=2, help="epochs of each kind, interleaved")
    args = ap.parse_args()
    rows, pairs = (10_000, 1) if args.quick else (args.rows, args.pairs)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, 784)).astype(np.float32)
    y = rng.integers(0, 10, rows)
    ds = TensorDataset(X, y)
    load_before = os.getloadavg()

    with dg.init(workers=2, backend=args.backend) as cluster:
        dg.manual_seed(0)
        model = cluster.replicate(nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10)))
        opt = dg.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def steps(batches):
            start = time.perf_counter()
            for xb, yb in batches:
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss.item()                      # one sync per step, as a training loop prints
            return time.perf_counter() - start

        # Baseline: the same number of batches, each already on the workers before the clock
        # starts, so its steps do no loading at all.
        perm = rng.permutation(rows)
        placed = [(cluster.shard(X[i]), cluster.shard(y[i]))
                  for i in np.array_split(perm, -(-rows // args.batch))]
        cluster.sync()
        loader = DataLoader(ds, batch_size=args.batch, shuffle=True, cluster=cluster,
                            generator=dg.Generator().manual_seed(0))
        steps(placed[:20])                       # warm the program cache and the workers
        first = steps(loader)                    # includes sending the dataset once
        # Paired blocks: BLOCK loader steps, then BLOCK baseline steps, through whole epochs,
        # so load from other processes hits both sides of a pair alike.
        base, loaded = [], []
        for _ in range(pairs):
            batches = iter(loader)
            for k in range(0, len(placed), BLOCK):
                loaded.append(steps(itertools.islice(batches, BLOCK)))
                base.append(steps(placed[k:k + BLOCK]))
    ratios = [b / a for a, b in zip(base, loaded)]
    epoch_base, epoch_loaded = sum(base) / pairs, sum(loaded) / pairs
    load_after = os.getloadavg()
    lines = [
        f"| MLP 784-512-10 epoch, {rows} x 784 float32, global batch {args.batch}, 2 workers "
        f"({args.backend}) | s per epoch | ratio to no loading |",
        "|---|---|---|",
        f"| batches already on the workers (no loading) | {epoch_base:.3f} | 1.00x |",
        f"| DataLoader(shuffle=True, cluster=cluster) | {epoch_loaded:.3f} | "
        f"{epoch_loaded / epoch_base:.3f}x (median of {len(ratios)} paired blocks of {BLOCK} "
        f"steps: {statistics.median(ratios):.3f}x) |",
        f"| first loader epoch (sends the dataset once) | {first:.3f} | "
        f"{first / epoch_base:.3f}x |",
        "",
        f"load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
        f"after: {', '.join(f'{v:.2f}' for v in load_after)}; {os.cpu_count()} cores",
    ]
    publish("data_loader", "\n".join(lines), args.save)


if __name__ == "__main__":
    main()
