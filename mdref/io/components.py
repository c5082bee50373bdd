"""The component shell, written once: `TextEncoder`, `UNet` and `Decoder` differ only in their config class, spec,
schema, key map and forward function.

Every component offers ``from_pretrained(path)`` (a component folder, a diffusers pipeline folder holding the
component's subfolder, or one ``.safetensors`` file with ``config.json`` beside it), ``from_config(config | dict,
seed)``, ``from_preset(name, seed)``, ``save_pretrained(folder)``, ``num_parameters()`` and ``param_schema(config)``;
``dtype`` is the compute dtype: float32 or float64, or float16 / bfloat16 emulated by `mdref.precision` (float32
arrays holding rounded values; ``upcast`` / ``downcast`` / ``profile`` name its overrides), parsed once into the
component's ``compute`` (a `mdref.precision.Compute`). An unknown preset, a config that
cannot be read and a key mdref does not implement are `ConfigError`s; a weights file that does not fit the schema
is a `WeightsError`; both name the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import decoder as decoder_math
from ..guards import SEED_LIMIT, is_int, memory_limit
from .. import precision
from .. import qwen_text as qwen_math
from .. import text_encoder as text_math
from .. import unet as unet_math
from ..params import tree
from . import keymaps
from .config import ConfigError, read_json
from .decoder_config import DecoderConfig, decoder_spec
from .presets import (DECODER_PRESETS, QWEN_TEXT_PRESETS, TEXT_ENCODER_PRESETS, TEXT_ENCODER_WITH_PROJECTION_PRESETS,
                      UNET_PRESETS)
from .qwen_text_config import QwenTextConfig, qwen_text_spec
from ..formats.safetensors import (WeightsError, check_schema, flatten, init_params, nest, read_safetensors, refuse_pickle,
                          write_safetensors)
from .schema import (decoder_schema, num_parameters, qwen_text_schema, text_encoder_schema,
                     text_encoder_with_projection_schema, unet_schema)
from .text_encoder_config import TextEncoderConfig, TextEncoderWithProjectionConfig, text_encoder_spec
from .unet_config import UNetConfig, unet_spec

__all__ = ["Component", "TextEncoder", "TextEncoderWithProjection", "QwenTextEncoder", "UNet", "Decoder",
           "parse_compute", "locate"]

CONFIG_NAME = "config.json"


def parse_compute(dtype, who, upcast=None, downcast=None, profile=None):
    """mdref.precision.compute: the one parse of a compute dtype, a PrecisionError named by `who` (a ValueError)."""
    try:
        return precision.compute(dtype, upcast=upcast, downcast=downcast, profile=profile)
    except precision.PrecisionError as e:
        raise precision.PrecisionError(f"{who}: {e}") from None


def check_seed(seed, what):
    """A seed of seeded weights: an int (Python or NumPy, not bool) with 0 <= seed < 2**64, as noise seeds."""
    if not is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{what} must be an integer with 0 <= seed < 2**64, found {seed!r} ({type(seed).__name__})")


def check_weights_fit(nbytes, who):
    """Refuse, before drawing them, weights larger than the memory limit (a config asking for a billion layers)."""
    limit, source = memory_limit()
    if limit is not None and nbytes > limit:
        raise ConfigError(f"{who}: the config's weights need {nbytes / 2**30:.1f} GiB, more than the "
                          f"{limit / 2**30:.1f} GiB memory limit ({source})")


def locate(path, subfolder, weights_names):
    """(config.json or None, [weights files]) for a component folder, a pipeline folder holding `subfolder`, or a
    .safetensors file. `weights_names`: file names (or globs) tried in order; '<name>.index.json' finds shards.
    A folder without weights gives the WeightsError to raise in place of the list, once its config has been read."""
    path = Path(path)
    refuse_pickle(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path}: expected a .safetensors file (mdref reads safetensors only)")
        config = path.parent / CONFIG_NAME
        return (config if config.is_file() else None), [path]
    if not path.is_dir():
        raise WeightsError(f"{path}: no such file or folder")
    if not (path / CONFIG_NAME).is_file() and (path / subfolder).is_dir():
        path = path / subfolder                                   # a diffusers pipeline folder
    config = path / CONFIG_NAME if (path / CONFIG_NAME).is_file() else None
    for name in weights_names:
        index = path / f"{name}.index.json"
        if index.is_file():
            return config, [path / s for s in read_shard_index(index)]
        found = sorted(path.glob(name))
        if len(found) == 1:
            return config, found
    present = sorted(p.name for p in path.iterdir())
    return config, WeightsError(f"{path}: no {weights_names[0]} (found {present}); mdref reads safetensors only "
                                f"(convert a .bin / .pt checkpoint to safetensors first; it is never unpickled)")


def read_shard_index(index):
    """The shard file names of a sharded checkpoint's ``*.index.json`` ({"weight_map": {key: shard}}): each one a
    .safetensors file name in the index's folder (no path, so nothing outside the folder is read)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConfigError(f"{index}: weight_map must be a non-empty object {{tensor name: shard file}}, "
                          f"found {weight_map!r:.80}")
    for key, shard in weight_map.items():
        if not (isinstance(shard, str) and shard.endswith(".safetensors") and Path(shard).name == shard):
            raise ConfigError(f"{index}: weight_map[{key!r}] must be a .safetensors file name in the same folder "
                              f"(no path), found {shard!r}")
    return sorted(set(weight_map.values()))


