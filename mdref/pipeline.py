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

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import precision, sampler
from .guards import (InputError, MemoryLimitError, NonFiniteError, Request, StageFailed, Stages, check_run,  # noqa: F401
                     estimate_peak_bytes, is_int, memory_limit, parse_bytes, uses_guidance)
from .io.components import TextEncoderWithProjection, check_seed, parse_compute
from .formats.json_files import ConfigError
from .io.pipeline_folder import DEFAULT_MODEL_DIR, DEFAULT_MODEL_LABEL, load_folder, load_preset
from .formats.safetensors import sha256_file
from .io.scheduler_config import sampler_spec, scheduler_config_to_dict
from .trace import first_nonfinite, record

__all__ = ["Pipeline", "Result", "to_pixels", "encode_prompts", "InputError", "MemoryLimitError", "NonFiniteError",
           "estimate_peak_bytes", "memory_limit", "parse_bytes"]


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


class Pipeline(precision.ComputesIn):
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
    def from_pretrained(cls, path=None, dtype=np.float32, *, upcast=None, downcast=None, profile=None):
        """A diffusers-style pipeline folder (model_index.json, tokenizer/, text_encoder/, unet/, vae/,
        scheduler/). None: the embedded default model in weights/default (or, if it is absent, the untrained
        `tiny` preset, with a warning). dtype: float32, float64, or float16 / bfloat16 emulated with the
        overrides upcast / downcast and a profile (mdref.precision; e.g. upcast="attention,decoder"), parsed once
        (mdref.precision.compute) and shared by the components."""
        dtype = parse_compute(dtype, "Pipeline", upcast, downcast, profile)
        if path is None:
            named = os.environ.get("MDREF_DEFAULT_MODEL")
            if named and not (Path(named) / "unet").is_dir():
                raise ConfigError(f"MDREF_DEFAULT_MODEL={named}: no model folder there (expected a diffusers-style "
                                  f"pipeline folder with unet/; unset it for the embedded model)")
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
    def from_preset(cls, name, seed=0, dtype=np.float32, *, upcast=None, downcast=None, profile=None):
        """Seeded weights for a named architecture: 'mobilediffusion' (full size) or 'tiny'. The components draw
        from seeds seed + mdref.io.presets.COMPONENT_SEED_OFFSET (text encoder +0, UNet +1, decoder +2).
        dtype, upcast, downcast, profile: as from_pretrained."""
        dtype = parse_compute(dtype, "Pipeline", upcast, downcast, profile)
        check_seed(seed, "Pipeline.from_preset: seed")
        return cls(**load_preset(name, seed, dtype), source=f"preset:{name}", untrained=True)

    # ---- facts -----------------------------------------------------------------------------------------------
    @property
    def compute(self):
        """The compute dtype (mdref.precision.Compute): its name, the arrays' numpy dtype, the rounding policy."""
        return self.unet.compute

    @property
    def sampler_spec(self):
        """The frozen facts the sampler computes from (mdref.specs.SamplerSpec), read off `scheduler`, the
        diffusers-keyed config (which a caller may change between runs)."""
        return sampler_spec(self.scheduler)

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

    def trained_size(self):
        """The image size the model was trained at, (height, width) in pixels, where its files say so (a UNet
        config.json that states sample_size, as diffusers' do); None for an untrained preset or when unstated."""
        if self.untrained or self.unet.config.sample_size is None:
            return None
        return self.default_size()

    def latent_shape(self, batch, height=None, width=None):
        """[B, C, h, w] of the latent for an image of height x width pixels (None: the default size). Raises
        InputError naming height or width unless each is a positive integer multiple of size_factor."""
        dh, dw = self.default_size()
        height, width = dh if height is None else height, dw if width is None else width
        f = self.size_factor
        for name, v in (("height", height), ("width", width)):
            if not is_int(v) or v <= 0 or v % f:
                raise InputError(name, f"{v!r} is not supported: image height and width must be positive multiples "
                                 f"of {f} (decoder x{self.decoder.upsampling_factor}, UNet "
                                 f"{len(self.unet.spec.down)} levels)")
        u = self.decoder.upsampling_factor
        return (batch, self.unet.spec.in_channels, int(height) // u, int(width) // u)

    def weights_sha256(self):
        return {os.path.relpath(f, self.path) if self.path is not None else f: sha256_file(f)
                for f in self.weight_files}

    # ---- the stages ------------------------------------------------------------------------------------------
    def decoder_input(self, x0):
        """What the decoder is fed: x0 / scaling_factor + shift_factor (the VAE's own latent scale)."""
        return x0 / np.asarray(self.decoder.scaling_factor, x0.dtype) + np.asarray(self.decoder.shift_factor, x0.dtype)

    def decode(self, x0):
        """Clean latent -> image in [-1, 1]: the decoder sees decoder_input(x0)."""
        return self.decoder(self.decoder_input(x0))                          # [B, 3, H, W]

    def check(self, prompt, *, seed=0, noise=None, steps=1, height=None, width=None, guidance_scale=None,
              negative_prompt="", max_memory=None, timesteps=None, allow_nonfinite=False):
        """Refuse bad arguments of run() before anything is computed or allocated (mdref.guards.check_run);
        returns the checked Request that execute() runs."""
        return check_run(self, prompt, seed=seed, noise=noise, steps=steps, height=height, width=width,
                         guidance_scale=guidance_scale, negative_prompt=negative_prompt, max_memory=max_memory,
                         timesteps=timesteps, allow_nonfinite=allow_nonfinite)

    def run(self, prompt, *, seed=0, noise=None, steps=1, height=None, width=None, guidance_scale=None,
            negative_prompt="", allow_nonfinite=False, max_memory=None, timesteps=None):
        """The whole pipeline; returns a Result with every intermediate and per-stage wall times.
        timesteps: custom timesteps as diffusers' argument of that name (e.g. [399] for DMD2's LCMScheduler,
        whose own one-step timestep is 999); steps is then 1 or their number (mdref.sampler.schedule).

        The arguments are checked first (see check: InputError, MemoryLimitError). Each stage's output (the text
        embeddings, every UNet output, x0, the image) must be finite: if one is not, the run is repeated under a
        trace that stops at the first recorded point holding a NaN or an Inf (mdref.trace.first_nonfinite) and
        NonFiniteError names the stage and that point. allow_nonfinite=True skips the checks (to study such runs)."""
        return self.execute(self.check(prompt, seed=seed, noise=noise, steps=steps, height=height, width=width,
                                       guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                       max_memory=max_memory, timesteps=timesteps, allow_nonfinite=allow_nonfinite))

    def execute(self, request):
        """Run a checked Request (Pipeline.check): the stages, their finiteness checks, and on a non-finite stage
        output the repeat that names the first non-finite point."""
        if request.allow_nonfinite:
            return self._run(request, Stages(checked=False))
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):   # the stage checks report these
                return self._run(request, Stages(checked=True))
        except StageFailed as failed:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                found = first_nonfinite(lambda: self._run(request, Stages(checked=False)))
            point, counts = found if found is not None else (None, None)
            raise NonFiniteError(failed.stage, failed.counts, point, counts) from None

    def _run(self, request, stages):
        with precision.using(self.precision):          # pipeline-level arithmetic and records: rounded when emulated
            result = self._stages(request, stages)
        self.last_timings = stages.timings
        return result

    def _stages(self, req, stage):
        """Tokenize, encode the text, sample the latent, decode: the four lines of the module docstring."""
        with stage("tokenize"):
            ids = record("tokens", self.tokenizer(list(req.prompts)))                       # int64 [B, 77]
        with stage("text_encoder", "text encoder") as s:
            context = s.finite(record("text_embeddings", self.text_encoder(ids)))          # [B, 77, D]
            uncond = None
            if uses_guidance(req.guidance_scale):
                neg_ids = self.tokenizer([req.negative_prompt] * len(req.prompts))
                uncond = s.finite(record("negative_text_embeddings", self.text_encoder(neg_ids)))
        draws = sampler.sampling_noise(req.shape, len(req.timesteps), req.seed, self.dtype, req.noise)
        draws[0] = record("noise", draws[0])                                                # [steps, B, C, h, w]
        with stage("unet", "UNet") as s:
            model = sampler.guided(lambda x, t: self.unet(x, t, context),
                                   None if uncond is None else (lambda x, t: self.unet(x, t, uncond)),
                                   None if uncond is None else req.guidance_scale)
            with precision.using(self.precision and self.precision.within("sampler")):
                x0 = precision.rounded(sampler.sample(lambda x, t: s.finite(model(x, t)), self.sampler_spec,
                                                      req.shape, seed=req.seed, noise=draws, dtype=self.dtype,
                                                      timesteps=req.timesteps))
            x0 = s.finite(record("latents.x0", x0))                                         # [B, C, h, w]
        with stage("decoder") as s:
            image = s.finite(self.decode(x0))                                               # [B, 3, H, W]
        record("image", np.clip((image + 1) / 2, 0, 1))                     # [B, 3, H, W] in [0, 1], before 8 bits
        return Result(list(req.prompts), ids, context, draws[0], list(req.timesteps), x0, image, to_pixels(image),
                      stage.timings)

    def __call__(self, prompt, seed=0, **arguments):
        """prompt -> PIL.Image (a list of images for a list of prompts). Arguments (keywords but seed) and errors as
        run()."""
        images = self.run(prompt, seed=seed, **arguments).pil()
        return images[0] if isinstance(prompt, str) else images

    def describe(self):
        """Facts for `mdref info` and trace manifests."""
        cfg = self.unet.config
        return {
            "source": self.source, "untrained": self.untrained, "dtype": self.compute.name,
            "precision": None if self.precision is None else self.precision.describe(),
            "parameters": self.num_parameters(),
            "latent_shape": list(self.latent_shape(1)), "image_size": list(self.default_size()),
            "prediction_type": cfg.prediction_type, "scheduler": scheduler_config_to_dict(self.scheduler),
            "decoder": {"kind": self.decoder.config.kind, "scaling_factor": self.decoder.scaling_factor,
                        "shift_factor": self.decoder.shift_factor},
        }

    def __repr__(self):
        n = self.num_parameters()
        return f"Pipeline({self.source}, {n['total'] / 1e6:.1f}M parameters{', UNTRAINED' if self.untrained else ''})"


