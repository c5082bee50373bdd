"""diffusers ``DreamLiteUNetModel`` config.json -> `DreamLiteUNetConfig` (key policy, checks) ->
`mdref.specs.DreamLiteUNetSpec`.

DreamLiteUNetModel (diffusers 0.42, models/unets/unet_dreamlite.py) replicates UNet2DConditionModel.__init__ with
its own block classes and defaults. mdref reads it as a UNet2DConditionModel stage plan (`unet_config.stage_plan`
of the equivalent UNetConfig, DreamLite's block names mapped to diffusers' ones) with DreamLite's differences set
on the layers: the blocks without self-attention (``...NoSelfAttn...`` / ``...RemoveSelfAttn...``) become
transformer kind "replace"; every attention has ``num_kv_heads`` K / V heads and, with ``qk_norm "rms_norm"``,
RMSNorm (eps 1e-5, diffusers Attention's default) on each q and k head; the FFN is GEGLU with ``ff_mult``; with
``use_sep_conv`` every ResNet's convs are bias-free depthwise 3x3 + pointwise 1x1, conv1's pointwise widening to
2x; the mid block holds ``num_mid_layers`` (transformer, ResNet) pairs. Keys mdref does not implement are
accepted only at DreamLite's defaults (`DEFAULT_ONLY`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field

from ..specs import DreamLiteUNetSpec, Stage
from .config import (MAX_LAYERS, MAX_SAMPLE_SIZE, MAX_WIDTH, ConfigError, check_bool, check_choice, check_int,
                     check_positive_int, from_dict, to_dict)
from .unet_config import DEFAULT_ONLY as UNET_DEFAULT_ONLY
from .unet_config import IGNORED as UNET_IGNORED
from .unet_config import UNetConfig, unet_spec

__all__ = ["DreamLiteUNetConfig", "dreamlite_unet_spec", "DOWN_BLOCKS", "UP_BLOCKS", "MID_BLOCKS",
           "QK_NORM_EPS", "TEXT_NORM_EPS", "SEPARABLE_EXPAND", "MASK_BIAS"]

# Constants diffusers hard-codes (not config.json keys); each becomes a spec field.
QK_NORM_EPS = 1e-5          # Attention(qk_norm="rms_norm"): RMSNorm(dim_head, eps=1e-5) (attention_processor.py)
TEXT_NORM_EPS = 1e-5        # text_proj_rms: RMSNorm(cross_attention_dim, eps=1e-5) (unet_dreamlite.py)
SEPARABLE_EXPAND = 2        # ResnetBlock2DDreamLite(use_sep_conv=True): expand_ratio = 2
MASK_BIAS = -10000.0        # UNet2DConditionModel.forward: (1 - encoder_attention_mask) * -10000.0

# DreamLite block type (and the aliases diffusers accepts) -> (diffusers' block type, transformer kind).
DOWN_BLOCKS = {
    "DreamLiteCrossAttnNoSelfAttnDownBlock2D": ("CrossAttnDownBlock2D", "replace"),
    "CrossAttnDownRemoveSelfAttnBlock2D": ("CrossAttnDownBlock2D", "replace"),
    "DreamLiteCrossAttnDownBlock2D": ("CrossAttnDownBlock2D", "full"),
    "CrossAttnDownBlock2D": ("CrossAttnDownBlock2D", "full"),
    "DreamLiteDownBlock2D": ("DownBlock2D", "none"),
    "DownBlock2D": ("DownBlock2D", "none"),
}
UP_BLOCKS = {
    "DreamLiteCrossAttnNoSelfAttnUpBlock2D": ("CrossAttnUpBlock2D", "replace"),
    "CrossAttnUpRemoveSelfAttnBlock2D": ("CrossAttnUpBlock2D", "replace"),
    "CrossAttnUpRemoveSelfAttnBlock2DV1": ("CrossAttnUpBlock2D", "replace"),
    "DreamLiteCrossAttnUpBlock2D": ("CrossAttnUpBlock2D", "full"),
    "CrossAttnUpBlock2D": ("CrossAttnUpBlock2D", "full"),
    "DreamLiteUpBlock2D": ("UpBlock2D", "none"),
    "UpBlock2D": ("UpBlock2D", "none"),
}
MID_BLOCKS = {"DreamLiteUNetMidBlock2DCrossAttn": "UNetMidBlock2DCrossAttn",
              "UNetMidBlock2DCrossAttn": "UNetMidBlock2DCrossAttn", None: None}

# Keys accepted only at the value DreamLite's checkpoints use (any other value is a ConfigError naming it).
DEFAULT_ONLY = {
    **{k: v for k, v in UNET_DEFAULT_ONLY.items() if k not in (
        "encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type", "addition_time_embed_dim",
        "projection_class_embeddings_input_dim")},
    "encoder_hid_dim_type": ("text_proj_rms",), "addition_embed_type": ("time",), "qk_norm": ("rms_norm", None),
    "reverse_transformer_layers_per_block": (None,), "time_cond_proj_dim": (None,),   # UNetConfig fields (SDXL)
}
IGNORED = dict(UNET_IGNORED)
# Fields of the equivalent UNetConfig taken over unchanged.
SHARED = ("sample_size", "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "only_cross_attention",
          "block_out_channels", "layers_per_block", "transformer_layers_per_block", "norm_num_groups", "norm_eps",
          "cross_attention_dim", "attention_head_dim", "use_linear_projection", "upcast_attention")


@dataclass
class DreamLiteUNetConfig:
    """diffusers DreamLiteUNetModel config.json fields mdref implements (defaults = DreamLiteUNetModel.__init__'s,
    except the conditioning keys, which mdref requires: the released model uses them)."""
    sample_size: int | list | None = None
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: list = field(default_factory=lambda: [
        "DreamLiteCrossAttnNoSelfAttnDownBlock2D", "DreamLiteCrossAttnNoSelfAttnDownBlock2D",
        "DreamLiteCrossAttnDownBlock2D"])
    mid_block_type: str | None = "DreamLiteUNetMidBlock2DCrossAttn"
    up_block_types: list = field(default_factory=lambda: [
        "DreamLiteCrossAttnUpBlock2D", "DreamLiteCrossAttnNoSelfAttnUpBlock2D", "DreamLiteUpBlock2D"])
    only_cross_attention: bool | list = False
    block_out_channels: list = field(default_factory=lambda: [320, 640, 1280])
    layers_per_block: int | list = 2
    transformer_layers_per_block: int | list = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | list = 2048               # D, after the text projection
    attention_head_dim: int | list = 64                  # SD convention: the number of heads per level
    use_linear_projection: bool = False
    upcast_attention: bool = False
    encoder_hid_dim: int = 2048                          # width of the text features (Qwen3-VL-2B: 2048)
    encoder_hid_dim_type: str = "text_proj_rms"
    addition_embed_type: str = "time"
    addition_time_embed_dim: int = 256                   # sinusoid width per time id
    projection_class_embeddings_input_dim: int = 512     # = 2 time ids x addition_time_embed_dim
    qk_norm: str | None = "rms_norm"
    use_sep_conv: bool = True
    ff_mult: int = 6
    num_kv_heads: int | None = 1                         # None: as many as the query heads
    num_mid_layers: int = 1
    where: InitVar[str | None] = None

    @classmethod
    def from_dict(cls, d, where="DreamLiteUNetConfig"):
        """Build from a diffusers config dict; unsupported keys or values raise ConfigError naming them."""
        return from_dict(cls, d, ignore=IGNORED, default_only=DEFAULT_ONLY, where=where)

    def __post_init__(self, where):
        where = where or type(self).__name__
        for key, table in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            value = getattr(self, key)
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: {key} must be a list, found {value!r}")
            for i, t in enumerate(value):
                check_choice(where, f"{key}[{i}]", t, list(table))
            setattr(self, key, list(value))
        check_choice(where, "mid_block_type", self.mid_block_type, list(MID_BLOCKS))
        check_choice(where, "encoder_hid_dim_type", self.encoder_hid_dim_type, ("text_proj_rms",))
        check_choice(where, "addition_embed_type", self.addition_embed_type, ("time",))
        check_choice(where, "qk_norm", self.qk_norm, ("rms_norm", None))
        check_bool(where, "use_sep_conv", self.use_sep_conv)
        check_positive_int(where, "encoder_hid_dim", self.encoder_hid_dim, MAX_WIDTH)
        check_positive_int(where, "addition_time_embed_dim", self.addition_time_embed_dim, MAX_WIDTH)
        check_positive_int(where, "ff_mult", self.ff_mult, MAX_LAYERS)
        check_positive_int(where, "num_mid_layers", self.num_mid_layers, MAX_LAYERS)
        check_int(where, "num_kv_heads", self.num_kv_heads, 1, MAX_WIDTH, none=True)
        if self.projection_class_embeddings_input_dim != 2 * self.addition_time_embed_dim:
            raise ConfigError(f"{where}: projection_class_embeddings_input_dim "
                              f"{self.projection_class_embeddings_input_dim} must be 2 x addition_time_embed_dim "
                              f"= {2 * self.addition_time_embed_dim} (two time ids, [w, h])")
        if isinstance(self.sample_size, int):
            check_int(where, "sample_size", self.sample_size, 1, MAX_SAMPLE_SIZE)
        base = self.unet_config(where)                    # checks widths, heads, levels, lengths
        if self.num_kv_heads is not None:
            for st in (*unet_spec(base).stages,):
                for layer in st.of("transformer"):
                    if layer.spec.heads % self.num_kv_heads:
                        raise ConfigError(f"{where}: num_kv_heads {self.num_kv_heads} does not divide the "
                                          f"{layer.spec.heads} heads of {st.name}.{layer.name}")

    def unet_config(self, where=None):
        """The UNetConfig of the same stage plan with diffusers' block names (every transformer "full")."""
        return UNetConfig(**{k: getattr(self, k) for k in SHARED},
                          down_block_types=[DOWN_BLOCKS[t][0] for t in self.down_block_types],
                          up_block_types=[UP_BLOCKS[t][0] for t in self.up_block_types],
                          mid_block_type=MID_BLOCKS[self.mid_block_type], ff_mult=self.ff_mult,
                          separable_conv=[self.use_sep_conv] * len(self.block_out_channels),
                          where=where or type(self).__name__)

    def to_dict(self):
        """config.json content diffusers' DreamLiteUNetModel reads."""
        return {"_class_name": "DreamLiteUNetModel", **to_dict(self)}


