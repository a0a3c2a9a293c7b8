"""The ``distgrad`` command.

    distgrad demo        data-parallel training on 2 local workers (the main job)
    distgrad tutorial    the seed autograd tutorial, each statement shown before its output
    distgrad info        versions, BLAS threads, and the Ray cluster's nodes if connected
    distgrad bench       the benchmarks (installed with distgrad as distgrad.bench)

Run ``distgrad COMMAND --help`` for a command's options and their defaults.
"""
import argparse
import ast
import importlib.util
import logging
import pkgutil
import subprocess
import sys

import numpy

from . import __version__
from ._backend import DeviceError
from .demo import MissingDependency, run
from .errors import RecoveryError, ResizeError, WorkerError
from .scheduler.local import usable_cores

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


def _demo(args):
    # Said before anything slow starts: the first line comes at once.
    where = args.address or ("threads of this process" if args.backend == "local" else "a local Ray instance")
    print(f"distgrad demo: {args.workers} {args.backend} workers on {args.device} ({where}), "
          f"{args.steps} steps of {args.batch_size} samples", flush=True)
    res = run(workers=args.workers, address=args.address, device=args.device, steps=args.steps,
              backend=args.backend, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
              plot=args.plot, timeline=args.timeline, progress=not args.no_progress,
              verbose=args.verbose, log_to_driver=not args.no_worker_output,
              pin_cpus=args.pin_cpus)
    ok = res["grad_max_diff"] <= 1e-4
    print(f"training accuracy {res['train_accuracy'] * 100:.1f}% ({res['n_train']:,} samples), "
          f"held-out accuracy {res['test_accuracy'] * 100:.1f}% ({res['n_test']:,} samples never "
          f"trained on), final loss {res['final_loss']:.4f}")
    print(f"throughput {res['samples_per_s']:,.0f} samples/s over {res['train_seconds']:.1f} s of "
          f"training; {res['seconds']:.1f} s in all ({res['startup_seconds']:.1f} s to start the workers)")
    print(f"gradient check on 512 samples: max |distributed - single-process| = "
          f"{res['grad_max_diff']:.2e} ({'match' if ok else 'MISMATCH'})")
    if args.plot:
        print(f"loss curve written to {args.plot}")
    if args.timeline:
        print(f"timeline written to {args.timeline} (open in chrome://tracing or Perfetto)")
    return 0 if ok else 1


def tutorial_transcript(source, out=None):
    """Run Python ``source`` statement by statement, printing each statement (as ``>>>``
    lines) before its output, so every printed value is labelled by the code that printed it.

    Example: ``tutorial_transcript("x = 1 + 1\\nprint(x)")`` prints ``>>> x = 1 + 1``,
    ``>>> print(x)`` and ``2``.
    """
    out = out or sys.stdout
    tree = ast.parse(source)
    lines = source.splitlines()
    namespace = {"__name__": "__main__"}
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]                          # the module docstring
    for node in body:
        text = lines[node.lineno - 1:node.end_lineno]
        print("\n".join((">>> " if i == 0 else "... ") + ln for i, ln in enumerate(text)), file=out, flush=True)
        exec(compile(ast.Module([node], type_ignores=[]), "<tutorial>", "exec"), namespace)
    return namespace


def _tutorial(args):
    # examples/ is installed as distgrad.examples, so this works from a wheel too.
    spec = importlib.util.find_spec("distgrad.examples.autograd_tutorial")
    with open(spec.origin, encoding="utf-8") as f:
        source = f.read()
    print("The classic PyTorch autograd tutorial on distgrad (only its imports changed): each "
          f"statement, then what it prints. Source: {spec.origin}\n")
    tutorial_transcript(source)
    return 0


