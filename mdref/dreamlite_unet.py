"""DreamLite's UNet (ByteDance 2026, arXiv 2603.28713): diffusers ``DreamLiteUNetModel`` (models/unets/
unet_dreamlite.py, models/transformers/transformer_2d_dreamlite.py, diffusers 0.42), on mdref.unet's stages.

Legend: B batch, C channels of a level, N = H*W pixels as tokens, T text positions, D the context width after the
text projection, D_text the text features' width, E time-embedding width, heads query heads, G K/V heads, d head
width. The stage plan, ResNets (separable, conv1's pointwise widening to 2x: the widths are in the weights),
resamplers and Transformer2DModel wrapper are mdref.unet's; what differs is here: the attention (G shared K/V
heads, RMSNorm on q and k, the text mask as an additive bias), the block without self-attention (kind "replace":
the hidden state BECOMES norm1(x), no residual), the text projection (text_proj_rms) and the time ids [w, h]
(addition_embed_type "time"). The spec is `mdref.specs.DreamLiteUNetSpec`; docs/dreamlite.md has the sources.
"""

from __future__ import annotations

import numpy as np

from . import ops
from .trace import point, record, record_on_request
from .unet import LAYERS, attention_probs, block, feed_forward, time_embed, transformer_2d

__all__ = ["mqa_attention", "dreamlite_transformer_block", "text_proj_rms", "time_ids_embed", "dreamlite_unet"]


