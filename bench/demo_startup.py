"""`distgrad demo` as a user runs it: time to its first printed line and its wall time
(Ray start included), beside the same run's baseline, Ray alone (start a local instance,
two actors answer, shut down) measured in the same run.

Targets (issue 16): first line <= 1 s, wall time <= 20 s on 2 cores.

    python bench/demo_startup.py [--quick] [--save [DIR]]
"""
import os
import statistics
import subprocess
import sys
import time

if not __package__:       # run as a file in a checkout: make distgrad importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distgrad.bench._results import parser, publish  # noqa: E402

RAY_ALONE = """
import ray
ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False,
         configure_logging=False)
@ray.remote
class A:
    def ping(self):
        return 1
actors = [A.remote() for _ in range(2)]
ray.get([a.ping.remote() for a in actors])
ray.shutdown()
"""


def timed(cmd):
    """(seconds to the first line of output, seconds to exit) of ``cmd``."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    for _ in p.stdout:
        if first is None:
            first = time.perf_counter() - start
    if p.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit status {p.returncode}")
    return first, time.perf_counter() - start


def main():
    ap = parser(__doc__)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each (--quick: 1)")
    args = ap.parse_args()
    repeat = 1 if args.quick else args.repeat
    load0 = os.getloadavg()[0]
    ray_alone, first, wall = [], [], []
    for _ in range(repeat):        # interleaved, so both see the same machine load
        ray_alone.append(timed([sys.executable, "-c", RAY_ALONE])[1])
        f, w = timed([sys.executable, "-m", "distgrad.cli", "demo", "--no-progress"])
        first.append(f)
        wall.append(w)
    base, demo, first_line = (statistics.median(x) for x in (ray_alone, wall, first))
    text = "\n".join([
        f"| measure (median of {repeat}, {os.cpu_count()} CPUs, load {load0:.1f} -> "
        f"{os.getloadavg()[0]:.1f}) | seconds | ratio to Ray alone | target |",
        "|---|---|---|---|",
        f"| Ray alone: local instance, 2 actors answer, shutdown | {base:.1f} | 1.00x | - |",
        f"| `distgrad demo` (300 steps), wall time | {demo:.1f} | {demo / base:.2f}x | <= 20 s: "
        f"{'met' if demo <= 20 else 'MISSED'} |",
        f"| `distgrad demo`, first printed line | {first_line:.2f} | - | <= 1 s: "
        f"{'met' if first_line <= 1 else 'MISSED'} |",
    ])
    publish("demo_startup", text, args.save)


if __name__ == "__main__":
    main()
