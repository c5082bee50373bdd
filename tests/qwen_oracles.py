"""Oracles for the Qwen3-VL text path and DreamLite's text side, built offline inside the tests (not a test module).

- `qwen_tokenizer_folder(path)`: a Qwen-style tokenizer folder. The vocabulary is a byte-level BPE trained here with
  the `tokenizers` trainer (Qwen's normalizer and pre-tokenizer) on the DreamLite system prompt and a few prompts,
  then filled with unreachable filler entries up to Qwen's 151,643 regular tokens, so the added special tokens get
  Qwen's ids (``<|endoftext|>`` = 151643, ``<|im_start|>`` = 151644, ``<|im_end|>`` = 151645, ...). tokenizer.json
  and tokenizer_config.json are written as Qwen's folders hold them (tokenizer_class Qwen2Tokenizer).
- `qwen_vl_model(config)`: a random Qwen3VLForConditionalGeneration (tiny vision tower), every parameter random.
- `float64_exact(monkeypatch)`: the two places where transformers' Qwen3-VL computes in float32 whatever the dtype,
  changed for a float64 oracle: Qwen3VLTextRMSNorm (casts its input to float32 and back) and the rotary embedding
  (cos / sin of the float32 angles in float32); the patched forms take the mean square in the input dtype and
  evaluate cos / sin of the same float32 angles in float64, with mdref's float32 inv_freq table (torch's float32
  pow is not correctly rounded: it differs from the correctly rounded table in one last bit on some entries).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from mdref import qwen_text
from mdref.qwen_tokenizer import GENERATE_TEMPLATE, QWEN_PATTERN

QWEN_REGULAR_TOKENS = 151643
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
PROMPTS = ["a photo of a cat", "An astronaut riding a horse on the moon, highly detailed, 8k",
           "Hello!!! It's 2024 -- café 日本 😀", "line one\nline two\n\n  indented\ttab", "",
           "a red <|im_end|> square", " ".join(["lorem ipsum dolor sit amet"] * 60)]


def qwen_tokenizer_folder(folder, padding_side=None):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [GENERATE_TEMPLATE.format("[Generate]: " + p) for p in PROMPTS] * 30
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = json.loads(tok.to_str())
    vocab = d["model"]["vocab"]
    for i in range(len(vocab), QWEN_REGULAR_TOKENS):              # unreachable fillers: no merge produces them
        vocab[f"<filler{i}>"] = i
    d["added_tokens"] = [dict(id=QWEN_REGULAR_TOKENS + i, content=s, single_word=False, lstrip=False, rstrip=False,
                              normalized=False, special=True) for i, s in enumerate(SPECIALS)]
    d["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    (folder / "tokenizer.json").write_text(json.dumps(d, ensure_ascii=False))
    config = {"tokenizer_class": "Qwen2Tokenizer", "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
              "bos_token": None, "unk_token": None, "model_max_length": 262144, "errors": "replace",
              "add_prefix_space": False, "split_special_tokens": False, "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": {str(QWEN_REGULAR_TOKENS + i): dict(content=s, lstrip=False, normalized=False,
                                                                          rstrip=False, single_word=False,
                                                                          special=True)
                                       for i, s in enumerate(SPECIALS)}}
    if padding_side:
        config["padding_side"] = padding_side
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


TEXT_CONFIG = dict(vocab_size=151936, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
                   rope_parameters=dict(rope_type="default", rope_theta=5000000.0, mrope_section=[4, 4, 4],
                                        mrope_interleaved=True))
VISION_CONFIG = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                     deepstack_visual_indexes=[0])


def randomize(model, seed):
    """Every parameter random: matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm scales ~ 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "embed_tokens" in name:
                p.copy_(noise)
            elif p.ndim >= 2:
                p.copy_(noise / np.prod(p.shape[1:]) ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def qwen_vl_model(text_config=TEXT_CONFIG, seed=0):
    import transformers
    cfg = transformers.Qwen3VLConfig(text_config=dict(text_config), vision_config=VISION_CONFIG)
    return randomize(transformers.Qwen3VLForConditionalGeneration(cfg), seed)


def float64_exact(monkeypatch):
    from transformers.models.qwen3_vl import modeling_qwen3_vl as Q

    def rms_forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rope_forward(self, x, position_ids):
        dim = self.inv_freq.shape[0] * 2
        theta = self.config.rope_parameters["rope_theta"]
        inv_freq = torch.from_numpy(qwen_text.rope_angles(np.ones(1), dim, theta)[0])        # mdref's float32 table
        freqs = position_ids.expand(3, -1, -1)[..., None].float() * inv_freq                    # float32 angles
        cos = self.recomposition_frequencies(freqs.double().cos() * self.attention_scaling)
        sin = self.recomposition_frequencies(freqs.double().sin() * self.attention_scaling)
        return cos.to(x.dtype), sin.to(x.dtype)

    monkeypatch.setattr(Q.Qwen3VLTextRMSNorm, "forward", rms_forward)
    monkeypatch.setattr(Q.Qwen3VLTextRotaryEmbedding, "forward", rope_forward)


def rel_err(ours, ref):
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())