def mqa_attention(x, context, *, to_q, to_k, to_v, to_out, norm_q=None, norm_k=None, heads, kv_heads, qk_norm_eps,
                  bias=None, name=None):
    """DreamLiteAttnProcessor2_0: q from x, k and v from the context (x when None) with kv_heads heads each;
    RMSNorm over each q and k head (qk_norm "rms_norm"); each K / V head repeated to heads / kv_heads consecutive
    query heads (repeat_interleave); softmax(q k^T / sqrt(d) + bias) v; to_out.0.
    x [B, N, C], context [B, T, D], bias additive, broadcastable to [B, heads, N, T] -> [B, N, C]."""
    source = x if context is None else context
    B, N, C = x.shape
    T, d = source.shape[1], C // heads
    q, k, v = ops.linear(x, to_q), ops.linear(source, to_k), ops.linear(source, to_v)   # [B, N, C], 2 x [B, T, G d]
    if qk_norm_eps is not None:
        q, k = q.reshape(B, N, heads, d), k.reshape(B, T, kv_heads, d)                # per head
        if name is not None:                   # on request: the sums of squares a float16 RMSNorm accumulates
            record_on_request(point(name, "norm_q", "sum_sq"), lambda: np.square(q).sum(-1))
            record_on_request(point(name, "norm_k", "sum_sq"), lambda: np.square(k).sum(-1))
        q = ops.rms_norm(q, norm_q, qk_norm_eps).reshape(B, N, C)
        k = ops.rms_norm(k, norm_k, qk_norm_eps).reshape(B, T, kv_heads * d)
    k, v = ops.repeat_kv(k, kv_heads, heads // kv_heads), ops.repeat_kv(v, kv_heads, heads // kv_heads)  # [B, T, C]
    if name is not None:
        record_on_request(point(name, "probs"), lambda: attention_probs(q, k, heads=heads, weighting="softmax",
                                                                         mask=bias))
    return ops.linear(ops.attention(q, k, v, heads, mask=bias), to_out[0])                # [B, N, C]


def dreamlite_transformer_block(x, context, *, norm1, norm2, attn2, norm3, ff, attn1=None, spec, bias):
    """BasicTransformerBlockDreamLite (layer_norm): x += attn1(LN1 x) ("full"), or x := LN1 x ("replace": DreamLite
    without self-attention REPLACES the hidden state, no residual); x += attn2(LN2 x, text, bias); x += ff(LN3 x).
    x [B, N, C] -> [B, N, C]; bias: the text mask's additive bias [B, 1, 1, T], on attn2 only (diffusers gives attn1
    the self-attention mask, None in the UNet, even with only_cross_attention)."""
    kw = dict(heads=spec.heads, kv_heads=spec.kv_heads or spec.heads, qk_norm_eps=spec.qk_norm_eps)
    h = ops.layer_norm(x, norm1, spec.layer_norm_eps)
    if spec.kind == "full":
        x = x + record(attn1, mqa_attention(h, context if spec.only_cross else None, **attn1, **kw,
                                            name=attn1))                 # no text mask, even over the text
    else:                                                                         # "replace"
        x = record(norm1, h)
    h = ops.layer_norm(x, norm2, spec.layer_norm_eps)
    x = x + record(attn2, mqa_attention(h, context, **attn2, **kw, bias=bias, name=attn2))
    h = ops.layer_norm(x, norm3, spec.layer_norm_eps)
    return x + record(ff, feed_forward(h, **ff, activation=spec.ff_activation))


def text_proj_rms(features, *, encoder_hid_proj, eps):
    """encoder_hid_dim_type "text_proj_rms": Sequential(Linear(D_text -> D), RMSNorm(D)).  [B, T, D_text] -> [B, T, D]."""
    proj, norm = encoder_hid_proj
    h = ops.linear(features, proj)                                                # [B, T, D]
    record_on_request(point(encoder_hid_proj, "1", "sum_sq"), lambda: np.square(h).sum(-1))   # RMSNorm's sum
    return ops.rms_norm(h, norm, eps)


def time_ids_embed(time_ids, *, linear_1, linear_2, dim, flip_sin_to_cos, freq_shift):
    """addition_embed_type "time": each time id ([w, h]) through the sinusoid (add_time_proj), concatenated per
    sample, then add_embedding (linear_1, SiLU, linear_2).  time_ids [B, k] -> [B, E]."""
    B = time_ids.shape[0]
    e = ops.timestep_embedding(time_ids.reshape(-1), dim, flip_sin_to_cos=flip_sin_to_cos,
                               downscale_freq_shift=freq_shift, dtype=time_ids.dtype).reshape(B, -1)   # [B, k dim]
    return ops.linear(ops.silu(ops.linear(e, linear_1)), linear_2)               # [B, E]


def dreamlite_unet(sample, timestep, context, *, encoder_attention_mask, time_ids, conv_in, time_embedding,
                   encoder_hid_proj, add_embedding, down_blocks, up_blocks, conv_norm_out, conv_out, mid_block=None,
                   spec):
    """DreamLiteUNetModel.forward (UNet2DConditionModel.forward with its DreamLite overrides): time embedding + the
    time ids' embedding, the text features projected (text_proj_rms), the mask as an additive bias, then the
    stages as `unet`.  sample [B, C_in, H, W], timestep [B], context [B, T, D_text], encoder_attention_mask [B, T]
    of 1 / 0, time_ids [B, 2] ([w, h]) -> [B, C_out, H, W]; spec: a DreamLiteUNetSpec."""
    temb = record(time_embedding, time_embed(
        timestep, **time_embedding, dim=spec.sinusoid_dim, flip_sin_to_cos=spec.flip_sin_to_cos,
        freq_shift=spec.freq_shift))                                              # [B, E]
    temb = temb + record(add_embedding, time_ids_embed(
        time_ids, **add_embedding, dim=spec.time_ids_dim, flip_sin_to_cos=spec.flip_sin_to_cos,
        freq_shift=spec.freq_shift))                                              # [B, E]
    context = record(encoder_hid_proj, text_proj_rms(context, encoder_hid_proj=encoder_hid_proj,
                                                     eps=spec.text_norm_eps))    # [B, T, D]
    bias = ((1 - encoder_attention_mask) * spec.mask_bias)[:, None, None, :]     # [B, 1, 1, T]

    def transformer(x, temb, context, p, s):
        return transformer_2d(x, context, **p, spec=s,
                              block=lambda *a, **kw: dreamlite_transformer_block(*a, **kw, bias=bias))

    layers = dict(LAYERS, transformer=transformer)
    x = record(conv_in, ops.conv2d(sample, conv_in, padding=1))                 # [B, C0, H, W]
    skips = [x]
    blocks = [*down_blocks, *([mid_block] if spec.mid is not None else []), *up_blocks]
    for st, p in zip(spec.stages, blocks):                                        # down, mid, up
        x = record(p, block(x, temb, context, skips, p, st, layers))
    x = ops.norm_silu_conv2d(x, conv_norm_out, conv_out, groups=spec.groups, eps=spec.resnet_eps, padding=1)
    return record("unet.out", x)                                                  # [B, C_out, H, W], the output point
