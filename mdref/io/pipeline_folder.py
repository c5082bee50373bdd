"""Pipeline folders and pipeline presets -> the parts a `mdref.Pipeline` is made of.

A pipeline folder is diffusers' layout: ``model_index.json``, ``tokenizer/``, ``text_encoder/``, ``unet/``,
``vae/``, ``scheduler/``. The scheduler config (diffusers' home of ``prediction_type``) governs the sampler; a
folder without one samples with mdref's defaults and the UNet config's prediction type. When both files state a
prediction type (``prediction_type`` in unet/config.json is an mdref extension key, present in mdref-written
folders whose UNet does not predict epsilon; diffusers' UNet configs have none), they must agree.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..tokenizer import Tokenizer
from .components import Decoder, TextEncoder, UNet
from .config import ConfigError, read_json
from .presets import COMPONENT_SEED_OFFSET, PIPELINE_PRESETS
from ..formats.resources import DEFAULT_MODEL_LABEL, weights_dir
from .scheduler_config import SchedulerConfig, load_scheduler_config

__all__ = ["DEFAULT_MODEL_DIR", "DEFAULT_MODEL_LABEL", "load_folder", "load_preset"]

DEFAULT_MODEL_DIR = Path(os.environ.get("MDREF_DEFAULT_MODEL", weights_dir() / "default"))


def load_folder(path, dtype):
    """dict(tokenizer, text_encoder, unet, decoder, scheduler, weight_files) read from a pipeline folder."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such model folder (expected a diffusers pipeline folder with "
                          f"text_encoder/, unet/, vae/, scheduler/)")
    missing = [d for d in ("text_encoder", "unet", "vae") if not (path / d).is_dir()]
    if missing:
        raise ConfigError(f"{path}: not a pipeline folder, missing subfolders {missing}")
    tokenizer = Tokenizer.from_pretrained(path / "tokenizer" if (path / "tokenizer").is_dir() else None)
    unet = UNet.from_pretrained(path / "unet", dtype=dtype)
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        scheduler = SchedulerConfig(prediction_type=unet.config.prediction_type)
    else:
        scheduler = load_scheduler_config(sched_file)
        unet_file = path / "unet" / "config.json"
        stated = read_json(unet_file).get("prediction_type") if unet_file.is_file() else None
        if stated is not None and stated != scheduler.prediction_type:
            raise ConfigError(f"{sched_file}: prediction_type {scheduler.prediction_type!r} contradicts "
                              f"{unet_file}: prediction_type {stated!r} (the UNet was trained for one of them)")
    text_encoder = TextEncoder.from_pretrained(path / "text_encoder", dtype=dtype)
    decoder = Decoder.from_pretrained(path / "vae", dtype=dtype)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, decoder=decoder, scheduler=scheduler,
                weight_files=[*text_encoder.files, *unet.files, *decoder.files])   # only what was read


def load_preset(name, seed, dtype):
    """dict(tokenizer, text_encoder, unet, decoder, scheduler) for a pipeline preset with seeded weights: each
    component draws from seed + COMPONENT_SEED_OFFSET[component]."""
    if name not in PIPELINE_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PIPELINE_PRESETS)}")
    preset = PIPELINE_PRESETS[name]
    parts = {}
    for key, component in (("text_encoder", TextEncoder), ("unet", UNet), ("decoder", Decoder)):
        entry, s = preset[key], seed + COMPONENT_SEED_OFFSET[key]
        parts[key] = (component.from_preset(entry, s, dtype) if isinstance(entry, str)
                      else component.from_config(entry, s, dtype))
    scheduler = SchedulerConfig(**preset["scheduler"], prediction_type=parts["unet"].config.prediction_type)
    return dict(parts, tokenizer=Tokenizer.from_pretrained(None), scheduler=scheduler)
