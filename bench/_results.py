"""Shared by the bench scripts: the common flags, the baseline check, timing, and the
result tables (printed; written to files only with ``--save``)."""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# In a source checkout the committed tables live in bench/results/; an installed package
# has no such folder, so --save writes to the current directory instead.
RESULTS = os.path.join(HERE, "results")
DEFAULT_SAVE_DIR = RESULTS if os.path.isdir(RESULTS) else os.path.join(os.getcwd(), "distgrad-bench-results")

# Exit status of a script that cannot measure its baseline (so it reports no ratio).
EXIT_NO_BASELINE = 3


def add_common_args(ap):
    """The flags every bench script takes (``distgrad bench`` passes them through).

    Example: ``ap = argparse.ArgumentParser(); add_common_args(ap); ap.parse_args(["--quick"])``.
    """
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (a smoke run)")
    ap.add_argument("--save", nargs="?", const=DEFAULT_SAVE_DIR, default=None, metavar="DIR",
                    help="also write the result files to DIR (default with no DIR: "
                         f"{os.path.relpath(DEFAULT_SAVE_DIR)}); without --save nothing is written")
    return ap


def parser(doc):
    """An ArgumentParser for a bench script: the first line of ``doc`` as its description,
    defaults shown in --help, and the common flags. Example: ``ap = parser(__doc__)``."""
    return add_common_args(argparse.ArgumentParser(
        description=doc.strip().splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter))


def paired_parser(doc, threads, threads_help):
    """``parser(doc)`` with what a paired comparison (``paired``) takes: --threads,
    --seconds per case and --rounds. Example: ``paired_parser(__doc__, 2, "BLAS threads")``."""
    ap = parser(doc)
    ap.add_argument("--threads", type=int, default=threads, help=threads_help)
    ap.add_argument("--seconds", type=float, default=5.0, help="time budget per case")
    ap.add_argument("--rounds", type=int, default=10, help="at least this many alternating blocks")
    return ap


def parse_paired(ap):
    """The arguments of a ``paired_parser``; --quick: 1 s per case, 5 rounds at least."""
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = min(args.seconds, 1.0), min(args.rounds, 5)
    return args


def pin_threads(n):
    """Give numpy's BLAS and OpenMP ``n`` threads: call it before numpy is imported."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def require_baseline(module, what):
    """Import ``module`` (the baseline every ratio of the script is measured against) or
    exit with one line saying what to install. A ratio without its baseline is not
    reported, and a missing baseline is never silently dropped.

    Example: ``torch = require_baseline("torch", "PyTorch's training step")``.
    """
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        print(f"{os.path.basename(sys.argv[0]) or 'bench'}: cannot measure the baseline ({what}): "
              f"{e}. Install it with `pip install torch==2.13.0` (or `pip install '.[bench]'` "
              "in the distgrad checkout); no ratio is reported without it.", file=sys.stderr)
        raise SystemExit(EXIT_NO_BASELINE) from None


def publish(name, text, save=None):
    """Print ``text``; with ``save`` (a folder) also write it to ``<save>/<name>.md``.

    Example: ``publish("recovery", table, args.save)``.
    """
    print(text)
    write(name, text, save)


def write(name, text, save):
    """Write ``text`` to ``<save>/<name>.md`` when ``save`` names a folder (``--save``); else
    nothing. Example: ``write("bench_nn", "\\n".join(lines), args.save)``."""
    if save:
        os.makedirs(save, exist_ok=True)
        path = os.path.join(save, f"{name}.md")
        with open(path, "w") as f:
            f.write(text + "\n")
        print(f"wrote {path}", file=sys.stderr)


def timings(fn, repeat, warmup=0):
    """Wall-clock seconds of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones.

    Example: ``statistics.median(timings(step, 10, warmup=3))``.
    """
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def paired(fn_a, fn_b, seconds, rounds, block=5, clock=time.perf_counter):
    """Time ``fn_a`` against ``fn_b`` in alternating blocks of ``block`` calls; return
    (best seconds per call of a, best of b, median of the per-round ratios a/b).

    The two blocks of one round see the same load on a shared machine, so their ratio is a
    paired measurement; its median over at least ``rounds`` rounds (and ``seconds`` of
    wall time) is the figure to report. Both are called twice first (allocations, caches).

    Example: ``best_d, best_t, ratio = paired(d_step, t_step, seconds=5, rounds=10)``.
    """
    for fn in (fn_a, fn_b):
        fn(), fn()
    deadline = time.perf_counter() + seconds
    times = {fn_a: [], fn_b: []}
    while len(times[fn_a]) < rounds or time.perf_counter() < deadline:
        for fn in (fn_a, fn_b):
            start = clock()
            for _ in range(block):
                fn()
            times[fn].append((clock() - start) / block)
    ratios = sorted(a / b for a, b in zip(times[fn_a], times[fn_b]))
    return min(times[fn_a]), min(times[fn_b]), ratios[len(ratios) // 2]
