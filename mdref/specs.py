"""The frozen, already-validated facts the model files compute from: one spec per component.

A spec holds only what changes the arithmetic, resolved per level and in mdref's own words (``heads`` is the number
of heads, ``transformer`` the block kind of a level). The interop layer (`mdref.io`) builds every spec from a
diffusers / transformers config.json, checking each key once; a spec is never built from a raw dict elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


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
class ResnetSpec:
    """What one ResnetBlock2D computes with (the VAE's ResNet is the same block without a time embedding)."""
    groups: int                 # its GroupNorms' groups
    eps: float                  # its GroupNorms' eps (the UNet's norm_eps)
    separable: bool = False     # 3x3 convs as depthwise 3x3 + pointwise 1x1 (MobileDiffusion)


@dataclass(frozen=True)
class TransformerSpec:
    """What one Transformer2DModel (and each of its BasicTransformerBlocks) computes with. Defaults are diffusers'."""
    kind: str = "full"          # "cross" (attn2 + FFN, no norm1 / attn1: MobileDiffusion) | "full" (attn1 + attn2 + FFN)
    depth: int = 1              # BasicTransformerBlocks (transformer_layers_per_block)
    heads: int = 1              # attention heads (diffusers' SD configs call this attention_head_dim)
    only_cross: bool = False    # attn1 attends to the text too (diffusers only_cross_attention)
    shared_kv: bool = False     # one to_kv projection gives K = V (MobileDiffusion)
    weighting: str = "softmax"  # "softmax" | "relu": attention weights (MobileDiffusion's deployable form)
    ff_activation: str = "geglu"  # "geglu" (SD) | "swiglu" (MobileDiffusion)
    ff_mult: int = 4            # the FFN's inner width is ff_mult * C (MobileDiffusion: 3)
    groups: int = 32            # the GroupNorm at the input (norm_num_groups)
    norm_eps: float = 1e-6      # its eps (diffusers hard-codes 1e-6)
    layer_norm_eps: float = 1e-5  # norm1 / norm2 / norm3
    linear_projection: bool = False  # proj_in / proj_out as Linear (True) or 1x1 conv (False)


@dataclass(frozen=True)
class Layer:
    """One entry of a stage's layer list: a layer of the block, in execution order."""
    kind: str                   # what runs (unet.LAYERS): "resnet" | "transformer" | "downsample" | "upsample"
    group: str                  # its ModuleList in the checkpoint: "resnets" | "attentions" | "downsamplers" | ...
    index: int                  # its index there; the parameter path is "<stage>.<group>.<index>"
    c_in: int                   # input channels (an up block's ResNet counts the concatenated skip)
    c_out: int
    spec: ResnetSpec | TransformerSpec | None = None   # the hyperparameters it computes with
    skip: str | None = None     # "push": its output is a skip connection (down blocks); "pop": the last skip is
                                # concatenated on channels to its input (up blocks)

    @property
    def name(self):
        return f"{self.group}.{self.index}"


@dataclass(frozen=True)
class Stage:
    """One down block, the mid block or one up block of UNet2DConditionModel: its layers, listed once."""
    name: str                   # parameter path: "down_blocks.1", "mid_block", "up_blocks.0"
    channels: int               # the level's width C
    layers: tuple               # Layer per ResNet, Transformer2DModel and resampler, in execution order

    def of(self, kind):
        """The layers of one kind, in order."""
        return [layer for layer in self.layers if layer.kind == kind]

    @property
    def transformer(self):
        """The TransformerSpec of the stage's first transformer layer, or None."""
        found = self.of("transformer")
        return found[0].spec if found else None


@dataclass(frozen=True)
class UNetSpec:
    """UNet2DConditionModel and its MobileDiffusion extensions: the stage plan plus every model-wide constant."""
    in_channels: int
    out_channels: int
    sinusoid_dim: int           # width of the sinusoidal timestep embedding (block_out_channels[0])
    time_embed_dim: int         # width after time_embedding (diffusers: 4 * block_out_channels[0])
    flip_sin_to_cos: bool
    freq_shift: float
    groups: int                 # every GroupNorm (norm_num_groups)
    resnet_eps: float           # ResNet and output GroupNorms (norm_eps)
    context_dim: int            # D of the text context every cross-attention reads
    sample_size: tuple          # default latent (h, w); read by the pipeline only
    down: tuple                 # Stage per down block
    mid: Stage | None
    up: tuple                   # Stage per up block; up[0] is the innermost level

    @property
    def stages(self):
        """Every stage in execution order: down blocks, the mid block (if any), up blocks."""
        return self.down + ((self.mid,) if self.mid is not None else ()) + self.up

    @property
    def size_factor(self):
        """Latent height and width must be multiples of this: one stride-2 conv per down block but the last."""
        return 2 ** sum(len(st.of("downsample")) for st in self.down)

    def replace_layers(self, kind, **changes):
        """This spec with the spec of every layer of `kind` changed (an ablation: what if every transformer's input
        GroupNorm eps were 1e-5? ``spec.replace_layers("transformer", norm_eps=1e-5)``)."""
        def stage(st):
            return replace(st, layers=tuple(replace(layer, spec=replace(layer.spec, **changes))
                                            if layer.kind == kind else layer for layer in st.layers))
        return replace(self, down=tuple(map(stage, self.down)), mid=self.mid and stage(self.mid),
                       up=tuple(map(stage, self.up)))


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


# ---- sampler (mdref/sampler.py) --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerSpec:
    """The noise schedule and the sampler that mdref.sampler computes from (io.scheduler_config.sampler_spec)."""
    sampler: str                    # "x0" | "euler" | "euler_ancestral" | "lcm" | "tcd"
    prediction_type: str            # "epsilon" | "v_prediction" | "sample"
    num_train_timesteps: int        # T: timesteps 0 .. T - 1
    beta_schedule: str              # "scaled_linear" | "linear"
    beta_start: float
    beta_end: float
    timestep_spacing: str           # "trailing" | "lcm" (LCM's skipping-step rule)
    original_inference_steps: int   # lcm / tcd: the distillation schedule their own timesteps come from
    timestep_scaling: float         # lcm: u = timestep_scaling * t in the boundary condition c_skip, c_out
