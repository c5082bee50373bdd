"""The PyTorch side of an mdref pipeline folder, for parity tests and timings: transformers CLIPTextModel, the
twin UNet (mdref_torch.twin) and diffusers AutoencoderKL (decoder half), float32, eval mode, from the same safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from mdref_torch.twin import TwinUNet


def _state(path):
    return {k: v.float() for k, v in load_file(str(path)).items()}


def text_encoder(folder):
    from transformers import CLIPTextModel
    return CLIPTextModel.from_pretrained(Path(folder), torch_dtype=torch.float32).eval()


def unet(folder):
    """TwinUNet from config.json + diffusion_pytorch_model.safetensors; every key must match."""
    folder = Path(folder)
    model = TwinUNet(json.loads((folder / "config.json").read_text())).eval()
    model.load_state_dict(_state(folder / "diffusion_pytorch_model.safetensors"), strict=True)
    return model


def autoencoder(folder):
    """AutoencoderKL from config.json + the decoder-only safetensors; only encoder.* may be missing."""
    from diffusers import AutoencoderKL
    folder = Path(folder)
    cfg = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
    model = AutoencoderKL(**cfg).eval()
    missing, unexpected = model.load_state_dict(_state(folder / "diffusion_pytorch_model.safetensors"), strict=False)
    if unexpected or not all(k.startswith("encoder.") for k in missing):
        raise ValueError(f"{folder}: unexpected keys {unexpected[:5]}, missing decoder keys "
                         f"{[k for k in missing if not k.startswith('encoder.')][:5]}")
    return model
