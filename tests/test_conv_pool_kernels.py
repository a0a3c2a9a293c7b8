"""Conv and max-pool kernels against PyTorch, as properties over random geometry.

The kernels in ``distgrad/ops/nn.py`` take fast paths for common cases (stride 1
convolutions, tiling pools) and a general path for the rest; whichever a shape takes,
values and gradients must be PyTorch's to float rounding. Pool inputs are small
integers after a ReLU, so tiles with tied maxima (PyTorch sends the gradient to the
first) are the rule, not the exception.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import distgrad as dg

torch = pytest.importorskip("torch")

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
DTYPES = {"float32": (np.float32, 2e-4), "float64": (np.float64, 1e-10)}


@st.composite
def conv_geometry(draw):
    groups = draw(st.sampled_from([1, 1, 1, 2]))
    c = groups * draw(st.integers(1, 3))
    o = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = draw(st.sampled_from([(1, 1), (1, 1), (2, 2), (1, 2), (2, 1)]))
    dilation = draw(st.sampled_from([(1, 1), (1, 1), (2, 1), (2, 2)]))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 12))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 12))
    n = draw(st.sampled_from([1, 2, 3, 4, 48]))      # 48: big enough for the row-piece paths
    return dict(x=(n, c, h, w), w=(o, c // groups, kh, kw), stride=stride, padding=padding,
                dilation=dilation, groups=groups, bias=draw(st.booleans()),
                dtype=draw(st.sampled_from(sorted(DTYPES))), seed=draw(st.integers(0, 2**16)))


def _close(a, b, tol):
    b = b.detach().numpy()
    scale = max(1.0, float(np.abs(b).max(initial=0.0)))
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


@SETTINGS
@given(conv_geometry())
def test_conv2d_and_its_gradients_match_torch(geo):
    dtype, tol = DTYPES[geo["dtype"]]
    rng = np.random.default_rng(geo["seed"])
    xs = [rng.standard_normal(s).astype(dtype) for s in (geo["x"], geo["w"], geo["w"][:1])]
    kw = dict(stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"],
              groups=geo["groups"])
    d = [dg.tensor(a, requires_grad=True) for a in xs]
    t = [torch.tensor(a, requires_grad=True) for a in xs]
    if not geo["bias"]:
        d[2], t[2] = None, None
    dout = dg.nn.functional.conv2d(d[0], d[1], d[2], **kw)
    tout = torch.nn.functional.conv2d(t[0], t[1], t[2], **kw)
    _close(dout.detach().numpy(), tout, tol)
    g = rng.standard_normal(tuple(tout.shape)).astype(dtype)
    (dout * dg.tensor(g)).sum().backward()
    (tout * torch.tensor(g)).sum().backward()
    for a, b in zip(d, t):
        if a is not None:
            _close(a.grad.numpy(), b.grad, tol)


@st.composite
def pool_geometry(draw):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    tiling = draw(st.booleans())
    stride = kernel if tiling else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (0, 0) if tiling else (draw(st.integers(0, kernel[0] // 2)),
                                     draw(st.integers(0, kernel[1] // 2)))
    ceil_mode = False if tiling else draw(st.booleans())
    h = draw(st.integers(kernel[0], 11))
    w = draw(st.integers(kernel[1], 11))
    return dict(x=(draw(st.integers(1, 3)), draw(st.integers(1, 3)), h, w), kernel=kernel,
                stride=stride, padding=padding, ceil_mode=ceil_mode,
                dtype=draw(st.sampled_from(sorted(DTYPES))), seed=draw(st.integers(0, 2**16)))


@SETTINGS
@given(pool_geometry())
def test_max_pool2d_and_its_gradient_match_torch_with_ties(geo):
    dtype, tol = DTYPES[geo["dtype"]]
    rng = np.random.default_rng(geo["seed"])
    x = np.maximum(rng.integers(-3, 3, geo["x"]), 0).astype(dtype)     # many tied maxima
    kw = dict(kernel_size=geo["kernel"], stride=geo["stride"], padding=geo["padding"],
              ceil_mode=geo["ceil_mode"])
    dx, tx = dg.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    dout = dg.nn.functional.max_pool2d(dx, **kw)
    tout = torch.nn.functional.max_pool2d(tx, **kw)
    _close(dout.detach().numpy(), tout, tol)
    g = rng.standard_normal(tuple(tout.shape)).astype(dtype)
    (dout * dg.tensor(g)).sum().backward()
    (tout * torch.tensor(g)).sum().backward()
    _close(dx.grad.numpy(), tx.grad, tol)


@pytest.mark.parametrize("n", [1, 64, 128])
def test_lenet_layers_match_torch_in_float32(n):
    """The two LeNet convolutions and pools at training batch sizes (the fast paths)."""
    rng = np.random.default_rng(n)
    for shape, wshape in (((n, 1, 28, 28), (6, 1, 5, 5)), ((n, 6, 12, 12), (16, 6, 5, 5))):
        xs = [rng.standard_normal(s).astype(np.float32) for s in (shape, wshape, wshape[:1])]
        d = [dg.tensor(a, requires_grad=True) for a in xs]
        t = [torch.tensor(a, requires_grad=True) for a in xs]
        dout = dg.nn.functional.max_pool2d(dg.nn.functional.conv2d(*d).relu(), 2)
        tout = torch.nn.functional.max_pool2d(torch.nn.functional.conv2d(*t).relu(), 2)
        _close(dout.detach().numpy(), tout, 1e-5)
        g = rng.standard_normal(tuple(tout.shape)).astype(np.float32)
        (dout * dg.tensor(g)).sum().backward()
        (tout * torch.tensor(g)).sum().backward()
        for a, b in zip(d, t):
            _close(a.grad.numpy(), b.grad, 1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_kernels_on_non_contiguous_inputs_match_torch_and_leave_them_unchanged(layout, dtype):
    """Strided inputs (views of a leaf) through the batch-innermost conv and the tiling
    pool, whose argmax scans read x through strided views and must never write into it;
    single-tile and ragged pools included."""
    dt, tol = DTYPES[dtype]
    rng = np.random.default_rng(7)

    def base(shape):                      # the leaf's array: NHWC, or every other column
        if layout == "channels_last":
            return rng.standard_normal(shape[:1] + shape[2:] + shape[1:2]).astype(dt)
        return rng.standard_normal(shape[:3] + (shape[3] * 2,)).astype(dt)

    def view(leaf):                       # the same view in distgrad and in torch
        return leaf.permute(0, 3, 1, 2) if layout == "channels_last" else leaf[..., ::2]

    def run(arrays, pool, conv):
        grads = []
        for m in (dg, torch):
            leaves = [m.tensor(a, requires_grad=True) for a in arrays]
            x = view(leaves[0])
            if conv:
                x = m.nn.functional.conv2d(x, leaves[1]).relu()
            out = m.nn.functional.max_pool2d(x, pool)
            g = np.random.default_rng(1).standard_normal(tuple(out.shape)).astype(dt)
            (out * m.tensor(g)).sum().backward()
            grads.append((out, leaves))
        (dout, dl), (tout, tl) = grads
        if arrays[0].shape[-1] > 1:       # (NHWC with one channel is NCHW too)
            assert not view(dl[0]).detach().numpy().flags["C_CONTIGUOUS"]
        _close(dout.detach().numpy(), tout, tol)
        for a, b in zip(dl, tl):
            _close(a.grad.numpy(), b.grad, tol)
        np.testing.assert_array_equal(dl[0].detach().numpy(), arrays[0])    # x unchanged

    for xshape, wshape, pool in (((48, 6, 12, 12), (16, 6, 5, 5), 2),
                                 ((5, 2, 9, 7), (3, 2, 3, 2), 3),
                                 ((3, 1, 4, 6), (2, 1, 3, 5), (2, 1)),
                                 ((2, 2, 3, 3), (1, 2, 2, 2), 2)):
        run([base(xshape), rng.standard_normal(wshape).astype(dt)], pool, conv=True)
        # The pool alone on small integers: tied maxima.
        run([np.maximum(np.rint(base(xshape) * 2), 0)], pool, conv=False)


@pytest.mark.parametrize("stride", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("piece_bytes", [1, 10000, 1 << 20])   # pieces of N, 69, a row
def test_input_grad_rows_in_pieces_matches_torch(piece_bytes, stride):
    """The short-row input gradient split into several pieces per output row (only
    whole rows at the sizes the property test draws), with padding and dilation."""
    from distgrad.ops import nn as kernels
    rng = np.random.default_rng(3)
    x_shape, w_shape = (40, 3, 11, 11), (4, 3, 3, 2)
    kw = dict(stride=stride, padding=(1, 2), dilation=(2, 1))
    g = rng.standard_normal(tuple(torch.nn.functional.conv2d(
        torch.zeros(x_shape), torch.zeros(w_shape), **kw).shape))
    w = rng.standard_normal(w_shape)
    kernel, out_hw, pads = kernels._conv_geom(x_shape, w_shape, stride, kw["padding"],
                                              kw["dilation"])
    assert out_hw[1] < 16 and g.shape[-2:] == out_hw
    got = kernels._conv2d_input_grad_rows(np, g, w, x_shape[-2:], kernel, stride, pads,
                                          kw["dilation"], out_hw, piece_bytes=piece_bytes)
    want = torch.nn.grad.conv2d_input(x_shape, torch.tensor(w), torch.tensor(g), **kw)
    _close(got, want, 1e-10)
