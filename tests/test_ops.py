"""Every registered op, checked three ways: float64 gradcheck, PyTorch, and float32 dtypes.

The table ``CASES`` maps an op name to the cases that exercise it. A case is a function
``fn(m, *inputs)`` written once against the shared tensor API, where ``m`` is the module
(``distgrad`` or ``torch``) for free functions such as ``m.cat``; the inputs are built
from specs (shapes, or the spec helpers below). Ops that have no gradient (comparisons,
argmax, sign...) are in ``FORWARD_CASES`` and are checked for values only.

``test_every_registered_op_has_a_case`` fails for any op in ``distgrad.ops.OPS`` that has
no entry here: a new op must come with its test.
"""
import os
import zlib

import numpy as np
import pytest

import distgrad as dg
from distgrad import ops as dg_ops
from distgrad.autograd import Variable, gradcheck


# ---------------------------------------------------------------- input specs

class Spec:
    """How to make one input: ``kind`` picks the values, ``grad`` whether it requires grad."""

    def __init__(self, shape, kind="randn", grad=True, offset=0.0):
        self.shape, self.kind, self.grad, self.offset = tuple(shape), kind, grad, offset

    def values(self, rng):
        n = int(np.prod(self.shape, dtype=np.int64))
        if self.kind == "randn":
            v = rng.standard_normal(n)
        elif self.kind == "pos":                      # away from 0: log, sqrt, division
            v = rng.uniform(0.5, 2.0, n)
        elif self.kind == "distinct":
            # Distinct values at least 0.1 apart and 0.05 away from 0 and from +-0.5: no ties
            # and no kinks (abs, relu, clamp, max, min) within gradcheck's step.
            v = (rng.permutation(n) - n // 2) * 0.3 + 0.05 + self.offset
        elif self.kind == "zeros":                    # some exact zeros (prod's special case)
            v = rng.uniform(0.5, 2.0, n)
            v[rng.permutation(n)[: max(1, n // 4)]] = 0.0
        else:
            raise ValueError(self.kind)
        return v.reshape(self.shape)


def P(*shape):
    return Spec(shape, "pos")


def D(*shape, offset=0.0):
    return Spec(shape, "distinct", offset=offset)


def Z(*shape):
    return Spec(shape, "zeros")


def C(*shape):
    """An input that does not require grad (a constant operand)."""
    return Spec(shape, grad=False)


def _spec(s):
    return s if isinstance(s, Spec) else Spec(s)


SAME = object()


class Case:
    """One use of an op: ``fn(m, *inputs)`` on inputs built from ``specs``.

    ``torch_fn``: the PyTorch spelling when it differs (None: no PyTorch counterpart);
    ``gc``: gradcheck keyword overrides; ``keep_dtype``: float32 in, float32 out.
    """

    def __init__(self, fn, *specs, torch_fn=SAME, gc=None, keep_dtype=True, gpu_only=False):
        self.fn, self.specs = fn, [_spec(s) for s in specs]
        self.torch_fn = fn if torch_fn is SAME else torch_fn
        self.gc = gc or {}
        self.keep_dtype, self.gpu_only = keep_dtype, gpu_only

    def arrays(self, key):
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        return [s.values(rng) for s in self.specs]


def _set(index):
    """``y = x.clone(); y[index] = v``: the in-place index_put op."""
    def fn(m, x, v):
        idx = index(m)
        y = x.clone()
        y[idx] = v
        return y
    return fn


def _copy(m, x, s):
    y = x.clone()
    y.copy_(s)
    return y


def _zero(m, x):
    y = x.clone()
    y.zero_()
    return y + x


def _fill(m, x):
    y = x * 2
    y.fill_(0.25)
    return y * x


def _scatter(m, g):
    return g.scatter_add_zeros((4, 3), np.array([0, 2, 0]))


CASES = {
    "add": [Case(lambda m, a, b: a + b, (2, 3), (2, 3)),
            Case(lambda m, a, b: a + b, (2, 3), (3,)),
            Case(lambda m, a, b: a + b, (3,), (2, 3)),
            Case(lambda m, a, b: a + b, (2, 1, 3), (4, 1)),
            Case(lambda m, a, b: a + b, (), (2, 3)),
            Case(lambda m, a: a + 2, (2, 3)),
            Case(lambda m, a: 2.5 + a, (2, 3)),
            Case(lambda m, a, b: a.add(b, alpha=2), (2, 3), (1, 3))],
    "sub": [Case(lambda m, a, b: a - b, (2, 3), (3,)),
            Case(lambda m, a, b: a - b, (3, 1), (2, 1, 4)),
            Case(lambda m, a: a - 2, (2, 3)),
            Case(lambda m, a: 2 - a, (2, 3)),
            Case(lambda m, a, b: a - b, (2, 3), C(2, 3))],
    "mul": [Case(lambda m, a, b: a * b, (2, 3), (2, 3)),
            Case(lambda m, a, b: a * b, (2, 3), (3,)),
            Case(lambda m, a, b: a * b, (4, 1), (2, 1, 3)),
            Case(lambda m, a, b: a * b, (2, 3), ()),
            Case(lambda m, a: a * 3, (2, 3)),
            Case(lambda m, a: 3 * a, (2, 3)),
            Case(lambda m, a: a * a, (3,))],
    "div": [Case(lambda m, a, b: a / b, (2, 3), P(2, 3)),
            Case(lambda m, a, b: a / b, (2, 3), P(3,)),
            Case(lambda m, a, b: a / b, (3,), P(2, 3)),
            Case(lambda m, a: a / 4, (2, 3)),
            Case(lambda m, a: 2 / a, P(2, 3))],
    "pow": [Case(lambda m, a: a ** 2, (2, 3)),
            Case(lambda m, a: a ** 3, (4,)),
            Case(lambda m, a: a ** 0.5, P(2, 3)),
            Case(lambda m, a: a ** -1.5, P(3,)),
            Case(lambda m, a: 2 ** a, (2, 3)),
            Case(lambda m, a, b: a ** b, P(2, 3), (2, 3)),
            Case(lambda m, a, b: a ** b, P(2, 3), (3,)),
            Case(lambda m, a, b: a ** b, P(3,), (2, 3))],
    "neg": [Case(lambda m, a: -a, (2, 3)), Case(lambda m, a: a.neg(), (3,))],
    "exp": [Case(lambda m, a: a.exp(), (2, 3)), Case(lambda m, a: m.exp(a), (4,))],
    "log": [Case(lambda m, a: a.log(), P(2, 3)), Case(lambda m, a: m.log(a), P(4,))],
    "sqrt": [Case(lambda m, a: a.sqrt(), P(2, 3))],
    "abs": [Case(lambda m, a: a.abs(), D(2, 3)), Case(lambda m, a: abs(a), D(4,))],
    "sin": [Case(lambda m, a: a.sin(), (2, 3))],
    "cos": [Case(lambda m, a: a.cos(), (2, 3))],
    "tanh": [Case(lambda m, a: a.tanh(), (2, 3)), Case(lambda m, a: m.tanh(a * 3), (5,))],
    "sigmoid": [Case(lambda m, a: a.sigmoid(), (2, 3)),
                Case(lambda m, a: (a * 20).sigmoid(), (6,))],
    "relu": [Case(lambda m, a: a.relu(), D(2, 3)), Case(lambda m, a: m.relu(a), D(7,))],
    "hardtanh": [Case(lambda m, a: m.nn.functional.hardtanh(a, -0.5, 0.8), D(3, 4))],
    "clamp": [Case(lambda m, a: a.clamp(-0.5, 0.5), D(3, 4)),
              Case(lambda m, a: a.clamp(min=-0.5), D(3, 4)),
              Case(lambda m, a: a.clamp(max=0.5), D(3, 4))],
    "maximum": [Case(lambda m, a, b: m.maximum(a, b), D(2, 3), D(2, 3, offset=0.1)),
                Case(lambda m, a, b: m.maximum(a, b), D(2, 3), D(3, offset=0.1)),
                Case(lambda m, a, b: m.maximum(a, b), D(3), D(2, 3, offset=0.1)),
                Case(lambda m, a, b: a.max(b), D(3, 4), D(3, 4, offset=0.1))],
    "minimum": [Case(lambda m, a, b: m.minimum(a, b), D(2, 3), D(2, 3, offset=0.1)),
                Case(lambda m, a, b: m.minimum(a, b), D(2, 1), D(3, offset=0.1)),
                Case(lambda m, a, b: a.min(b), D(3, 4), D(3, 4, offset=0.1))],
    "where": [Case(lambda m, a, b: m.where(a > b, a, b), D(2, 3), D(2, 3, offset=0.1)),
              Case(lambda m, a, b: m.where(a > 0, a, b), D(2, 3), (3,)),
              Case(lambda m, a, b: m.where(b > 0, a, b), (3,), D(2, 3)),
              Case(lambda m, a: m.where(a > 0, a, 0.0), D(2, 3)),
              Case(lambda m, a, b: a.where(a < b, b), D(3, 4), D(3, 4, offset=0.1))],
    "mask_fill": [Case(lambda m, a: a.masked_fill(a > 0, 0.5), D(3, 4)),
                  Case(lambda m, a, b: a.masked_fill(b > 0, -1.0), (2, 3), D(3)),
                  Case(_zero, (2, 3)),
                  Case(_fill, (3, 2))],
    "astype": [Case(lambda m, a: a.float().double() * 2, (2, 3), keep_dtype=False,
                    gc=dict(eps=1e-3, atol=1e-3, rtol=1e-2))],
    "clone": [Case(lambda m, a: a.clone() * a, (2, 3))],
    "copy_from": [Case(_copy, (2, 3), (2, 3)), Case(_copy, (2, 3), (3,))],
    "to_device": [Case(lambda m, a: (a.to("cuda") * 2).cpu(), (2, 3), gpu_only=True)],
    "sum": [Case(lambda m, a: a.sum(), (2, 3)),
            Case(lambda m, a: a.sum(0), (2, 3)),
            Case(lambda m, a: a.sum(-1, keepdim=True), (2, 3, 4)),
            Case(lambda m, a: a.sum(dim=(0, 2)), (2, 3, 4)),
            Case(lambda m, a: a.sum(dim=(-1, 0), keepdim=True), (2, 3, 4)),
            Case(lambda m, a: a.sum(), ())],
    "mean": [Case(lambda m, a: a.mean(), (2, 3)),
             Case(lambda m, a: a.mean(1), (2, 3)),
             Case(lambda m, a: a.mean(-2, keepdim=True), (2, 3, 4)),
             Case(lambda m, a: a.mean(dim=(0, -1)), (2, 3, 4))],
    "amax": [Case(lambda m, a: a.max(), D(2, 3)),
             Case(lambda m, a: a.max(1).values, D(2, 3)),
             Case(lambda m, a: a.max(dim=-1, keepdim=True)[0], D(2, 3, 4)),
             Case(lambda m, a: a.amax(dim=(0, 2)), D(2, 3, 4)),
             Case(lambda m, a: a.amax(0, keepdim=True), D(3, 2))],
    "amin": [Case(lambda m, a: a.min(), D(2, 3)),
             Case(lambda m, a: a.min(0).values, D(2, 3)),
             Case(lambda m, a: a.min(-1, keepdim=True).values, D(2, 3, 4)),
             Case(lambda m, a: a.amin(dim=(1, 2), keepdim=True), D(2, 3, 4))],
    "prod": [Case(lambda m, a: a.prod(), (2, 3)),
             Case(lambda m, a: a.prod(1), (2, 3)),
             Case(lambda m, a: a.prod(-1, keepdim=True), (2, 3, 4)),
             Case(lambda m, a: a.prod(0), Z(4, 3)),
             Case(lambda m, a: a.prod(), Z(2, 2))],
    "norm": [Case(lambda m, a: a.norm(), (2, 3)),
             Case(lambda m, a: a.norm(dim=1), (2, 3)),
             Case(lambda m, a: a.norm(dim=-1, keepdim=True), (2, 3, 4)),
             Case(lambda m, a: a.norm(dim=(0, 1)), (2, 3, 4))],
    "logsumexp": [Case(lambda m, a: a.logsumexp(1), (2, 3)),
                  Case(lambda m, a: a.logsumexp(-1, keepdim=True), (2, 3, 4)),
                  Case(lambda m, a: a.logsumexp(dim=(0, 2)), (2, 3, 4)),
                  Case(lambda m, a: (a * 100).logsumexp(0), (3, 2))],
    "softmax": [Case(lambda m, a: a.softmax(1), (2, 3)),
                Case(lambda m, a: a.softmax(-1), (2, 3, 4)),
                Case(lambda m, a: a.softmax(0), (3, 2)),
                Case(lambda m, a: (a * 100).softmax(-1), (2, 3))],
    "log_softmax": [Case(lambda m, a: a.log_softmax(1), (2, 3)),
                    Case(lambda m, a: a.log_softmax(-2), (2, 3, 4)),
                    Case(lambda m, a: (a * 100).log_softmax(0), (3, 2))],
    "matmul": [Case(lambda m, a, b: a @ b, (3,), (3,)),
               Case(lambda m, a, b: a @ b, (2, 3), (3,)),
               Case(lambda m, a, b: a @ b, (3,), (3, 4)),
               Case(lambda m, a, b: a @ b, (2, 3), (3, 4)),
               Case(lambda m, a, b: a.mm(b), (2, 3), C(3, 4)),
               Case(lambda m, a, b: a @ b, (5, 2, 3), (5, 3, 4)),
               Case(lambda m, a, b: a @ b, (5, 2, 3), (3, 4)),
               Case(lambda m, a, b: a @ b, (2, 3), (5, 3, 4)),
               Case(lambda m, a, b: a @ b, (2, 1, 2, 3), (5, 3, 4)),
               Case(lambda m, a, b: a @ b, (3,), (5, 3, 4)),
               Case(lambda m, a, b: a.matmul(b), (5, 2, 3), (3,)),
               Case(lambda m, a, b: m.matmul(a, b), (2, 3), (3, 2))],
    "reshape": [Case(lambda m, a: a.reshape(3, 2), (2, 3)),
                Case(lambda m, a: a.view(-1), (2, 3)),
                Case(lambda m, a: a.reshape((4, -1)), (2, 3, 2)),
                Case(lambda m, a, b: a.view_as(b), (2, 3), C(3, 2)),
                Case(lambda m, a: a.flatten(), (2, 3, 2)),
                Case(lambda m, a: a.flatten(1), (2, 3, 2)),
                Case(lambda m, a: a.flatten(0, -2), (2, 3, 2))],
    "transpose": [Case(lambda m, a: a.transpose(0, 1), (2, 3)),
                  Case(lambda m, a: a.transpose(-1, 0), (2, 3, 4)),
                  Case(lambda m, a: a.t(), (2, 3)),
                  Case(lambda m, a: a.mT, (2, 3, 4))],
    "permute": [Case(lambda m, a: a.permute(2, 0, 1), (2, 3, 4)),
                Case(lambda m, a: a.permute((1, -1, 0)), (2, 3, 4)),
                Case(lambda m, a: a.T, (2, 3))],
    "squeeze": [Case(lambda m, a: a.squeeze(), (2, 1, 3, 1)),
                Case(lambda m, a: a.squeeze(1), (2, 1, 3)),
                Case(lambda m, a: a.squeeze(-1), (2, 3, 1)),
                Case(lambda m, a: a.squeeze(0), (2, 3))],
    "unsqueeze": [Case(lambda m, a: a.unsqueeze(0), (2, 3)),
                  Case(lambda m, a: a.unsqueeze(-1), (2, 3)),
                  Case(lambda m, a: a.unsqueeze(1), (3,))],
    "expand": [Case(lambda m, a: a.expand(3, 4), (3, 1)),
               Case(lambda m, a: a.expand(2, -1, 4), (3, 1)),
               Case(lambda m, a, b: a.expand_as(b), (1, 3), C(2, 3))],
    "getitem": [Case(lambda m, a: a[1], (3, 4)),
                Case(lambda m, a: a[-1], (3, 4)),
                Case(lambda m, a: a[1:3], (4, 3)),
                Case(lambda m, a: a[::2, 1:], (4, 3)),
                Case(lambda m, a: a[:, None], (2, 3)),
                Case(lambda m, a: a[..., 1], (2, 3, 4)),
                Case(lambda m, a: a[None, ..., -2], (2, 3, 4)),
                Case(lambda m, a: a[1, -2:], (3, 4)),
                Case(lambda m, a: a[m.tensor([0, 2, 0, 0])], (3, 4)),
                Case(lambda m, a: a[m.tensor([[1, 1], [0, 2]])], (3, 2)),
                Case(lambda m, a: a[m.tensor([0, 2, 0]), 1:3], (3, 4)),
                Case(lambda m, a: a[m.tensor([0, 2, 0]), m.tensor([1, 1, 1])], (3, 4)),
                Case(lambda m, a: a[:, m.tensor([3, 0, 3])], (2, 4)),
                Case(lambda m, a: a[1, m.tensor([2, 2])], (2, 4)),
                Case(lambda m, a: a[a > 0], D(3, 4)),
                Case(lambda m, a, b: a[:, b > 0], (2, 4), D(4)),
                Case(lambda m, a: m.stack(list(a)), (3, 2))],
    "scatter_add_zeros": [Case(_scatter, (3, 3), torch_fn=lambda m, g: m.zeros(4, 3, dtype=g.dtype)
                               .index_add(0, m.tensor([0, 2, 0]), g))],
    "index_put": [Case(_set(lambda m: 1), (3, 4), (4,)),
                  Case(_set(lambda m: (slice(0, 2), 1)), (3, 4), (2,)),
                  Case(_set(lambda m: m.tensor([0, 2])), (3, 4), (1, 4)),
                  Case(_set(lambda m: m.tensor([2, 0])), (3, 4), C(2, 4))],
    "cat": [Case(lambda m, a, b: m.cat([a, b]), (2, 3), (4, 3)),
            Case(lambda m, a, b, c: m.cat([a, b, c], dim=1), (2, 1), (2, 3), (2, 2)),
            Case(lambda m, a, b: m.cat((a, b), -1), (2, 2, 3), (2, 2, 1)),
            Case(lambda m, a, b: m.cat([a, b], 0), (2, 3), C(1, 3))],
    "stack": [Case(lambda m, a, b: m.stack([a, b]), (2, 3), (2, 3)),
              Case(lambda m, a, b, c: m.stack([a, b, c], dim=1), (2, 3), (2, 3), (2, 3)),
              Case(lambda m, a, b: m.stack((a, b), -1), (3,), (3,))],
}

# split / chunk are built from getitem; they are checked here with it.
CASES["getitem"] += [Case(lambda m, a: a.split(2), (5, 3)),
                     Case(lambda m, a: a.split([1, 3], dim=1), (2, 4)),
                     Case(lambda m, a: a.split(1, -1), (2, 3)),
                     Case(lambda m, a: a.chunk(2, 0), (4, 3))]

# Composite methods (var, std, p-norms...) are filed under the ops they are built from.
CASES["mean"] += [Case(lambda m, a: a.var(), (2, 3)),
                  Case(lambda m, a: a.var(1), (2, 3)),
                  Case(lambda m, a: a.var(-1, keepdim=True), (2, 3, 4)),
                  Case(lambda m, a: a.var(0, unbiased=False), (4, 3)),
                  Case(lambda m, a: a.var(dim=(0, 2), correction=0), (2, 3, 4))]
CASES["sqrt"] += [Case(lambda m, a: a.std(1), (3, 4)), Case(lambda m, a: a.std(), (2, 3))]
CASES["abs"] += [Case(lambda m, a: a.norm(p=1, dim=0), D(3, 2)),
                 Case(lambda m, a: a.norm(p=float("inf"), dim=1), D(3, 2))]
CASES["pow"] += [Case(lambda m, a: a.norm(p=3), (2, 3))]

# ---- Ops registered outside distgrad/ops/math.py and shape.py (nn, collectives...): add their cases here,
# ---- e.g. CASES["conv2d"] = [Case(lambda m, x, w: m.nn.functional.conv2d(x, w), (1, 2, 5, 5), (3, 2, 3, 3))]
# ---- or, when the gradient test must live elsewhere (collectives need workers), name it:
# ---- TESTED_ELSEWHERE["allreduce"] = "tests/test_collective.py::test_allreduce_gradient"
TESTED_ELSEWHERE = {}

# Collectives (distgrad/ops/collective.py): outside a worker the world has one rank, so each is
# the identity and its VJP (its transpose collective) must be too. Multi-rank behaviour is
# tested in tests/test_collective.py and the distributed tests.
CASES["allreduce"] = [Case(lambda m, x: x.apply("allreduce") * x, (2, 3),
                           torch_fn=lambda m, x: x * x)]
CASES["allgather"] = [Case(lambda m, x: x.apply("allgather", dim=0, sizes=(2,)).exp(), (2, 3),
                           torch_fn=lambda m, x: x.exp()),
                      Case(lambda m, x: x.apply("allgather", dim=-1, sizes=(3,)) * x, (2, 3),
                           torch_fn=lambda m, x: x * x)]
CASES["to_partial"] = [Case(lambda m, x: x.apply("to_partial").tanh() * x, (2, 3),
                            torch_fn=lambda m, x: x.tanh() * x)]
CASES["shard_rows"] = [Case(lambda m, x: x.apply("shard_rows", dim=0, sizes=(2,)).exp() * x, (2, 3),
                            torch_fn=lambda m, x: x.exp() * x)]
CASES["unshard_rows"] = [Case(lambda m, x: x.apply("unshard_rows", dim=1, sizes=(3,)).sin(), (2, 3),
                              torch_fn=lambda m, x: x.sin())]
CASES["reduce_scatter"] = [Case(lambda m, x: x.apply("reduce_scatter", dim=1, sizes=(3,)).sin(),
                                (2, 3), torch_fn=lambda m, x: x.sin())]


# nn ops (distgrad/ops/nn.py, linalg.py, fused.py, shape.py). The *_grad / *_pick ops are what a create_graph backward of
# conv and pooling runs, so their cases differentiate through a first gradient.
def _grad_of(fn, wrt):
    """d(fn)/d(input ``wrt``) as a differentiable function of the other inputs; the last
    input is the output cotangent."""
    def run(m, *args):
        args, g = list(args[:-1]), args[-1]
        args[wrt] = args[wrt].detach().requires_grad_(True)
        return m.autograd.grad(fn(m, *args), args[wrt], g, create_graph=True)[0]
    return run


def _second_order(fn):
    """d(fn)/dx as a differentiable function of both x and the cotangent g: a case built
    from it checks the VJP op's own VJPs (second derivatives) against PyTorch."""
    def run(m, x, g):
        return m.autograd.grad(fn(m, x), x, g, create_graph=True)[0]
    return run


def _conv(m, x, w):
    return m.nn.functional.conv2d(x, w, stride=2, padding=1, groups=2)


def _maxpool(m, x):
    return m.nn.functional.max_pool2d(x, 3, 2, padding=1, ceil_mode=True)


def _avgpool(m, x):
    return m.nn.functional.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False)


def _nll_sum(m, x):
    return m.nn.functional.nll_loss(x, m.tensor([1, 0, 3]), reduction="sum")


def _maxpool_pick(m, x, g, h):
    xr, gr = x.detach().requires_grad_(True), g.detach().requires_grad_(True)
    gx = m.autograd.grad(_maxpool(m, xr), xr, gr, create_graph=True)[0]
    return m.autograd.grad(gx, gr, h, create_graph=True)[0]


CASES["linear"] = [
    Case(lambda m, x, w, b: m.nn.functional.linear(x, w, b), (4, 3), (5, 3), (5,)),
    Case(lambda m, x, w: m.nn.functional.linear(x, w), (2, 4, 3), (5, 3)),
    Case(lambda m, x, w, b: m.nn.functional.linear(x, w, b), (3,), (2, 3), (2,))]
CASES["linear_weight_grad"] = [Case(_grad_of(lambda m, x, w: m.nn.functional.linear(x, w), 1),
                                    (4, 3), C(5, 3), (4, 5))]
CASES["conv2d"] = [
    Case(lambda m, x, w, b: m.nn.functional.conv2d(x, w, b), (2, 2, 5, 5), (3, 2, 3, 3), (3,)),
    Case(_conv, (2, 4, 6, 5), (4, 2, 3, 3)),
    Case(lambda m, x, w: m.nn.functional.conv2d(x, w, padding=2, dilation=2), (1, 2, 5, 5),
         (2, 2, 2, 3))]
CASES["conv2d_input_grad"] = [Case(_grad_of(_conv, 0), C(2, 4, 6, 5), (4, 2, 3, 3), (2, 4, 3, 3))]
CASES["conv2d_weight_grad"] = [Case(_grad_of(_conv, 1), (2, 4, 6, 5), C(4, 2, 3, 3),
                                    (2, 4, 3, 3))]
CASES["max_pool2d"] = [Case(_maxpool, D(2, 3, 7, 6)),
                       Case(lambda m, x: m.nn.functional.max_pool2d(x, 2), D(1, 2, 4, 6)),
                       Case(lambda m, x: m.nn.functional.max_pool2d(x, 2, 1, dilation=2),
                            D(1, 2, 5, 5))]
CASES["max_pool2d_grad"] = [Case(_grad_of(_maxpool, 0), D(2, 3, 7, 6), (2, 3, 4, 4))]
CASES["max_pool2d_pick"] = [Case(_maxpool_pick, D(2, 3, 7, 6), C(2, 3, 4, 4), (2, 3, 7, 6))]
CASES["avg_pool2d"] = [Case(_avgpool, (2, 3, 7, 6)),
                       Case(lambda m, x: m.nn.functional.avg_pool2d(x, 2, ceil_mode=True),
                            (1, 2, 5, 5))]
CASES["avg_pool2d_grad"] = [Case(_grad_of(_avgpool, 0), C(2, 3, 7, 6), (2, 3, 4, 3))]
CASES["nll_loss"] = [
    Case(lambda m, x: m.nn.functional.nll_loss(x.log_softmax(1), m.tensor([1, 0, 3])), (3, 4)),
    Case(lambda m, x: m.nn.functional.nll_loss(x, m.tensor([1, -100, 3]), reduction="none"),
         (3, 4)),
    Case(lambda m, x, w: m.nn.functional.nll_loss(x, m.tensor([[1, 2], [0, 2]]),
                                                  weight=w.detach() + 2), (2, 3, 2), C(3,))]
CASES["nll_loss_grad"] = [Case(_grad_of(_nll_sum, 0), C(3, 4), ())]


def _ce_none(m, x):
    return m.nn.functional.cross_entropy(x, m.tensor([1, -100, 3]), reduction="none")


def _ce_weighted(m, x, w):
    return m.nn.functional.cross_entropy(x, m.tensor([[1, 2], [0, 2]]), weight=w.detach() + 2)


CASES["cross_entropy"] = [
    Case(lambda m, x: m.nn.functional.cross_entropy(x, m.tensor([1, 0, 3])), (3, 4)),
    Case(_ce_none, (3, 4)),
    Case(_ce_weighted, (2, 3, 2), C(3,)),
    Case(lambda m, x: m.nn.functional.cross_entropy(x * 1e4, m.tensor([1, 0]), reduction="sum"),
         (2, 3))]


def _ce_total_weight(m, x):
    """The loss op with a given divisor (total_weight: a sharded batch's global one)."""
    t = m.tensor([[1, -100], [0, 2]])
    if m is not dg:
        return m.nn.functional.cross_entropy(x, t, reduction="sum") / 2.5
    return x.apply("cross_entropy", t, None, dg.tensor(2.5, dtype=x.dtype), ignore_index=-100,
                   reduction="mean")


def _nll_total_weight(m, x, w):
    """nll_loss with a given divisor and class weights."""
    t, w = m.tensor([1, 0, 3]), w.detach() + 2
    if m is not dg:
        return m.nn.functional.nll_loss(x, t, w, reduction="sum") / 4.0
    return x.apply("nll_loss", t, w, dg.tensor(4.0, dtype=x.dtype), ignore_index=-100,
                   reduction="mean")


CASES["cross_entropy"].append(Case(_ce_total_weight, (2, 3, 2)))
CASES["nll_loss"].append(Case(_nll_total_weight, (3, 4), C(4)))
CASES["nll_loss_grad"].append(Case(_grad_of(_nll_total_weight, 0), C(3, 4), C(4), ()))
CASES["cross_entropy_grad"] = [
    Case(_second_order(_ce_total_weight), (2, 3, 2), ()),
    Case(_second_order(lambda m, x: m.nn.functional.cross_entropy(x, m.tensor([1, 0, 3]))),
         (3, 4), ()),
    Case(_second_order(_ce_none), (3, 4), (3,)),
    Case(_second_order(lambda m, x: _ce_weighted(m, x, m.tensor([0.5, 1.0, 2.0],
                                                                dtype=x.dtype))),
         (2, 3, 2), ())]
CASES["relu_grad"] = [Case(_second_order(lambda m, x: m.relu(x * x - 0.5)), D(3, 4), (3, 4))]
CASES["log_softmax_grad"] = [
    Case(_second_order(lambda m, x: x.log_softmax(1)), (3, 4), (3, 4)),
    Case(_second_order(lambda m, x: (x * x).log_softmax(0)), (2, 3, 2), (2, 3, 2))]
CASES["axpby"] = [Case(lambda m, x, y: x.axpby(y, 0.9, -0.1), (2, 3), (2, 3),
                       torch_fn=lambda m, x, y: 0.9 * x - 0.1 * y),
                  Case(lambda m, x, y: x.axpby(y, 2.0, 0.5), (2, 3), (3,),
                       torch_fn=lambda m, x, y: 2.0 * x + 0.5 * y)]
# Rows picked by a tensor index (the sharded DataLoader) and their scatter-add transpose.
CASES["take_rows"] = [Case(lambda m, x: x.apply("take_rows", m.tensor([2, 0, 2, 1])), (3, 4),
                           torch_fn=lambda m, x: x[m.tensor([2, 0, 2, 1])])]
CASES["put_rows"] = [Case(lambda m, g: g.apply("put_rows", m.tensor([1, 0, 1]), rows=4), (3, 2),
                          torch_fn=lambda m, g: m.zeros(4, 2, dtype=g.dtype).index_add(
                              0, m.tensor([1, 0, 1]), g))]

# Ops without a gradient: forward values only, on either side of a scalar.
FORWARD_CASES = {
    "lt": [lambda m, a, b: a < b, lambda m, a, b: a < 0.1, lambda m, a, b: 0.1 > a,
           lambda m, a, b: a.lt(b[0])],
    "le": [lambda m, a, b: a <= b, lambda m, a, b: a.le(0.0), lambda m, a, b: 0 >= a],
    "gt": [lambda m, a, b: a > b, lambda m, a, b: a > 0.2, lambda m, a, b: a.gt(b[1]),
           lambda m, a, b: 0.1 < a],
    "ge": [lambda m, a, b: a >= b[0], lambda m, a, b: a.ge(0), lambda m, a, b: 0 <= a],
    "eq": [lambda m, a, b: a == b, lambda m, a, b: (a > 0) == (b > 0), lambda m, a, b: a.eq(0.1),
           lambda m, a, b: a.eq(b[2])],
    "ne": [lambda m, a, b: a != b, lambda m, a, b: (a > 0).ne(b > 0), lambda m, a, b: a != 0.5],
    "logical_and": [lambda m, a, b: (a > 0) & (b > 0)],
    "logical_or": [lambda m, a, b: (a > 0) | (b > 0)],
    "logical_not": [lambda m, a, b: ~(a > 0)],
    "sign": [lambda m, a, b: a.sign(), lambda m, a, b: m.sign(a * 0)],
    "floor": [lambda m, a, b: (a * 3).floor(), lambda m, a, b: m.floor(b * 10)],
    "argmax": [lambda m, a, b: a.argmax(), lambda m, a, b: a.argmax(1),
               lambda m, a, b: a.argmax(dim=-1, keepdim=True), lambda m, a, b: a.max(0)[1]],
    "argmin": [lambda m, a, b: a.argmin(), lambda m, a, b: b.argmin(0),
               lambda m, a, b: a.argmin(-2, keepdim=True), lambda m, a, b: a.min(dim=1).indices],
    # The divisor of a 'mean' nll_loss: targets not ignored (a's signs), or their weights.
    "nll_total_weight": [
        lambda m, a, b: dg.apply_op("nll_total_weight", (a > 0).sum(1), ignore_index=2)
        if m is dg else ((a > 0).sum(1) != 2).sum().double(),
        lambda m, a, b: dg.apply_op("nll_total_weight", (a > 0).sum(1), (b * 4).floor() + 0.5,
                                    ignore_index=4)
        if m is dg else m.where((a > 0).sum(1) != 4, (b * 4).floor()[(a > 0).sum(1) % 4] + 0.5,
                                0.0).sum()],
    # dg.full_like runs the op only for distributed values: call it directly here.
    "full_like": [lambda m, a, b: m.full_like(a, 2.5) if m is not dg
                  else dg.apply_op("full_like", a, value=2.5),
                  lambda m, a, b: m.full_like(b, 3, dtype=m.int64) if m is not dg
                  else dg.apply_op("full_like", b, value=3, dtype="int64")],
}
FORWARD_SHAPES = [(3, 4), (4,)]

CASE_IDS = [(name, i) for name, cases in CASES.items() for i in range(len(cases))]
FORWARD_IDS = [(name, i) for name, cases in FORWARD_CASES.items() for i in range(len(cases))]


def _ids(items):
    return [f"{n}-{i}" for n, i in items]


# ---------------------------------------------------------------- helpers

def _make_inputs(case, key, dtype=np.float64, device="cpu"):
    out = []
    for spec, arr in zip(case.specs, case.arrays(key)):
        t = dg.tensor(arr.astype(dtype), device=device)
        out.append(Variable(t, requires_grad=spec.grad))
    return out


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _cotangents(outs, key):
    rng = np.random.default_rng(zlib.crc32(key.encode()) + 1)
    return [np.asarray(rng.standard_normal(tuple(o.shape))) for o in outs]


def _np(t):
    return np.asarray(dg._backend.to_numpy(t.detach()._store.array)) if isinstance(t, dg.Tensor) \
        else t.detach().cpu().numpy()


def _dg_run(case, key, dtype=np.float64, device="cpu"):
    """Forward values and the gradients of sum(out * cotangent) for every grad input."""
    xs = _make_inputs(case, key, dtype, device)
    outs = _outputs(case.fn(dg, *xs))
    cts = _cotangents(outs, key)
    total = sum((o * dg.tensor(c.astype(o.dtype), device=device)).sum() for o, c in zip(outs, cts))
    diff = [x for x in xs if x.requires_grad]
    grads = dg.autograd.grad(total, diff, allow_unused=True)
    return outs, grads, diff


def _case(name, i):
    return CASES[name][i], f"{name}-{i}"


class _Counter:
    def __init__(self, forward):
        self.forward, self.calls = forward, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.forward(*args, **kwargs)


# ---------------------------------------------------------------- the meta-test

def test_every_registered_op_has_a_case():
    """Every op in the registry (distgrad.ops and anything registered since) is tested here."""
    missing = sorted(n for n in dg_ops.OPS
                     if n not in CASES and n not in FORWARD_CASES and n not in TESTED_ELSEWHERE)
    lines = []
    for n in missing:
        if dg_ops.OPS[n].differentiable:
            lines.append(f"    CASES[{n!r}] = [Case(lambda m, x: <call that runs {n} on x, written "
                         f"for m = distgrad and m = torch>, (2, 3))]")
        else:
            lines.append(f"    FORWARD_CASES[{n!r}] = [lambda m, a, b: <call that runs {n} on a "
                         f"(3, 4) and b (4,)>]")
    assert not missing, (
        f"ops registered without a test: {missing}.\nEvery registered op needs a gradient test: "
        "add to tests/test_ops.py, in the section 'Ops registered outside distgrad/ops/math.py "
        "and shape.py':\n"
        + "\n".join(lines) + "\n"
        "One input shape or spec per input after the function (P(...) positive, D(...) distinct "
        "values, C(...) no grad); torch_fn=<same signature> when PyTorch spells it differently, "
        "torch_fn=None when it has none. A gradient test that must live elsewhere (collectives): "
        f"TESTED_ELSEWHERE[{missing[0]!r}] = \"tests/test_x.py::test_name\".")
    wrong = sorted(n for n in CASES if n in dg_ops.OPS and not dg_ops.OPS[n].differentiable)
    assert not wrong, f"ops without a gradient belong in FORWARD_CASES, not CASES: {wrong}"


def test_tested_elsewhere_names_a_real_test():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for op, where in TESTED_ELSEWHERE.items():
        path, _, name = where.partition("::")
        full = os.path.join(root, path)
        assert os.path.isfile(full), f"TESTED_ELSEWHERE[{op!r}]: no file {path}"
        with open(full) as f:
            assert f"def {name}(" in f.read(), f"TESTED_ELSEWHERE[{op!r}]: no test {name} in {path}"


@pytest.mark.parametrize("name,i", CASE_IDS + FORWARD_IDS, ids=_ids(CASE_IDS + FORWARD_IDS))
def test_case_exercises_its_op(name, i, monkeypatch):
    """A table entry must actually run the op it is filed under."""
    if name not in dg_ops.OPS:
        pytest.skip(f"op {name} is not registered in this process")
    counter = _Counter(dg_ops.OPS[name].forward)
    monkeypatch.setattr(dg_ops.OPS[name], "forward", counter)
    if name in CASES:
        case, key = _case(name, i)
        if case.gpu_only:
            pytest.skip("a device-copy case: checked by the GPU tests")
        xs = _make_inputs(case, key)
        case.fn(dg, *xs)
    else:
        a, b = _forward_inputs(name, i, dg)
        FORWARD_CASES[name][i](dg, a, b)
    assert counter.calls > 0, f"case {name}-{i} does not run op {name!r}"


# ---------------------------------------------------------------- gradient cases

@pytest.mark.parametrize("name,i", CASE_IDS, ids=_ids(CASE_IDS))
def test_gradcheck(name, i):
    case, key = _case(name, i)
    if case.gpu_only:
        pytest.skip("needs a GPU (see test_gradcheck_gpu)")
    xs = _make_inputs(case, key)
    assert gradcheck(lambda *a: case.fn(dg, *a), xs, **case.gc)


@pytest.mark.parametrize("name,i", CASE_IDS, ids=_ids(CASE_IDS))
def test_against_torch(name, i):
    torch = pytest.importorskip("torch")
    case, key = _case(name, i)
    torch_fn = case.torch_fn
    if torch_fn is None or case.gpu_only:
        pytest.skip("no PyTorch counterpart on the CPU")
    outs, grads, diff = _dg_run(case, key)
    txs = [torch.tensor(a, dtype=torch.float64, requires_grad=s.grad)
           for a, s in zip(case.arrays(key), case.specs)]
    touts = _outputs(torch_fn(torch, *txs))
    assert len(touts) == len(outs)
    for o, t in zip(outs, touts):
        assert tuple(o.shape) == tuple(t.shape), f"{name}: shape {tuple(o.shape)} vs torch {tuple(t.shape)}"
        np.testing.assert_allclose(_np(o), t.detach().numpy(), rtol=1e-10, atol=1e-12)
    cts = _cotangents(outs, key)
    ttotal = sum((t * torch.tensor(c)).sum() for t, c in zip(touts, cts))
    tdiff = [t for t in txs if t.requires_grad]
    tgrads = torch.autograd.grad(ttotal, tdiff, allow_unused=True)
    for k, (g, tg) in enumerate(zip(grads, tgrads)):
        if tg is None:
            assert g is None or not np.any(_np(g)), f"{name}: input {k} has a gradient, torch has none"
            continue
        assert g is not None, f"{name}: no gradient for input {k}"
        np.testing.assert_allclose(_np(g), tg.numpy(), rtol=1e-9, atol=1e-12,
                                   err_msg=f"{name}-{i}: gradient of input {k}")


@pytest.mark.parametrize("name,i", CASE_IDS, ids=_ids(CASE_IDS))
def test_float32_stays_float32(name, i):
    """Default dtype in, default dtype out, for values and gradients alike."""
    case, key = _case(name, i)
    if case.gpu_only:
        pytest.skip("needs a GPU")
    outs32, grads32, xs32 = _dg_run(case, key, np.float32)
    outs64, grads64, _ = _dg_run(case, key, np.float64)
    for o32, o64 in zip(outs32, outs64):
        if case.keep_dtype:
            assert o32.dtype == np.float32, f"{name}-{i}: float32 input gave {o32.dtype} output"
        np.testing.assert_allclose(_np(o32), _np(o64), rtol=2e-4, atol=2e-4)
    for x, g32, g64 in zip(xs32, grads32, grads64):
        if g32 is None:
            continue
        assert g32.dtype == x.dtype, f"{name}-{i}: gradient {g32.dtype} for a {x.dtype} input"
        np.testing.assert_allclose(_np(g32), _np(g64), rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------- ops without gradients

def _forward_inputs(name, i, m):
    rng = np.random.default_rng(zlib.crc32(f"{name}-{i}".encode()))
    a = rng.standard_normal((3, 4)).round(1)
    b = rng.standard_normal((4,)).round(1)
    if m is dg:
        return Variable(dg.tensor(a), requires_grad=True), Variable(dg.tensor(b), requires_grad=True)
    return m.tensor(a, requires_grad=True), m.tensor(b, requires_grad=True)


@pytest.mark.parametrize("name,i", FORWARD_IDS, ids=_ids(FORWARD_IDS))
def test_forward_only_against_torch(name, i):
    torch = pytest.importorskip("torch")
    fn = FORWARD_CASES[name][i]
    out = fn(dg, *_forward_inputs(name, i, dg))
    ref = fn(torch, *_forward_inputs(name, i, torch))
    assert not out.requires_grad and out.grad_fn is None, f"{name} output must not require grad"
    assert tuple(out.shape) == tuple(ref.shape)
    np.testing.assert_array_equal(_np(out), ref.detach().numpy())
    assert out.dtype.kind == ref.detach().numpy().dtype.kind


def test_forward_only_ops_are_not_differentiable():
    for name in FORWARD_CASES:
        assert not dg_ops.OPS[name].differentiable, name


# ---------------------------------------------------------------- focused semantics

def test_repeated_indices_accumulate():
    x = Variable(dg.zeros(4, dtype=dg.float64), requires_grad=True)
    idx = dg.tensor([1, 1, 3, 1])
    (x[idx] * dg.tensor([1.0, 2.0, 3.0, 4.0], dtype=dg.float64)).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 1 + 2 + 4, 0.0, 3.0])


def test_index_with_numpy_array_and_list():
    a = np.arange(12.0).reshape(3, 4)
    x = Variable(dg.tensor(a), requires_grad=True)
    np.testing.assert_array_equal(x[np.array([2, 0])].detach().numpy(), a[[2, 0]])
    np.testing.assert_array_equal(x[[0, 0]].detach().numpy(), a[[0, 0]])
    x[[0, 0]].sum().backward()
    np.testing.assert_array_equal(x.grad.numpy()[0], [2.0] * 4)


@pytest.mark.parametrize("fn", [lambda m, a, b: m.maximum(a, b), lambda m, a, b: m.minimum(a, b)])
def test_maximum_minimum_ties_split_like_torch(fn):
    torch = pytest.importorskip("torch")
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 0.0, 3.0])
    xs = [Variable(dg.tensor(v), requires_grad=True) for v in (a, b)]
    ts = [torch.tensor(v, requires_grad=True) for v in (a, b)]
    fn(dg, *xs).sum().backward()
    fn(torch, *ts).sum().backward()
    for x, t in zip(xs, ts):
        np.testing.assert_allclose(x.grad.numpy(), t.grad.numpy())


