"""The README's training loop, for tests/test_first_hour.py: it catches the first N
Ctrl-Cs (printing INTERRUPTED k at once for each) and goes on training; the next one is
not caught, and the script never calls cluster.shutdown().

    python interrupted_training.py ray|local N
"""
import sys

import numpy as np

import distgrad as dg
import distgrad.nn as nn
import distgrad.nn.functional as F

backend, interrupts = sys.argv[1], int(sys.argv[2])
X = np.random.randn(1000, 20).astype(np.float32)
y = (X[:, 0] > 0).astype(np.int64)
cluster = dg.init(workers=2, backend=backend)
model = cluster.replicate(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2)))
opt = dg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train_forever():
    while True:
        idx = np.random.randint(0, 1000, 128)
        xb, yb = cluster.shard(X[idx]), cluster.shard(y[idx])
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(); loss.backward(); opt.step()
        loss.item()


print("READY", flush=True)
for k in range(1, interrupts + 1):
    try:
        train_forever()
    except KeyboardInterrupt:
        print(f"INTERRUPTED {k}", flush=True)
train_forever()