def dreamlite_unet_spec(cfg):
    """The frozen DreamLiteUNetSpec of a validated DreamLiteUNetConfig."""
    base = unet_spec(cfg.unet_config())
    kinds = {"down": [DOWN_BLOCKS[t][1] for t in cfg.down_block_types],
             "up": [UP_BLOCKS[t][1] for t in cfg.up_block_types]}
    qk_eps = QK_NORM_EPS if cfg.qk_norm == "rms_norm" else None

    def layer(lay, kind):
        if lay.kind == "resnet" and cfg.use_sep_conv:
            return dataclasses.replace(lay, spec=dataclasses.replace(lay.spec, expand=SEPARABLE_EXPAND,
                                                                     separable_bias=False))
        if lay.kind == "transformer":
            return dataclasses.replace(lay, spec=dataclasses.replace(
                lay.spec, kind=kind, kv_heads=cfg.num_kv_heads, qk_norm_eps=qk_eps, ff_activation="geglu"))
        return lay

    def stage(st, kind):
        return dataclasses.replace(st, layers=tuple(layer(lay, kind) for lay in st.layers))

    mid = base.mid
    if mid is not None:                       # DreamLiteUNetMidBlock2DCrossAttn: ResNet, then num_mid_layers pairs
        r, t = mid.layers[0], mid.layers[1]
        layers = [r] + [x for i in range(cfg.num_mid_layers) for x in (
            dataclasses.replace(t, index=i), dataclasses.replace(r, index=i + 1))]
        mid = stage(Stage(mid.name, mid.channels, tuple(layers)), "full")
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    fields.update(down=tuple(stage(st, k) for st, k in zip(base.down, kinds["down"])), mid=mid,
                  up=tuple(stage(st, k) for st, k in zip(base.up, kinds["up"])))
    return DreamLiteUNetSpec(**fields, text_dim=cfg.encoder_hid_dim, text_norm_eps=TEXT_NORM_EPS, time_ids=2,
                             time_ids_dim=cfg.addition_time_embed_dim, mask_bias=MASK_BIAS)