def check_token_ids(ids, cfg, who):
    """ids as an integer array [B, T] with T <= cfg.max_position_embeddings and every id in [0, cfg.vocab_size),
    or a ValueError naming `who`."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"{who}: ids must be an integer array [B, T], got {ids.dtype} {ids.shape}")
    if ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"{who}: {ids.shape[1]} tokens, but max_position_embeddings is "
                         f"{cfg.max_position_embeddings}")
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(f"{who}: token ids must lie in [0, {cfg.vocab_size}), found [{ids.min()}, {ids.max()}]")
    return ids


class Component(precision.ComputesIn):
    """A config, its frozen spec, the checkpoint's parameter tree (``params``), the array ``dtype`` and the emulated
    ``precision`` (a `mdref.precision.Precision`, or None for float32 / float64)."""
    config_class = None         # the config dataclass (from_dict / to_dict)
    presets = {}                # name -> config dict
    subfolder = ""              # the component's folder in a diffusers pipeline folder
    weights_names = ()          # safetensors file names from_pretrained tries, first = the one save_pretrained writes
    int_keys = frozenset()      # integer buffers a checkpoint may hold (skipped by the key map); all else is float
    name = ""                   # the component's name in mdref.precision's overrides and in trace names

    def __init__(self, config, params, dtype=np.float32, *, upcast=None, downcast=None, profile=None):
        self.config = config
        self.compute = parse_compute(dtype, type(self).__name__, upcast, downcast, profile)
        if self.precision is not None:                      # weights rounded to the dtype once
            params = nest({k: self.precision.round(v) for k, v in flatten(params).items()})
        self.params = params
        self.spec = self.make_spec(config)
        self.files = ()                                     # the weights files read (from_pretrained), in order

    def computing(self):
        """The context the forward pass runs in: this component's rounding policy (None: plain float)."""
        return precision.using(None if self.precision is None else self.precision.within(self.name))

    # ---- what each component defines ----
    @staticmethod
    def make_spec(config):
        raise NotImplementedError

    @classmethod
    def param_schema(cls, config):
        """Ordered {checkpoint key: shape} for a config."""
        raise NotImplementedError

    @classmethod
    def read_checkpoint(cls, config, flat, where):
        """(config, flat tensors renamed to the schema's keys); config is None when no config.json was found."""
        if config is None:
            raise ConfigError(f"{where}: no {CONFIG_NAME} beside the weights")
        return config, flat

    def checkpoint_keys(self, flat):
        """The keys save_pretrained writes (the schema's keys, unless the layout prefixes them)."""
        return flat

    # ---- the shell ----
    @classmethod
    def as_config(cls, config, where):
        if isinstance(config, cls.config_class):
            return config
        if isinstance(config, dict):
            return cls.config_class.from_dict(dict(config), where=where)
        raise ConfigError(f"{where}: expected a {cls.config_class.__name__} or a config dict, "
                          f"found {type(config).__name__}")

    @classmethod
    def from_config(cls, config, seed=0, dtype=np.float32, *, upcast=None, downcast=None, profile=None):
        """Seeded weights (`safetensors.init_params`) for a config object or a config.json dict. seed: an int with
        0 <= seed < 2**64. The weights must fit in the memory limit (mdref.guards.memory_limit), checked from the
        schema before anything is drawn."""
        config = cls.as_config(config, f"{cls.__name__}.from_config")
        compute = parse_compute(dtype, cls.__name__, upcast, downcast, profile)
        check_seed(seed, f"{cls.__name__}.from_config: seed")
        schema = cls.param_schema(config)
        check_weights_fit(num_parameters(schema) * compute.carrier.itemsize, f"{cls.__name__}.from_config")
        return cls(config, init_params(schema, seed, compute.carrier), compute)

    @classmethod
    def from_preset(cls, name, seed=0, dtype=np.float32, *, upcast=None, downcast=None, profile=None):
        """A named architecture (`mdref.io.presets`) with seeded weights."""
        if name not in cls.presets:
            raise ConfigError(f"{cls.__name__}: unknown preset {name!r} (known: {', '.join(sorted(cls.presets))})")
        return cls.from_config(cls.as_config(cls.presets[name], f"{cls.__name__} preset {name!r}"), seed, dtype,
                               upcast=upcast, downcast=downcast, profile=profile)

    @classmethod
    def from_pretrained(cls, path, dtype=np.float32, *, upcast=None, downcast=None, profile=None):
        """A component folder, a pipeline folder holding `subfolder`, or a .safetensors file with config.json
        beside it. Weights may be stored f16 / bf16 / f32 / f64; they are cast to dtype (float16 / bfloat16:
        to float32, then rounded)."""
        compute = parse_compute(dtype, cls.__name__, upcast, downcast, profile)
        config_path, files = locate(path, cls.subfolder, cls.weights_names)
        config = None if config_path is None else cls.config_class.from_dict(read_json(config_path),
                                                                             where=str(config_path))
        if isinstance(files, WeightsError):
            raise files
        flat = {}
        for f in files:
            flat.update(read_safetensors(f, allow_int=cls.int_keys)[0])
        where = ", ".join(str(f) for f in files)
        config, flat = cls.read_checkpoint(config, flat, where)
        schema = cls.param_schema(config)
        check_schema(flat, schema, where)
        component = cls(config, nest({k: flat[k].astype(compute.carrier) for k in schema}), compute)
        component.files = tuple(str(f) for f in files)
        return component

    def save_pretrained(self, folder, dtype=np.float32):
        """Write config.json + the weights file in the layout from_pretrained (and diffusers / transformers) read."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        flat = self.checkpoint_keys({k: np.asarray(v, dtype=dtype) for k, v in flatten(self.params).items()})
        write_safetensors(folder / self.weights_names[0], flat, {"format": "pt"})
        return folder

    def num_parameters(self):
        return num_parameters(self.param_schema(self.config))

    def __repr__(self):
        what = self.compute.describe()
        return f"{type(self).__name__}({self.num_parameters():,} parameters, dtype={what})"


class TextEncoder(Component):
    """CLIP text encoder: ``te(ids) -> last_hidden_state [B, T, D]`` (== transformers CLIPTextModel)."""
    config_class, presets, subfolder = TextEncoderConfig, TEXT_ENCODER_PRESETS, "text_encoder"
    weights_names = ("model.safetensors", "model.fp16.safetensors")
    make_spec = staticmethod(text_encoder_spec)
    int_keys = keymaps.TEXT_INT_KEYS
    name = "text_encoder"

    @classmethod
    def param_schema(cls, config):
        return text_encoder_schema(config)

    @classmethod
    def read_checkpoint(cls, config, flat, where):
        config, flat = super().read_checkpoint(config, flat, where)
        return config, keymaps.text_encoder_keys(flat)

    def checkpoint_keys(self, flat):
        return {keymaps.TEXT_KEY_PREFIX + k: v for k, v in flat.items()}

    @property
    def trace_name(self):
        """The first part of this component's trace names: its folder in a diffusers pipeline folder."""
        return self.subfolder

    def _checked_ids(self, ids):
        return check_token_ids(ids, self.config, type(self).__name__)

    def _tree(self):
        """The parameter tree (mdref.params), its paths starting with trace_name ("text_encoder_2.encoder...")."""
        return tree(self.params, self.trace_name)

    def _tower(self):
        """The parameters text_transformer takes (a subclass may hold more, e.g. text_projection)."""
        p = self._tree()
        return {k: p[k] for k in ("embeddings", "encoder", "final_layer_norm")}

    def __call__(self, ids):
        """ids int [B, T] (T <= max_position_embeddings) -> last hidden state [B, T, hidden_size]."""
        ids = self._checked_ids(ids)
        with self.computing():
            return text_math.text_transformer(ids, **self._tower(), spec=self.spec)

    def hidden_state(self, ids, index=-1):
        """transformers' ``model(ids, output_hidden_states=True).hidden_states[index]`` [B, T, hidden_size]: index 0
        the embeddings, j the output of encoder layer j-1, before the final LayerNorm (-1: the last layer's). SDXL
        reads index -2, and -(clip_skip + 2) with diffusers' clip_skip. Only the layers up to it are run."""
        j, ids, p = self._hidden_index(index), self._checked_ids(ids), self._tower()
        with self.computing():
            return text_math.hidden_states(ids, embeddings=p["embeddings"], encoder=p["encoder"], spec=self.spec,
                                           layers=j)[j]

    def _hidden_index(self, index):
        """hidden_states[index] as a position in [0, layers]; a ValueError naming the range otherwise."""
        n = self.spec.layers + 1                                   # the embeddings + one state per layer
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not -n <= index < n:
            raise ValueError(f"{type(self).__name__}: hidden state index must be an int in [{-n}, {n - 1}] "
                             f"({self.spec.layers} layers + the embeddings), found {index!r}")
        return int(index) % n

    def pooled(self, ids, hidden=None):
        """pooler_output [B, D]: the last hidden state at each row's EOS token (text_encoder.pooled_output)."""
        hidden = self(ids) if hidden is None else hidden
        return text_math.pooled_output(np.asarray(ids), hidden, self.config.eos_token_id)


