"""Parameter schemas: the ordered ``{checkpoint key: shape}`` of each component, read off its spec.

Loading checks a file against its schema (every missing, unexpected and mis-shaped key reported together), and the
seeded initialisation draws one tensor per entry, so the schema, the files and the layer signatures cannot disagree.
One set of helpers (`conv`, `linear`, `norm`, `resnet`) serves every component; keys are diffusers' /
transformers' own, plus mdref's documented MobileDiffusion extensions (``to_kv``, ``conv1.depthwise`` ...).
"""

from __future__ import annotations

from ..decoder import taesd_stages
from ..specs import KLDecoderSpec

__all__ = ["text_encoder_schema", "text_encoder_with_projection_schema", "qwen_text_schema", "unet_schema",
           "dreamlite_unet_schema", "decoder_schema", "num_parameters"]


def conv(prefix, c_out, c_in, k, bias=True):
    """nn.Conv2d(c_in, c_out, k) keys."""
    return {f"{prefix}.weight": (c_out, c_in, k, k), **({f"{prefix}.bias": (c_out,)} if bias else {})}


def linear(prefix, c_out, c_in, bias=True):
    """nn.Linear(c_in, c_out) keys."""
    return {f"{prefix}.weight": (c_out, c_in), **({f"{prefix}.bias": (c_out,)} if bias else {})}


def norm(prefix, c):
    """nn.GroupNorm / nn.LayerNorm over c channels: scale and shift."""
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def conv3x3(prefix, c_out, c_in, separable=False):
    """A ResNet 3x3 conv, or MobileDiffusion's depthwise 3x3 + pointwise 1x1."""
    if not separable:
        return conv(prefix, c_out, c_in, 3)
    return {**conv(f"{prefix}.depthwise", c_in, 1, 3), **conv(f"{prefix}.pointwise", c_out, c_in, 1)}


def resnet(prefix, c_in, c_out, temb=None, separable=False):
    """ResnetBlock2D keys; time_emb_proj only with a time embedding (UNet), conv_shortcut only when widths differ."""
    s = {**norm(f"{prefix}.norm1", c_in), **conv3x3(f"{prefix}.conv1", c_out, c_in, separable),
         **(linear(f"{prefix}.time_emb_proj", c_out, temb) if temb else {}), **norm(f"{prefix}.norm2", c_out),
         **conv3x3(f"{prefix}.conv2", c_out, c_out, separable)}
    return {**s, **(conv(f"{prefix}.conv_shortcut", c_out, c_in, 1) if c_in != c_out else {})}


def attention(prefix, dim, kv_dim, *, shared_kv=False, qkv_bias=False):
    """diffusers Attention keys: to_q, to_k + to_v (or MobileDiffusion's shared to_kv), to_out.0."""
    kv = (linear(f"{prefix}.to_kv", dim, kv_dim, qkv_bias) if shared_kv else
          {**linear(f"{prefix}.to_k", dim, kv_dim, qkv_bias), **linear(f"{prefix}.to_v", dim, kv_dim, qkv_bias)})
    return {**linear(f"{prefix}.to_q", dim, dim, qkv_bias), **kv, **linear(f"{prefix}.to_out.0", dim, dim)}


# ---- text encoder -------------------------------------------------------------------------------------------
def text_encoder_schema(cfg):
    """CLIPTextModel keys without the 'text_model.' prefix, in its parameter order."""
    D, inner = cfg.hidden_size, cfg.intermediate_size
    s = {"embeddings.token_embedding.weight": (cfg.vocab_size, D),
         "embeddings.position_embedding.weight": (cfg.max_position_embeddings, D)}
    for i in range(cfg.num_hidden_layers):
        layer = f"encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            s.update(linear(f"{layer}.self_attn.{proj}", D, D))
        s.update({**norm(f"{layer}.layer_norm1", D), **linear(f"{layer}.mlp.fc1", inner, D),
                  **linear(f"{layer}.mlp.fc2", D, inner), **norm(f"{layer}.layer_norm2", D)})
    return {**s, **norm("final_layer_norm", D)}


def text_encoder_with_projection_schema(cfg):
    """CLIPTextModelWithProjection keys: the CLIPTextModel's (without 'text_model.'), then text_projection (no bias)."""
    return {**text_encoder_schema(cfg), **linear("text_projection", cfg.projection_dim, cfg.hidden_size, bias=False)}


# ---- Qwen3-VL text path -------------------------------------------------------------------------------------
def rms(prefix, c):
    """An RMSNorm over c channels: a scale only."""
    return {f"{prefix}.weight": (c,)}


