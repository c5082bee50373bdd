"""CLIP's byte-level BPE tokenizer, run by the `tokenizers` library.

It reproduces transformers' ``CLIPTokenizer`` (the tokenizers-backed one; in transformers 5 it is also
``CLIPTokenizerFast``) and, given ``fix_text=ftfy.fix_text``, OpenAI's ``clip/simple_tokenizer.py``:

1. clean-up    only when a ``fix_text`` function is passed (OpenAI uses ``ftfy.fix_text``; mdref never imports
               ftfy itself): ``fix_text``, then ``html.unescape`` twice and strip, as OpenAI's ``basic_clean``
               does. By default this step is skipped, which is what transformers' CLIPTokenizer does: text
               holding HTML entities (``&amp;``) or mojibake then tokenizes differently from OpenAI's tokenizer
               (``&amp;`` stays 5 characters). The default does not depend on what else is installed.
2. specials    the special tokens (BOS, EOS, UNK, PAD) are cut out of the raw text first, case-sensitively,
               as transformers does (OpenAI matches them after lowercasing). A special token a tokenizer folder
               declares ``normalized`` is matched after step 3 instead, so '<|StartOfText|>' becomes BOS too
               (``normalized_specials``; transformers' rule for reading the flag is in `from_pretrained`).
3. normalise   Unicode NFC, every whitespace run -> one space, lowercase.
4. split       CLIP's regex: the two special tokens, the contractions 's 't 're 've 'm 'll 'd, runs of
               letters, single digits, runs of other non-space characters; whitespace is dropped.
5. BPE         each piece as GPT-2 byte symbols with ``</w>`` on its last symbol, merged by rank.
6. frame       ``[BOS] tokens [EOS] [PAD ...]`` to ``max_length`` (77): longer prompts keep their first
               ``max_length - 2`` tokens and EOS stays last (a warning says how many were dropped).

The vocabulary is the list OpenAI builds in code from the merges file: the 256 byte symbols, the same 256 with
``</w>``, one token per merge (48,894 merges), then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407.
Pad id: SD-1 tokenizers pad with ``<|endoftext|>`` (49407); SD-2 / OpenCLIP-style ones pad with ``!`` (0). Like
transformers, the pad token is also a special token, so with pad ``!`` each ``!`` in a prompt becomes id 0 too.
(transformers 4's slow Python CLIPTokenizer, without ftfy, also differed: BERT's BasicTokenizer put spaces around
CJK characters and removed control characters. mdref follows the tokenizers-backed class, the only one in
transformers 5 and the one diffusers pipelines load.)
"""

from __future__ import annotations

import html
import json
import warnings
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from .formats.resources import weights_dir
from .formats.json_files import ConfigError, read_json

__all__ = ["Tokenizer", "TokenizerError", "SHIPPED_DIR", "bytes_to_unicode", "clip_vocab", "read_merges"]

SHIPPED_DIR = weights_dir() / "clip"   # merges.txt, LICENSE, README.md (mdref/formats/resources.py says where)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# OpenAI clip/simple_tokenizer.py SimpleTokenizer.pat (applied after lowercasing, so IGNORECASE is moot).
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MERGES_HEADER = "#version: 0.2"
CLIP_MAX_LENGTH = 77            # CLIP's context length (the text tower's position embeddings): BOS + 75 + EOS
SPECIAL_TOKENS = {"pad_token": EOS, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS}   # and their defaults
# transformers 5 adds the declared special tokens in this order; a later declaration of the same string sets its
# AddedToken flags (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
DECLARATION_ORDER = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerError(ConfigError):
    """A tokenizer folder or vocabulary that mdref cannot use."""


def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable character table, in OpenAI's order (it fixes the first 256 token ids)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(others))]
    return {b: chr(c) for b, c in zip(printable + others, chars)}


