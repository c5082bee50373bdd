"""NumPy kernels: the only place where arithmetic lives. No model knowledge; imports nothing of mdref.

Conventions: images NCHW, tokens [B, T, D], weights in PyTorch layout (Linear [out, in],
Conv [out, in/groups, kh, kw]). Every op computes in the dtype of its input (float32 or float64);
parameters are cast by the loader, never here. A parameter argument ``p`` is a dict holding ``weight`` and
optionally ``bias``, keyed like the checkpoint. A kernel written for speed keeps its plain formula beside it
(`conv2d_reference`, `group_norm_reference`, `layer_norm_reference`, `attention_reference`).

Emulated float16 / bfloat16: inside ``rounding(R)`` (`mdref.precision.using` puts a policy in force) an op rounds
its float array arguments at ``"<op>.in"``; an op with rounding points inside (attention, GroupNorm, LayerNorm)
then runs its plain formula with ``R(x, point)`` applied at the points named in it, any other op runs as written
and its result is rounded at ``"<op>.out"``. R is the policy (mdref.precision lists the points and says which it
rounds); outside `rounding` the fast forms run unchanged.
"""

from __future__ import annotations

import contextvars
import functools
import math
from contextlib import contextmanager

import numpy as np

__all__ = [
    "linear", "conv2d", "conv2d_reference", "upsample_conv2d", "norm_silu_conv2d", "group_norm",
    "group_norm_reference", "layer_norm", "layer_norm_reference", "rms_norm", "repeat_kv", "silu", "relu", "gelu",
    "quick_gelu", "erf", "softmax", "attention", "attention_reference", "causal_mask", "upsample_nearest2d",
    "timestep_embedding", "rounding", "rounded", "active_rounding", "scoped", "EXACT",
]

# conv2d's forms before issue 33, which the float16 / bfloat16 emulation still runs (`_conv_emulated`); the shifted
# form is also the depthwise conv's.
IM2COL_BYTES = 256 * 2**20      # one im2col column block at most this large
SHIFTED_MIN_PIXELS = 64 * 64    # dense stride-1 convs on more output pixels take the shifted form (faster there)
SHIFTED_BLOCK_BYTES = 4 * 2**20  # output block of the shifted form, small enough to stay in cache while it sums
# The conv forms' constants, chosen from benchmarks/conv-forms-2cpu.md (every conv shape of the benchmarked models):
CONV_BLOCK_BYTES = 8 * 2**20    # an im2col block of the conv forms at most this large (it stays in cache) ...
CONV_MIN_COLUMNS = 2048         # ... unless that is fewer output pixels than this (the GEMM packs the weights per call)
ROWS_MIN_PIXELS_PER_CHANNEL = 16  # `_conv_rows` where the output has this many pixels per input channel (else taps)
UPSAMPLE_MIN_PIXELS = 16 * 16   # upsample_conv2d's phase form from this image size on (1280 channels at 8 x 8: 93 ms,
                                # conv2d of the upsampled image 77 ms; at 16 x 16: 191 ms against 297 ms)
NORM_BLOCK_BYTES = 2**20        # the pieces `norm_silu_conv2d` normalises at a time (they stay in cache)
SCORES_BYTES = 64 * 2**20       # one attention score buffer at most this large
QUERY_CHUNK = 4096              # queries per block of the emulated attention (its float32 score buffer stays bounded)
ERF_BLOCK = 1 << 15             # erf's elements per block (its float64 temporaries stay in cache)


# ---- emulated low precision: the rounding policy in force --------------------------------------------------
class _Exact:
    """The plain formulas as written (float32 / float64): no point rounds; norm statistics two-pass."""
    norm_statistics = "two-pass"

    def __call__(self, x, point):
        return x


EXACT = _Exact()
_POLICY = contextvars.ContextVar("mdref_rounding", default=None)


