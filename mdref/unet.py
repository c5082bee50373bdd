"""The UNet: one config-driven implementation of diffusers' ``UNet2DConditionModel`` (SD-family layouts) and of
the MobileDiffusion (MD) architecture, as specified in docs/mobilediffusion_unet.md.

``unet(sample, timestep, context)`` == ``UNet2DConditionModel(sample, timestep, context).sample``:
sample [B, C_in, H, W] (H, W divisible by 2**(levels-1)), timestep a scalar or [B], context [B, T, D];
returns [B, C_out, H, W] (epsilon, v or x0 as ``config.prediction_type`` says; the UNet does not care).

Conventions
- Parameters are the checkpoint's own tree (``p["down_blocks"]["1"]["attentions"]["0"]...``); the per-stage
  facts the forward pass needs (channels, heads, transformer kind, separable convs) come from ``stage_plan(cfg)``,
  which ``param_schema`` uses too, so the schema and the forward pass cannot disagree.
- Epsilons, exactly as diffusers uses them, each set in one place: ResNet and output GroupNorms use
  ``config.norm_eps``; the transformer input GroupNorm uses ``TRANSFORMER_NORM_EPS`` (1e-6);
  the transformer block LayerNorms use ``LAYER_NORM_EPS`` (1e-5).
- Timestep embedding: diffusers computes the sinusoidal embedding in float32 whatever the model dtype, then
  casts it. mdref computes it in the compute dtype (float32, or float64 in float64 mode), so float64 mode is
  float64 end to end; float32 mode matches diffusers exactly.
- ``upcast_attention`` only changes fp16/bf16 arithmetic in diffusers; in float32 / float64 it has no effect,
  so it is read and ignored.
- MobileDiffusion extensions (config keys absent from diffusers; defaults reproduce diffusers):
  ``transformer_kind`` per level ("none" | "cross" | "full"; "cross" = cross-attention + FFN, no norm1/attn1),
  ``mid_transformer_layers``, ``shared_kv`` (one ``to_kv`` projection gives K = V), ``attention_weighting``
  ("softmax" | "relu": relu(q k^T / sqrt(d)) / n_keys), ``ff_activation`` ("geglu" | "swiglu"), ``ff_mult``,
  ``separable_conv`` per level (ResNet conv1/conv2 as depthwise 3x3 + pointwise 1x1), ``prediction_type``.
  The mid block is always made of full blocks (as diffusers' UNetMidBlock2DCrossAttn) and uses the innermost
  level's heads, cross_attention_dim and separable_conv.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import ops, weights
from .config import ConfigError, from_dict, read_json, to_dict
from .trace import record

__all__ = ["UNet", "UNetConfig", "ConfigError", "Stage", "stage_plan", "param_schema", "unet_forward",
           "resnet_block", "conv3x3", "attention", "feed_forward", "transformer_block", "transformer_2d",
           "time_embedding", "down_block", "mid_block", "up_block", "PRESETS"]

# ---- the epsilons diffusers uses (ResNet / output GroupNorms use config.norm_eps) ---------------------------
TRANSFORMER_NORM_EPS = 1e-6     # Transformer2DModel.norm (GroupNorm at the transformer input)
LAYER_NORM_EPS = 1e-5           # BasicTransformerBlock norm1 / norm2 / norm3

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"

# ---- config ---------------------------------------------------------------------------------------------------
DOWN_BLOCKS = {"CrossAttnDownBlock2D": "full", "DownBlock2D": "none"}   # block type -> default transformer kind
UP_BLOCKS = {"CrossAttnUpBlock2D": "full", "UpBlock2D": "none"}
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)
KINDS = ("none", "cross", "full")

# diffusers keys whose only supported value is diffusers' default (any other value raises ConfigError).
DEFAULT_ONLY = {
    "center_input_sample": (False,), "downsample_padding": (1,), "mid_block_scale_factor": (1,),
    "act_fn": ("silu", "swish"), "reverse_transformer_layers_per_block": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "num_attention_heads": (None,), "dual_cross_attention": (False,),
    "class_embed_type": (None,), "addition_embed_type": (None,), "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,), "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,), "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",), "class_embeddings_concat": (False,), "cross_attention_norm": (None,),
}
# diffusers keys with no effect on this forward pass, ignored on purpose.
IGNORED = {
    "dropout": "inference only",
    "mid_block_only_cross_attention": "read only by UNetMidBlock2DSimpleCrossAttn, which mdref does not build",
    "addition_embed_type_num_heads": "read only when addition_embed_type is set (it must be null)",
}


@dataclass
class UNetConfig:
    """diffusers UNet2DConditionModel config.json fields (defaults = diffusers') plus mdref's MD extensions."""
    sample_size: int | list | None = None               # default latent size (read by pipelines only)
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: list = field(default_factory=lambda: ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: list = field(default_factory=lambda: ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    only_cross_attention: bool | list = False            # diffusers: attn1 attends to the text too
    block_out_channels: list = field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_block: int | list = 2                     # ResNets per down block; up blocks get one more
    transformer_layers_per_block: int | list = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5                               # ResNet and output GroupNorm eps
    cross_attention_dim: int | list = 1280
    attention_head_dim: int | list = 8                   # SD convention: the number of heads per level
    use_linear_projection: bool = False
    upcast_attention: bool = False                       # no effect in float32 / float64
    # ---- mdref extensions (MobileDiffusion); defaults reproduce diffusers ----
    transformer_kind: list | None = None                 # per level "none" | "cross" | "full"; None: from block types
    mid_transformer_layers: int | None = None            # None: transformer_layers_per_block[-1]
    shared_kv: bool = False
    attention_weighting: str = "softmax"                 # "softmax" | "relu"
    ff_activation: str = "geglu"                         # "geglu" | "swiglu"
    ff_mult: int = 4
    separable_conv: list | None = None                   # per level bool; None: all false
    prediction_type: str = "epsilon"                     # read by the sampler, not by the UNet

    EXTENSIONS = ("transformer_kind", "mid_transformer_layers", "shared_kv", "attention_weighting",
                  "ff_activation", "ff_mult", "separable_conv", "prediction_type")

    @classmethod
    def from_dict(cls, d, where="UNetConfig"):
        """Build from a diffusers / mdref config dict; unsupported keys or values raise ConfigError naming them."""
        for key, allowed in DEFAULT_ONLY.items():
            if key in d and d[key] not in allowed:
                raise ConfigError(f"{where}: {key}={d[key]!r} is not supported (mdref implements only "
                                  f"{' or '.join(repr(a) for a in allowed)})")
        return from_dict(cls, d, ignore=set(DEFAULT_ONLY) | set(IGNORED), where=where)

    def __post_init__(self):
        for key in ("down_block_types", "up_block_types", "block_out_channels", "transformer_kind", "separable_conv"):
            if isinstance(getattr(self, key), tuple):
                setattr(self, key, list(getattr(self, key)))
        L = self.levels
        if L < 1 or len(self.down_block_types) != L or len(self.up_block_types) != L:
            raise ConfigError(f"UNetConfig: block_out_channels ({L} levels), down_block_types "
                              f"({len(self.down_block_types)}) and up_block_types ({len(self.up_block_types)}) "
                              f"must have the same length")
        for key, table in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            for t in getattr(self, key):
                if t not in table:
                    raise ConfigError(f"UNetConfig: {key} contains {t!r}; supported: {sorted(table)}")
        if self.mid_block_type not in MID_BLOCKS:
            raise ConfigError(f"UNetConfig: mid_block_type={self.mid_block_type!r}; supported: {list(MID_BLOCKS)}")
        if not isinstance(self.norm_num_groups, int):
            raise ConfigError(f"UNetConfig: norm_num_groups={self.norm_num_groups!r} must be an int")
        for key in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim",
                    "cross_attention_dim", "only_cross_attention", "transformer_kind", "separable_conv"):
            self.per_level(key)                          # validates lengths and element types
        if len(set(self.per_level("cross_attention_dim"))) != 1:
            raise ConfigError(f"UNetConfig: cross_attention_dim {self.cross_attention_dim} differs between levels; "
                              f"one context tensor feeds every level, so mdref needs a single width")
        if self.mid_transformer_layers is not None and self.mid_block_type is None:
            raise ConfigError("UNetConfig: mid_transformer_layers is set but mid_block_type is null (no mid block)")
        if self.mid_transformer_layers is not None and not (isinstance(self.mid_transformer_layers, int)
                                                            and self.mid_transformer_layers >= 1):
            raise ConfigError(f"UNetConfig: mid_transformer_layers={self.mid_transformer_layers!r} must be an int >= 1")
        for key, allowed in (("attention_weighting", ("softmax", "relu")), ("ff_activation", ("geglu", "swiglu")),
                             ("prediction_type", ("epsilon", "v_prediction", "sample"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"UNetConfig: {key}={getattr(self, key)!r}; supported: {list(allowed)}")
        if not (isinstance(self.ff_mult, int) and self.ff_mult >= 1):
            raise ConfigError(f"UNetConfig: ff_mult={self.ff_mult!r} must be an int >= 1")
        stage_plan(self)                                 # checks kinds vs block types, heads vs channels

    @property
    def levels(self):
        return len(self.block_out_channels)

    def per_level(self, key):
        """The value of `key` for each level (down-block order), expanding a scalar; checks the list length."""
        value = getattr(self, key)
        defaults = {"transformer_kind": [DOWN_BLOCKS[t] for t in self.down_block_types],
                    "separable_conv": [False] * self.levels}
        if value is None and key in defaults:
            return defaults[key]
        kind = bool if key in ("only_cross_attention", "separable_conv") else str if key == "transformer_kind" else int
        values = list(value) if isinstance(value, (list, tuple)) else [value] * self.levels
        if len(values) != self.levels:
            raise ConfigError(f"UNetConfig: {key} has {len(values)} entries, expected one per level ({self.levels})")
        least = 0 if key == "transformer_layers_per_block" else 1     # 0 is usual on levels without a transformer
        for v in values:
            if not isinstance(v, kind) or (kind is int and (isinstance(v, bool) or v < least)):
                raise ConfigError(f"UNetConfig: {key} entry {v!r} is not supported "
                                  f"(expected {f'an int >= {least}' if kind is int else kind.__name__})")
            if key == "transformer_kind" and v not in KINDS:
                raise ConfigError(f"UNetConfig: transformer_kind entry {v!r}; supported: {list(KINDS)}")
        return values

    def to_dict(self):
        """config.json content: diffusers keys always, mdref extensions only where they differ from the default."""
        d = {"_class_name": "UNet2DConditionModel"}
        defaults = UNetConfig()
        for k, v in to_dict(self).items():
            if k not in self.EXTENSIONS or v != getattr(defaults, k):
                d[k] = v
        return d


# ---- the stage plan: what every block is, derived once from the config -----------------------------------------
@dataclass(frozen=True)
class Stage:
    """One down / mid / up block: its ResNets' (in, out) channels and the settings of its transformers."""
    name: str                   # checkpoint prefix: "down_blocks.0", "mid_block", "up_blocks.2"
    resnets: tuple              # ((c_in, c_out), ...); c_in of an up-block ResNet includes the skip channels
    channels: int               # output channels = transformer width
    kind: str                   # transformer kind: "none" | "cross" | "full"
    transformer_layers: int     # BasicTransformerBlocks per Transformer2DModel
    heads: int
    cross_dim: int              # context width D
    only_cross: bool            # diffusers only_cross_attention: attn1 attends to the context too
    separable: bool             # ResNet conv1/conv2 separable
    resample: str | None        # "down" | "up" | None


def stage_plan(cfg):
    """(down stages, mid stage or None, up stages), reproducing UNet2DConditionModel.__init__'s channel plan."""
    L, ch = cfg.levels, cfg.block_out_channels
    layers, tlayers = cfg.per_level("layers_per_block"), cfg.per_level("transformer_layers_per_block")
    heads, cross = cfg.per_level("attention_head_dim"), cfg.per_level("cross_attention_dim")
    only_cross, sep = cfg.per_level("only_cross_attention"), cfg.per_level("separable_conv")
    kinds = cfg.per_level("transformer_kind")

    def stage(name, level, resnets, kind, n_layers, resample, block_type):
        """block_type None: the mid block (full blocks; diffusers' mid block ignores only_cross_attention)."""
        if block_type is not None and (kind == "none") != (block_type in ("DownBlock2D", "UpBlock2D")):
            raise ConfigError(f"UNetConfig: transformer_kind {kind!r} of level {level} does not fit {name} "
                              f"of type {block_type}")
        if kind == "cross" and only_cross[level]:
            raise ConfigError(f"UNetConfig: only_cross_attention is set on level {level}, whose transformer_kind "
                              f"is 'cross' (no attn1 to change)")
        if kind != "none" and ch[level] % heads[level]:
            raise ConfigError(f"UNetConfig: attention_head_dim (heads) {heads[level]} does not divide "
                              f"block_out_channels[{level}] = {ch[level]}")
        return Stage(name, tuple(resnets), ch[level], kind, n_layers, heads[level], cross[level],
                     only_cross[level] and kind == "full" and block_type is not None, sep[level], resample)

    down, c = [], ch[0]
    for i in range(L):
        rs = [(c if j == 0 else ch[i], ch[i]) for j in range(layers[i])]
        down.append(stage(f"down_blocks.{i}", i, rs, kinds[i], tlayers[i], "down" if i < L - 1 else None,
                          cfg.down_block_types[i]))
        c = ch[i]
    mid = None
    if cfg.mid_block_type is not None:
        n = cfg.mid_transformer_layers or tlayers[-1]
        mid = stage("mid_block", L - 1, [(ch[-1], ch[-1])] * 2, "full", n, None, None)
    up, prev = [], ch[-1]
    for i in range(L):
        level = L - 1 - i                                 # up_blocks.0 is the innermost level
        skip_in = ch[max(level - 1, 0)]                   # diffusers' `input_channel` of this up block
        n = layers[level] + 1
        rs = [((prev if j == 0 else ch[level]) + (skip_in if j == n - 1 else ch[level]), ch[level]) for j in range(n)]
        kind = kinds[level] if cfg.transformer_kind is not None else UP_BLOCKS[cfg.up_block_types[i]]
        up.append(stage(f"up_blocks.{i}", level, rs, kind, tlayers[level], "up" if i < L - 1 else None,
                        cfg.up_block_types[i]))
        prev = ch[level]
    return down, mid, up


# ---- weight schema ----------------------------------------------------------------------------------------------
def _conv(prefix, c_out, c_in, k):
    return {f"{prefix}.weight": (c_out, c_in, k, k), f"{prefix}.bias": (c_out,)}


def _linear(prefix, c_out, c_in, bias=True):
    return {f"{prefix}.weight": (c_out, c_in), **({f"{prefix}.bias": (c_out,)} if bias else {})}


def _norm(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _conv3x3_schema(prefix, c_out, c_in, separable):
    if not separable:
        return _conv(prefix, c_out, c_in, 3)
    return {**_conv(f"{prefix}.depthwise", c_in, 1, 3), **_conv(f"{prefix}.pointwise", c_out, c_in, 1)}


def _resnet_schema(prefix, c_in, c_out, temb, separable):
    s = {**_norm(f"{prefix}.norm1", c_in), **_conv3x3_schema(f"{prefix}.conv1", c_out, c_in, separable),
         **_linear(f"{prefix}.time_emb_proj", c_out, temb), **_norm(f"{prefix}.norm2", c_out),
         **_conv3x3_schema(f"{prefix}.conv2", c_out, c_out, separable)}
    if c_in != c_out:
        s.update(_conv(f"{prefix}.conv_shortcut", c_out, c_in, 1))
    return s


def _attention_schema(prefix, dim, kv_dim, shared_kv):
    kv = (_linear(f"{prefix}.to_kv", dim, kv_dim, bias=False) if shared_kv else
          {**_linear(f"{prefix}.to_k", dim, kv_dim, bias=False), **_linear(f"{prefix}.to_v", dim, kv_dim, bias=False)})
    return {**_linear(f"{prefix}.to_q", dim, dim, bias=False), **kv, **_linear(f"{prefix}.to_out.0", dim, dim)}


def _transformer_schema(prefix, st, cfg):
    C, inner = st.channels, cfg.ff_mult * st.channels
    proj = (lambda n, o, i: _linear(n, o, i)) if cfg.use_linear_projection else (lambda n, o, i: _conv(n, o, i, 1))
    s = {**_norm(f"{prefix}.norm", C), **proj(f"{prefix}.proj_in", C, C)}
    for k in range(st.transformer_layers):
        b = f"{prefix}.transformer_blocks.{k}"
        if st.kind == "full":
            s.update({**_norm(f"{b}.norm1", C),
                      **_attention_schema(f"{b}.attn1", C, st.cross_dim if st.only_cross else C, cfg.shared_kv)})
        s.update({**_norm(f"{b}.norm2", C), **_attention_schema(f"{b}.attn2", C, st.cross_dim, cfg.shared_kv),
                  **_norm(f"{b}.norm3", C), **_linear(f"{b}.ff.net.0.proj", 2 * inner, C),
                  **_linear(f"{b}.ff.net.2", C, inner)})
    s.update(proj(f"{prefix}.proj_out", C, C))
    return s


def _stage_schema(st, temb, cfg):
    s = {}
    for j, (c_in, c_out) in enumerate(st.resnets):
        s.update(_resnet_schema(f"{st.name}.resnets.{j}", c_in, c_out, temb, st.separable))
        if st.kind != "none" and (st.name != "mid_block" or j == 0):   # the mid block: resnet, attention, resnet
            s.update(_transformer_schema(f"{st.name}.attentions.{j}", st, cfg))
    if st.resample == "down":
        s.update(_conv(f"{st.name}.downsamplers.0.conv", st.channels, st.channels, 3))
    if st.resample == "up":
        s.update(_conv(f"{st.name}.upsamplers.0.conv", st.channels, st.channels, 3))
    return s


def param_schema(cfg):
    """Ordered {checkpoint key: shape} of the UNet: the diffusers keys plus mdref's documented extensions."""
    c0, temb = cfg.block_out_channels[0], 4 * cfg.block_out_channels[0]
    down, mid, up = stage_plan(cfg)
    s = {**_conv("conv_in", c0, cfg.in_channels, 3),
         **_linear("time_embedding.linear_1", temb, c0), **_linear("time_embedding.linear_2", temb, temb)}
    for st in down + ([mid] if mid else []) + up:
        s.update(_stage_schema(st, temb, cfg))
    s.update({**_norm("conv_norm_out", c0), **_conv("conv_out", cfg.out_channels, c0, 3)})
    return s


# ---- layers -----------------------------------------------------------------------------------------------------
def time_embedding(p, t, dim, *, flip_sin_to_cos, freq_shift, dtype):
    """diffusers Timesteps + TimestepEmbedding: sinusoidal embedding -> linear_1 -> SiLU -> linear_2.
    t [B] -> [B, 4*C0]; the sinusoid is computed in `dtype` (diffusers: always float32)."""
    e = ops.timestep_embedding(t, dim, flip_sin_to_cos=flip_sin_to_cos, downscale_freq_shift=freq_shift,
                               dtype=dtype)                                       # [B, C0]
    return ops.linear(ops.silu(ops.linear(e, p["linear_1"])), p["linear_2"])      # [B, 4*C0]


def conv3x3(p, x, *, separable):
    """A ResNet 3x3 conv (padding 1): nn.Conv2d, or MobileDiffusion's separable depthwise 3x3 + pointwise 1x1."""
    if not separable:
        return ops.conv2d(x, p, padding=1)                                        # [B, O, H, W]
    h = ops.conv2d(x, p["depthwise"], padding=1, groups=x.shape[1])               # [B, C, H, W]
    return ops.conv2d(h, p["pointwise"])                                          # [B, O, H, W]


def resnet_block(p, x, temb, *, groups, eps, separable):
    """diffusers ResnetBlock2D (time_embedding_norm 'default', output_scale_factor 1): GN-SiLU-conv,
    + time projection, GN-SiLU-conv, + (1x1-projected) input.  x [B, C, H, W], temb [B, T] -> [B, O, H, W]."""
    h = conv3x3(p["conv1"], ops.silu(ops.group_norm(x, p["norm1"], groups, eps)), separable=separable)  # [B, O, H, W]
    h = h + ops.linear(ops.silu(temb), p["time_emb_proj"])[:, :, None, None]
    h = conv3x3(p["conv2"], ops.silu(ops.group_norm(h, p["norm2"], groups, eps)), separable=separable)
    skip = ops.conv2d(x, p["conv_shortcut"]) if "conv_shortcut" in p else x      # [B, O, H, W]
    return skip + h


def attention(p, x, context, *, heads, shared_kv, weighting):
    """diffusers Attention (to_q, to_k, to_v, to_out.0); self-attention when context is None.
    shared_kv (MobileDiffusion): one projection to_kv gives K = V. x [B, N, C], context [B, T, D] -> [B, N, C]."""
    kv_in = x if context is None else context
    q = ops.linear(x, p["to_q"])                                                  # [B, N, C]
    if shared_kv:
        k = v = ops.linear(kv_in, p["to_kv"])                                     # [B, T, C]
    else:
        k, v = ops.linear(kv_in, p["to_k"]), ops.linear(kv_in, p["to_v"])         # [B, T, C]
    o = ops.attention(q, k, v, heads, weighting=weighting)                        # [B, N, C]
    return ops.linear(o, p["to_out"]["0"])


def feed_forward(p, x, *, activation):
    """diffusers FeedForward with a gated unit: proj -> (h, gate) halves -> h * act(gate) -> linear.
    activation 'geglu': exact GELU (GEGLU); 'swiglu': SiLU (MobileDiffusion).  x [B, N, C] -> [B, N, C]."""
    h, gate = np.split(ops.linear(x, p["net"]["0"]["proj"]), 2, axis=-1)       # 2 x [B, N, inner]
    act = ops.gelu(gate) if activation == "geglu" else ops.silu(gate)
    return ops.linear(h * act, p["net"]["2"])                                     # [B, N, C]


def transformer_block(p, x, context, *, kind, only_cross, heads, shared_kv, weighting, ff_activation, eps, name):
    """diffusers BasicTransformerBlock (kind 'full'): x += attn1(norm1 x); x += attn2(norm2 x, ctx); x += ff(norm3 x).
    kind 'cross' (MobileDiffusion): no norm1/attn1. only_cross: attn1 attends to the context (diffusers).
    x [B, N, C] -> [B, N, C]."""
    opts = dict(heads=heads, shared_kv=shared_kv, weighting=weighting)
    if kind == "full":
        h = ops.layer_norm(x, p["norm1"], eps)
        x = x + record(f"{name}.attn1", attention(p["attn1"], h, context if only_cross else None, **opts))
    x = x + record(f"{name}.attn2", attention(p["attn2"], ops.layer_norm(x, p["norm2"], eps), context, **opts))
    x = x + record(f"{name}.ff", feed_forward(p["ff"], ops.layer_norm(x, p["norm3"], eps), activation=ff_activation))
    return record(name, x)


def transformer_2d(p, x, context, st, cfg, *, name):
    """diffusers Transformer2DModel (continuous input): GN -> proj_in -> blocks -> proj_out -> + x.
    proj_in/proj_out are Linear on [B, HW, C] when use_linear_projection, else 1x1 convs.  x [B, C, H, W]."""
    B, C, H, W = x.shape
    h = ops.group_norm(x, p["norm"], cfg.norm_num_groups, TRANSFORMER_NORM_EPS)
    if cfg.use_linear_projection:
        h = ops.linear(h.transpose(0, 2, 3, 1).reshape(B, H * W, C), p["proj_in"])    # [B, HW, C]
    else:
        h = ops.conv2d(h, p["proj_in"]).transpose(0, 2, 3, 1).reshape(B, H * W, C)  # [B, HW, C]
    for k in range(st.transformer_layers):
        h = transformer_block(p["transformer_blocks"][str(k)], h, context, kind=st.kind, only_cross=st.only_cross,
                              heads=st.heads, shared_kv=cfg.shared_kv, weighting=cfg.attention_weighting,
                              ff_activation=cfg.ff_activation, eps=LAYER_NORM_EPS,
                              name=f"{name}.transformer_blocks.{k}")
    if cfg.use_linear_projection:
        h = ops.linear(h, p["proj_out"]).reshape(B, H, W, C).transpose(0, 3, 1, 2)    # [B, C, H, W]
    else:
        h = ops.conv2d(h.reshape(B, H, W, C).transpose(0, 3, 1, 2), p["proj_out"])  # [B, C, H, W]
    return h + x


def _resnet(p, x, temb, st, cfg, name):
    return record(name, resnet_block(p, x, temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, separable=st.separable))


def down_block(p, x, temb, context, st, cfg):
    """CrossAttnDownBlock2D / DownBlock2D: (ResNet [, transformer]) per layer, then a stride-2 3x3 conv.
    Returns the output [B, C, H', W'] and the skips it adds (one per layer, one after the downsampler)."""
    skips = []
    for j in range(len(st.resnets)):
        x = _resnet(p["resnets"][str(j)], x, temb, st, cfg, f"unet.{st.name}.resnets.{j}")
        if st.kind != "none":
            x = record(f"unet.{st.name}.attentions.{j}", transformer_2d(
                p["attentions"][str(j)], x, context, st, cfg, name=f"unet.{st.name}.attentions.{j}"))
        skips.append(x)
    if st.resample == "down":
        x = ops.conv2d(x, p["downsamplers"]["0"]["conv"], stride=2, padding=1)   # [B, C, H/2, W/2]
        skips.append(record(f"unet.{st.name}.downsamplers.0", x))
    return record(f"unet.{st.name}", x), skips


def mid_block(p, x, temb, context, st, cfg):
    """UNetMidBlock2DCrossAttn: ResNet -> Transformer2DModel (full blocks) -> ResNet.  x [B, C, h, w]."""
    x = _resnet(p["resnets"]["0"], x, temb, st, cfg, "unet.mid_block.resnets.0")
    x = record("unet.mid_block.attentions.0", transformer_2d(p["attentions"]["0"], x, context, st, cfg,
                                                             name="unet.mid_block.attentions.0"))
    x = _resnet(p["resnets"]["1"], x, temb, st, cfg, "unet.mid_block.resnets.1")
    return record("unet.mid_block", x)


def up_block(p, x, temb, context, skips, st, cfg):
    """CrossAttnUpBlock2D / UpBlock2D: per layer concat the last skip on channels, ResNet [, transformer];
    then nearest 2x upsampling and a 3x3 conv.  skips: this block's skips, innermost last."""
    for j in range(len(st.resnets)):
        x = np.concatenate([x, skips[-1 - j]], axis=1)                            # [B, C + C_skip, H, W]
        x = _resnet(p["resnets"][str(j)], x, temb, st, cfg, f"unet.{st.name}.resnets.{j}")
        if st.kind != "none":
            x = record(f"unet.{st.name}.attentions.{j}", transformer_2d(
                p["attentions"][str(j)], x, context, st, cfg, name=f"unet.{st.name}.attentions.{j}"))
    if st.resample == "up":
        x = ops.conv2d(ops.upsample_nearest2d(x, 2), p["upsamplers"]["0"]["conv"], padding=1)   # [B, C, 2H, 2W]
        record(f"unet.{st.name}.upsamplers.0", x)
    return record(f"unet.{st.name}", x)


def unet_forward(p, cfg, sample, timestep, context):
    """UNet2DConditionModel.forward (no class / added conditions): time embedding, conv_in, down, mid, up,
    GN-SiLU-conv_out.  sample [B, C_in, H, W], timestep [B], context [B, T, D] -> [B, C_out, H, W]."""
    down, mid, up = stage_plan(cfg)
    temb = record("unet.time_embedding", time_embedding(
        p["time_embedding"], timestep, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=cfg.freq_shift, dtype=sample.dtype))                         # [B, 4*C0]
    x = record("unet.conv_in", ops.conv2d(sample, p["conv_in"], padding=1))     # [B, C0, H, W]
    skips = [x]
    for i, st in enumerate(down):
        x, new = down_block(p["down_blocks"][str(i)], x, temb, context, st, cfg)
        skips += new
    if mid is not None:
        x = mid_block(p["mid_block"], x, temb, context, mid, cfg)
    for i, st in enumerate(up):
        n = len(st.resnets)
        x = up_block(p["up_blocks"][str(i)], x, temb, context, skips[-n:], st, cfg)
        del skips[-n:]
    x = ops.silu(ops.group_norm(x, p["conv_norm_out"], cfg.norm_num_groups, cfg.norm_eps))
    return record("unet.out", ops.conv2d(x, p["conv_out"], padding=1))          # [B, C_out, H, W]


# ---- presets ----------------------------------------------------------------------------------------------------
PRESETS = {
    # MobileDiffusion as mdref reads it (DESIGN.md; choices and the parameter breakdown in weights/README.md).
    "mobilediffusion": dict(
        sample_size=64, in_channels=8, out_channels=8,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[320, 640, 1024], layers_per_block=[2, 1, 1], transformer_layers_per_block=[0, 1, 1],
        attention_head_dim=[5, 10, 16], cross_attention_dim=768, use_linear_projection=True,
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
        transformer_kind=["none", "cross", "full"], mid_transformer_layers=16, shared_kv=True,
        attention_weighting="softmax", ff_activation="swiglu", ff_mult=3, separable_conv=[False, True, True],
        prediction_type="epsilon"),
}


# ---- the object shell -------------------------------------------------------------------------------------------
class UNet:
    """A UNet2DConditionModel-compatible UNet: holds `config`, `params` (the checkpoint tree) and `dtype`."""

    def __init__(self, config, params, dtype=np.float32):
        if np.dtype(dtype) not in (np.float32, np.float64):
            raise ValueError(f"UNet: dtype must be float32 or float64, got {np.dtype(dtype)}")
        self.config, self.params, self.dtype = config, params, np.dtype(dtype)

    @classmethod
    def from_config(cls, config, seed=0, dtype=np.float32):
        """Seeded weights (weights.init_params) for a UNetConfig or a config dict."""
        cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(dict(config))
        return cls(cfg, weights.init_params(param_schema(cfg), seed, dtype), dtype)

    @classmethod
    def from_preset(cls, name, seed=0, dtype=np.float32):
        if name not in PRESETS:
            raise ValueError(f"UNet.from_preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls.from_config(UNetConfig.from_dict(PRESETS[name], where=f"preset {name!r}"), seed, dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=np.float32):
        """A diffusers UNet2DConditionModel folder (config.json + diffusion_pytorch_model[.fp16].safetensors), the
        same layout written by save_pretrained, or a diffusers pipeline folder (its unet/ subfolder)."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file() and (path / "unet" / CONFIG_NAME).is_file():
            path = path / "unet"
        cfg = UNetConfig.from_dict(read_json(path / CONFIG_NAME), where=str(path / CONFIG_NAME))
        candidates = [path / WEIGHTS_NAME, path / "diffusion_pytorch_model.fp16.safetensors"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise weights.WeightsError(f"{path}: no {WEIGHTS_NAME} (mdref reads safetensors only)")
        params, _ = weights.load_params(found[0], param_schema(cfg), dtype)
        return cls(cfg, params, dtype)

    def save_pretrained(self, folder, dtype=np.float32):
        """Write config.json + diffusion_pytorch_model.safetensors (the layout from_pretrained reads)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        flat = {k: np.asarray(v, dtype=dtype) for k, v in weights.flatten(self.params).items()}
        weights.write_safetensors(folder / WEIGHTS_NAME, flat, {"format": "pt"})

    def num_parameters(self):
        return sum(int(np.prod(shape)) for shape in param_schema(self.config).values())

    def __call__(self, sample, timestep, context):
        """Predict from a noisy latent: sample [B, C_in, H, W], timestep scalar or [B], context [B, T, D]
        -> [B, C_out, H, W] (== UNet2DConditionModel(sample, timestep, context).sample)."""
        cfg = self.config
        sample = np.asarray(sample, dtype=self.dtype)
        context = np.asarray(context, dtype=self.dtype)
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet: sample must be [B, {cfg.in_channels}, H, W], got shape {sample.shape}")
        B, _, H, W = sample.shape
        f = 2 ** (cfg.levels - 1)
        if H % f or W % f:
            raise ValueError(f"UNet: sample height and width must be divisible by {f} (2**(levels-1), "
                             f"{cfg.levels} levels), got H={H}, W={W}")
        D = cfg.per_level("cross_attention_dim")[0]
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != D:
            raise ValueError(f"UNet: context must be [B={B}, T, {D}], got shape {context.shape}")
        t = np.asarray(timestep, dtype=np.float64).reshape(-1)
        if t.size not in (1, B):
            raise ValueError(f"UNet: timestep must be a scalar or have shape [B={B}], got shape {np.shape(timestep)}")
        return unet_forward(self.params, cfg, sample, np.broadcast_to(t, (B,)), context)
