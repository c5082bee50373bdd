"""Emulated low precision: float16 and bfloat16 computed in NumPy the way a GPU or NPU kernel computes them. This
module is the policy (what is rounded where); the mechanism is in mdref.ops, whose ops call ``R(x, point)`` at
the rounding points named below and run their plain formulas while a policy is in force (``using``).

Arrays stay float32 ("carriers") whose values are representable in the low dtype. The rounding model (the table
is docs/precision.md; this docstring is its source):

* weights are rounded to the dtype once, when a component is built;
* every op of `mdref.ops` rounds what it reads (``<op>.in``: its array inputs) and what it returns
  (``<op>.out``), to nearest, ties to even; a value beyond the dtype's largest finite value becomes +-inf there,
  as on a device;
* reductions inside an op accumulate in float32: the matmul / conv sums (products of two rounded values are exact
  in float32), the bias added to that sum, the norm's sums (``norm.sum``), the softmax's max, exp and sum;
* elementwise arithmetic between ops (residual adds, the sampler's update, the latent scaling) is evaluated in
  float32 on rounded values and rounded when the next op reads it or a trace records it (``value``), as a fused
  elementwise kernel does (one rounding instead of one per elementary operation);
* attention (`ops.attention_reference`): ``s = R(q k^T * scale)`` (``attention.scores``; the sum q k^T itself,
  ``attention.qk``, stays float32), + mask, rounded (``attention.masked``), softmax in float32 from the rounded
  scores, probabilities rounded (``attention.probs``), then P v accumulated in float32 and rounded
  (``attention.out``);
* norms (GroupNorm, LayerNorm; `ops.normalised`), one pass, as decomposed graphs and fused NPU kernels compute
  them: mean = R(sum(x) / n) (``norm.mean``), meansq = R(sum(R(x^2)) / n) (``norm.square``, ``norm.meansq``),
  var = max(R(meansq - R(mean^2)), 0) (``norm.mean_squared``, ``norm.var``), y = R((x - mean) / sqrt(var + eps)
  * w + b) with the last line in float32 (``group_norm.out`` / ``layer_norm.out``; a fused SiLU is ``silu.out``).
  So a square beyond the range (|x| > 256 in float16) makes meansq inf, and with |mean| > 256 var is inf - inf.

Overrides (per op class and per component) reproduce what runtimes do:

* ``upcast``: ``attention`` - scores and softmax in float32, only the probabilities and the output rounded
  (diffusers' upcast_attention / upcast_softmax, PyTorch's fused CPU / CUDA attention); ``norm`` - the norm in
  float32, two-pass, only its output rounded (PyTorch's GroupNorm / LayerNorm kernels); a component name
  (``text_encoder``, ``unet``, ``sampler``, ``decoder``) - that component computes in float32 on its rounded
  weights (diffusers' force_upcast of the VAE, Core ML's float32 VAE).
* ``downcast``: ``norm`` - the norm's sums rounded to the dtype too (accumulation in the dtype: a sum beyond the
  range overflows even when the mean would not).

An override names what it changes (`UPCAST_POINTS`, `DOWNCAST_POINTS`); every other rounding point stays. A
profile (`PROFILES`) is a runtime's way of computing as a small table of changes to this model: which points it
rounds or keeps in float32, and its norm statistics ("qk-first": ``R(R(q k^T) * scale)`` and float32 norm statistics;
"float32-islands": ONNX Runtime's CPU provider, convs, GroupNorms, activations and the softmax in float32). Outside
a `using` block nothing is rounded and the ops run their float32 / float64 fast forms unchanged (one
context-variable lookup per op).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .ops import EXACT, active_rounding, attention_reference, rounded, rounding

__all__ = ["LOW_DTYPES", "UPCASTS", "DOWNCASTS", "COMPONENTS", "POINTS", "PROFILES", "DEFAULT_PROFILE", "Profile",
           "Precision", "Compute", "compute", "PrecisionError", "round_to", "finfo_max", "using", "active", "rounded",
           "parse_dtype", "parse_classes", "attention_logits"]

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
_OPS = ("linear", "conv2d", "group_norm", "layer_norm", "rms_norm", "relu", "silu", "gelu", "quick_gelu", "softmax",
        "attention", "upsample_nearest2d")
_NORM = ("norm.sum", "norm.mean", "norm.centred", "norm.square", "norm.meansq", "norm.mean_squared", "norm.var")
# Every rounding point of mdref.ops (R(x, point)) and of a run ("value": what a trace records, what the pipeline
# hands from one component to the next).
POINTS = frozenset([f"{op}.{io}" for op in _OPS for io in ("in", "out")] + list(_NORM) + ["value"]
                   + ["attention.qk", "attention.scores", "attention.masked", "attention.probs"])
FLOAT32_POINTS = frozenset({"attention.qk", "norm.sum"})      # not rounded by default: sums before their next step
UPCAST_POINTS = {"attention": {"attention.qk", "attention.scores", "attention.masked"}, "norm": set(_NORM)}
DOWNCAST_POINTS = {"norm": {"norm.sum"}}
# What ONNX Runtime's CPU provider keeps in float32 in a float16 graph (docs/precision.md, "float32-islands": read
# off the Casts it inserts into mdref's own float16 export): every point of these ops and of the norm statistics.
ISLANDS = ({f"{op}.{io}" for op in ("conv2d", "group_norm", "relu", "silu", "gelu", "quick_gelu", "softmax",
                                    "upsample_nearest2d") for io in ("in", "out")}
           | set(_NORM) | {"attention.qk", "attention.scores", "attention.masked", "attention.probs"})


@dataclass(frozen=True)
class Profile:
    """How one kind of runtime computes in the low dtype, as a change to mdref's model: the rounding points it rounds
    that the model keeps in float32 (`rounds`), those it keeps in float32 that the model rounds (`float32`), and its
    norm statistics. The overrides apply on top of a profile."""
    about: str
    rounds: frozenset = frozenset()
    float32: frozenset = frozenset()
    norm_statistics: str = "one-pass"


PROFILES = {
    "qk-first": Profile("q k^T rounded before the scale, R(R(q k^T) * scale), and norm statistics in float32 "
                        "(two-pass, only the norm's output rounded): what most measured runtimes do (tinygrad and "
                        "ExecuTorch / XNNPACK round q k^T first; their norms, and ONNX Runtime's, keep float32 "
                        "statistics; benchmarks/float16-profiles.md); the default",
                        rounds=frozenset({"attention.qk"}), float32=frozenset(_NORM), norm_statistics="two-pass"),
    "fused": Profile("the scale applied before q k^T is rounded, R(q k^T * scale), as fused attention kernels do "
                     "(q pre-scaled), and one-pass norm statistics rounded to the dtype, as decomposed graphs and "
                     "fused NPU kernels compute them (mdref's model before profiles)"),
    "float32-islands": Profile("ONNX Runtime on CPU running a float16 graph: ops without a float16 CPU kernel (Conv, "
                               "Gemm / MatMul, InstanceNormalization, the softmax, Sigmoid / SiLU, Resize) run in "
                               "float32 behind inserted Casts and neighbouring islands merge, so values are rounded "
                               "only where a float16 op reads them (the Reshape / Transpose / Split / Concat of the "
                               "attention projections and skip connections, LayerNormalization): linear outputs, "
                               "attention inputs and output, LayerNorm input and output; convs, GroupNorms (two-pass "
                               "float32 statistics), activations, scores and probabilities stay float32",
                               float32=frozenset(ISLANDS), norm_statistics="two-pass"),
}
DEFAULT_PROFILE = "qk-first"
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
    """A low compute dtype and its overrides (see the module docstring): the rounding policy R(x, point) that
    mdref.ops applies at its rounding points."""
    dtype: str
    upcast: frozenset = frozenset()
    downcast: frozenset = frozenset()
    profile: str = DEFAULT_PROFILE  # a key of PROFILES
    float32_points: frozenset = field(init=False, repr=False, compare=False)   # the points left unrounded

    def __post_init__(self):
        if self.dtype not in LOW_DTYPES:
            raise PrecisionError(f"dtype {self.dtype!r}: emulated dtypes are {', '.join(LOW_DTYPES)}")
        if self.profile not in PROFILES:
            raise PrecisionError(f"profile {self.profile!r}: unknown (known: {', '.join(PROFILES)})")
        object.__setattr__(self, "upcast", parse_classes(self.upcast, UPCASTS, "upcast"))
        object.__setattr__(self, "downcast", parse_classes(self.downcast, DOWNCASTS, "downcast"))
        both = self.upcast & self.downcast
        if both:
            raise PrecisionError(f"{', '.join(sorted(both))}: cannot be both upcast and downcast")
        prof = PROFILES[self.profile]
        kept = (FLOAT32_POINTS - prof.rounds | prof.float32).union(*(UPCAST_POINTS.get(c, ()) for c in self.upcast))
        object.__setattr__(self, "float32_points",
                           frozenset(kept.difference(*(DOWNCAST_POINTS[c] for c in self.downcast))))

    def __call__(self, x, point):
        """x rounded to the dtype at rounding point `point` (a copy), or x itself where the policy keeps float32."""
        return x if point in self.float32_points else round_to(x, self.dtype)

    @property
    def norm_statistics(self):
        """How the norms' statistics are computed (mdref.ops.normalised): "two-pass" when upcast, else the
        profile's."""
        return "two-pass" if "norm" in self.upcast else PROFILES[self.profile].norm_statistics

    def round(self, x):
        return round_to(x, self.dtype)

    def within(self, component):
        """The policy inside `component`: None (plain float32) when that component is upcast."""
        return None if component in self.upcast else self

    @property
    def max(self):
        return _MAX[self.dtype]

    def describe(self):
        parts = [self.dtype] + ([f"profile {self.profile}"] if self.profile != DEFAULT_PROFILE else [])
        parts += [f"upcast {c}" for c in sorted(self.upcast)] + [f"downcast {c}" for c in sorted(self.downcast)]
        return ", ".join(parts)


