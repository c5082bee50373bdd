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

from ..guards import SEED_LIMIT
from ..tokenizer import Tokenizer
from .components import Decoder, DreamLiteUNet, QwenTextEncoder, TextEncoder, TextEncoderWithProjection, UNet
from .config import ConfigError, read_json
from .presets import COMPONENT_SEED_OFFSET, PIPELINE_PRESETS
from ..formats.resources import DEFAULT_MODEL_LABEL, weights_dir
from .scheduler_config import SchedulerConfig, load_scheduler_config

__all__ = ["DEFAULT_MODEL_DIR", "DEFAULT_MODEL_LABEL", "load_folder", "load_preset", "is_dreamlite_folder",
           "load_dreamlite_folder"]

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
    sdxl = load_sdxl_parts(path, dtype)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, decoder=decoder, scheduler=scheduler,
                **sdxl, weight_files=[*text_encoder.files, *getattr(sdxl.get("text_encoder_2"), "files", ()),
                                      *unet.files, *decoder.files])   # only what was read


def load_sdxl_parts(path, dtype):
    """The second text tower of a StableDiffusionXLPipeline folder (text_encoder_2/, tokenizer_2/) and
    model_index.json's force_zeros_for_empty_prompt (the pipeline class's default, True, when unstated); {} for a
    folder without text_encoder_2/."""
    if not (path / "text_encoder_2").is_dir():
        return {}
    if not (path / "tokenizer_2").is_dir():
        raise ConfigError(f"{path}: text_encoder_2/ needs its tokenizer_2/ (OpenCLIP's pads with '!', CLIP-L's "
                          f"with <|endoftext|>: one cannot stand in for the other)")
    index = path / "model_index.json"
    force_zeros = read_json(index).get("force_zeros_for_empty_prompt", True) if index.is_file() else True
    if not isinstance(force_zeros, bool):
        raise ConfigError(f"{index}: force_zeros_for_empty_prompt must be true or false, found {force_zeros!r}")
    return dict(tokenizer_2=Tokenizer.from_pretrained(path / "tokenizer_2"),
                text_encoder_2=TextEncoderWithProjection.from_pretrained(path / "text_encoder_2", dtype=dtype),
                force_zeros_for_empty_prompt=force_zeros)


def load_preset(name, seed, dtype):
    """dict(tokenizer, text_encoder, unet, decoder, scheduler) for a pipeline preset with seeded weights: each
    component draws from seed + COMPONENT_SEED_OFFSET[component]."""
    if name not in PIPELINE_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PIPELINE_PRESETS)}")
    preset = PIPELINE_PRESETS[name]
    parts = {}
    for key, component in (("text_encoder", TextEncoder), ("unet", UNet), ("decoder", Decoder)):
        entry, s = preset[key], (int(seed) + COMPONENT_SEED_OFFSET[key]) % SEED_LIMIT   # in range for any seed
        parts[key] = (component.from_preset(entry, s, dtype) if isinstance(entry, str)
                      else component.from_config(entry, s, dtype))
    scheduler = SchedulerConfig(**preset["scheduler"], prediction_type=parts["unet"].config.prediction_type)
    return dict(parts, tokenizer=Tokenizer.from_pretrained(None), scheduler=scheduler)


# ---- DreamLite (diffusers DreamLiteMobilePipeline folders) -----------------------------------------------------
DREAMLITE_PIPELINES = ("DreamLiteMobilePipeline", "DreamLitePipeline")


def is_dreamlite_folder(path):
    """True for a folder whose model_index.json names a DreamLite pipeline."""
    index = Path(path) / "model_index.json"
    return index.is_file() and read_json(index).get("_class_name") in DREAMLITE_PIPELINES


def load_dreamlite_folder(path, dtype):
    """dict(tokenizer, text_encoder, unet, decoder, scheduler, weight_files, guided) of a DreamLiteMobilePipeline
    folder (guided False) or a DreamLitePipeline folder (the base model, guided True):
    tokenizer/ (Qwen, tokenizer.json), text_encoder/ (Qwen3-VL; optional: without it the text features must be
    given as an array), unet/ (DreamLiteUNetModel), vae/ (AutoencoderTiny), scheduler/
    (FlowMatchEulerDiscreteScheduler)."""
    from ..qwen_tokenizer import QwenTokenizer

    path = Path(path)
    missing = [d for d in ("unet", "vae", "scheduler") if not (path / d).is_dir()]
    if missing:
        raise ConfigError(f"{path}: not a DreamLite pipeline folder, missing subfolders {missing}")
    unet = UNet.from_pretrained(path / "unet", dtype=dtype)
    if not isinstance(unet, DreamLiteUNet):
        raise ConfigError(f"{path / 'unet'}: a DreamLite pipeline needs a DreamLiteUNetModel config "
                          f"(_class_name), found a UNet2DConditionModel")
    scheduler = load_scheduler_config(path / "scheduler")
    if type(scheduler).__name__ != "FlowMatchSchedulerConfig":
        raise ConfigError(f"{path / 'scheduler'}: DreamLite samples with FlowMatchEulerDiscreteScheduler")
    has_text = (path / "text_encoder").is_dir()
    text_encoder = QwenTextEncoder.from_pretrained(path / "text_encoder", dtype=dtype) if has_text else None
    tokenizer = QwenTokenizer.from_pretrained(path / "tokenizer") if has_text else None
    decoder = Decoder.from_pretrained(path / "vae", dtype=dtype)
    files = [*(text_encoder.files if has_text else ()), *unet.files, *decoder.files]
    guided = read_json(path / "model_index.json").get("_class_name") == "DreamLitePipeline"
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, decoder=decoder, scheduler=scheduler,
                weight_files=files, guided=guided)
