"""CLIP text transformer: token ids [B, T] -> last hidden state [B, T, D] (and, with a projection, text_embeds [B, P]).

Reproduces transformers' ``CLIPTextModel(...).last_hidden_state`` (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision", sec. 2.4: a GPT-2 style transformer with masked self-attention).
Stable Diffusion and MobileDiffusion condition their UNet on this last hidden state, all 77 positions, padding
included. SDXL reads ``hidden_states[-2]`` of two towers instead (`hidden_states`: before the final LayerNorm) and
the second tower's ``CLIPTextModelWithProjection.text_embeds`` (`text_embeds`). Legend: B batch, T tokens, D width,
I MLP width, P projection width. The spec is `mdref.specs.TextEncoderSpec`.
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


def hidden_states(ids, *, embeddings, encoder, spec, layers):
    """CLIPEncoder's hidden_states output: [embeddings, output of layer 0, ..., output of layer `layers`-1],
    `layers` + 1 arrays [B, T, D], none through the final LayerNorm. transformers runs all spec.layers and returns
    spec.layers + 1 states; running fewer changes none of the first `layers` + 1. Each is recorded under its
    parameters' path (`<tower>.embeddings`, `<tower>.encoder.layers.k`): hidden_states[j] is layer j-1's point."""
    x = record(embeddings, embed_tokens(ids, **embeddings))             # [B, T, D]
    mask = causal_mask(ids.shape[1], x.dtype)                           # [T, T]
    states = [x]
    for layer in encoder["layers"][:layers]:
        x = record(layer, encoder_layer(x, **layer, spec=spec, mask=mask))
        states.append(x)
    return states


def text_transformer(ids, *, embeddings, encoder, final_layer_norm, spec):
    """CLIPTextTransformer: embeddings, causal encoder layers, final LayerNorm.
    ids int [B, T] (T <= spec.max_positions) -> last_hidden_state [B, T, D] in the parameters' dtype."""
    x = hidden_states(ids, embeddings=embeddings, encoder=encoder, spec=spec, layers=spec.layers)[-1]
    return record(final_layer_norm, layer_norm(x, final_layer_norm, spec.eps))


def pooled_output(ids, hidden, eos_token_id):
    """CLIPTextModel's pooler_output: the hidden state at each row's end-of-text token. [B, T], [B, T, D] -> [B, D].
    eos_token_id 2 (configs saved before transformers PR #24773, SDXL's text_encoder_2 among them) means 'the
    position of the largest id'; otherwise the first position holding eos_token_id."""
    where = ids.argmax(axis=-1) if eos_token_id == 2 else (ids == eos_token_id).argmax(axis=-1)   # [B]
    return hidden[np.arange(ids.shape[0]), where]                                                  # [B, D]


def text_embeds(ids, last_hidden_state, *, text_projection, eos_token_id):
    """CLIPTextModelWithProjection.text_embeds: the pooled output through text_projection (a Linear without bias).
    [B, T], [B, T, D] -> [B, P]; SDXL's pooled text embedding (OpenCLIP-bigG: P = 1280)."""
    pooled = pooled_output(ids, last_hidden_state, eos_token_id)        # [B, D]
    return record(text_projection, linear(pooled, text_projection))    # [B, P]


def with_projection(ids, *, embeddings, encoder, final_layer_norm, text_projection, spec, eos_token_id):
    """CLIPTextModelWithProjection(ids) with its hidden states: (hidden_states, the spec.layers + 1 arrays
    [B, T, D] of `hidden_states`, and text_embeds [B, P]) from one pass."""
    states = hidden_states(ids, embeddings=embeddings, encoder=encoder, spec=spec, layers=spec.layers)
    last = record(final_layer_norm, layer_norm(states[-1], final_layer_norm, spec.eps))   # [B, T, D]
    return states, text_embeds(ids, last, text_projection=text_projection, eos_token_id=eos_token_id)
