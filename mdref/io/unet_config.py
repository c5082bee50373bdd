"""diffusers ``UNet2DConditionModel`` config.json -> `UNetConfig` (key policy, checks) -> `mdref.specs.UNetSpec`.

Every diffusers key is either implemented, accepted only at diffusers' default (`DEFAULT_ONLY`: any other value is
a ConfigError naming it), or ignored because it cannot change the forward pass (`IGNORED`). MobileDiffusion
extensions (keys absent from diffusers; their defaults reproduce diffusers): ``transformer_kind`` per level
("none" | "cross" | "full"; "cross" = cross-attention + FFN, no norm1 / attn1), ``mid_transformer_layers``,
``shared_kv`` (one ``to_kv`` projection gives K = V), ``attention_weighting`` ("softmax" | "relu": relu(q k^T /
sqrt(d)) / n_keys), ``ff_activation`` ("geglu" | "swiglu"), ``ff_mult``, ``separable_conv`` per level (ResNet
conv1 / conv2 as depthwise 3x3 + pointwise 1x1), ``prediction_type``. The mid block is always made of full blocks
(as diffusers' UNetMidBlock2DCrossAttn) and uses the innermost level's heads, cross_attention_dim and
separable_conv. ``upcast_attention`` only changes fp16 / bf16 arithmetic in diffusers and is read and ignored.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

from ..specs import Layer, ResnetSpec, Stage, TransformerSpec, UNetSpec
from .config import (MAX_LAYERS, MAX_LEVELS, MAX_SAMPLE_SIZE, MAX_WIDTH, ConfigError, check_bool, check_choice,
                     check_float, check_int, check_list, check_positive_int,
                     from_dict, to_dict)

__all__ = ["UNetConfig", "unet_spec", "DEFAULT_ONLY", "IGNORED", "TRANSFORMER_NORM_EPS", "LAYER_NORM_EPS",
           "TIME_EMBED_MULT", "DEFAULT_SAMPLE_SIZE"]

# Constants diffusers hard-codes (not config.json keys); each becomes a UNetSpec field.
TRANSFORMER_NORM_EPS = 1e-6     # Transformer2DModel.norm (GroupNorm at the transformer input)
LAYER_NORM_EPS = 1e-5           # BasicTransformerBlock norm1 / norm2 / norm3
TIME_EMBED_MULT = 4             # time_embed_dim = 4 * block_out_channels[0] (UNet2DConditionModel.__init__)
DEFAULT_SAMPLE_SIZE = 64        # latent side when config.json leaves sample_size null (SD's 512 px / 8)

DOWN_BLOCKS = {"CrossAttnDownBlock2D": "full", "DownBlock2D": "none"}   # block type -> default transformer kind
UP_BLOCKS = {"CrossAttnUpBlock2D": "full", "UpBlock2D": "none"}
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)   # UNetMidBlock2D: one ResNet (SSD-1B, Vega)
KINDS = ("none", "cross", "full")

# diffusers keys whose only supported value is diffusers' default (any other value raises ConfigError).
DEFAULT_ONLY = {
    "center_input_sample": (False,), "downsample_padding": (1,), "mid_block_scale_factor": (1,),
    "act_fn": ("silu", "swish"), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "num_attention_heads": (None,), "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,), "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,), "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "attention_type": ("default",), "class_embeddings_concat": (False,), "cross_attention_norm": (None,),
}
# diffusers keys with no effect on this forward pass, ignored on purpose.
IGNORED = {
    "dropout": "inference only",
    "mid_block_only_cross_attention": "read only by UNetMidBlock2DSimpleCrossAttn, which mdref does not build",
    "addition_embed_type_num_heads": "read only by addition_embed_type \"text\", which mdref does not build",
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
    upcast_attention: bool | None = False                # no effect in float32 / float64 (null: false)
    reverse_transformer_layers_per_block: list | None = None   # per up block (int or per-ResNet list); None: reversed
    addition_embed_type: str | None = None               # "text_time" (SDXL): pooled text + time ids, added to temb
    addition_time_embed_dim: int | None = None           # sinusoid width per time id (SDXL: 256)
    projection_class_embeddings_input_dim: int | None = None   # add_embedding's input width (SDXL: 1280 + 6 * 256)
    time_cond_proj_dim: int | None = None                # guidance embedding width (LCM-distilled UNets)
    # ---- mdref extensions (MobileDiffusion); defaults reproduce diffusers ----
    transformer_kind: list | None = None                 # per level "none" | "cross" | "full"; None: from block types
    mid_transformer_layers: int | None = None            # None: transformer_layers_per_block[-1]
    shared_kv: bool = False
    attention_weighting: str = "softmax"                 # "softmax" | "relu"
    ff_activation: str = "geglu"                         # "geglu" | "swiglu"
    ff_mult: int = 4
    separable_conv: list | None = None                   # per level bool; None: all false
    prediction_type: str = "epsilon"                     # read by the sampler, not by the UNet
    where: InitVar[str | None] = None                    # the config file, for error messages (not a config key)

    EXTENSIONS = ("transformer_kind", "mid_transformer_layers", "shared_kv", "attention_weighting",
                  "ff_activation", "ff_mult", "separable_conv", "prediction_type")

    @classmethod
    def from_dict(cls, d, where="UNetConfig"):
        """Build from a diffusers / mdref config dict; unsupported keys or values raise ConfigError naming them."""
        return from_dict(cls, d, ignore=IGNORED, default_only=DEFAULT_ONLY, where=where)

    def __post_init__(self, where):
        """Types, ranges and the stage plan (mdref.io.config's checkers; `CHECKS` below for the scalars)."""
        where = where or type(self).__name__
        for key, check in CHECKS.items():
            check(where, key, getattr(self, key))
        for key in ("down_block_types", "up_block_types"):
            setattr(self, key, check_list(where, key, getattr(self, key)))
        self.block_out_channels = check_list(where, "block_out_channels", self.block_out_channels,
                                             lambda w, k, v: check_positive_int(w, k, v, MAX_WIDTH))
        if len(self.block_out_channels) > MAX_LEVELS:
            raise ConfigError(f"{where}: block_out_channels has {len(self.block_out_channels)} levels; mdref builds at "
                              f"most {MAX_LEVELS}")
        for key in ("transformer_kind", "separable_conv"):
            if getattr(self, key) is not None:
                setattr(self, key, check_list(where, key, getattr(self, key)))
        L = self.levels
        if len(self.down_block_types) != L or len(self.up_block_types) != L:
            raise ConfigError(f"{where}: block_out_channels ({L} levels), down_block_types "
                              f"({len(self.down_block_types)}) and up_block_types ({len(self.up_block_types)}) "
                              f"must have the same length")
        for key, table in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            for i, t in enumerate(getattr(self, key)):
                check_choice(where, f"{key}[{i}]", t, list(table))
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"{where}: block_out_channels {self.block_out_channels} must all be divisible by "
                              f"norm_num_groups={self.norm_num_groups} (GroupNorm), found {bad}")
        half = self.block_out_channels[0] // 2                  # the sinusoid divides by half - freq_shift
        check_int(where, "freq_shift", self.freq_shift, 0, half - 1)
        self.norm_eps = check_float(where, "norm_eps", self.norm_eps, 0)
        if isinstance(self.sample_size, (list, tuple)):
            self.sample_size = check_list(where, "sample_size", self.sample_size,
                                          lambda w, k, v: check_positive_int(w, k, v, MAX_SAMPLE_SIZE), length=2)
        else:
            check_int(where, "sample_size", self.sample_size, 1, MAX_SAMPLE_SIZE, none=True)
        for key in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim",
                    "cross_attention_dim", "only_cross_attention", "transformer_kind", "separable_conv"):
            self.per_level(key, where)                    # validates lengths and element types
        if len(set(self.per_level("cross_attention_dim"))) != 1:
            raise ConfigError(f"{where}: cross_attention_dim {self.cross_attention_dim} differs between levels; "
                              f"one context tensor feeds every level, so mdref needs a single width")
        if self.mid_transformer_layers is not None and self.mid_block_type in (None, "UNetMidBlock2D"):
            raise ConfigError(f"{where}: mid_transformer_layers is set but mid_block_type is "
                              f"{self.mid_block_type!r} (no mid transformer)")
        self.check_added_conditioning(where)
        if self.reverse_transformer_layers_per_block is not None:
            self.up_depths(where)                        # validates lengths and element types
        elif any(isinstance(d, list) for d in self.per_level("transformer_layers_per_block")):
            raise ConfigError(f"{where}: transformer_layers_per_block {self.transformer_layers_per_block} lists "
                              f"depths per block, which needs reverse_transformer_layers_per_block for the up "
                              f"blocks (as diffusers requires)")
        stage_plan(self, where)                          # checks kinds vs block types, heads vs channels

    def check_added_conditioning(self, where):
        """addition_embed_type "text_time" (SDXL) needs both of its widths; time_cond_proj_dim is a width >= 4."""
        check_choice(where, "addition_embed_type", self.addition_embed_type, ("text_time", None))
        keys = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
        for key in keys:
            value = getattr(self, key)
            if (value is None) == (self.addition_embed_type == "text_time"):
                raise ConfigError(f"{where}: {key}={value!r} with addition_embed_type={self.addition_embed_type!r} "
                                  f"(\"text_time\" needs both {keys[0]} and {keys[1]}; without it they must be null)")
            check_int(where, key, value, 1, MAX_WIDTH, none=True)
        if self.addition_time_embed_dim is not None:    # its sinusoid divides by half - freq_shift, as the timestep's
            check_int(where, "addition_time_embed_dim", self.addition_time_embed_dim, 2 * self.freq_shift + 2,
                      MAX_WIDTH)
        check_int(where, "time_cond_proj_dim", self.time_cond_proj_dim, 4, MAX_WIDTH, none=True)   # divisor half - 1

    def up_depths(self, where="UNetConfig"):
        """Transformer depth per up block (up_blocks.0 first), an int or one per ResNet: diffusers'
        reverse_transformer_layers_per_block, or transformer_layers_per_block reversed."""
        if self.reverse_transformer_layers_per_block is None:
            return self.per_level("transformer_layers_per_block", where)[::-1]
        layers = self.per_level("layers_per_block", where)[::-1]
        out = check_list(where, "reverse_transformer_layers_per_block", self.reverse_transformer_layers_per_block,
                         length=self.levels)
        return [depths(where, f"reverse_transformer_layers_per_block[{i}]", d, layers[i] + 1)
                for i, d in enumerate(out)]

    @property
    def levels(self):
        return len(self.block_out_channels)

    def per_level(self, key, where="UNetConfig"):
        """The value of `key` for each level (down-block order), expanding a scalar; checks the list length."""
        value = getattr(self, key)
        defaults = {"transformer_kind": [DOWN_BLOCKS[t] for t in self.down_block_types],
                    "separable_conv": [False] * self.levels}
        if value is None and key in defaults:
            return defaults[key]
        if key in ("only_cross_attention", "separable_conv"):
            check = check_bool
        elif key == "transformer_kind":
            check = lambda w, k, v: check_choice(w, k, v, KINDS)    # noqa: E731
        else:                                                        # 0 is usual on levels without a transformer
            least = 0 if key == "transformer_layers_per_block" else 1
            most = MAX_LAYERS if key.endswith("per_block") else MAX_WIDTH
            check = lambda w, k, v: check_int(w, k, v, least, most)  # noqa: E731
        if key == "transformer_layers_per_block" and isinstance(value, (list, tuple)):   # an int or a list per block
            layers = self.per_level("layers_per_block", where)
            return [depths(where, f"{key}[{i}]", d, layers[i])
                    for i, d in enumerate(check_list(where, key, value, length=self.levels))]
        if isinstance(value, (list, tuple)):
            return check_list(where, key, value, check, length=self.levels)
        return [check(where, key, value)] * self.levels

    def to_dict(self):
        """config.json content: diffusers keys always, mdref extensions only where they change what diffusers would
        build (a value equal to the default, or to what the block types and transformer_layers_per_block imply, is
        left out), so that a diffusers-expressible UNet loads in diffusers without unknown keys."""
        d = {"_class_name": "UNet2DConditionModel"}
        defaults = UNetConfig()
        implied = {"transformer_kind": [DOWN_BLOCKS[t] for t in self.down_block_types],
                   "mid_transformer_layers": depth_at(self.per_level("transformer_layers_per_block")[-1], 0),
                   "separable_conv": [False] * self.levels}
        for k, v in to_dict(self).items():
            if k not in self.EXTENSIONS or (v != getattr(defaults, k) and v != implied.get(k, getattr(defaults, k))):
                d[k] = v
        return d