def qwen_text_schema(cfg):
    """Qwen3VLTextModel keys (no 'model.language_model.' prefix), in its parameter order."""
    D, d, inner, bias = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.attention_bias
    H, G = cfg.num_attention_heads, cfg.num_key_value_heads
    s = {"embed_tokens.weight": (cfg.vocab_size, D)}
    for i in range(cfg.num_hidden_layers):
        a, m = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        s.update({**linear(f"{a}.q_proj", H * d, D, bias), **linear(f"{a}.k_proj", G * d, D, bias),
                  **linear(f"{a}.v_proj", G * d, D, bias), **linear(f"{a}.o_proj", D, H * d, bias),
                  **rms(f"{a}.q_norm", d), **rms(f"{a}.k_norm", d), **linear(f"{m}.gate_proj", inner, D, False),
                  **linear(f"{m}.up_proj", inner, D, False), **linear(f"{m}.down_proj", D, inner, False),
                  **rms(f"layers.{i}.input_layernorm", D), **rms(f"layers.{i}.post_attention_layernorm", D)})
    return {**s, **rms("norm", D)}


# ---- UNet ---------------------------------------------------------------------------------------------------
def transformer(prefix, t, C, context_dim, attn=None):
    """Transformer2DModel keys for a TransformerSpec t at width C; attn(prefix, kv_dim) gives an attention's keys
    (default: diffusers Attention's). A "replace" block (DreamLite) has norm1 but no attn1."""
    attn = attn or (lambda p, kv_dim: attention(p, C, kv_dim, shared_kv=t.shared_kv))
    inner = t.ff_mult * C
    proj = (lambda n: linear(n, C, C)) if t.linear_projection else (lambda n: conv(n, C, C, 1))
    s = {**norm(f"{prefix}.norm", C), **proj(f"{prefix}.proj_in")}
    for k in range(t.depth):
        b = f"{prefix}.transformer_blocks.{k}"
        if t.kind != "cross":
            s.update(norm(f"{b}.norm1", C))
        if t.kind == "full":
            s.update(attn(f"{b}.attn1", context_dim if t.only_cross else C))
        s.update({**norm(f"{b}.norm2", C), **attn(f"{b}.attn2", context_dim),
                  **norm(f"{b}.norm3", C), **linear(f"{b}.ff.net.0.proj", 2 * inner, C),
                  **linear(f"{b}.ff.net.2", C, inner)})
    return {**s, **proj(f"{prefix}.proj_out")}


def _layer(prefix, layer, spec):
    """One entry of a stage's layer list (specs.Layer) under its parameter path."""
    if layer.kind == "resnet":
        return resnet(prefix, layer.c_in, layer.c_out, spec.time_embed_dim, layer.spec.separable)
    if layer.kind == "transformer":
        return transformer(prefix, layer.spec, layer.c_out, spec.context_dim)
    return conv(f"{prefix}.conv", layer.c_out, layer.c_in, 3)                  # downsample / upsample: a 3x3 conv


def unet_schema(spec):
    """UNet2DConditionModel keys (plus mdref's MobileDiffusion extensions), in module order: each stage's layers as
    its layer list gives them."""
    c0, temb = spec.down[0].layers[0].c_in, spec.time_embed_dim
    s = {**conv("conv_in", c0, spec.in_channels, 3), **linear("time_embedding.linear_1", temb, spec.sinusoid_dim)}
    if spec.time_cond_proj_dim is not None:                                  # the guidance embedding's projection
        s.update(linear("time_embedding.cond_proj", spec.sinusoid_dim, spec.time_cond_proj_dim, bias=False))
    s.update(linear("time_embedding.linear_2", temb, temb))
    if spec.addition_time_embed_dim is not None:                             # SDXL's "text_time" add_embedding
        s.update({**linear("add_embedding.linear_1", temb, spec.addition_embed_in),
                  **linear("add_embedding.linear_2", temb, temb)})
    for st in spec.stages:
        for layer in st.layers:
            s.update(_layer(f"{st.name}.{layer.name}", layer, spec))
    return {**s, **norm("conv_norm_out", c0), **conv("conv_out", spec.out_channels, c0, 3)}


# ---- DreamLite UNet -----------------------------------------------------------------------------------------
def dreamlite_resnet(prefix, c_in, c_out, temb, r):
    """ResnetBlock2DDreamLite keys for a ResnetSpec r: separable convs (bias per r.separable_bias), conv1's pointwise
    widening to r.expand * c_out (time_emb_proj and norm2 at that width), conv2's contracting back to c_out."""
    if not r.separable:
        return resnet(prefix, c_in, c_out, temb)
    wide, b = r.expand * c_out, r.separable_bias
    s = {**norm(f"{prefix}.norm1", c_in), **conv(f"{prefix}.conv1.depthwise", c_in, 1, 3, b),
         **conv(f"{prefix}.conv1.pointwise", wide, c_in, 1, b), **linear(f"{prefix}.time_emb_proj", wide, temb),
         **norm(f"{prefix}.norm2", wide), **conv(f"{prefix}.conv2.depthwise", wide, 1, 3, b),
         **conv(f"{prefix}.conv2.pointwise", c_out, wide, 1, b)}
    return {**s, **(conv(f"{prefix}.conv_shortcut", c_out, c_in, 1) if c_in != c_out else {})}