@contextmanager
def scoped(var, value):
    """The context variable `var` set to `value` inside the block (the rounding policy here, the trace in
    mdref.trace)."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def rounding(policy):
    """Compute the block under `policy`, a callable R(x, point) with a `norm_statistics` attribute
    (mdref.precision.Precision), or None for plain float32 / float64."""
    return scoped(_POLICY, policy)


def active_rounding():
    """The rounding policy in force, or None."""
    return _POLICY.get()


def rounded(x, point="value"):
    """x rounded by the policy in force at `point` (a copy), or x itself when none is or x is not a float array."""
    R = _POLICY.get()
    if R is None or not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        return x
    return R(x, point)


def emulated(op_name, formula=None):
    """An op of this module: as written outside `rounding`; inside, its float array arguments rounded at
    "<op_name>.in", then ``formula(..., R=policy)`` (its plain formula with rounding points inside) or the op
    itself with its result rounded at "<op_name>.out". ``op.plain`` is the op as written."""
    def wrap(op):
        @functools.wraps(op)
        def run(*args, **kwargs):
            R = _POLICY.get()
            if R is None:
                return op(*args, **kwargs)
            args = [rounded(a, f"{op_name}.in") for a in args]
            kwargs = {k: rounded(v, f"{op_name}.in") for k, v in kwargs.items()}
            if formula is not None:
                return formula(*args, R=R, **kwargs)
            return R(op(*args, **kwargs), f"{op_name}.out")
        run.plain = op
        return run
    return wrap


@emulated("linear")
def linear(x, p):
    """torch.nn.Linear: x @ W^T + b.  x [..., in] -> [..., out]."""
    y = x @ p["weight"].T                                           # [..., out]
    if p.get("bias") is not None:
        y = y + p["bias"]
    return y


def conv2d_reference(x, p, *, stride=1, padding=0, groups=1):
    """The plain formula `conv2d` computes, one kernel tap at a time (slow; tests check the two agree):
    y[b, o, i, j] = bias[o] + sum_{c, u, v} w[o, c, u, v] * x_pad[b, g(o) * C/G + c, stride i + u, stride j + v]."""
    w = p["weight"]
    B, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))         # [B, C, Hp, Wp]
    Ho, Wo = (xp.shape[2] - kh) // stride + 1, (xp.shape[3] - kw) // stride + 1
    xg = xp.reshape(B, groups, Cg, xp.shape[2], xp.shape[3])                         # [B, G, C/G, Hp, Wp]
    wg = w.reshape(groups, O // groups, Cg, kh, kw)                                  # [G, O/G, C/G, kh, kw]
    y = np.zeros((B, groups, O // groups, Ho, Wo), dtype=x.dtype)
    for u in range(kh):
        for v in range(kw):
            tap = xg[..., u:u + stride * (Ho - 1) + 1:stride, v:v + stride * (Wo - 1) + 1:stride]
            y += np.einsum("goc,bgchw->bgohw", wg[..., u, v], tap)                  # [B, G, O/G, Ho, Wo]
    y = y.reshape(B, O, Ho, Wo)
    return y if p.get("bias") is None else y + p["bias"][:, None, None]


@emulated("conv2d")
def conv2d(x, p, *, stride=1, padding=0, groups=1):
    """torch.nn.Conv2d (dilation 1, zero padding); the plain formula is `conv2d_reference`.
    x [B, C, H, W]; p["weight"] [O, C/groups, kh, kw]; returns [B, O, Ho, Wo]. The fast forms, by case:
    - 1x1, stride 1: one matmul over the pixels;
    - depthwise, stride 1: `_conv_shifted`, one multiply per tap;
    - otherwise: im2col one block of output rows at a time without a padded copy (`_conv_dense`): the kernel row's
      taps stacked (`_conv_rows`) on large images, all taps (`_conv_taps`) on small ones and for strides, groups.
    Under float16 / bfloat16 emulation (mdref.precision) the forms chosen before issue 33 (`_conv_emulated`) run,
    so the emulated path's float32 sums are the ones it always had.
    """
    w = p["weight"]
    B, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    if C != Cg * groups or O % groups:
        raise ValueError(f"conv2d: input has {C} channels, weight {tuple(w.shape)} with groups={groups} "
                         f"expects {Cg * groups}")
    Ho, Wo = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    bias = p.get("bias")
    if active_rounding() is not None:
        return _conv_emulated(x, w, bias, stride, padding, groups, Ho, Wo)
    if kh == kw == 1 and stride == 1 and groups == 1 and not padding:
        y = np.matmul(w.reshape(O, C), x.reshape(B, C, H * W)).reshape(B, O, Ho, Wo)    # [B, O, Ho, Wo]
    elif stride == 1 and groups == C == O:
        return _crop_add_bias(_conv_shifted(x, w, padding, True), bias)                  # [B, O, Ho, Wo]
    else:
        return _conv_dense(x, w, bias, stride, (padding, padding), groups, Ho, Wo)       # [B, O, Ho, Wo]
    if bias is not None:
        y += bias[:, None, None]
    return y


def _conv_dense(x, w, bias, stride, pad, groups, Ho, Wo, y=None):
    """The im2col forms: `_conv_rows` for ungrouped stride-1 convs with ROWS_MIN_PIXELS_PER_CHANNEL output pixels per
    input channel or more (it copies a third as much of the image, but the weights once per call), `_conv_taps`
    otherwise (measured: benchmarks/conv-forms-2cpu.md)."""
    if stride == 1 and groups == 1 and Ho * Wo >= ROWS_MIN_PIXELS_PER_CHANNEL * x.shape[1]:
        return _conv_rows(x, w, bias, pad, Ho, Wo, y)
    return _conv_taps(x, w, bias, stride, pad, groups, Ho, Wo, y)


def _conv_emulated(x, w, bias, stride, padding, groups, Ho, Wo):
    """conv2d's forms as chosen before issue 33, kept for the emulated path (see conv2d)."""
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    depthwise = groups == C == O
    if kh == kw == 1 and stride == 1 and groups == 1 and not padding:
        y = np.matmul(w.reshape(O, C), x.reshape(B, C, H * W)).reshape(B, O, Ho, Wo)    # [B, O, Ho, Wo]
    elif stride == 1 and (depthwise or (groups == 1 and Ho * Wo > SHIFTED_MIN_PIXELS)):
        return _crop_add_bias(_conv_shifted(x, w, padding, depthwise), bias)             # [B, O, Ho, Wo]
    else:
        y = _conv_im2col(_pad(x, padding), w, stride, groups, Ho, Wo)                   # [B, O, Ho, Wo]
    if bias is not None:
        y += bias[:, None, None]
    return y


def _crop_add_bias(y, bias):
    """The shifted form's view on the padded width: crop + bias in one pass."""
    out = np.empty(y.shape, y.dtype)
    if bias is None:
        out[...] = y
    else:
        np.add(y, bias[:, None, None], out=out)
    return out


