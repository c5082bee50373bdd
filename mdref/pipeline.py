"""Text -> image in four named stages: tokenize, encode the text, sample the latent, decode.

    ids     = tokenizer(prompts)                          # int64 [B, 77]
    context = text_encoder(ids)                           # [B, 77, D]
    x0      = sampler(unet, noise at t = T-1, context)    # [B, C, h, w], one UNet call by default
    image   = decoder(x0 / scaling_factor + shift_factor) # [B, 3, H, W] in [-1, 1]
    pixels  = round(clip((image + 1) / 2, 0, 1) * 255)    # uint8

MobileDiffusion (arXiv 2311.16567) sec. 3.3 samples in one step from pure noise; diffusers'
``StableDiffusionPipeline`` is the reference for the stage boundaries. Legend: B batch, D text width, C latent
channels, h w latent size, H W image size.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import ops, sampler
from .io.pipeline_folder import DEFAULT_MODEL_DIR, DEFAULT_MODEL_LABEL, load_folder, load_preset
from .io.safetensors import sha256_file
from .io.scheduler_config import scheduler_config_to_dict
from .trace import first_nonfinite, nonfinite_counts, record

__all__ = ["Pipeline", "Result", "to_pixels", "InputError", "MemoryLimitError", "NonFiniteError",
           "estimate_peak_bytes", "memory_limit", "parse_bytes"]

SEED_LIMIT = 2 ** 64                    # seeds are what PCG64 takes as one 64-bit word: 0 <= seed < 2**64
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
    return (r if len(r) <= n else r[:n] + "...") + ("" if isinstance(x, (str, int, float)) else f" ({type(x).__name__})")


def _size(n):
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _counts(c):
    return f"{c[0]} NaN, {c[1]} Inf of {c[2]}"


class _StageFailed(Exception):
    def __init__(self, stage, counts):
        self.stage, self.counts = stage, counts


def _is_int(x):
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


def _scores_bytes(batch, heads, tq, tk, itemsize):
    """The score buffer ops.attention allocates: a chunk of query rows of at most ops.SCORES_BYTES (one row at least)."""
    row = batch * heads * tk * itemsize
    return max(1, min(tq, ops.SCORES_BYTES // row)) * row


def _im2col_bytes(batch, channels, height, width, itemsize, k=3):
    """The column block ops.conv2d builds for a k x k conv: rows of at most ops.IM2COL_BYTES (one row at least)."""
    row = batch * channels * k * k * width * itemsize
    return max(1, min(height, ops.IM2COL_BYTES // row)) * row


def estimate_peak_bytes(pipe, batch, height, width, steps=1):
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

    The text encoder's [B, 77, D] activations are small beside these and not counted. This is an estimate for a
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
    text = 77
    unet, skips, scale = 0, batch * spec.down[0].channels * h * w * s if spec.down else 0, 1
    for i, st in enumerate(spec.down):                                         # at the block's input resolution
        hb, wb = max(1, h // scale), max(1, w // scale)
        tokens = hb * wb if st.transformer == "full" else text
        unet = max(unet, block(_widest(params["down_blocks"][str(i)]), hb, wb, st.heads if st.transformer != "none"
                               else 0, tokens))
        skips += len(st.resnets) * batch * st.channels * hb * wb * s
        if st.resample == "down":
            scale *= 2
            skips += batch * st.channels * max(1, h // scale) * max(1, w // scale) * s
    if spec.mid is not None:
        hb, wb = max(1, h // scale), max(1, w // scale)
        unet = max(unet, block(_widest(params["mid_block"]), hb, wb, spec.mid.heads, hb * wb))
    for i, st in enumerate(spec.up):                                           # at the block's output resolution
        if st.resample == "up":
            scale = max(1, scale // 2)
        hb, wb = max(1, h // scale), max(1, w // scale)
        tokens = hb * wb if st.transformer == "full" else text
        unet = max(unet, block(_widest(params["up_blocks"][str(i)]), hb, wb, st.heads if st.transformer != "none"
                               else 0, tokens))
    unet += skips

    dspec, dparams = pipe.decoder.spec, pipe.decoder.params["decoder"]
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
        if _is_int(max_memory) and max_memory > 0:
            return int(max_memory), "max_memory"
        return parse_bytes(max_memory), "max_memory"
    env = os.environ.get("MDREF_MAX_MEMORY")
    if env:
        return parse_bytes(env, "MDREF_MAX_MEMORY"), "MDREF_MAX_MEMORY"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "physical memory"
    except (AttributeError, ValueError, OSError):
        return None, "no limit"


def to_pixels(image):
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]: round(clip((x + 1) / 2, 0, 1) * 255); NaN -> 0 (only an
    allow_nonfinite run has one: casting NaN to uint8 is not defined)."""
    x = np.clip((np.nan_to_num(np.asarray(image, dtype=np.float64), nan=-1.0) + 1) / 2, 0, 1)
    return np.round(x * 255).astype(np.uint8).transpose(0, 2, 3, 1)