@dataclass(frozen=True)
class Compute:
    """The compute dtype of a component or pipeline, parsed once (`compute`): its name, the numpy dtype its arrays
    have (float32 "carriers" when float16 / bfloat16 is emulated) and the rounding policy (None: plain float)."""
    name: str                       # "float32" | "float64" | "float16" | "bfloat16"
    carrier: np.dtype
    policy: Precision | None = None

    def describe(self):
        return self.name if self.policy is None else self.policy.describe()


class ComputesIn:
    """What a component or pipeline says of its `compute` (a Compute): `dtype` and `precision`."""

    @property
    def dtype(self):
        """The numpy dtype of the arrays (float32 when float16 / bfloat16 is emulated)."""
        return self.compute.carrier

    @property
    def precision(self):
        """The emulated float16 / bfloat16 rounding policy (Precision), or None for float32 / float64."""
        return self.compute.policy


def compute(dtype=np.float32, *, upcast=None, downcast=None, profile=None):
    """The one parser of a compute dtype: a name ("float32", "float64", "float16", "bfloat16"), a numpy dtype
    (np.float16 means emulated float16), a Precision, or a Compute (returned as it is), with the overrides and
    profile of an emulated dtype. Raises PrecisionError naming what is wrong (overrides or a profile with float32 /
    float64 included)."""
    given = [n for n, v in (("upcast", upcast), ("downcast", downcast), ("profile", profile)) if v]
    if isinstance(dtype, (Compute, Precision)):
        if given:
            raise PrecisionError(f"{', '.join(given)}: pass them inside the {type(dtype).__name__}, not beside it")
        return dtype if isinstance(dtype, Compute) else Compute(dtype.dtype, np.dtype(np.float32), dtype)
    carrier, low = parse_dtype(dtype)
    if low is None:
        if given:
            raise PrecisionError(f"{', '.join(given)}: apply to float16 and bfloat16, not {carrier.name}")
        return Compute(carrier.name, carrier)
    return Compute(low, carrier, Precision(low, upcast, downcast, profile or DEFAULT_PROFILE))


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


# ---- the policy in force (the mechanism is mdref.ops') ---------------------------------------------------
def using(policy):
    """Compute the block under `policy` (a Precision, or None for plain float32 / float64): ops.rounding."""
    return rounding(policy)


def active():
    """The Precision in force, or None."""
    return active_rounding()


def attention_logits(q, k, heads):
    """(q k^T, q k^T / sqrt(d)) per head, [B, H, Tq, Tk] each, as the policy in force holds them:
    ops.attention_reference on (q, k, k) read at its rounding points "attention.qk" and "attention.scores" (so under
    a profile that rounds q k^T the first is inf where |q k^T| > 65504, even when the scaled scores fit). The
    on-request points <attention>.qk / .scores of mdref.unet.attention (`mdref precision --scores`)."""
    policy, seen = active() or EXACT, {}

    class Reader:
        norm_statistics = policy.norm_statistics

        def __call__(self, x, point):
            x = policy(x, point)
            seen.setdefault(point, x)
            return x

    with np.errstate(all="ignore"):
        attention_reference(q, k, k, heads, R=Reader())
    return seen["attention.qk"], seen["attention.scores"]
