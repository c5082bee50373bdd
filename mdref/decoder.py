"""Lightweight image decoders: latents [B, c, h, w] -> images [B, 3, f*h, f*w] in [-1, 1].

Two layouts, one `Decoder` class (`DecoderConfig.kind` picks the layout):

* ``"kl"``: the decoder half of diffusers `AutoencoderKL` (the Stable Diffusion VAE, Rombach et al. 2022,
  "High-Resolution Image Synthesis with Latent Diffusion Models"): `post_quant_conv` (1x1), `conv_in`, a mid
  block (ResNet, single-head self-attention, ResNet), up blocks of `layers_per_block + 1` ResNets each followed
  (except the last) by nearest 2x upsampling + 3x3 conv, then GroupNorm -> SiLU -> `conv_out`. Every GroupNorm
  uses eps 1e-6: diffusers' `Decoder` hard-codes `resnet_eps=1e-6` for the mid block, the up blocks and the mid
  attention's `group_norm`, and `eps=1e-6` for `conv_norm_out` (it is not a config.json key; mdref keeps it as
  the config field `norm_eps`). The MobileDiffusion paper's decoder is this layout pruned in width and depth.
* ``"tiny"``: the decoder half of diffusers `AutoencoderTiny` (TAESD, madebyollin/taesd): a soft clamp
  ``tanh(x / 3) * 3``, then a flat Sequential of 3x3 convs, ReLUs, residual blocks and nearest upsampling
  (see `tiny_stages`), then ``x * 2 - 1``.

Range conventions (the contract of ``vae.decode(latents).sample``):
  input  = the UNet's latent already mapped back to the VAE's own scale, ``latents / scaling_factor + shift_factor``
           (the pipeline does this with `Decoder.scaling_factor` / `Decoder.shift_factor`);
  output = image in [-1, 1] (not clipped here; the pipeline clips when it converts to 8-bit pixels).
  AutoencoderKL: SD's VAE uses scaling_factor 0.18215, shift_factor None (read as 0.0).
  AutoencoderTiny: scaling_factor 1.0, shift_factor 0.0; its layers produce [0, 1] and diffusers' `DecoderTiny`
  maps that to [-1, 1] with ``x * 2 - 1``. The original `taesd_decoder.safetensors` is the same network without
  that last step (its output is [0, 1]); mdref applies ``x * 2 - 1`` for both layouts, so a raw TAESD file loaded
  here also returns [-1, 1].

Checkpoint layouts read by `Decoder.from_pretrained`:
  diffusers folder: ``config.json`` (``_class_name`` AutoencoderKL / AutoencoderTiny) +
  ``diffusion_pytorch_model.safetensors``. A full autoencoder checkpoint also holds the encoder: keys under
  ``encoder.`` (both kinds) and ``quant_conv.`` (kl) are recognised and skipped; any other unexpected key is an
  error. Old diffusers VAE checkpoints name the mid attention's projections ``query/key/value/proj_attn``; they
  are renamed to ``to_q/to_k/to_v/to_out.0`` as diffusers does on load.
  raw TAESD: ``taesd_decoder.safetensors`` (no config.json). Its keys are the indices of taesd.py's
  ``nn.Sequential(Clamp(), conv, ReLU, Block, ...)``; diffusers' `DecoderTiny.layers` is the same Sequential
  without the leading Clamp, so raw index ``k`` is diffusers ``decoder.layers.{k-1}`` (raw ``1.weight`` =
  ``decoder.layers.0.weight``, raw ``3.conv.0.weight`` = ``decoder.layers.2.conv.0.weight``). The layer counts
  and widths are read off the keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError, from_dict, read_json, to_dict
from .ops import attention, conv2d, group_norm, linear, relu, silu, upsample_nearest2d
from .trace import record
from .weights import WeightsError, check_schema, flatten, init_params, nest, read_safetensors, write_safetensors

__all__ = ["DecoderConfig", "Decoder", "param_schema", "tiny_stages", "kl_decode", "tiny_decode",
           "PRESETS", "WEIGHTS_NAME", "TAESD_NAME"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TAESD_NAME = "taesd_decoder.safetensors"


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

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.decoder_block_out_channels = tuple(self.decoder_block_out_channels)
        self.num_decoder_blocks = tuple(self.num_decoder_blocks)
        self.shift_factor = 0.0 if self.shift_factor is None else float(self.shift_factor)
        if self.kind == "kl":
            bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
            if bad:
                raise ConfigError(f"DecoderConfig: block_out_channels {list(self.block_out_channels)} are not all "
                                  f"divisible by norm_num_groups={self.norm_num_groups} (found {bad})")
        elif self.kind == "tiny":
            if len(self.decoder_block_out_channels) != len(self.num_decoder_blocks):
                raise ConfigError(f"DecoderConfig: decoder_block_out_channels has {len(self.decoder_block_out_channels)}"
                                  f" entries, num_decoder_blocks {len(self.num_decoder_blocks)}; they must match")
            if len(set(self.decoder_block_out_channels)) != 1:
                raise ConfigError("DecoderConfig: diffusers' DecoderTiny only runs with equal "
                                  f"decoder_block_out_channels, found {list(self.decoder_block_out_channels)}")
        else:
            raise ConfigError(f"DecoderConfig: kind must be 'kl' or 'tiny', found {self.kind!r}")

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
                    mid_block_add_attention=True)
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
    if cls is None and "kind" in d:                               # mdref's own config
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
        for key in ("latents_mean", "latents_std"):
            if d.pop(key, None) is not None:
                raise ConfigError(f"{where}: {key} is set; mdref's decoder does not apply per-channel latent "
                                  f"statistics (only scaling_factor and shift_factor)")
        return from_dict(DecoderConfig, {**_KL_DEFAULTS, **d, "kind": "kl"}, ignore=_KL_IGNORED, where=where)
    # AutoencoderTiny registers block_out_channels = decoder_block_out_channels into its config as well.
    dec = d.get("decoder_block_out_channels", _TINY_DEFAULTS["decoder_block_out_channels"])
    if "block_out_channels" in d and list(d.pop("block_out_channels")) != list(dec):
        raise ConfigError(f"{where}: block_out_channels differs from decoder_block_out_channels {list(dec)}")
    return from_dict(DecoderConfig, {**_TINY_DEFAULTS, **d, "kind": "tiny"}, ignore=_TINY_IGNORED, where=where)


def config_to_diffusers(cfg):
    """The config.json that `save_pretrained` writes: diffusers keys + mdref's extension keys."""
    if cfg.kind == "kl":
        keys = list(_KL_DEFAULTS) + ["norm_eps"]
        d = {"_class_name": "AutoencoderKL", "act_fn": "silu",
             "up_block_types": ["UpDecoderBlock2D"] * len(cfg.block_out_channels)}
    else:
        keys = list(_TINY_DEFAULTS) + ["tiny_clamp"]
        d = {"_class_name": "AutoencoderTiny", "act_fn": "relu", "upsample_fn": "nearest"}
    full = to_dict(cfg)
    d.update({k: list(full[k]) if isinstance(full[k], tuple) else full[k] for k in keys})
    return d


