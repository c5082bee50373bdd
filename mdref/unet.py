"""The UNet: diffusers' ``UNet2DConditionModel`` (Rombach et al. 2022, SD-family layouts) and MobileDiffusion's UNet
(Zhao et al. 2023, arXiv 2311.16567, sec. 3.2; docs/mobilediffusion_unet.md) as one set of layers.

Legend: B batch, C channels of a level, H W latent height and width, N = H*W pixels as tokens, T text tokens,
D text width, E time-embedding width. Layers take the array first and their parameters as keyword arguments named
by the checkpoint (``resnet(x, temb, **p["down_blocks"][0]["resnets"][0], ...)``), so each signature is the weight
schema; a parameter node knows its path (mdref.params), which names its trace point: ``record(p, x)``. The
structure comes from `mdref.specs.UNetSpec` (one `Stage` per block, listing its layers); the forward pass never
looks at which keys exist. MobileDiffusion's changes: "cross" transformer blocks (no self-attention), a deep
mid block of full blocks, shared key/value projections, SwiGLU FFNs, separable ResNet convs, ReLU attention.
"""

from __future__ import annotations

import numpy as np

from . import ops, precision
from .trace import point, record, record_on_request


def time_embed(t, *, linear_1, linear_2, dim, flip_sin_to_cos, freq_shift, cond_proj=None, guidance=None):
    """diffusers Timesteps + TimestepEmbedding: sinusoid -> linear_1 -> SiLU -> linear_2.  t [B] (float) -> [B, E].
    The sinusoid is computed in t's dtype (diffusers: always float32), so float64 mode is float64 end to end.
    With cond_proj (time_cond_proj_dim; LCM-distilled UNets) the guidance embedding of w = guidance [B] is projected
    (no bias) and added to the sinusoid before linear_1 (TimestepEmbedding(sample, condition))."""
    e = ops.timestep_embedding(t, dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift,
                               dtype=t.dtype)                                     # [B, C0]
    if cond_proj is not None:
        e = e + ops.linear(guidance_embedding(guidance, cond_proj["weight"].shape[1]), cond_proj)   # [B, C0]
    return ops.linear(ops.silu(ops.linear(e, linear_1)), linear_2)                # [B, E]


def guidance_embedding(w, dim):
    """diffusers get_guidance_scale_embedding (LCM, Luo et al. 2023): [sin, cos] (no flip) of w * 1000 times the
    frequencies exp(-i ln(10000) / (half - 1)) (divisor half - 1, not the timestep sinusoid's half - shift),
    zero-padded when dim is odd.  w [B] -> [B, dim]. The arguments reach 1000 w radians, so float32 rounding of a
    frequency shows 1000-fold: the operations are diffusers' own, in its order (ln(10000) / (half - 1) first)."""
    half, dt = dim // 2, w.dtype
    step = np.asarray(np.log(np.asarray(10000.0, dt)) / np.asarray(half - 1, dt), dt)
    freqs = np.exp(np.arange(half, dtype=dt) * -step)                            # [half]
    args = (w * np.asarray(1000.0, dt))[:, None] * freqs[None, :]                 # [B, half]
    return np.pad(np.concatenate([np.sin(args), np.cos(args)], axis=-1), ((0, 0), (0, dim % 2)))   # [B, dim]


def text_time_embed(text_embeds, time_ids, *, linear_1, linear_2, dim, flip_sin_to_cos, freq_shift):
    """diffusers' addition_embed_type "text_time" (SDXL, Podell et al. 2023 sec. 2.2): each of the K time ids
    (SDXL: K = 6, [h, w, top, left, target h, target w]) through a `dim`-wide sinusoid with the UNet's own flip /
    shift, concatenated id-major after the pooled text embedding, then add_embedding (linear_1, SiLU, linear_2).
    text_embeds [B, P], time_ids [B, K] -> [B, E]; the caller adds it to the time embedding."""
    B, K = time_ids.shape
    e = ops.timestep_embedding(time_ids.reshape(-1), dim, flip_sin_to_cos=flip_sin_to_cos,
                               downscale_freq_shift=freq_shift, dtype=time_ids.dtype)   # [B*K, dim]
    e = record("unet.add_time_proj", e.reshape(B, K * dim))                      # [B, K*dim]
    h = np.concatenate([text_embeds, e], axis=-1)                                 # [B, P + K*dim]
    return ops.linear(ops.silu(ops.linear(h, linear_1)), linear_2)                # [B, E]


