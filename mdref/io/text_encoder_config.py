"""transformers ``CLIPTextConfig`` config.json -> `TextEncoderConfig` (key policy, checks) -> `TextEncoderSpec`.

`TextEncoderWithProjectionConfig` is the same config read for ``CLIPTextModelWithProjection`` (SDXL's
``text_encoder_2/``): its ``projection_dim`` sets the width of ``text_projection`` (ignored for a plain CLIPTextModel).

Checkpoints: a transformers ``CLIPTextModel`` folder (``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``), a diffusers pipeline folder's ``text_encoder/``, or one ``.safetensors`` file
with a ``config.json`` beside it. Keys are read with or without the ``text_model.`` prefix (transformers 4 writes
it, transformers 5 does not); see `keymaps.text_encoder_keys` for the two keys that are recognised and skipped.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass

from ..specs import TextEncoderSpec
from .config import (MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, ConfigError, check_choice, check_float,
                     check_int, from_dict, to_dict)

__all__ = ["TextEncoderConfig", "TextEncoderWithProjectionConfig", "text_encoder_spec", "HIDDEN_ACT",
           "IGNORED_KEYS"]

# transformers' hidden_act names (transformers.activations.ACT2FN) -> the function mdref.text_encoder uses.
HIDDEN_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
              "gelu_pytorch_tanh": "gelu_tanh"}

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

    where: InitVar[str | None] = None  # the config file, for error messages (not a config key)

    def __post_init__(self, where):
        """Types and ranges (mdref.io.config's checkers); pad / bos ids are not read by the forward pass and may be
        null, the eos id picks the pooled token."""
        where = where or type(self).__name__
        for key, most in (("vocab_size", MAX_VOCAB), ("hidden_size", MAX_WIDTH), ("intermediate_size", MAX_WIDTH),
                          ("num_hidden_layers", MAX_LAYERS), ("num_attention_heads", MAX_WIDTH),
                          ("max_position_embeddings", MAX_POSITIONS)):
            check_int(where, key, getattr(self, key), 1, most)
        check_choice(where, "hidden_act", self.hidden_act, list(HIDDEN_ACT))
        self.layer_norm_eps = check_float(where, "layer_norm_eps", self.layer_norm_eps, 0)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            check_int(where, key, getattr(self, key), 0, self.vocab_size - 1, none=key != "eos_token_id")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{where}: hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d, where="TextEncoderConfig"):
        """From a transformers CLIPTextConfig config.json dict; unknown keys raise ConfigError naming them."""
        if isinstance(d, dict) and d.get("model_type", "clip_text_model") != "clip_text_model":
            raise ConfigError(f"{where}: model_type {d['model_type']!r}, expected 'clip_text_model' "
                              f"(for a full CLIPModel, point at its text encoder)")
        return from_dict(cls, d, ignore=IGNORED_KEYS, where=where)

    def to_dict(self):
        """config.json content that transformers' CLIPTextModel.from_pretrained reads."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **to_dict(self)}


@dataclass
class TextEncoderWithProjectionConfig(TextEncoderConfig):
    """transformers CLIPTextConfig as CLIPTextModelWithProjection reads it: projection_dim is the width P of
    text_projection (CLIPTextConfig's default 512; SDXL's OpenCLIP-bigG: 1280)."""
    projection_dim: int = 512

    def __post_init__(self, where):
        super().__post_init__(where)
        check_int(where or type(self).__name__, "projection_dim", self.projection_dim, 1)

    def to_dict(self):
        return {**super().to_dict(), "architectures": ["CLIPTextModelWithProjection"]}


def text_encoder_spec(cfg):
    """The frozen TextEncoderSpec of a validated TextEncoderConfig."""
    return TextEncoderSpec(layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
                           activation=HIDDEN_ACT[cfg.hidden_act], eps=cfg.layer_norm_eps,
                           max_positions=cfg.max_position_embeddings)