# ---- weight schema ------------------------------------------------------------------------------------
def _conv(key, cout, cin, k, bias=True):
    """nn.Conv2d(cin, cout, k) keys."""
    s = {f"{key}.weight": (cout, cin, k, k)}
    if bias:
        s[f"{key}.bias"] = (cout,)
    return s


def _norm(key, c):
    """nn.GroupNorm(., c) keys."""
    return {f"{key}.weight": (c,), f"{key}.bias": (c,)}


def _resnet_schema(key, cin, cout):
    """ResnetBlock2D keys without time embedding; a 1x1 conv_shortcut only when the width changes."""
    s = {**_norm(f"{key}.norm1", cin), **_conv(f"{key}.conv1", cout, cin, 3),
         **_norm(f"{key}.norm2", cout), **_conv(f"{key}.conv2", cout, cout, 3)}
    if cin != cout:
        s.update(_conv(f"{key}.conv_shortcut", cout, cin, 1))
    return s


def _kl_schema(cfg):
    """AutoencoderKL decode-side keys, in module order."""
    s, c, top = {}, cfg.latent_channels, cfg.block_out_channels[-1]
    if cfg.use_post_quant_conv:
        s.update(_conv("post_quant_conv", c, c, 1))
    s.update(_conv("decoder.conv_in", top, c, 3))
    s.update(_resnet_schema("decoder.mid_block.resnets.0", top, top))
    if cfg.mid_block_add_attention:
        a = "decoder.mid_block.attentions.0"
        s.update(_norm(f"{a}.group_norm", top))
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            s.update({f"{a}.{proj}.weight": (top, top), f"{a}.{proj}.bias": (top,)})
    s.update(_resnet_schema("decoder.mid_block.resnets.1", top, top))
    widths = cfg.block_out_channels[::-1]                           # up_blocks.0 is the lowest resolution
    prev = widths[0]
    for i, w in enumerate(widths):
        for j in range(cfg.layers_per_block + 1):
            s.update(_resnet_schema(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else w, w))
        if i < len(widths) - 1:
            s.update(_conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", w, w, 3))
        prev = w
    s.update(_norm("decoder.conv_norm_out", cfg.block_out_channels[0]))
    s.update(_conv("decoder.conv_out", cfg.out_channels, cfg.block_out_channels[0], 3))
    return s


def tiny_stages(cfg):
    """DecoderTiny's Sequential as a list of (stage, width); list index = `decoder.layers.{i}` index.

    For TAESD's default (widths 64, blocks (3, 3, 3, 1)) this is, literally (raw taesd.py index = i + 1):
       0 conv(4->64)+b   1 relu   2 block 3 block 4 block   5 upsample  6 conv(64->64, no bias)
       7 block 8 block 9 block   10 upsample 11 conv      12 block 13 block 14 block  15 upsample 16 conv
      17 block   18 conv(64->3)+b
    A block is ``relu(conv3(relu(conv2(relu(conv1(x))))) + x)`` (keys ``conv.0``, ``conv.2``, ``conv.4``)."""
    widths, counts = cfg.decoder_block_out_channels, cfg.num_decoder_blocks
    stages = [("conv_in", widths[0]), ("relu", widths[0])]
    for i, (w, n) in enumerate(zip(widths, counts)):
        stages += [("block", w)] * n
        if i < len(counts) - 1:
            stages += [("upsample", w), ("conv_nobias", w)]
    return stages + [("conv_out", cfg.out_channels)]


def _tiny_schema(cfg):
    """AutoencoderTiny decode-side keys, in module order."""
    s, width = {}, cfg.decoder_block_out_channels[0]
    for i, (stage, _) in enumerate(tiny_stages(cfg)):
        key = f"decoder.layers.{i}"
        if stage == "conv_in":
            s.update(_conv(key, width, cfg.latent_channels, 3))
        elif stage == "block":
            for j in (0, 2, 4):
                s.update(_conv(f"{key}.conv.{j}", width, width, 3))
        elif stage == "conv_nobias":
            s.update(_conv(key, width, width, 3, bias=False))
        elif stage == "conv_out":
            s.update(_conv(key, cfg.out_channels, width, 3))
    return s


def param_schema(cfg):
    """Ordered {checkpoint key: shape} of the decode side (post_quant_conv + decoder.*), diffusers names."""
    return _kl_schema(cfg) if cfg.kind == "kl" else _tiny_schema(cfg)


# ---- KL-VAE decoder layers ----------------------------------------------------------------------------
def vae_resnet(p, x, *, groups, eps):
    """diffusers ResnetBlock2D without a time embedding: GN-SiLU-conv3x3, GN-SiLU-conv3x3, + (1x1-projected) skip."""
    h = conv2d(silu(group_norm(x, p["norm1"], groups, eps)), p["conv1"], padding=1)     # [B, C', H, W]
    h = conv2d(silu(group_norm(h, p["norm2"], groups, eps)), p["conv2"], padding=1)
    skip = conv2d(x, p["conv_shortcut"]) if "conv_shortcut" in p else x                 # [B, C', H, W]
    return skip + h


def vae_attention(p, x, *, groups, eps, heads):
    """diffusers Attention in the VAE mid block: GroupNorm, q/k/v linear over pixels, softmax attention, to_out,
    + residual (rescale_output_factor 1). x [B, C, H, W]."""
    B, C, H, W = x.shape
    h = group_norm(x, p["group_norm"], groups, eps)
    h = h.reshape(B, C, H * W).transpose(0, 2, 1)                   # [B, HW, C]
    q, k, v = linear(h, p["to_q"]), linear(h, p["to_k"]), linear(h, p["to_v"])
    h = linear(attention(q, k, v, heads), p["to_out"]["0"])         # [B, HW, C]
    return x + h.transpose(0, 2, 1).reshape(B, C, H, W)            # [B, C, H, W]


def kl_mid_block(p, x, cfg):
    """diffusers UNetMidBlock2D (VAE form): ResNet, attention (1 head of width C), ResNet."""
    kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps)
    x = vae_resnet(p["resnets"]["0"], x, **kw)
    if cfg.mid_block_add_attention:
        x = vae_attention(p["attentions"]["0"], x, heads=1, **kw)  # diffusers: attention_head_dim = C
    return vae_resnet(p["resnets"]["1"], x, **kw)


