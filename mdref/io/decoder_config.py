"""diffusers ``AutoencoderKL`` / ``AutoencoderTiny`` config.json -> `DecoderConfig` -> the decoder's spec.

One config for both layouts (``kind`` "kl" | "tiny"); field names are diffusers' config.json keys. Two constants
diffusers hard-codes are mdref extension keys, written to config.json only when they differ from diffusers:
``norm_eps`` (AutoencoderKL's `Decoder` uses GroupNorm eps 1e-6 everywhere) and ``tiny_clamp`` (DecoderTiny's
``tanh(x / 3) * 3``).

Range conventions (the contract of ``vae.decode(latents).sample``): the decoder's input is the UNet's latent mapped
back to the VAE's scale, ``latents / scaling_factor + shift_factor``; its output is an image in [-1, 1].
AutoencoderKL: SD's VAE uses scaling_factor 0.18215, shift_factor None (read as 0.0). AutoencoderTiny: 1.0 and 0.0;
its layers produce [0, 1] and diffusers' `DecoderTiny` maps that to [-1, 1] with ``x * 2 - 1``. The original
`taesd_decoder.safetensors` is the same network without that last step; mdref applies ``x * 2 - 1`` for both, so a
raw TAESD file loaded here also returns [-1, 1] (`keymaps` reads its layout off the keys).
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass

from ..specs import KLDecoderSpec, TAESDDecoderSpec
from .config import (MAX_LAYERS, MAX_LEVELS, MAX_WIDTH, ConfigError, check_bool, check_choice, check_float,
                     check_int, check_list, check_positive_int, from_dict, to_dict)

__all__ = ["DecoderConfig", "config_from_diffusers", "config_to_diffusers", "decoder_spec"]

@dataclass
class DecoderConfig:
    """One config for both layouts; field names are diffusers' config.json keys (defaults: AutoencoderKL's)."""
    kind: str = "kl"                          # "kl" (AutoencoderKL) | "tiny" (AutoencoderTiny)
    latent_channels: int = 4
    out_channels: int = 3
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0                 # diffusers' None is read as 0.0
    # kl: per level, level 0 = full resolution (diffusers order); the decoder walks them in reverse
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1                 # each up block has layers_per_block + 1 ResNets
    norm_num_groups: int = 32
    norm_eps: float = 1e-6                    # hard-coded in diffusers' Decoder (mdref extension key)
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # tiny: per stage, stage 0 = lowest resolution (DecoderTiny order)
    decoder_block_out_channels: tuple = (64, 64, 64, 64)
    num_decoder_blocks: tuple = (3, 3, 3, 1)
    upsampling_scaling_factor: int = 2
    tiny_clamp: float = 3.0                   # DecoderTiny's hard-coded tanh(x / 3) * 3 (mdref extension key)
    # kl: per-channel latent statistics (both or neither; e.g. Playground v2.5). The SDXL pipeline then feeds the
    # decoder latents * latents_std / scaling_factor + latents_mean instead of latents / scaling_factor.
    latents_mean: tuple | None = None
    latents_std: tuple | None = None

    where: InitVar[str | None] = None         # the config file, for error messages (not a config key)

    def __post_init__(self, where):
        """Types and ranges (mdref.io.config's checkers): scaling_factor finite and not 0 (0 decodes every latent
        to the same image), shift_factor finite (null = 0), channels / groups / blocks ints >= 1 (layers_per_block
        >= 0), eps and clamp finite > 0; KL widths divisible by norm_num_groups, tiny widths equal."""
        where = where or type(self).__name__
        check_choice(where, "kind", self.kind, ("kl", "tiny"))
        self.scaling_factor = check_float(where, "scaling_factor", self.scaling_factor, nonzero=True)
        self.shift_factor = check_float(where, "shift_factor", self.shift_factor, none=True) or 0.0
        for key, most in (("latent_channels", MAX_WIDTH), ("out_channels", MAX_WIDTH),
                          ("norm_num_groups", MAX_WIDTH), ("upsampling_scaling_factor", 8)):
            check_positive_int(where, key, getattr(self, key), most)
        check_int(where, "layers_per_block", self.layers_per_block, 0, MAX_LAYERS)   # 0: one ResNet per up block
        for key in ("norm_eps", "tiny_clamp"):
            setattr(self, key, check_float(where, key, getattr(self, key), 0))
        for key in ("use_post_quant_conv", "mid_block_add_attention"):
            check_bool(where, key, getattr(self, key))
        for key, most in (("block_out_channels", MAX_WIDTH), ("decoder_block_out_channels", MAX_WIDTH),
                          ("num_decoder_blocks", MAX_LAYERS)):
            setattr(self, key, tuple(check_list(where, key, getattr(self, key),
                                                lambda w, k, v, most=most: check_positive_int(w, k, v, most))))
            if len(getattr(self, key)) > MAX_LEVELS:
                raise ConfigError(f"{where}: {key} has {len(getattr(self, key))} levels; mdref builds at most "
                                  f"{MAX_LEVELS}")
        self.check_latent_statistics(where)
        if self.kind == "kl":
            bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
            if bad:
                raise ConfigError(f"{where}: block_out_channels {list(self.block_out_channels)} must all be "
                                  f"divisible by norm_num_groups={self.norm_num_groups} (GroupNorm), found {bad}")
        else:
            if len(self.decoder_block_out_channels) != len(self.num_decoder_blocks):
                raise ConfigError(f"{where}: decoder_block_out_channels has "
                                  f"{len(self.decoder_block_out_channels)}"
                                  f" entries, num_decoder_blocks {len(self.num_decoder_blocks)}; they must match")
            if len(set(self.decoder_block_out_channels)) != 1:
                raise ConfigError(f"{where}: diffusers' DecoderTiny only runs with equal "
                                  f"decoder_block_out_channels, found {list(self.decoder_block_out_channels)}")

    def check_latent_statistics(self, where):
        """latents_mean and latents_std: both null, or both latent_channels finite numbers (the std's nonzero)."""
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ConfigError(f"{where}: latents_mean and latents_std must be set together (diffusers' SDXL pipeline "
                              f"ignores one alone), found latents_mean={self.latents_mean!r}, "
                              f"latents_std={self.latents_std!r}")
        for key, nonzero in (("latents_mean", False), ("latents_std", True)):
            if getattr(self, key) is not None:
                setattr(self, key, tuple(check_list(where, key, getattr(self, key), lambda w, k, v, nz=nonzero:
                                                    check_float(w, k, v, nonzero=nz), length=self.latent_channels)))

    @classmethod
    def from_dict(cls, d, where="DecoderConfig"):
        """From a diffusers AutoencoderKL / AutoencoderTiny config.json dict, or mdref's own (no _class_name)."""
        return config_from_diffusers(d, where)

    def to_dict(self):
        return config_to_diffusers(self)

    @property
    def upsampling_factor(self):
        """Image pixels per latent pixel along each axis (8 for SD's VAE and TAESD)."""
        if self.kind == "kl":
            return 2 ** (len(self.block_out_channels) - 1)
        return self.upsampling_scaling_factor ** (len(self.num_decoder_blocks) - 1)


# diffusers defaults of each class (used for keys a config.json leaves out), the keys that do not touch the
# decoder's forward pass (encoder side, tiling, dtype policy), and the values mdref requires where a key does.
_KL_DEFAULTS = dict(latent_channels=4, out_channels=3, scaling_factor=0.18215, shift_factor=None,
                    block_out_channels=(64,), layers_per_block=1, norm_num_groups=32, use_post_quant_conv=True,
                    mid_block_add_attention=True, latents_mean=None, latents_std=None)
_KL_IGNORED = ("in_channels", "down_block_types", "sample_size", "force_upcast", "use_quant_conv")
_TINY_DEFAULTS = dict(latent_channels=4, out_channels=3, scaling_factor=1.0, shift_factor=0.0,
                      decoder_block_out_channels=(64, 64, 64, 64), num_decoder_blocks=(3, 3, 3, 1),
                      upsampling_scaling_factor=2)
_TINY_IGNORED = ("in_channels", "encoder_block_out_channels", "num_encoder_blocks", "latent_magnitude",
                 "latent_shift", "force_upcast")
_REQUIRED = {"act_fn": {"AutoencoderKL": "silu", "AutoencoderTiny": "relu"},
             "upsample_fn": {"AutoencoderTiny": "nearest"}}


def config_from_diffusers(d, where="config.json"):
    """DecoderConfig from a diffusers AutoencoderKL / AutoencoderTiny config dict (or mdref's own, kind given)."""
    d = dict(d)
    cls = d.get("_class_name")
    if cls is None:                                               # mdref's own config (kind "kl" by default)
        return from_dict(DecoderConfig, d, where=where)
    if cls not in ("AutoencoderKL", "AutoencoderTiny"):
        raise ConfigError(f"{where}: _class_name {cls!r} is not a decoder mdref reads "
                          f"(expected 'AutoencoderKL' or 'AutoencoderTiny')")
    for key, want in _REQUIRED.items():
        if cls in want and d.pop(key, want[cls]) != want[cls]:
            raise ConfigError(f"{where}: {key} must be {want[cls]!r} for {cls}")
    if cls == "AutoencoderKL":
        ups = d.pop("up_block_types", ["UpDecoderBlock2D"] * len(d.get("block_out_channels", (64,))))
        if any(u != "UpDecoderBlock2D" for u in ups):
            raise ConfigError(f"{where}: up_block_types {ups} unsupported (only 'UpDecoderBlock2D')")
        return from_dict(DecoderConfig, {**_KL_DEFAULTS, **d, "kind": "kl"}, ignore=_KL_IGNORED, where=where)
    # AutoencoderTiny registers block_out_channels = decoder_block_out_channels into its config as well.
    dec = d.get("decoder_block_out_channels", _TINY_DEFAULTS["decoder_block_out_channels"])
    if "block_out_channels" in d and list(d.pop("block_out_channels")) != list(dec):
        raise ConfigError(f"{where}: block_out_channels differs from decoder_block_out_channels {list(dec)}")
    return from_dict(DecoderConfig, {**_TINY_DEFAULTS, **d, "kind": "tiny"}, ignore=_TINY_IGNORED, where=where)


def config_to_diffusers(cfg):
    """The config.json that `save_pretrained` writes: diffusers keys, plus mdref's extension key (norm_eps / tiny_clamp)
    only where it differs from what diffusers hard-codes, so that diffusers loads the rest without a warning."""
    full, defaults = to_dict(cfg), DecoderConfig()
    if cfg.kind == "kl":
        keys, extension = list(_KL_DEFAULTS), "norm_eps"
        d = {"_class_name": "AutoencoderKL", "act_fn": "silu",
             "up_block_types": ["UpDecoderBlock2D"] * len(cfg.block_out_channels)}
    else:
        keys, extension = list(_TINY_DEFAULTS), "tiny_clamp"
        d = {"_class_name": "AutoencoderTiny", "act_fn": "relu", "upsample_fn": "nearest"}
    if full[extension] != getattr(defaults, extension):       # diffusers knows no such key: only where it differs
        keys.append(extension)
    d.update({k: list(full[k]) if isinstance(full[k], (tuple, list)) else full[k] for k in keys})
    return d


def decoder_spec(cfg):
    """The frozen KLDecoderSpec / TAESDDecoderSpec of a validated DecoderConfig."""
    if cfg.kind == "kl":
        return KLDecoderSpec(latent_channels=cfg.latent_channels, out_channels=cfg.out_channels,
                             widths=tuple(cfg.block_out_channels[::-1]), resnets_per_block=cfg.layers_per_block + 1,
                             groups=cfg.norm_num_groups, eps=cfg.norm_eps, post_quant_conv=cfg.use_post_quant_conv,
                             mid_attention=cfg.mid_block_add_attention)
    return TAESDDecoderSpec(latent_channels=cfg.latent_channels, out_channels=cfg.out_channels,
                            width=cfg.decoder_block_out_channels[0], blocks=tuple(cfg.num_decoder_blocks),
                            upsample=cfg.upsampling_scaling_factor, clamp=cfg.tiny_clamp)
