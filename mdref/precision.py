"""Emulated low precision: float16 and bfloat16 computed in NumPy the way a GPU or NPU kernel computes them.

Arrays stay float32 ("carriers") whose values are representable in the low dtype. The rounding model (the table
is docs/precision.md; this docstring is its source):

* weights are rounded to the dtype once, when a component is built;
* every op of `mdref.ops` rounds what it reads (its array inputs) and what it returns, to nearest, ties to even;
  a value beyond the dtype's largest finite value becomes +-inf there, as on a device;
* reductions inside an op accumulate in float32: the matmul / conv sums (products of two rounded values are exact
  in float32), the bias added to that sum, the norm's sums, the softmax's max, exp and sum;
* elementwise arithmetic between ops (residual adds, the sampler's update, the latent scaling) is evaluated in
  float32 on rounded values and rounded when the next op reads it or a trace records it, as a fused elementwise
  kernel does (one rounding instead of one per elementary operation);
* attention: scores s = q k^T * scale rounded (+ mask, rounded), softmax in float32 from the rounded scores,
  probabilities rounded, then P v accumulated in float32 and rounded;
* norms (GroupNorm, LayerNorm), one pass, as decomposed graphs and fused NPU kernels compute them:
  mean = R(sum(x) / n), meansq = R(sum(R(x^2)) / n), var = max(R(meansq - R(mean^2)), 0),
  y = R((x - mean) / sqrt(var + eps) * w + b) with the last line in float32 (R = round to the dtype).
  So a square beyond the range (|x| > 256 in float16) makes meansq inf, and with |mean| > 256 var is inf - inf.

Overrides (per op class and per component) reproduce what runtimes do:

* ``upcast``: ``attention`` - scores and softmax in float32, only the probabilities and the output rounded
  (diffusers' upcast_attention / upcast_softmax, PyTorch's fused CPU / CUDA attention); ``norm`` - the norm in
  float32, two-pass, only its output rounded (PyTorch's GroupNorm / LayerNorm kernels); a component name
  (``text_encoder``, ``unet``, ``sampler``, ``decoder``) - that component computes in float32 on its rounded
  weights (diffusers' force_upcast of the VAE, Core ML's float32 VAE).
* ``downcast``: ``norm`` - the norm's sums rounded to the dtype too (accumulation in the dtype: a sum beyond the
  range overflows even when the mean would not).

An override names what it changes; every other rounding point stays. Outside a `using` block nothing is rounded
and the ops run their float32 / float64 fast forms unchanged (one context-variable lookup per op).
"""

from __future__ import annotations

import contextvars
import functools
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

__all__ = ["LOW_DTYPES", "UPCASTS", "DOWNCASTS", "COMPONENTS", "Precision", "PrecisionError", "round_to",
           "finfo_max", "using", "active", "rounded", "emulated", "parse_dtype", "parse_classes"]

LOW_DTYPES = ("float16", "bfloat16")
COMPONENTS = ("text_encoder", "unet", "sampler", "decoder")
UPCASTS = {
    "attention": "scores q k^T * scale and the softmax in float32; probabilities and output rounded "
                 "(diffusers upcast_attention / upcast_softmax; PyTorch's fused attention on CPU and CUDA)",
    "norm": "GroupNorm / LayerNorm in float32, two-pass statistics, output rounded (PyTorch's norm kernels)",
    "text_encoder": "the text encoder in float32 on its rounded weights",
    "unet": "the UNet in float32 on its rounded weights",
    "sampler": "the sampler's update in float32 (its output is rounded when the decoder reads it)",
    "decoder": "the decoder in float32 on its rounded weights (diffusers force_upcast, Core ML's float32 VAE)",
}
DOWNCASTS = {
    "norm": "the norm's sums rounded to the dtype as well (statistics accumulated in the low dtype)",
}
QUERY_CHUNK = 4096              # the emulated attention's queries per block (its float32 score buffers stay bounded)
_MAX = {"float16": float(np.finfo(np.float16).max), "bfloat16": float.fromhex("0x1.fep127")}


class PrecisionError(ValueError):
    """An unknown compute dtype or override name."""


