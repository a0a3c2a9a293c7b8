"""Ctrl-C at every moment of recording, for tests/test_interrupts.py.

A thread interrupts the main thread (as SIGINT does) at random moments, hundreds of times,
while the main thread records training steps on a cluster; each KeyboardInterrupt is caught
and training goes on. However the interrupts fall (inside an op's recording, a send, a
wait), the driver's record of the workers' values must stay whole: every later program
runs, and a final step gives the gradients a single process computes from the same
parameters. Prints "OK <interrupts caught>" or raises.

    python interrupted_recording.py local|ray INTERRUPTS SEED
"""
import _thread
import signal
import sys
import threading
import time

import numpy as np

import distgrad as dg
import distgrad.nn as nn
import distgrad.nn.functional as F
from distgrad import _interrupt

backend, interrupts, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(seed)
X = rng.standard_normal((512, 20)).astype(np.float32)
y = (X[:, 0] > 0).astype(np.int64)


def make_model():
    dg.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))


cluster = dg.init(workers=2, backend=backend)
signal.signal(signal.SIGINT, _interrupt._handler)    # also where the test runner has its own
model = cluster.replicate(make_model())
opt = dg.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

fired = threading.Event()
done = threading.Event()
go = threading.Event()        # set inside the catching loop: no interrupt lands before it


def interrupter():
    go.wait()
    for _ in range(interrupts):
        time.sleep(rng.uniform(0.0, 0.004))
        fired.clear()
        _thread.interrupt_main()
        # One interrupt in flight at a time (however long a deferral or a wait for the
        # workers holds it back): two would merge into one, or the second would land in
        # the handler of the first, where no program catches it.
        fired.wait()
    done.set()


def step(idx):
    xb, yb = cluster.shard(X[idx]), cluster.shard(y[idx])
    loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def train_until_done():
    go.set()
    while not done.is_set():
        step(rng.integers(0, 512, 64))
        if rng.random() < 0.3:
            cluster.sync()


def settle():
    """A deferred interrupt may still be on its way: let it land here."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        time.sleep(0.01)


def run_catching(fn):
    """Run ``fn`` to its end, starting it again after each interrupt (as the README's loop
    does), and count them. An interrupt is caught wherever it lands: in ``fn``, or between
    two runs of it (the inner loop's own steps are inside the outer ``try``)."""
    caught = 0
    while True:
        try:
            while True:
                try:
                    fn()
                    return caught
                except KeyboardInterrupt:
                    caught += 1
                    fired.set()
        except KeyboardInterrupt:
            caught += 1
            fired.set()


threading.Thread(target=interrupter, daemon=True).start()
caught = run_catching(train_until_done) + run_catching(settle)
signal.signal(signal.SIGINT, signal.default_int_handler)
cluster.sync()                     # whatever was recorded between the interrupts runs

# The state the interrupted steps left is consistent: one more step on the cluster gives
# what a single process computes from the same parameters and momentum buffers.
idx = np.arange(128)
params = list(model.parameters())
local = make_model()
local_opt = dg.optim.SGD(local.parameters(), lr=0.05, momentum=0.9)
with dg.no_grad():
    for p, q in zip(params, local.parameters()):
        q.copy_(dg.tensor(cluster.gather(p)))
        if "momentum_buffer" in opt.state.get(p, {}):
            buf = cluster.gather(opt.state[p]["momentum_buffer"])
            local_opt.state[q] = {"momentum_buffer": dg.tensor(buf)}
loss = step(idx)
local_loss = F.cross_entropy(local(dg.tensor(X[idx])), dg.tensor(y[idx]))
local_opt.zero_grad()
local_loss.backward()
local_opt.step()
np.testing.assert_allclose(loss.item(), local_loss.item(), rtol=1e-5)
for p, q in zip(params, local.parameters()):
    np.testing.assert_allclose(cluster.gather(p.grad), q.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cluster.gather(p), q.detach().numpy(), rtol=1e-5, atol=1e-6)
cluster.shutdown()
print("OK", caught, flush=True)
