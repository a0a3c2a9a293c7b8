"""Resident memory of a Ray worker holding a model and its optimizer, against the same
model and optimizer trained in one local process, measured in one run.

The model: an MLP of four Linear layers on 4096 features (about 50M parameters, 201 MB),
Adam, batch 64, three steps. Reported: each side's resident set (VmRSS) between steps, as
the training loop leaves it (the worker has committed the last step: the old parameters
and moments it kept to undo it are gone), its peak (VmHWM), their ratios (worker over
local process), and how much of the worker's resident set is pages of Ray's shared object
store (RssShmem). The worker reads the parameters the driver shipped in place there, and
after each program gives back the pages it read (``workers/shared_pages.py``): a few MB
are left.

    python bench/worker_memory.py [--quick] [--save]
"""
import os
import subprocess
import sys
import textwrap

if not __package__:       # run as a file in a checkout: make distgrad importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distgrad.bench._results import parser, publish  # noqa: E402

TRAIN = textwrap.dedent("""
    import numpy as np
    import distgrad as dg, distgrad.nn as nn, distgrad.nn.functional as F

    def model():
        dg.manual_seed(0)
        return nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                             nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))

    def train(m, shard, steps):
        opt = dg.optim.Adam(m.parameters(), lr=1e-4)
        rng = np.random.default_rng(0)
        for _ in range(steps):
            x = rng.standard_normal((64, 4096)).astype(np.float32)
            y = rng.integers(0, 10, 64)
            loss = F.cross_entropy(m(shard(x)), shard(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
        return opt
""")

LOCAL = TRAIN + textwrap.dedent("""
    m = model()
    opt = train(m, dg.tensor, STEPS)
    print(open("/proc/self/status").read())
""")

RAY = TRAIN + textwrap.dedent("""
    import ray
    with dg.init(workers=1) as cluster:
        m = cluster.replicate(model())
        opt = train(m, cluster.shard, STEPS)
        cluster.stats()     # runs on the worker after the last step's commit: the loop's state
        pid = cluster.gang.pid(0)
        print(open(f"/proc/{pid}/status").read())
""")


def _status_kb(text, field):
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc status output")


def _run(code, steps):
    out = subprocess.run([sys.executable, "-c", code.replace("STEPS", str(steps))],
                         capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return tuple(_status_kb(out.stdout, f) / 1024 for f in ("VmRSS", "VmHWM", "RssShmem"))


def main():
    args = parser(__doc__).parse_args()
    steps = 2 if args.quick else 3
    local = _run(LOCAL, steps)
    worker = _run(RAY, steps)
    lines = ["| 50M-parameter MLP, Adam, after %d steps | RSS MB | peak RSS MB | of the RSS: "
             "object-store pages MB |" % steps,
             "|---|---|---|---|",
             f"| one local process | {local[0]:.0f} | {local[1]:.0f} | {local[2]:.0f} |",
             f"| one Ray worker | {worker[0]:.0f} | {worker[1]:.0f} | {worker[2]:.0f} |",
             f"| ratio worker / local | {worker[0] / local[0]:.2f}x | {worker[1] / local[1]:.2f}x | |",
             f"| ratio without the object-store pages | {(worker[0] - worker[2]) / local[0]:.2f}x "
             "| | |"]
    publish("worker_memory", "\n".join(lines), args.save)


if __name__ == "__main__":
    main()
