"""CLIP text transformer: token ids [B, T] -> last hidden state [B, T, D].

Reproduces transformers' ``CLIPTextModel(...).last_hidden_state`` (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision", sec. 2.4: a GPT-2 style transformer with masked self-attention).
Stable Diffusion and MobileDiffusion condition their UNet on this last hidden state, all 77 positions, padding
included. Legend: B batch, T tokens, D width, I MLP width. The spec is `mdref.specs.TextEncoderSpec`.
The causal mask is additive: 0 on and below the diagonal, the dtype's most negative finite value above it, as
transformers builds it (``ops.causal_mask``); the attention scale is ``head_dim ** -0.5``.
"""

from __future__ import annotations

import numpy as np

from .ops import attention, causal_mask, gelu, layer_norm, linear, quick_gelu
from .trace import record

# The activations CLIP text towers use (transformers' hidden_act names are mapped to these by mdref.io).
ACTIVATIONS = {
    "quick_gelu": quick_gelu,                              # x * sigmoid(1.702 x): OpenAI CLIP, SD-1, MobileDiffusion
    "gelu": gelu,                                          # exact erf GELU: OpenCLIP, SD-2
    "gelu_tanh": lambda x: gelu(x, approximate="tanh"),
}


def embed_tokens(ids, *, token_embedding, position_embedding):
    """CLIPTextEmbeddings: token embedding + learned absolute position embedding.  ids [B, T] -> [B, T, D]."""
    return token_embedding["weight"][ids] + position_embedding["weight"][:ids.shape[1]]   # [B, T, D]


def self_attention(x, *, q_proj, k_proj, v_proj, out_proj, heads, mask):
    """CLIPAttention: q/k/v projections, softmax(q k^T / sqrt(head_dim) + mask) v per head, out projection.
    x [B, T, D]; mask additive [T, T]."""
    q, k, v = linear(x, q_proj), linear(x, k_proj), linear(x, v_proj)                 # [B, T, D] each
    h = attention(q, k, v, heads, mask=mask, scale=(x.shape[-1] // heads) ** -0.5)    # [B, T, D]
    return linear(h, out_proj)


def clip_mlp(x, *, fc1, fc2, act):
    """CLIPMLP: fc1 -> activation -> fc2.  [B, T, D] -> [B, T, I] -> [B, T, D]."""
    return linear(act(linear(x, fc1)), fc2)


def encoder_layer(x, *, layer_norm1, self_attn, layer_norm2, mlp, spec, mask):
    """CLIPEncoderLayer: pre-LayerNorm residual blocks, x + attn(LN1 x), then x + mlp(LN2 x).  x [B, T, D]."""
    h = self_attention(layer_norm(x, layer_norm1, spec.eps), **self_attn, heads=spec.heads, mask=mask)
    x = x + record(self_attn, h)
    h = clip_mlp(layer_norm(x, layer_norm2, spec.eps), **mlp, act=ACTIVATIONS[spec.activation])
    return x + record(mlp, h)


def text_transformer(ids, *, embeddings, encoder, final_layer_norm, spec):
    """CLIPTextTransformer: embeddings, causal encoder layers, final LayerNorm.
    ids int [B, T] (T <= spec.max_positions) -> last_hidden_state [B, T, D] in the parameters' dtype."""
    x = record(embeddings, embed_tokens(ids, **embeddings))                           # [B, T, D]
    mask = causal_mask(ids.shape[1], x.dtype)                                          # [T, T]
    for layer in encoder["layers"][:spec.layers]:
        x = record(layer, encoder_layer(x, **layer, spec=spec, mask=mask))
    return record(final_layer_norm, layer_norm(x, final_layer_norm, spec.eps))


def pooled_output(ids, hidden, eos_token_id):
    """CLIPTextModel's pooler_output: the hidden state at each row's end-of-text token. [B, T], [B, T, D] -> [B, D].
    eos_token_id 2 (configs saved before transformers PR #24773) means 'the position of the largest id'; otherwise
    the first position holding eos_token_id."""
    where = ids.argmax(axis=-1) if eos_token_id == 2 else (ids == eos_token_id).argmax(axis=-1)   # [B]
    return hidden[np.arange(ids.shape[0]), where]                                                  # [B, D]
