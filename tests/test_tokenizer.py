"""mdref.Tokenizer against two oracles built from the same vocabulary files:

* transformers' CLIPTokenizer (tokenizers-backed; in transformers 5 the slow Python class is gone and
  CLIPTokenizerFast is the same class) -- ids must be identical, for both pad conventions;
* a pure-Python port of OpenAI's clip/simple_tokenizer.py (below), which runs its own BPE loop, so the merge
  ranks and the vocabulary order are checked by code that shares nothing with the `tokenizers` library.

Token ids are integers: every comparison is exact.
"""

import hashlib
import html
import json
import sys
import types
import unicodedata
import warnings

import numpy as np
import pytest

from mdref.tokenizer import BOS, EOS, SHIPPED_DIR, Tokenizer, TokenizerError, read_merges

MAX = 77

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "an astronaut riding a horse on the moon, highly detailed, 8k, trending on artstation",
    "",
    " ",
    "\t\n  \r\n",
    "hello!!! world??? ...",
    "wow!?!?!?!?!?!?!?!?",
    "---===+++***",
    "(masterpiece:1.2), [bad hands], {best quality}",
    "it's, i'm, you're, we've, they'll, he'd, don't",
    "IT'S I'M YOU'RE WE'VE THEY'LL HE'D",
    "rock 'n' roll 'quoted' \"double\"",
    "1234567890 3.14159 1,000,000 2024-01-01",
    "room 101 and 7 dwarfs",
    "MiXeD CaSe WoRdS",
    "café naïve façade résumé crème brûlée",
    "cafe\u0301 (decomposed e + combining acute)",
    "Ångström Ærø ØRESUND ß straße",
    "Привет мир, ЗДРАВСТВУЙ",
    "Γειά σου Κόσμε",
    "日本語のテキスト、東京タワー",
    "中文提示词：一只猫在月球上",
    "한국어 문장입니다",
    "مرحبا بالعالم",
    "שלום עולם",
    "हिन्दी पाठ",
    "😀👍🏽 ok 🐱‍👤 👨‍👩‍👧",
    "emoji🎉inside🎉words",
    "tabs\tbetween\twords",
    "line one\nline two\n\nline four",
    "trailing spaces   ",
    "   leading spaces",
    "multiple     inner      spaces",
    "non\u00a0breaking\u2003em\u3000ideographic spaces",
    "a_b_c snake_case camelCaseWord",
    "email@example.com https://example.org/path?q=1&x=2",
    "&amp; &lt;3 &quot;html&quot;",
    "<|startoftext|> literal specials <|endoftext|>",
    "<|ENDOFTEXT|> upper-case special",
    "C++ c# f# .net node.js",
    "$100 €50 £30 ¥1000 50%",
    "¿qué? ¡sí! «guillemets» „quotes“",
    "pneumonoultramicroscopicsilicovolcanoconiosis supercalifragilisticexpialidocious",
    "a red circle on a blue square, minimalistic, flat design",
    "ﬁ ligature and ＦＵＬＬＷＩＤＴＨ letters",
    "control\x00chars\x07here",
    "zero\u200bwidth\u200cjoiner\u200d",
]


def _long(n_words):
    """'a a a ...': 'a' is one token, so this prompt is exactly n_words tokens."""
    return " ".join(["a"] * n_words)


LENGTH_PROMPTS = [_long(74), _long(75), _long(76), _long(77), _long(210),
                  " ".join(["photorealistic"] * 40), "lorem ipsum dolor sit amet, " * 30]


# ---- the OpenAI reference, ported (clip/simple_tokenizer.py, MIT, Copyright (c) 2021 OpenAI) ------------------
def _openai_bytes_to_unicode():
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _openai_vocab(merges):
    vocab = list(_openai_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for merge in merges:
        vocab.append("".join(merge))
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    return dict(zip(vocab, range(len(vocab))))


class OpenAISimpleTokenizer:
    """OpenAI's SimpleTokenizer.encode with its own BPE loop; `fix_text` stands in for ftfy.fix_text."""

    def __init__(self, merges, fix_text):
        regex = pytest.importorskip("regex")
        self.byte_encoder = _openai_bytes_to_unicode()
        self.encoder = _openai_vocab(merges)
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                                 r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
        self.regex, self.fix_text = regex, fix_text

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text):
        text = html.unescape(html.unescape(self.fix_text(text))).strip()        # basic_clean
        text = self.regex.sub(r"\s+", " ", text).strip().lower()                # whitespace_clean, lower
        ids = []
        for token in self.regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def __call__(self, text, max_length=MAX, pad_id=49407):
        tokens = self.encode(text)[:max_length - 2]
        row = [49406, *tokens, 49407]
        return row + [pad_id] * (max_length - len(row))