def finfo_max(dtype):
    """The largest finite value of float16 / bfloat16 / a numpy float dtype."""
    return _MAX[dtype] if dtype in _MAX else float(np.finfo(dtype).max)


def round_to(x, dtype):
    """x rounded to nearest-even in `dtype` ('float16' or 'bfloat16'), returned as a new float32 array.
    Out of range -> +-inf; NaN stays NaN. bfloat16 is rounded by hand on the float32 bits (numpy has no
    bfloat16): add 0x7FFF plus the lowest kept bit, clear the 16 low bits. A float64 input is rounded to float32
    first (the carrier), so a float64 value can be rounded twice."""
    x = np.array(x, dtype=np.float32, copy=True)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    if dtype != "bfloat16":
        raise PrecisionError(f"round_to: dtype must be one of {', '.join(LOW_DTYPES)}, got {dtype!r}")
    nan = np.isnan(x)
    bits = x.view(np.uint32)
    bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))   # no wrap: only NaNs lie that high
    bits &= np.uint32(0xFFFF0000)
    if nan.any():
        x[nan] = np.nan
    return x


@dataclass(frozen=True)
class Precision:
    """A low compute dtype and its overrides (see the module docstring)."""
    dtype: str
    upcast: frozenset = frozenset()
    downcast: frozenset = frozenset()

    def __post_init__(self):
        if self.dtype not in LOW_DTYPES:
            raise PrecisionError(f"dtype {self.dtype!r}: emulated dtypes are {', '.join(LOW_DTYPES)}")
        object.__setattr__(self, "upcast", parse_classes(self.upcast, UPCASTS, "upcast"))
        object.__setattr__(self, "downcast", parse_classes(self.downcast, DOWNCASTS, "downcast"))
        both = self.upcast & self.downcast
        if both:
            raise PrecisionError(f"{', '.join(sorted(both))}: cannot be both upcast and downcast")

    def round(self, x):
        return round_to(x, self.dtype)

    def within(self, component):
        """The policy inside `component`: None (plain float32) when that component is upcast."""
        return None if component in self.upcast else self

    @property
    def max(self):
        return _MAX[self.dtype]

    def describe(self):
        parts = [self.dtype] + [f"upcast {c}" for c in sorted(self.upcast)]
        return ", ".join(parts + [f"downcast {c}" for c in sorted(self.downcast)])


def parse_classes(value, known, what):
    """'a,b' / ['a', 'b'] / None -> frozenset, each name checked against `known`."""
    if value is None:
        return frozenset()
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PrecisionError(f"{what} {', '.join(unknown)}: unknown (known: {', '.join(known)})")
    return frozenset(names)


def parse_dtype(dtype):
    """(carrier numpy dtype, low dtype name or None) for float32 / float64 / float16 / bfloat16 (a name, a numpy
    dtype or np.float16). Raises PrecisionError naming the value otherwise."""
    if isinstance(dtype, str) and dtype.strip().lower() == "bfloat16":
        return np.dtype(np.float32), "bfloat16"
    try:
        d = np.dtype(dtype)
    except TypeError:
        d = None
    if d == np.float16:
        return np.dtype(np.float32), "float16"
    if d in (np.float32, np.float64):
        return d, None
    raise PrecisionError(f"dtype must be float32, float64, float16 or bfloat16, got {dtype!r}")


# ---- the active policy ------------------------------------------------------------------------------------
_ACTIVE = contextvars.ContextVar("mdref_precision", default=None)


@contextmanager
def using(policy):
    """Compute the block under `policy` (a Precision, or None for plain float32 / float64)."""
    token = _ACTIVE.set(policy)
    try:
        yield policy
    finally:
        _ACTIVE.reset(token)


def active():
    """The Precision in force, or None."""
    return _ACTIVE.get()


def rounded(x):
    """x rounded to the active dtype (a copy), or x itself when none is active or x is not a float array."""
    policy = _ACTIVE.get()
    if policy is None or not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        return x
    return policy.round(x)


