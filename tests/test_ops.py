"""Property tests for mdref.ops: every kernel against a naive loop or closed form, plus invariants.

Each reference below is written from the layer's definition with Python loops and the `math` module in
float64 (math.fsum makes every reference sum correctly rounded), independent of mdref.ops. Every property
runs in float32 and float64 and checks that the output keeps the input's dtype.

Tolerances, and why:
  RTOL  (results of short reductions, <= ~64 terms, compared with the float64 reference, scaled by the
        largest reference magnitude or by the same reference on absolute values):
        float64 1e-12: each rounding costs <= 1.1e-16, so 64 terms plus exp/sqrt stay below ~1e-14;
        float32 1e-5:  unit roundoff 6e-8, so 64 terms give <= 4e-6 in the worst case.
  ELEM  (elementwise activations, error relative to |x|): a handful of roundings of quantities of size |x|:
        float64 1e-14 (~45 ulp), float32 2e-6 (~16 ulp).
  erf is held to ulps: msun's approximation is < 1 ulp in float64 (we allow 2); float32 results are the
        float64 value rounded once (we allow 1 float32 ulp).
Measured worst errors (relative to each test's scale) are collected in MEASURED and printed at the end
with `pytest -s`.
"""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mdref import ops

pytestmark = pytest.mark.numerics          # also run under other BLAS / oneDNN kernels (.ci/run)

DTYPES = [np.float32, np.float64]
by_dtype = pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
ELEM = {np.float32: 2e-6, np.float64: 1e-14}
seeds = st.integers(0, 2**32 - 1)
MEASURED = {}


@pytest.fixture(scope="module", autouse=True)
def _print_measured():
    yield
    print("\nworst measured errors (relative to each test's scale):")
    for name, err in sorted(MEASURED.items()):
        print(f"  {name:50s} {err:.3g}")


def _note(name, dtype, err):
    key = f"{name}[{np.dtype(dtype).name}]"
    MEASURED[key] = max(MEASURED.get(key, 0.0), float(err))


def check(name, out, ref, dtype, tol, scale=None):
    """Assert out has dtype `dtype`, ref's shape, and |out - ref| <= tol * scale (default: max |ref|)."""
    assert out.dtype == dtype, f"{name}: output dtype {out.dtype}, input dtype {np.dtype(dtype)}"
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, f"{name}: shape {out.shape}, expected {ref.shape}"
    scale = np.max(np.abs(ref), initial=0.0) if scale is None else np.asarray(scale, dtype=np.float64)
    scale = np.maximum(scale, np.finfo(dtype).tiny)
    err = np.abs(out.astype(np.float64) - ref)
    _note(name, dtype, np.max(err / scale, initial=0.0))
    bad = ~(err <= tol * scale)                                     # NaN counts as a failure
    assert not bad.any(), f"{name}: max error {err.max():.3g} > {tol:g} x scale at {np.argwhere(bad)[0]}"


def randn(rng, shape, dtype, amp=1.0):
    return (rng.standard_normal(shape) * amp).astype(dtype)


def maybe_bias(rng, n, dtype, mode):
    """A parameter dict's bias: absent, explicitly None, or an array."""
    return {} if mode == "absent" else {"bias": None} if mode == "none" else {"bias": randn(rng, (n,), dtype)}


bias_modes = st.sampled_from(["absent", "none", "array"])


# ---- linear ------------------------------------------------------------------------------------------
def linear_ref(x, w, b):
    """y[..., o] = sum_i x[..., i] w[o, i] + b[o], one correctly rounded sum per output."""
    rows = x.reshape(-1, x.shape[-1]).tolist()
    y = [[math.fsum(xi * wi for xi, wi in zip(r, wo)) + (0.0 if b is None else float(b[o]))
          for o, wo in enumerate(w.tolist())] for r in rows]
    return np.array(y, dtype=np.float64).reshape(x.shape[:-1] + (w.shape[0],))


@by_dtype
@given(seed=seeds, batch=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3), n_in=st.integers(1, 16),
       n_out=st.integers(1, 8), bias=bias_modes)
def test_linear_matches_loop(dtype, seed, batch, n_in, n_out, bias):
    rng = np.random.default_rng(seed)
    x, w = randn(rng, batch + (n_in,), dtype), randn(rng, (n_out, n_in), dtype)
    p = {"weight": w, **maybe_bias(rng, n_out, dtype, bias)}
    b = p.get("bias")
    # Rounding error of a dot product is bounded by eps * sum |x_i w_i|: the reference on absolute values.
    scale = linear_ref(np.abs(x), np.abs(w), None if b is None else np.abs(b))
    check("linear", ops.linear(x, p), linear_ref(x, w, b), dtype, RTOL[dtype], scale)


# ---- conv2d ------------------------------------------------------------------------------------------
def conv2d_ref(x, w, b, stride, padding, groups):
    """torch Conv2d by definition: explicit loops over output positions, zero padding, grouped channels."""
    B, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    Ho, Wo = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
    xl, wl = x.tolist(), w.tolist()
    y = np.zeros((B, O, Ho, Wo))
    for n in range(B):
        for o in range(O):
            g = o // (O // groups)                                  # the group output channel o belongs to
            for i in range(Ho):
                for j in range(Wo):
                    terms = [xl[n][g * Cg + c][i * stride + u - padding][j * stride + v - padding] * wl[o][c][u][v]
                             for c in range(Cg) for u in range(kh) for v in range(kw)
                             if 0 <= i * stride + u - padding < H and 0 <= j * stride + v - padding < W]
                    y[n, o, i, j] = math.fsum(terms) + (0.0 if b is None else float(b[o]))
    return y


@st.composite
def conv_cases(draw, max_hw=7):
    groups = draw(st.integers(1, 3))
    cg, og = draw(st.integers(1, 3)), draw(st.integers(1, 3))     # channels per group in, out
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride, padding = draw(st.integers(1, 3)), draw(st.integers(0, 2))
    H = draw(st.integers(max(1, kh - 2 * padding), max_hw))
    W = draw(st.integers(max(1, kw - 2 * padding), max_hw))
    return dict(B=draw(st.integers(1, 2)), C=groups * cg, O=groups * og, H=H, W=W, k=(kh, kw),
                stride=stride, padding=padding, groups=groups)