class TextEncoderWithProjection(TextEncoder):
    """CLIP text encoder with its projection head (transformers CLIPTextModelWithProjection, SDXL's text_encoder_2):
    ``te(ids)`` -> last_hidden_state, ``te.text_embeds(ids)`` -> text_embeds [B, projection_dim], and
    ``te.hidden_state_and_text_embeds(ids, index)`` both from one pass. Traced as ``text_encoder_2.*``."""
    config_class, presets, subfolder = TextEncoderWithProjectionConfig, TEXT_ENCODER_WITH_PROJECTION_PRESETS, \
        "text_encoder_2"
    int_keys = frozenset(k for k in keymaps.TEXT_INT_KEYS if k.endswith("position_ids"))

    @classmethod
    def param_schema(cls, config):
        return text_encoder_with_projection_schema(config)

    @classmethod
    def read_checkpoint(cls, config, flat, where):
        config, flat = Component.read_checkpoint(config, flat, where)
        return config, keymaps.text_encoder_keys(flat, keep=("text_projection.weight",))

    def checkpoint_keys(self, flat):
        """transformers' names: 'text_model.' before the tower's keys, text_projection.weight as it is."""
        return {(k if k.startswith("text_projection.") else keymaps.TEXT_KEY_PREFIX + k): v for k, v in flat.items()}

    def text_embeds(self, ids, last_hidden_state=None):
        """CLIPTextModelWithProjection.text_embeds [B, projection_dim]: the last hidden state at each row's EOS token
        through text_projection (no bias)."""
        ids = self._checked_ids(ids)
        hidden = self(ids) if last_hidden_state is None else last_hidden_state
        with self.computing():
            return text_math.text_embeds(ids, hidden, text_projection=self._tree()["text_projection"],
                                         eos_token_id=self.config.eos_token_id)

    def hidden_state_and_text_embeds(self, ids, index=-2):
        """(hidden_states[index] [B, T, hidden_size], text_embeds [B, projection_dim]) from one pass through every
        layer: what SDXL's encode_prompt reads from text_encoder_2 (index -2, or -(clip_skip + 2))."""
        j, ids = self._hidden_index(index), self._checked_ids(ids)
        with self.computing():
            states, pooled = text_math.with_projection(ids, **self._tree(), spec=self.spec,
                                                       eos_token_id=self.config.eos_token_id)
        return states[j], pooled
