"""CLIP text transformer: token ids [B, T] -> last hidden state [B, T, D].

Reproduces transformers' ``CLIPTextModel(...).last_hidden_state`` (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision", sec. 2.4: a GPT-2 style transformer with masked
self-attention): token + learned position embeddings, ``num_hidden_layers`` pre-LayerNorm blocks
``x + attn(LN1(x))``, ``x + mlp(LN2(x))`` with causal multi-head self-attention and a 2-layer MLP, then a final
LayerNorm. Stable Diffusion conditions its UNet on this last hidden state (all 77 positions, padding included).

The causal mask is additive: 0 on and below the diagonal, the dtype's most negative finite value above it, as
transformers builds it (``ops.causal_mask``). The attention scale is ``head_dim ** -0.5``.

Checkpoints: a transformers ``CLIPTextModel`` folder (``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``), a diffusers pipeline folder's ``text_encoder/``, or one ``.safetensors`` file
with a ``config.json`` beside it. Keys are read with or without the ``text_model.`` prefix (transformers 4 writes
it, transformers 5 does not). Two keys that carry no part of the last hidden state are recognised and skipped:
``embeddings.position_ids`` (a buffer older transformers saved) and ``text_projection.weight``
(``CLIPTextModelWithProjection``'s head). Any other unexpected, missing or mis-shaped key is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError, from_dict, read_json, to_dict
from .ops import attention, causal_mask, gelu, layer_norm, linear, quick_gelu
from .trace import record
from .weights import (WeightsError, check_schema, flatten, init_params, nest, read_safetensors, refuse_pickle,
                      write_safetensors)

__all__ = ["TextEncoderConfig", "TextEncoder", "param_schema", "text_transformer", "embeddings", "encoder_layer",
           "self_attention", "mlp", "pooled_output", "ACTIVATIONS", "PRESETS"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
KEY_PREFIX = "text_model."
SKIPPED_KEYS = ("embeddings.position_ids", "text_projection.weight")

# transformers' hidden_act names -> the function each one is (transformers.activations.ACT2FN).
ACTIVATIONS = {
    "quick_gelu": quick_gelu,                                   # x * sigmoid(1.702 x), OpenAI CLIP
    "gelu": gelu,                                               # exact erf GELU (OpenCLIP, SD-2)
    "gelu_python": gelu,
    "gelu_new": lambda x: gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: gelu(x, approximate="tanh"),
}

# CLIPTextConfig keys with no effect on last_hidden_state (dropout is off at inference; init and projection
# settings; PretrainedConfig's bookkeeping and generation defaults that old config.json files spell out).
IGNORED_KEYS = (
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "name_or_path",
    "attention_dropout", "dropout", "initializer_range", "initializer_factor", "projection_dim",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "finetuning_task", "id2label",
    "label2id", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "problem_type", "gradient_checkpointing",
)


@dataclass
class TextEncoderConfig:
    """transformers CLIPTextConfig, the fields that shape the forward pass (defaults: CLIPTextConfig's)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407        # 2 in configs saved before transformers PR #24773: pooling then takes argmax(ids)

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"TextEncoderConfig: hidden_act {self.hidden_act!r} is not supported "
                              f"(expected one of {sorted(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"TextEncoderConfig: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d, where="TextEncoderConfig"):
        """From a transformers CLIPTextConfig config.json dict; unknown keys raise ConfigError naming them."""
        if d.get("model_type", "clip_text_model") != "clip_text_model":
            raise ConfigError(f"{where}: model_type {d['model_type']!r}, expected 'clip_text_model' "
                              f"(for a full CLIPModel, point at its text encoder)")
        return from_dict(cls, d, ignore=IGNORED_KEYS, where=where)

    def to_json(self):
        """config.json content that transformers' CLIPTextModel.from_pretrained reads."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **to_dict(self)}


PRESETS = {
    # OpenAI CLIP ViT-L/14 text tower: SD-1.x's text encoder and MobileDiffusion's (123,060,480 parameters).
    "clip-vit-l-14": TextEncoderConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, hidden_act="quick_gelu"),
    # OpenCLIP ViT-H/14 text tower as SD-2.x / SD-Turbo ship it (24 layers trained, the last one dropped).
    "openclip-vit-h-14-sd2": TextEncoderConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                               num_attention_heads=16, hidden_act="gelu"),
}


def param_schema(cfg):
    """{checkpoint key (without 'text_model.'): shape}, in CLIPTextModel's parameter order."""
    D, inner = cfg.hidden_size, cfg.intermediate_size
    schema = {"embeddings.token_embedding.weight": (cfg.vocab_size, D),
              "embeddings.position_embedding.weight": (cfg.max_position_embeddings, D)}
    for i in range(cfg.num_hidden_layers):
        layer = f"encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            schema[f"{layer}.self_attn.{proj}.weight"] = (D, D)
            schema[f"{layer}.self_attn.{proj}.bias"] = (D,)
        schema.update({f"{layer}.layer_norm1.weight": (D,), f"{layer}.layer_norm1.bias": (D,),
                       f"{layer}.mlp.fc1.weight": (inner, D), f"{layer}.mlp.fc1.bias": (inner,),
                       f"{layer}.mlp.fc2.weight": (D, inner), f"{layer}.mlp.fc2.bias": (D,),
                       f"{layer}.layer_norm2.weight": (D,), f"{layer}.layer_norm2.bias": (D,)})
    schema.update({"final_layer_norm.weight": (D,), "final_layer_norm.bias": (D,)})
    return schema


