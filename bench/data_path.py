"""Worker-side reading against driver-fed batches: MLP 784-512-10 trained from a dataset on disk
(2 GB of float32 rows by default), on 2 workers, in the same run.

- worker-side: ``cluster.shard_dataset({"x": x.npy, "y": y.npy}, batch_size=B, shuffle=True)``,
  each worker memory-maps the files and reads its rows of each batch;
- driver-fed: the driver reads the same batches (same rows, same order) from its own
  memory map of the files and sends them with ``cluster.shard``.

Reported: training samples/s of each (alternating blocks of steps in one process, so load
from other processes hits both alike; target: worker-side >= 1.0x), the driver's peak RSS
over a whole epoch of each (each in its own process; target: worker-side <= 1.2x a run of
as many steps over an almost empty dataset), and the time a step waits for data (the
workers' "data" spans in ``cluster.timeline``; target <= 5% of the step), with the load.

    python bench/data_path.py [--quick] [--gb 2] [--batch 256] [--backend ray|local] [--save]
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

if not __package__:       # run as a file in a checkout: make distgrad importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distgrad as dg  # noqa: E402
from distgrad.bench._results import parser, publish  # noqa: E402
import distgrad.nn as nn  # noqa: E402
import distgrad.nn.functional as F  # noqa: E402

D, CLASSES = 784, 10
BLOCK = 20           # steps per timed block; blocks of the two kinds alternate
CHUNK = 16_384       # rows written at a time when making the dataset


def make_dataset(folder, rows):
    """x.npy (rows x 784 float32) and y.npy (int64 labels), written in chunks so that this
    process never holds the dataset."""
    os.makedirs(folder, exist_ok=True)
    x = np.lib.format.open_memmap(os.path.join(folder, "x.npy"), mode="w+", dtype=np.float32,
                                  shape=(rows, D))
    for a in range(0, rows, CHUNK):
        b = min(a + CHUNK, rows)
        x[a:b] = np.random.default_rng(a).standard_normal((b - a, D), dtype=np.float32)
    x.flush()
    del x
    np.save(os.path.join(folder, "y.npy"), np.random.default_rng(1).integers(0, CLASSES, rows))
    return {"x": os.path.join(folder, "x.npy"), "y": os.path.join(folder, "y.npy")}


def model_and_step(cluster):
    dg.manual_seed(0)
    model = cluster.replicate(nn.Sequential(nn.Linear(D, 512), nn.ReLU(), nn.Linear(512, CLASSES)))
    opt = dg.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(xb, yb):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()                   # one sync per step, as a training loop prints
    return step


def driver_fed(cluster, paths, ds):
    """The same global batches as ``ds``, read by the driver from its own memory map."""
    X = np.load(paths["x"], mmap_mode="r")
    Y = np.load(paths["y"], mmap_mode="r")
    epoch = 0
    while True:
        for k in range(len(ds)):
            rows = ds.batch_rows(epoch, k)
            yield cluster.shard(X[rows]), cluster.shard(Y[rows])
        epoch += 1


def forever(ds):
    while True:
        yield from ds


def child(args):
    """One whole epoch of one kind in this process; prints its driver peak RSS as JSON."""
    paths = {"x": os.path.join(args.child_dir, "x.npy"), "y": os.path.join(args.child_dir, "y.npy")}
    with dg.init(workers=args.workers, backend=args.backend) as cluster:
        step = model_and_step(cluster)
        ds = cluster.shard_dataset(paths, batch_size=args.batch, shuffle=True, seed=0)
        batches = driver_fed(cluster, paths, ds) if args.child == "driver" else forever(ds)
        start = time.perf_counter()
        for _ in range(args.child_steps):
            step(*next(batches))
        seconds = time.perf_counter() - start
    print(json.dumps({"peak_mb": peak_rss_mb(), "samples_s": args.child_steps * args.batch / seconds}))


def peak_rss_mb():
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and
    exec, so a child would report its parent's RSS at the fork."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(kind, folder, steps, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--child-dir", folder,
           "--child-steps", str(steps), "--batch", str(args.batch), "--workers", str(args.workers),
           "--backend", args.backend]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"data_path: the {kind} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def data_wait(trace, windows):
    """Per worker: seconds of "data" spans inside ``windows`` over the windows' length."""
    events = json.load(open(trace))["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M"
             and e.get("name") == "process_name"}
    total = sum(b - a for a, b in windows)
    out = {}
    for e in events:
        if e.get("name") != "data" or e.get("ph") != "X":
            continue
        s, d = e["ts"] / 1e6, e["dur"] / 1e6
        inside = sum(max(0.0, min(s + d, b) - max(s, a)) for a, b in windows)
        out[names[e["pid"]]] = out.get(names[e["pid"]], 0.0) + inside
    return {k: v / total for k, v in sorted(out.items())}