def conv_inputs(rng, c, dtype):
    x = randn(rng, (c["B"], c["C"], c["H"], c["W"]), dtype)
    w = randn(rng, (c["O"], c["C"] // c["groups"]) + c["k"], dtype)
    return x, w


@by_dtype
@given(seed=seeds, c=conv_cases(), bias=bias_modes)
def test_conv2d_matches_loop(dtype, seed, c, bias):
    rng = np.random.default_rng(seed)
    x, w = conv_inputs(rng, c, dtype)
    p = {"weight": w, **maybe_bias(rng, c["O"], dtype, bias)}
    b = p.get("bias")
    kw = dict(stride=c["stride"], padding=c["padding"], groups=c["groups"])
    scale = conv2d_ref(np.abs(x), np.abs(w), None if b is None else np.abs(b), **kw)   # sum |x w| bound
    check("conv2d", ops.conv2d(x, p, **kw), conv2d_ref(x, w, b, **kw), dtype, RTOL[dtype], scale)


@by_dtype
@given(seed=seeds, B=st.integers(1, 2), C=st.integers(1, 5), mult=st.integers(1, 3), k=st.integers(1, 3),
       stride=st.integers(1, 2), padding=st.integers(0, 1), H=st.integers(3, 7), W=st.integers(3, 7))
def test_depthwise_conv_equals_per_channel_conv(dtype, seed, B, C, mult, k, stride, padding, H, W):
    """groups == C: output channels c*mult .. c*mult+mult-1 are an ordinary conv of input channel c alone."""
    rng = np.random.default_rng(seed)
    x, w, b = randn(rng, (B, C, H, W), dtype), randn(rng, (C * mult, 1, k, k), dtype), randn(rng, (C * mult,), dtype)
    y = ops.conv2d(x, {"weight": w, "bias": b}, stride=stride, padding=padding, groups=C)
    per_channel = np.concatenate(
        [ops.conv2d(x[:, c:c + 1], {"weight": w[c * mult:(c + 1) * mult], "bias": b[c * mult:(c + 1) * mult]},
                    stride=stride, padding=padding) for c in range(C)], axis=1)
    # Same products, possibly summed in another order by a differently shaped matmul: k*k <= 9 terms.
    check("depthwise==per-channel", y, per_channel, dtype, RTOL[dtype])


def one_row_blocks(m):
    """Column blocks of one output row (monkeypatch context m)."""
    m.setattr(ops, "CONV_BLOCK_BYTES", 1)
    m.setattr(ops, "CONV_MIN_COLUMNS", 1)


def im2col_forms(run):
    """run() with each of conv2d's im2col forms forced (stacked kernel rows, all taps), in one-row blocks too."""
    for name, per_channel in (("rows", 0), ("taps", 2**62)):
        for blocks in ("default", "one-row"):
            with pytest.MonkeyPatch.context() as m:
                m.setattr(ops, "ROWS_MIN_PIXELS_PER_CHANNEL", per_channel)
                if blocks == "one-row":
                    one_row_blocks(m)
                yield f"{name}, {blocks} blocks", run()


@by_dtype
@given(seed=seeds, c=conv_cases(max_hw=9))
def test_conv2d_row_blocks_equal_one_block(dtype, seed, c):
    """CONV_BLOCK_BYTES / CONV_MIN_COLUMNS only shape the working set: one output row per block gives the unblocked
    result."""
    rng = np.random.default_rng(seed)
    x, w = conv_inputs(rng, c, dtype)
    kw = dict(stride=c["stride"], padding=c["padding"], groups=c["groups"])
    whole = ops.conv2d(x, {"weight": w}, **kw)
    with pytest.MonkeyPatch.context() as m:
        one_row_blocks(m)
        blocked = ops.conv2d(x, {"weight": w}, **kw)
    # Each output is the same dot product; only the matmul's shape changes, which BLAS may sum differently.
    check("conv2d blocked==whole", blocked, whole, dtype, RTOL[dtype])


def emulated_forms(x, p, stride, padding, groups):
    """conv2d's forms as the float16 / bfloat16 emulation runs them (ops._conv_emulated), here without rounding: as
    chosen by size, the shifted form in one-row blocks, im2col in one-row blocks."""
    w = p["weight"]
    Ho = (x.shape[2] + 2 * padding - w.shape[2]) // stride + 1
    Wo = (x.shape[3] + 2 * padding - w.shape[3]) // stride + 1
    for name, patch in (("emulated default", {}), ("emulated shifted", dict(SHIFTED_MIN_PIXELS=-1, SHIFTED_BLOCK_BYTES=1)),
                        ("emulated im2col", dict(SHIFTED_MIN_PIXELS=2**62, IM2COL_BYTES=1))):
        with pytest.MonkeyPatch.context() as m:
            for k, v in patch.items():
                m.setattr(ops, k, v)
            yield name, ops._conv_emulated(x, w, p.get("bias"), stride, padding, groups, Ho, Wo)


@by_dtype
@given(seed=seeds, c=conv_cases(), bias=bias_modes)
def test_conv2d_equals_its_plain_formula(dtype, seed, c, bias):
    """Every fast form of conv2d (pointwise, shifted slices, im2col by taps, and the emulated path's shifted and
    blocked im2col forms) and ops.conv2d_reference (one tap at a time) compute the same sums."""
    rng = np.random.default_rng(seed)
    x, w = conv_inputs(rng, c, dtype)
    p = {"weight": w, **maybe_bias(rng, c["O"], dtype, bias)}
    kw = dict(stride=c["stride"], padding=c["padding"], groups=c["groups"])
    plain = ops.conv2d_reference(x, p, **kw)
    assert plain.dtype == dtype
    scale = ops.conv2d_reference(np.abs(x), {"weight": np.abs(w)}, **kw)                 # sum |x w| bound
    for name, out in [("default", ops.conv2d(x, p, **kw)), *im2col_forms(lambda: ops.conv2d(x, p, **kw)),
                      *emulated_forms(x, p, **kw)]:
        assert out.dtype == dtype and out.shape == plain.shape
        check(f"conv2d ({name}) == conv2d_reference", out, plain, dtype, RTOL[dtype], scale)


@st.composite
def upsample_conv_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    scale, padding = draw(st.integers(1, 3)), draw(st.integers(0, 2))
    H = draw(st.integers(max(1, -(-(kh - 2 * padding) // scale)), 5))
    W = draw(st.integers(max(1, -(-(kw - 2 * padding) // scale)), 5))
    return dict(B=draw(st.integers(1, 2)), C=draw(st.integers(1, 4)), O=draw(st.integers(1, 4)), H=H, W=W,
                k=(kh, kw), scale=scale, padding=padding)


@by_dtype
@given(seed=seeds, c=upsample_conv_cases(), bias=bias_modes, one_row=st.booleans())
def test_upsample_conv2d_matches_loop_and_plain_formula(dtype, seed, c, bias, one_row):
    """upsample_conv2d (the sub-pixel form: per output phase, a conv of x with the taps reading one pixel summed)
    against the loop oracle on an upsampled image (np.repeat) and its plain formula conv2d(upsample_nearest2d(x))."""
    rng = np.random.default_rng(seed)
    x = randn(rng, (c["B"], c["C"], c["H"], c["W"]), dtype)
    w = randn(rng, (c["O"], c["C"]) + c["k"], dtype)
    p = {"weight": w, **maybe_bias(rng, c["O"], dtype, bias)}
    b, s = p.get("bias"), c["scale"]
    up = np.repeat(np.repeat(x, s, axis=2), s, axis=3)                                  # nearest, by definition
    with pytest.MonkeyPatch.context() as m:
        if one_row:
            one_row_blocks(m)
        m.setattr(ops, "UPSAMPLE_MIN_PIXELS", 0)                     # the phase form even on these small images
        out = ops.upsample_conv2d(x, p, scale=s, padding=c["padding"])
    kw = dict(stride=1, padding=c["padding"], groups=1)
    scale = conv2d_ref(np.abs(up), np.abs(w), None if b is None else np.abs(b), **kw)   # sum |x w| bound
    # At most 4 C 4 x 4 <= 64 products, and the summed taps add one rounding per weight: within RTOL's 64 terms.
    check("upsample_conv2d", out, conv2d_ref(up, w, b, **kw), dtype, RTOL[dtype], scale)
    plain = ops.conv2d(ops.upsample_nearest2d(x, s), p, padding=c["padding"])
    check("upsample_conv2d == conv2d(upsample)", out, plain, dtype, RTOL[dtype], scale)
    small = ops.upsample_conv2d(x, p, scale=s, padding=c["padding"])                      # the composition here
    check("upsample_conv2d (under UPSAMPLE_MIN_PIXELS) == conv2d(upsample)", small, plain, dtype, RTOL[dtype], scale)


@st.composite
def norm_conv_cases(draw):
    """group_norm_cases' conditioning (groups of >= 8 values, |mean| / std <= 4) with a conv behind the norm."""
    groups, per_group = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    k, stride, padding = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1))
    H, W = draw(st.integers(max(k, 2), 7)), draw(st.integers(max(k, 2), 7))
    assume(per_group * H * W >= 8)
    return dict(B=draw(st.integers(1, 2)), groups=groups, C=groups * per_group, O=draw(st.integers(1, 4)), H=H, W=W,
                k=k, stride=stride, padding=padding, eps=draw(eps_values), offset=draw(st.floats(-2, 2)),
                amp=draw(st.floats(0.5, 4)))


@by_dtype
@given(seed=seeds, c=norm_conv_cases(), bias=bias_modes, blocks=st.sampled_from(["default", "one"]))
def test_norm_silu_conv2d_equals_its_plain_formula(dtype, seed, c, bias, blocks):
    """norm_silu_conv2d (statistics from pieces, each image normalised into one buffer, then conv by taps) against
    conv2d(group_norm(x, silu=True)) and against the loop oracles (group_norm_ref, then conv2d_ref in float64)."""
    rng = np.random.default_rng(seed)
    x = (c["offset"] + randn(rng, (c["B"], c["C"], c["H"], c["W"]), np.float64, c["amp"])).astype(dtype)
    norm = {"weight": randn(rng, (c["C"],), dtype), "bias": randn(rng, (c["C"],), dtype)}
    w = randn(rng, (c["O"], c["C"], c["k"], c["k"]), dtype)
    p = {"weight": w, **maybe_bias(rng, c["O"], dtype, bias)}
    kw = dict(stride=c["stride"], padding=c["padding"])
    with pytest.MonkeyPatch.context() as m:
        if blocks == "one":                                  # one value per normalised piece
            m.setattr(ops, "NORM_BLOCK_BYTES", 1)
        outs = list(im2col_forms(lambda: ops.norm_silu_conv2d(x, norm, p, groups=c["groups"], eps=c["eps"], **kw)))
    gn = group_norm_ref(x, norm["weight"], norm["bias"], c["groups"], c["eps"])
    act = gn / (1 + np.exp(-gn))                                                         # SiLU, float64
    b = p.get("bias")
    ref = conv2d_ref(act, w.astype(np.float64), b, **kw, groups=1)
    # The activation carries group_norm's error, <= RTOL * (max|gn| + 1) per value (test_group_norm_matches_loop;
    # |silu'| <= 1.1), and the conv sums it with weights w: bound by the conv of |w| with max|gn| + 1 + |act|.
    scale = conv2d_ref(np.abs(act) + np.max(np.abs(gn)) + 1, np.abs(w), None if b is None else np.abs(b), **kw,
                       groups=1)
    plain = ops.conv2d(ops.group_norm(x, norm, c["groups"], c["eps"], silu=True), p, **kw)
    for name, out in outs:
        check(f"norm_silu_conv2d ({name})", out, ref, dtype, RTOL[dtype], scale)
        check(f"norm_silu_conv2d ({name}) == conv2d(group_norm)", out, plain, dtype, RTOL[dtype], scale)


# The decoders' and UNets' own conv shapes (channels, kernel, width, what precedes the conv) against torch in float64,
# a few rows high: at the real block sizes (a 512-wide image: blocks of 1-3 rows, the last one partial), and the wide
# ones also in several partial blocks.
DECODER_CONVS = [  # (form, C, O, H, W, groups of the norm, block bytes or None for the real ones)
    ("conv", 64, 64, 10, 512, 0, None),           # TAESD / MobileDiffusion lite at 512x512
    ("upsample", 64, 64, 5, 256, 0, None),        # TAESD's last upsample + conv: 256 -> 512
    ("norm", 128, 64, 7, 512, 32, None),          # lite decoder: the first ResNet conv at 512x512
    ("norm", 64, 3, 6, 512, 32, None),            # GN-SiLU-conv_out
    ("conv", 4, 64, 64, 64, 0, None),             # TAESD conv_in
    ("norm", 256, 256, 24, 20, 32, 2**18),        # SD VAE / lite ResNets
    ("upsample", 512, 512, 12, 10, 0, 2**19),     # SD VAE upsamplers
    ("norm", 512, 256, 20, 16, 32, 2**19),
    ("conv", 320, 320, 16, 16, 0, 2**18),         # SD UNet level 0 (conv_in, downsampler: stride 2 below)
    ("upsample", 640, 640, 8, 8, 0, None),        # SD UNet upsamplers
]


@pytest.mark.parametrize("form, C, O, H, W, groups, block", DECODER_CONVS,
                         ids=[f"{f}-{c}-{o}-{h}x{w}" for f, c, o, h, w, *_ in DECODER_CONVS])
@pytest.mark.parametrize("im2col", ["chosen", "rows", "taps"])
@by_dtype
def test_decoder_conv_shapes_against_torch(dtype, im2col, form, C, O, H, W, groups, block):
    """The fast forms at the shapes the models run, against torch's float64 conv of the same (float64-cast) input.
    Bound: any summation order of K = C*9 (+ 4 for summed taps and the bias) products has error <= (K + 5) u
    sum |x w| (u the unit roundoff; Higham's gamma_K); the norm's error enters as in the test above."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(C + O + H)
    x = randn(rng, (1, C, H, W), dtype)
    w = randn(rng, (O, C, 3, 3), dtype, 1 / math.sqrt(9 * C))
    p = {"weight": w, "bias": randn(rng, (O,), dtype)}
    norm = {"weight": 1 + randn(rng, (C,), dtype, 0.3), "bias": randn(rng, (C,), dtype, 0.3)}
    with pytest.MonkeyPatch.context() as m:
        if block is not None:
            m.setattr(ops, "CONV_BLOCK_BYTES", block)
            m.setattr(ops, "CONV_MIN_COLUMNS", 1)
        m.setattr(ops, "UPSAMPLE_MIN_PIXELS", 0)                     # the phase form at every size here
        if im2col != "chosen":
            m.setattr(ops, "ROWS_MIN_PIXELS_PER_CHANNEL", 0 if im2col == "rows" else 2**62)
        if form == "conv":
            out = ops.conv2d(x, p, padding=1, stride=2 if C == 320 else 1)
        elif form == "upsample":
            out = ops.upsample_conv2d(x, p, scale=2, padding=1)
        else:
            out = ops.norm_silu_conv2d(x, norm, p, groups=groups, eps=1e-6, padding=1)
    t = lambda a: torch.from_numpy(np.asarray(a, np.float64))                           # noqa: E731
    a = t(x)
    if form == "upsample":
        a = F.interpolate(a, scale_factor=2, mode="nearest")
    elif form == "norm":
        a = F.silu(F.group_norm(a, groups, t(norm["weight"]), t(norm["bias"]), 1e-6))
    conv = lambda inp, wt, bias: F.conv2d(inp, wt, bias, padding=1, stride=2 if C == 320 else 1).numpy()  # noqa
    ref = conv(a, t(w), t(p["bias"]))
    bound = conv(a.abs(), t(np.abs(w)), t(np.abs(p["bias"])))                           # sum |x w|
    u = np.finfo(dtype).eps / 2
    tol = (9 * C + 5) * u
    if form == "norm":                        # + the activation's own error, RTOL * (max|act| + 1) per value
        bound += conv(torch.ones_like(a) * (a.abs().max() + 1), t(np.abs(w)), None) * RTOL[dtype] / tol
    with torch.no_grad():
        check(f"{form} {C}->{O} at {H}x{W}", out, ref, dtype, tol, bound)


def test_conv2d_rejects_mismatched_channels():
    x = np.zeros((1, 4, 5, 5), np.float32)
    with pytest.raises(ValueError, match="channels"):
        ops.conv2d(x, {"weight": np.zeros((6, 3, 3, 3), np.float32)}, groups=1)
    with pytest.raises(ValueError, match="groups=2"):
        ops.conv2d(x, {"weight": np.zeros((3, 2, 3, 3), np.float32)}, groups=2)   # 3 outputs, 2 groups


# ---- normalisation -----------------------------------------------------------------------------------
def normalise_ref(vals, eps):
    """(v - mean) / sqrt(biased var + eps) for one list of values."""
    mean = math.fsum(vals) / len(vals)
    var = math.fsum((v - mean) ** 2 for v in vals) / len(vals)
    return [(v - mean) / math.sqrt(var + eps) for v in vals]


def group_norm_ref(x, w, b, groups, eps):
    B, C = x.shape[:2]
    g = x.astype(np.float64).reshape(B, groups, -1)               # channels of a group are contiguous
    y = np.array([[normalise_ref(g[n, i].tolist(), eps) for i in range(groups)] for n in range(B)])
    y = y.reshape(B, C, -1)
    return (y * w.astype(np.float64)[:, None] + b.astype(np.float64)[:, None]).reshape(x.shape)


eps_values = st.sampled_from([1e-6, 1e-5, 1e-2, 1.0])               # 1.0 exposes eps placed outside the sqrt


@st.composite
def group_norm_cases(draw):
    """Groups of >= 8 values with |mean| / std <= 4, so float32 centring loses at most a few bits
    (a group of 2 nearly equal values would make the normalisation itself ill-conditioned)."""
    groups, per_group = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    spatial = draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=4))
    assume(per_group * math.prod(spatial) >= 8)
    return dict(B=draw(st.integers(1, 2)), groups=groups, C=groups * per_group, spatial=spatial,
                eps=draw(eps_values), offset=draw(st.floats(-2, 2)), amp=draw(st.floats(0.5, 4)))


@by_dtype
@given(seed=seeds, c=group_norm_cases())
def test_group_norm_matches_loop(dtype, seed, c):
    rng = np.random.default_rng(seed)
    x = (c["offset"] + randn(rng, (c["B"], c["C"]) + c["spatial"], np.float64, c["amp"])).astype(dtype)
    w, b = randn(rng, (c["C"],), dtype), randn(rng, (c["C"],), dtype)
    y = ops.group_norm(x, {"weight": w, "bias": b}, c["groups"], c["eps"])
    ref = group_norm_ref(x, w, b, c["groups"], c["eps"])
    check("group_norm", y, ref, dtype, RTOL[dtype])
    # The fused GN-SiLU is SiLU of the same normalised values (float64 formula of silu on the float64 reference).
    fused = ops.group_norm(x, {"weight": w, "bias": b}, c["groups"], c["eps"], silu=True)
    assert fused.dtype == dtype and y.dtype == dtype
    check("group_norm silu", fused, ref / (1 + np.exp(-ref)), dtype, RTOL[dtype], np.max(np.abs(ref)) + 1)


@by_dtype
@given(seed=seeds, c=group_norm_cases())
def test_group_norm_groups_have_zero_mean_unit_variance(dtype, seed, c):
    """Before the affine (weight 1, bias 0): each (sample, group) has mean 0 and variance v / (v + eps)."""
    rng = np.random.default_rng(seed)
    x = (c["offset"] + randn(rng, (c["B"], c["C"]) + c["spatial"], np.float64, c["amp"])).astype(dtype)
    ones = {"weight": np.ones(c["C"], dtype), "bias": np.zeros(c["C"], dtype)}
    y = ops.group_norm(x, ones, c["groups"], c["eps"])
    assert y.dtype == dtype
    groups = y.astype(np.float64).reshape(c["B"], c["groups"], -1)  # statistics of the output, taken in float64
    v = x.astype(np.float64).reshape(c["B"], c["groups"], -1).var(axis=-1)
    # The statistics are rounded back to `dtype` only so that check() can compare them in that dtype's terms.
    check("group_norm mean", groups.mean(axis=-1).astype(dtype), np.zeros_like(v), dtype, RTOL[dtype], 1.0)
    check("group_norm var", groups.var(axis=-1).astype(dtype), v / (v + c["eps"]), dtype, RTOL[dtype], 1.0)


@by_dtype
@given(seed=seeds, lead=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3), D=st.one_of(st.just(1), st.integers(8, 32)),
       eps=eps_values, offset=st.floats(-2, 2), amp=st.floats(0.5, 4))
def test_layer_norm_matches_loop(dtype, seed, lead, D, eps, offset, amp):
    """Rows of 1 (output = bias) or >= 8 values, for the conditioning reason given at group_norm_cases."""
    rng = np.random.default_rng(seed)
    x = (offset + randn(rng, lead + (D,), np.float64, amp)).astype(dtype)
    w, b = randn(rng, (D,), dtype), randn(rng, (D,), dtype)
    rows = x.astype(np.float64).reshape(-1, D).tolist()
    ref = np.array([normalise_ref(r, eps) for r in rows]).reshape(x.shape) * w.astype(np.float64) + b
    check("layer_norm", ops.layer_norm(x, {"weight": w, "bias": b}, eps), ref, dtype, RTOL[dtype])


@by_dtype
@given(seed=seeds, c=group_norm_cases(), silu=st.booleans())
def test_group_norm_equals_its_plain_formula(dtype, seed, c, silu):
    """The in-place fast form (x - mean scaled by w / sqrt(var + eps), SiLU in place) and ops.group_norm_reference
    ((x - mean) / sqrt(var + eps) * w + b): both two-pass, so they differ by a few roundings of O(|y|) values."""
    rng = np.random.default_rng(seed)
    x = (c["offset"] + randn(rng, (c["B"], c["C"]) + c["spatial"], np.float64, c["amp"])).astype(dtype)
    p = {"weight": randn(rng, (c["C"],), dtype), "bias": randn(rng, (c["C"],), dtype)}
    plain = ops.group_norm_reference(x, p, c["groups"], c["eps"], silu=silu)
    assert plain.dtype == dtype
    fast = ops.group_norm(x, p, c["groups"], c["eps"], silu=silu)
    check("group_norm == group_norm_reference", fast, plain, dtype, RTOL[dtype], np.max(np.abs(plain)) + 1)


@by_dtype
@given(seed=seeds, lead=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3), D=st.integers(8, 32), eps=eps_values,
       offset=st.floats(-2, 2), amp=st.floats(0.5, 4))
def test_layer_norm_equals_its_plain_formula(dtype, seed, lead, D, eps, offset, amp):
    rng = np.random.default_rng(seed)
    x = (offset + randn(rng, lead + (D,), np.float64, amp)).astype(dtype)
    p = {"weight": randn(rng, (D,), dtype), "bias": randn(rng, (D,), dtype)}
    plain = ops.layer_norm_reference(x, p, eps)
    assert plain.dtype == dtype
    check("layer_norm == layer_norm_reference", ops.layer_norm(x, p, eps), plain, dtype, RTOL[dtype])


class _Unrounded:
    """A rounding policy that rounds nothing: under it an op runs exactly its plain formula (R = identity)."""
    norm_statistics = "two-pass"

    def __init__(self):
        self.points = []

    def __call__(self, x, point):
        self.points.append(point)
        return x


def test_emulation_runs_the_plain_formula_with_the_policys_rounding():
    """Inside ops.rounding(R) the ops with rounding points inside compute their plain formula, calling R at each
    named point (bit for bit the reference when R rounds nothing); outside, the fast forms run."""
    rng = np.random.default_rng(0)
    q, k, v = randn(rng, (2, 5, 8), np.float32), randn(rng, (2, 3, 8), np.float32), randn(rng, (2, 3, 4), np.float32)
    x, p = randn(rng, (2, 8, 3, 3), np.float32), {"weight": randn(rng, (8,), np.float32), "bias": np.ones(8, np.float32)}
    mask = randn(rng, (5, 3), np.float32)
    R = _Unrounded()
    with ops.rounding(R):
        assert ops.active_rounding() is R
        emulated = [ops.attention(q, k, v, 2, mask=mask), ops.group_norm(x, p, 4, 1e-5, silu=True),
                    ops.layer_norm(q, p, 1e-5)]
    assert ops.active_rounding() is None
    plain = [ops.attention_reference(q, k, v, 2, mask=mask), ops.group_norm_reference(x, p, 4, 1e-5, silu=True),
             ops.layer_norm_reference(q, p, 1e-5)]
    for a, b in zip(emulated, plain):
        assert np.array_equal(a, b)
    assert R.points == ["attention.in"] * 4 + ["attention.qk", "attention.scores", "attention.masked",
                                              "attention.probs", "attention.out", "group_norm.in", "norm.mean",
                                              "norm.centred", "norm.square", "norm.var", "group_norm.out", "silu.out",
                                              "layer_norm.in", "norm.mean", "norm.centred", "norm.square",
                                              "norm.var", "layer_norm.out"]


# ---- elementwise activations -------------------------------------------------------------------------
def sigmoid_ref(z):
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


ACTIVATIONS = {                                                     # name: (mdref op, scalar definition)
    "silu": (ops.silu, lambda z: z * sigmoid_ref(z)),
    "quick_gelu": (ops.quick_gelu, lambda z: z * sigmoid_ref(1.702 * z)),
    "gelu": (ops.gelu, lambda z: 0.5 * z * (1 + math.erf(z / math.sqrt(2)))),
    "gelu_tanh": (lambda x: ops.gelu(x, approximate="tanh"),
                  lambda z: 0.5 * z * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))),
    "relu": (ops.relu, lambda z: max(z, 0.0)),
}


def float_arrays(dtype, bound):
    """Arrays of any small shape, values anywhere in [-bound, bound] including 0, -0 and subnormals."""
    return hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
                      elements=st.floats(-bound, bound, width=np.dtype(dtype).itemsize * 8))


def spread_values(seed, dtype, n=64):
    """Random values of magnitudes 1e-3 .. 1e2, both signs: hypothesis favours 'simple' floats, these are not."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * 10 ** rng.uniform(-3, 2, n)).astype(dtype)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
@by_dtype
@given(data=st.data(), seed=seeds)
def test_activation_matches_formula(dtype, name, data, seed):
    op, ref = ACTIVATIONS[name]
    for x in (data.draw(float_arrays(dtype, 200.0)), spread_values(seed, dtype)):
        y = np.asarray(op(x))
        expected = np.array([ref(float(z)) for z in x.reshape(-1)]).reshape(x.shape)
        if name == "relu":
            assert y.dtype == dtype and np.array_equal(y, expected)  # exact: a comparison, no arithmetic
            continue
        # These are x * g(x), g in [0, 1]: accuracy is relative to |x| (for x << 0 the formula itself cancels);
        # results below the smallest normal number have no relative precision, hence the `tiny` floor in check.
        check(name, y, expected, dtype, ELEM[dtype], np.abs(x.astype(np.float64)))


@by_dtype
@given(data=st.data(), seed=seeds)
def test_erf_matches_math_erf(dtype, data, seed):
    for x in (data.draw(float_arrays(dtype, 8.0)), spread_values(seed, dtype) / 10):
        y = ops.erf(x)
        assert y.dtype == dtype and y.shape == x.shape
        ref = np.array([math.erf(float(z)) for z in x.reshape(-1)]).reshape(x.shape)
        ulps = 2 if dtype == np.float64 else 1                      # see the module docstring
        err = np.abs(y.astype(np.float64) - ref)
        bound = ulps * np.spacing(np.abs(ref).astype(dtype)).astype(np.float64)
        _note("erf (ulps)", dtype, np.max(err / bound, initial=0.0) * ulps)
        assert np.all(err <= bound), f"erf: {err.max():.3g} above {ulps} ulp"


def test_erf_on_a_dense_grid_and_special_values():
    """All four branches of the msun approximation (|x| < 0.84375, < 1.25, < 1/0.35, < 6) and beyond."""
    x = np.concatenate([np.linspace(-7, 7, 20001), [0.84375, 1.25, 1 / 0.35, 6.0, 1e-300, -1e-300, 5e-324]])
    err = np.abs(ops.erf(x) - np.array([math.erf(z) for z in x])) / np.spacing(np.abs(np.array([math.erf(z) for z in x])))
    _note("erf grid (ulps)", np.float64, err.max())
    assert err.max() <= 2
    special = ops.erf(np.array([np.inf, -np.inf, np.nan, 0.0]))
    assert special[0] == 1 and special[1] == -1 and np.isnan(special[2]) and special[3] == 0


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        ops.gelu(np.zeros(3), approximate="sigmoid")


# ---- softmax -----------------------------------------------------------------------------------------
def softmax_ref(x, axis):
    """exp(x_i - max) / sum_j exp(x_j - max) along `axis`, one row at a time."""
    rows = np.moveaxis(x.astype(np.float64), axis, -1)
    out = []
    for r in rows.reshape(-1, rows.shape[-1]).tolist():
        m = max(r)
        e = [math.exp(v - m) for v in r]
        total = math.fsum(e)
        out.append([v / total for v in e])
    return np.moveaxis(np.array(out).reshape(rows.shape), -1, axis)


@st.composite
def softmax_cases(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=6))
    return dict(shape=shape, axis=draw(st.integers(-len(shape), len(shape) - 1)), amp=draw(st.floats(0.1, 8)),
                masked=draw(st.floats(0, 0.7)))


def masked_scores(rng, c, dtype):
    """Scores plus an additive mask: the dtype's most negative value at random places (as causal_mask uses)."""
    x = randn(rng, c["shape"], dtype, c["amp"])
    hide = rng.random(c["shape"]) < c["masked"]
    return (x + np.where(hide, np.finfo(dtype).min, 0).astype(dtype)).astype(dtype), hide


@by_dtype
@given(seed=seeds, c=softmax_cases())
def test_softmax_matches_formula_rows_sum_to_one(dtype, seed, c):
    rng = np.random.default_rng(seed)
    x, hide = masked_scores(rng, c, dtype)
    p = ops.softmax(x, axis=c["axis"])
    # |x - max| <= ~50 here, so exp's argument carries <= 50 eps of error: RTOL, relative to each probability.
    check("softmax", p, softmax_ref(x, c["axis"]), dtype, RTOL[dtype], softmax_ref(x, c["axis"]))
    n = x.shape[c["axis"]]
    check("softmax row sums", p.sum(axis=c["axis"]), np.ones(np.delete(x.shape, c["axis"] % x.ndim)), dtype,
          n * np.finfo(dtype).eps, 1.0)                              # n roundings of numbers <= 1
    visible = (~hide).any(axis=c["axis"], keepdims=True)
    assert np.all(p[hide & visible] == 0), "a masked entry got weight in a row with unmasked entries"


@by_dtype
@given(seed=seeds, c=softmax_cases(), shift=st.integers(-64, 64))
def test_softmax_shift_invariance_is_exact(dtype, seed, c, shift):
    """softmax(x + c) == softmax(x) for a per-row constant c. With x on a 2^-10 grid in [-8, 8] and integer c,
    x + c and (x + c) - max(x + c) are exact in both dtypes, so the results must agree bit for bit."""
    rng = np.random.default_rng(seed)
    x = (np.round(rng.uniform(-8, 8, c["shape"]) * 1024) / 1024).astype(dtype)
    row_shift = rng.integers(-64, 65, np.delete(x.shape, c["axis"] % x.ndim))
    shifted = (x + np.expand_dims(row_shift + shift, c["axis"])).astype(dtype)
    p = ops.softmax(x, axis=c["axis"])
    assert p.dtype == dtype and np.array_equal(ops.softmax(shifted, axis=c["axis"]), p)


# ---- attention ---------------------------------------------------------------------------------------
def attention_ref(q, k, v, heads, mask, weighting, scale, bound=False):
    """Per batch, head and query: s_j = scale * q.k_j + mask_j; w = softmax(s) or relu(s) / Tk; out = sum w_j v_j.
    bound=True returns instead sum_j |w_j| |v_j| (relu: with |s_j| <= scale sum|q k| + |mask|), the magnitude
    that rounding errors scale with."""
    B, Tq, D = q.shape
    Tk, d, dv = k.shape[1], D // heads, v.shape[2] // heads
    scale = 1 / math.sqrt(d) if scale is None else scale
    m = np.broadcast_to(np.zeros(()) if mask is None else mask.astype(np.float64), (B, heads, Tq, Tk)).tolist()
    ql, kl, vl = q.tolist(), k.tolist(), v.tolist()
    out = np.zeros((B, Tq, heads * dv))
    for b in range(B):
        for h in range(heads):
            hq, hv = slice(h * d, (h + 1) * d), slice(h * dv, (h + 1) * dv)
            for i in range(Tq):
                dots = [math.fsum(a * c for a, c in zip(ql[b][i][hq], kl[b][j][hq])) for j in range(Tk)]
                s = [scale * dot + m[b][h][i][j] for j, dot in enumerate(dots)]
                if weighting == "softmax":
                    top = max(s)
                    e = [math.exp(sj - top) for sj in s]
                    w = [ej / math.fsum(e) for ej in e]
                elif bound:                                       # masked keys (-1e30 and below) weigh exactly 0
                    absd = [math.fsum(abs(a * c) for a, c in zip(ql[b][i][hq], kl[b][j][hq])) for j in range(Tk)]
                    w = [0.0 if m[b][h][i][j] < -1e30 else (abs(scale) * absd[j] + abs(m[b][h][i][j])) / Tk
                         for j in range(Tk)]
                else:
                    w = [max(sj, 0.0) / Tk for sj in s]
                for c in range(dv):
                    vals = [abs(vl[b][j][hv][c]) if bound else vl[b][j][hv][c] for j in range(Tk)]
                    out[b, i, h * dv + c] = math.fsum(wj * vj for wj, vj in zip(w, vals))
    return out


@st.composite
def attention_cases(draw):
    return dict(B=draw(st.integers(1, 2)), heads=draw(st.integers(1, 3)), d=draw(st.integers(1, 4)),
                dv=draw(st.integers(1, 4)), Tq=draw(st.integers(1, 6)), Tk=draw(st.integers(1, 6)),
                weighting=draw(st.sampled_from(["softmax", "relu"])),
                mask=draw(st.sampled_from([None, "keys", "full", "dense"])),
                scale=draw(st.sampled_from([None, 0.3, 1.0])), amp=draw(st.floats(0.25, 2)))


def attention_inputs(rng, c, dtype):
    """q, k, v and a mask. 'keys': key padding [B, 1, 1, Tk]; 'full': per query [B, 1, Tq, Tk]; both use the
    dtype's most negative value and leave at least one key visible per row. 'dense': an additive [Tq, Tk] bias."""
    B, H, Tq, Tk = c["B"], c["heads"], c["Tq"], c["Tk"]
    q = randn(rng, (B, Tq, H * c["d"]), dtype, c["amp"])
    k = randn(rng, (B, Tk, H * c["d"]), dtype, c["amp"])
    v = randn(rng, (B, Tk, H * c["dv"]), dtype)
    if c["mask"] is None:
        return q, k, v, None
    if c["mask"] == "dense":
        return q, k, v, randn(rng, (Tq, Tk), dtype)
    rows = (B, 1, 1) if c["mask"] == "keys" else (B, 1, Tq)
    hide = rng.random(rows + (Tk,)) < 0.5
    np.put_along_axis(hide, rng.integers(0, Tk, rows + (1,)), False, axis=-1)   # one visible key per row
    return q, k, v, np.where(hide, np.finfo(dtype).min, 0).astype(dtype)


def attention_call(q, k, v, c, mask):
    return ops.attention(q, k, v, c["heads"], mask=mask, weighting=c["weighting"], scale=c["scale"])


@by_dtype
@given(seed=seeds, c=attention_cases())
def test_attention_matches_per_head_loop(dtype, seed, c):
    rng = np.random.default_rng(seed)
    q, k, v, mask = attention_inputs(rng, c, dtype)
    ref = attention_ref(q, k, v, c["heads"], mask, c["weighting"], c["scale"])
    scale = np.max(attention_ref(q, k, v, c["heads"], mask, c["weighting"], c["scale"], bound=True))
    # Scores are short dot products (d <= 4) of O(1) values: errors relative to sum |w| |v| stay within RTOL.
    check(f"attention {c['weighting']}", attention_call(q, k, v, c, mask), ref, dtype, RTOL[dtype], scale)


@by_dtype
@given(seed=seeds, c=attention_cases())
def test_attention_equals_its_plain_formula(dtype, seed, c):
    """The chunked kernel (one reused score buffer, q pre-scaled) and ops.attention_reference (all scores at once)."""
    rng = np.random.default_rng(seed)
    q, k, v, mask = attention_inputs(rng, c, dtype)
    plain = ops.attention_reference(q, k, v, c["heads"], mask=mask, weighting=c["weighting"], scale=c["scale"])
    assert plain.dtype == dtype
    scale = np.max(attention_ref(q, k, v, c["heads"], mask, c["weighting"], c["scale"], bound=True))
    with pytest.MonkeyPatch.context() as m:                          # several query chunks, as at 512x512
        m.setattr(ops, "SCORES_BYTES", 1)
        check("attention chunked == reference", attention_call(q, k, v, c, mask), plain, dtype, RTOL[dtype], scale)
    check("attention == reference", attention_call(q, k, v, c, mask), plain, dtype, RTOL[dtype], scale)


@by_dtype
@given(seed=seeds, c=attention_cases())
def test_softmax_attention_is_stable_for_huge_scores(dtype, seed, c):
    """Integer q, k in [-30, 30] with scale 1 give exact scores up to 3600, where exp overflows in both dtypes
    unless the row maximum is subtracted first. Exact scores leave only exp/sum roundings: RTOL."""
    c = dict(c, weighting="softmax", scale=1.0)
    rng = np.random.default_rng(seed)
    _, _, v, mask = attention_inputs(rng, c, dtype)
    q = rng.integers(-30, 31, (c["B"], c["Tq"], c["heads"] * c["d"])).astype(dtype)
    k = rng.integers(-30, 31, (c["B"], c["Tk"], c["heads"] * c["d"])).astype(dtype)
    out = attention_call(q, k, v, c, mask)
    ref = attention_ref(q, k, v, c["heads"], mask, "softmax", 1.0)
    scale = np.max(attention_ref(q, k, v, c["heads"], mask, "softmax", 1.0, bound=True))
    check("attention huge scores", out, ref, dtype, RTOL[dtype], scale)


@by_dtype
@given(seed=seeds, c=softmax_cases(), offset=st.sampled_from([-1e4, 1e3, 1e4]))
def test_softmax_is_stable_for_huge_logits(dtype, seed, c, offset):
    """exp(1e4) overflows in both dtypes: only max-subtraction keeps this finite. All entries of a row lie within
    a factor 2 of the row maximum, so x - max is exact (Sterbenz) and the unshifted test's RTOL applies."""
    x = (randn(np.random.default_rng(seed), c["shape"], np.float64, c["amp"]) + offset).astype(dtype)
    p = ops.softmax(x, axis=c["axis"])
    check("softmax huge logits", p, softmax_ref(x, c["axis"]), dtype, RTOL[dtype], softmax_ref(x, c["axis"]))


def _permute_mask(mask, perm, axis):
    if mask is None or mask.ndim < -axis or mask.shape[axis] == 1:
        return mask
    return np.take(mask, perm, axis=axis)


@by_dtype
@given(seed=seeds, c=attention_cases())
def test_attention_permutation_symmetries(dtype, seed, c):
    """Permuting queries permutes the output rows; permuting keys and values together changes nothing."""
    rng = np.random.default_rng(seed)
    q, k, v, mask = attention_inputs(rng, c, dtype)
    out = attention_call(q, k, v, c, mask)
    pq, pk = rng.permutation(c["Tq"]), rng.permutation(c["Tk"])
    out_q = attention_call(q[:, pq], k, v, c, _permute_mask(mask, pq, -2))
    out_k = attention_call(q, k[:, pk], v[:, pk], c, _permute_mask(mask, pk, -1))
    scale = np.max(attention_ref(q, k, v, c["heads"], mask, c["weighting"], c["scale"], bound=True))
    # Row order changes only the matmul's row blocking; key order changes the order of the value sums.
    check("attention query perm", out_q, out[:, pq], dtype, RTOL[dtype], scale)
    check("attention key/value perm", out_k, out, dtype, RTOL[dtype], scale)


@by_dtype
@given(seed=seeds, c=attention_cases())
def test_softmax_attention_key_padding_equals_dropping_keys(dtype, seed, c):
    """A key masked with the dtype's most negative value contributes exactly nothing (softmax weighting)."""
    c = dict(c, weighting="softmax", mask="keys", B=1)
    rng = np.random.default_rng(seed)
    q, k, v, mask = attention_inputs(rng, c, dtype)
    keep = mask[0, 0, 0] == 0
    out = attention_call(q, k, v, c, mask)
    dropped = attention_call(q, k[:, keep], v[:, keep], c, None)
    check("attention padding==dropping", out, dropped, dtype, RTOL[dtype], np.max(np.abs(v)))


@by_dtype
@given(seed=seeds, c=attention_cases())
def test_causal_attention_ignores_the_future(dtype, seed, c):
    """With causal_mask, output i depends on keys/values 0..i only: rewriting later ones changes nothing."""
    c = dict(c, Tk=c["Tq"])
    rng = np.random.default_rng(seed)
    q, k, v, _ = attention_inputs(rng, dict(c, mask=None), dtype)
    mask = ops.causal_mask(c["Tq"], dtype)
    out = attention_call(q, k, v, c, mask)
    i = int(rng.integers(0, c["Tq"]))
    k2, v2 = k.copy(), v.copy()
    k2[:, i + 1:], v2[:, i + 1:] = randn(rng, k2[:, i + 1:].shape, dtype), randn(rng, v2[:, i + 1:].shape, dtype)
    out2 = attention_call(q, k2, v2, c, mask)
    assert out.dtype == dtype and np.array_equal(out[:, :i + 1], out2[:, :i + 1])  # hidden keys weigh exactly 0


@by_dtype
@given(seed=seeds, c=attention_cases())
def test_relu_attention_of_negative_scores_is_zero(dtype, seed, c):
    """q > 0 and k < 0 elementwise make every score negative, so relu weighting returns exactly 0."""
    c = dict(c, weighting="relu", mask=None, scale=None)
    rng = np.random.default_rng(seed)
    q, k, v, _ = attention_inputs(rng, c, dtype)
    out = attention_call(np.abs(q) + dtype(0.01), -np.abs(k) - dtype(0.01), v, c, None)
    assert out.dtype == dtype and np.all(out == 0)


@by_dtype
@given(seed=seeds, c=attention_cases())
def test_attention_query_chunks_equal_one_chunk(dtype, seed, c):
    """SCORES_BYTES only bounds the score buffer: one query per chunk gives the unchunked result."""
    rng = np.random.default_rng(seed)
    q, k, v, mask = attention_inputs(rng, c, dtype)
    whole = attention_call(q, k, v, c, mask)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ops, "SCORES_BYTES", 1)
        chunked = attention_call(q, k, v, c, mask)
    scale = np.max(attention_ref(q, k, v, c["heads"], mask, c["weighting"], c["scale"], bound=True))
    check("attention chunked==whole", chunked, whole, dtype, RTOL[dtype], scale)


def test_attention_rejects_bad_arguments():
    q = np.zeros((1, 2, 6), np.float32)
    with pytest.raises(ValueError, match="heads"):
        ops.attention(q, q, q, 4)
    with pytest.raises(ValueError, match="weighting"):
        ops.attention(q, q, q, 2, weighting="sigmoid")


@by_dtype
@given(t=st.integers(1, 9))
def test_causal_mask(dtype, t):
    m = ops.causal_mask(t, dtype)
    assert m.dtype == dtype and m.shape == (t, t)
    for i in range(t):
        for j in range(t):
            assert m[i, j] == (0 if j <= i else np.finfo(dtype).min)


# ---- upsample ----------------------------------------------------------------------------------------
@by_dtype
@given(seed=seeds, shape=hnp.array_shapes(min_dims=4, max_dims=4, max_side=4), s=st.integers(1, 3))
def test_upsample_nearest_matches_loop(dtype, seed, shape, s):
    x = randn(np.random.default_rng(seed), shape, dtype)
    y = ops.upsample_nearest2d(x, s)
    B, C, H, W = shape
    ref = np.array([[[[x[b, c, i // s, j // s] for j in range(W * s)] for i in range(H * s)]
                     for c in range(C)] for b in range(B)], dtype=dtype)
    assert y.dtype == dtype and np.array_equal(y, ref)               # a copy: exact


@by_dtype
@given(seed=seeds, shape=hnp.array_shapes(min_dims=4, max_dims=4, max_side=4))
def test_upsample_then_average_pool_is_identity(dtype, seed, shape):
    """2x2 mean of four equal values is exact ((a + a + a + a) / 4 only rescales by powers of two)."""
    x = randn(np.random.default_rng(seed), shape, dtype)
    B, C, H, W = shape
    pooled = ops.upsample_nearest2d(x, 2).reshape(B, C, H, 2, W, 2).mean(axis=(3, 5), dtype=dtype)
    assert pooled.dtype == dtype and np.array_equal(pooled, x)


# ---- timestep embedding ------------------------------------------------------------------------------
def timestep_embedding_ref(t, dim, flip, shift, scale, max_period):
    """diffusers get_timestep_embedding, written out: freq_i = exp(-ln(max_period) i / (half - shift)),
    arg = scale t freq_i, emb = [sin(arg), cos(arg)] (or [cos, sin] when flipped), one zero column if dim is odd."""
    half = dim // 2
    rows = []
    for tb in t.tolist():
        args = [scale * (tb * math.exp(-math.log(max_period) * i / (half - shift))) for i in range(half)]
        sin, cos = [math.sin(a) for a in args], [math.cos(a) for a in args]
        rows.append((cos + sin if flip else sin + cos) + [0.0] * (dim % 2))
    return np.array(rows).reshape(len(t), dim)


@st.composite
def timestep_cases(draw):
    return dict(dim=draw(st.integers(4, 40)), flip=draw(st.booleans()), shift=draw(st.sampled_from([0, 1])),
                scale=draw(st.sampled_from([1.0, 0.25, 2.0])), max_period=draw(st.sampled_from([10000, 100])),
                t=draw(st.lists(st.floats(0, 1000), min_size=1, max_size=4)))


def timestep_tolerance(t, scale, dtype):
    """sin/cos of an argument of size |scale t| computed in `dtype` carry ~|scale t| * eps of absolute error
    (the argument is rounded, and exp's relative error is multiplied by t); measured <= ~0.6 eps, bound 4 eps."""
    return (4 * np.finfo(dtype).eps * (1 + np.abs(t.astype(np.float64)) * scale))[:, None]


@by_dtype
@given(c=timestep_cases())
def test_timestep_embedding_matches_diffusers_formula(dtype, c):
    t = np.array(c["t"], dtype=dtype)
    kw = dict(flip_sin_to_cos=c["flip"], downscale_freq_shift=c["shift"], scale=c["scale"], max_period=c["max_period"])
    emb = ops.timestep_embedding(t, c["dim"], dtype=dtype, **kw)
    ref = timestep_embedding_ref(t, c["dim"], c["flip"], c["shift"], c["scale"], c["max_period"])
    check("timestep_embedding", emb, ref, dtype, 1.0, timestep_tolerance(t, c["scale"], dtype))
    if c["dim"] % 2:
        assert np.all(emb[:, -1] == 0)


@by_dtype
@settings(max_examples=15)
@given(c=timestep_cases())
def test_timestep_embedding_matches_diffusers_code(dtype, c):
    """Also against diffusers' own function. It always computes in float32, so both of our dtypes are held
    to float32's tolerance here."""
    torch = pytest.importorskip("torch")
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = np.array(c["t"], dtype=np.float32)
    ref = embeddings.get_timestep_embedding(torch.from_numpy(t), c["dim"], flip_sin_to_cos=c["flip"],
                                            downscale_freq_shift=c["shift"], scale=c["scale"],
                                            max_period=c["max_period"]).numpy()
    emb = ops.timestep_embedding(t.astype(dtype), c["dim"], flip_sin_to_cos=c["flip"], downscale_freq_shift=c["shift"],
                                 scale=c["scale"], max_period=c["max_period"], dtype=dtype)
    assert emb.dtype == dtype
    check("timestep_embedding vs diffusers", emb.astype(np.float32), ref, np.float32, 1.0,
          timestep_tolerance(t, c["scale"], np.float32))
