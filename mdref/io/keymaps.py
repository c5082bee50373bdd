"""Key maps between checkpoint layouts and the parameter trees the layers take (applied before the schema check).

- text encoder: keys with or without transformers 4's ``text_model.`` prefix; two keys that carry no part of the
  last hidden state are skipped: ``embeddings.position_ids`` (a buffer older transformers saved) and
  ``text_projection.weight`` (``CLIPTextModelWithProjection``'s head, kept when read as that model: SDXL's
  ``text_encoder_2/``; it is saved without the prefix, as transformers names it).
- decoder: a full autoencoder checkpoint also holds the encoder: keys under ``encoder.`` (both kinds) and
  ``quant_conv.`` (kl) are skipped. Old diffusers VAE checkpoints name the mid attention's projections
  ``query/key/value/proj_attn``; they are renamed to ``to_q/to_k/to_v/to_out.0`` as diffusers does on load.
- raw TAESD (``taesd_decoder.safetensors``, no config.json): its keys are the indices of taesd.py's
  ``nn.Sequential(Clamp(), conv, ReLU, Block, ...)``; diffusers' `DecoderTiny.layers` is the same Sequential without
  the leading Clamp, so raw index ``k`` is diffusers ``decoder.layers.{k-1}`` (raw ``1.weight`` =
  ``decoder.layers.0.weight``, raw ``3.conv.0.weight`` = ``decoder.layers.2.conv.0.weight``). The layer counts and
  widths are read off the keys.
Everything not recognised is left for the schema check, so a stray key is reported as unexpected.
"""

from __future__ import annotations

import re

from .decoder_config import DecoderConfig
from ..formats.safetensors import WeightsError

__all__ = ["text_encoder_keys", "TEXT_KEY_PREFIX", "qwen_text_keys", "select_decoder_keys", "raw_taesd_to_diffusers",
           "diffusers_to_raw_taesd", "config_from_raw_taesd", "is_raw_taesd"]

TEXT_KEY_PREFIX = "text_model."
TEXT_SKIPPED_KEYS = ("embeddings.position_ids", "text_projection.weight")
TEXT_INT_KEYS = frozenset(p + k for k in TEXT_SKIPPED_KEYS for p in ("", TEXT_KEY_PREFIX))   # position_ids is int64


def text_encoder_keys(flat, keep=()):
    """Strip the 'text_model.' prefix and drop the two keys outside the last hidden state, except those in `keep`
    (CLIPTextModelWithProjection keeps text_projection.weight)."""
    flat = {(k[len(TEXT_KEY_PREFIX):] if k.startswith(TEXT_KEY_PREFIX) else k): v for k, v in flat.items()}
    return {k: v for k, v in flat.items() if k not in TEXT_SKIPPED_KEYS or k in keep}


# Qwen3-VL: Qwen3VLForConditionalGeneration keeps the text path under 'model.language_model.' (transformers 4.57+
# and 5), a bare Qwen3VLTextModel has no prefix; the vision tower and the LM head are not part of the text path.
QWEN_PREFIXES = ("model.language_model.", "language_model.")
QWEN_SKIPPED_PREFIXES = ("model.visual.", "visual.", "lm_head.")


def qwen_text_keys(flat):
    """Drop the vision tower and the LM head, strip the language model's prefix."""
    out = {}
    for key, value in flat.items():
        if key.startswith(QWEN_SKIPPED_PREFIXES):
            continue
        prefix = next((p for p in QWEN_PREFIXES if key.startswith(p)), "")
        out[key[len(prefix):]] = value
    return out


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


def is_raw_taesd(flat):
    """taesd.py checkpoints are bare nn.Sequential state dicts: every key starts with a layer index."""
    return bool(flat) and all(k.split(".", 1)[0].isdigit() for k in flat)