# ---- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merges():
    return read_merges(SHIPPED_DIR / "merges.txt")


def _write_folder(folder, merges, pad_token):
    """A tokenizer/ folder as SD-1 (pad '<|endoftext|>') or SD-2 (pad '!') ship it, built here from the shipped
    merges with OpenAI's vocabulary construction (not with mdref's code)."""
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(_openai_vocab(merges), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                              "model_max_length": MAX, **specials}))
    return folder


@pytest.fixture(scope="module", params=[("sd1", EOS, 49407), ("sd2", "!", 0)], ids=["pad49407", "pad0"])
def folder(request, tmp_path_factory, merges):
    name, pad_token, pad_id = request.param
    return _write_folder(tmp_path_factory.mktemp(name) / "tokenizer", merges, pad_token), pad_id


def _hf(cls_name, folder):
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, cls_name).from_pretrained(folder)


def _hf_ids(hf, prompts, max_length=MAX):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hf(prompts, padding="max_length", max_length=max_length, truncation=True)
    return np.array(out["input_ids"], dtype=np.int64)


def _ids(tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the truncation warning has its own test
        return tok(prompts)


# ---- the shipped vocabulary -------------------------------------------------------------------------------------
def test_shipped_vocabulary_counts(merges):
    """49,408 tokens: 256 byte symbols, the same with '</w>', 48,894 merges, then BOS = 49406 and EOS = 49407."""
    tok = Tokenizer.from_pretrained(None)
    assert len(merges) == 48894
    assert len(tok.vocab) == 49408 and len(tok) == 49408
    assert tok.vocab == _openai_vocab(merges)                 # same ids as OpenAI's construction
    by_id = {i: t for t, i in tok.vocab.items()}
    assert all(len(by_id[i]) == 1 for i in range(256))
    assert all(by_id[i + 256] == by_id[i] + "</w>" for i in range(256))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length) == (49406, 49407, 49407, 77)
    assert by_id[49406] == "<|startoftext|>" and by_id[49407] == "<|endoftext|>"


def test_shipped_files_are_pinned():
    """merges.txt is OpenAI's bpe_simple_vocab_16e6.txt first 48,894 merges (see weights/clip/README.md)."""
    text = (SHIPPED_DIR / "merges.txt").read_bytes()
    assert hashlib.sha256(text).hexdigest() == "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"
    assert "OpenAI" in (SHIPPED_DIR / "LICENSE").read_text() and (SHIPPED_DIR / "README.md").is_file()