@pytest.mark.parametrize("fn", [lambda m, a: a.max(), lambda m, a: a.amax(1),
                                lambda m, a: a.amin(0, keepdim=True)])
def test_max_min_ties_share_like_torch(fn):
    torch = pytest.importorskip("torch")
    a = np.array([[1.0, 3.0, 3.0], [1.0, 1.0, 0.0]])
    x = Variable(dg.tensor(a), requires_grad=True)
    t = torch.tensor(a, requires_grad=True)
    fn(dg, x).sum().backward()
    fn(torch, t).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), t.grad.numpy())


def test_large_inputs_stay_finite():
    torch = pytest.importorskip("torch")
    a = np.array([[1000.0, -1000.0, 0.0], [-800.0, -900.0, -1000.0]])
    x = Variable(dg.tensor(a))
    t = torch.tensor(a)
    for f in (lambda v: v.sigmoid(), lambda v: v.softmax(1), lambda v: v.log_softmax(1),
              lambda v: v.logsumexp(1), lambda v: v.tanh()):
        out = _np(f(x))
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, f(t).numpy(), rtol=1e-12, atol=1e-300)


def test_shape_mismatch_names_both_shapes_and_op():
    a, b = dg.ones(2, 3), dg.ones(4)
    for fn, op in [(lambda: a + b, "add"), (lambda: a @ dg.ones(4, 2), "matmul"),
                   (lambda: dg.cat([a, dg.ones(2, 2)]), "cat")]:
        with pytest.raises(RuntimeError) as e:
            fn()
        msg = str(e.value)
        assert op in msg and "(2, 3)" in msg, msg
    with pytest.raises(RuntimeError, match=r"\(2, 3\).*\(4,\)"):
        a * b