# Scalar keys and their checks (lists, per-level keys, freq_shift, norm_eps and sample_size are checked in
# UNetConfig.__post_init__, where they depend on other keys).
CHECKS = {
    "in_channels": lambda w, k, v: check_positive_int(w, k, v, MAX_WIDTH),
    "out_channels": lambda w, k, v: check_positive_int(w, k, v, MAX_WIDTH),
    "norm_num_groups": lambda w, k, v: check_positive_int(w, k, v, MAX_WIDTH),
    "flip_sin_to_cos": check_bool, "use_linear_projection": check_bool,
    "upcast_attention": lambda w, k, v: v if v is None else check_bool(w, k, v),   # SDXL's config says null
    "shared_kv": check_bool, "ff_mult": lambda w, k, v: check_positive_int(w, k, v, MAX_LAYERS),
    "mid_block_type": lambda w, k, v: check_choice(w, k, v, MID_BLOCKS),
    "mid_transformer_layers": lambda w, k, v: check_int(w, k, v, 1, MAX_LAYERS, none=True),
    "attention_weighting": lambda w, k, v: check_choice(w, k, v, ("softmax", "relu")),
    "ff_activation": lambda w, k, v: check_choice(w, k, v, ("geglu", "swiglu")),
    "prediction_type": lambda w, k, v: check_choice(w, k, v, ("epsilon", "v_prediction", "sample")),
}


