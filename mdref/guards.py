"""The guards of a pipeline run: its arguments checked, its memory estimated, before anything is allocated; and
the errors a run raises (InputError, MemoryLimitError, NonFiniteError). Pipeline.run calls `check_run` first.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from . import ops, sampler
from .precision import finfo_max
from .sampler import describe_noise_shapes, noise_shapes
from .trace import nonfinite_counts

__all__ = ["InputError", "MemoryLimitError", "NonFiniteError", "StageFailed", "Stages", "Request", "check_run",
           "check_prompts", "check_seed_arg", "check_memory",
           "estimate_peak_bytes",
           "memory_limit", "parse_bytes", "SEED_LIMIT", "ACTIVATION_COPIES", "GUIDANCE_RANGE", "uses_guidance"]

SEED_LIMIT = 2 ** 64                    # seeds are what PCG64 takes as one 64-bit word: 0 <= seed < 2**64
GUIDANCE_RANGE = (0.0, 50.0)            # a guidance scale outside it is a typo (published models use 0 to ~15)


def uses_guidance(guidance_scale):
    """Whether a run does classifier-free guidance: a scale > 1, diffusers' rule (do_classifier_free_guidance);
    None, 0 and 1 mean one conditional UNet call per step."""
    return guidance_scale is not None and guidance_scale > 1
GIB = 2 ** 30


class InputError(ValueError):
    """A bad argument to Pipeline.run (or __call__ / check): ``argument`` names it (the API's parameter name),
    ``problem`` says what was expected and what was found; str(e) is "ARGUMENT PROBLEM"."""

    def __init__(self, argument, problem):
        super().__init__(f"{argument} {problem}")
        self.argument, self.problem = argument, problem


class MemoryLimitError(InputError):
    """The run would need more memory than the limit (see estimate_peak_bytes and memory_limit); raised before
    anything is allocated. ``needed`` and ``limit`` are in bytes."""

    def __init__(self, problem, needed, limit):
        super().__init__("image size", problem)
        self.needed, self.limit = needed, limit


class NonFiniteError(ValueError):
    """A stage's output held NaN or Inf. ``stage`` is the stage ("text encoder", "UNet", "decoder"), ``counts``
    its output's (NaN, Inf, size); ``point`` is the first trace point that held a non-finite value when the run was
    repeated under a trace (None if the repeat found none), ``point_counts`` that point's (NaN, Inf, size)."""

    def __init__(self, stage, counts, point, point_counts):
        self.stage, self.counts, self.point, self.point_counts = stage, counts, point, point_counts
        where = (f"first non-finite point: {point} ({_counts(point_counts)})" if point is not None
                 else "no traced point held one when the run was repeated")
        super().__init__(f"the {stage}'s output holds non-finite values ({_counts(counts)}); {where} "
                         f"(allow_nonfinite=True keeps going)")


def _short(x, n=60):
    r = repr(x)
    kind = "" if isinstance(x, (str, int, float)) else f" ({type(x).__name__})"
    return (r if len(r) <= n else r[:n] + "...") + kind


def _size(n):
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _counts(c):
    return f"{c[0]} NaN, {c[1]} Inf of {c[2]}"


class Stages:
    """The stages of one run: `with stages("unet", "UNet") as s:` times the block into timings["unet"], and
    s.finite(x) checks a stage output for NaN / Inf (when `checked`), raising StageFailed naming the stage."""

    def __init__(self, checked):
        self.checked, self.timings, self.current = checked, {}, None

    @contextmanager
    def __call__(self, name, label=None):
        self.current, t0 = label or name, time.perf_counter()
        try:
            yield self
        finally:
            self.timings[name] = time.perf_counter() - t0

    def finite(self, x):
        if self.checked and not np.isfinite(x).all():
            raise StageFailed(self.current, nonfinite_counts(x))
        return x


class StageFailed(Exception):
    """Raised inside a checked run at the first non-finite stage output (Pipeline.run turns it into NonFiniteError)."""

    def __init__(self, stage, counts):
        self.stage, self.counts = stage, counts


def is_int(x):
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_finite_real(x):
    if not isinstance(x, (int, float, np.integer, np.floating)) or isinstance(x, (bool, np.bool_)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:                    # an int beyond float's range
        return False


# ---- the memory estimate ----------------------------------------------------------------------------------------
ACTIVATION_COPIES = 6   # arrays as large as a layer's widest one alive at once: input, norm, activation, padded copy,
                        # conv output, residual sum


def _widest(tree):
    """The largest input or output width among the weights of a parameter subtree (Linear [out, in], conv
    [out, in/groups, kh, kw]); 0 for a tree without matrices."""
    if isinstance(tree, dict):
        return max((_widest(v) for v in tree.values()), default=0)
    shape = np.shape(tree)
    return max(shape[:2]) if len(shape) >= 2 else 0


def _subtree(params, path):
    """The parameter subtree at a dotted path ("down_blocks.1")."""
    for part in path.split("."):
        params = params[part]
    return params


def _scores_bytes(batch, heads, tq, tk, itemsize):
    """The score buffer ops.attention allocates: a chunk of query rows of at most ops.SCORES_BYTES (one row at
    least)."""
    row = batch * heads * tk * itemsize
    return max(1, min(tq, ops.SCORES_BYTES // row)) * row


def _im2col_bytes(batch, channels, height, width, itemsize, k=3):
    """The column block ops.conv2d builds for a k x k conv: rows of at most ops.IM2COL_BYTES (one row at least)."""
    row = batch * channels * k * k * width * itemsize
    return max(1, min(height, ops.IM2COL_BYTES // row)) * row


def estimate_peak_bytes(pipe, batch, height, width, steps=1, *, text_tokens=None, unet_width=1):
    """About how many bytes a run of `pipe` at this size holds at its peak; computed from the specs and the weight
    shapes only (nothing is allocated). With s the dtype's size, h w the latent size, and for each block of the UNet
    and the decoder its widest layer C (largest weight dimension) at the largest resolution the block touches (Hb Wb):

        peak = weights + noise + max(UNet, decoder)
        weights = parameters * s                                 (already loaded; counted so the total is the process)
        noise   = steps * B * C_latent * h * w * (8 + s)         (sampling_noise draws [steps, B, C, h, w] in float64,
                                                                  then casts)
        UNet    = max over blocks of (ACTIVATION_COPIES * B * C * Hb * Wb * s + scores + im2col) + skips
        decoder = max over blocks of (ACTIVATION_COPIES * B * C * Hb * Wb * s + scores + im2col)
        scores  = the attention score chunk (ops.SCORES_BYTES, or one query row B * heads * N * s if larger;
                  N = Hb * Wb pixels for self-attention, the text length for cross-attention)
        im2col  = the 3x3 conv column block (ops.IM2COL_BYTES, or one output row B * 9 C * Wb * s if larger)
        skips   = the UNet's skip connections, all alive at the mid block

    text_tokens: the text length the cross-attention sees (default: the tokenizer's max_length); unet_width: how many
    latents wide the UNet's input is (DreamLite's in-context input: 2, the latent beside its zero twin).
    The text encoder's [B, T, D] activations are small beside these and not counted. This is an estimate for a
    refusal, meant to be on the high side (ACTIVATION_COPIES = 6): it says when a size cannot fit, not a budget
    to plan against to the byte."""
    s = np.dtype(pipe.dtype).itemsize
    u = pipe.decoder.upsampling_factor
    h, w = height // u, width // u
    weights = pipe.num_parameters()["total"] * s
    noise = steps * batch * pipe.unet.spec.in_channels * h * w * (8 + s)

    def block(channels, hb, wb, heads=0, tokens=0):
        act = ACTIVATION_COPIES * batch * channels * hb * wb * s
        scores = _scores_bytes(batch, heads, hb * wb, tokens, s) if heads else 0
        return act + scores + _im2col_bytes(batch, channels, hb, wb, s)

    spec, params = pipe.unet.spec, pipe.unet.params
    text = pipe.tokenizer.max_length if text_tokens is None else text_tokens
    w_latent, w = w, w * unet_width                     # the UNet's input width; the decoder's stays w_latent
    unet, skips, scale = 0, batch * spec.down[0].channels * h * w * s if spec.down else 0, 1
    for st in spec.stages:                              # each stage's layer list, in execution order
        if st.of("upsample"):                           # an up block at its output resolution, the others at their input
            scale = max(1, scale // 2)
        hb, wb, t = max(1, h // scale), max(1, w // scale), st.transformer
        tokens = hb * wb if t is not None and t.kind == "full" else text
        unet = max(unet, block(_widest(_subtree(params, st.name)), hb, wb, t.heads if t else 0, tokens))
        for layer in st.layers:
            scale *= 2 if layer.kind == "downsample" else 1
            if layer.skip == "push":                    # a skip connection, alive until its up block
                skips += batch * layer.c_out * max(1, h // scale) * max(1, w // scale) * s
    unet += skips

    dspec, dparams = pipe.decoder.spec, pipe.decoder.params["decoder"]
    w = w_latent
    if pipe.decoder.config.kind == "kl":
        decoder = block(_widest(dparams["mid_block"]), h, w, 1 if dspec.mid_attention else 0, h * w)
        for i in range(len(dspec.widths)):
            f = 2 ** min(i + 1, len(dspec.widths) - 1)                         # after the block's upsampler
            decoder = max(decoder, block(_widest(dparams["up_blocks"][str(i)]), h * f, w * f))
    else:                                                                      # TAESD: one width throughout
        decoder = block(_widest(dparams["layers"]), height, width)
    return int(weights + noise + max(unet, decoder))


def parse_bytes(text, what="max_memory"):
    """'8G', '512MiB', '1.5 GB', '1000000' -> bytes (K, M, G, T are powers of 1024). Raises InputError naming `what`."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    factor = 1
    if t and t[-1] in "KMGT":
        factor, t = 1024 ** ("KMGT".index(t[-1]) + 1), t[:-1]
    try:
        value = float(t) * factor
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise InputError(what, f"must be a size such as 8G, 512M or a number of bytes, found {text!r}")
    return int(value)


def memory_limit(max_memory=None):
    """The memory budget of a run, in bytes, and where it comes from: `max_memory` (bytes or a size string such as
    '8G'), else the environment variable MDREF_MAX_MEMORY, else the machine's physical memory
    (os.sysconf SC_PHYS_PAGES * SC_PAGE_SIZE), else no limit (None)."""
    if max_memory is not None:
        if is_int(max_memory) and max_memory > 0:
            return int(max_memory), "max_memory"
        return parse_bytes(max_memory), "max_memory"
    env = os.environ.get("MDREF_MAX_MEMORY")
    if env:
        return parse_bytes(env, "MDREF_MAX_MEMORY"), "MDREF_MAX_MEMORY"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory"
    except (AttributeError, ValueError, OSError):
        return None, "no limit"



@dataclass(frozen=True)
class Request:
    """One run's arguments after check_run: what Pipeline.execute computes from, checked once."""
    prompts: tuple                  # the prompts, one per batch row
    negative_prompt: str | None     # None: not given (SD: ""; SDXL: zeros with force_zeros_for_empty_prompt)
    seed: int                       # the noise stream's seed (mdref.sampler.sampling_noise)
    noise: np.ndarray | None        # the caller's noise, [B, C, h, w] or [steps, B, C, h, w], or None
    timesteps: tuple                # the UNet's timesteps in call order (mdref.sampler.schedule)
    shape: tuple                    # the latent [B, C, h, w]
    guidance_scale: float | None    # classifier-free guidance runs when > 1
    allow_nonfinite: bool = False   # keep going when a stage's output holds NaN / Inf


def check_prompts(prompt, negative_prompt=None):
    """The prompts as a list: prompt a str or a non-empty list / tuple of str; it and negative_prompt (None: not
    given) valid Unicode (no surrogate code points: they come from bytes that were not UTF-8). Raises InputError
    naming the argument."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise InputError("prompt", f"must be a string or a non-empty list of strings, found {_short(prompt)}")
    negatives = [] if negative_prompt is None else [negative_prompt]
    for name, texts in (("prompt", prompts), ("negative_prompt", negatives)):
        for text in texts:
            if not isinstance(text, str):
                raise InputError(name, f"must be a string, found {_short(text)}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = text[e.start]
                raw = f" (the byte 0x{ord(bad) - 0xDC00:02x})" if 0xDC80 <= ord(bad) <= 0xDCFF else ""
                raise InputError(name, f"is not valid UTF-8 text: {bad!r} at position {e.start}{raw}") from None
    return prompts


def check_seed_arg(seed):
    """A noise seed: an int (Python or NumPy, not bool) with 0 <= seed < 2**64, else InputError("seed", ...)."""
    if not is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise InputError("seed", f"must be an integer with 0 <= seed < 2**64, found {_short(seed)}")


def check_run(pipe, prompt, *, seed=0, noise=None, steps=1, height=None, width=None, guidance_scale=None,
              negative_prompt=None, max_memory=None, timesteps=None, allow_nonfinite=False):
    """Refuse bad arguments of Pipeline.run() before anything is computed or allocated; returns the Request.

    prompt: a str or a non-empty list / tuple of str, valid Unicode (no surrogate code points: they come from
    bytes that were not UTF-8); seed: an int (Python or NumPy, not bool) with 0 <= seed < 2**64; steps: an int
    in [1, num_train_timesteps] (lcm / tcd: at most original_inference_steps); timesteps: None or custom timesteps
    (mdref.sampler.schedule: strictly decreasing ints in [0, num_train_timesteps); steps then 1 or their number;
    not for euler_ancestral); height, width: None (the default size) or positive multiples of size_factor;
    guidance_scale: None or a real number in GUIDANCE_RANGE (classifier-free guidance runs when it is > 1);
    negative_prompt: None (not given) or a str, non-empty only with guidance; noise: None or a real floating-point
    array of shape [B, C, h, w] or [steps, B, C, h, w] (sampler.noise_shapes) whose values are finite in the compute
    dtype. The whole run must fit in the memory limit (memory_limit(max_memory); estimate_peak_bytes). Raises
    InputError (a ValueError) naming the argument, or MemoryLimitError."""
    prompts = check_prompts(prompt, negative_prompt)
    check_seed_arg(seed)
    T = pipe.scheduler.num_train_timesteps
    if not is_int(steps) or not 1 <= steps <= T:
        raise InputError("steps", f"must be an integer from 1 to num_train_timesteps = {T}, found {_short(steps)}")
    try:
        timesteps = tuple(int(t) for t in sampler.schedule(pipe.sampler_spec, steps, timesteps))
    except ValueError as e:                              # "steps ..." or "timesteps ...": the argument named first
        name, problem = str(e).split(" ", 1)
        raise InputError(name, problem) from None
    steps = len(timesteps)
    lo, hi = GUIDANCE_RANGE
    if guidance_scale is not None and not (_is_finite_real(guidance_scale) and lo <= guidance_scale <= hi):
        raise InputError("guidance_scale", f"must be a number in [{lo:g}, {hi:g}] (or None: no guidance; "
                         f"guidance runs when it is > 1), found {_short(guidance_scale)}")
    if negative_prompt and not uses_guidance(guidance_scale):
        raise InputError("negative_prompt", f"applies only with classifier-free guidance (a guidance scale > 1), "
                         f"found guidance {guidance_scale!r}")
    shape = pipe.latent_shape(len(prompts), height, width)
    if noise is not None:
        _check_noise(pipe, noise, shape, steps)
        noise = np.array(noise)                                          # a memory map is read once, after the checks
    check_memory(pipe, len(prompts), shape, steps, max_memory)
    return Request(tuple(prompts), negative_prompt, int(seed), noise, timesteps, shape,
                   None if guidance_scale is None else float(guidance_scale), bool(allow_nonfinite))

def _check_noise(pipe, noise, shape, steps):
    try:
        noise = np.asarray(noise)                                        # a memory map stays one: nothing read
    except (ValueError, TypeError) as e:
        raise InputError("noise", f"must be a real floating-point array, found {type(noise).__name__} ({e})") \
            from None
    if noise.dtype.kind != "f":
        raise InputError("noise", f"must be a real floating-point array, found dtype {noise.dtype}")
    if noise.shape not in noise_shapes(shape, steps):
        raise InputError("noise", f"has shape {noise.shape}, expected {describe_noise_shapes(shape, steps)}")
    n_nan, n_inf, size = nonfinite_counts(noise)
    if n_nan or n_inf:
        raise InputError("noise", f"holds non-finite values ({n_nan} NaN, {n_inf} Inf of {size})")
    big = float(np.abs(noise).max()) if noise.size else 0.0
    if big > finfo_max(pipe.compute.name):
        raise InputError("noise", f"holds values beyond {pipe.compute.name}'s range (max |x| {big:.3g})")

def check_memory(pipe, batch, shape, steps, max_memory, **layout):
    """Raise MemoryLimitError when a run of `pipe` on latents `shape` [B, C, h, w] would not fit in
    memory_limit(max_memory); `layout`: estimate_peak_bytes' text_tokens / unet_width."""
    limit, source = memory_limit(max_memory)
    u = pipe.decoder.upsampling_factor
    H, W = shape[2] * u, shape[3] * u
    needed = estimate_peak_bytes(pipe, batch, H, W, steps, **layout)
    if limit is not None and needed > limit:
        raise MemoryLimitError(
            f"{H}x{W} (batch {batch}, {steps} step{'s' if steps > 1 else ''}, {np.dtype(pipe.dtype).name}) needs "
            f"about {_size(needed)}, more than the {_size(limit)} limit ({source})", needed, limit)
