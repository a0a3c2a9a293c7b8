"""Ctrl-C never tears the driver's record of what the workers hold.

The driver's bookkeeping (recording an op, taking a program to send, posting it to every
worker, undoing a failed one) is marked atomic: an interrupt arriving inside it lands just
after (tests/test_first_hour.py checks the deferral itself). An interrupt while the driver
waits for a program makes every worker undo it too. The differential check: after hundreds
of interrupts at random moments, a step on the cluster gives what one process computes
from the same parameters and optimizer state.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "interrupted_recording.py"


@pytest.mark.parametrize("backend,interrupts", [
    ("local", 200), pytest.param("ray", 100, marks=[pytest.mark.ray, pytest.mark.slow])])
def test_interrupts_at_random_moments_leave_the_cluster_consistent(backend, interrupts, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(SCRIPT), backend, str(interrupts), "0"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.split()[-2:] == ["OK", str(interrupts)], r.stdout