def encode_prompts(prompts, tokenizers, text_encoders, *, clip_skip=None):
    """SDXL's text conditioning (diffusers StableDiffusionXLPipeline.encode_prompt) for a list of prompts:
    (embeddings [B, 77, D_1 + D_2], pooled [B, P] or None). Each (tokenizer, encoder) pair gives hidden_states[-2]
    (the penultimate layer's output, before the final LayerNorm), hidden_states[-(clip_skip + 2)] with clip_skip,
    concatenated on the last axis in the given order; pooled is the text_embeds of the first encoder with a
    projection (SDXL: text_encoder_2). diffusers encodes negative prompts without clip_skip: pass None for them."""
    layers = min(te.spec.layers for te in text_encoders)
    if clip_skip is not None and (not is_int(clip_skip) or not 0 <= clip_skip < layers):
        raise InputError("clip_skip", f"must be None or an int in [0, {layers - 1}], found {clip_skip!r}")
    index = -2 - (clip_skip or 0)
    states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(prompts)                                             # int64 [B, 77]
        if pooled is None and isinstance(encoder, TextEncoderWithProjection):
            hidden, pooled = encoder.hidden_state_and_text_embeds(ids, index)    # [B, 77, D_k], [B, P]
        else:
            hidden = encoder.hidden_state(ids, index)                        # [B, 77, D_k]
        states.append(hidden)
    return np.concatenate(states, axis=-1), pooled                          # [B, 77, sum D_k]