def kl_up_block(p, x, cfg):
    """diffusers UpDecoderBlock2D: layers_per_block + 1 ResNets, then nearest 2x + conv3x3 (all but the last)."""
    for j in range(cfg.layers_per_block + 1):
        x = vae_resnet(p["resnets"][str(j)], x, groups=cfg.norm_num_groups, eps=cfg.norm_eps)
    if "upsamplers" in p:
        x = upsample_nearest2d(x, 2)                                # [B, C, 2H, 2W]
        x = conv2d(x, p["upsamplers"]["0"]["conv"], padding=1)
    return x


def kl_decode(p, z, cfg):
    """AutoencoderKL.decode(z).sample: post_quant_conv, diffusers `Decoder`. z [B, c, h, w] -> [B, 3, f h, f w]."""
    if cfg.use_post_quant_conv:
        z = record("decoder.post_quant_conv", conv2d(z, p["post_quant_conv"]))
    d = p["decoder"]
    x = record("decoder.conv_in", conv2d(z, d["conv_in"], padding=1))           # [B, C_top, h, w]
    x = record("decoder.mid_block", kl_mid_block(d["mid_block"], x, cfg))
    for i in range(len(cfg.block_out_channels)):
        x = record(f"decoder.up_blocks.{i}", kl_up_block(d["up_blocks"][str(i)], x, cfg))  # [B, C_i, ., .]
    x = silu(group_norm(x, d["conv_norm_out"], cfg.norm_num_groups, cfg.norm_eps))
    return record("decoder.out", conv2d(x, d["conv_out"], padding=1))            # [B, 3, f h, f w]


