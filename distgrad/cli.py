"""The ``distgrad`` command.

    distgrad demo        data-parallel training on 2 local workers (the main job)
    distgrad tutorial    the seed autograd tutorial
    distgrad info        versions, and the Ray cluster's nodes and GPUs if connected
    distgrad bench       the benchmarks in bench/
"""
import argparse
import logging
import os
import runpy
import subprocess
import sys


def _demo(args):
    from .demo import run
    res = run(workers=args.workers, address=args.address, device=args.device, steps=args.steps,
              backend=args.backend, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
              plot=args.plot, timeline=args.timeline, progress=not args.no_progress)
    ok = res["grad_max_diff"] <= 1e-4
    print(f"final loss {res['final_loss']:.4f}, accuracy {res['accuracy'] * 100:.1f}% on "
          f"{args.workers} {args.backend} workers, {res['samples_per_s']:,.0f} samples/s, "
          f"{res['seconds']:.1f} s")
    print(f"gradient check on 512 samples: max |distributed - single-process| = "
          f"{res['grad_max_diff']:.2e} ({'match' if ok else 'MISMATCH'})")
    if args.plot:
        print(f"loss curve written to {args.plot}")
    if args.timeline:
        print(f"timeline written to {args.timeline} (open in chrome://tracing or Perfetto)")
    return 0 if ok else 1


def _tutorial(args):
    # examples/ is installed as distgrad.examples, so this works from a wheel too.
    runpy.run_module("distgrad.examples.autograd_tutorial", run_name="__main__")
    return 0


def _info(args):
    import numpy
    import distgrad
    print(f"distgrad {distgrad.__version__} (python {sys.version.split()[0]})")
    print(f"numpy {numpy.__version__}")
    for mod in ("cupy", "ray", "msgpack"):
        try:
            m = __import__(mod)
            print(f"{mod} {getattr(m, 'version', None) and getattr(m.version, 'version', '') or getattr(m, '__version__', '?')}")
        except ImportError:
            print(f"{mod} not installed")
    if args.address:
        from .scheduler.ray_gang import describe_nodes     # Ray lives in the scheduler
        for node in describe_nodes(args.address):
            print(f"node {node['address']} alive={node['alive']} CPUs={node['cpus']:g} "
                  f"GPUs={node['gpus']:g}")
    else:
        print("not connected to a Ray cluster (pass --address auto to list its nodes)")
    return 0


def _bench(args):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(here, "bench")
    if not os.path.isdir(bench_dir):
        print("bench/ is not available in this installation: run from a source checkout")
        return 1
    scripts = sorted(f for f in os.listdir(bench_dir) if f.endswith(".py") and not f.startswith("_"))
    if args.only:
        scripts = [s for s in scripts if args.only in s]
    rc = 0
    for s in scripts:
        print(f"== bench/{s}")
        rc |= subprocess.call([sys.executable, os.path.join(bench_dir, s)] + (["--quick"] if args.quick else []))
    return rc


def main(argv=None):
    parser = argparse.ArgumentParser(prog="distgrad", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="data-parallel training on built-in data (the main job)")
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--address", default=None, help="Ray address; 'auto' inside a Ray job")
    demo.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--backend", default="ray", choices=["ray", "local"])
    demo.add_argument("--batch-size", type=int, default=256)
    demo.add_argument("--lr", type=float, default=0.1)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot", default=None, help="write a loss-curve PNG here")
    demo.add_argument("--timeline", default=None, help="write a Chrome trace JSON here")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(fn=_demo)
    sub.add_parser("tutorial", help="run the seed autograd tutorial").set_defaults(fn=_tutorial)
    info = sub.add_parser("info", help="versions and the Ray cluster's nodes")
    info.add_argument("--address", default=None)
    info.set_defaults(fn=_info)
    bench = sub.add_parser("bench", help="run the benchmarks in bench/")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--only", default=None, help="run only scripts whose name contains this")
    bench.set_defaults(fn=_bench)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from ._backend import DeviceError
    from .errors import RecoveryError, ResizeError, WorkerError
    try:
        return args.fn(args)
    except (DeviceError, WorkerError, RecoveryError, ResizeError) as e:
        # Expected failures (no GPU, no resources, lost workers): one line, not a traceback.
        print(f"distgrad {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
