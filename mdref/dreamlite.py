"""DreamLite text -> image (ByteDance 2026, arXiv 2603.28713), as diffusers' DreamLiteMobilePipeline draws it:

    ids, mask   = tokenizer.generate(["[Generate]: " + prompt])        # chat template, int64 [B, T]
    context, m  = prompt_embeddings(text_encoder(ids, mask), mask, 34)  # [B, L, 2048], mask [B, L] (system dropped)
    sigmas      = flow_sigmas(cfg, steps, flow_shift_mu(h * w // 4))    # shift from the latent BEFORE the concat
    for t:        v = unet([x | zeros], t, context, m, [W, H])[..., :w] # in-context: width 2w in, left half kept
                  x = x + (sigma_next - sigma) v                        # Euler step of the flow (sample_flow)
    image       = decoder(x / scaling_factor + shift_factor)            # TAESDXL, [B, 3, H, W] in [-1, 1]

Sources: diffusers 0.42 pipelines/dreamlite/pipeline_dreamlite_mobile.py (DMD2-distilled, 4 steps, no CFG) and
pipeline_dreamlite.py (the base model: the batch [negative, prompt] encoded together, the negative without the
prefix, uncond + g (cond - uncond) at every step, g = 3.5 and 30 steps by default); docs/dreamlite.md cites the
lines. Legend: B batch, T
tokens, L text positions the UNet reads, C latent channels, h w latent size, H W image size. The text features can
be given as an array ([B, L, 2048] + mask) for users who run the 2B text model elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import precision, sampler
from .guards import (GUIDANCE_RANGE, InputError, _check_noise, _is_finite_real, _short, check_memory, check_prompts,
                     check_seed_arg)
from .pipeline import Pipeline, Result, to_pixels
from .qwen_text import prompt_embeddings
from .qwen_tokenizer import GENERATE_DROP, MAX_SEQUENCE_LENGTH, generate_text
from .trace import record

__all__ = ["DreamLitePipeline", "DreamLiteRequest", "in_context", "guided_in_batch"]

DEFAULT_STEPS = {False: 4, True: 30}   # num_inference_steps: DreamLiteMobilePipeline, DreamLitePipeline (guided)
DEFAULT_GUIDANCE = 3.5                 # DreamLitePipeline's guidance_scale
DEFAULT_SAMPLE_SIZE = 128              # the pipelines' default_sample_size (latent side; 1024 px with TAESDXL),
                                       # whatever the UNet config's sample_size says


def in_context(unet, context, mask, time_ids):
    """The UNet as the sampler sees it (DreamLite's text-to-image in-context input): x [B, C, h, w] concatenated on
    the width with zeros (no reference image), the output's left half.  (x, t) -> v [B, C, h, w]."""
    def model(x, t):
        x_in = np.concatenate([x, np.zeros_like(x)], axis=3)                       # [B, C, h, 2w]
        t = np.full(x.shape[0], t, dtype=x.dtype)
        return unet(x_in, t, context, encoder_attention_mask=mask, time_ids=time_ids)[..., :x.shape[-1]]
    return model


def guided_in_batch(model, scale):
    """DreamLitePipeline's classifier-free guidance: the model on [x, x] (uncond rows first), then
    uncond + scale (cond - uncond) (sampler.apply_guidance).  (x, t) -> v [B, C, h, w]."""
    def run(x, t):
        uncond, cond = np.split(model(np.concatenate([x, x]), t), 2)
        return sampler.apply_guidance(uncond, cond, scale)
    return run


@dataclass(frozen=True)
class DreamLiteRequest:
    """One DreamLite run's arguments, checked (DreamLitePipeline.check)."""
    prompts: tuple
    seed: int
    noise: np.ndarray | None        # [B, C, h, w] or None (drawn from the seed)
    steps: int
    shape: tuple                    # the latent [B, C, h, w] (before the in-context width concatenation)
    text_embeddings: np.ndarray | None   # [B, L, D_text] given instead of the prompts' (None: encode the prompts)
    text_mask: np.ndarray | None    # [B, L] of 1 / 0 with text_embeddings
    allow_nonfinite: bool = False
    negative_prompt: str = ""       # the base (guided) pipeline's negative prompt, encoded without the prefix
    guidance_scale: float | None = None  # guided: uncond + guidance_scale (cond - uncond); mobile: None

    @property
    def timesteps(self):
        return tuple(range(self.steps))     # one UNet call per step (the flow timesteps are in the trace)


class DreamLitePipeline(Pipeline):
    """DreamLiteMobilePipeline (guided=False) or the base DreamLitePipeline (guided=True): Qwen tokenizer +
    Qwen3-VL text path + DreamLite UNet + TAESDXL + flow sampler. `mdref.Pipeline.from_pretrained(folder)` gives one
    for a DreamLite pipeline folder (model_index.json names which)."""

    def __init__(self, *parts, guided=False, **kw):
        super().__init__(*parts, **kw)
        self.guided = guided

    @property
    def default_steps(self):
        return DEFAULT_STEPS[self.guided]

    def default_size(self):
        """(height, width) in pixels when none is given: the pipelines' default_sample_size x the decoder's factor."""
        return (DEFAULT_SAMPLE_SIZE * self.decoder.upsampling_factor,) * 2

    def num_parameters(self):
        counts = {"text_encoder": self.text_encoder.num_parameters() if self.text_encoder is not None else 0,
                  "unet": self.unet.num_parameters(), "decoder": self.decoder.num_parameters()}
        counts["total"] = sum(counts.values())
        return counts

    def check(self, prompt, *, seed=0, noise=None, steps=None, height=None, width=None, guidance_scale=None,
              negative_prompt="", max_memory=None, timesteps=None, allow_nonfinite=False, text_embeddings=None,
              text_mask=None):
        """Refuse bad arguments before anything runs (InputError naming the argument; prompt, seed, size and noise
        as mdref.guards.check_run). steps: None (the pipeline's default: 4 mobile, 30 base) or an int in [1, 1000];
        guidance_scale (default 3.5) and negative_prompt apply to the base (guided) pipeline only, timesteps and
        max_memory as Pipeline.run; text_embeddings [B, L, D_text] ([2B, ...], uncond rows first, when guided) and
        text_mask [B, L] of 1 / 0 (default all ones) replace the prompts' text features."""
        steps = self.default_steps if steps is None else steps
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= 1000:
            raise InputError("steps", f"must be an integer from 1 to 1000, found {steps!r}")
        if timesteps is not None:
            raise InputError("timesteps", "does not apply to DreamLite (flow sigmas from steps)")
        if not self.guided and (guidance_scale is not None or negative_prompt):
            raise InputError("guidance_scale" if guidance_scale is not None else "negative_prompt",
                             "does not apply to DreamLiteMobilePipeline (distilled: no guidance)")
        if self.guided:
            guidance_scale = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
            lo, hi = GUIDANCE_RANGE
            if not (_is_finite_real(guidance_scale) and lo <= guidance_scale <= hi):
                raise InputError("guidance_scale", f"must be a number in [{lo:g}, {hi:g}], found "
                                 f"{_short(guidance_scale)}")
            if not isinstance(negative_prompt, str):
                raise InputError("negative_prompt", f"must be a string, found {_short(negative_prompt)}")
        prompts = check_prompts(prompt)
        check_seed_arg(seed)
        shape = self.latent_shape(len(prompts), height, width)                      # [B, C, h, w]
        if noise is not None:
            _check_noise(self, noise, shape, 1)
            noise = np.array(noise)
        batch = len(prompts) * (2 if self.guided else 1)                          # guided: [negative, prompt] at once
        check_memory(self, batch, shape, int(steps), max_memory,                  # the UNet sees the latent twice as
                     text_tokens=MAX_SEQUENCE_LENGTH, unet_width=2)               # wide (zeros beside it)
        if text_embeddings is not None:
            text_embeddings = np.asarray(text_embeddings)
            B, D = len(prompts) * (2 if self.guided else 1), self.unet.spec.text_dim    # guided: uncond first
            if text_embeddings.ndim != 3 or text_embeddings.shape[0] != B or text_embeddings.shape[2] != D \
                    or text_embeddings.dtype.kind != "f" or not np.isfinite(text_embeddings).all():
                raise InputError("text_embeddings", f"must be finite floats [B={B}, L, {D}], found "
                                 f"{text_embeddings.dtype} {text_embeddings.shape}")
            text_mask = np.ones(text_embeddings.shape[:2], np.int64) if text_mask is None else np.asarray(text_mask)
            if text_mask.shape != text_embeddings.shape[:2] or not np.isin(text_mask, (0, 1)).all():
                raise InputError("text_mask", f"must be 1 / 0 of shape {text_embeddings.shape[:2]}, found "
                                 f"{text_mask.dtype} {text_mask.shape}")
        elif text_mask is not None:
            raise InputError("text_mask", "applies only with text_embeddings")
        elif self.text_encoder is None:
            raise InputError("text_embeddings", "are required: this pipeline has no text encoder")
        return DreamLiteRequest(tuple(prompts), int(seed), noise, int(steps), shape, text_embeddings,
                                text_mask, bool(allow_nonfinite), negative_prompt if self.guided else "",
                                float(guidance_scale) if self.guided else None)

    def run(self, prompt, *, seed=0, noise=None, steps=None, height=None, width=None, guidance_scale=None,
            negative_prompt="", allow_nonfinite=False, max_memory=None, timesteps=None, text_embeddings=None,
            text_mask=None):
        """The whole pipeline (checks first, as Pipeline.run); returns a Result (token_ids None when the text
        features were given; guided: the uncond rows first in token_ids and text_embeddings)."""
        return self.execute(self.check(prompt, seed=seed, noise=noise, steps=steps, height=height, width=width,
                                       guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                       max_memory=max_memory, timesteps=timesteps, allow_nonfinite=allow_nonfinite,
                                       text_embeddings=text_embeddings, text_mask=text_mask))

    def text_features(self, prompts, negative=None):
        """encode_prompt(mode="generate"): ([B, L, D_text], mask [B, L]) for the prompts, and the token ids. With
        `negative` (the guided pipeline): the rows [negative (no prefix)] * B + prompts, encoded together."""
        texts = [generate_text(p) for p in prompts]
        texts = texts if negative is None else [negative] * len(prompts) + texts
        ids, mask = self.tokenizer.generate(texts, MAX_SEQUENCE_LENGTH)                              # [B, T]
        hidden = self.text_encoder(ids, mask)                                                        # [B, T, D]
        return (*prompt_embeddings(hidden, mask, GENERATE_DROP), ids)

    def _stages(self, req, stage):
        B, C, h, w = req.shape
        ids = None
        with stage("text_encoder", "text encoder") as s:
            if req.text_embeddings is None:
                context, mask, ids = self.text_features(req.prompts, req.negative_prompt if self.guided else None)
                record("tokens", ids)
            else:
                context, mask = req.text_embeddings.astype(self.dtype), req.text_mask
            context = s.finite(record("text_embeddings", context))                          # [B, L, D_text]
        draws = sampler.sampling_noise(req.shape, 1, req.seed, self.dtype, req.noise)
        draws[0] = record("noise", draws[0])                                                # [1, B, C, h, w]
        cfg = self.scheduler                                                                # FlowMatchSchedulerConfig
        sigmas = sampler.flow_sigmas(cfg, req.steps, sampler.flow_shift_mu(h * w // 4, cfg))   # float32 [steps + 1]
        up = self.decoder.upsampling_factor
        time_ids = np.tile(np.array([[w * up, h * up]], self.dtype), (len(context), 1))     # [B (2B), 2]: [W, H]
        with stage("unet", "UNet") as s:
            model = in_context(self.unet, context, mask, time_ids)
            if self.guided:                               # one call on [x, x]: uncond rows first, then cond
                model = guided_in_batch(model, req.guidance_scale)
            with precision.using(self.precision and self.precision.within("sampler")):
                x0 = precision.rounded(sampler.sample_flow(lambda x, t: s.finite(model(x, t)), draws, cfg, sigmas,
                                                           dtype=self.dtype))
            x0 = s.finite(record("latents.x0", x0))                                         # [B, C, h, w]
        with stage("decoder") as s:
            image = s.finite(self.decode(x0))                                               # [B, 3, H, W]
        record("image", np.clip((image + 1) / 2, 0, 1))
        return Result(list(req.prompts), ids, context, draws[0], [float(t) for t in sigmas[:-1] * 1000], x0, image,
                      to_pixels(image), stage.timings)

    def describe(self):
        return {"source": self.source, "untrained": self.untrained, "dtype": self.compute.name,
                "pipeline": "DreamLitePipeline" if self.guided else "DreamLiteMobilePipeline", "parameters": self.num_parameters(),
                "latent_shape": list(self.latent_shape(1)), "image_size": list(self.default_size()),
                "scheduler": self.scheduler.to_dict(),
                "decoder": {"kind": self.decoder.config.kind, "scaling_factor": self.decoder.scaling_factor,
                            "shift_factor": self.decoder.shift_factor}}


Pipeline.kinds["dreamlite"] = DreamLitePipeline