def emulated(low=None):
    """Decorator for an op of mdref.ops: outside `using` the op runs as written; inside, its float array
    arguments are rounded, and either `low(policy, *args, **kwargs)` (the op's emulated form, for ops with
    rounding points inside) runs or the op runs on the rounded arguments and its result is rounded."""
    def wrap(op):
        @functools.wraps(op)
        def run(*args, **kwargs):
            policy = _ACTIVE.get()
            if policy is None:
                return op(*args, **kwargs)
            args = [rounded(a) for a in args]
            if low is not None:
                return low(policy, *args, **kwargs)
            return policy.round(op(*args, **kwargs))
        run.plain = op
        return run
    return wrap


# ---- the emulated forms of the ops with rounding points inside ------------------------------------------------
def attention(policy, q, k, v, heads, *, mask=None, weighting="softmax", scale=None):
    """ops.attention under `policy`: s = R(q k^T * scale) [+ R(mask), R], softmax in float32, P = R(.),
    out = R(P v); with upcast attention the scores are not rounded. QUERY_CHUNK queries at a time."""
    R = policy.round
    keep = "attention" in policy.upcast
    B, Tq, D = q.shape
    Tk = k.shape[1]
    d, dv = D // heads, v.shape[2] // heads
    scale = d ** -0.5 if scale is None else scale
    heads_of = lambda t, n: t.reshape(B, t.shape[1], heads, n).transpose(0, 2, 1, 3)   # [B, H, T, n]
    qh, kt, vh = heads_of(q, d), heads_of(k, d).transpose(0, 1, 3, 2), heads_of(v, dv)
    mask = None if mask is None else R(mask)
    out = np.empty((B, heads, Tq, dv), np.float32)
    for q0 in range(0, Tq, QUERY_CHUNK):
        q1 = q0 + QUERY_CHUNK
        s = (qh[:, :, q0:q1] @ kt) * np.float32(scale)                 # [B, H, c, Tk], float32 sums
        s = s if keep else R(s)
        if mask is not None:
            s = s + np.broadcast_to(mask, (B, heads, Tq, Tk))[:, :, q0:q1]
            s = s if keep else R(s)
        with np.errstate(invalid="ignore"):                                # inf - inf: NaN, as on a device
            if weighting == "softmax":
                e = np.exp(s - s.max(axis=-1, keepdims=True))
                p = R(e / e.sum(axis=-1, keepdims=True))
            else:
                p = R(np.maximum(s, 0) / np.float32(Tk))
        out[:, :, q0:q1] = R(p @ vh)                                   # [B, H, c, dv]
    return out.transpose(0, 2, 1, 3).reshape(B, Tq, heads * dv)


def _normalise(policy, g, eps):
    """The statistics and normalisation of a norm over the last axis of g (float32, already rounded)."""
    R = policy.round
    if "norm" in policy.upcast:                                            # float32, two-pass
        mean = g.mean(axis=-1, keepdims=True)
        var = np.square(g - mean).mean(axis=-1, keepdims=True)
    else:                                                                  # one pass, rounded statistics
        sums = lambda t: R(t.sum(axis=-1, keepdims=True)) if "norm" in policy.downcast \
            else t.sum(axis=-1, keepdims=True)
        n = np.float32(g.shape[-1])
        with np.errstate(over="ignore", invalid="ignore"):
            mean = R(sums(g) / n)
            meansq = R(sums(R(np.square(g))) / n)
            var = np.maximum(R(meansq - R(np.square(mean))), 0)            # max(NaN, 0) stays NaN
    with np.errstate(invalid="ignore", divide="ignore"):
        return (g - mean) / np.sqrt(var + np.float32(eps))


def group_norm(policy, x, p, groups, eps, *, silu=False):
    """ops.group_norm under `policy` (norm model above); a fused SiLU reads the rounded norm output."""
    B, C = x.shape[:2]
    y = _normalise(policy, x.reshape(B, groups, -1), eps).reshape(B, C, -1)
    y = policy.round(y * p["weight"][:, None] + p["bias"][:, None]).reshape(x.shape)
    if silu:
        from .ops import silu as silu_op                                   # here: ops imports this module
        y = policy.round(silu_op.plain(y))
    return y


def layer_norm(policy, x, p, eps):
    """ops.layer_norm under `policy` (norm model above)."""
    return policy.round(_normalise(policy, x, eps) * p["weight"] + p["bias"])
