"""distgrad's data-parallel step against PyTorch DDP (gloo) at equal resources.

N Ray workers (1 CPU, 1 BLAS thread each) against N DDP processes of 1 thread each, on
the same model, data, global batch and optimizer, measured in one run in alternating
blocks; the ratio is the median of paired per-block ratios (samples/s of distgrad over
DDP's). Models: the MLP 784-1024-1024-10 (global batch 512, SGD), a LeNet-size CNN
(global batch 256, SGD momentum), and a wide MLP with 64 MB of gradients (batch 256).
The per-phase breakdown of distgrad's step comes from the workers' timeline.

    python bench/dp_vs_ddp.py [--workers 2] [--models mlp,cnn,wide] [--quick] [--save]
"""
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")      # one BLAS thread per process, on both sides

import numpy as np  # noqa: E402

if not __package__:       # run as a file in a checkout: make distgrad importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distgrad.bench._results import parser, publish, require_baseline  # noqa: E402

MODELS = {   # name: (layer spec, global batch, optimizer keywords)
    "mlp": (("mlp", [784, 1024, 1024, 10]), 512, {"lr": 0.01}),
    "cnn": (("cnn", None), 256, {"lr": 0.01, "momentum": 0.9}),
    "wide": (("mlp", [784, 4096, 3072, 10]), 256, {"lr": 0.01}),
}


def data(name, batch):
    rng = np.random.default_rng(0)
    shape = (batch, 1, 28, 28) if MODELS[name][0][0] == "cnn" else (batch, 784)
    return rng.standard_normal(shape).astype(np.float32), rng.integers(0, 10, batch)


def build(m, name):
    """The model in module ``m`` (distgrad or torch): both have the same nn API here."""
    kind, sizes = MODELS[name][0]
    nn = m.nn
    if kind == "cnn":
        return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 120),
                             nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


# ---------------------------------------------------------------- DDP side

def _ddp_worker(rank, world, port, name, conn):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build(torch, name))
    opt = torch.optim.SGD(model.parameters(), **MODELS[name][2])
    X, Y = data(name, MODELS[name][1])
    rows = np.array_split(np.arange(len(X)), world)[rank]
    x, y = torch.from_numpy(X[rows]), torch.from_numpy(Y[rows])
    conn.send("ready")
    while True:
        steps = conn.recv()
        if steps is None:
            break
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        loss.item()
        dist.barrier()
        conn.send(time.perf_counter() - t0)
    dist.destroy_process_group()


class DDPGang:
    """N DDP processes that run a block of steps on command (and wait in between)."""

    def __init__(self, n, name):
        ctx = mp.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.conns, self.procs = [], []
        for r in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_ddp_worker, args=(r, n, port, name, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        for c in self.conns:
            if not c.poll(120) or c.recv() != "ready":
                raise RuntimeError("DDP (gloo) did not start: no baseline, no ratio")

    def block(self, steps):
        for c in self.conns:
            c.send(steps)
        return max(c.recv() for c in self.conns)

    def close(self):
        for c in self.conns:
            c.send(None)
        for p in self.procs:
            p.join(30)


# ---------------------------------------------------------------- distgrad side

def _breakdown(cluster, since, steps):
    """Seconds per step on worker 0's timeline after ``since``, by phase."""
    phases = {}
    for name, start, end, _thread in cluster.gang.spans()[0]:
        if start < since:
            continue
        key = "all-reduce (comm thread)" if name.startswith("allreduce") else name
        phases[key] = phases.get(key, 0.0) + (end - start) / steps
    return phases


def main():
    ap = parser(__doc__)
    ap.add_argument("--workers", type=int, default=2, help="workers on each side")
    ap.add_argument("--models", default="mlp,cnn,wide", help="comma-separated: mlp, cnn, wide")
    ap.add_argument("--rounds", type=int, default=None, help="alternating blocks per model")
    args = ap.parse_args()
    require_baseline("torch", "PyTorch DDP with gloo")
    import distgrad as dg
    import distgrad.nn.functional as F
    rounds = args.rounds or (3 if args.quick else 7)
    steps = 3 if args.quick else 8
    lines = [f"| model ({args.workers} workers vs {args.workers} DDP processes x 1 thread) | "
             "distgrad samples/s | DDP samples/s | ratio (median of paired blocks) |",
             "|---|---|---|---|"]
    detail = []
    for name in args.models.split(","):
        batch = MODELS[name][1]
        X, Y = data(name, batch)
        ddp = DDPGang(args.workers, name)
        try:
            with dg.init(workers=args.workers, timeout_s=120) as cluster:
                dg.manual_seed(0)
                model = cluster.replicate(build(dg, name))
                opt = dg.optim.SGD(model.parameters(), **MODELS[name][2])
                record = []

                def block(n):
                    t0 = time.perf_counter()
                    for _ in range(n):
                        r0 = time.perf_counter()
                        loss = F.cross_entropy(model(cluster.shard(X)), cluster.shard(Y))
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        record.append(time.perf_counter() - r0)
                        loss.item()
                    return time.perf_counter() - t0
                block(2)
                ddp.block(2)                                   # warm-up
                ours, theirs, since = [], [], None
                for _ in range(rounds):
                    since = time.time()
                    ours.append(block(steps))
                    theirs.append(ddp.block(steps))
                phases = _breakdown(cluster, since, steps)
        finally:
            ddp.close()
        ratios = [t / o for o, t in zip(ours, theirs)]
        sps = batch * steps / statistics.median(ours)
        ddp_sps = batch * steps / statistics.median(theirs)
        lines.append(f"| {name} (batch {batch}) | {sps:.0f} | {ddp_sps:.0f} | "
                     f"{statistics.median(ratios):.2f}x |")
        step_s = statistics.median(ours) / steps
        parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1]))
        detail.append(f"- {name}: step {step_s * 1e3:.1f} ms; worker 0 per step (ms): {parts}; "
                      f"driver recording {statistics.median(record) * 1e3:.2f} ms")
    publish("dp_vs_ddp", "\n".join(lines + ["", "Breakdown (distgrad):"] + detail), args.save)


if __name__ == "__main__":
    main()