def test_known_ids():
    """Ids published with CLIP / transformers docs: 'a photo of a cat', 'a diagram', 'a dog'."""
    tok = Tokenizer.from_pretrained(None)
    assert tok("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert tok(["a diagram", "a dog"])[:, :4].tolist() == [[49406, 320, 22697, 49407], [49406, 320, 1929, 49407]]


# ---- transformers parity -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_matches_transformers(folder, cls_name):
    """Identical ids on every prompt, for the SD-1 (pad 49407) and SD-2 (pad '!' = 0) folders."""
    path, pad_id = folder
    hf = _hf(cls_name, path)
    tok = Tokenizer.from_pretrained(path, fix_text=False)
    assert tok.pad_id == pad_id == hf.pad_token_id
    prompts = PROMPTS + LENGTH_PROMPTS
    ours, ref = _ids(tok, prompts), _hf_ids(hf, prompts)
    assert ours.dtype == np.int64 and ours.shape == (len(prompts), MAX)
    bad = [p[:40] for p, a, b in zip(prompts, ours, ref) if not np.array_equal(a, b)]
    assert not bad, f"ids differ from transformers {cls_name} on {bad}"
    assert len(prompts) >= 40


def test_shipped_equals_sd1_folder(tmp_path, merges):
    """from_pretrained(None) is the same tokenizer as an SD-1 folder."""
    path = _write_folder(tmp_path / "tokenizer", merges, EOS)
    ours = _ids(Tokenizer.from_pretrained(None, fix_text=False), PROMPTS + LENGTH_PROMPTS)
    assert np.array_equal(ours, _ids(Tokenizer.from_pretrained(path, fix_text=False), PROMPTS + LENGTH_PROMPTS))


def test_sd2_pad_token_splits_exclamation_marks(folder):
    """The transformers quirk mdref reproduces (diffusers #4153): with pad '!', each '!' in a prompt is id 0."""
    path, pad_id = folder
    hf = _hf("CLIPTokenizer", path)
    tok = Tokenizer.from_pretrained(path, fix_text=False)
    expected = [49406, 0, 0, 0, 0, 0, 0, 49407] if pad_id == 0 else [49406, 256, 748, 995, 49407, 49407, 49407, 49407]
    assert tok("! !! !!!")[0, :8].tolist() == expected == _hf_ids(hf, ["! !! !!!"])[0, :8].tolist()


def test_special_tokens_map_wins(tmp_path, merges):
    """When tokenizer_config.json and special_tokens_map.json disagree on the pad token, follow transformers."""
    path = _write_folder(tmp_path / "tokenizer", merges, EOS)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "!"}))
    assert Tokenizer.from_pretrained(path).pad_id == _hf("CLIPTokenizer", path).pad_token_id == 49407


def test_max_length_option(folder):
    path, _ = folder
    hf = _hf("CLIPTokenizer", path)
    tok = Tokenizer.from_pretrained(path, max_length=16, fix_text=False)
    assert np.array_equal(_ids(tok, PROMPTS), _hf_ids(hf, PROMPTS, max_length=16))


