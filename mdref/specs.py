"""The frozen, already-validated facts the model files compute from: one spec per component.

A spec holds only what changes the arithmetic, resolved per level and in mdref's own words (``heads`` is the number
of heads, ``transformer`` the block kind of a level). The interop layer (`mdref.io`) builds every spec from a
diffusers / transformers config.json, checking each key once; a spec is never built from a raw dict elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass


# ---- text encoder (mdref/text_encoder.py) --------------------------------------------------------------------
@dataclass(frozen=True)
class TextEncoderSpec:
    """transformers CLIPTextModel: `layers` pre-LayerNorm blocks of `heads` heads over width D."""
    layers: int
    heads: int
    activation: str             # "quick_gelu" | "gelu" | "gelu_tanh" (ops.ACTIVATIONS)
    eps: float                  # every LayerNorm (layer_norm_eps)
    max_positions: int          # rows of the position embedding: at most this many tokens


# ---- Qwen3-VL text path (mdref/qwen_text.py) -----------------------------------------------------------------
@dataclass(frozen=True)
class QwenTextSpec:
    """transformers Qwen3VLTextModel, text-only input: `layers` pre-RMSNorm decoder layers."""
    layers: int
    heads: int                  # query heads H
    kv_heads: int               # key / value heads G (H / G query heads share one)
    head_dim: int               # d (not hidden_size / heads in general)
    eps: float                  # every RMSNorm, q_norm and k_norm included (rms_norm_eps)
    rope_theta: float           # rotary base
    max_positions: int          # at most this many tokens


# ---- UNet (mdref/unet.py) ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One down block, the mid block or one up block of UNet2DConditionModel, as its forward pass sees it."""
    name: str                   # parameter path: "down_blocks.1", "mid_block", "up_blocks.0"
    resnets: tuple              # (c_in, c_out) per ResNet; up blocks count the concatenated skip in c_in
    channels: int               # the level's width C
    transformer: str            # "none" | "cross" (attn2 + FFN, MobileDiffusion) | "full" (attn1 + attn2 + FFN)
    transformer_layers: int     # BasicTransformerBlocks per Transformer2DModel
    heads: int                  # attention heads (diffusers' SD configs call this attention_head_dim)
    only_cross: bool            # attn1 attends to the text too (diffusers only_cross_attention)
    separable: bool             # ResNet 3x3 convs as depthwise 3x3 + pointwise 1x1 (MobileDiffusion)
    resample: str | None        # "down" (stride-2 conv after the block) | "up" (2x nearest + conv) | None


@dataclass(frozen=True)
class UNetSpec:
    """UNet2DConditionModel and its MobileDiffusion extensions: the stage plan plus every constant."""
    in_channels: int
    out_channels: int
    sinusoid_dim: int           # width of the sinusoidal timestep embedding (block_out_channels[0])
    time_embed_dim: int         # width after time_embedding (diffusers: 4 * block_out_channels[0])
    flip_sin_to_cos: bool
    freq_shift: float
    groups: int                 # every GroupNorm (norm_num_groups)
    resnet_eps: float           # ResNet and output GroupNorms (norm_eps)
    transformer_norm_eps: float  # GroupNorm at each Transformer2DModel input (diffusers: 1e-6)
    layer_norm_eps: float       # BasicTransformerBlock norm1 / norm2 / norm3 (diffusers: 1e-5)
    linear_projection: bool     # proj_in / proj_out as Linear (True) or 1x1 conv (False)
    shared_kv: bool             # one to_kv projection gives K = V (MobileDiffusion)
    weighting: str              # "softmax" | "relu": attention weights (MobileDiffusion's deployable form)
    ff_activation: str          # "geglu" (SD) | "swiglu" (MobileDiffusion)
    context_dim: int            # D of the text context every cross-attention reads
    sample_size: tuple          # default latent (h, w); read by the pipeline only
    down: tuple                 # Stage per down block
    mid: Stage | None
    up: tuple                   # Stage per up block; up[0] is the innermost level

    @property
    def size_factor(self):
        """Latent height and width must be multiples of this: one stride-2 conv per down block but the last."""
        return 2 ** sum(st.resample == "down" for st in self.down)


# ---- decoders (mdref/decoder.py) -----------------------------------------------------------------------------
@dataclass(frozen=True)
class KLDecoderSpec:
    """The decoder half of diffusers AutoencoderKL."""
    latent_channels: int
    out_channels: int
    widths: tuple               # per up block, lowest resolution first (block_out_channels reversed)
    resnets_per_block: int      # layers_per_block + 1
    groups: int
    eps: float                  # every GroupNorm (diffusers hard-codes 1e-6)
    post_quant_conv: bool
    mid_attention: bool

    @property
    def upsampling_factor(self):
        return 2 ** (len(self.widths) - 1)


@dataclass(frozen=True)
class TAESDDecoderSpec:
    """The decoder half of diffusers AutoencoderTiny (TAESD): a literal Sequential, see decoder.taesd_stages."""
    latent_channels: int
    out_channels: int
    width: int                  # every conv's width (DecoderTiny needs them equal)
    blocks: tuple               # residual blocks per resolution, lowest first (num_decoder_blocks)
    upsample: int               # nearest upsampling factor between resolutions
    clamp: float                # soft clamp tanh(x / clamp) * clamp at the input (DecoderTiny: 3)

    @property
    def upsampling_factor(self):
        return self.upsample ** (len(self.blocks) - 1)