def conv3x3(x, p, *, separable):
    """A ResNet 3x3 conv (padding 1): nn.Conv2d, or MobileDiffusion's depthwise 3x3 + pointwise 1x1 (sec. 3.2)."""
    if not separable:
        return ops.conv2d(x, p, padding=1)                                        # [B, O, H, W]
    h = ops.conv2d(x, p["depthwise"], padding=1, groups=x.shape[1])               # [B, C, H, W]
    return ops.conv2d(h, p["pointwise"])                                          # [B, O, H, W]


def norm_silu_conv3x3(x, norm, conv, *, groups, eps, separable):
    """GroupNorm-SiLU-`conv3x3`; the dense conv is ops.norm_silu_conv2d, which never builds the normalised batch."""
    if separable:
        return conv3x3(ops.group_norm(x, norm, groups, eps, silu=True), conv, separable=True)
    return ops.norm_silu_conv2d(x, norm, conv, groups=groups, eps=eps, padding=1)         # [B, O, H, W]


def resnet(x, temb, *, norm1, conv1, norm2, conv2, time_emb_proj=None, conv_shortcut=None, groups, eps,
           separable=False):
    """diffusers ResnetBlock2D ('default' time norm, output scale 1): GN-SiLU-conv, + time projection, GN-SiLU-conv,
    + (1x1-projected) input. The VAE's ResNet is this block without a time embedding (temb None).
    x [B, C, H, W], temb [B, E] -> [B, O, H, W]. The additions are in place, on arrays this block made."""
    kw = dict(groups=groups, eps=eps, separable=separable)
    h = norm_silu_conv3x3(x, norm1, conv1, **kw)                                  # [B, O, H, W]
    if temb is not None:
        h += ops.linear(ops.silu(temb), time_emb_proj)[:, :, None, None]
    h = norm_silu_conv3x3(h, norm2, conv2, **kw)
    h += x if x.shape[1] == h.shape[1] else ops.conv2d(x, conv_shortcut)         # + skip [B, O, H, W]
    return h


def attention(x, context, *, to_q, to_out, to_k=None, to_v=None, to_kv=None, heads, weighting="softmax",
              shared_kv=False, name=None):
    """diffusers Attention: softmax(q k^T / sqrt(d)) v per head, then to_out.0; self-attention when context is None.
    MobileDiffusion shares one projection to_kv for K = V. x [B, N, C], context [B, T, D] -> [B, N, C].
    A trace that asks for the on-request point `name`.probs (name: the layer's parameters or their path) gets the
    weights (attention_probs); `name`.qk, `name`.scores: q k^T before, after the scale (precision.attention_logits)."""
    source = x if context is None else context
    q = ops.linear(x, to_q)                                                       # [B, N, C]
    if shared_kv:
        k = v = ops.linear(source, to_kv)                                         # [B, T, C]
    else:
        k, v = ops.linear(source, to_k), ops.linear(source, to_v)                 # [B, T, C]
    if name is not None:
        record_on_request(point(name, "probs"), lambda: attention_probs(q, k, heads=heads, weighting=weighting))
        record_on_request(point(name, "qk"), lambda: precision.attention_logits(q, k, heads)[0], held=True)
        record_on_request(point(name, "scores"), lambda: precision.attention_logits(q, k, heads)[1], held=True)
    return ops.linear(ops.attention(q, k, v, heads, weighting=weighting), to_out[0])   # [B, N, C]


