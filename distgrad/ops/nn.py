"""Neural-network ops: convolution, pooling, nll_loss and cross_entropy.

Each op's forward (against ``xp``) sits beside its VJPs and its placement rule. The
VJPs are written with registered ops, and each family is closed under differentiation
(conv2d / conv2d_input_grad / conv2d_weight_grad are bilinear transposes of one
another; the pooling ops pair with their scatter/gather twins), so
``create_graph=True`` gives second derivatives.

Convolutions use im2col through ``as_strided`` views and batched matmuls; the
transposed direction (col2im) loops over kernel offsets (and output rows) only, never
over pixels. Output rows shorter than 16 (LeNet's second layer) take layouts whose
copies move long runs: the batch innermost, for the forward and the gradients.
Internal temporaries live in per-thread scratch buffers (``_scratch_array``).
Conv and pool ops work independently per sample along dim 0: ``rule_batch_local``.
"""
import threading

import numpy as np

from .. import placement as P
from .collective import current
from .linalg import rule_batch_reduce
from .math import log_softmax_forward, softmax_forward
from .registry import defop


# ---------------------------------------------------------------- im2col helpers

def _out_size(n, k, s, p, d, ceil_mode=False):
    span = n + 2 * p - d * (k - 1) - 1
    if span < 0:
        raise ValueError(f"kernel of size {k} (dilation {d}) does not fit input of size {n} "
                         f"with padding {p}")
    if not ceil_mode:
        return span // s + 1
    out = -(-span // s) + 1
    # PyTorch: the last window must start inside the input or its left padding.
    if (out - 1) * s >= n + p:
        out -= 1
    return out


def _geometry(shape, kernel, stride, padding, dilation, ceil_mode=False):
    """Output size and (left, right) pads per spatial axis; right pad covers ceil_mode."""
    H, W = shape[-2:]
    out, pads = [], []
    for n, k, s, p, d in zip((H, W), kernel, stride, padding, dilation):
        o = _out_size(n, k, s, p, d, ceil_mode)
        need = (o - 1) * s + d * (k - 1) + 1          # input extent the windows touch
        out.append(o)
        pads.append((p, max(need - n - p, 0)))
    return tuple(out), tuple(pads)


def _unfold(xp, x, kernel, stride, pads, dilation, out_hw, fill=0):
    """View (N, C, kh, kw, OH, OW) of the padded input's sliding windows (no copy)."""
    x = _pad(xp, x, pads, fill)
    N, C = x.shape[:2]
    sN, sC, sH, sW = x.strides
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out_hw
    return xp.lib.stride_tricks.as_strided(
        x, (N, C, kh, kw, oh, ow), (sN, sC, sH * dh, sW * dw, sH * sh, sW * sw))


def _pad(xp, x, pads, fill=0):
    if any(p for pair in pads for p in pair):
        return xp.pad(x, ((0, 0), (0, 0)) + tuple(pads), constant_values=fill)
    return x


def _offsets(kernel, stride, dilation, out_hw):
    """(k, rows, cols): for kernel offset k, the input slices its windows read."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out_hw
    for i in range(kh):
        for j in range(kw):
            yield (i * kw + j, slice(i * dh, i * dh + sh * (oh - 1) + 1, sh),
                   slice(j * dw, j * dw + sw * (ow - 1) + 1, sw))


def _window_slices(x, kernel, stride, dilation, out_hw):
    """(k, view) for each kernel offset: view (N, C, OH, OW) of the (padded) input.

    Pooling works offset by offset with whole-array ops: kh*kw iterations, never a
    loop over pixels, and much faster in numpy than reducing a 6-D strided view.
    """
    for k, rows, cols in _offsets(kernel, stride, dilation, out_hw):
        yield k, x[:, :, rows, cols]


def _fold_each(xp, piece, in_shape, kernel, stride, pads, dilation, out_hw, dtype):
    """Transpose of ``_unfold``: add ``piece(k)`` (N, C, OH, OW) into window offset k's slots."""
    N, C, H, W = in_shape
    (ph0, ph1), (pw0, pw1) = pads
    out = xp.zeros((N, C, H + ph0 + ph1, W + pw0 + pw1), dtype=dtype)
    for k, view in _window_slices(out, kernel, stride, dilation, out_hw):
        view += piece(k)
    return out[:, :, ph0:ph0 + H, pw0:pw0 + W]


def _fold_batch_last(xp, cols, in_hw, stride, pads, dilation):
    """col2im for cols laid out (C, kh, kw, OH, OW, N); returns (N, C, H, W).

    With the batch innermost every strided add moves runs of OW*N contiguous values,
    instead of OW-long rows: several times faster in numpy for LeNet-sized maps.
    """
    C, kh, kw, oh, ow, N = cols.shape
    (H, W), ((ph0, ph1), (pw0, pw1)) = in_hw, pads
    out = xp.zeros((C, H + ph0 + ph1, W + pw0 + pw1, N), dtype=cols.dtype)
    for k, rows, cs in _offsets((kh, kw), stride, dilation, (oh, ow)):
        out[:, rows, cs] += cols[:, k // kw, k % kw]
    return xp.ascontiguousarray(out[:, ph0:ph0 + H, pw0:pw0 + W].transpose(3, 0, 1, 2))


_scratch = threading.local()
_SCRATCH_MAX = 64 << 20          # bytes: larger temporaries are allocated afresh


def _scratch_array(xp, slot, shape, dtype, zero=False):
    """A kernel's internal temporary (im2col columns, transposed copies), reused per thread.

    Never returned from a kernel. Fresh multi-MB arrays each step cost more than the copy
    into them: glibc maps them anew and every first touch of a page is a fault (2000 per
    LeNet step at batch 64, as much time as the arithmetic). One buffer per slot and
    thread, grown to the largest request up to ``_SCRATCH_MAX``; other backends allocate.
    """
    size = int(np.prod(shape))
    nbytes = size * np.dtype(dtype).itemsize
    if xp is not np or nbytes > _SCRATCH_MAX:
        return (xp.zeros if zero else xp.empty)(shape, dtype=dtype)
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = bufs[slot] = np.empty(nbytes, dtype=np.uint8)
    out = buf[:nbytes].view(dtype).reshape(shape)
    if zero:
        out.fill(0)
    return out


def _batch_last(xp, x, pads=((0, 0), (0, 0)), slot="batch_last"):
    """(N, C, H, W) -> contiguous (C, H', W', N), zero-padded by ``pads``: one copy (scratch).

    A sample of a power-of-two multiple of 4 KiB would make every read of the
    transpose hit the same cache sets: those copy 8 samples at a time (3x faster).
    """
    N, C, H, W = x.shape
    (ph0, ph1), (pw0, pw1) = pads
    padded = ph0 or ph1 or pw0 or pw1
    out = _scratch_array(xp, slot, (C, H + ph0 + ph1, W + pw0 + pw1, N), x.dtype, zero=padded)
    dst, src = out[:, ph0:ph0 + H, pw0:pw0 + W], x.transpose(1, 2, 3, 0)
    step = 8 if (C * H * W * x.itemsize) % 4096 == 0 else max(N, 1)
    for s in range(0, N, step):
        dst[..., s:s + step] = src[..., s:s + step]
    return out


def _im2col_chunks(xp, view, chunk_bytes=1 << 20):
    """(start, stop, columns) for consecutive batch chunks of the im2col view (N, ...).

    Each chunk's columns are copied into scratch of about ``chunk_bytes`` (an L2 cache)
    and consumed by the caller's gemm before the next chunk overwrites them: 10-20%
    faster than copying all N samples first (LeNet's first layer, batch 64 and 128).
    """
    N = view.shape[0]
    per_sample = max(int(np.prod(view.shape[1:])) * view.itemsize, 1)
    n = max(1, min(N, chunk_bytes // per_sample))
    buf = _scratch_array(xp, "cols", (n,) + view.shape[1:], view.dtype)
    for s in range(0, N, n):
        e = min(N, s + n)
        cols = buf[:e - s]
        cols[...] = view[s:e]
        yield s, e, cols


def _short_rows(out_hw, groups):
    """Output rows too short for im2col's copy (it moves one row per call): below 16."""
    return groups == 1 and out_hw[1] < 16


# ---------------------------------------------------------------- conv2d

def _conv_geom(x_shape, w_shape, stride, padding, dilation):
    kernel = tuple(w_shape[-2:])
    out_hw, pads = _geometry(x_shape, kernel, stride, padding, dilation)
    return kernel, out_hw, pads


def _conv2d_batch_last(xp, x, w, b, kernel, stride, pads, dilation, out_hw,
                       chunk_bytes=1 << 20):
    """Convolution for short output rows (groups == 1): im2col with the batch innermost.

    With the batch innermost each im2col run is OW*N contiguous values (whole runs
    instead of OW-long rows, as in the weight gradient), and every output position is
    computed once (the wide-row layout computed kw-1 wasted columns per row: 44% more
    flops at LeNet's 8x8). The gemm is written as cols^T @ w^T, a (positions, O)
    result: OpenBLAS runs that tall, thin shape ~1.5x faster than w @ cols with its
    O (6 or 16) rows. Output rows are taken in chunks of at most ``chunk_bytes`` of
    columns (one row at LeNet sizes), each consumed by its gemm while in cache: ~13%
    faster than building all the columns first.
    """
    N, C = x.shape[:2]
    O = w.shape[0]
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out_hw
    xt = _batch_last(xp, x, pads)
    sC, sH, sW, sN = xt.strides
    view = xp.lib.stride_tricks.as_strided(
        xt, (C, kh, kw, oh, ow, N), (sC, sH * dh, sW * dw, sH * sh, sW * sw, sN))
    dtype = xp.result_type(w.dtype, x.dtype)
    wt = w.reshape(O, C * kh * kw).T
    per_row = C * kh * kw * ow * N * x.itemsize
    rows = max(1, min(oh, chunk_bytes // max(per_row, 1)))
    res = xp.empty((N, O, oh, ow), dtype=dtype)
    for r in range(0, oh, rows):
        e = min(oh, r + rows)
        cols = _scratch_array(xp, "cols", (C, kh, kw, e - r, ow, N), x.dtype)
        cols[...] = view[:, :, :, r:e]
        out = xp.matmul(cols.reshape(C * kh * kw, -1).T, wt, out=_scratch_array(
            xp, "gemm", ((e - r) * ow * N, O), dtype))                   # (rows*OW*N, O)
        out = out.reshape(e - r, ow, N, O).transpose(2, 3, 0, 1)
        if b is None:
            res[:, :, r:e] = out
        else:
            xp.add(out, b.reshape(1, O, 1, 1), out=res[:, :, r:e])
    return res


def _conv2d(xp, x, w, b=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    N, C = x.shape[:2]
    O = w.shape[0]
    kernel, out_hw, pads = _conv_geom(x.shape, w.shape, stride, padding, dilation)
    if _short_rows(out_hw, groups):
        return _conv2d_batch_last(xp, x, w, b, kernel, stride, pads, dilation, out_hw)
    view = _unfold(xp, x, kernel, stride, pads, dilation, out_hw)
    L = out_hw[0] * out_hw[1]
    wg = w.reshape(groups, O // groups, -1)
    out = xp.empty((N, groups, O // groups, L), dtype=xp.result_type(w.dtype, x.dtype))
    for s, e, cols in _im2col_chunks(xp, view):
        xp.matmul(wg, cols.reshape(e - s, groups, -1, L), out=out[s:e])         # (n, G, O/G, L)
    out = out.reshape(N, O, out_hw[0], out_hw[1])
    if b is not None:
        out += b.reshape(1, O, 1, 1)
    return out


def _conv2d_input_grad_rows(xp, g, w, in_hw, kernel, stride, pads, dilation, out_hw,
                            piece_bytes=1 << 20):
    """d(conv2d)/dx for groups == 1, batch innermost, one output row (or part of one) at a time.

    Each piece's columns (W^T @ g for the (col, sample) positions of a row, at most
    ``piece_bytes`` of them: a whole row at LeNet sizes) are added into the input slots
    right away, while they are in cache, with one add per kernel column (its kh input
    rows at once): the whole column matrix (C*kh*kw by OH*OW*N) is never built. 2-3x
    faster than one gemm and a fold at LeNet sizes. W^T's rows are ordered (kernel
    column, channel, kernel row), so each add reads one contiguous block of columns.
    """
    N, O = g.shape[:2]
    C = w.shape[1]
    (H, W), ((ph0, ph1), (pw0, pw1)) = in_hw, pads
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out_hw
    gt = _batch_last(xp, g, slot="batch_last_g").reshape(O, oh, ow * N)
    wt = xp.ascontiguousarray(w.transpose(3, 1, 2, 0)).reshape(kw * C * kh, O)
    Hp, Wp = H + ph0 + ph1, W + pw0 + pw1
    dtype = xp.result_type(g.dtype, w.dtype)
    dx = _scratch_array(xp, "dx", (C, Hp, Wp, N), dtype, zero=True)
    flat = dx.reshape(C, Hp, Wp * N)
    # A stride-1 row's columns land contiguously, so any piece of it works.
    piece = max(N, piece_bytes // (kw * C * kh * np.dtype(dtype).itemsize)) if sw == 1 else ow * N
    for r in range(oh):
        rows = slice(r * sh, r * sh + dh * (kh - 1) + 1, dh)
        for a in range(0, ow * N, piece):
            b = min(a + piece, ow * N)
            cols = xp.matmul(wt, gt[:, r, a:b], out=_scratch_array(
                xp, "cols", (kw * C * kh, b - a), dtype)).reshape(kw, C, kh, b - a)
            for j in range(kw):
                if sw == 1:
                    flat[:, rows, j * dw * N + a:j * dw * N + b] += cols[j]
                else:
                    dx[:, rows, j * dw:j * dw + sw * (ow - 1) + 1:sw] += \
                        cols[j].reshape(C, kh, ow, N)
    out = xp.empty((N, C, H, W), dtype=dtype)               # dx is scratch: copy out
    out[...] = dx[:, ph0:ph0 + H, pw0:pw0 + W].transpose(3, 0, 1, 2)
    return out


def _conv2d_input_grad(xp, g, w, in_hw=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                       groups=1):
    """d(conv2d)/dx applied to g: weight-transposed matmul, then col2im."""
    N, O = g.shape[:2]
    C = w.shape[1] * groups
    in_shape = (N, C) + tuple(in_hw)
    kernel, out_hw, pads = _conv_geom(in_shape, w.shape, stride, padding, dilation)
    if _short_rows(out_hw, groups) and out_hw[1] * N >= 128:   # else one fold is cheaper
        return _conv2d_input_grad_rows(xp, g, w, in_hw, kernel, stride, pads, dilation, out_hw)
    wg = w.reshape(groups, O // groups, -1)
    # Batch innermost: one gemm per group over all samples, then a fast col2im.
    gt = xp.ascontiguousarray(g.transpose(1, 2, 3, 0)).reshape(groups, O // groups, -1)
    cols = xp.matmul(wg.transpose(0, 2, 1), gt)
    cols = cols.reshape(C, kernel[0], kernel[1], out_hw[0], out_hw[1], N)
    return _fold_batch_last(xp, cols, in_hw, stride, pads, dilation)


def _conv2d_weight_grad_batch_last(xp, x, g, w_shape, kernel, stride, pads, dilation, out_hw,
                                   chunk_bytes=1 << 20):
    """d(conv2d)/dw for short output rows: im2col with the batch innermost, a gemm per chunk.

    Batch innermost, each im2col run is OW*N contiguous values instead of OW, and
    the contraction over (positions, batch) is a (C*kh*kw, rows*OW*N) @
    (rows*OW*N, O) product per chunk of output rows, summed. Chunks of at most
    ``chunk_bytes`` of columns (one row at LeNet sizes) are consumed while in cache:
    ~20% faster than building all the columns first.
    """
    N, C = x.shape[:2]
    O = w_shape[0]
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out_hw
    xt = _batch_last(xp, x, pads)
    sC, sH, sW, sN = xt.strides
    view = xp.lib.stride_tricks.as_strided(
        xt, (C, kh, kw, oh, ow, N), (sC, sH * dh, sW * dw, sH * sh, sW * sw, sN))
    gt = _batch_last(xp, g, slot="batch_last_g").reshape(O, oh, ow * N)
    rows = max(1, min(oh, chunk_bytes // max(C * kh * kw * ow * N * x.itemsize, 1)))
    gw = None
    for r in range(0, oh, rows):
        e = min(oh, r + rows)
        cols = _scratch_array(xp, "cols", (C, kh, kw, e - r, ow, N), x.dtype)
        cols[...] = view[:, :, :, r:e]
        part = xp.matmul(cols.reshape(C * kh * kw, -1), gt[:, r:e].reshape(O, -1).T)
        if gw is None:
            gw = part                                               # (C*kh*kw, O)
        else:
            gw += part
    return xp.ascontiguousarray(gw.T).reshape(w_shape).astype(x.dtype, copy=False)


def _conv2d_weight_grad(xp, x, g, w_shape=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                        groups=1):
    """d(conv2d)/dw applied to g: im2col of x contracted with g over batch and positions."""
    N, C = x.shape[:2]
    O = w_shape[0]
    kernel, out_hw, pads = _conv_geom(x.shape, w_shape, stride, padding, dilation)
    if _short_rows(out_hw, groups):
        return _conv2d_weight_grad_batch_last(xp, x, g, w_shape, kernel, stride, pads, dilation,
                                              out_hw)
    view = _unfold(xp, x, kernel, stride, pads, dilation, out_hw)
    L = out_hw[0] * out_hw[1]
    gg = g.reshape(N, groups, O // groups, L)
    # Per-sample gemms then a sum over the batch: far faster in numpy than one tensordot,
    # which would copy both operands into batch-major layouts first. Each gemm is
    # cols @ g^T, a (C*kh*kw, O) result: ~15% faster in OpenBLAS than g @ cols^T with
    # its few (O) rows; the small sum is transposed back once.
    gw = 0
    for s, e, cols in _im2col_chunks(xp, view):
        cols = cols.reshape(e - s, groups, -1, L)
        gw = gw + xp.matmul(cols, gg[s:e].transpose(0, 1, 3, 2)).sum(axis=0)
    return gw.transpose(0, 2, 1).reshape(w_shape).astype(x.dtype, copy=False)


def _conv_attrs(a):
    return dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"])


def _conv_vjp_x(g, ans, x, w, b=None, **a):
    return g.apply("conv2d_input_grad", w, in_hw=tuple(x.shape[-2:]), **_conv_attrs(a))


def _conv_vjp_w(g, ans, x, w, b=None, **a):
    return x.apply("conv2d_weight_grad", g, w_shape=tuple(w.shape), **_conv_attrs(a))


defop("conv2d", _conv2d, _conv_vjp_x, _conv_vjp_w,
      lambda g, ans, x, w, b=None, **a: g.sum(dim=(0, 2, 3)),
      placement=P.rule_batch_local)


def _cig_vjp_g(gx, ans, g, w, in_hw=None, **a):
    return gx.apply("conv2d", w, None, **_conv_attrs(a))


def _cig_vjp_w(gx, ans, g, w, in_hw=None, **a):
    return gx.apply("conv2d_weight_grad", g, w_shape=tuple(w.shape), **_conv_attrs(a))


defop("conv2d_input_grad", _conv2d_input_grad, _cig_vjp_g, _cig_vjp_w, placement=P.rule_batch_local)


def _cwg_vjp_x(gw, ans, x, g, w_shape=None, **a):
    return g.apply("conv2d_input_grad", gw, in_hw=tuple(x.shape[-2:]), **_conv_attrs(a))


def _cwg_vjp_g(gw, ans, x, g, w_shape=None, **a):
    return x.apply("conv2d", gw, None, **_conv_attrs(a))


# Output is a weight gradient summed over the batch: per-sample inputs give a Partial sum.
defop("conv2d_weight_grad", _conv2d_weight_grad, _cwg_vjp_x, _cwg_vjp_g,
      placement=rule_batch_reduce)


# ---------------------------------------------------------------- max pooling

def _pool_geom(shape, kernel_size, stride, padding, dilation, ceil_mode):
    return _geometry(shape, kernel_size, stride, padding, dilation, ceil_mode)


def _neg_inf(x):
    return -np.inf if np.issubdtype(x.dtype, np.floating) else np.iinfo(x.dtype).min


def _pool_setup(xp, x, kernel_size, stride, padding, dilation, ceil_mode, fill):
    out_hw, pads = _pool_geom(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    return _pad(xp, x, pads, fill), out_hw, pads


def _tiles(x, kernel_size, stride, padding, dilation, ceil_mode):
    """Output size when the windows tile x without overlap or padding (LeNet's 2x2 pools), else None.

    Then every input element lies in at most one window: the gradient is a plain
    assignment per kernel offset, with no accumulation and no argmax index array.
    """
    if (tuple(kernel_size) != tuple(stride) or any(padding) or tuple(dilation) != (1, 1)
            or ceil_mode):
        return None
    return tuple(n // k for n, k in zip(x.shape[-2:], kernel_size))


def _max_pool2d_tiles(xp, x, kernel_size, out_hw):
    """Max over tiles, rows first: each pass reads whole rows and halves what the next reads."""
    (kh, kw), (oh, ow) = kernel_size, out_hw
    rows = x[:, :, :oh * kh]
    best = rows[:, :, ::kh].copy() if kh > 1 else rows
    for i in range(1, kh):
        xp.maximum(best, rows[:, :, i::kh], out=best)
    cols = best[..., :ow * kw]
    out = cols[..., ::kw].copy()
    for j in range(1, kw):
        # A contiguous copy of the strided operand first: numpy's maximum is ~2x slower
        # with a strided input than the copy costs.
        xp.maximum(out, xp.ascontiguousarray(cols[..., j::kw]), out=out)
    return out


def _max_pool2d(xp, x, kernel_size, stride, padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    out_hw = _tiles(x, kernel_size, stride, padding, dilation, ceil_mode)
    if out_hw is not None and min(out_hw) > 0:
        return _max_pool2d_tiles(xp, x, kernel_size, out_hw)
    xpad, out_hw, _ = _pool_setup(xp, x, kernel_size, stride, padding, dilation, ceil_mode,
                                  _neg_inf(x))
    out = None
    for _, view in _window_slices(xpad, kernel_size, stride, dilation, out_hw):
        out = view.copy() if out is None else xp.maximum(out, view, out=out)
    return out


def _argmax_windows(xp, x, kernel_size, stride, padding, dilation, ceil_mode):
    """Window offset (0..kh*kw-1) of each window's first maximum, as PyTorch picks it.

    Built from maximum / equality / logical ops on contiguous copies of each offset's
    values: masked assignment (copyto with where=) is an order of magnitude slower.
    """
    xpad, out_hw, pads = _pool_setup(xp, x, kernel_size, stride, padding, dilation, ceil_mode,
                                     _neg_inf(x))
    views = [xp.ascontiguousarray(v) for _, v in
             _window_slices(xpad, kernel_size, stride, dilation, out_hw)]
    best = views[0].copy()
    for v in views[1:]:
        xp.maximum(best, v, out=best)
    itype = np.int8 if len(views) < 128 else np.int32
    idx = xp.zeros(best.shape, dtype=itype)
    found = views[0] == best
    for k in range(1, len(views)):
        first = views[k] == best
        first &= ~found                      # ties keep the earlier offset
        idx += first.astype(itype) * itype(k)
        found |= first
    return idx, out_hw, pads


def _tile_view(xp, a, kernel_size, out_hw):
    """View (N, C, OH, kh, OW, kw) of the tiles of a (N, C, H, W) array (no copy, any strides)."""
    (kh, kw), (oh, ow) = kernel_size, out_hw
    sN, sC, sH, sW = a.strides
    return xp.lib.stride_tricks.as_strided(
        a, tuple(a.shape[:2]) + (oh, kh, ow, kw), (sN, sC, sH * kh, sH, sW * kw, sW))


def _first_argmax(xp, views, want_max=True):
    """(index, maximum) elementwise over a list of views: index of the first view holding
    the maximum (the bool ``v1 > v0`` for two views, int8 for more; None for one).

    A later view takes over only when strictly greater, so ties keep the earlier one.
    The maximum (None unless ``want_max``) is skipped for two views when not wanted: a
    strided ``maximum`` costs several ``greater``s in numpy.
    """
    if len(views) == 1:
        return None, views[0]
    if not want_max:
        idx = xp.greater(views[1], views[0])
        if len(views) == 2:
            return idx, None
        best = xp.maximum(views[0], views[1])
    else:
        # Contiguous copies first: numpy's greater and maximum on strided operands are
        # slower than copying them once and working on contiguous ones.
        best = views[0].copy()              # never x itself: maximum writes into it
        second = xp.ascontiguousarray(views[1])
        idx = xp.greater(second, best)
        xp.maximum(best, second, out=best)
    for k in range(2, len(views)):
        upd = xp.greater(views[k], best)
        idx = xp.where(upd, np.int8(k), idx.astype(np.int8, copy=False))
        xp.maximum(best, views[k], out=best)
    return idx, best


def _route(xp, g, idx, n, out):
    """out[..., k] = g where idx == k else 0, for k < n (out's last axis has n entries)."""
    if n == 1:
        out[..., 0] = g
    elif n == 2:
        # g - g*idx is g or 0 exactly (idx is 0 or 1): one multiply, no negated mask.
        xp.multiply(g, idx, out=out[..., 1])
        xp.subtract(g, out[..., 1], out=out[..., 0])
    else:
        for k in range(n):
            xp.multiply(g, idx == k, out=out[..., k])


def _max_pool2d_grad_tiles(xp, g, x, kernel_size, out_hw):
    """max_pool2d_grad for tiling windows: g written at each tile's first maximum.

    The first maximum in row-major order is found separably: in each tile row, the
    first column holding the row's maximum; then the first tile row whose maximum is
    the tile's. Both are strict ``>`` scans (ties keep the earlier
    offset, as PyTorch does), and g is routed to the row, then to the column. No
    recomputed forward and no per-offset equality masks: at LeNet's 2x2 pools, 9
    array ops instead of 20. (A tile holding a NaN routes g as the scans' comparisons
    fall, not to PyTorch's NaN position.)
    """
    (kh, kw), (oh, ow) = kernel_size, out_hw
    X = _tile_view(xp, x, kernel_size, out_hw)
    col, row_max = _first_argmax(xp, [X[..., j] for j in range(kw)])      # (N, C, OH, kh, OW)
    row, _ = _first_argmax(xp, [row_max[:, :, :, i] for i in range(kh)], want_max=False)
    exact = x.shape[-2] == oh * kh and x.shape[-1] == ow * kw
    out = (xp.empty if exact else xp.zeros)(x.shape, dtype=g.dtype)
    g_rows = _scratch_array(xp, "pool_rows", tuple(g.shape[:3]) + (kh,) + tuple(g.shape[3:]),
                            g.dtype)
    _route(xp, g, row, kh, g_rows.transpose(0, 1, 2, 4, 3))
    _route(xp, g_rows, col, kw, _tile_view(xp, out, kernel_size, out_hw))
    return out


def _max_pool2d_grad(xp, g, x, kernel_size, stride, padding=(0, 0), dilation=(1, 1),
                     ceil_mode=False):
    """Scatter g (pooled shape) into x's shape at each window's argmax."""
    out_hw = _tiles(x, kernel_size, stride, padding, dilation, ceil_mode)
    if out_hw is not None and min(out_hw) > 0:
        return _max_pool2d_grad_tiles(xp, g, x, kernel_size, out_hw)
    idx, out_hw, pads = _argmax_windows(xp, x, kernel_size, stride, padding, dilation, ceil_mode)
    return _fold_each(xp, lambda k: g * (idx == k), x.shape, kernel_size, stride, pads,
                      dilation, out_hw, g.dtype)


def _max_pool2d_pick(xp, h, x, kernel_size, stride, padding=(0, 0), dilation=(1, 1),
                     ceil_mode=False):
    """h (x's shape) read at the positions where max_pool2d(x) took its maxima."""
    idx, out_hw, pads = _argmax_windows(xp, x, kernel_size, stride, padding, dilation, ceil_mode)
    out = None
    for k, view in _window_slices(_pad(xp, h, pads), kernel_size, stride, dilation, out_hw):
        out = view.copy() if out is None else xp.where(idx == k, view, out)
    return out


def _mp_grad(g, ans, x, **a):
    return g.apply("max_pool2d_grad", x, **a)


def _mp_pick(gg, ans, g, x, **a):
    return gg.apply("max_pool2d_pick", x, **a)


def _pick_vjp(g, ans, h, x, **a):
    return g.apply("max_pool2d_grad", x, **a)


def _no_grad_through_argmax(*args, **a):
    # Which element is the maximum is piecewise constant in x: zero gradient almost everywhere.
    return None


defop("max_pool2d", _max_pool2d, _mp_grad, placement=P.rule_batch_local)
defop("max_pool2d_grad", _max_pool2d_grad, _mp_pick, _no_grad_through_argmax,
      placement=P.rule_batch_local)
defop("max_pool2d_pick", _max_pool2d_pick, _pick_vjp, _no_grad_through_argmax,
      placement=P.rule_batch_local)


# ---------------------------------------------------------------- average pooling

def _avg_divisor(xp, in_hw, kernel_size, stride, padding, out_hw, count_include_pad, dtype):
    """Per-output window divisor with PyTorch's rules (padding counted, ceil-mode overhang not)."""
    sizes = []
    for n, k, s, p, o in zip(in_hw, kernel_size, stride, padding, out_hw):
        start = np.arange(o) * s - p
        end = np.minimum(start + k, n + p)
        size = end - start
        if not count_include_pad:
            size = np.minimum(end, n) - np.maximum(start, 0)
        sizes.append(size)
    div = np.outer(sizes[0], sizes[1]).astype(dtype)
    if (div == kernel_size[0] * kernel_size[1]).all():
        return kernel_size[0] * kernel_size[1]           # plain scalar: the common case
    return xp.asarray(div)


def _avg_pool2d(xp, x, kernel_size, stride, padding=(0, 0), ceil_mode=False,
                count_include_pad=True):
    xpad, out_hw, _ = _pool_setup(xp, x, kernel_size, stride, padding, (1, 1), ceil_mode, 0)
    total = None
    for _, view in _window_slices(xpad, kernel_size, stride, (1, 1), out_hw):
        total = view.copy() if total is None else xp.add(total, view, out=total)
    div = _avg_divisor(xp, x.shape[-2:], kernel_size, stride, padding, out_hw,
                       count_include_pad, x.dtype)
    return (total / div).astype(x.dtype, copy=False)


def _avg_pool2d_grad(xp, g, in_hw=None, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0),
                     ceil_mode=False, count_include_pad=True):
    """Transpose of avg_pool2d: spread each g / divisor over its window."""
    in_shape = tuple(g.shape[:2]) + tuple(in_hw)
    out_hw, pads = _pool_geom(in_shape, kernel_size, stride, padding, (1, 1), ceil_mode)
    div = _avg_divisor(xp, in_hw, kernel_size, stride, padding, out_hw, count_include_pad, g.dtype)
    gd = (g / div).astype(g.dtype, copy=False)
    return _fold_each(xp, lambda k: gd, in_shape, kernel_size, stride, pads, (1, 1), out_hw,
                      g.dtype)


def _ap_vjp(g, ans, x, **a):
    return g.apply("avg_pool2d_grad", in_hw=tuple(x.shape[-2:]), **a)


def _apg_vjp(gg, ans, g, in_hw=None, **a):
    return gg.apply("avg_pool2d", **a)


defop("avg_pool2d", _avg_pool2d, _ap_vjp, placement=P.rule_batch_local)
defop("avg_pool2d_grad", _avg_pool2d_grad, _apg_vjp, placement=P.rule_batch_local)


# ---------------------------------------------------------------- nll_loss

def _nll_parts(xp, target, weight, ignore_index, reduction, total_weight=None):
    """Per-element weights (0 where ignored) and the divisor for ``reduction``: for a
    'mean', ``total_weight`` when given (the global one of a sharded batch), else the
    weight of the targets here that are not ignored."""
    t = target
    valid = t != ignore_index
    if weight is None and xp is np and valid.all():
        # The common case (no class weights, nothing ignored): unit weights, no masking.
        w, safe_t = None, t
    else:
        safe_t = xp.where(valid, t, 0)
        w = valid.astype(np.float64) if weight is None else xp.where(valid, weight[safe_t], 0)
    if reduction == "mean":
        denom = total_weight if total_weight is not None else t.size if w is None else w.sum()
    elif reduction in ("sum", "none"):
        denom = 1
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return safe_t, w, denom


def _nll_loss(xp, logp, target, weight=None, total_weight=None, ignore_index=-100,
              reduction="mean"):
    safe_t, w, denom = _nll_parts(xp, target, weight, ignore_index, reduction, total_weight)
    if logp.ndim == 2:            # fancy indexing: several times faster than take_along_axis
        picked = logp[xp.arange(logp.shape[0]), safe_t]
    else:
        picked = xp.take_along_axis(logp, xp.expand_dims(safe_t, 1), axis=1).squeeze(1)
    if w is not None:
        picked = (picked * w).astype(logp.dtype, copy=False)
    if reduction == "none":
        return -picked
    # PyTorch: a mean over zero non-ignored targets is nan (0/0).
    with np.errstate(invalid="ignore", divide="ignore"):
        return xp.asarray(-picked.sum() / denom, dtype=logp.dtype)


def _nll_coef(xp, g, target, weight, ignore_index, reduction, total_weight=None):
    """Class indices and per-sample coefficients -g * w / denom of d(nll_loss)/d(logp)."""
    safe_t, w, denom = _nll_parts(xp, target, weight, ignore_index, reduction, total_weight)
    with np.errstate(invalid="ignore", divide="ignore"):
        coef = (-(g if w is None else g * w) / denom).astype(g.dtype, copy=False)
    return safe_t, coef


def _add_at_class(xp, out, safe_t, coef):
    """out[i, t[i], ...] += coef[i, ...] along the class dim 1 (coef may be a scalar)."""
    if out.ndim == 2:
        out[xp.arange(out.shape[0]), safe_t] += coef    # one class per row: no repeats
        return
    coef = coef.reshape((1,) * out.ndim) if coef.ndim == 0 else xp.expand_dims(coef, 1)
    idx = xp.expand_dims(safe_t, 1)
    xp.put_along_axis(out, idx, xp.take_along_axis(out, idx, axis=1) + coef, axis=1)


def _nll_loss_grad(xp, g, target, weight=None, total_weight=None, shape=None, ignore_index=-100,
                   reduction="mean"):
    """d(nll_loss)/d(logp) applied to g: -g * w / denom at each target class, 0 elsewhere."""
    safe_t, coef = _nll_coef(xp, g, target, weight, ignore_index, reduction, total_weight)
    out = xp.zeros(shape, dtype=g.dtype)
    _add_at_class(xp, out, safe_t, coef)
    return out


def _nll_vjp(g, ans, logp, target, weight=None, total_weight=None, **a):
    return g.apply("nll_loss_grad", target, weight, total_weight, shape=tuple(logp.shape), **a)


def _nll_grad_vjp(gg, ans, g, target, weight=None, total_weight=None, shape=None, **a):
    # nll_loss_grad is linear in g with exactly nll_loss's coefficients.
    return gg.apply("nll_loss", target, weight, total_weight, **a)


def rule_nll_loss(op, placements, shapes, attrs, out_ndim):
    """Log-probabilities and targets sharded alike along the batch: a 'sum' is Partial, and
    so is a 'mean' given the global divisor (``total_weight``, replicated): each worker's
    term is its own sum over that divisor. Class weights and the divisor are never sharded."""
    if any(isinstance(p, P.Shard) for p in placements[2:]):
        P.fail(op, placements, "class weights and the total weight must not be sharded")
    s = [p for p in placements[:2] if isinstance(p, P.Shard)]
    if not s:
        return P.Decision(P.non_shard_out(placements), attrs)
    if len(s) != 2 or any(p.dim != 0 for p in s):
        P.fail(op, placements, "log-probabilities and targets must both be sharded on dim 0")
    if s[0].sizes != s[1].sizes:
        P.fail(op, placements, "log-probabilities and targets must be split alike")
    reduction = attrs.get("reduction", "mean")
    if reduction == "mean" and (len(placements) < 4 or placements[3] is None):
        # The mean's divisor (the weight of the targets not ignored) is global data:
        # F.nll_loss gives it as total_weight (nll_total_weight, all-reduced).
        P.fail(op, placements, "reduction='mean' needs the global divisor as total_weight")
    return P.Decision(P.PARTIAL if reduction != "none" else s[0], attrs)


def rule_like_target(op, placements, shapes, attrs, out_ndim):
    """A loss gradient is placed like the targets (input 1)."""
    pt = placements[1]
    return P.Decision(pt if isinstance(pt, P.Shard) else P.non_shard_out(placements), attrs)


def _no_grad_for_targets(*args, **a):
    # Targets are class indices and class weights are constants: no gradient flows to them.
    return None


# Inputs: log-probabilities, targets, class weights, and total_weight (None, or the
# divisor of a 'mean' given from outside: F.nll_loss on a sharded batch gives the global one).
defop("nll_loss", _nll_loss, _nll_vjp, _no_grad_for_targets, _no_grad_for_targets,
      _no_grad_for_targets, placement=rule_nll_loss)
defop("nll_loss_grad", _nll_loss_grad, _nll_grad_vjp, _no_grad_for_targets,
      _no_grad_for_targets, _no_grad_for_targets, placement=rule_like_target)


def _nll_total_weight(xp, target, weight=None, ignore_index=-100, across_workers=False):
    """The divisor of a 'mean' nll_loss (float64): the number of targets not ignored, or
    the sum of their class weights; ``across_workers``: summed over the workers too."""
    valid = target != ignore_index
    if weight is None:
        total = xp.asarray(xp.count_nonzero(valid), dtype=np.float64)
    else:
        w = xp.where(valid, weight[xp.where(valid, target, 0)], 0)
        total = xp.asarray(w.sum(dtype=np.float64))
    return current().allreduce(total, op="sum") if across_workers else total


def rule_total_weight(op, placements, shapes, attrs, out_ndim):
    """Sharded targets: the op sums over the workers itself (one scalar all-reduce) and its
    value is replicated. Otherwise every worker has all the targets: no sum over workers."""
    if any(isinstance(p, P.Shard) for p in placements[1:]):
        P.fail(op, placements, "class weights must not be sharded")
    if isinstance(placements[0], P.Shard):
        return P.Decision(P.REPLICATE, dict(attrs, across_workers=True))
    if attrs.get("across_workers"):
        attrs = dict(attrs, across_workers=False)
    return P.Decision(P.non_shard_out(placements), attrs)


# What a sharded 'mean' nll_loss / cross_entropy divides by (their total_weight input):
# the count and its all-reduce in one op, so a loss records two ops, not three. The loss
# stays Partial (each worker's sum over the global divisor): its backward needs no collective.
defop("nll_total_weight", _nll_total_weight, differentiable=False, placement=rule_total_weight)


# ---------------------------------------------------------------- cross_entropy

# log_softmax over dim 1 and nll_loss as one op, and its gradient (softmax minus the
# weighted one-hot, times the per-sample coefficient) as one more: two dispatches per
# classifier step instead of four. F.cross_entropy uses it for class-index targets.
def _cross_entropy(xp, logits, target, weight=None, total_weight=None, ignore_index=-100,
                   reduction="mean"):
    return _nll_loss(xp, log_softmax_forward(xp, logits, 1), target, weight, total_weight,
                     ignore_index, reduction)


def _cross_entropy_grad(xp, g, logits, target, weight=None, total_weight=None, ignore_index=-100,
                        reduction="mean"):
    # coef * (onehot - softmax) per sample, where coef = -g * w / denom (nll_loss's).
    safe_t, coef = _nll_coef(xp, g, target, weight, ignore_index, reduction, total_weight)
    out = softmax_forward(xp, logits, 1)
    out *= -(coef if coef.ndim == 0 else xp.expand_dims(coef, 1))
    _add_at_class(xp, out, safe_t, coef)
    return out


def _ce_vjp(g, ans, logits, target, weight=None, total_weight=None, **a):
    return g.apply("cross_entropy_grad", logits, target, weight, total_weight, **a)


def _ce_grad_vjp_g(gg, ans, g, logits, target, weight=None, total_weight=None, **a):
    # Linear in g: the cotangent contracted with the gradient for a unit g.
    unit = g.apply("full_like", value=1).apply("cross_entropy_grad", logits, target, weight,
                                               total_weight, **a)
    per_sample = (gg * unit).sum(dim=1)
    if a.get("reduction", "mean") == "none":
        return per_sample
    # A reduced loss: g holds one number, whatever its shape (a worker may get a
    # seed of shape (1,) for a scalar).
    return per_sample.sum().reshape(tuple(g.shape))


def _ce_grad_vjp_logits(gg, ans, g, logits, target, weight=None, total_weight=None, **a):
    # out = c * (p - onehot) per sample, so d out/d logits = c * (diag(p) - p p^T).
    picked = g.apply("nll_loss_grad", target, weight, total_weight, shape=tuple(logits.shape), **a)
    coef = -picked.sum(dim=1, keepdim=True)
    p = logits.softmax(1)
    return coef * p * (gg - (gg * p).sum(dim=1, keepdim=True))


defop("cross_entropy", _cross_entropy, _ce_vjp, _no_grad_for_targets, _no_grad_for_targets,
      _no_grad_for_targets, placement=rule_nll_loss)
defop("cross_entropy_grad", _cross_entropy_grad, _ce_grad_vjp_g, _ce_grad_vjp_logits,
      _no_grad_for_targets, _no_grad_for_targets, _no_grad_for_targets,
      placement=rule_like_target)