def _info(args):
    from threadpoolctl import threadpool_info   # a worker dependency, needed only here
    print(f"distgrad {__version__} (python {sys.version.split()[0]})")
    print(f"numpy {numpy.__version__}")
    for mod in ("cupy", "ray", "msgpack", "torch"):
        try:
            m = __import__(mod)
            print(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError:
            print(f"{mod} not installed" + (" (optional: the baseline of bench/)" if mod == "torch" else ""))
    cores = usable_cores()
    pools = ", ".join(f"{p['internal_api']} {p['num_threads']} threads" for p in threadpool_info()) or "none found"
    print(f"threads: {cores} usable cores; BLAS in this process: {pools}. Workers limit their BLAS "
          f"to their CPU share: backend='ray' num_cpus_per_worker threads each (default 1); "
          f"backend='local' {cores} cores // workers each (2 workers: {max(1, cores // 2)})")
    if args.address:
        from .scheduler.ray_gang import describe_nodes     # Ray lives in the scheduler
        for node in describe_nodes(args.address):
            print(f"node {node['address']} alive={node['alive']} CPUs={node['cpus']:g} "
                  f"GPUs={node['gpus']:g}")
    else:
        print("not connected to a Ray cluster (pass --address auto to list its nodes)")
    return 0


def bench_scripts():
    """Names of the benchmark scripts shipped in ``distgrad.bench``.

    Example: ``bench_scripts()`` -> ``['allreduce', 'bench_nn', ...]``.
    """
    import distgrad.bench      # here: the bench scripts' package, which only this command reads
    return sorted(m.name for m in pkgutil.iter_modules(distgrad.bench.__path__)
                  if not m.name.startswith("_"))


def _bench(args):
    scripts = bench_scripts()
    if args.list:
        print("\n".join(scripts))
        return 0
    if args.only:
        scripts = [s for s in scripts if args.only in s]
        if not scripts:
            print(f"distgrad bench: error: no benchmark matches --only {args.only!r} "
                  f"(there are: {', '.join(bench_scripts())})", file=sys.stderr)
            return EXIT_ERROR
    flags = ["--quick"] if args.quick else []
    if args.save is not None:                    # "" (bare --save): each script's own folder
        flags += ["--save"] + ([args.save] if args.save else [])
    failed = []
    for s in scripts:
        print(f"== distgrad.bench.{s}", flush=True)
        if subprocess.call([sys.executable, "-m", f"distgrad.bench.{s}", *flags]) != 0:
            failed.append(s)
    if failed:
        print(f"distgrad bench: {len(failed)} of {len(scripts)} did not complete: {', '.join(failed)} "
              "(see their messages above)", file=sys.stderr)
        return 1
    return 0


def make_parser():
    """The argument parser of the ``distgrad`` command.

    Example: ``make_parser().parse_args(["demo", "--workers", "4"]).workers`` -> 4.
    """
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="distgrad", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"distgrad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level and show Ray's own start-up messages")
    # -v after the command too (distgrad demo -v); SUPPRESS keeps a -v given before it.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log at INFO level and show Ray's own start-up messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", parents=[verbose], formatter_class=fmt,
                          help="data-parallel training on built-in data (the main job)",
                          description="Train a small MLP data-parallel on a generated spiral data "
                          "set, report training and held-out accuracy and throughput, and check "
                          "that the distributed gradients equal single-process ones.")
    demo.add_argument("--workers", type=int, default=2, help="number of workers")
    demo.add_argument("--address", default=None,
                      help="Ray cluster to join ('auto' inside a Ray job); none: start a local Ray instance")
    demo.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                      help="where the workers compute (cuda: one GPU per worker, needs cupy)")
    demo.add_argument("--steps", type=int, default=300, help="training steps")
    demo.add_argument("--backend", default="ray", choices=["ray", "local"],
                      help="ray: one Ray actor per worker; local: threads of this process, no Ray")
    demo.add_argument("--batch-size", type=int, default=256, help="samples per step, split across the workers")
    demo.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (momentum 0.9)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data, split and initial weights")
    demo.add_argument("--plot", default=None, metavar="PNG", help="write the loss curve here (needs matplotlib)")
    demo.add_argument("--timeline", default=None, metavar="JSON",
                      help="write a Chrome trace of the workers' recent steps here")
    demo.add_argument("--no-progress", action="store_true",
                      help="no progress bar (without a terminal it is a line every few seconds)")
    demo.add_argument("--no-worker-output", action="store_true",
                      help="keep what the Ray workers print off this terminal")
    demo.add_argument("--pin-cpus", action="store_true",
                      help="give each Ray worker its own cores (dg.init's pin_cpus)")
    demo.set_defaults(fn=_demo)

    sub.add_parser("tutorial", parents=[verbose], formatter_class=fmt,
                   help="run the seed autograd tutorial, each statement shown before its output",
                   ).set_defaults(fn=_tutorial)

    info = sub.add_parser("info", parents=[verbose], formatter_class=fmt,
                          help="versions, BLAS threads and the Ray cluster's nodes")
    info.add_argument("--address", default=None, help="Ray cluster whose nodes to list ('auto' inside a job)")
    info.set_defaults(fn=_info)

    bench = sub.add_parser("bench", parents=[verbose], formatter_class=fmt,
                           help="run the benchmarks (ratios against baselines measured in the same run)",
                           description="Run the benchmarks shipped in distgrad.bench. Each prints "
                           "ratios against a baseline measured in the same run; those whose baseline "
                           "is PyTorch need `pip install torch==2.13.0` and refuse without it.")
    bench.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (a smoke run)")
    bench.add_argument("--only", default=None, metavar="NAME", help="run only scripts whose name contains this")
    bench.add_argument("--save", nargs="?", const="", default=None, metavar="DIR",
                       help="write result files to DIR (default with no DIR: each script's own, "
                       "bench/results in a checkout); without --save nothing is written")
    bench.add_argument("--list", action="store_true", help="list the benchmark scripts and exit")
    bench.set_defaults(fn=_bench)
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if getattr(args, "pin_cpus", False) and args.backend != "ray":
        parser.error("--pin-cpus pins Ray workers: it needs --backend ray")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (DeviceError, WorkerError, RecoveryError, ResizeError, MissingDependency) as e:
        # Expected failures (no GPU, no resources, lost workers): one line, not a traceback.
        print(f"distgrad {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        # The `with dg.init(...)` in the command has shut the workers down by now.
        print(f"\ndistgrad {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