def attention_probs(q, k, *, heads, weighting, mask=None):
    """The weight each query gives each key, per head (mask: additive): ops.attention applied to one-hot values
    (value j of every head is e_j), the layer's own kernel.  q [B, N, C], k [B, T, C] -> [B, h, N, T]."""
    B, N, T = q.shape[0], q.shape[1], k.shape[1]
    one_hot = np.tile(np.eye(T, dtype=q.dtype), (B, 1, heads))                    # [B, T, h*T]
    w = ops.attention(q, k, one_hot, heads, weighting=weighting, mask=mask)       # [B, N, h*T]
    return w.reshape(B, N, heads, T).transpose(0, 2, 1, 3)                        # [B, h, N, T]


def pixel_attention(x, *, group_norm, groups, eps, **projections):
    """The VAE mid block's diffusers Attention: GroupNorm, one head over the H*W pixels, + residual."""
    B, C, H, W = x.shape
    h = ops.group_norm(x, group_norm, groups, eps).reshape(B, C, H * W).transpose(0, 2, 1)   # [B, N, C]
    h = attention(h, None, **projections, heads=1)                                # [B, N, C]
    return x + h.transpose(0, 2, 1).reshape(B, C, H, W)                           # [B, C, H, W]


def feed_forward(x, *, net, activation):
    """diffusers FeedForward, gated: proj to (h, gate), h * act(gate), linear. activation 'geglu' (exact GELU, SD)
    or 'swiglu' (SiLU, MobileDiffusion).  x [B, N, C] -> [B, N, C]."""
    h, gate = np.split(ops.linear(x, net[0]["proj"]), 2, axis=-1)                # 2 x [B, N, inner]
    return ops.linear(h * (ops.gelu(gate) if activation == "geglu" else ops.silu(gate)), net[2])


def transformer_block(x, context, *, norm2, attn2, norm3, ff, norm1=None, attn1=None, spec):
    """diffusers BasicTransformerBlock: x += attn1(LN x) [self]; x += attn2(LN x, text); x += ff(LN x).
    A "cross" block (MobileDiffusion) has no norm1 / attn1.  x [B, N, C] -> [B, N, C]; spec: a TransformerSpec."""
    kw = dict(heads=spec.heads, weighting=spec.weighting, shared_kv=spec.shared_kv)
    if spec.kind == "full":
        h = ops.layer_norm(x, norm1, spec.layer_norm_eps)
        x = x + record(attn1, attention(h, context if spec.only_cross else None, **attn1, **kw, name=attn1))
    h = ops.layer_norm(x, norm2, spec.layer_norm_eps)
    x = x + record(attn2, attention(h, context, **attn2, **kw, name=attn2))
    h = ops.layer_norm(x, norm3, spec.layer_norm_eps)
    return x + record(ff, feed_forward(h, **ff, activation=spec.ff_activation))


def transformer_2d(x, context, *, norm, proj_in, proj_out, spec, transformer_blocks=(), block=transformer_block):
    """diffusers Transformer2DModel (continuous input): GN, proj_in, spec.depth `block`s over the pixels, proj_out,
    + x. proj_in / proj_out are Linear on [B, N, C] (use_linear_projection) or 1x1 convs.  x [B, C, H, W]."""
    B, C, H, W = x.shape
    h = ops.group_norm(x, norm, spec.groups, spec.norm_eps)
    if spec.linear_projection:
        h = ops.linear(h.reshape(B, C, H * W).transpose(0, 2, 1), proj_in)      # [B, N, C]
    else:
        h = ops.conv2d(h, proj_in).reshape(B, C, H * W).transpose(0, 2, 1)      # [B, N, C]
    for blk in transformer_blocks[:spec.depth]:
        h = record(blk, block(h, context, **blk, spec=spec))                  # [B, N, C]
    if spec.linear_projection:
        h = ops.linear(h, proj_out).transpose(0, 2, 1).reshape(B, C, H, W)      # [B, C, H, W]
    else:
        h = ops.conv2d(h.transpose(0, 2, 1).reshape(B, C, H, W), proj_out)      # [B, C, H, W]
    return h + x


