"""A PyTorch module from an mdref component: the same config, the same parameters, the checkpoint's own names.

    module = torch_module(mdref.UNet.from_pretrained(path))      # TwinUNet; state_dict keys == the checkpoint's
    modules = pipeline_modules(mdref.Pipeline.from_pretrained())  # {"text_encoder", "unet", "decoder"}

| mdref component | PyTorch module | forward |
|---|---|---|
| `TextEncoder` | `TextEncoderOutput`: transformers `CLIPTextModel`, eager attention | `ids [B, T] -> [B, T, D]` |
| `UNet` | `mdref_torch.twin.TwinUNet` (every layout mdref loads, SD's included) | `(sample, t, context) -> [B, C, H, W]` |
| `Decoder` kind "kl" | `KLDecode`: diffusers `AutoencoderKL`'s `post_quant_conv` + `Decoder` | `z -> image in [-1, 1]` |
| `Decoder` kind "tiny" | `TinyDecode`: diffusers `AutoencoderTiny`'s `DecoderTiny` | `z -> image in [-1, 1]` |

Every module's ``state_dict()`` keys are the checkpoint keys mdref reads (``text_model.encoder.layers.0...``,
``down_blocks.1.attentions.0...``, ``decoder.up_blocks.0...``, ``post_quant_conv.weight``), loaded strictly: a key
on one side only is an error. The decoders take the *decoder input* ``x0 / scaling_factor + shift_factor`` (the
pipeline's convention), as mdref's `Decoder` does. Constants diffusers hard-codes and mdref reads from a config
(the VAE GroupNorm ``norm_eps``) are set on the built module; a value diffusers cannot run (TAESD's ``tiny_clamp``
other than 3) is a ValueError naming it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from mdref.formats.safetensors import flatten

from .twin import TwinUNet

__all__ = ["torch_module", "pipeline_modules", "state_dict", "clip_text_model", "twin_unet", "KLDecode",
           "TinyDecode", "vae_decoder", "TextEncoderOutput"]


def state_dict(flat, dtype=torch.float32):
    """{checkpoint key: numpy array} -> {checkpoint key: torch tensor of `dtype`} (copies: the module owns them)."""
    return {k: torch.from_numpy(np.array(v, dtype=np.float64 if dtype == torch.float64 else np.float32))
            .to(dtype) for k, v in flat.items()}


def _load(module, state, what):
    """load_state_dict(strict): every key of `state` is a parameter or buffer of `module` and none is missing."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    persistent = set(module.state_dict())
    missing = [k for k in missing if k in persistent]
    if missing or unexpected:
        raise ValueError(f"{what}: the PyTorch module and mdref's parameters differ: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return module.eval()


# ---- text encoder -------------------------------------------------------------------------------------------------
class TextEncoderOutput(nn.Module):
    """CLIPTextModel returning its last hidden state as a tensor (what mdref's TextEncoder returns), its modules
    under the checkpoint's names ``text_model.*``: transformers 4 keeps the CLIPTextTransformer as
    ``model.text_model``; transformers 5 flattens it into the model and renames the checkpoint's keys on load."""

    def __init__(self, model):
        super().__init__()
        self.text_model = getattr(model, "text_model", model)

    def forward(self, ids):
        return self.text_model(input_ids=ids).last_hidden_state          # [B, T, D]


def clip_text_model(config, state):
    """transformers CLIPTextModel (eager attention: q k^T, scale, softmax, as written) from an mdref
    TextEncoderConfig.to_dict() (transformers' own keys) and the checkpoint's tensors (``text_model.*``)."""
    import transformers

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg, attn_implementation="eager"))
    return _load(TextEncoderOutput(model), state, "CLIPTextModel")


# ---- UNet ---------------------------------------------------------------------------------------------------------
def twin_unet(config, state):
    """The twin UNet (mdref_torch.twin) from a UNet2DConditionModel config dict (with mdref's extension keys)."""
    return _load(TwinUNet(config), state, "TwinUNet")


# ---- decoders -----------------------------------------------------------------------------------------------------
class KLDecode(nn.Module):
    """AutoencoderKL.decode(z).sample: post_quant_conv (1x1, if the VAE has one), then diffusers' Decoder.
    Children are named as the checkpoint (`post_quant_conv`, `decoder`)."""

    def __init__(self, decoder, post_quant_conv=None):
        super().__init__()
        self.post_quant_conv = post_quant_conv
        self.decoder = decoder

    def forward(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)                                            # [B, 3, fh, fw] in [-1, 1]


class TinyDecode(nn.Module):
    """AutoencoderTiny.decode(z).sample: diffusers' DecoderTiny (tanh(z / 3) * 3, the layers, x * 2 - 1)."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, z):
        return self.decoder(z)                                            # [B, 3, fh, fw] in [-1, 1]


def vae_decoder(cfg, state):
    """KLDecode / TinyDecode from an mdref DecoderConfig (its fields are diffusers' config keys)."""
    from diffusers.models.autoencoders.vae import Decoder, DecoderTiny

    if cfg.kind == "kl":
        n = len(cfg.block_out_channels)
        decoder = Decoder(in_channels=cfg.latent_channels, out_channels=cfg.out_channels,
                          up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.block_out_channels),
                          layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups, act_fn="silu",
                          mid_block_add_attention=cfg.mid_block_add_attention)
        for m in decoder.modules():                                       # diffusers hard-codes 1e-6
            if isinstance(m, nn.GroupNorm):
                m.eps = cfg.norm_eps
        pqc = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1) if cfg.use_post_quant_conv else None
        return _load(KLDecode(decoder, pqc), state, "AutoencoderKL decoder")
    if cfg.tiny_clamp != 3.0:
        raise ValueError(f"tiny_clamp {cfg.tiny_clamp}: diffusers' DecoderTiny hard-codes tanh(x / 3) * 3")
    decoder = DecoderTiny(in_channels=cfg.latent_channels, out_channels=cfg.out_channels,
                          num_blocks=tuple(cfg.num_decoder_blocks), block_out_channels=tuple(
                              cfg.decoder_block_out_channels), upsampling_scaling_factor=cfg.upsampling_scaling_factor,
                          act_fn="relu", upsample_fn="nearest")
    return _load(TinyDecode(decoder), state, "AutoencoderTiny decoder")


# ---- from mdref components -----------------------------------------------------------------------------------------
def torch_module(component, dtype=torch.float32):
    """The PyTorch module of an mdref TextEncoder, UNet or Decoder, with its parameters, in eval mode.
    A component computing an emulated float16 / bfloat16 holds float32 arrays of rounded weights: those are
    loaded as they are (cast the module with .half() for a float16 model)."""
    import mdref

    state = state_dict(component.checkpoint_keys(flatten(component.params)), dtype)
    if isinstance(component, mdref.TextEncoder):
        module = clip_text_model(component.config.to_dict(), state)
    elif isinstance(component, mdref.UNet):
        module = twin_unet(component.config.to_dict(), state)
    elif isinstance(component, mdref.Decoder):
        module = vae_decoder(component.config, state)
    else:
        raise TypeError(f"expected an mdref TextEncoder, UNet or Decoder, found {type(component).__name__}")
    return module.to(dtype)


def pipeline_modules(pipe, dtype=torch.float32):
    """{"text_encoder", "unet", "decoder"}: torch_module of each component of an mdref Pipeline."""
    return {name: torch_module(getattr(pipe, name), dtype) for name in ("text_encoder", "unet", "decoder")}