def test_random_text_matches_transformers(folder):
    """Hypothesis: arbitrary Unicode text (letters, marks, digits, punctuation, spaces, emoji) tokenizes alike."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    path, _ = folder
    hf = _hf("CLIPTokenizer", path)
    tok = Tokenizer.from_pretrained(path, fix_text=False)
    alphabet = st.characters(codec="utf-8", exclude_categories=("Cs",))

    @hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
    @hypothesis.given(st.text(alphabet=alphabet, max_size=40) | st.text(alphabet="aB1 '!.,é日😀\t\n-", max_size=60))
    def check(text):
        assert np.array_equal(_ids(tok, [text]), _hf_ids(hf, [text])), repr(text)

    check()


def test_transformers_v5_folder(tmp_path, folder):
    """A folder written by transformers 5 (tokenizer.json, no vocab.json) loads too."""
    path, _ = folder
    hf = _hf("CLIPTokenizer", path)
    hf.save_pretrained(tmp_path / "v5")
    tok = Tokenizer.from_pretrained(tmp_path / "v5", fix_text=False)
    assert tok.pad_id == hf.pad_token_id
    assert np.array_equal(_ids(tok, PROMPTS), _hf_ids(hf, PROMPTS))


def test_save_pretrained_round_trip(tmp_path, folder):
    """save_pretrained writes what transformers and mdref read back to the same ids."""
    path, pad_id = folder
    tok = Tokenizer.from_pretrained(path, fix_text=False)
    out = tok.save_pretrained(tmp_path / "tokenizer")
    assert {p.name for p in out.iterdir()} == {"vocab.json", "merges.txt", "tokenizer_config.json",
                                              "special_tokens_map.json"}
    hf = _hf("CLIPTokenizer", out)
    again = Tokenizer.from_pretrained(out, fix_text=False)
    assert again.pad_id == pad_id == hf.pad_token_id
    assert np.array_equal(_ids(again, PROMPTS), _ids(tok, PROMPTS))
    assert np.array_equal(_hf_ids(hf, PROMPTS), _ids(tok, PROMPTS))


# ---- OpenAI reference parity -------------------------------------------------------------------------------------
def test_matches_openai_reference(merges):
    """With an ftfy stand-in (NFC, ftfy.fix_text's default normalisation), mdref's clean-up path equals
    OpenAI's encode, html.unescape included. Excluded: the upper-case special-token prompt, where OpenAI's
    cache maps '<|endoftext|>' (after lowercasing) to 49407 but transformers and mdref do not."""
    def fix_text(s):
        return unicodedata.normalize("NFC", s)

    tok = Tokenizer.from_pretrained(None, fix_text=fix_text)
    assert tok.fix_text
    oracle = OpenAISimpleTokenizer(merges, fix_text)
    prompts = [p for p in PROMPTS + LENGTH_PROMPTS if "ENDOFTEXT" not in p]
    ours = _ids(tok, prompts)
    bad = [p[:40] for p, row in zip(prompts, ours) if row.tolist() != oracle(p)]
    assert not bad, f"ids differ from OpenAI's SimpleTokenizer on {bad}"
    assert np.array_equal(tok("&amp;"), tok("&"))
    assert not np.array_equal(Tokenizer.from_pretrained(None, fix_text=False)("&amp;"), tok("&"))


def test_matches_openai_reference_with_real_ftfy(merges):
    """With fix_text=ftfy.fix_text the tokenizer is OpenAI's (checked by hand with ftfy 6.3.1: 57 prompts)."""
    ftfy = pytest.importorskip("ftfy")
    tok = Tokenizer.from_pretrained(None, fix_text=ftfy.fix_text)
    assert tok.fix_text
    oracle = OpenAISimpleTokenizer(merges, ftfy.fix_text)
    prompts = [p for p in PROMPTS + LENGTH_PROMPTS + ["mojibake: cafÃ©", "&amp;amp; “smart quotes”"]
               if "ENDOFTEXT" not in p]
    ours = _ids(tok, prompts)
    assert [p for p, row in zip(prompts, ours) if row.tolist() != oracle(p)] == []


def test_fix_text_is_a_function_never_an_import(monkeypatch):
    stub = types.ModuleType("ftfy")                          # an installed ftfy must not change the default
    stub.fix_text = lambda s: "changed"
    monkeypatch.setitem(sys.modules, "ftfy", stub)
    assert not Tokenizer.from_pretrained(None).fix_text
    with pytest.raises(TokenizerError, match="ftfy"):
        Tokenizer.from_pretrained(None, fix_text=True)


# ---- framing and truncation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, dropped", [(74, 0), (75, 0), (76, 1), (77, 2), (210, 135)])
def test_truncation_keeps_eos_and_warns(n, dropped):
    tok = Tokenizer.from_pretrained(None, fix_text=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tok(_long(n))
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if dropped:
        assert len(messages) == 1 and f"{dropped} were dropped" in messages[0], messages
    else:
        assert not messages
    kept = min(n, 75)
    assert ids.shape == (1, 77)
    assert ids[0, 0] == 49406 and (ids[0, 1:kept + 1] == 320).all() and ids[0, kept + 1] == 49407
    assert (ids[0, kept + 2:] == 49407).all()


def test_batch_shapes_and_padding(folder):
    path, pad_id = folder
    tok = Tokenizer.from_pretrained(path, fix_text=False)
    one = tok("a dog")
    both = tok(["a dog", ""])
    assert one.shape == (1, 77) and both.shape == (2, 77) and both.dtype == np.int64
    assert both[1, :2].tolist() == [49406, 49407] and (both[1, 2:] == pad_id).all()
    assert np.array_equal(one[0], both[0])
    assert tok.decode(one[0]) == "a dog"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(TokenizerError, match="no vocab.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerError, match="merges.txt"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="str"):
        Tokenizer.from_pretrained(None)([1, 2])


def test_text_that_was_not_utf8_is_refused_by_name():
    """A prompt decoded from bytes with surrogateescape (how Python hands a non-UTF-8 argv over) is refused with a
    ValueError naming the position, not a TypeError from the tokenizers library."""
    tok = Tokenizer.from_pretrained(None)
    with pytest.raises(ValueError, match=r"valid UTF-8 text, found '\\udcff' at position 2"):
        tok(["a " + b"\xff".decode("utf-8", "surrogateescape")])