def downsample(x, *, conv):
    """diffusers Downsample2D: a stride-2 3x3 conv.  [B, C, H, W] -> [B, C, H/2, W/2]."""
    return ops.conv2d(x, conv, stride=2, padding=1)


def upsample(x, *, conv):
    """diffusers Upsample2D: 2x nearest upsampling + 3x3 conv (ops.upsample_conv2d).  [B, C, H, W] -> [B, C, 2H, 2W]."""
    return ops.upsample_conv2d(x, conv, scale=2, padding=1)


# What each kind of entry of a stage's layer list (specs.Layer.kind) runs, with its parameters p and spec s.
LAYERS = {
    "resnet": lambda x, temb, context, p, s: resnet(x, temb, **p, groups=s.groups, eps=s.eps, separable=s.separable),
    "transformer": lambda x, temb, context, p, s: transformer_2d(x, context, **p, spec=s),
    "downsample": lambda x, temb, context, p, s: downsample(x, **p),
    "upsample": lambda x, temb, context, p, s: upsample(x, **p),
}


def block(x, temb, context, skips, p, st, layers=LAYERS):
    """A down block, the mid block or an up block (CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn,
    CrossAttnUpBlock2D / UpBlock2D): the layers of its stage (specs.Stage.layers) in order, each recorded under
    its parameter path. A layer marked "pop" first concatenates the last skip on channels; one marked "push"
    adds its output to the skips."""
    for layer in st.layers:
        if layer.skip == "pop":
            x = np.concatenate([x, skips.pop()], axis=1)                          # [B, C + C_skip, H, W]
        q = p[layer.group][layer.index]
        x = record(q, layers[layer.kind](x, temb, context, q, layer.spec))
        if layer.skip == "push":
            skips.append(x)
    return x


def unet(sample, timestep, context, *, conv_in, time_embedding, down_blocks, up_blocks, conv_norm_out, conv_out,
         mid_block=None, add_embedding=None, text_embeds=None, time_ids=None, guidance=None, spec):
    """UNet2DConditionModel.forward (no class conditions): time embedding (+ the guidance embedding of `guidance`
    [B] with time_cond_proj_dim; + add_embedding of text_embeds [B, P] and time_ids [B, K] with "text_time"),
    conv_in, down blocks, mid block, up blocks fed the skips in reverse, GN-SiLU-conv_out.
    sample [B, C_in, H, W], timestep [B] (float), context [B, T, D] -> [B, C_out, H, W]."""
    temb = record(time_embedding, time_embed(
        timestep, **time_embedding, dim=spec.sinusoid_dim, flip_sin_to_cos=spec.flip_sin_to_cos,
        freq_shift=spec.freq_shift, guidance=guidance))                          # [B, E]
    if spec.addition_time_embed_dim is not None:                                  # SDXL's "text_time": added
        temb = temb + record(add_embedding, text_time_embed(
            text_embeds, time_ids, **add_embedding, dim=spec.addition_time_embed_dim,
            flip_sin_to_cos=spec.flip_sin_to_cos, freq_shift=spec.freq_shift))    # [B, E]
    x = record(conv_in, ops.conv2d(sample, conv_in, padding=1))                 # [B, C0, H, W]
    skips = [x]
    blocks = [*down_blocks, *([mid_block] if spec.mid is not None else []), *up_blocks]
    for st, p in zip(spec.stages, blocks):                                        # down, mid, up
        x = record(p, block(x, temb, context, skips, p, st))
    x = ops.norm_silu_conv2d(x, conv_norm_out, conv_out, groups=spec.groups, eps=spec.resnet_eps, padding=1)
    return record("unet.out", x)                                                  # [B, C_out, H, W], the output point