def test_missing_vjp_is_an_error_naming_the_op():
    op = dg_ops.defop("_test_novjp", lambda xp, x: x * 2)
    try:
        x = Variable(dg.ones(2), requires_grad=True)
        y = dg.apply_op("_test_novjp", x)
        with pytest.raises(NotImplementedError, match="_test_novjp"):
            y.sum().backward()
    finally:
        del dg_ops.OPS[op.name]


def test_unknown_op_is_an_error():
    with pytest.raises(NotImplementedError, match="no_such_op"):
        dg.apply_op("no_such_op", dg.ones(1))


def test_second_derivatives_of_every_smooth_unary_op():
    """create_graph through each VJP: d2/dx2 by autograd vs central differences of d/dx."""
    fns = {"exp": lambda x: x.exp(), "log": lambda x: x.log(), "sqrt": lambda x: x.sqrt(),
           "sin": lambda x: x.sin(), "cos": lambda x: x.cos(), "tanh": lambda x: x.tanh(),
           "sigmoid": lambda x: x.sigmoid(), "pow": lambda x: x ** 3,
           "div": lambda x: 1 / x, "softmax": lambda x: x.softmax(0) * dg.tensor([1.0, 2.0, 3.0], dtype=dg.float64),
           "logsumexp": lambda x: x.logsumexp(0), "norm": lambda x: x.norm(),
           "prod": lambda x: x.prod(), "matmul": lambda x: x @ x}
    for name, f in fns.items():
        x = Variable(dg.tensor([0.7, 1.3, 0.9], dtype=dg.float64), requires_grad=True)

        def first(v):
            g, = dg.autograd.grad(f(v).sum(), [v], create_graph=True)
            return g
        assert gradcheck(first, (x,)), name


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("name,i", CASE_IDS, ids=_ids(CASE_IDS))
def test_cuda_matches_cpu(name, i):
    case, key = _case(name, i)
    if case.gpu_only:
        xs = _make_inputs(case, key)
        assert gradcheck(lambda *a: case.fn(dg, *a), xs, **case.gc)
        return
    outs_gpu, grads_gpu, xs_gpu = _dg_run(case, key, np.float64, "cuda")
    outs, grads, _ = _dg_run(case, key, np.float64, "cpu")
    for o, og in zip(outs, outs_gpu):
        assert og.is_cuda or og.numel() == 0
        np.testing.assert_allclose(_np(og), _np(o), rtol=1e-9, atol=1e-12)
    for x, g, gg in zip(xs_gpu, grads, grads_gpu):
        if g is None:
            continue
        assert gg.is_cuda
        np.testing.assert_allclose(_np(gg), _np(g), rtol=1e-9, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mul", "matmul", "getitem", "softmax", "norm"])
def test_gradcheck_cuda(name):
    case, key = _case(name, 1)
    xs = _make_inputs(case, key, device="cuda")
    assert gradcheck(lambda *a: case.fn(dg, *a), xs, **case.gc)


@pytest.mark.gpu
@pytest.mark.parametrize("name,i", FORWARD_IDS, ids=_ids(FORWARD_IDS))
def test_cuda_forward_only(name, i):
    fn = FORWARD_CASES[name][i]
    a, b = _forward_inputs(name, i, dg)
    out = fn(dg, a, b)
    out_gpu = fn(dg, a.cuda(), b.cuda())
    assert out_gpu.is_cuda
    np.testing.assert_array_equal(_np(out_gpu), _np(out))


# ---------------------------------------------------------------- random shapes (hypothesis)

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

_BINARY = {
    "add": (lambda m, a, b: a + b, "randn"), "sub": (lambda m, a, b: a - b, "randn"),
    "mul": (lambda m, a, b: a * b, "randn"), "div": (lambda m, a, b: a / b, "pos_b"),
    "pow": (lambda m, a, b: a ** b, "pos_a"), "maximum": (lambda m, a, b: m.maximum(a, b), "randn"),
    "minimum": (lambda m, a, b: m.minimum(a, b), "randn"),
    "where": (lambda m, a, b: m.where(a > b, a * 2, b), "randn"),
}
_REDUCE = {
    "sum": lambda m, x, d, k: x.sum(d, keepdim=k), "mean": lambda m, x, d, k: x.mean(d, keepdim=k),
    "amax": lambda m, x, d, k: x.amax(d, keepdim=k), "amin": lambda m, x, d, k: x.amin(d, keepdim=k),
    "prod": lambda m, x, d, k: x.prod(d[0], keepdim=k),
    "norm": lambda m, x, d, k: x.norm(dim=d, keepdim=k) if m is dg
    else m.linalg.vector_norm(x, dim=d, keepdim=k),
    "logsumexp": lambda m, x, d, k: x.logsumexp(d, keepdim=k),
    "var": lambda m, x, d, k: x.var(d, keepdim=k, unbiased=False),
    "softmax": lambda m, x, d, k: x.softmax(d[0]),
    "log_softmax": lambda m, x, d, k: x.log_softmax(d[0]),
}
_HSET = settings(max_examples=12, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])