# ---- layers ------------------------------------------------------------------------------------------------------
def embeddings(p, ids):
    """CLIPTextEmbeddings: token embedding + learned absolute position embedding.  ids [B, T] -> [B, T, D]."""
    T = ids.shape[1]
    return p["token_embedding"]["weight"][ids] + p["position_embedding"]["weight"][:T]   # [B, T, D]


def self_attention(p, x, *, heads, mask):
    """CLIPAttention: q/k/v projections, softmax(q k^T / sqrt(head_dim) + mask) v per head, out projection.
    x [B, T, D]; mask additive [T, T]."""
    head_dim = x.shape[-1] // heads
    q, k, v = linear(x, p["q_proj"]), linear(x, p["k_proj"]), linear(x, p["v_proj"])   # [B, T, D] each
    h = attention(q, k, v, heads, mask=mask, scale=head_dim ** -0.5)                    # [B, T, D]
    return linear(h, p["out_proj"])


def mlp(p, x, *, act):
    """CLIPMLP: fc1 -> activation -> fc2.  [B, T, D] -> [B, T, I] -> [B, T, D]."""
    return linear(act(linear(x, p["fc1"])), p["fc2"])


def encoder_layer(p, x, *, heads, eps, mask, act, name):
    """CLIPEncoderLayer: pre-LayerNorm residual blocks, x + attn(LN1 x), then x + mlp(LN2 x).  x [B, T, D]."""
    attn = self_attention(p["self_attn"], layer_norm(x, p["layer_norm1"], eps), heads=heads, mask=mask)
    x = x + record(f"{name}.self_attn", attn)
    return x + record(f"{name}.mlp", mlp(p["mlp"], layer_norm(x, p["layer_norm2"], eps), act=act))


def text_transformer(p, ids, cfg):
    """CLIPTextTransformer forward: embeddings, causal encoder layers, final LayerNorm.
    ids int [B, T] (T <= max_position_embeddings) -> last_hidden_state [B, T, D] in the params' dtype."""
    x = record("text_encoder.embeddings", embeddings(p["embeddings"], ids))               # [B, T, D]
    mask = causal_mask(ids.shape[1], x.dtype)                                            # [T, T]
    act = ACTIVATIONS[cfg.hidden_act]
    for i in range(cfg.num_hidden_layers):
        name = f"text_encoder.encoder.layers.{i}"
        x = encoder_layer(p["encoder"]["layers"][str(i)], x, heads=cfg.num_attention_heads,
                          eps=cfg.layer_norm_eps, mask=mask, act=act, name=name)
        record(name, x)
    return record("text_encoder.final_layer_norm", layer_norm(x, p["final_layer_norm"], cfg.layer_norm_eps))


def pooled_output(ids, hidden, eos_token_id):
    """CLIPTextModel's pooler_output: the hidden state at each row's end-of-text token. [B, T], [B, T, D] -> [B, D].
    eos_token_id 2 (configs saved before transformers PR #24773) means 'the position of the largest id'; otherwise
    the first position holding eos_token_id."""
    where = ids.argmax(axis=-1) if eos_token_id == 2 else (ids == eos_token_id).argmax(axis=-1)   # [B]
    return hidden[np.arange(ids.shape[0]), where]                                                  # [B, D]