def clip_vocab(merges):
    """OpenAI SimpleTokenizer's vocabulary: bytes, bytes + '</w>', one token per merge, BOS, EOS -> {token: id}."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def read_merges(path, limit=None):
    """A merges.txt (optional '#version' first line, then 'left right' per line) -> list of pairs."""
    try:
        lines = Path(path).read_bytes().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot be read as UTF-8 text ({e})") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for n, line in enumerate(lines[:limit] if limit else lines, start=2):
        if not line:
            continue
        pair = tuple(line.split(" "))
        if len(pair) != 2:
            raise TokenizerError(f"{path}: line {n} is not a merge 'left right': {line!r}")
        merges.append(pair)
    return merges


def _token_content(value, key, where):
    """A special-token entry of tokenizer_config.json / special_tokens_map.json: a string or an AddedToken dict
    (its "content" a string)."""
    content = value.get("content") if isinstance(value, dict) else value
    if not isinstance(content, str):
        raise TokenizerError(f"{where}: {key} must be a string or an object with a string 'content', "
                             f"found {value!r}")
    return content


class Tokenizer:
    """CLIP tokenizer: ``tok(prompts) -> int64 [B, max_length]``.

    Attributes: ``bos_id``, ``eos_id``, ``pad_id``, ``max_length``, ``fix_text`` (whether OpenAI's clean-up
    runs), ``vocab`` ({token: id}) and ``merges`` (list of pairs).

    ``fix_text``: None or False (default) skips the clean-up, as transformers does; a function str -> str
    (``ftfy.fix_text``) turns on OpenAI's ``basic_clean`` with it."""

    def __init__(self, vocab, merges, *, pad_token=EOS, bos_token=BOS, eos_token=EOS, unk_token=EOS,
                 max_length=CLIP_MAX_LENGTH, fix_text=None, normalized_specials=()):
        for name, token in (("pad_token", pad_token), ("bos_token", bos_token), ("eos_token", eos_token),
                            ("unk_token", unk_token)):
            if token not in vocab:
                raise TokenizerError(f"Tokenizer: {name} {token!r} is not in the vocabulary")
        if max_length < 2:
            raise TokenizerError(f"Tokenizer: max_length must be >= 2 (BOS and EOS), got {max_length}")
        self.vocab, self.merges = dict(vocab), [tuple(m) for m in merges]
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_id, self.eos_id, self.pad_id = vocab[bos_token], vocab[eos_token], vocab[pad_token]
        self.max_length = int(max_length)
        if fix_text is True or not (fix_text in (None, False) or callable(fix_text)):
            raise TokenizerError(f"Tokenizer: fix_text must be None, False or a function str -> str such as "
                                 f"ftfy.fix_text (mdref does not import ftfy), got {fix_text!r}")
        self._fix_text = fix_text or None
        self.fix_text = self._fix_text is not None
        specials = (bos_token, eos_token, unk_token, pad_token)
        unknown = sorted(set(normalized_specials) - set(specials))
        if unknown:
            raise TokenizerError(f"Tokenizer: normalized_specials {unknown} are not special tokens "
                                 f"{sorted(set(specials))}")
        self.normalized_specials = frozenset(normalized_specials)   # matched after lowercasing (see module doc)
        self.backend = _clip_backend(self.vocab, self.merges, unk_token, specials=specials,
                                     normalized=self.normalized_specials)

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path=None, *, max_length=None, fix_text=None):
        """None: the shipped OpenAI vocabulary (weights/clip, pad 49407). A folder: a transformers / diffusers
        ``tokenizer/`` folder (vocab.json + merges.txt, or tokenizer.json), or a pipeline folder holding one.
        Each special token comes from special_tokens_map.json, else tokenizer_config.json, else its default (pad
        '<|endoftext|>'). Whether it is matched after normalization (`normalized_specials`) follows transformers 5:
        tokenizer_config.json's added_tokens_decoder, else tokenizer.json's added_tokens, else the last of the bos,
        eos, unk, pad declarations naming that string (an object's "normalized", default false; a string: false)."""
        if path is None:
            merges = read_merges(SHIPPED_DIR / "merges.txt")
            return cls(clip_vocab(merges), merges, max_length=max_length or CLIP_MAX_LENGTH, fix_text=fix_text)
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: not a tokenizer folder")
        if (folder / "tokenizer").is_dir() and not _has_vocab(folder):
            folder = folder / "tokenizer"
        vocab, merges = _read_vocab_and_merges(folder)
        config, where, declared = {}, {}, {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):   # the latter wins, as in transformers 5
            if (folder / name).is_file():
                entries = {k: v for k, v in read_json(folder / name, TokenizerError).items() if v is not None}
                for key in SPECIAL_TOKENS.keys() & entries.keys():
                    declared[key] = (entries[key], folder / name)
                    entries[key] = _token_content(entries[key], key, folder / name)
                config.update(entries)
                where.update(dict.fromkeys(entries, str(folder / name)))
        if max_length is None:
            model_max = config.get("model_max_length", CLIP_MAX_LENGTH)
            if isinstance(model_max, bool) or not isinstance(model_max, (int, float)) or model_max < 2:
                raise TokenizerError(f"{where['model_max_length']}: model_max_length must be a number >= 2, "
                                     f"found {model_max!r}")
            # 1e30 stands for "no limit" in many tokenizer_config.json files: keep CLIP's context length then
            max_length = model_max if isinstance(model_max, int) and model_max <= 4096 else CLIP_MAX_LENGTH
        tokens = {key: config.get(key, default) for key, default in SPECIAL_TOKENS.items()}
        normalized = _normalized_specials(folder, declared, set(tokens.values()))
        return cls(vocab, merges, max_length=max_length, fix_text=fix_text, normalized_specials=normalized, **tokens)

    def save_pretrained(self, folder):
        """Write a transformers-compatible tokenizer folder: vocab.json, merges.txt, tokenizer_config.json,
        special_tokens_map.json (what SD pipeline folders hold)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        merges = "\n".join([MERGES_HEADER] + [" ".join(m) for m in self.merges]) + "\n"
        (folder / "merges.txt").write_text(merges, encoding="utf-8")
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                    "unk_token": self.unk_token}
        specials = {k: (dict(content=t, lstrip=False, normalized=True, rstrip=False, single_word=False)
                        if t in self.normalized_specials else t) for k, t in specials.items()}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length, "do_lower_case": True,
                  "errors": "replace", "add_prefix_space": False, **specials}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
        return folder

    # ---- use ---------------------------------------------------------------------------------------
    def __call__(self, prompts):
        """str or list of str -> int64 [B, max_length]: BOS, tokens, EOS, then pad_id."""
        if isinstance(prompts, str):
            prompts = [prompts]
        keep = self.max_length - 2
        ids = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)    # [B, max_length]
        for b, tokens in enumerate(self.encode_batch(prompts)):
            if len(tokens) > keep:
                warnings.warn(f"Tokenizer: prompt {b} has {len(tokens)} tokens; {len(tokens) - keep} were "
                              f"dropped to fit max_length={self.max_length} (BOS + {keep} + EOS)", stacklevel=2)
                tokens = tokens[:keep]
            ids[b, :len(tokens) + 2] = [self.bos_id, *tokens, self.eos_id]
        return ids

    def encode_batch(self, prompts):
        """list of str -> list of token-id lists, without BOS / EOS and without truncation."""
        texts = [self.clean(p) for p in prompts]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode(self, prompt):
        """str -> token ids, without BOS / EOS and without truncation."""
        return self.encode_batch([prompt])[0]

    def clean(self, text):
        """OpenAI's basic_clean (fix_text, html.unescape twice, strip) when a fix_text function was given."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer: a prompt must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:                              # surrogates: bytes that were not UTF-8
            raise ValueError(f"Tokenizer: a prompt must be valid UTF-8 text, found {text[e.start]!r} at position "
                             f"{e.start}") from None
        if self._fix_text is None:
            return text
        return html.unescape(html.unescape(self._fix_text(text))).strip()

    def decode(self, ids):
        """Token ids -> text; special and pad tokens are skipped, '</w>' becomes a space."""
        skip = {self.bos_id, self.eos_id, self.pad_id}
        text = self.backend.decode([int(i) for i in ids if int(i) not in skip], skip_special_tokens=False)
        return text.replace(END_OF_WORD, " ").strip()

    def __len__(self):
        return len(self.vocab)

    def __repr__(self):
        normalized = f", normalized_specials={sorted(self.normalized_specials)}" if self.normalized_specials else ""
        return (f"Tokenizer(vocab={len(self.vocab)}, merges={len(self.merges)}, max_length={self.max_length}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id}, fix_text={self.fix_text}"
                f"{normalized})")


