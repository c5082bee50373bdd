"""Qwen's byte-level BPE tokenizer (Qwen2 / Qwen3 / Qwen3-VL), run by the `tokenizers` library, and the text that
DreamLite's pipelines build around a prompt.

It reproduces transformers 5's ``Qwen2Tokenizer``, the class ``AutoTokenizer`` loads for a Qwen3-VL folder: the
vocabulary, merges, added tokens and post-processor come from the folder's ``tokenizer.json``; the normalizer (NFC),
the pre-tokenizer (Qwen's regex split, then byte-level symbols without a prefix space) and the byte-level decoder
are set in code as that class sets them (transformers 5 rebuilds them and ignores the file's; Qwen's own files hold
the same ones). No BOS / EOS is added. Special tokens written in a prompt (``<|im_end|>``) become their ids, as in
transformers (``split_special_tokens`` false).

DreamLite text-to-image (diffusers ``DreamLitePipeline`` / ``DreamLiteMobilePipeline``, ``encode_prompt``):
1. the user text is ``"[Generate]: " + prompt`` (`generate_text`); the base pipeline's negative prompt (default "")
   goes in as it is, without the prefix;
2. it is put into the chat template `GENERATE_TEMPLATE`: a system prompt, the user turn, an open assistant turn;
3. the rows are tokenized, truncated to ``max_sequence_length + 34`` tokens (200 + 34 by default) and padded to
   the longest row with the pad token (``<|endoftext|>``, id 151643 in Qwen's vocabulary) on the tokenizer's
   padding side (right unless tokenizer_config.json says otherwise); the attention mask is 1 on tokens, 0 on pads;
4. after the text model, the first `GENERATE_DROP` = 34 positions of each row are dropped
   (`mdref.qwen_text.prompt_embeddings`): the system prompt and ``<|im_start|>user\\n``. 34 is the pipeline's
   constant; it is the number of pieces Qwen's pre-tokenizer cuts that prefix into (`prefix_pieces`), so it is
   the prefix's token count whenever each piece is one token, as each is in Qwen's vocabulary. The UNet reads
   what remains: the prompt's tokens, then ``<|im_end|>\\n<|im_start|>assistant\\n`` (5 tokens), and their mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from .formats.json_files import read_json
from .tokenizer import TokenizerError, _token_content

__all__ = ["QwenTokenizer", "QWEN_PATTERN", "GENERATE_TEMPLATE", "GENERATE_DROP", "GENERATE_PREFIX",
           "MAX_SEQUENCE_LENGTH", "generate_text"]

# transformers models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX (Split, behavior "isolated").
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
                r"""|\s+(?!\S)|\s+""")
# diffusers pipelines/dreamlite/pipeline_dreamlite.py: prompt_template_encode_generate and its start index.
GENERATE_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                     "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                     "<|im_end|>\n<|im_start|>assistant\n")
GENERATE_DROP = 34
GENERATE_PREFIX = "[Generate]: "
MAX_SEQUENCE_LENGTH = 200        # the pipelines' default max_sequence_length (prompt tokens kept after the drop)
PAD_TOKEN = "<|endoftext|>"      # Qwen2Tokenizer's default pad (and unk / eos) token


def generate_text(prompt):
    """The user text of DreamLite's text-to-image mode: '[Generate]: ' + prompt."""
    return GENERATE_PREFIX + prompt


