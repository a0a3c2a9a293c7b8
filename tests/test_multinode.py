"""Several Ray nodes on one machine (ray.cluster_utils.Cluster): losing a node mid-run."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.ray
def test_node_removed_mid_run_recovers_exactly():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "multinode_recovery.py")],
                          capture_output=True, text=True, timeout=600, env=env)
    lines = dict(line.split(" ", 2)[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collective, nodes = lines["collective"].split()
    assert collective == "hierarchical" and nodes == "2"      # workers really on two nodes
    assert lines["channels"] == "tcp tcp"     # the driver's node has no worker: TCP channels
    recoveries, world = map(int, lines["recoveries"].split())
    assert recoveries >= 1 and world in (1, 2)
    assert lines["removed"] == "1"
    assert float(lines["maxdiff"]) < 1e-10