def _clip_backend(vocab, merges, unk_token, specials, normalized=frozenset()):
    """The tokenizers pipeline of transformers' CLIPTokenizer: NFC, whitespace runs -> ' ', lowercase; the CLIP
    regex split; byte-level symbols; BPE with '</w>' on word ends. The special tokens (BOS, EOS, UNK *and PAD*)
    are matched in the raw text first, as transformers does: with SD-2's pad token '!' every '!' of a prompt
    becomes id 0 ('hello!!!' -> hello, 0, 0, 0), unlike OpenCLIP (diffusers issue #4153). Those in `normalized`
    are matched in the normalized (lowercased) text instead."""
    backend = _Backend(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD,
                           fuse_unk=False, unk_token=unk_token))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),   # keep the matches only
        # bytes -> symbols. Its GPT-2 split (use_regex) changes nothing for CLIP's pieces except a special-token
        # string in another case ('<|ENDOFTEXT|>' -> '<|', 'endoftext', '|>'); kept to match transformers.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=t in normalized)
                                for t in dict.fromkeys(specials)])
    return backend


def _normalized_specials(folder, declared, specials):
    """The special-token strings transformers 5 matches after normalization, for a tokenizer folder (see
    Tokenizer.from_pretrained). declared: {key: (value as the file holds it, file)} for bos/eos/unk/pad."""
    flags = {}                                                        # string -> (entry, file)

    def note(entry, where):
        content = _token_content(entry, "added token", where)
        if content in specials:
            flags[content] = (entry, where)

    for key in DECLARATION_ORDER:                                     # a later declaration of a string wins
        if key in declared:
            note(*declared[key])
    if (folder / "tokenizer.json").is_file():                         # then the backend file's added tokens
        added = read_json(folder / "tokenizer.json", TokenizerError).get("added_tokens") or []
        for entry in added if isinstance(added, list) else ():
            note(entry, folder / "tokenizer.json")
    if (folder / "tokenizer_config.json").is_file():                  # then tokenizer_config's, which win
        decoder = read_json(folder / "tokenizer_config.json", TokenizerError).get("added_tokens_decoder") or {}
        for entry in decoder.values() if isinstance(decoder, dict) else ():
            note(entry, folder / "tokenizer_config.json")
    normalized = set()
    for content, (entry, where) in flags.items():
        entry = entry if isinstance(entry, dict) else {}
        for key in ("lstrip", "rstrip", "single_word"):
            if entry.get(key, False) is not False:
                raise TokenizerError(f"{where}: special token {content!r} sets {key}={entry[key]!r}; mdref "
                                     f"implements CLIP's special tokens without {key} (false)")
        flag = entry.get("normalized", False)
        if not isinstance(flag, bool):
            raise TokenizerError(f"{where}: special token {content!r}: normalized must be true or false, "
                                 f"found {flag!r}")
        if flag:
            normalized.add(content)
    return frozenset(normalized)


