"""Qwen3-VL's language model, text path: token ids [B, T] (+ padding mask) -> hidden states [B, T, D].

Reproduces transformers' ``Qwen3VLTextModel`` (transformers 5.25, models/qwen3_vl/modeling_qwen3_vl.py) for
text-only input, as DreamLite's pipelines read it: ``Qwen3VLForConditionalGeneration(input_ids, attention_mask,
output_hidden_states=True).hidden_states[-1]``. A Qwen3 decoder (Qwen Team 2025, "Qwen3 Technical Report"):
pre-RMSNorm layers (Zhang & Sennrich 2019), grouped-query attention (Ainslie et al. 2023) with RMSNorm on each
query and key head, rotary positions (Su et al. 2021), SwiGLU MLP (Shazeer 2020).
Legend: B batch, T tokens, D width (hidden_size), H query heads, G key/value heads (H / G query heads share one),
d head_dim (not D / H in general), I MLP width. The spec is `mdref.specs.QwenTextSpec`.

What the transformers source says (docs/dreamlite.md cites the lines):
- ``hidden_states[-1]`` is *after* the final RMSNorm: transformers' ``capture_outputs`` replaces the last layer's
  recorded output by ``last_hidden_state`` (``tie_last_hidden_states``). `text_model` returns exactly that.
- Positions: with no image, ``Qwen3VLModel`` passes ``position_ids=None`` and the text model uses ``arange(T)``
  for all three M-RoPE components (temporal, height, width) whatever the padding; three equal components make the
  interleaved M-RoPE sections pick identical frequencies, so this is ordinary 1-D RoPE in rotate-half form.
- RoPE angles are float32 in every dtype: ``inv_freq = 1 / theta^(2i/d)`` and ``position * inv_freq`` in float32.
  mdref keeps that float32 angle table (a constant of the model, like the sampler's schedule) and evaluates
  cos / sin in float64, rounded to the compute dtype.
- The mask is additive: 0 where a query may see a key (key not later, key not padding), the dtype's most
  negative finite value elsewhere (a row of padding under left padding sees nothing and then attends uniformly;
  the pipeline discards those rows).
"""

from __future__ import annotations

import numpy as np

from .ops import attention, linear, repeat_kv, rms_norm, silu
from .trace import record, record_on_request


def embed(ids, *, weight):
    """nn.Embedding (embed_tokens): a row per token id.  ids [B, T] -> [B, T, D]."""
    return weight[ids]                                                      # [B, T, D]


def rope_angles(positions, head_dim, theta):
    """Qwen3VLTextRotaryEmbedding, rope_type "default": angles = position * inv_freq, inv_freq_i = 1 / theta^(2i/d),
    as torch computes them in float32 (theta rounded to float32, the power and the quotient rounded once each).
    positions [T] -> float32 [T, d/2]."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)                # [d/2]
    power = np.power(np.float64(np.float32(theta)), exponent.astype(np.float64)).astype(np.float32)
    inv_freq = np.float32(1) / power                                                            # [d/2] float32
    return np.asarray(positions, np.float32)[:, None] * inv_freq[None, :]                      # [T, d/2]


def rotate(x, cos, sin, heads):
    """apply_rotary_pos_emb (rotate-half form): x cos + rotate_half(x) sin per head, rotate_half(x1, x2) = (-x2, x1)
    over the two halves of d.  x [B, T, heads * d], cos / sin [T, d] -> [B, T, heads * d]."""
    B, T, _ = x.shape
    xh = x.reshape(B, T, heads, -1)                                         # [B, T, heads, d]
    half = xh.shape[-1] // 2
    turned = np.concatenate([-xh[..., half:], xh[..., :half]], axis=-1)    # rotate_half
    return (xh * cos[:, None] + turned * sin[:, None]).reshape(B, T, -1)


def self_attention(x, *, q_proj, k_proj, v_proj, o_proj, q_norm, k_norm, spec, cos, sin, mask, name):
    """Qwen3VLTextAttention: q, k, v projections; RMSNorm over each query and key head (width d); RoPE on q and k;
    each K/V head serves H / G query heads; softmax(q k^T / sqrt(d) + mask) v; o projection.  x [B, T, D]."""
    B, T, _ = x.shape
    d = spec.head_dim
    q = noted_rms_norm(linear(x, q_proj).reshape(B, T, spec.heads, d), q_norm, spec.eps,
                       f"{name}.q_norm").reshape(B, T, -1)                                         # [B, T, H d]
    k = noted_rms_norm(linear(x, k_proj).reshape(B, T, spec.kv_heads, d), k_norm, spec.eps,
                       f"{name}.k_norm").reshape(B, T, -1)                                         # [B, T, G d]
    q, k = rotate(q, cos, sin, spec.heads), rotate(k, cos, sin, spec.kv_heads)
    groups = spec.heads // spec.kv_heads
    k, v = repeat_kv(k, spec.kv_heads, groups), repeat_kv(linear(x, v_proj), spec.kv_heads, groups)     # [B, T, H d]
    return linear(attention(q, k, v, spec.heads, mask=mask, scale=d ** -0.5), o_proj)                  # [B, T, D]


def swiglu_mlp(x, *, gate_proj, up_proj, down_proj):
    """Qwen3VLTextMLP (hidden_act silu): down(silu(gate x) * up x).  [B, T, D] -> [B, T, I] -> [B, T, D]."""
    return linear(silu(linear(x, gate_proj)) * linear(x, up_proj), down_proj)


def decoder_layer(x, *, input_layernorm, self_attn, post_attention_layernorm, mlp, spec, cos, sin, mask, name):
    """Qwen3VLTextDecoderLayer: x + attn(RMSNorm x), then x + mlp(RMSNorm x).  x [B, T, D]."""
    h = self_attention(noted_rms_norm(x, input_layernorm, spec.eps, f"{name}.input_layernorm"), **self_attn,
                       spec=spec, cos=cos, sin=sin, mask=mask, name=f"{name}.self_attn")
    x = x + record(f"{name}.self_attn", h)
    h = swiglu_mlp(noted_rms_norm(x, post_attention_layernorm, spec.eps, f"{name}.post_attention_layernorm"), **mlp)
    return record(name, x + record(f"{name}.mlp", h))


def noted_rms_norm(x, p, eps, name):
    """rms_norm(x, p, eps); a trace that asks for the on-request point `name`.sum_sq gets the sum of x^2 over the
    normalised axis: what a device that accumulates the mean square in float16 must hold (65504 at most)."""
    record_on_request(f"{name}.sum_sq", lambda: np.square(x).sum(-1))
    return rms_norm(x, p, eps)


def causal_padding_mask(valid, dtype):
    """transformers' create_causal_mask with a padding mask, additive: 0 where key j <= query i and key j is a
    token, the dtype's most negative finite value elsewhere.  valid [B, T] of 1 / 0 -> [B, 1, T, T]."""
    T = valid.shape[1]
    allowed = np.tril(np.ones((T, T), bool))[None] & (np.asarray(valid) != 0)[:, None, :]     # [B, T, T]
    return np.where(allowed, 0, np.finfo(dtype).min).astype(dtype)[:, None]                   # [B, 1, T, T]


