"""Run by tests/test_data_sources.py in its own process (a process joins one Ray cluster only).

A ray.cluster_utils.Cluster with 2 worker nodes; 2 workers spread over them read a dataset
themselves: .npy shards (every node sees this machine's files) trained to the parameters
of one process on the same batches, and a Ray Data stream read once per epoch. Prints
RESULT lines for the test to check.
"""
import os
import sys
import tempfile

import numpy as np
import ray
import ray.data
from ray.cluster_utils import Cluster

import distgrad as dg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_training import epochs_of, fit, local_batches, rows_dataset, write_npy  # noqa: E402


def main():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root}})
    try:
        X, y = rows_dataset(157)
        with tempfile.TemporaryDirectory() as tmp, \
                dg.init(workers=2, backend="ray", timeout_s=30, strategy="SPREAD") as c:
            print("RESULT nodes", len(set(c.gang.nodes)), flush=True)
            ds = c.shard_dataset(write_npy(tmp, X, y), batch_size=24, shuffle=True, seed=2)
            seen = []
            got = fit(epochs_of(ds, 2), c, seen=seen)
            ref = fit(local_batches(ds, X, y, 2))
            print("RESULT npy_rows_once", sorted(seen[:157]) == list(range(157))
                  and sorted(seen[157:]) == list(range(157)))
            print("RESULT npy_maxdiff", max(float(np.abs(p - q).max()) for p, q in zip(got, ref)))
            stream = c.shard_dataset(ray.data.from_items(
                [{"x": X[i], "y": y[i]} for i in range(157)], override_num_blocks=5),
                batch_size=24, shuffle=True)
            ids = sorted(int(v) for xb, _ in stream for v in xb.numpy()[:, 0])
            print("RESULT stream_rows_once", ids == list(range(157)), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