def _checked_vocab(vocab, where):
    """A vocabulary {token string: id int >= 0}."""
    if not isinstance(vocab, dict) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                              for i in vocab.values()):
        raise TokenizerError(f"{where}: the vocabulary must be an object {{token: id >= 0}}")
    return vocab


def _has_vocab(folder):
    return (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()


def _read_vocab_and_merges(folder):
    """vocab.json + merges.txt, or else the BPE model inside tokenizer.json."""
    if (folder / "vocab.json").is_file():
        if not (folder / "merges.txt").is_file():
            raise TokenizerError(f"{folder}: has vocab.json but no merges.txt")
        return _checked_vocab(read_json(folder / "vocab.json", TokenizerError), folder / "vocab.json"), \
            read_merges(folder / "merges.txt")
    if (folder / "tokenizer.json").is_file():
        where = folder / "tokenizer.json"
        model = read_json(where, TokenizerError).get("model")
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise TokenizerError(f"{where}: model must be an object of type 'BPE', found "
                                 f"{model.get('type') if isinstance(model, dict) else model!r}")
        merges = model.get("merges")
        if not isinstance(merges, list) or not all(
                (isinstance(m, str) and len(m.split(" ")) == 2)
                or (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)) for m in merges):
            raise TokenizerError(f"{where}: model.merges must be a list of 'left right' strings or [left, right] "
                                 f"pairs")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        return _checked_vocab(model.get("vocab"), where), merges
    raise TokenizerError(f"{folder}: no vocab.json + merges.txt and no tokenizer.json")