def text_model(ids, attention_mask=None, *, embed_tokens, layers, norm, spec):
    """Qwen3VLTextModel, text only: embeddings, decoder layers, final RMSNorm.  ids int [B, T], attention_mask
    [B, T] of 1 (token) / 0 (padding; None: all tokens) -> hidden_states[-1] == last_hidden_state [B, T, D]."""
    x = record("text_encoder.embed_tokens", embed(ids, **embed_tokens))     # [B, T, D]
    B, T = ids.shape
    angles = rope_angles(np.arange(T), spec.head_dim, spec.rope_theta)                         # [T, d/2] float32
    both = np.concatenate([angles, angles], axis=-1).astype(np.float64)                        # [T, d]
    cos, sin = np.cos(both).astype(x.dtype), np.sin(both).astype(x.dtype)
    valid = np.ones((B, T), np.int64) if attention_mask is None else np.asarray(attention_mask)
    mask = causal_padding_mask(valid, x.dtype)                                                 # [B, 1, T, T]
    for i in range(spec.layers):
        x = decoder_layer(x, **layers[str(i)], spec=spec, cos=cos, sin=sin, mask=mask,
                          name=f"text_encoder.layers.{i}")
    return record("text_encoder.norm", noted_rms_norm(x, norm, spec.eps, "text_encoder.norm"))


# ---- what DreamLite reads off it ------------------------------------------------------------------------------
def prompt_embeddings(hidden, attention_mask, drop, pad_embedding=None):
    """DreamLitePipeline.encode_prompt after the text model: each row's token positions (_extract_masked_hidden)
    without the first `drop` (the chat template's system part), zero-padded to the longest row (pad_sequence),
    and the mask [B, L] of 1 / 0 the UNet gets as encoder_attention_mask. `pad_embedding` [D] (the pipeline's
    text_pad_embedding) fills the padded positions when given.  hidden [B, T, D] -> ([B, L, D], int64 [B, L])."""
    rows = [h[np.asarray(m) != 0][drop:] for h, m in zip(hidden, attention_mask)]
    L = max(len(r) for r in rows)
    embeds = np.zeros((len(rows), L, hidden.shape[-1]), hidden.dtype)                          # [B, L, D]
    mask = np.zeros((len(rows), L), np.int64)                                                  # [B, L]
    for b, r in enumerate(rows):
        embeds[b, :len(r)], mask[b, :len(r)] = r, 1
    if pad_embedding is not None:
        keep = mask[..., None].astype(hidden.dtype)
        embeds = embeds * keep + np.asarray(pad_embedding, hidden.dtype) * (1 - keep)
    return embeds, mask