class QwenTextEncoder(Component):
    """Qwen3-VL's language model, text path (DreamLite's text encoder): ``te(ids, attention_mask)`` ->
    ``hidden_states[-1]`` [B, T, D] (== transformers Qwen3VLForConditionalGeneration(..., output_hidden_states=True)
    .hidden_states[-1], which is last_hidden_state, after the final RMSNorm)."""
    config_class, presets, subfolder = QwenTextConfig, QWEN_TEXT_PRESETS, "text_encoder"
    weights_names = ("model.safetensors", "model.fp16.safetensors")
    make_spec = staticmethod(qwen_text_spec)
    name = "text_encoder"

    @classmethod
    def param_schema(cls, config):
        return qwen_text_schema(config)

    @classmethod
    def read_checkpoint(cls, config, flat, where):
        config, flat = super().read_checkpoint(config, flat, where)
        return config, keymaps.qwen_text_keys(flat)

    def __call__(self, ids, attention_mask=None):
        """ids int [B, T] (T <= max_position_embeddings), attention_mask [B, T] of 1 / 0 (None: no padding) ->
        hidden_states[-1] [B, T, hidden_size]."""
        ids = check_token_ids(ids, self.config, "QwenTextEncoder")
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.shape != ids.shape or not np.isin(attention_mask, (0, 1)).all():
                raise ValueError(f"QwenTextEncoder: attention_mask must be 1 / 0 of the ids' shape {ids.shape}, "
                                 f"got {attention_mask.dtype} {attention_mask.shape}")
        with self.computing():
            return qwen_math.text_model(ids, attention_mask, **self.params, spec=self.spec)