def _conv_taps(x, w, bias, stride, pad, groups, Ho, Wo, y=None):
    """im2col one block of output rows at a time, without a padded copy of x: the block's column matrix
    cols[(c, u, v), (i, j)] = x[c, i * stride + u - top, j * stride + v - left] (zero outside x; pad = (top, left))
    is filled by one strided copy per tap (`_fill_taps`) and multiplied by the weights [O, C*kh*kw] in one GEMM
    (groups: a batch dimension of it); the bias is added while the block is still in cache. CONV_BLOCK_BYTES
    bounds the column block. Writes into y [B, O, Ho, Wo] if given."""
    B, C = x.shape[:2]
    O, Cg, kh, kw = w.shape
    K = Cg * kh * kw
    wg = w.reshape(groups, O // groups, K)                                              # [G, O/G, Cg*kh*kw]
    rows = _block_rows(Ho, Wo, C * kh * kw, x.itemsize)
    buf = np.empty((C * kh * kw, rows * Wo), x.dtype)
    y = np.empty((B, O, Ho, Wo), x.dtype) if y is None else y
    yg = y.reshape(B, groups, O // groups, Ho * Wo)                                    # a view
    for b in range(B):
        for r0 in range(0, Ho, rows):
            r1 = min(Ho, r0 + rows)
            cols = buf[:, :(r1 - r0) * Wo]                                              # [C*kh*kw, r*Wo]
            _fill_taps(cols.reshape(C, kh, kw, r1 - r0, Wo), x[b], r0, stride, pad)
            out = yg[b, :, :, r0 * Wo:r1 * Wo]                                          # [G, O/G, r*Wo]
            np.matmul(wg, cols.reshape(groups, K, -1), out=out)
            if bias is not None:
                out += bias.reshape(groups, -1, 1)
    return y


def _block_rows(Ho, Wo, K, itemsize):
    """Output rows per column block [K, rows * Wo]: at most CONV_BLOCK_BYTES of it, so that it is still in cache when
    the GEMM reads it, but at least CONV_MIN_COLUMNS pixels, so that packing the weights is a small part of each
    GEMM (measured: benchmarks/conv-forms-2cpu.md)."""
    return max(1, min(Ho, max(CONV_BLOCK_BYTES // (itemsize * K * Wo), -(-CONV_MIN_COLUMNS // Wo))))


def _conv_rows(x, w, bias, pad, Ho, Wo, y=None):
    """Stride-1 dense conv, one block of output rows at a time, without a padded copy of x: the block's window
    win[(c, v), (t, j)] = x[c, r0 + t - top, j + v - left] (zero outside x) over its r + kh - 1 input rows stacks the
    kw taps of a kernel row (one strided copy each, `_fill_taps`), so the taps of kernel row u are the window's
    columns from u * Wo on: kh GEMMs with the weights [O, C*kw] of row u, summed in cache. A third of the copying of
    `_conv_taps` (which NumPy does on one thread), for kh GEMMs instead of one. Writes into y if given."""
    B, C = x.shape[:2]
    O, _, kh, kw = w.shape
    rows = _block_rows(Ho, Wo, C * kw, x.itemsize)
    wrows = np.ascontiguousarray(w.transpose(2, 0, 1, 3)).reshape(kh, O, C * kw)        # [kh, O, C*kw]
    win = np.empty((C * kw, (rows + kh - 1) * Wo), x.dtype)
    tmp = np.empty((O, rows * Wo), x.dtype)
    y = np.empty((B, O, Ho, Wo), x.dtype) if y is None else y
    for b in range(B):
        for r0 in range(0, Ho, rows):
            r1 = min(Ho, r0 + rows)
            n = (r1 - r0) * Wo
            window = win[:, :(r1 - r0 + kh - 1) * Wo]                                  # [C*kw, (r + kh - 1)*Wo]
            _fill_taps(window.reshape(C, 1, kw, r1 - r0 + kh - 1, Wo), x[b], r0, 1, pad)
            out = y[b].reshape(O, Ho * Wo)[:, r0 * Wo:r1 * Wo]                          # [O, r*Wo]
            np.matmul(wrows[0], window[:, :n], out=out)
            for u in range(1, kh):                                                      # + kernel row u
                out += np.matmul(wrows[u], window[:, u * Wo:u * Wo + n], out=tmp[:, :n])
            if bias is not None:
                out += bias[:, None]
    return y


def _fill_taps(cols, x, r0, stride, pad):
    """cols [C, kh, kw, r, Wo] <- for output rows r0 .. r0 + r - 1 and every tap (u, v):
    x[c, i * stride + u - top, j * stride + v - left], zero where that falls outside x [C, H, W]."""
    _, kh, kw, r, Wo = cols.shape
    H, W = x.shape[1:]
    for u in range(kh):
        i0, i1 = _inside(u - pad[0], stride, H, r0, r0 + r)
        for v in range(kw):
            j0, j1 = _inside(v - pad[1], stride, W, 0, Wo)
            tap = cols[:, u, v]                                                         # [C, r, Wo]
            tap[:, :i0 - r0] = 0
            tap[:, i1 - r0:] = 0
            tap[:, :, :j0] = 0
            tap[:, :, j1:] = 0
            if i1 > i0 and j1 > j0:
                tap[:, i0 - r0:i1 - r0, j0:j1] = x[:, _reads(i0, i1, stride, u - pad[0]),
                                                  _reads(j0, j1, stride, v - pad[1])]


def _inside(offset, stride, size, lo, hi):
    """(i0, i1): the outputs i in [lo, hi) whose tap reads i * stride + offset inside [0, size), i0 <= i1."""
    i0 = max(lo, -(offset // stride))
    return i0, max(i0, min(hi, (size - 1 - offset) // stride + 1))


def _reads(i0, i1, stride, offset):
    """The input indices outputs i0 .. i1 - 1 read: i * stride + offset."""
    return slice(i0 * stride + offset, (i1 - 1) * stride + offset + 1, stride)


def upsample_conv2d(x, p, *, scale=2, padding=1):
    """conv2d(upsample_nearest2d(x, scale), p, padding=padding) (diffusers Upsample2D; TAESD's upsample + conv)
    without the upsampled image. Output phase (a, b), the pixels (scale i + a, scale j + b), is a conv of x itself:
    the kernel taps that read the same pixel of x are summed first (`_phase_taps`), so a 3x3 kernel becomes four
    2x2 kernels on a quarter of the pixels, 2.25x fewer FLOPs. x [B, C, H, W] -> [B, O, scale H, scale W].
    Under float16 / bfloat16 emulation, and on images under UPSAMPLE_MIN_PIXELS, it is the two ops, as written."""
    w, bias = p["weight"], p.get("bias")
    if active_rounding() is not None or x.shape[2] * x.shape[3] < UPSAMPLE_MIN_PIXELS:
        return conv2d(upsample_nearest2d(x, scale), p, padding=padding)
    B, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    if Cg != C:
        raise ValueError(f"upsample_conv2d: input has {C} channels, weight {tuple(w.shape)} expects {Cg}")
    Ho, Wo = scale * H + 2 * padding - kh + 1, scale * W + 2 * padding - kw + 1
    Hr, Wr = -(-Ho // scale), -(-Wo // scale)                   # outputs per phase (H, W when the kernel fits)
    planes = np.ascontiguousarray(w.transpose(2, 3, 0, 1))     # [kh, kw, O, C]: each tap's weights contiguous
    phases = []                                                 # (a, b, kernel [O, ka*kb*C], (top, left), ka, kb)
    for a, (top, row_taps) in enumerate(_phase_taps(kh, scale, padding)):
        for b, (left, col_taps) in enumerate(_phase_taps(kw, scale, padding)):
            k = np.empty((O, len(row_taps), len(col_taps), C), w.dtype)                # taps, then channels
            for i, us in enumerate(row_taps):
                for j, vs in enumerate(col_taps):
                    taps = [(u, v) for u in us for v in vs]
                    np.copyto(k[:, i, j], planes[taps[0]])
                    for t in taps[1:]:
                        k[:, i, j] += planes[t]
            phases.append((a, b, k.reshape(O, -1), (top, left), k.shape[1], k.shape[2]))
    kmax = max(ka * kb for *_, ka, kb in phases)
    rows = _block_rows(Hr, Wr, C * kmax, x.itemsize)
    buf = np.empty(C * kmax * rows * Wr, x.dtype)
    tmp = np.empty((O, rows * Wr), x.dtype)
    y = np.empty((B, O, scale * Hr, scale * Wr), x.dtype)
    for n in range(B):
        for r0 in range(0, Hr, rows):
            r1 = min(Hr, r0 + rows)
            for a, b, k, pad, ka, kb in phases:
                cols = buf[:ka * kb * C * (r1 - r0) * Wr].reshape(ka, kb, C, r1 - r0, Wr)   # taps, channels
                _fill_taps(cols.transpose(2, 0, 1, 3, 4), x[n], r0, 1, pad)
                t = np.matmul(k, cols.reshape(ka * kb * C, -1), out=tmp[:, :(r1 - r0) * Wr]).reshape(O, r1 - r0, Wr)
                out = y[n, :, scale * r0 + a:scale * r1:scale, b::scale]                # [O, r, W], phase (a, b)
                np.copyto(out, t) if bias is None else np.add(t, bias[:, None, None], out=out)
    return np.ascontiguousarray(y[:, :, :Ho, :Wo])


def _phase_taps(k, scale, padding):
    """Per output phase a < scale along one axis: (top, groups). Kernel tap u of output scale * i + a reads input
    pixel i + d(u) of the image before upsampling, d(u) = floor((a + u - padding) / scale), non-decreasing and
    skipping no value; groups lists the taps u of each value of d in turn, and top = -d(0)."""
    out = []
    for a in range(scale):
        d = [(a + u - padding) // scale for u in range(k)]
        out.append((-d[0], [[u for u in range(k) if d[u] == e] for e in range(d[0], d[-1] + 1)]))
    return out


def _pad(x, padding):
    """Zero padding of H and W (np.pad without its generality)."""
    if not padding:
        return x
    B, C, H, W = x.shape
    xp = np.zeros((B, C, H + 2 * padding, W + 2 * padding), x.dtype)
    xp[:, :, padding:padding + H, padding:padding + W] = x
    return xp                                                                           # [B, C, Hp, Wp]


def _conv_shifted(x, w, padding, depthwise):
    """Stride-1 conv as a sum over the kh*kw taps of one matmul (or, depthwise, one multiply) each: with the padded
    image flattened to [C, Hp*Wp], tap (u, v) of every output pixel is the contiguous slice starting at u*Wp + v, so
    outputs are computed on the padded width Wp and the last kw - 1 columns of each row dropped at the end."""
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Hp, Wp = H + 2 * padding, W + 2 * padding
    Ho, Wo = Hp - kh + 1, Wp - kw + 1
    flat = np.zeros((B, C, Hp * Wp + kw - 1), x.dtype)                                  # + kw - 1: the last tap
    flat[:, :, :Hp * Wp].reshape(B, C, Hp, Wp)[:, :, padding:padding + H, padding:padding + W] = x
    taps = [(u * Wp + v, np.ascontiguousarray(w[:, 0, u, v, None] if depthwise else w[:, :, u, v]))
            for u in range(kh) for v in range(kw)]
    y = np.empty((B, O, Ho * Wp), x.dtype)
    step = max(1, SHIFTED_BLOCK_BYTES // (O * Wp * x.itemsize)) * Wp                    # rows that stay in cache
    tmp = np.empty((O, step), x.dtype)
    for b in range(B):
        for s0 in range(0, Ho * Wp, step):
            s1 = min(Ho * Wp, s0 + step)
            out, t = y[b, :, s0:s1], tmp[:, :s1 - s0]
            for k, (off, wt) in enumerate(taps):
                src = flat[b, :, s0 + off:s1 + off]                                     # [C, n], a view
                dst = out if k == 0 else t
                np.multiply(wt, src, out=dst) if depthwise else np.matmul(wt, src, out=dst)
                if k:
                    out += t
    return y.reshape(B, O, Ho, Wp)[..., :Wo]                                            # [B, O, Ho, Wo], a view


def _conv_im2col(x, w, stride, groups, Ho, Wo):
    """Padded x: one im2col matmul per block of output rows (the column matrix of a 512x512 image would take
    gigabytes). Groups are a batch dimension of the matmul."""
    B, C = x.shape[:2]
    O, Cg, kh, kw = w.shape
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    wg = w.reshape(groups, O // groups, Cg * kh * kw)                                   # [G, O/G, Cg*kh*kw]
    y = np.empty((B, groups, O // groups, Ho * Wo), dtype=x.dtype)
    rows = max(1, min(Ho, IM2COL_BYTES // max(1, x.itemsize * C * kh * kw * Wo * B)))
    for r0 in range(0, Ho, rows):
        r1 = min(Ho, r0 + rows)
        cols = windows[:, :, r0:r1].transpose(0, 1, 4, 5, 2, 3)                         # [B, C, kh, kw, r, Wo]
        cols = cols.reshape(B, groups, Cg * kh * kw, (r1 - r0) * Wo)
        np.matmul(wg, cols, out=y[..., r0 * Wo:r1 * Wo])                                # [B, G, O/G, r*Wo]
    return y.reshape(B, O, Ho, Wo)


# ---- normalisation -------------------------------------------------------------------------------------
def normalised(g, eps, R=EXACT):
    """(g - mean) / sqrt(var + eps) over the last axis, biased variance. Statistics as ``R.norm_statistics`` says:
    "two-pass" mean = sum / n, var = sum (g - mean)^2 / n (as torch computes them); "one-pass" (decomposed graphs,
    fused NPU kernels) mean = sum / n, meansq = sum g^2 / n, var = max(meansq - mean^2, 0). R rounds at the named
    points; the last line is not rounded (the caller's affine output is)."""
    if R.norm_statistics == "two-pass":
        mean = R(g.mean(axis=-1, keepdims=True), "norm.mean")
        var = R(R(np.square(R(g - mean, "norm.centred")), "norm.square").mean(axis=-1, keepdims=True), "norm.var")
    else:
        n = g.dtype.type(g.shape[-1])
        total = lambda t: R(t.sum(axis=-1, keepdims=True), "norm.sum")        # noqa: E731
        with np.errstate(over="ignore", invalid="ignore"):                     # inf - inf: NaN, as on a device
            mean = R(total(g) / n, "norm.mean")
            meansq = R(total(R(np.square(g), "norm.square")) / n, "norm.meansq")
            var = np.maximum(R(meansq - R(np.square(mean), "norm.mean_squared"), "norm.var"), 0)   # NaN stays
    with np.errstate(invalid="ignore", divide="ignore"):
        return (g - mean) / np.sqrt(var + g.dtype.type(eps))


def group_norm_reference(x, p, groups, eps, *, silu=False, R=EXACT):
    """The plain formula `group_norm` computes: per (sample, group) of C/G channels y = normalised(x), then
    y * weight + bias per channel, then SiLU when silu=True.  x [B, C, ...] -> same shape."""
    B, C = x.shape[:2]
    y = normalised(x.reshape(B, groups, -1), eps, R).reshape(B, C, -1)          # [B, C, N]
    y = R(y * p["weight"][:, None] + p["bias"][:, None], "group_norm.out").reshape(x.shape)
    return R(_silu(y), "silu.out") if silu else y


@emulated("group_norm", formula=group_norm_reference)
def group_norm(x, p, groups, eps, *, silu=False):
    """torch.nn.GroupNorm: per (sample, group) zero mean and unit (biased) variance, then the per-channel affine;
    silu=True applies SiLU to the result as well (GN-SiLU opens every ResNet conv). x [B, C, ...] -> same shape.
    Fast form: one new buffer, normalised, scaled and activated in place (plain: `group_norm_reference`)."""
    B, C = x.shape[:2]
    g = x.reshape(B, groups, -1)                                    # [B, G, C/G * spatial]
    y = g - g.mean(axis=-1, keepdims=True)                          # centred: the one new buffer
    var = np.square(y).mean(axis=-1)                                # [B, G], pairwise sums as np.mean does
    scale = p["weight"].reshape(1, groups, -1, 1) / np.sqrt(var + eps)[:, :, None, None]   # [B, G, C/G, 1]
    y4 = y.reshape(B, groups, C // groups, -1)                      # a view
    y4 *= scale
    y4 += p["bias"].reshape(1, groups, -1, 1)
    if silu:
        _silu_inplace(y)
    return y.reshape(x.shape)


def norm_silu_conv2d(x, norm, conv, *, groups, eps, stride=1, padding=0):
    """conv2d(group_norm(x, norm, groups, eps, silu=True), conv, stride=stride, padding=padding), the GroupNorm-SiLU-
    conv that opens every ResNet conv (diffusers ResnetBlock2D) and ends the decoders and the UNet. Fast form (an
    ungrouped conv, outside emulation): the group statistics from cache-sized pieces (`_group_stats`), then one image
    at a time normalised and activated in cache-sized pieces into one reused buffer, which `_conv_dense` reads; the
    normalised batch is never built. Under float16 / bfloat16 emulation it is the two emulated ops, as written."""
    w = conv["weight"]
    if active_rounding() is not None or w.shape[1] != x.shape[1]:
        return conv2d(group_norm(x, norm, groups, eps, silu=True), conv, stride=stride, padding=padding)
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    mean, var = _group_stats(x, groups)                                                 # [B, G] each
    per_channel = lambda t: np.repeat(t, C // groups, axis=1)[:, :, None, None]         # noqa: E731, [B, C, 1, 1]
    mean_c = per_channel(mean)
    scale_c = norm["weight"][:, None, None] / per_channel(np.sqrt(var + eps))           # [B, C, 1, 1]
    shift_c = norm["bias"][:, None, None]
    y = np.empty((B, O, Ho, Wo), x.dtype)
    a = np.empty((1, C, H, W), x.dtype)                                                 # one image, normalised
    step = max(1, NORM_BLOCK_BYTES // (H * W * x.itemsize))                            # channels per piece
    tmp = np.empty((min(C, step), H, W), x.dtype)
    for b in range(B):
        for c0 in range(0, C, step):
            c1 = min(C, c0 + step)
            t = a[0, c0:c1]                                                             # [c, H, W]
            np.subtract(x[b, c0:c1], mean_c[b, c0:c1], out=t)
            t *= scale_c[b, c0:c1]
            t += shift_c[c0:c1]
            _silu_inplace(t, tmp[:c1 - c0])
        _conv_dense(a, w, conv.get("bias"), stride, (padding, padding), 1, Ho, Wo, y[b:b + 1])
    return y


def _group_stats(x, groups):
    """Mean and biased variance of each (sample, group) of x [B, C, ...] in x's dtype: the mean as np.mean sums it,
    the variance from cache-sized pieces of the centred values (their sums added in float64)."""
    B = x.shape[0]
    g = x.reshape(B, groups, -1)                                                        # [B, G, n]
    n = g.shape[2]
    mean = g.mean(axis=-1)                                                              # [B, G]
    step = max(1, NORM_BLOCK_BYTES // (B * groups * x.itemsize))
    tmp = np.empty((B, groups, min(n, step)), x.dtype)
    acc = np.zeros((B, groups), np.float64)
    for s0 in range(0, n, step):
        d = np.subtract(g[:, :, s0:s0 + step], mean[:, :, None], out=tmp[:, :, :min(step, n - s0)])
        np.square(d, out=d)
        acc += d.sum(axis=-1)
    return mean, (acc / n).astype(x.dtype)


def layer_norm_reference(x, p, eps, *, R=EXACT):
    """The plain formula `layer_norm` computes: normalised(x) * weight + bias over the last axis.  x [..., D]."""
    return R(normalised(x, eps, R) * p["weight"] + p["bias"], "layer_norm.out")


@emulated("layer_norm", formula=layer_norm_reference)
def layer_norm(x, p, eps):
    """torch.nn.LayerNorm over the last axis (biased variance), then affine.  x [..., D]. Fast form: one new
    buffer, normalised and scaled in place (plain: `layer_norm_reference`)."""
    y = x - x.mean(axis=-1, keepdims=True)                          # centred: the one new buffer
    y /= np.sqrt(np.square(y).mean(axis=-1, keepdims=True) + eps)
    y *= p["weight"]
    y += p["bias"]
    return y


@emulated("rms_norm")
def rms_norm(x, p, eps):
    """RMSNorm (Zhang & Sennrich 2019) over the last axis: x / sqrt(mean(x^2) + eps) * weight (+ bias if given),
    as transformers' Qwen3VLTextRMSNorm and diffusers' RMSNorm.  x [..., D]. Computed in x's dtype (both upstream
    classes take the mean square in float32 whatever the dtype, so their float64 is not float64 here)."""
    y = x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps)
    y = y * p["weight"] if p.get("weight") is not None else y
    return y if p.get("bias") is None else y + p["bias"]


def repeat_kv(x, kv_heads, groups):
    """Grouped-query / multi-query K or V: each of `kv_heads` heads serves `groups` consecutive query heads
    (transformers' repeat_kv).  x [B, T, kv_heads * d] -> [B, T, kv_heads * groups * d]."""
    B, T, D = x.shape
    return np.repeat(x.reshape(B, T, kv_heads, 1, D // kv_heads), groups, axis=3).reshape(B, T, -1)


# ---- elementwise activations -----------------------------------------------------------------------------
@emulated("relu")
def relu(x):
    return np.maximum(x, 0)


@emulated("silu")
def silu(x):
    """SiLU / Swish: x * sigmoid(x), with sigmoid(x) = (1 + tanh(x / 2)) / 2: one transcendental and no overflow for
    any x (exp(-x) would overflow)."""
    return _silu(x)


def _silu(x):
    return _silu_inplace(np.array(x, copy=True))


def _silu_inplace(x, scratch=None):
    t = np.multiply(x, 0.5, out=np.empty_like(x) if scratch is None else scratch)   # an array even when x is 0-d
    np.tanh(t, out=t)
    t += 1
    x *= t
    x *= 0.5                                                        # x (1 + tanh(x / 2)) / 2
    return x


def _sigmoid(x):
    """sigmoid(x) = (1 + tanh(x / 2)) / 2."""
    return 0.5 + 0.5 * np.tanh(0.5 * x)


@emulated("quick_gelu")
def quick_gelu(x):
    """OpenAI CLIP's GELU approximation: x * sigmoid(1.702 x)."""
    return x * _sigmoid(1.702 * x)


@emulated("gelu")
def gelu(x, approximate="none"):
    """torch.nn.functional.gelu: 'none' = x * Phi(x) with the exact erf; 'tanh' = the tanh approximation."""
    if approximate == "none":
        return 0.5 * x * (1 + erf(x * (1 / math.sqrt(2))))
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


# ---- erf ---------------------------------------------------------------------------------------------
# NumPy has no erf. This is the rational approximation of FreeBSD msun s_erf.c, accurate to < 1 ulp in
# float64, evaluated on whole arrays. Its coefficients carry this notice:
#   Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
#   Developed at SunPro, a Sun Microsystems, Inc. business.
#   Permission to use, copy, modify, and distribute this software is freely granted,
#   provided that this notice is preserved.
_ERX = 8.45062911510467529297e-01
_PP = (1.28379167095512558561e-01, -3.25042107247001499370e-01, -2.84817495755985104766e-02,
       -5.77027029648944159157e-03, -2.37630166566501626084e-05)
_QQ = (1.0, 3.97917223959155352819e-01, 6.50222499887672944485e-02, 5.08130628187576562776e-03,
       1.32494738004321644526e-04, -3.96022827877536812320e-06)
_PA = (-2.36211856075265944077e-03, 4.14856118683748331666e-01, -3.72207876035701323847e-01,
       3.18346619901161753674e-01, -1.10894694282396677476e-01, 3.54783043256182359371e-02,
       -2.16637559486879084300e-03)
_QA = (1.0, 1.06420880400844228286e-01, 5.40397917702171048937e-01, 7.18286544141962662868e-02,
       1.26171219808761642112e-01, 1.36370839120290507362e-02, 1.19844998467991074170e-02)
_RA = (-9.86494403484714822705e-03, -6.93858572707181764372e-01, -1.05586262253232909814e+01,
       -6.23753324503260060396e+01, -1.62396669462573470355e+02, -1.84605092906711035994e+02,
       -8.12874355063065934246e+01, -9.81432934416914548592e+00)
_SA = (1.0, 1.96512716674392571292e+01, 1.37657754143519042600e+02, 4.34565877475229228821e+02,
       6.45387271733267880336e+02, 4.29008140027567833386e+02, 1.08635005541779435134e+02,
       6.57024977031928170135e+00, -6.04244152148580987438e-02)
_RB = (-9.86494292470009928597e-03, -7.99283237680523006574e-01, -1.77579549177547519889e+01,
       -1.60636384855821916062e+02, -6.37566443368389627722e+02, -1.02509513161107724954e+03,
       -4.83519191608651397019e+02)
_SB = (1.0, 3.03380607434824582924e+01, 3.25792512996573918826e+02, 1.53672958608443695994e+03,
       3.19985821950859553908e+03, 2.55305040643316442583e+03, 4.74528541206955367215e+02,
       -2.24409524465858183362e+01)


def _poly(coeffs, z):
    """Horner evaluation of sum(coeffs[i] * z**i)."""
    acc = np.full_like(z, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc = acc * z + c
    return acc


def erf(x):
    """The error function, elementwise (msun s_erf.c rational approximations, computed in float64). Evaluated
    ERF_BLOCK elements at a time, so the float64 temporaries stay in cache (a 21M-element GELU input otherwise
    streams some twenty 168 MB temporaries through memory)."""
    x = np.asarray(x)
    flat = x.reshape(-1)
    out = np.empty(flat.shape, x.dtype if x.dtype.kind == "f" else np.float64)
    for i in range(0, flat.size, ERF_BLOCK):
        out[i:i + ERF_BLOCK] = _erf_block(flat[i:i + ERF_BLOCK])
    return out.reshape(x.shape)


def _erf_block(x):
    a = np.abs(x.astype(np.float64))
    out = np.empty_like(a)
    small = a < 0.84375                                             # erf(x) = x + x R(x^2)
    z = a[small] ** 2
    out[small] = a[small] + a[small] * (_poly(_PP, z) / _poly(_QQ, z))
    mid = (a >= 0.84375) & (a < 1.25)                               # expansion around 1
    s = a[mid] - 1
    out[mid] = _ERX + _poly(_PA, s) / _poly(_QA, s)
    tail = (a >= 1.25) & (a < 6)                                    # 1 - erfc, erfc = exp(...) / x
    t = a[tail]
    s = 1 / (t * t)
    near = t < 1 / 0.35
    r_over_s = np.where(near, _poly(_RA, s) / _poly(_SA, s), _poly(_RB, s) / _poly(_SB, s))
    hi = (t.view(np.uint64) & np.uint64(0xFFFFFFFF00000000)).view(np.float64)  # t with a short mantissa
    out[tail] = 1 - np.exp(-hi * hi - 0.5625) * np.exp((hi - t) * (hi + t) + r_over_s) / t
    out[a >= 6] = 1.0
    out[np.isnan(a)] = np.nan
    return np.copysign(out, x)                                      # erf is odd (erf(-0) = -0)


# ---- attention ---------------------------------------------------------------------------------------
@emulated("softmax")
def softmax(x, axis=-1):
    """Numerically stable softmax: exp(x - max) / sum. Rows of finite values always sum to 1."""
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def causal_mask(t, dtype):
    """Additive causal mask [t, t]: 0 on and below the diagonal, the dtype's most negative value above,
    as transformers' CLIP builds it (a finite value, so no row is ever all -inf)."""
    m = np.zeros((t, t), dtype=dtype)
    m[np.triu_indices(t, 1)] = np.finfo(dtype).min
    return m


def attention_reference(q, k, v, heads, *, mask=None, weighting="softmax", scale=None, R=EXACT):
    """The plain formula `attention` computes, all queries at once, per head: s = q k^T * scale (+ mask), weights
    P = softmax(s) (or relu(s) / Tk), out = P v.  q [B, Tq, H*d], k [B, Tk, H*d], v [B, Tk, H*dv] -> [B, Tq, H*dv].
    R rounds at the named points ("attention.qk" is the sum before the scale)."""
    _check_attention(q, k, v, heads, weighting)
    B, Tq, D = q.shape
    heads_of = lambda t: t.reshape(B, t.shape[1], heads, -1).transpose(0, 2, 1, 3)   # noqa: E731  [B, H, T, d]
    scale = (D // heads) ** -0.5 if scale is None else scale
    s = R(heads_of(q) @ heads_of(k).transpose(0, 1, 3, 2), "attention.qk")         # [B, H, Tq, Tk]
    s = R(s * s.dtype.type(scale), "attention.scores")
    if mask is not None:
        s = R(s + mask, "attention.masked")
    with np.errstate(invalid="ignore"):                                            # inf - inf: NaN, as on a device
        if weighting == "softmax":
            e = np.exp(s - s.max(axis=-1, keepdims=True))
            w = R(e / e.sum(axis=-1, keepdims=True), "attention.probs")
        else:
            w = R(np.maximum(s, 0) / s.dtype.type(k.shape[1]), "attention.probs")
    out = R(w @ heads_of(v), "attention.out")                                      # [B, H, Tq, dv]
    return out.transpose(0, 2, 1, 3).reshape(B, Tq, -1)                           # [B, Tq, H*dv]


def _attention_emulated(q, k, v, heads, *, mask=None, R, **kw):
    """attention_reference under a rounding policy, QUERY_CHUNK queries at a time: query rows are independent, and
    the float32 scores of all queries of a 4096 x 4096 attention would not fit."""
    B, Tq = q.shape[:2]
    if mask is not None:
        mask = np.broadcast_to(mask, (B, heads, Tq, k.shape[1]))
    parts = [attention_reference(q[:, a:a + QUERY_CHUNK], k, v, heads, R=R, **kw,
                                 mask=None if mask is None else mask[:, :, a:a + QUERY_CHUNK])
             for a in range(0, Tq, QUERY_CHUNK)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _check_attention(q, k, v, heads, weighting):
    D = q.shape[2]
    if D % heads or k.shape[2] != D or v.shape[2] % heads:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not split into {heads} heads")
    if weighting not in ("softmax", "relu"):
        raise ValueError(f"attention: weighting must be 'softmax' or 'relu', got {weighting!r}")


@emulated("attention", formula=_attention_emulated)
def attention(q, k, v, heads, *, mask=None, weighting="softmax", scale=None):
    """Multi-head scaled dot-product attention on already projected q, k, v (plain formula: `attention_reference`).

    q [B, Tq, H*d], k [B, Tk, H*d], v [B, Tk, H*dv] -> [B, Tq, H*dv].
    weighting 'softmax': softmax(q k^T * scale + mask) v.
    weighting 'relu' (MobileDiffusion's deployable form): relu(q k^T * scale + mask) / Tk, then v.
    mask is additive, broadcastable to [B, H, Tq, Tk]. scale defaults to 1/sqrt(d).
    Fast form: queries in chunks with one reused score buffer, so a 4096 x 4096 attention never holds the scores
    of all queries of all heads at once; q is scaled before the product.
    """
    _check_attention(q, k, v, heads, weighting)
    B, Tq, D = q.shape
    Tk = k.shape[1]
    d, dv = D // heads, v.shape[2] // heads
    scale = 1 / math.sqrt(d) if scale is None else scale
    qh = q.reshape(B, Tq, heads, d).transpose(0, 2, 1, 3) * np.asarray(scale, q.dtype)   # [B, H, Tq, d]
    kt = k.reshape(B, Tk, heads, d).transpose(0, 2, 3, 1)          # [B, H, d, Tk]
    vh = v.reshape(B, Tk, heads, dv).transpose(0, 2, 1, 3)         # [B, H, Tk, dv]
    if mask is not None:
        mask = np.broadcast_to(mask, (B, heads, Tq, Tk))
    chunk = max(1, min(Tq, SCORES_BYTES // (B * heads * Tk * q.itemsize)))
    buf = np.empty((B, heads, chunk, Tk), dtype=q.dtype)
    out = np.empty((B, heads, Tq, dv), dtype=q.dtype)
    for q0 in range(0, Tq, chunk):
        q1 = min(Tq, q0 + chunk)
        s = buf[:, :, : q1 - q0]
        np.matmul(qh[:, :, q0:q1], kt, out=s)                      # [B, H, c, Tk]
        if mask is not None:
            s += mask[:, :, q0:q1]
        if weighting == "softmax":
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
        else:
            np.maximum(s, 0, out=s)
            s /= Tk
        np.matmul(s, vh, out=out[:, :, q0:q1])                      # [B, H, c, dv]
    return out.transpose(0, 2, 1, 3).reshape(B, Tq, heads * dv)    # [B, Tq, H*dv]


@emulated("upsample_nearest2d")
def upsample_nearest2d(x, scale=2):
    """torch.nn.functional.interpolate(mode='nearest') by an integer factor.  [B, C, H, W] -> [B, C, sH, sW]."""
    return x.repeat(scale, axis=2).repeat(scale, axis=3)


def timestep_embedding(t, dim, *, flip_sin_to_cos, downscale_freq_shift, scale=1.0, max_period=10000,
                       dtype=np.float32):
    """Sinusoidal timestep embedding, diffusers `get_timestep_embedding`.

    t [B] -> [B, dim]. freqs_i = exp(-ln(max_period) * i / (half - downscale_freq_shift)), i < half;
    emb = [sin(t f), cos(t f)] (or [cos, sin] when flip_sin_to_cos), zero-padded when dim is odd.
    Computed in `dtype` throughout (diffusers computes it in float32 whatever the model's dtype).
    """
    half = dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=dtype) / np.asarray(half - downscale_freq_shift, dtype)
    freqs = np.exp(exponent)                                        # [half]
    args = np.asarray(t, dtype=dtype).reshape(-1)[:, None] * freqs[None, :] * np.asarray(scale, dtype)  # [B, half]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=-1)     # [B, 2*half]
    if flip_sin_to_cos:
        emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb                                                      # [B, dim]