# ---- TAESD decoder ------------------------------------------------------------------------------------
def tiny_block(p, x):
    """AutoencoderTinyBlock (in == out channels, so the skip is the identity): relu(convs(x) + x)."""
    h = relu(conv2d(x, p["conv"]["0"], padding=1))
    h = relu(conv2d(h, p["conv"]["2"], padding=1))
    return relu(conv2d(h, p["conv"]["4"], padding=1) + x)


def tiny_decode(p, z, cfg):
    """AutoencoderTiny.decode(z).sample: soft clamp, the `tiny_stages` Sequential, [0, 1] -> [-1, 1]."""
    layers = p["decoder"]["layers"]
    x = np.tanh(z / cfg.tiny_clamp) * cfg.tiny_clamp                # |x| < 3
    for i, (stage, _) in enumerate(tiny_stages(cfg)):
        if stage == "relu":
            x = relu(x)
        elif stage == "block":
            x = tiny_block(layers[str(i)], x)
        elif stage == "upsample":
            x = upsample_nearest2d(x, cfg.upsampling_scaling_factor)  # [B, C, sH, sW]
        else:                                                       # conv_in / conv_nobias / conv_out
            x = conv2d(x, layers[str(i)], padding=1)
        record(f"decoder.layers.{i}", x)
    return record("decoder.out", x * 2 - 1)                  # [B, 3, f h, f w] in [-1, 1]


