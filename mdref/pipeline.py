"""Text -> image in four named stages: tokenize, encode the text, sample the latent, decode.

    ids     = tokenizer(prompts)                          # int64 [B, 77]
    context = text_encoder(ids)                           # [B, 77, D]
    x0      = sampler(unet, noise at t = T-1, context)    # [B, C, h, w], one UNet call by default
    image   = decoder(x0 / scaling_factor + shift_factor) # [B, 3, H, W] in [-1, 1]
    pixels  = round(clip((image + 1) / 2, 0, 1) * 255)    # uint8
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import sampler
from ._resources import DEFAULT_MODEL_LABEL, weights_dir
from .config import ConfigError
from .decoder import Decoder, DecoderConfig
from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import Tokenizer
from .trace import record
from .unet import UNet, UNetConfig
from .weights import sha256_file

__all__ = ["Pipeline", "Result", "DEFAULT_MODEL_DIR", "PRESETS", "to_pixels"]

DEFAULT_MODEL_DIR = Path(os.environ.get("MDREF_DEFAULT_MODEL", weights_dir() / "default"))

# Pipeline presets: seeded weights for a named architecture (no file needed).
PRESETS = {
    # The full-size MobileDiffusion architecture as DESIGN.md reads it (~520M parameters).
    "mobilediffusion": dict(
        text_encoder="clip-vit-l-14", unet="mobilediffusion", decoder="mobilediffusion-lite",
        scheduler=dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                       beta_end=0.012, timestep_spacing="trailing")),
    # A few-million-parameter model with every MobileDiffusion feature, for tests and demos. UNTRAINED.
    "tiny": dict(
        text_encoder=dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        unet=dict(sample_size=8, in_channels=8, out_channels=8,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  block_out_channels=[32, 64, 64], layers_per_block=1, attention_head_dim=[2, 2, 4],
                  cross_attention_dim=64, use_linear_projection=True, norm_num_groups=8,
                  transformer_kind=["none", "cross", "full"], mid_transformer_layers=2, shared_kv=True,
                  ff_activation="swiglu", ff_mult=3, separable_conv=[False, True, True], prediction_type="sample"),
        decoder=dict(kind="kl", latent_channels=8, block_out_channels=[16, 32, 32, 32], layers_per_block=1,
                     norm_num_groups=8, scaling_factor=1.0, shift_factor=0.0),
        scheduler=dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                       timestep_spacing="trailing")),
}


def to_pixels(image):
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]: round(clip((x + 1) / 2, 0, 1) * 255)."""
    x = np.clip((np.asarray(image, dtype=np.float64) + 1) / 2, 0, 1)
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
        self.scheduler = scheduler            # sampler.SchedulerConfig
        self.source = source                  # as recorded in metadata: model path, "mdref:default" or "preset:NAME"
        self.path = path                      # the model folder (None for a preset)
        self.untrained = untrained
        self.weight_files = list(weight_files)
        self.last_timings = {}

    # ---- construction ----------------------------------------------------------------------------------------
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
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path}: no such model folder (expected a diffusers pipeline folder with "
                              f"text_encoder/, unet/, vae/, scheduler/)")
        missing = [d for d in ("text_encoder", "unet", "vae") if not (path / d).is_dir()]
        if missing:
            raise ConfigError(f"{path}: not a pipeline folder, missing subfolders {missing}")
        tok_dir = path / "tokenizer"
        tokenizer = Tokenizer.from_pretrained(tok_dir if tok_dir.is_dir() else None)
        unet = UNet.from_pretrained(path / "unet", dtype=dtype)
        sched_file = path / "scheduler" / "scheduler_config.json"
        # The scheduler config (diffusers' home of prediction_type) governs; without one, the UNet config's.
        scheduler = sampler.load_scheduler_config(sched_file) if sched_file.is_file() else \
            sampler.SchedulerConfig(prediction_type=unet.config.prediction_type)
        files = sorted(str(p) for p in path.glob("*/*.safetensors"))
        return cls(tokenizer, TextEncoder.from_pretrained(path / "text_encoder", dtype=dtype), unet,
                   Decoder.from_pretrained(path / "vae", dtype=dtype), scheduler, source=source, weight_files=files,
                   path=path)

    @classmethod
    def from_preset(cls, name, seed=0, dtype=np.float32):
        """Seeded weights for a named architecture: 'mobilediffusion' (full size) or 'tiny'. Components draw from
        seeds seed, seed + 1, seed + 2 (text encoder, UNet, decoder)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        spec = PRESETS[name]

        def build(kind, make_config, entry, s):
            return kind.from_preset(entry, seed=s, dtype=dtype) if isinstance(entry, str) else \
                kind.from_config(make_config(entry), seed=s, dtype=dtype)

        unet = build(UNet, UNetConfig.from_dict, spec["unet"], seed + 1)
        scheduler = sampler.SchedulerConfig(**spec["scheduler"], prediction_type=unet.config.prediction_type)
        return cls(Tokenizer.from_pretrained(None), build(TextEncoder, TextEncoderConfig.from_dict, spec["text_encoder"], seed), unet,
                   build(Decoder, lambda d: DecoderConfig(**d), spec["decoder"], seed + 2), scheduler, source=f"preset:{name}", untrained=True)

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
        return self.decoder.upsampling_factor * 2 ** (self.unet.config.levels - 1)

    def default_size(self):
        s = self.unet.config.sample_size or 64
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        f = self.decoder.upsampling_factor
        return h * f, w * f

    def latent_shape(self, batch, height=None, width=None):
        dh, dw = self.default_size()
        height, width = height or dh, width or dw
        f = self.size_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"image size {height}x{width} is not supported: height and width must be positive "
                             f"multiples of {f} (decoder x{self.decoder.upsampling_factor}, UNet "
                             f"{self.unet.config.levels} levels)")
        u = self.decoder.upsampling_factor
        return (batch, self.unet.config.in_channels, height // u, width // u)

    def weights_sha256(self):
        return {os.path.relpath(f, self.path) if self.path is not None else f: sha256_file(f)
                for f in self.weight_files}

    # ---- the stages ------------------------------------------------------------------------------------------
    def decode(self, x0):
        """Clean latent -> image in [-1, 1]: the decoder sees x0 / scaling_factor + shift_factor."""
        z = x0 / np.asarray(self.decoder.scaling_factor, x0.dtype) + np.asarray(self.decoder.shift_factor, x0.dtype)
        return self.decoder(z)                                               # [B, 3, H, W]

    def run(self, prompt, *, seed=0, noise=None, steps=1, height=None, width=None, guidance_scale=None,
            negative_prompt=""):
        """The whole pipeline; returns a Result with every intermediate and per-stage wall times."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        timings = {}
        t0 = time.perf_counter()
        ids = record("tokens", self.tokenizer(prompts))                      # int64 [B, 77]
        timings["tokenize"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        context = record("text_embeddings", self.text_encoder(ids))          # [B, 77, D]
        uncond = None
        if guidance_scale is not None and guidance_scale != 1.0:
            neg_ids = self.tokenizer([negative_prompt] * len(prompts))
            uncond = record("negative_text_embeddings", self.text_encoder(neg_ids))
        timings["text_encoder"] = time.perf_counter() - t0

        shape = self.latent_shape(len(prompts), height, width)
        draws = sampler.sampling_noise(shape, steps, seed, self.dtype, noise)  # [steps, B, C, h, w]
        record("noise", draws[0])
        timesteps = [int(t) for t in sampler.trailing_timesteps(self.scheduler.num_train_timesteps, steps)]

        t0 = time.perf_counter()
        model = sampler.guided(lambda x, t: self.unet(x, t, context),
                               None if uncond is None else (lambda x, t: self.unet(x, t, uncond)),
                               None if uncond is None else guidance_scale)
        x0 = record("latents.x0", sampler.sample(model, self.scheduler, shape, steps=steps, seed=seed, noise=draws,
                                                 dtype=self.dtype))
        timings["unet"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        image = self.decode(x0)
        timings["decoder"] = time.perf_counter() - t0
        record("image", np.clip((image + 1) / 2, 0, 1))                     # [B, 3, H, W] in [0, 1], before 8 bits
        pixels = to_pixels(image)
        self.last_timings = timings
        return Result(prompts, ids, context, draws[0], timesteps, x0, image, pixels, timings)

    def __call__(self, prompt, seed=0, noise=None, steps=1, height=None, width=None, guidance_scale=None,
                 negative_prompt=""):
        """prompt -> PIL.Image (a list of images for a list of prompts)."""
        result = self.run(prompt, seed=seed, noise=noise, steps=steps, height=height, width=width,
                          guidance_scale=guidance_scale, negative_prompt=negative_prompt)
        images = result.pil()
        return images[0] if isinstance(prompt, str) else images

    def describe(self):
        """Facts for `mdref info` and trace manifests."""
        cfg = self.unet.config
        return {
            "source": self.source, "untrained": self.untrained, "dtype": str(np.dtype(self.dtype)),
            "parameters": self.num_parameters(),
            "latent_shape": list(self.latent_shape(1)), "image_size": list(self.default_size()),
            "prediction_type": cfg.prediction_type, "scheduler": sampler.scheduler_config_to_dict(self.scheduler),
            "decoder": {"kind": self.decoder.config.kind, "scaling_factor": self.decoder.scaling_factor,
                        "shift_factor": self.decoder.shift_factor},
        }

    def __repr__(self):
        n = self.num_parameters()
        return f"Pipeline({self.source}, {n['total'] / 1e6:.1f}M parameters{', UNTRAINED' if self.untrained else ''})"