def depths(where, key, value, n):
    """A block's transformer depth: an int, or a list of n ints (one per ResNet of the block)."""
    check = lambda w, k, v: check_int(w, k, v, 0, MAX_LAYERS)   # noqa: E731
    if isinstance(value, (list, tuple)):
        return check_list(where, key, value, check, length=n)
    return check(where, key, value)


def depth_at(depth, j):
    """The depth of a block's j-th transformer: depth is an int or one per ResNet (specs of `depths`)."""
    return depth[j] if isinstance(depth, list) else depth


def stage_plan(cfg, where="UNetConfig"):
    """(down stages, mid stage or None, up stages), reproducing UNet2DConditionModel.__init__'s channel plan; each
    stage lists its layers (specs.Layer) in execution order."""
    L, ch = cfg.levels, cfg.block_out_channels
    layers, tlayers = cfg.per_level("layers_per_block"), cfg.per_level("transformer_layers_per_block")
    heads = cfg.per_level("attention_head_dim")
    only_cross, sep = cfg.per_level("only_cross_attention"), cfg.per_level("separable_conv")
    kinds = cfg.per_level("transformer_kind")

    def stage(name, level, resnets, kind, depth, block_type, skip, resample):
        """A down (skip "push") or up ("pop") block's layers: ResNet j, then Transformer2DModel j when the level has
        transformers, for each ResNet; then its resampler ("downsample", "upsample" or None)."""
        check_kind(where, name, level, kind, block_type, only_cross[level], heads[level], ch[level])
        out = []
        for j, (c_in, c_out) in enumerate(resnets):
            t = transformer_spec(cfg, kind, depth_at(depth, j), heads[level], only_cross[level])
            out.append(Layer("resnet", "resnets", j, c_in, c_out, ResnetSpec(cfg.norm_num_groups, cfg.norm_eps,
                             sep[level]), "pop" if skip == "pop" else None if t else skip))
            if t is not None:
                out.append(Layer("transformer", "attentions", j, c_out, c_out, t, "push" if skip == "push" else None))
        c = ch[level]
        if resample is not None:                      # Downsample2D / Upsample2D: a 3x3 conv at the level's width
            group = {"downsample": "downsamplers", "upsample": "upsamplers"}[resample]
            out.append(Layer(resample, group, 0, c, c, None, "push" if skip == "push" else None))
        return Stage(name, c, tuple(out))

    down, c = [], ch[0]
    for i in range(L):
        rs = [(c if j == 0 else ch[i], ch[i]) for j in range(layers[i])]
        down.append(stage(f"down_blocks.{i}", i, rs, kinds[i], tlayers[i], cfg.down_block_types[i], "push",
                          "downsample" if i < L - 1 else None))
        c = ch[i]
    mid, c, res = None, ch[-1], ResnetSpec(cfg.norm_num_groups, cfg.norm_eps, sep[-1])
    if cfg.mid_block_type == "UNetMidBlock2D":        # num_layers=0, no attention: one ResNet (SSD-1B, Vega)
        mid = Stage("mid_block", c, (Layer("resnet", "resnets", 0, c, c, res),))
    elif cfg.mid_block_type is not None:              # UNetMidBlock2DCrossAttn: ResNet, full transformer, ResNet
        check_kind(where, "mid_block", L - 1, "full", None, False, heads[-1], c)
        t = transformer_spec(cfg, "full", cfg.mid_transformer_layers or depth_at(tlayers[-1], 0), heads[-1], False)
        mid = Stage("mid_block", c, (Layer("resnet", "resnets", 0, c, c, res), Layer("transformer", "attentions", 0,
                                     c, c, t), Layer("resnet", "resnets", 1, c, c, res)))
    up, prev, up_depth = [], ch[-1], cfg.up_depths(where)
    for i in range(L):
        level = L - 1 - i                                 # up_blocks.0 is the innermost level
        skip_in = ch[max(level - 1, 0)]                   # diffusers' `input_channel` of this up block
        n = layers[level] + 1
        rs = [((prev if j == 0 else ch[level]) + (skip_in if j == n - 1 else ch[level]), ch[level]) for j in range(n)]
        kind = kinds[level] if cfg.transformer_kind is not None else UP_BLOCKS[cfg.up_block_types[i]]
        up.append(stage(f"up_blocks.{i}", level, rs, kind, up_depth[i], cfg.up_block_types[i], "pop",
                        "upsample" if i < L - 1 else None))
        prev = ch[level]
    return down, mid, up