# ---- loading helpers ----------------------------------------------------------------------------------
_SKIP_PREFIXES = {"kl": ("encoder.", "quant_conv."), "tiny": ("encoder.",)}
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTN_RE = re.compile(r"^(decoder\.mid_block\.attentions\.0\.)(query|key|value|proj_attn)(\.(?:weight|bias))$")


def select_decoder_keys(flat, cfg):
    """Drop the encoder side of a full autoencoder checkpoint and rename diffusers' deprecated attention names.
    Everything else is left for the schema check, so a stray key is reported as unexpected."""
    out = {}
    for key, value in flat.items():
        if key.startswith(_SKIP_PREFIXES[cfg.kind]):
            continue
        m = _OLD_ATTN_RE.match(key) if cfg.kind == "kl" else None
        out[f"{m[1]}{_OLD_ATTN[m[2]]}{m[3]}" if m else key] = value
    return out


def raw_taesd_to_diffusers(flat):
    """taesd.py Sequential keys ('1.weight', '3.conv.0.weight') -> 'decoder.layers.0.weight', ... (index - 1)."""
    out = {}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if not head.isdigit() or int(head) < 1:
            raise WeightsError(f"raw TAESD decoder: unexpected key {key!r} (expected '<index >= 1>.<param>')")
        out[f"decoder.layers.{int(head) - 1}.{rest}"] = value
    return out


def diffusers_to_raw_taesd(flat):
    """Inverse of raw_taesd_to_diffusers."""
    out = {}
    for key, value in flat.items():
        i, _, rest = key[len("decoder.layers."):].partition(".")
        out[f"{int(i) + 1}.{rest}"] = value
    return out


def config_from_raw_taesd(flat):
    """Infer DecoderConfig(kind='tiny') from raw TAESD keys (already mapped to diffusers names)."""
    idx = sorted({int(k.split(".")[2]) for k in flat})
    if not idx or f"decoder.layers.{idx[0]}.weight" not in flat or idx[0] != 0:
        raise WeightsError("raw TAESD decoder: no first conv ('1.weight')")
    width, latent = flat["decoder.layers.0.weight"].shape[:2]
    counts, n, i = [], 0, 2                                          # layers 0, 1 = conv_in, relu
    while i <= idx[-1]:
        if f"decoder.layers.{i}.conv.0.weight" in flat:             # a block
            n, i = n + 1, i + 1
        elif f"decoder.layers.{i + 1}.weight" in flat and f"decoder.layers.{i + 1}.bias" not in flat:
            counts, n, i = counts + [n], 0, i + 2                    # upsample, conv (no bias)
        elif f"decoder.layers.{i}.bias" in flat:                    # conv_out
            counts, i = counts + [n], i + 1
            break
        else:
            raise WeightsError(f"raw TAESD decoder: cannot read the layer at Sequential index {i + 1}")
    out = flat.get(f"decoder.layers.{i - 1}.weight")
    if out is None or i - 1 != idx[-1]:
        raise WeightsError(f"raw TAESD decoder: layers after Sequential index {i} are not part of the TAESD layout")
    return DecoderConfig(kind="tiny", latent_channels=int(latent), out_channels=int(out.shape[0]),
                         scaling_factor=1.0, shift_factor=0.0, decoder_block_out_channels=(int(width),) * len(counts),
                         num_decoder_blocks=tuple(counts))


def _is_raw_taesd(flat):
    """taesd.py checkpoints are bare nn.Sequential state dicts: every key starts with a layer index."""
    return bool(flat) and all(k.split(".", 1)[0].isdigit() for k in flat)


def _locate(path):
    """(config.json or None, weights file) for a folder or a .safetensors file."""
    path = Path(path)
    if path.is_file():
        cfg = path.parent / "config.json"
        return (cfg if cfg.is_file() else None), path
    if not path.is_dir():
        raise WeightsError(f"{path}: no such decoder folder or weights file")
    if (path / "config.json").is_file():
        for name in (WEIGHTS_NAME, "diffusion_pytorch_model.fp16.safetensors"):
            if (path / name).is_file():
                return path / "config.json", path / name
        raise WeightsError(f"{path}: has config.json but no {WEIGHTS_NAME}")
    raw = sorted(path.glob("tae*_decoder.safetensors"))
    if len(raw) == 1:
        return None, raw[0]
    raise WeightsError(f"{path}: neither a diffusers decoder folder (config.json + {WEIGHTS_NAME}) nor a folder "
                       f"with one raw TAESD decoder ({TAESD_NAME}); found {[p.name for p in raw] or 'neither'}")


