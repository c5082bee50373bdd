"""transformers ``Qwen3VLTextConfig`` (or a whole ``Qwen3VLConfig``) config.json -> `QwenTextConfig` -> `QwenTextSpec`.

Checkpoints: a DreamLite pipeline folder's ``text_encoder/`` (``Qwen3VLForConditionalGeneration``: config.json
with ``model_type`` "qwen3_vl", its ``text_config`` read here, ``vision_config`` skipped; weights under
``model.language_model.``), a ``Qwen3VLTextModel`` folder (``model_type`` "qwen3_vl_text", keys without prefix),
or one ``.safetensors`` file with a config.json beside it. `mdref.io.keymaps.qwen_text_keys` strips the prefix and
skips the vision tower (``model.visual.``) and the LM head (``lm_head.``), neither of which the text path reads.

The keys, each with what mdref does with it:
- implemented: vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
  num_key_value_heads (null: = num_attention_heads, as transformers), head_dim, rms_norm_eps, attention_bias,
  max_position_embeddings (longer inputs are refused), the rope theta (``rope_parameters.rope_theta``, or
  transformers 4's top-level ``rope_theta``).
- default-only: hidden_act "silu"; rope_type "default" (``rope_parameters`` / transformers 4's ``rope_scaling``);
  another value would change the arithmetic and is refused by name.
- read and checked, without effect on text-only input: ``mrope_section`` and ``mrope_interleaved`` (the three
  M-RoPE position components are equal for text, so every section picks the same frequencies).
- ignored: the vision tower's config and token ids (DreamLite's edit mode, not this path), the LM head's tying,
  generation and bookkeeping keys, dropout (inference), initializer_range, use_cache, dtype; see `IGNORED_KEYS`.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

from ..specs import QwenTextSpec
from .config import (MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, ConfigError, check_bool, check_choice, check_float,
                     check_int, check_list, from_dict, to_dict)

__all__ = ["QwenTextConfig", "qwen_text_spec", "IGNORED_KEYS"]

IGNORED_KEYS = (
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "name_or_path",
    "attention_dropout", "initializer_range", "use_cache", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "output_hidden_states", "output_attentions", "return_dict", "use_sliding_window",
    "sliding_window", "max_window_layers", "layer_types", "tie_last_hidden_states",
)
# Qwen3VLConfig keys around text_config: the vision tower and its token ids (edit mode), the LM head's tying.
VL_IGNORED_KEYS = ("vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
                   "vision_end_token_id", "tie_word_embeddings", "architectures", "model_type", "transformers_version",
                   "dtype", "torch_dtype")
ROPE_KEYS = ("rope_type", "rope_theta", "mrope_section", "mrope_interleaved")


@dataclass
class QwenTextConfig:
    """transformers Qwen3VLTextConfig, the fields that shape the text path (defaults: Qwen3VLTextConfig's)."""
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 500000.0})

    where: InitVar[str | None] = None  # the config file, for error messages (not a config key)

    def __post_init__(self, where):
        where = where or type(self).__name__
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for key, most in (("vocab_size", MAX_VOCAB), ("hidden_size", MAX_WIDTH), ("intermediate_size", MAX_WIDTH),
                          ("num_hidden_layers", MAX_LAYERS), ("num_attention_heads", MAX_WIDTH),
                          ("num_key_value_heads", MAX_WIDTH), ("head_dim", MAX_WIDTH),
                          ("max_position_embeddings", 1 << 20)):        # Qwen3-VL's 262,144 positions
            check_int(where, key, getattr(self, key), 1, most)
        check_choice(where, "hidden_act", self.hidden_act, ["silu"])
        self.rms_norm_eps = check_float(where, "rms_norm_eps", self.rms_norm_eps, 0)
        check_bool(where, "attention_bias", self.attention_bias)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{where}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{where}: head_dim must be even (RoPE rotates pairs), found {self.head_dim}")
        rope = self.rope_parameters
        if not isinstance(rope, dict):
            raise ConfigError(f"{where}: rope_parameters must be an object, found {rope!r}")
        self.rope_parameters = rope = dict(rope)
        unknown = sorted(set(rope) - set(ROPE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unsupported rope_parameters keys {unknown}")
        check_choice(where, "rope_parameters.rope_type", rope.get("rope_type", "default"), ["default"])
        rope["rope_theta"] = check_float(where, "rope_parameters.rope_theta", rope.get("rope_theta"), 0)
        if "mrope_section" in rope:
            check_list(where, "rope_parameters.mrope_section", rope["mrope_section"],
                       lambda w, k, v: check_int(w, k, v, 0), length=3)
        if "mrope_interleaved" in rope:
            check_bool(where, "rope_parameters.mrope_interleaved", rope["mrope_interleaved"])

    @classmethod
    def from_dict(cls, d, where="QwenTextConfig"):
        """From a Qwen3VLTextConfig dict, or a Qwen3VLConfig dict (its text_config); transformers 4's top-level
        ``rope_theta`` + ``rope_scaling`` become ``rope_parameters``. Unknown keys raise ConfigError naming them."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a config object, found {type(d).__name__}")
        model_type = d.get("model_type", "qwen3_vl_text")
        if model_type == "qwen3_vl":
            unknown = sorted(k for k in d if k != "text_config" and k not in VL_IGNORED_KEYS and not k.startswith("_"))
            if unknown:
                raise ConfigError(f"{where}: unsupported config keys {unknown}")
            d, where = d.get("text_config") or {}, f"{where} (text_config)"
            if not isinstance(d, dict):
                raise ConfigError(f"{where}: expected an object")
            model_type = d.get("model_type", "qwen3_vl_text")
        if model_type != "qwen3_vl_text":
            raise ConfigError(f"{where}: model_type {model_type!r}, expected 'qwen3_vl' or 'qwen3_vl_text'")
        d = dict(d)
        if "rope_theta" in d or "rope_scaling" in d:                        # transformers 4.x spelling
            if "rope_parameters" in d:
                raise ConfigError(f"{where}: both rope_parameters and transformers 4's rope_theta / rope_scaling")
            legacy = dict(d.pop("rope_scaling", None) or {})
            legacy.setdefault("rope_type", legacy.pop("type", "default"))
            d["rope_parameters"] = {**legacy, "rope_theta": d.pop("rope_theta", 10000.0)}
        return from_dict(cls, d, ignore=IGNORED_KEYS, where=where)

    def to_dict(self):
        """config.json that transformers' Qwen3VLTextModel.from_pretrained reads."""
        return {"architectures": ["Qwen3VLTextModel"], "model_type": "qwen3_vl_text", **to_dict(self)}


def qwen_text_spec(cfg):
    """The frozen QwenTextSpec of a validated QwenTextConfig."""
    return QwenTextSpec(layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                        head_dim=cfg.head_dim, eps=cfg.rms_norm_eps, rope_theta=cfg.rope_parameters["rope_theta"],
                        max_positions=cfg.max_position_embeddings)