# ---- the component ---------------------------------------------------------------------------------------------
class TextEncoder:
    """CLIP text encoder: ``te(ids) -> last_hidden_state [B, T, D]`` (== transformers CLIPTextModel)."""

    def __init__(self, config, params, dtype=np.float32):
        self.config, self.params, self.dtype = config, params, np.dtype(dtype)

    @classmethod
    def from_config(cls, config, seed=0, dtype=np.float32):
        """Seeded random weights (weights.init_params) for a TextEncoderConfig or a config.json dict."""
        config = config if isinstance(config, TextEncoderConfig) else TextEncoderConfig.from_dict(config)
        return cls(config, init_params(param_schema(config), seed, _float_dtype(dtype)), dtype)

    @classmethod
    def from_preset(cls, name, seed=0, dtype=np.float32):
        """A named architecture (PRESETS) with seeded weights, e.g. 'clip-vit-l-14'."""
        if name not in PRESETS:
            raise ConfigError(f"TextEncoder: unknown preset {name!r} (available: {sorted(PRESETS)})")
        return cls.from_config(PRESETS[name], seed=seed, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=np.float32):
        """A transformers CLIPTextModel folder, a pipeline folder holding text_encoder/, or a .safetensors file
        with config.json beside it. Weights may be f16 / bf16 / f32 / f64; they are cast to dtype."""
        config_path, weight_files = _locate(Path(path))
        config = TextEncoderConfig.from_dict(read_json(config_path), where=str(config_path))
        flat = {}
        for f in weight_files:
            flat.update(read_safetensors(f, allow_int={p + k for k in SKIPPED_KEYS for p in ("", KEY_PREFIX)})[0])
        flat = {(k[len(KEY_PREFIX):] if k.startswith(KEY_PREFIX) else k): v for k, v in flat.items()}
        flat = {k: v for k, v in flat.items() if k not in SKIPPED_KEYS}
        schema = param_schema(config)
        check_schema(flat, schema, where=", ".join(str(f) for f in weight_files))
        params = nest({k: flat[k].astype(_float_dtype(dtype)) for k in schema})
        return cls(config, params, dtype)

    def save_pretrained(self, folder, dtype=np.float32):
        """Write config.json + model.safetensors in transformers' CLIPTextModel layout ('text_model.' keys)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_json(), indent=2) + "\n")
        tensors = {KEY_PREFIX + k: np.asarray(v, dtype=dtype) for k, v in flatten(self.params).items()}
        write_safetensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        return folder

    def num_parameters(self):
        return int(sum(np.prod(shape) for shape in param_schema(self.config).values()))

    def __call__(self, ids):
        """ids int [B, T] (T <= max_position_embeddings) -> last hidden state [B, T, hidden_size]."""
        ids = np.asarray(ids)
        cfg = self.config
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"TextEncoder: ids must be an integer array [B, T], got {ids.dtype} {ids.shape}")
        if ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"TextEncoder: {ids.shape[1]} tokens, but max_position_embeddings is "
                             f"{cfg.max_position_embeddings}")
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"TextEncoder: token ids must lie in [0, {cfg.vocab_size}), found "
                             f"[{ids.min()}, {ids.max()}]")
        return text_transformer(self.params, ids, cfg)

    def pooled(self, ids, hidden=None):
        """pooler_output [B, D]: the last hidden state at each row's EOS token (see pooled_output)."""
        hidden = self(ids) if hidden is None else hidden
        return pooled_output(np.asarray(ids), hidden, self.config.eos_token_id)

    def __repr__(self):
        c = self.config
        return (f"TextEncoder(width={c.hidden_size}, layers={c.num_hidden_layers}, heads={c.num_attention_heads}, "
                f"act={c.hidden_act}, params={self.num_parameters():,}, dtype={self.dtype.name})")


def _float_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"TextEncoder: compute dtype must be float32 or float64, got {dtype}")
    return dtype


def _locate(path):
    """-> (config.json path, [safetensors files]) for a file, a CLIPTextModel folder or a pipeline folder."""
    refuse_pickle(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path}: expected a .safetensors file")
        if not (path.parent / "config.json").is_file():
            raise ConfigError(f"{path}: no config.json beside the weights file")
        return path.parent / "config.json", [path]
    if not path.is_dir():
        raise WeightsError(f"{path}: no such file or folder")
    if not (path / "config.json").is_file() and (path / "text_encoder").is_dir():
        path = path / "text_encoder"
    if (path / INDEX_NAME).is_file():
        shards = sorted(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values()))
        return path / "config.json", [path / s for s in shards]
    if (path / WEIGHTS_NAME).is_file():
        return path / "config.json", [path / WEIGHTS_NAME]
    found = sorted(p.name for p in path.iterdir())
    raise WeightsError(f"{path}: no {WEIGHTS_NAME} (found {found}); mdref reads safetensors only "
                       f"(convert a pytorch_model.bin to safetensors first; it is never unpickled)")