# ---- presets ------------------------------------------------------------------------------------------
PRESETS = {
    # MobileDiffusion's pruned VAE decoder (paper: ~9.8M parameters vs SD's 49.5M): see docs/decoders.md.
    "mobilediffusion-lite": dict(kind="kl", latent_channels=8, block_out_channels=(64, 128, 256, 256),
                                 layers_per_block=1, norm_num_groups=32, scaling_factor=1.0),
    # Stable Diffusion 1.x / 2.x VAE decoder (49.5M with post_quant_conv).
    "sd-vae": dict(kind="kl", latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                   norm_num_groups=32, scaling_factor=0.18215),
    # TAESD (madebyollin/taesd) for SD 1.x / 2.x latents.
    "taesd": dict(kind="tiny", latent_channels=4, scaling_factor=1.0, shift_factor=0.0),
}


class Decoder:
    """A latent-to-image decoder: ``Decoder(...)(latents)`` == diffusers ``vae.decode(latents).sample``."""

    def __init__(self, config, params, dtype=np.float32):
        self.config, self.params, self.dtype = config, params, np.dtype(dtype)

    @property
    def scaling_factor(self):
        return self.config.scaling_factor

    @property
    def shift_factor(self):
        return self.config.shift_factor

    @property
    def upsampling_factor(self):
        return self.config.upsampling_factor

    @classmethod
    def from_config(cls, cfg, seed=0, dtype=np.float32):
        """Seeded weights (weights.init_params) for any config."""
        return cls(cfg, init_params(param_schema(cfg), seed, dtype), dtype)

    @classmethod
    def from_preset(cls, name, seed=0, dtype=np.float32):
        if name not in PRESETS:
            raise ConfigError(f"unknown decoder preset {name!r} (known: {', '.join(PRESETS)})")
        return cls.from_config(DecoderConfig(**PRESETS[name]), seed, dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=np.float32):
        """Load a diffusers AutoencoderKL / AutoencoderTiny folder (full or decoder-only), an mdref folder (the
        same layout), or a raw `taesd_decoder.safetensors` (file or folder holding it)."""
        cfg_path, weights_path = _locate(path)
        flat, _ = read_safetensors(weights_path)
        if _is_raw_taesd(flat):                                     # no config: read the layout off the keys
            flat = raw_taesd_to_diffusers(flat)
            cfg = config_from_raw_taesd(flat)
        else:
            if cfg_path is None:
                raise WeightsError(f"{weights_path}: no config.json beside it (only a raw TAESD decoder, whose "
                                   f"keys are Sequential indices, loads without one)")
            cfg = config_from_diffusers(read_json(cfg_path), where=str(cfg_path))
            flat = select_decoder_keys(flat, cfg)
        schema = param_schema(cfg)
        check_schema(flat, schema, str(weights_path))
        return cls(cfg, nest({k: flat[k].astype(dtype) for k in schema}), dtype)

    def save_pretrained(self, folder, dtype=np.float32):
        """Write config.json + diffusion_pytorch_model.safetensors (diffusers names, decode-side weights only)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        flat = {k: np.asarray(v, dtype=dtype) for k, v in flatten(self.params).items()}
        write_safetensors(folder / WEIGHTS_NAME, flat, {"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config_to_diffusers(self.config), indent=2) + "\n")

    def num_parameters(self):
        return int(sum(np.prod(s) for s in param_schema(self.config).values()))

    def __call__(self, latents):
        """latents [B, c, h, w] (already latents / scaling_factor + shift_factor) -> image [B, 3, f h, f w], [-1, 1]."""
        z = np.asarray(latents, dtype=self.dtype)
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"Decoder: latents must be [B, {self.config.latent_channels}, h, w], found {z.shape}")
        if self.config.kind == "kl":
            return kl_decode(self.params, z, self.config)
        return tiny_decode(self.params, z, self.config)
