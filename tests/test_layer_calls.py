"""What a layer call does besides its op, kept cheap without changing a result or an error.

``F.conv2d`` / ``F.max_pool2d`` / ``F.avg_pool2d`` memoize their checked, normalized
arguments by input shape; ``Linear`` / ``Conv2d`` read their parameters from the table;
``Module.__call__`` checks only inputs that are not tensors. Each case runs twice (the
memo cold, then warm) against PyTorch, and the errors come on every call.
"""
import numpy as np
import pytest

import distgrad as dg
import distgrad.nn.functional as F
from distgrad import nn
from distgrad.nn.module import InputShapeError

RNG = np.random.default_rng(11)

CONV_ARGS = [
    {}, {"stride": 2}, {"stride": (2, 1), "padding": 1}, {"padding": "same"},
    {"padding": "valid"}, {"padding": [1, 2], "dilation": [2, 1]}, {"stride": True},
    {"padding": (1, 0), "dilation": 2}, {"groups": 2, "padding": 1}, {"stride": np.int64(2)},
]


@pytest.mark.parametrize("kw", CONV_ARGS, ids=[str(k) for k in CONV_ARGS])
def test_conv2d_arguments_cold_and_warm_match_torch(kw):
    torch = pytest.importorskip("torch")
    x = RNG.standard_normal((2, 4, 9, 8))
    w = RNG.standard_normal((6, 4 // kw.get("groups", 1), 3, 3))
    b = RNG.standard_normal(6)
    tkw = {k: (tuple(v) if isinstance(v, list) else int(v) if isinstance(v, (np.integer, bool)) else v)
           for k, v in kw.items()}
    ref = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), **tkw)
    for _ in range(2):
        out = F.conv2d(dg.tensor(x), dg.tensor(w), dg.tensor(b), **kw)
        np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12)
        out = F.conv2d(dg.tensor(x[0]), dg.tensor(w), dg.tensor(b), **kw)      # unbatched
        np.testing.assert_allclose(out.numpy(), ref.numpy()[0], rtol=1e-10, atol=1e-12)


POOL_ARGS = [
    {"kernel_size": 2}, {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True},
    {"kernel_size": (2, 3), "stride": (1, 2)}, {"kernel_size": [2, 2], "stride": [1, 1]},
    {"kernel_size": 2, "stride": ()}, {"kernel_size": 2, "stride": []},
    {"kernel_size": 3, "padding": 1, "count_include_pad": False},
]


@pytest.mark.parametrize("fn", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("kw", POOL_ARGS, ids=[str(k) for k in POOL_ARGS])
def test_pool_arguments_cold_and_warm_match_torch(fn, kw):
    torch = pytest.importorskip("torch")
    kw = dict(kw)
    if fn == "max_pool2d" and kw.pop("count_include_pad", None) is not None:
        kw["dilation"] = 2
    x = RNG.standard_normal((2, 3, 9, 8))
    tkw = {k: (None if k == "stride" and v in ((), []) else tuple(v) if isinstance(v, list) else v)
           for k, v in kw.items()}
    ref = getattr(torch.nn.functional, fn)(torch.tensor(x), **tkw)
    for _ in range(2):
        out = getattr(F, fn)(dg.tensor(x), **kw)
        np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12)
        out = getattr(F, fn)(dg.tensor(x[0]), **kw)                              # unbatched
        np.testing.assert_allclose(out.numpy(), ref.numpy()[0], rtol=1e-10, atol=1e-12)


def test_shape_errors_come_after_a_memoized_call_too():
    w = dg.randn(6, 4, 5, 5)
    F.conv2d(dg.randn(2, 4, 12, 12), w)
    for _ in range(2):
        with pytest.raises(InputShapeError, match=r"expected input of shape \(N, 4, H, W\), "
                                                  r"got \(2, 3, 12, 12\)"):
            F.conv2d(dg.randn(2, 3, 12, 12), w)
        with pytest.raises(InputShapeError, match=r"expected input of shape \(N, 4, H, W\), "
                                                  r"got \(3, 12, 12\)"):
            F.conv2d(dg.randn(3, 12, 12), w)
        with pytest.raises(InputShapeError, match="smaller than the kernel"):
            F.conv2d(dg.randn(2, 4, 4, 12), w)
    F.max_pool2d(dg.randn(1, 2, 6, 6), 2)
    for _ in range(2):
        with pytest.raises(ValueError, match="pad should be at most half of the kernel size"):
            F.max_pool2d(dg.randn(1, 2, 6, 6), 2, padding=2)
        with pytest.raises(InputShapeError, match="smaller than the pooling window"):
            F.max_pool2d(dg.randn(1, 2, 1, 6), 2)
        with pytest.raises(InputShapeError, match="expected a 4-D input"):
            F.avg_pool2d(dg.randn(2, 6), 2)


def test_layer_error_names_the_layer_on_every_call():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    model(dg.randn(1, 1, 5, 5))
    for _ in range(2):
        with pytest.raises(InputShapeError) as err:
            model(dg.randn(1, 3, 5, 5))
        assert "Conv2d" in str(err.value) and "(N, 1, H, W)" in str(err.value)


def test_layers_use_what_their_weight_and_bias_attributes_say():
    """A subclass that defines ``weight`` itself, or a weight replaced by a plain tensor,
    is what the forward uses, as with the attribute lookup."""
    class Shifted(nn.Linear):
        @property
        def weight(self):
            return self._parameters["weight"] + 1.0

    x = dg.randn(4, 3)
    lin = Shifted(3, 2)
    w, b = lin._parameters["weight"], lin.bias
    np.testing.assert_allclose(lin(x).detach().numpy(), F.linear(x, w + 1.0, b).detach().numpy())
    conv = nn.Conv2d(1, 2, 3)
    del conv.weight
    conv.weight = dg.ones(2, 1, 3, 3)
    xi = dg.randn(1, 1, 4, 4)
    np.testing.assert_allclose(conv(xi).detach().numpy(),
                               F.conv2d(xi, dg.ones(2, 1, 3, 3), conv.bias).detach().numpy())
    plain = nn.Linear(3, 2, bias=False)
    np.testing.assert_allclose(plain(x).detach().numpy(), (x @ plain.weight.t()).detach().numpy(),
                               rtol=1e-6)


def test_foreign_array_inputs_are_named_by_position():
    class Two(nn.Module):
        def forward(self, a, b):
            return a + b

    with pytest.raises(TypeError, match="Linear: input 0 is a numpy.ndarray"):
        nn.Linear(3, 2)(np.ones((1, 3), np.float32))
    with pytest.raises(TypeError, match="Two: input 1 is a numpy.ndarray"):
        Two()(dg.ones(2), np.ones(2))
    assert Two()(dg.ones(2), 1.5).tolist() == [2.5, 2.5]      # other objects pass through