class QwenTokenizer:
    """Qwen BPE: ``tok(texts, max_length) -> (ids int64 [B, T], attention_mask int64 [B, T])``, padded to the
    longest row. Attributes: ``pad_token``, ``pad_id``, ``padding_side``, ``truncation_side``, ``backend``."""

    def __init__(self, backend, *, pad_token=PAD_TOKEN, padding_side="right", truncation_side="right"):
        self.backend = _qwen_pipeline(backend)
        pad_id = self.backend.token_to_id(pad_token)
        if pad_id is None:
            raise TokenizerError(f"QwenTokenizer: pad_token {pad_token!r} is not in the vocabulary")
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("right", "left"):
                raise TokenizerError(f"QwenTokenizer: {name} must be 'right' or 'left', found {side!r}")
        self.pad_token, self.pad_id = pad_token, pad_id
        self.padding_side, self.truncation_side = padding_side, truncation_side

    @classmethod
    def from_pretrained(cls, path):
        """A tokenizer folder holding tokenizer.json (and tokenizer_config.json: pad_token, padding_side,
        truncation_side), or a pipeline folder holding tokenizer/."""
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file() and (folder / "tokenizer" / "tokenizer.json").is_file():
            folder = folder / "tokenizer"
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{folder}: no tokenizer.json (mdref reads Qwen's tokenizer from it)")
        model = read_json(file, TokenizerError).get("model")
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise TokenizerError(f"{file}: model must be an object of type 'BPE', found "
                                 f"{model.get('type') if isinstance(model, dict) else model!r}")
        try:
            backend = _Backend.from_file(str(file))
        except Exception as e:                          # the Rust parser's errors are plain Exceptions
            raise TokenizerError(f"{file}: the tokenizers library cannot read it ({e})") from None
        config = read_json(folder / "tokenizer_config.json", TokenizerError) \
            if (folder / "tokenizer_config.json").is_file() else {}
        where = folder / "tokenizer_config.json"
        pad = config.get("pad_token")
        return cls(backend, pad_token=PAD_TOKEN if pad is None else _token_content(pad, "pad_token", where),
                   padding_side=config.get("padding_side", "right"),
                   truncation_side=config.get("truncation_side", "right"))

    def encode(self, text):
        """str -> token ids (the file's post-processor applied; Qwen's adds nothing), no truncation."""
        if not isinstance(text, str):
            raise TypeError(f"QwenTokenizer: a text must be a str, got {type(text).__name__}")
        return self.backend.encode(text).ids

    def __call__(self, texts, max_length=None):
        """str or list of str -> (ids, attention_mask), int64 [B, T]: each row truncated to max_length tokens on
        the truncation side, then all padded to the longest row with pad_id on the padding side."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [self.encode(t) for t in texts]
        if max_length is not None:
            rows = [r[:max_length] if self.truncation_side == "right" else r[max(0, len(r) - max_length):]
                    for r in rows]
        T = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), T), self.pad_id, np.int64)                   # [B, T]
        mask = np.zeros((len(rows), T), np.int64)                               # [B, T]
        for b, r in enumerate(rows):
            where = slice(0, len(r)) if self.padding_side == "right" else slice(T - len(r), T)
            ids[b, where], mask[b, where] = r, 1
        return ids, mask

    def generate(self, user_texts, max_sequence_length=MAX_SEQUENCE_LENGTH):
        """DreamLite's encode_prompt(mode="generate") tokenization: each user text (`generate_text(prompt)`, or a
        negative prompt as it is) in GENERATE_TEMPLATE, truncated to max_sequence_length + GENERATE_DROP tokens,
        padded -> (ids, attention_mask) int64 [B, T] for the text model."""
        user_texts = [user_texts] if isinstance(user_texts, str) else list(user_texts)
        return self([GENERATE_TEMPLATE.format(t) for t in user_texts], max_length=max_sequence_length + GENERATE_DROP)

    def prefix_pieces(self, template=GENERATE_TEMPLATE):
        """How many pieces the pre-tokenizer cuts the template's text before '{}' into (special tokens count one):
        a lower bound of its token count for any vocabulary, reached when every piece is a token."""
        prefix = template.split("{}")[0]
        return sum(1 if e.special else len(self.backend.pre_tokenizer.pre_tokenize_str(
            self.backend.normalizer.normalize_str(e.text))) for e in _split_special(self.backend, prefix))

    def decode(self, ids):
        return self.backend.decode([int(i) for i in ids if int(i) != self.pad_id], skip_special_tokens=False)

    def __repr__(self):
        return (f"QwenTokenizer(vocab={self.backend.get_vocab_size()}, pad_id={self.pad_id}, "
                f"padding_side={self.padding_side!r})")


def _qwen_pipeline(backend):
    """transformers 5 Qwen2Tokenizer's pipeline set on a backend read from tokenizer.json."""
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


class _Piece:
    def __init__(self, text, special):
        self.text, self.special = text, special


def _split_special(backend, text):
    """The text cut at the added special tokens (longest first), as the tokenizer matches them."""
    specials = sorted((t.content for t in backend.get_added_tokens_decoder().values() if t.special), key=len,
                      reverse=True)
    pieces, rest = [], text
    while rest:
        hits = [(rest.find(s), s) for s in specials if s in rest]
        if not hits:
            pieces.append(_Piece(rest, False))
            break
        at, s = min(hits, key=lambda h: (h[0], -len(h[1])))
        if at:
            pieces.append(_Piece(rest[:at], False))
        pieces.append(_Piece(s, True))
        rest = rest[at + len(s):]
    return pieces
