"""Checkpoint of a ~100 MB model from the workers vs writing 100 MB with numpy.save.

Target (issue 6): cluster.save_checkpoint <= 2x numpy.save of the same bytes, same run.

    python bench/checkpoint.py [--quick] [--backend ray|local]
"""
import os
import statistics
import sys
import tempfile

import numpy as np

if not __package__:       # run as a file in a checkout: make distgrad importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distgrad as dg  # noqa: E402
from distgrad.bench._results import parser, publish, timings  # noqa: E402
import distgrad.nn as nn  # noqa: E402


def best(fn, repeat):
    times = timings(fn, repeat)
    return min(times), statistics.median(times)


def main():
    ap = parser(__doc__)
    ap.add_argument("--backend", default="ray", choices=["ray", "local"],
                    help="where the 2 workers run: Ray actors or threads of this process")
    args = ap.parse_args()
    repeat = 3 if args.quick else 5
    # 5 layers of 2048 x 2560 float32 = 100 MiB of parameters (plus small biases).
    model = nn.Sequential(*[nn.Linear(2560, 2048) if i % 2 == 0 else nn.Linear(2048, 2560) for i in range(5)])
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    with tempfile.TemporaryDirectory() as d, dg.init(workers=2, backend=args.backend) as cluster:
        model = cluster.replicate(model)
        arrays = {k: v.data.numpy() for k, v in model.state_dict().items()}
        flat = np.concatenate([a.ravel() for a in arrays.values()])

        def np_save():
            with open(os.path.join(d, "ref.npy"), "wb") as f:
                np.save(f, flat)
                f.flush()
                os.fsync(f.fileno())
        ref_min, ref_med = best(np_save, repeat)
        ck_min, ck_med = best(lambda: cluster.save_checkpoint(os.path.join(d, "ckpt.dg"), model, step=1), repeat)
        size = os.path.getsize(os.path.join(d, "ckpt.dg"))
    ratio = ck_min / ref_min
    text = "\n".join([
        f"| measure ({nbytes / 2**20:.0f} MiB of parameters, {args.backend} backend) | best s | median s |",
        "|---|---|---|",
        f"| numpy.save of the same bytes (+fsync) | {ref_min:.3f} | {ref_med:.3f} |",
        f"| cluster.save_checkpoint (gather from worker 0 + dg.save) | {ck_min:.3f} | {ck_med:.3f} |",
        "",
        f"ratio checkpoint / numpy.save = {ratio:.2f}x (target <= 2x: {'met' if ratio <= 2 else 'NOT met'}); "
        f"file {size / 2**20:.0f} MiB",
    ])
    publish("checkpoint", text, args.save)


if __name__ == "__main__":
    main()