def main():
    ap = parser(__doc__)
    ap.add_argument("--gb", type=float, default=2.0, help="dataset size on disk (x.npy), GB")
    ap.add_argument("--batch", type=int, default=256, help="global batch size")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backend", default="ray", choices=["ray", "local"],
                    help="local: workers are threads of the driver, so its RSS includes theirs")
    ap.add_argument("--pairs", type=int, default=10, help="timed blocks of each kind, interleaved")
    ap.add_argument("--data-dir", default=None, help="where to write the dataset (default: a "
                    "temporary folder, removed at the end)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-steps", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    gb, pairs = (0.2, 3) if args.quick else (args.gb, args.pairs)
    rows = int(gb * 1e9 // (D * 4))
    root = args.data_dir or tempfile.mkdtemp(prefix="distgrad-data-path-")
    load_before = os.getloadavg()
    try:
        t0 = time.perf_counter()
        paths = make_dataset(os.path.join(root, "full"), rows)
        tiny_rows = 4 * args.batch
        make_dataset(os.path.join(root, "tiny"), tiny_rows)
        made = time.perf_counter() - t0

        # Throughput, paired: BLOCK worker-side steps, then BLOCK driver-fed steps on the
        # same batches, repeated.
        with dg.init(workers=args.workers, backend=args.backend) as cluster:
            step = model_and_step(cluster)
            ds = cluster.shard_dataset(paths, batch_size=args.batch, shuffle=True, seed=0)
            worker_batches, fed = forever(ds), driver_fed(cluster, paths, ds)
            for _ in range(5):                        # warm both programs and the caches
                step(*next(worker_batches))
                step(*next(fed))
            worker_s, driver_s, windows = [], [], []
            for _ in range(pairs):
                a = time.time()
                start = time.perf_counter()
                for _ in range(BLOCK):
                    step(*next(worker_batches))
                worker_s.append(time.perf_counter() - start)
                windows.append((a, time.time()))
                start = time.perf_counter()
                for _ in range(BLOCK):
                    step(*next(fed))
                driver_s.append(time.perf_counter() - start)
            trace = cluster.timeline(os.path.join(root, "trace.json"))
            waits = data_wait(trace, windows)
        # Driver memory: a whole epoch of each kind, each in a fresh process.
        epoch_steps = -(-rows // args.batch)
        rss = {"empty": run_child("worker", os.path.join(root, "tiny"), epoch_steps, args),
               "worker": run_child("worker", os.path.join(root, "full"), epoch_steps, args),
               "driver": run_child("driver", os.path.join(root, "full"), epoch_steps, args)}
    finally:
        if args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()

    ratios = [d / w for w, d in zip(worker_s, driver_s)]
    n = BLOCK * args.batch
    w_rate = n * len(worker_s) / sum(worker_s)
    d_rate = n * len(driver_s) / sum(driver_s)
    ratio = statistics.median(ratios)
    size = f"{rows * D * 4 / 1e9:.2f} GB"
    mb = {k: v["peak_mb"] for k, v in rss.items()}
    lines = [
        f"| MLP 784-512-10, {rows} x 784 float32 on disk ({size}), global batch {args.batch}, "
        f"{args.workers} workers ({args.backend}) | samples/s | ratio | driver peak RSS, whole epoch |",
        "|---|---|---|---|",
        f"| driver-fed (driver reads its memory map, cluster.shard) | {d_rate:,.0f} | 1.00x | "
        f"{mb['driver']:,.0f} MB |",
        f"| worker-side (cluster.shard_dataset, workers memory-map) | {w_rate:,.0f} | "
        f"{ratio:.2f}x (median of {len(ratios)} paired blocks of {BLOCK} steps; target >= 1.0x) | "
        f"{mb['worker']:,.0f} MB ({mb['worker'] / mb['empty']:.2f}x the run over "
        f"{tiny_rows} rows: {mb['empty']:,.0f} MB; target <= 1.2x) |",
        "",
        f"Data wait (the workers' \"data\" spans over the worker-side blocks): "
        + ", ".join(f"{k} {v:.1%}" for k, v in waits.items())
        + f" of the step (target <= 5%). Dataset written in {made:.0f} s (it is in the page "
        "cache when read).",
        f"load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
        f"after: {', '.join(f'{v:.2f}' for v in load_after)}; {os.cpu_count()} cores",
    ]
    publish("data_path", "\n".join(lines), args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
