"""Run by tests/test_multinode.py in its own process (a process joins one Ray cluster only).

A 4-node ray.cluster_utils.Cluster; 2 workers spread over 2 nodes (hierarchical collective
over TCP); the node of worker 1 is removed mid-run; the job must end with the parameters
of an undisturbed single-process run. Prints RESULT lines for the test to check.
"""
import os
import sys
import time

import numpy as np
import ray
from ray.cluster_utils import Cluster

import distgrad as dg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training_loop import train  # noqa: E402


def main():
    ref = train(None, 10)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]      # the third one is spare
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root}})
    try:
        with dg.init(workers=2, backend="ray", timeout_s=10, strategy="SPREAD") as c:
            print("RESULT collective", c.gang.collective, len(set(c.gang.nodes)))
            print("RESULT channels", " ".join(ch.kind if ch else "ray" for ch in c.gang.channels))
            victim_node = c.gang.nodes[1]

            def remove(i):
                if i == 4:
                    victim = [n for n in nodes if n.node_id == victim_node]
                    print("RESULT removed", len(victim))
                    cluster.remove_node(victim[0], allow_graceful=False)
                    # Worker processes notice their raylet's death within a few seconds.
                    deadline = time.time() + 30
                    while time.time() < deadline and any(
                            n["NodeID"] == victim_node and n["Alive"] for n in ray.nodes()):
                        time.sleep(0.2)
                    time.sleep(2)
            got = train(c, 10, on_step=remove)
            print("RESULT recoveries", len(c.recoveries), c.world_size)
        print("RESULT maxdiff", float(np.abs(got - ref).max() / np.abs(ref).max()))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
