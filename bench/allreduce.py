"""All-reduce bandwidth: distgrad's shm and TCP backends against torch gloo, in one run.

Definitions as in nccl-tests: for S bytes per rank and time t,
algbw = S / t and busbw = algbw * 2(n-1)/n (the per-link traffic of an optimal
all-reduce, comparable across world sizes).

For each world size one set of processes (multiprocessing 'spawn', no Ray)
hosts every backend. Per size, after warm-up, the backends are timed in
interleaved blocks (A B C D D C B A ...) of ``reps`` back-to-back all-reduces of
a float32 array, so they see the same machine load; per block the slowest
rank's mean counts, and the median block is reported. Prints a markdown table;
with ``--save [DIR]`` also writes it to ``DIR/allreduce.md``, the raw times to
``allreduce.json`` and a plot to ``allreduce.png`` (DIR: ``bench/results`` in a checkout).
Needs torch for the gloo baseline (every ratio is against it): without it, it refuses.

    python bench/allreduce.py            # 1 KB .. 256 MB, 2 and 4 workers
    python bench/allreduce.py --quick    # a few sizes
    python bench/allreduce.py --save     # and update bench/results/

The TCP ring authenticates its peers when they connect (a per-group secret and a
challenge-response hello). ``tcp-v1`` is the ring as it was before that, loaded
from git (``--tcp-baseline REV``, default the commit before the authenticated
hello) and timed in the same processes, so "authenticated vs unauthenticated" is
measured in one run. The report also times what an HMAC on every frame would cost
(the bytes one rank sends and receives in a 128 MB all-reduce, hashed once): why
frames carry none (README, Security).

    python bench/allreduce.py --quick --workers 2 --only tcp tcp-v1
"""
from __future__ import annotations

import hmac
import importlib.util
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np


FULL_SIZES = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20,
              16 << 20, 64 << 20, 128 << 20, 256 << 20]
QUICK_SIZES = [4 << 10, 1 << 20, 16 << 20, 128 << 20]
DISTGRAD_BACKENDS = ["shm", "shm-zc", "tcp", "tcp-v1"]
TCP_AUTH_COMMIT = "7dda3d0"          # the commit that added the authenticated hello