class UNet(Component):
    """A UNet2DConditionModel-compatible UNet (SD layouts and MobileDiffusion's)."""
    config_class, presets, subfolder = UNetConfig, UNET_PRESETS, "unet"
    weights_names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
    make_spec = staticmethod(unet_spec)
    name = "unet"

    @classmethod
    def param_schema(cls, config):
        return unet_schema(unet_spec(config))

    def __call__(self, sample, timestep, context):
        """sample [B, C_in, H, W], timestep scalar or [B], context [B, T, D] -> [B, C_out, H, W]
        (== UNet2DConditionModel(sample, timestep, context).sample)."""
        spec = self.spec
        sample, context = np.asarray(sample, dtype=self.dtype), np.asarray(context, dtype=self.dtype)
        if sample.ndim != 4 or sample.shape[1] != spec.in_channels:
            raise ValueError(f"UNet: sample must be [B, {spec.in_channels}, H, W], got shape {sample.shape}")
        B, _, H, W = sample.shape
        f = spec.size_factor
        if H % f or W % f:
            raise ValueError(f"UNet: sample height and width must be divisible by {f} (2**(levels-1), "
                             f"{len(spec.down)} levels), got H={H}, W={W}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != spec.context_dim:
            raise ValueError(f"UNet: context must be [B={B}, T, {spec.context_dim}], got shape {context.shape}")
        t = np.asarray(timestep, dtype=np.float64).reshape(-1)
        if t.size not in (1, B):
            raise ValueError(f"UNet: timestep must be a scalar or have shape [B={B}], got shape {np.shape(timestep)}")
        t = np.broadcast_to(t, (B,)).astype(self.dtype)
        with self.computing():
            return unet_math.unet(sample, t, context, **tree(self.params, self.name), spec=spec)


class Decoder(Component):
    """A latent-to-image decoder: ``Decoder(...)(latents)`` == diffusers ``vae.decode(latents).sample``."""
    config_class, presets, subfolder = DecoderConfig, DECODER_PRESETS, "vae"
    weights_names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                     "tae*_decoder.safetensors")
    make_spec = staticmethod(decoder_spec)
    name = "decoder"

    @classmethod
    def param_schema(cls, config):
        return decoder_schema(decoder_spec(config))

    @classmethod
    def read_checkpoint(cls, config, flat, where):
        if keymaps.is_raw_taesd(flat):                      # taesd.py's Sequential: the layout is read off the keys
            flat = keymaps.raw_taesd_to_diffusers(flat)
            return keymaps.config_from_raw_taesd(flat), flat
        if config is None:
            raise WeightsError(f"{where}: no config.json beside it (only a raw TAESD decoder, whose keys are "
                               f"Sequential indices, loads without one)")
        return config, keymaps.select_decoder_keys(flat, config)

    @property
    def scaling_factor(self):
        return self.config.scaling_factor

    @property
    def shift_factor(self):
        return self.config.shift_factor

    @property
    def upsampling_factor(self):
        return self.spec.upsampling_factor

    def __call__(self, latents):
        """latents [B, c, h, w] (already latents / scaling_factor + shift_factor) -> image [B, 3, f h, f w], [-1, 1]."""
        z = np.asarray(latents, dtype=self.dtype)
        if z.ndim != 4 or z.shape[1] != self.spec.latent_channels:
            raise ValueError(f"Decoder: latents must be [B, {self.spec.latent_channels}, h, w], found {z.shape}")
        decode = decoder_math.kl_decode if self.config.kind == "kl" else decoder_math.taesd_decode
        with self.computing():
            return decode(z, **tree(self.params), spec=self.spec)           # its keys start with decoder. already