@dataclass
class Result:
    """Every intermediate of one pipeline call (what a golden bundle stores)."""
    prompts: list
    token_ids: np.ndarray          # int64 [B, 77]
    text_embeddings: np.ndarray    # [B, 77, D]
    noise: np.ndarray              # [B, C, h, w]
    timesteps: list                # the UNet timesteps, in call order
    x0: np.ndarray                 # clean latent [B, C, h, w] (before the decoder's scaling)
    image: np.ndarray              # decoder output [B, 3, H, W] in [-1, 1]
    pixels: np.ndarray             # uint8 [B, H, W, 3]
    timings: dict = field(default_factory=dict)

    def pil(self):
        from PIL import Image
        return [Image.fromarray(p) for p in self.pixels]


class Pipeline:
    """Tokenizer + text encoder + UNet + decoder + one-step sampler."""

    def __init__(self, tokenizer, text_encoder, unet, decoder, scheduler, *, source, untrained=False,
                 weight_files=(), path=None):
        self.tokenizer, self.text_encoder, self.unet, self.decoder = tokenizer, text_encoder, unet, decoder
        self.scheduler = scheduler            # mdref.io.SchedulerConfig
        self.source = source                  # as recorded in metadata: model path, "mdref:default" or "preset:NAME"
        self.path = path                      # the model folder (None for a preset)
        self.untrained = untrained
        self.weight_files = list(weight_files)
        self.last_timings = {}

    # ---- construction (the files and presets are read by mdref.io) ------------------------------------------
    @classmethod
    def from_pretrained(cls, path=None, dtype=np.float32):
        """A diffusers-style pipeline folder (model_index.json, tokenizer/, text_encoder/, unet/, vae/,
        scheduler/). None: the embedded default model in weights/default (or, if it is absent, the untrained
        `tiny` preset, with a warning)."""
        if path is None:
            if not (DEFAULT_MODEL_DIR / "unet").is_dir():
                warnings.warn(f"no trained default model at {DEFAULT_MODEL_DIR}; using the UNTRAINED seeded "
                              f"'tiny' preset (it draws noise)")
                return cls.from_preset("tiny", seed=0, dtype=dtype)
            path = DEFAULT_MODEL_DIR
            source = os.environ.get("MDREF_DEFAULT_MODEL", DEFAULT_MODEL_LABEL)   # never a site-packages path
        else:
            source = str(path)
        return cls(**load_folder(path, dtype), source=source, path=Path(path))

    @classmethod
    def from_preset(cls, name, seed=0, dtype=np.float32):
        """Seeded weights for a named architecture: 'mobilediffusion' (full size) or 'tiny'. The components draw
        from seeds seed + mdref.io.presets.COMPONENT_SEED_OFFSET (text encoder +0, UNet +1, decoder +2)."""
        return cls(**load_preset(name, seed, dtype), source=f"preset:{name}", untrained=True)

    # ---- facts -----------------------------------------------------------------------------------------------
    @property
    def dtype(self):
        return self.unet.dtype

    def num_parameters(self):
        """Parameter count per component and in total."""
        counts = {"text_encoder": self.text_encoder.num_parameters(), "unet": self.unet.num_parameters(),
                  "decoder": self.decoder.num_parameters()}
        counts["total"] = sum(counts.values())
        return counts

    @property
    def size_factor(self):
        """Image height and width must be multiples of this (decoder upsampling x UNet downsampling)."""
        return self.decoder.upsampling_factor * self.unet.spec.size_factor

    def default_size(self):
        (h, w), f = self.unet.spec.sample_size, self.decoder.upsampling_factor
        return h * f, w * f

    def latent_shape(self, batch, height=None, width=None):
        """[B, C, h, w] of the latent for an image of height x width pixels (None: the default size). Raises
        InputError naming height or width unless each is a positive integer multiple of size_factor."""
        dh, dw = self.default_size()
        height, width = dh if height is None else height, dw if width is None else width
        f = self.size_factor
        for name, v in (("height", height), ("width", width)):
            if not _is_int(v) or v <= 0 or v % f:
                raise InputError(name, f"{v!r} is not supported: image height and width must be positive multiples "
                                 f"of {f} (decoder x{self.decoder.upsampling_factor}, UNet "
                                 f"{len(self.unet.spec.down)} levels)")
        u = self.decoder.upsampling_factor
        return (batch, self.unet.spec.in_channels, int(height) // u, int(width) // u)

    def weights_sha256(self):
        return {os.path.relpath(f, self.path) if self.path is not None else f: sha256_file(f)
                for f in self.weight_files}

    # ---- the stages ------------------------------------------------------------------------------------------
    def decode(self, x0):
        """Clean latent -> image in [-1, 1]: the decoder sees x0 / scaling_factor + shift_factor."""
        z = x0 / np.asarray(self.decoder.scaling_factor, x0.dtype) + np.asarray(self.decoder.shift_factor, x0.dtype)
        return self.decoder(z)                                               # [B, 3, H, W]

    def check(self, prompt, *, seed=0, noise=None, steps=1, height=None, width=None, guidance_scale=None,
              negative_prompt="", max_memory=None):
        """Refuse bad arguments of run() before anything is computed or allocated; returns (prompts, latent shape).

        prompt: a str or a non-empty list / tuple of str, valid Unicode (no surrogate code points: they come from
        bytes that were not UTF-8); seed: an int (Python or NumPy, not bool) with 0 <= seed < 2**64; steps: an int
        in [1, num_train_timesteps]; height, width: None (the default size) or positive multiples of size_factor;
        guidance_scale: None or a finite real number; negative_prompt: a str; noise: None or a real floating-point
        array of shape [B, C, h, w] or [steps, B, C, h, w] whose values are finite in the compute dtype. The whole
        run must fit in the memory limit (memory_limit(max_memory); estimate_peak_bytes). Raises InputError (a
        ValueError) naming the argument, or MemoryLimitError."""
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise InputError("prompt", f"must be a string or a non-empty list of strings, found {_short(prompt)}")
        for name, texts in (("prompt", prompts), ("negative_prompt", [negative_prompt])):
            for text in texts:
                if not isinstance(text, str):
                    raise InputError(name, f"must be a string, found {_short(text)}")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    bad = text[e.start]
                    raw = f" (the byte 0x{ord(bad) - 0xDC00:02x})" if 0xDC80 <= ord(bad) <= 0xDCFF else ""
                    raise InputError(name, f"is not valid UTF-8 text: {bad!r} at position {e.start}{raw}") from None
        if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
            raise InputError("seed", f"must be an integer with 0 <= seed < 2**64, found {_short(seed)}")
        T = self.scheduler.num_train_timesteps
        if not _is_int(steps) or not 1 <= steps <= T:
            raise InputError("steps", f"must be an integer from 1 to num_train_timesteps = {T}, found {_short(steps)}")
        if guidance_scale is not None and not _is_finite_real(guidance_scale):
            raise InputError("guidance_scale", f"must be a finite number (or None: no guidance), found {_short(guidance_scale)}")
        shape = self.latent_shape(len(prompts), height, width)
        if noise is not None:
            self._check_noise(noise, shape, steps)
        self._check_memory(len(prompts), shape, steps, max_memory)
        return prompts, shape

    def _check_noise(self, noise, shape, steps):
        try:
            noise = np.asarray(noise)                                        # a memory map stays one: nothing read
        except (ValueError, TypeError) as e:
            raise InputError("noise", f"must be a real floating-point array, found {type(noise).__name__} ({e})") \
                from None
        if noise.dtype.kind != "f":
            raise InputError("noise", f"must be a real floating-point array, found dtype {noise.dtype}")
        if noise.shape not in (shape, (steps,) + shape):
            expected = f"{shape}" + (f" or {(steps,) + shape} (one draw per step)" if steps > 1 else "")
            raise InputError("noise", f"has shape {noise.shape}, expected {expected}")
        n_nan, n_inf, size = nonfinite_counts(noise)
        if n_nan or n_inf:
            raise InputError("noise", f"holds non-finite values ({n_nan} NaN, {n_inf} Inf of {size})")
        big = float(np.abs(noise).max()) if noise.size else 0.0
        if big > float(np.finfo(self.dtype).max):
            raise InputError("noise", f"holds values beyond {np.dtype(self.dtype).name}'s range (max |x| {big:.3g})")

    def _check_memory(self, batch, shape, steps, max_memory):
        limit, source = memory_limit(max_memory)
        u = self.decoder.upsampling_factor
        H, W = shape[2] * u, shape[3] * u
        needed = estimate_peak_bytes(self, batch, H, W, steps)
        if limit is not None and needed > limit:
            raise MemoryLimitError(
                f"{H}x{W} (batch {batch}, {steps} step{'s' if steps > 1 else ''}, {np.dtype(self.dtype).name}) needs "
                f"about {_size(needed)}, more than the {_size(limit)} limit ({source})", needed, limit)

    def run(self, prompt, *, seed=0, noise=None, steps=1, height=None, width=None, guidance_scale=None,
            negative_prompt="", allow_nonfinite=False, max_memory=None):
        """The whole pipeline; returns a Result with every intermediate and per-stage wall times.

        The arguments are checked first (see check: InputError, MemoryLimitError). Each stage's output (the text
        embeddings, every UNet output, x0, the image) must be finite: if one is not, the run is repeated under a
        trace that stops at the first recorded point holding a NaN or an Inf (mdref.trace.first_nonfinite) and
        NonFiniteError names the stage and that point. allow_nonfinite=True skips the checks (to study such runs)."""
        prompts, shape = self.check(prompt, seed=seed, noise=noise, steps=steps, height=height, width=width,
                                    guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                    max_memory=max_memory)
        if noise is not None:
            noise = np.array(noise)                                          # read a memory map once, after checks
        args = (prompts, seed, noise, steps, shape, guidance_scale, negative_prompt)
        if allow_nonfinite:
            return self._run(*args, checked=False)
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):   # the stage checks report these
                return self._run(*args, checked=True)
        except _StageFailed as failed:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                found = first_nonfinite(lambda: self._run(*args, checked=False))
            point, counts = found if found is not None else (None, None)
            raise NonFiniteError(failed.stage, failed.counts, point, counts) from None

    def _run(self, prompts, seed, noise, steps, shape, guidance_scale, negative_prompt, *, checked):
        def check(stage, x):
            if checked and not np.isfinite(x).all():
                raise _StageFailed(stage, nonfinite_counts(x))
            return x

        timings = {}
        t0 = time.perf_counter()
        ids = record("tokens", self.tokenizer(prompts))                      # int64 [B, 77]
        timings["tokenize"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        context = check("text encoder", record("text_embeddings", self.text_encoder(ids)))   # [B, 77, D]
        uncond = None
        if guidance_scale is not None and guidance_scale != 1.0:
            neg_ids = self.tokenizer([negative_prompt] * len(prompts))
            uncond = check("text encoder", record("negative_text_embeddings", self.text_encoder(neg_ids)))
        timings["text_encoder"] = time.perf_counter() - t0

        draws = sampler.sampling_noise(shape, steps, seed, self.dtype, noise)  # [steps, B, C, h, w]
        record("noise", draws[0])
        timesteps = [int(t) for t in sampler.trailing_timesteps(self.scheduler.num_train_timesteps, steps)]

        t0 = time.perf_counter()
        model = sampler.guided(lambda x, t: self.unet(x, t, context),
                               None if uncond is None else (lambda x, t: self.unet(x, t, uncond)),
                               None if uncond is None else guidance_scale)
        x0 = sampler.sample(lambda x, t: check("UNet", model(x, t)), self.scheduler, shape, steps=steps, seed=seed,
                            noise=draws, dtype=self.dtype)
        x0 = check("UNet", record("latents.x0", x0))
        timings["unet"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        image = check("decoder", self.decode(x0))
        timings["decoder"] = time.perf_counter() - t0
        record("image", np.clip((image + 1) / 2, 0, 1))                     # [B, 3, H, W] in [0, 1], before 8 bits
        pixels = to_pixels(image)
        self.last_timings = timings
        return Result(prompts, ids, context, draws[0], timesteps, x0, image, pixels, timings)

    def __call__(self, prompt, seed=0, noise=None, steps=1, height=None, width=None, guidance_scale=None,
                 negative_prompt="", allow_nonfinite=False, max_memory=None):
        """prompt -> PIL.Image (a list of images for a list of prompts). Arguments and errors as run()."""
        result = self.run(prompt, seed=seed, noise=noise, steps=steps, height=height, width=width,
                          guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                          allow_nonfinite=allow_nonfinite, max_memory=max_memory)
        images = result.pil()
        return images[0] if isinstance(prompt, str) else images

    def describe(self):
        """Facts for `mdref info` and trace manifests."""
        cfg = self.unet.config
        return {
            "source": self.source, "untrained": self.untrained, "dtype": str(np.dtype(self.dtype)),
            "parameters": self.num_parameters(),
            "latent_shape": list(self.latent_shape(1)), "image_size": list(self.default_size()),
            "prediction_type": cfg.prediction_type, "scheduler": scheduler_config_to_dict(self.scheduler),
            "decoder": {"kind": self.decoder.config.kind, "scaling_factor": self.decoder.scaling_factor,
                        "shift_factor": self.decoder.shift_factor},
        }

    def __repr__(self):
        n = self.num_parameters()
        return f"Pipeline({self.source}, {n['total'] / 1e6:.1f}M parameters{', UNTRAINED' if self.untrained else ''})"

