"""Lightweight image decoders: latents [B, c, h, w] -> images [B, 3, f*h, f*w] in [-1, 1] (not clipped).

* KL: the decoder half of diffusers ``AutoencoderKL`` (the Stable Diffusion VAE, Rombach et al. 2022, sec. 3):
  post_quant_conv (1x1), conv_in, a mid block (ResNet, one-head attention over the pixels, ResNet), up blocks of
  ResNets each followed (but the last) by 2x nearest upsampling + 3x3 conv, GroupNorm-SiLU-conv_out. The
  MobileDiffusion paper (sec. 3.4) prunes this layout in width and depth. Spec: `mdref.specs.KLDecoderSpec`.
* TAESD: the decoder half of diffusers ``AutoencoderTiny`` (madebyollin/taesd): a soft clamp, a flat Sequential of
  3x3 convs, ReLUs, residual blocks and nearest upsampling (`taesd_stages`), then [0, 1] -> [-1, 1].
  Spec: `mdref.specs.TAESDDecoderSpec`.
Legend: B batch, c latent channels, C width, h w latent size, f upsampling factor. The input is already mapped
back to the VAE's own scale, ``x0 / scaling_factor + shift_factor`` (the pipeline does it).
"""

from __future__ import annotations

import numpy as np

from .ops import conv2d, norm_silu_conv2d, relu, upsample_conv2d, upsample_nearest2d
from .trace import point, record, record_unbuilt
from .unet import pixel_attention, resnet, upsample


def kl_decode(z, *, decoder, post_quant_conv=None, spec):
    """AutoencoderKL.decode(z).sample: post_quant_conv, then diffusers' `Decoder`.  z [B, c, h, w] -> [B, 3, fh, fw]."""
    kw = dict(groups=spec.groups, eps=spec.eps)
    if spec.post_quant_conv:                                  # outside diffusers' `decoder.`; mdref's point is inside
        z = record("decoder.post_quant_conv", conv2d(z, post_quant_conv))
    x = record(decoder["conv_in"], conv2d(z, decoder["conv_in"], padding=1))     # [B, C_top, h, w]
    mid = decoder["mid_block"]                                                    # UNetMidBlock2D, VAE form
    x = record(mid["resnets"][0], resnet(x, None, **mid["resnets"][0], **kw))
    if spec.mid_attention:
        a = mid["attentions"][0]
        x = record(a, pixel_attention(x, **a, **kw))                              # one head of width C
    x = record(mid, record(mid["resnets"][1], resnet(x, None, **mid["resnets"][1], **kw)))
    for i, block in enumerate(decoder["up_blocks"][:len(spec.widths)]):           # UpDecoderBlock2D
        for r in block["resnets"][:spec.resnets_per_block]:
            x = record(r, resnet(x, None, **r, **kw))                             # [B, C_i, ., .]
        if i < len(spec.widths) - 1:
            u = block["upsamplers"][0]
            x = record(u, upsample(x, **u))                                       # [B, C_i, 2., 2.]
        x = record(block, x)
    x = norm_silu_conv2d(x, decoder["conv_norm_out"], decoder["conv_out"], padding=1, **kw)   # GN-SiLU-conv_out
    return record("decoder.out", x)                                               # [B, 3, fh, fw]


def taesd_stages(spec):
    """DecoderTiny's Sequential as a list of stage names; list index i = parameter path `decoder.layers.{i}`
    (= raw taesd.py index i + 1, whose index 0 is the clamp). For TAESD (width 64, blocks (3, 3, 3, 1)), literally:
       0 conv(4->64)  1 relu  2 block 3 block 4 block  5 upsample  6 conv_nobias
       7 block 8 block 9 block  10 upsample 11 conv_nobias  12 block 13 block 14 block  15 upsample 16 conv_nobias
      17 block  18 conv(64->3)
    """
    stages = ["conv", "relu"]
    for level, n in enumerate(spec.blocks):
        stages += ["block"] * n + (["upsample", "conv_nobias"] if level < len(spec.blocks) - 1 else [])
    return stages + ["conv"]


def taesd_block(x, *, conv):
    """AutoencoderTinyBlock with equal widths (identity skip): relu(conv(relu(conv(relu(conv(x))))) + x)."""
    h = relu(conv2d(x, conv[0], padding=1))
    h = relu(conv2d(h, conv[2], padding=1))
    return relu(conv2d(h, conv[4], padding=1) + x)


def taesd_decode(z, *, decoder, spec):
    """AutoencoderTiny.decode(z).sample: tanh(z / 3) * 3, the `taesd_stages` Sequential, x * 2 - 1."""
    layers = decoder["layers"]                                                    # None where a stage has no weights
    x = np.tanh(z / spec.clamp) * spec.clamp                                      # |x| < clamp
    upsampled = False           # an upsample stage left to the next conv (ops.upsample_conv2d never builds it)
    for i, stage in enumerate(taesd_stages(spec)):
        if stage == "relu":
            x = relu(x)
        elif stage == "block":
            x = taesd_block(x, **layers[i])
        elif stage == "upsample":                                                 # [B, C, sH, sW], built lazily
            forced = record_unbuilt(point(layers, str(i)), lambda x=x: upsample_nearest2d(x, spec.upsample))
            upsampled = forced is None
            x = x if upsampled else forced
            continue
        elif upsampled:                                                           # conv_nobias of the upsampled x
            x, upsampled = upsample_conv2d(x, layers[i], scale=spec.upsample, padding=1), False   # [B, C, sH, sW]
        else:                                                                     # conv / conv_nobias
            x = conv2d(x, layers[i], padding=1)
        x = record(point(layers, str(i)), x)
    return record("decoder.out", x * 2 - 1)                                      # [B, 3, fh, fw] in [-1, 1]