def _check_both(fn, arrays):
    """gradcheck in float64 and (if installed) PyTorch values and gradients."""
    xs = [Variable(dg.tensor(a), requires_grad=True) for a in arrays]
    assert gradcheck(lambda *v: fn(dg, *v), xs)
    try:
        import torch
    except ImportError:
        return
    out = fn(dg, *xs)
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    tout = fn(torch, *ts)
    np.testing.assert_allclose(_np(out), tout.detach().numpy(), rtol=1e-10, atol=1e-12)
    ct = np.random.default_rng(0).standard_normal(tuple(out.shape))
    grads = dg.autograd.grad((out * dg.tensor(ct)).sum(), xs)
    tgrads = torch.autograd.grad((tout * torch.tensor(ct)).sum(), ts)
    for g, tg in zip(grads, tgrads):
        np.testing.assert_allclose(_np(g), tg.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(_BINARY))
@_HSET
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3),
       seed=st.integers(0, 2 ** 16))
def test_binary_ops_random_broadcast_shapes(name, shapes, seed):
    fn, kind = _BINARY[name]
    rng = np.random.default_rng(seed)
    a, b = (np.asarray(rng.standard_normal(s)) for s in shapes.input_shapes)
    if kind == "pos_a":
        a = np.abs(a) + 0.5
    if kind == "pos_b":
        b = np.abs(b) + 0.5
    _check_both(fn, [a, b])


@_HSET
@given(shapes=hnp.mutually_broadcastable_shapes(signature="(m?,n),(n,p?)->(m?,p?)", max_dims=4,
                                                 max_side=3),
       seed=st.integers(0, 2 ** 16))
def test_matmul_random_shapes(shapes, seed):
    """1-D, 2-D, batched and broadcast batched operands, numpy's matmul signature."""
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal(s) for s in shapes.input_shapes)
    _check_both(lambda m, x, y: x @ y, [a, b])


@pytest.mark.parametrize("name", sorted(_REDUCE))
@_HSET
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4), data=st.data())
def test_reductions_random_shapes_and_dims(name, shape, data):
    nd = len(shape)
    dims = data.draw(st.lists(st.integers(-nd, nd - 1), min_size=1, max_size=nd,
                              unique_by=lambda d: d % nd), label="dims")
    keep = data.draw(st.booleans(), label="keepdim")
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16), label="seed"))
    x = rng.permutation(int(np.prod(shape))).reshape(shape) * 0.25 + rng.uniform(0.1, 0.2)
    _check_both(lambda m, v: _REDUCE[name](m, v, tuple(dims), keep), [x])
