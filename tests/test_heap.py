"""Importing distgrad keeps freed heap memory for reuse (glibc): a training loop's
activations are not handed back to the OS and faulted in again every step."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocate, touch and free 8 MB arrays as a step does with its activations; print the
# minor page faults of the last 20 rounds.
LOOP = """
import resource, numpy as np
import distgrad
def step():
    a = [np.ones(1 << 20) for _ in range(4)]          # 4 x 8 MB, written
    del a
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep):
    env = dict(os.environ, DISTGRAD_KEEP_FREED_HEAP="1" if keep else "0",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_are_reused_not_faulted_in_again():
    kept, given_back = _faults(True), _faults(False)
    pages = 20 * 4 * (8 << 20) // 4096                 # what 20 rounds touch
    # glibc's default hands back the top of the heap after each round (here a quarter of
    # the pages are faulted in again every round); kept, nothing is.
    assert given_back > pages // 8, given_back
    assert kept < pages // 100, (kept, given_back)
