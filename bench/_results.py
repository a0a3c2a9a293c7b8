"""Shared by the bench scripts: time a callable; print a result table and keep it in
bench/results/."""
import os
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def publish(name, text):
    """Print ``text`` and write it to bench/results/<name>.md. Example: ``publish("recovery", table)``."""
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(text + "\n")


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
