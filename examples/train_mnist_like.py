"""Train a small CNN and an MLP on generated MNIST-like digits (no download), with dg.nn.

The data set is rendered here: ten 5x7 bitmap digits, each randomly scaled, sheared,
shifted, thickened, blurred and covered in noise, on a 28x28 canvas. The script trains
both models locally, shows a tqdm progress bar, and reports test accuracy.

    python examples/train_mnist_like.py                   # both models, 3 epochs
    python examples/train_mnist_like.py --model cnn --epochs 1 --save cnn.dgt
"""
import argparse
import os
import sys
import time

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distgrad as dg  # noqa: E402
import distgrad.nn as nn  # noqa: E402
import distgrad.nn.functional as F  # noqa: E402
import distgrad.optim as optim  # noqa: E402

GLYPHS = [
    "01110 10001 10011 10101 11001 10001 01110",   # 0
    "00100 01100 00100 00100 00100 00100 01110",   # 1
    "01110 10001 00001 00010 00100 01000 11111",   # 2
    "11111 00010 00100 00010 00001 10001 01110",   # 3
    "00010 00110 01010 10010 11111 00010 00010",   # 4
    "11111 10000 11110 00001 00001 10001 01110",   # 5
    "00110 01000 10000 11110 10001 10001 01110",   # 6
    "11111 00001 00010 00100 01000 01000 01000",   # 7
    "01110 10001 10001 01110 10001 10001 01110",   # 8
    "01110 10001 10001 01111 00001 00010 01100",   # 9
]


def make_digits(n, seed=0, size=28):
    """``n`` random digit images (n, 1, size, size) float32 in [0, 1] and labels (n,) int64.

    Example::

        x, y = make_digits(1000)
    """
    rng = np.random.default_rng(seed)
    glyphs = np.array([[[c == "1" for c in row] for row in g.split()] for g in GLYPHS], np.float32)
    glyphs = np.pad(glyphs, ((0, 0), (1, 1), (1, 1)))            # (10, 9, 7): zero border
    labels = rng.integers(0, 10, n)
    sx, sy = rng.uniform(2.2, 3.6, n), rng.uniform(2.0, 3.0, n)
    shear = rng.uniform(-0.35, 0.35, n)
    cx = size / 2 + rng.uniform(-3, 3, n)
    cy = size / 2 + rng.uniform(-3, 3, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Inverse map each canvas pixel to glyph coordinates, then sample bilinearly.
    dy = yy[None] - cy[:, None, None]
    dx = xx[None] - cx[:, None, None]
    u = (dx - shear[:, None, None] * dy) / sx[:, None, None] + 3.5
    v = dy / sy[:, None, None] + 4.5
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = u - u0, v - v0
    img = np.zeros((n, size, size), np.float32)
    idx = np.arange(n)[:, None, None]
    for du, dv, wgt in [(0, 0, (1 - fu) * (1 - fv)), (1, 0, fu * (1 - fv)),
                        (0, 1, (1 - fu) * fv), (1, 1, fu * fv)]:
        uu, vv = np.clip(u0 + du, 0, 6), np.clip(v0 + dv, 0, 8)
        inside = (u0 + du >= 0) & (u0 + du <= 6) & (v0 + dv >= 0) & (v0 + dv <= 8)
        img += wgt * glyphs[labels[:, None, None], vv, uu] * inside * (idx >= 0)
    # Stroke thickness: blend in a 3x3 max with a random weight; then blur, noise, contrast.
    thick = np.max([np.roll(np.roll(img, a, 1), b, 2) for a in (-1, 0, 1) for b in (-1, 0, 1)], 0)
    img = img + rng.uniform(0, 0.8, (n, 1, 1)) * (thick - img)
    img = (img + np.roll(img, 1, 1) + np.roll(img, 1, 2) + np.roll(img, -1, 1)
           + np.roll(img, -1, 2)) / 5 * rng.uniform(1.2, 2.0, (n, 1, 1))
    img += rng.normal(0, 0.25, img.shape) + rng.uniform(0, 0.3, (n, 1, 1)) * rng.random(img.shape)
    return np.clip(img, 0, 1).astype(np.float32)[:, None], labels.astype(np.int64)


class CNN(nn.Module):
    """LeNet-style: two conv+pool blocks and two linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 128), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(128, 10))


def accuracy(model, x, y, batch=500):
    model.eval()
    correct = 0
    with dg.no_grad():
        for i in range(0, len(x), batch):
            pred = model(dg.from_numpy(x[i:i + batch])).argmax(1).numpy()
            correct += int((pred == y[i:i + batch]).sum())
    model.train()
    return correct / len(x)


def train(name, model, data, epochs, batch, lr, seed):
    (xtr, ytr), (xte, yte) = data
    opt = optim.Adam(model.parameters(), lr=lr)
    sched = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(xtr))
        bar = tqdm(range(0, len(xtr), batch), desc=f"{name} epoch {epoch + 1}/{epochs}",
                   unit="batch", leave=True)
        for i in bar:
            idx = order[i:i + batch]
            opt.zero_grad()
            loss = F.cross_entropy(model(dg.from_numpy(xtr[idx])), dg.from_numpy(ytr[idx]))
            loss.backward()
            opt.step()
            if (i // batch) % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        sched.step()
    seconds = time.perf_counter() - start
    acc = accuracy(model, xte, yte)
    print(f"{name}: test accuracy {acc * 100:.2f}% on {len(xte)} images "
          f"({epochs} epochs, {seconds:.1f} s)")
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["cnn", "mlp", "both"], default="both")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-size", type=int, default=12000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", help="save the (last) trained model's state_dict here")
    args = ap.parse_args(argv)
    dg.manual_seed(args.seed)
    data = (make_digits(args.train_size, args.seed), make_digits(args.test_size, args.seed + 1))
    results = {}
    for name in (["cnn", "mlp"] if args.model == "both" else [args.model]):
        model = CNN() if name == "cnn" else mlp()
        results[name] = train(name, model, data, args.epochs, args.batch_size, args.lr, args.seed)
        if args.save:
            dg.save(model.state_dict(), args.save)
    return results


if __name__ == "__main__":
    main()