def check_kind(where, name, level, kind, block_type, only_cross, heads, channels):
    """A level's transformer kind against its block type (None: the mid block), only_cross_attention and heads."""
    if block_type is not None and (kind == "none") != (block_type in ("DownBlock2D", "UpBlock2D")):
        raise ConfigError(f"{where}: transformer_kind {kind!r} of level {level} does not fit {name} "
                          f"of type {block_type}")
    if kind == "cross" and only_cross:
        raise ConfigError(f"{where}: only_cross_attention is set on level {level}, whose transformer_kind "
                          f"is 'cross' (no attn1 to change)")
    if kind != "none" and channels % heads:
        raise ConfigError(f"{where}: attention_head_dim (heads) {heads} does not divide "
                          f"block_out_channels[{level}] = {channels}")


def transformer_spec(cfg, kind, depth, heads, only_cross):
    """The TransformerSpec of a level's transformers (None for kind "none"). only_cross_attention acts only on
    full blocks (diffusers' mid block ignores it: the caller passes False there)."""
    if kind == "none":
        return None
    return TransformerSpec(
        kind=kind, depth=depth, heads=heads, only_cross=only_cross and kind == "full", shared_kv=cfg.shared_kv,
        weighting=cfg.attention_weighting, ff_activation=cfg.ff_activation, ff_mult=cfg.ff_mult,
        groups=cfg.norm_num_groups, norm_eps=TRANSFORMER_NORM_EPS, layer_norm_eps=LAYER_NORM_EPS,
        linear_projection=cfg.use_linear_projection)


def unet_spec(cfg):
    """The frozen UNetSpec of a validated UNetConfig."""
    down, mid, up = stage_plan(cfg)
    s = cfg.sample_size if cfg.sample_size is not None else DEFAULT_SAMPLE_SIZE
    c0 = cfg.block_out_channels[0]
    return UNetSpec(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, sinusoid_dim=c0,
        time_embed_dim=TIME_EMBED_MULT * c0, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
        groups=cfg.norm_num_groups, resnet_eps=cfg.norm_eps, context_dim=cfg.per_level("cross_attention_dim")[0],
        sample_size=(s, s) if isinstance(s, int) else tuple(s), down=tuple(down), mid=mid, up=tuple(up),
        addition_time_embed_dim=cfg.addition_time_embed_dim,
        addition_embed_in=cfg.projection_class_embeddings_input_dim, time_cond_proj_dim=cfg.time_cond_proj_dim)