def mqa_attention(prefix, dim, kv_dim, t):
    """DreamLite's diffusers Attention keys: to_q, to_k / to_v of t.kv_heads heads, norm_q / norm_k (RMSNorm over
    one head's width) with qk_norm, to_out.0."""
    d = dim // t.heads
    kv = (t.kv_heads or t.heads) * d
    qk = {**rms(f"{prefix}.norm_q", d), **rms(f"{prefix}.norm_k", d)} if t.qk_norm_eps is not None else {}
    return {**linear(f"{prefix}.to_q", dim, dim, False), **linear(f"{prefix}.to_k", kv, kv_dim, False),
            **linear(f"{prefix}.to_v", kv, kv_dim, False), **qk, **linear(f"{prefix}.to_out.0", dim, dim)}


def dreamlite_unet_schema(spec):
    """DreamLiteUNetModel keys in module order: conv_in, time_embedding, encoder_hid_proj (Linear + RMSNorm),
    add_embedding, the stages, conv_norm_out, conv_out."""
    c0, temb, D = spec.down[0].layers[0].c_in, spec.time_embed_dim, spec.context_dim
    s = {**conv("conv_in", c0, spec.in_channels, 3), **linear("time_embedding.linear_1", temb, spec.sinusoid_dim),
         **linear("time_embedding.linear_2", temb, temb), **linear("encoder_hid_proj.0", D, spec.text_dim),
         **rms("encoder_hid_proj.1", D), **linear("add_embedding.linear_1", temb, spec.time_ids * spec.time_ids_dim),
         **linear("add_embedding.linear_2", temb, temb)}
    for st in spec.stages:
        for layer in st.layers:
            prefix = f"{st.name}.{layer.name}"
            if layer.kind == "resnet":
                s.update(dreamlite_resnet(prefix, layer.c_in, layer.c_out, temb, layer.spec))
            elif layer.kind == "transformer":
                C, t = layer.c_out, layer.spec
                s.update(transformer(prefix, t, C, D, attn=lambda p, kv_dim: mqa_attention(p, C, kv_dim, t)))
            else:
                s.update(_layer(prefix, layer, spec))
    return {**s, **norm("conv_norm_out", c0), **conv("conv_out", spec.out_channels, c0, 3)}


# ---- decoders -----------------------------------------------------------------------------------------------
def _kl(spec):
    c, top = spec.latent_channels, spec.widths[0]
    s = conv("post_quant_conv", c, c, 1) if spec.post_quant_conv else {}
    s.update({**conv("decoder.conv_in", top, c, 3), **resnet("decoder.mid_block.resnets.0", top, top)})
    if spec.mid_attention:
        a = "decoder.mid_block.attentions.0"
        s.update({**norm(f"{a}.group_norm", top), **attention(a, top, top, qkv_bias=True)})
    s.update(resnet("decoder.mid_block.resnets.1", top, top))
    prev = top
    for i, w in enumerate(spec.widths):                                   # up_blocks.0 is the lowest resolution
        for j in range(spec.resnets_per_block):
            s.update(resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else w, w))
        if i < len(spec.widths) - 1:
            s.update(conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", w, w, 3))
        prev = w
    return {**s, **norm("decoder.conv_norm_out", spec.widths[-1]),
            **conv("decoder.conv_out", spec.out_channels, spec.widths[-1], 3)}


def _taesd(spec):
    s, w = {}, spec.width
    for i, stage in enumerate(taesd_stages(spec)):
        key = f"decoder.layers.{i}"
        if stage == "block":
            for j in (0, 2, 4):
                s.update(conv(f"{key}.conv.{j}", w, w, 3))
        elif stage == "conv_nobias":
            s.update(conv(key, w, w, 3, bias=False))
        elif stage == "conv":                                             # the first conv, or conv_out
            s.update(conv(key, w, spec.latent_channels, 3) if i == 0 else conv(key, spec.out_channels, w, 3))
    return s


def decoder_schema(spec):
    """Decode-side keys (post_quant_conv + decoder.*) in module order, diffusers names."""
    return _kl(spec) if isinstance(spec, KLDecoderSpec) else _taesd(spec)


def num_parameters(schema):
    n = 0
    for shape in schema.values():
        size = 1
        for d in shape:
            size *= d
        n += size
    return n
