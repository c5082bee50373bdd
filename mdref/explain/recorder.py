"""One run of the pipeline kept for the page: a summary of every recorded point, and what computed it.

The `Recorder` is a trace that keeps, per point, its shape, statistics and a few channels (the whole array only for
the pipeline's stage boundaries and the cross-attention probabilities). Which function computed a point is not read
off the call stack: `POINT_FUNCTIONS` is the table from point kinds (a pattern of names) to the layer functions, and
a test holds it to every point a run records.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np

from .. import decoder, ops, pipeline, precision, sampler, text_encoder, tokenizer, unet
from ..trace import Trace, recording
from .maps import PROBS, AttentionMaps, check_prompt, maps_of

__all__ = ["KEEP", "CHANNELS", "POINT_FUNCTIONS", "Point", "Recorder", "computed_by", "Explanation", "explain"]

KEEP = ("tokens", "text_embeddings", "noise", "latents.x0", "image")   # points the page needs whole
CHANNELS = 8                                    # channels of a point the page pictures
_LAYER = r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)"

# Point kind (a regular expression matching the whole name, repeats "#n" dropped) -> the function that computed it;
# the first match wins. A value {decoder kind: function} depends on the pipeline's decoder.
POINT_FUNCTIONS = [
    (r"tokens(_2)?", tokenizer.Tokenizer.__call__),
    (r"(negative_)?text_embeddings", text_encoder.text_transformer),
    (r"(negative_)?text_embeds", pipeline.encode_prompts),                 # SDXL's pooled embedding
    (r"time_ids", pipeline.Pipeline._conditions),
    (r"text_encoder(_2)?\.embeddings", text_encoder.embed_tokens),
    (r"text_encoder(_2)?\.encoder\.layers\.\d+\.self_attn", text_encoder.self_attention),
    (r"text_encoder(_2)?\.encoder\.layers\.\d+\.mlp", text_encoder.clip_mlp),
    (r"text_encoder(_2)?\.encoder\.layers\.\d+", text_encoder.encoder_layer),
    (r"text_encoder(_2)?\.final_layer_norm", ops.layer_norm),
    (r"text_encoder_2\.text_projection", text_encoder.text_embeds),
    (r"(sampler\.)?noise", sampler.sampling_noise),
    (r"unet\.time_embedding", unet.time_embed),
    (r"unet\.add_(time_proj|embedding)", unet.text_time_embed),
    (r"unet\.conv_in", ops.conv2d),
    (r"unet\..*\.attn[12]\.probs", unet.attention_probs),
    (r"unet\..*\.attn[12]\.(qk|scores)", precision.attention_logits),
    (r"unet\..*\.attn[12]", unet.attention),
    (r"unet\..*\.ff", unet.feed_forward),
    (r"unet\..*\.transformer_blocks\.\d+", unet.transformer_block),
    (rf"unet\.{_LAYER}\.resnets\.\d+", unet.resnet),                    # the kinds of unet.LAYERS
    (rf"unet\.{_LAYER}\.attentions\.\d+", unet.transformer_2d),
    (rf"unet\.{_LAYER}\.downsamplers\.\d+", unet.downsample),
    (rf"unet\.{_LAYER}\.upsamplers\.\d+", unet.upsample),
    (rf"unet\.{_LAYER}", unet.block),
    (r"unet\.out", unet.unet),
    (r"sampler\.x0", sampler.predict_x0),
    (r"latents\.x0", sampler.sample),
    (r"decoder\.(post_quant_conv|conv_in)", ops.conv2d),
    (r"decoder\.(mid_block|up_blocks\.\d+)\.resnets\.\d+", unet.resnet),
    (r"decoder\.mid_block\.attentions\.\d+", unet.pixel_attention),
    (r"decoder\.up_blocks\.\d+\.upsamplers\.\d+", unet.upsample),
    (r"decoder\.(mid_block|up_blocks\.\d+)", decoder.kl_decode),
    (r"decoder\.layers\.\d+", decoder.taesd_decode),
    (r"decoder\.out", {"kl": decoder.kl_decode, "tiny": decoder.taesd_decode}),
    (r"image", pipeline.Pipeline.decode),
]


def computed_by(name, decoder_kind="kl"):
    """The function that computed point `name` (POINT_FUNCTIONS), or None for a name no pattern matches."""
    base = name.split("#")[0]
    for pattern, fn in POINT_FUNCTIONS:
        if re.fullmatch(pattern, base):
            return fn.get(decoder_kind) if isinstance(fn, dict) else fn
    return None


@dataclass
class Point:
    """One recorded point: shape, dtype, mean / std / min / max, a few channels of batch row 0 for a picture
    (`channels`: [c, h, w], or [N, c] pixels-as-tokens) and per-token norms of [B, T, D]."""
    name: str
    shape: tuple
    dtype: str
    stats: dict
    channels: np.ndarray | None = None
    norms: np.ndarray | None = None


class Recorder(Trace):
    """A trace that keeps a `Point` per recorded name (and the whole array only for KEEP and the probabilities),
    and asks for the on-request cross-attention probabilities of every UNet block."""

    def __init__(self, max_channels=CHANNELS):
        super().__init__(None, on_request=f"unet.*{PROBS}")
        self.points = {}
        self.max_channels = max_channels

    def add(self, name, x):
        name = self.unique(name)
        a = np.asarray(x)
        keep = name.split("#")[0] in KEEP or name.split("#")[0].endswith(PROBS)
        self.arrays[name] = np.array(a, copy=True) if keep else None
        p = Point(name, tuple(a.shape), str(a.dtype), _stats(a))
        c = self.max_channels
        if a.ndim == 4 and a.dtype.kind == "f":
            p.channels = np.array(a[0, :c], copy=True)                          # [c, h, w]
        elif a.ndim == 3 and a.dtype.kind == "f" and name.startswith("unet."):
            p.channels = np.array(a[0, :, :c], copy=True)                       # [N, c] pixels as tokens
        if a.ndim == 3 and a.dtype.kind == "f" and name.startswith("text_encoder."):
            p.norms = np.linalg.norm(a[0].astype(np.float64), axis=-1)          # [T]
        self.points[name] = p


def _stats(a):
    if a.size == 0 or a.dtype.kind not in "fiu":
        return {}
    s = {"min": float(a.min()), "max": float(a.max())}
    if a.dtype.kind == "f":
        s.update(mean=float(a.mean(dtype=np.float64)), std=float(a.std(dtype=np.float64)))
    return s


@dataclass
class Explanation:
    """What the page shows: the arguments, the pipeline's Result, the Recorder, the attention maps, timings."""
    pipe: object
    prompt: str
    seed: int
    noise_given: bool
    steps: int
    result: object
    recorder: Recorder
    maps: AttentionMaps
    run_s: float
    timings: dict = field(default_factory=dict)


def explain(pipe, prompt, seed=0, noise=None, steps=1):
    """Run the pipeline once under a Recorder and collect what the page shows (an Explanation)."""
    check_prompt(prompt)
    t0 = time.perf_counter()
    with recording(Recorder()) as rec:
        result = pipe.run(prompt, seed=seed, noise=noise, steps=steps)
    run_s = time.perf_counter() - t0
    return Explanation(pipe, prompt, seed, noise is not None, steps, result, rec, maps_of(pipe, result, rec), run_s,
                       dict(result.timings))