def _reps(nbytes, quick):
    budget = (64 << 20) if quick else (256 << 20)     # bytes reduced per block, roughly
    return int(max(2, min(50 if quick else 100, budget // max(nbytes, 1))))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Backend:
    """One backend inside a bench worker process: make(n) -> buffer, allreduce(buf), barrier()."""

    def __init__(self, name, rank, ws, rdv, sizes, slot_bytes):
        self.name = name
        if name == "gloo":
            import torch
            import torch.distributed as dist
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{rdv}",
                                    rank=rank, world_size=ws)
            self.make = lambda n: torch.zeros(n, dtype=torch.float32)
            self.allreduce = dist.all_reduce
            self.barrier, self.close = dist.barrier, dist.destroy_process_group
            return
        if name in ("shm", "shm-zc"):
            from distgrad.workers.collective.shm import ShmCommunicator
            kw = {"slot_bytes": slot_bytes} if slot_bytes else {}
            if name == "shm-zc":
                kw["arena_bytes"] = max(sizes)
            comm = ShmCommunicator(rank, ws, rdv, timeout_s=120, init_timeout_s=300, **kw)
        else:
            from distgrad.workers.collective import tcp
            from distgrad.workers.collective.rendezvous import FileStore
            store, path = (rdv, None) if name == "tcp" else rdv
            module = tcp if path is None else _load_tcp_baseline(path)
            comm = module.TcpCommunicator(rank, ws, FileStore(store), f"bench-{name}",
                                          timeout_s=120, init_timeout_s=300)
        if name == "shm-zc":
            # zero copy: the bucket lives in the segment, the result in one shared region
            def make(n):
                comm.reset_buckets()
                b = comm.bucket((n,), np.float32)
                b.input[...] = 0
                return b
            self.make, self.allreduce = make, comm.allreduce_bucket
        else:
            self.make = lambda n: np.zeros(n, np.float32)
            self.allreduce = comm.allreduce
        self.barrier, self.close = comm.barrier, comm.close


def _load_tcp_baseline(path):
    """The TCP module saved at ``path`` (an older tcp.py), imported inside the collective
    package so that its relative imports resolve to today's base, shm and rendezvous."""
    spec = importlib.util.spec_from_file_location("distgrad.workers.collective._tcp_v1", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tcp_baseline_source(rev):
    """tcp.py at git revision ``rev``; None when git or the revision is not at hand."""
    try:
        return subprocess.run(["git", "show", f"{rev}:workers/collective/tcp.py"],
                              cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def hmac_seconds(nbytes, reps=3):
    """Seconds for one HMAC-SHA256 over ``nbytes``: what a MAC on every frame would add."""
    buf = np.ones(nbytes, np.uint8)
    hmac.digest(b"k" * 32, buf[: 1 << 20], "sha256")
    t0 = time.perf_counter()
    for _ in range(reps):
        hmac.digest(b"k" * 32, buf, "sha256")
    return (time.perf_counter() - t0) / reps


def _worker(names, rank, ws, sizes, quick, blocks, q, rdvs, slot_bytes):
    """Host every backend in one process; per size, time them in interleaved blocks so
    that all see the same machine load."""
    try:
        np.seterr(all="ignore")
        try:
            import torch
            torch.set_num_threads(1)
        except ImportError:
            pass
        backends = [_Backend(n, rank, ws, rdvs[n], sizes, slot_bytes) for n in names]
        out = {n: {} for n in names}
        for nbytes in sizes:
            reps = _reps(nbytes, quick)
            bufs = {}
            for b in backends:
                bufs[b.name] = b.make(nbytes // 4)
                for _ in range(2):
                    b.allreduce(bufs[b.name])
            for k in range(blocks):
                # ABC then CBA: no backend always runs right after the same other one
                for b in (backends if k % 2 == 0 else backends[::-1]):
                    x = bufs[b.name]
                    b.barrier()
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        b.allreduce(x)
                    out[b.name].setdefault(nbytes, []).append((time.perf_counter() - t0) / reps)
            del bufs
        for b in backends:
            b.barrier()
            b.close()
        q.put((rank, out))
    except BaseException as e:  # noqa: BLE001  (reported by the parent)
        import traceback
        q.put((rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run(names, ws, sizes, quick, blocks=3, slot_bytes=None, tcp_baseline=None):
    """Time ``names`` backends with ``ws`` processes.

    Returns ({backend: {nbytes: seconds}}, {backend: {nbytes: [seconds per block]}}): per
    block the slowest rank's mean time; the first dict holds the median over blocks."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    tmp = tempfile.TemporaryDirectory()
    rdvs = {"gloo": _free_port(), "tcp": tmp.name, "tcp-v1": (tmp.name, tcp_baseline)}
    for n in names:
        if n.startswith("shm"):
            rdvs[n] = f"distgrad_bench_{os.getpid()}_{ws}_{n}"
    procs = [ctx.Process(target=_worker, args=(names, r, ws, sizes, quick, blocks, q, rdvs,
                                               slot_bytes))
             for r in range(ws)]
    for p in procs:
        p.start()
    try:
        res = {}
        for _ in procs:
            rank, out = q.get(timeout=3600)
            if isinstance(out, str):
                raise RuntimeError(f"rank {rank} failed: {out}")
            res[rank] = out
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
        tmp.cleanup()
    per_block = {n: {nb: [max(res[r][n][nb][k] for r in res) for k in range(blocks)]
                     for nb in sizes} for n in names}
    return ({n: {nb: float(np.median(ts)) for nb, ts in by_size.items()}
             for n, by_size in per_block.items()}, per_block)


def memcpy_seconds(nbytes=128 << 20):
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    t0 = time.perf_counter()
    for _ in range(5):
        np.copyto(b, a)
    return (time.perf_counter() - t0) / 5


def fmt_size(n):
    for unit, k in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= k:
            return f"{n // k} {unit}"
    return f"{n} B"


def fmt_time(t):
    return f"{t * 1e6:.0f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def busbw(nbytes, t, ws):
    return nbytes / t * 2 * (ws - 1) / ws / 1e9


def main(argv=None):
    try:
        import distgrad.workers.collective  # noqa: F401
        from distgrad.bench._results import parser, require_baseline
    except ImportError as e:
        sys.exit(f"distgrad is not importable ({e}): pip install . first")
    ap = parser(__doc__)          # --quick: 4 sizes, fewer repetitions; --save [DIR]
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4], help="world sizes to run")
    ap.add_argument("--slot-bytes", type=int, default=None, help="shm chunk per rank (tuning)")
    ap.add_argument("--no-tcp", action="store_true", help="leave out the TCP ring")
    ap.add_argument("--only", nargs="+", choices=DISTGRAD_BACKENDS, default=DISTGRAD_BACKENDS,
                    help="distgrad backends to time beside gloo (default: all)")
    ap.add_argument("--tcp-baseline", default=f"{TCP_AUTH_COMMIT}^", metavar="REV",
                    help="git revision of the unauthenticated TCP ring timed as tcp-v1")
    ap.add_argument("--blocks", type=int, default=3,
                    help="timing blocks per size and backend, interleaved; the median is kept")
    args = ap.parse_args(argv)
    # Every ratio below is against gloo: without torch there is nothing to report.
    require_baseline("torch", "torch.distributed's gloo all-reduce")
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    baseline = tempfile.TemporaryDirectory()
    baseline_path = os.path.join(baseline.name, "tcp_v1.py")
    src = None if args.no_tcp or "tcp-v1" not in args.only else \
        tcp_baseline_source(args.tcp_baseline)
    if src is None and not args.no_tcp and "tcp-v1" in args.only:
        print(f"# git revision {args.tcp_baseline} not at hand: no tcp-v1 baseline",
              file=sys.stderr)
    else:
        with open(baseline_path, "w") as f:
            f.write(src or "")
    backends = [b for b in args.only if not (args.no_tcp and b.startswith("tcp"))
                and (b != "tcp-v1" or src)] + ["gloo"]
    load0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results, blocks = {}, {}
    for ws in args.workers:
        print(f"# running {', '.join(backends)} with {ws} workers ...", file=sys.stderr,
              flush=True)
        medians, per_block = run(backends, ws, sizes, args.quick, args.blocks,
                                 args.slot_bytes, baseline_path)
        for b, res in medians.items():
            results[(b, ws)] = res
            blocks[(b, ws)] = per_block[b]
    mc = memcpy_seconds()

    lines = ["# All-reduce bandwidth (float32, sum)", "",
             f"Machine: {os.cpu_count()} CPUs. One run of `python bench/allreduce.py"
             f"{' --quick' if args.quick else ''}`; every figure below comes from that run, "
             "backends interleaved in the same processes (median of "
             f"{args.blocks} blocks). "
             f"Reference: one numpy copy of 128 MB took {fmt_time(mc)} "
             f"({(128 << 20) / mc / 1e9:.1f} GB/s). Load average at the start: "
             f"{load0}; at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
             "(other processes on the machine slow the CPU-bound shm path most).", "",
             "algbw = bytes / time, busbw = algbw * 2(n-1)/n (nccl-tests). "
             "`shm`: distgrad shared memory, numpy array in and out (copies through the "
             "segment); `shm-zc`: zero-copy buckets (the array lives in the segment, "
             "`ShmCommunicator.bucket`, result in one shared region); "
             "`tcp`: distgrad TCP ring over loopback "
             "(what two nodes would use; peers authenticated at connection); `tcp-v1`: the "
             f"unauthenticated ring of `{args.tcp_baseline}`; `gloo`: torch.distributed gloo over loopback "
             "TCP. Ratios are bandwidth ratios (time of gloo / time of distgrad).", ""]
    for ws in args.workers:
        cols = [b for b in backends]
        head = "| size | " + " | ".join(f"{b} time | {b} algbw GB/s | {b} busbw GB/s"
                                       for b in cols)
        head += " | " + " | ".join(f"{b}/gloo" for b in cols if b != "gloo")
        lines += [f"## {ws} workers", "", head + " |",
                  "|" + "---|" * (1 + 3 * len(cols) + len(cols) - 1)]
        for nb in sizes:
            row = [fmt_size(nb)]
            for b in cols:
                t = results[(b, ws)][nb]
                row += [fmt_time(t), f"{nb / t / 1e9:.2f}", f"{busbw(nb, t, ws):.2f}"]
            tg = results[("gloo", ws)][nb]
            row += [f"{tg / results[(b, ws)][nb]:.2f}x" for b in cols if b != "gloo"]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    def ratio(b, ws, nb):
        r = results.get((b, ws))
        g = results.get(("gloo", ws))
        if r is None or g is None or nb not in r:
            return None
        return g[nb] / r[nb]

    targets = [("2 workers, 128 MB, shm vs gloo bandwidth", "shm", 2, 128 << 20, 4.0),
               ("2 workers, 128 MB, shm zero-copy buckets vs gloo", "shm-zc", 2,
                128 << 20, 4.0),
               ("2 workers, 4 KB, shm vs gloo (latency: ratio >= 1 means not slower)",
                "shm", 2, 4 << 10, 1.0),
               ("4 workers, 16 MB, shm vs gloo bandwidth", "shm", 4, 16 << 20, 2.0),
               ("4 workers, 16 MB, shm zero-copy buckets vs gloo", "shm-zc", 4, 16 << 20,
                2.0),
               ("2 ranks over TCP loopback, 128 MB, tcp ring vs gloo", "tcp", 2,
                128 << 20, 1.0)]
    auth = [(f"{ws} ranks over TCP loopback, {fmt_size(nb)}, authenticated ring vs "
             "unauthenticated (tcp-v1) bandwidth, median of the blocks' paired ratios",
             "tcp", ws, nb, 0.95, "tcp-v1")
            for ws in args.workers for nb in sizes if nb >= 16 << 20]
    lines += ["## Targets (issues 5 and 12)", "", "| target | measured | goal | |",
              "|---|---|---|---|"]
    for label, b, ws, nb, goal, *base in targets + auth:
        # against another distgrad backend: each block's ratio (the two ran back to back,
        # under the same load), then the median, which machine-load drift moves least
        r = ratio(b, ws, nb) if not base else (
            float(np.median(np.array(blocks[(base[0], ws)][nb]) / blocks[(b, ws)][nb]))
            if (base[0], ws) in blocks and (b, ws) in blocks else None)
        if r is None:
            lines.append(f"| {label} | not run | >= {goal:g}x | |")
        else:
            lines.append(f"| {label} | {r:.2f}x | >= {goal:g}x | "
                         f"{'met' if r >= goal else 'MISSED'} |")
    lines.append("")
    if ("tcp", 2) in results:
        # A MAC on every frame: each rank would hash what it sends and what it receives.
        nb = max(sizes)
        hashed = 2 * 2 * (2 - 1) / 2 * nb
        th = hmac_seconds(nb) * hashed / nb
        lines += [f"HMAC-SHA256 on every frame (not done): a rank of 2 would hash "
                  f"{fmt_size(int(hashed))} per {fmt_size(nb)} all-reduce, {fmt_time(th)} "
                  f"on one core, {th / results[('tcp', 2)][nb]:.0%} of the measured tcp "
                  "all-reduce time; with both cores already busy (sender thread, "
                  "receive-and-reduce) that time is added, not hidden.", ""]
    text = "\n".join(lines)
    raw = {f"{b}/{ws}": {str(nb): t for nb, t in res.items()}
           for (b, ws), res in results.items()}
    print(text)
    if not args.save:
        return
    os.makedirs(args.save, exist_ok=True)
    with open(os.path.join(args.save, "allreduce.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.save, "allreduce.json"), "w") as f:
        json.dump({"seconds": raw, "memcpy_128MB_s": mc, "quick": args.quick}, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"shm": "-o", "shm-zc": "-D", "tcp": "-s", "tcp-v1": ":s", "gloo": "--^"}
    for (b, ws), res in results.items():
        ax.plot(sizes, [busbw(nb, res[nb], ws) for nb in sizes], styles[b],
                label=f"{'distgrad ' if b != 'gloo' else 'torch '}{b}, {ws} workers")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([fmt_size(s).replace(" ", "") for s in sizes], rotation=45)
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_xlabel("bytes per rank")
    ax.set_title("all-reduce, float32 sum")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.save, "allreduce.png"), dpi=120)
    print(f"wrote {os.path.join(args.save, 'allreduce.md')} and allreduce.png", file=sys.stderr)


if __name__ == "__main__":
    main()
