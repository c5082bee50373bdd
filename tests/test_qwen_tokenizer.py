"""mdref.qwen_tokenizer against transformers' Qwen2Tokenizer (what AutoTokenizer loads for a Qwen3-VL folder), both
reading the same tokenizer.json built in the test (tests/qwen_oracles.qwen_tokenizer_folder: a trained byte-level
BPE with Qwen's pre-tokenizer, special tokens at Qwen's ids). Token ids and attention masks must be identical;
DreamLite's chat text is compared with what the installed pipelines build."""

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from qwen_oracles import PROMPTS, QWEN_REGULAR_TOKENS, qwen_tokenizer_folder  # noqa: E402

from mdref.qwen_tokenizer import (GENERATE_DROP, GENERATE_TEMPLATE, MAX_SEQUENCE_LENGTH, QwenTokenizer,  # noqa: E402
                                  generate_text)
from mdref.tokenizer import TokenizerError  # noqa: E402

TEXTS = PROMPTS + ["<|im_start|>system\nhi<|im_end|>", "  leading and trailing  ", "naïve Ångström ﬁ", "x" * 300,
                   "'s 'T 'RE", "1234567", "\r\n\r\n", "<|vision_start|><|image_pad|><|vision_end|>"]


@pytest.fixture(scope="module", params=["right", "left"])
def folders(tmp_path_factory, request):
    folder = qwen_tokenizer_folder(tmp_path_factory.mktemp("qwentok") / "tokenizer", padding_side=request.param)
    return folder, transformers.AutoTokenizer.from_pretrained(folder)


def test_ids_match_transformers(folders):
    folder, theirs = folders
    ours = QwenTokenizer.from_pretrained(folder)
    assert type(theirs).__name__ == "Qwen2Tokenizer"
    assert ours.pad_id == theirs.pad_token_id == QWEN_REGULAR_TOKENS == 151643
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    assert ours.encode("a <|im_end|> b")[2] == 151645 and ours.decode(ours.encode(TEXTS[2])) == TEXTS[2]


def test_dreamlite_generate_batch_matches_the_pipelines_tokenizer_call(folders):
    """The base pipeline's batch [negative '', '[Generate]: ' + prompt] and the mobile pipeline's single row,
    tokenized as encode_prompt does (max_length = max_sequence_length + 34, padding=True, truncation=True),
    on both padding sides; a prompt longer than 200 tokens is cut, template tail included."""
    folder, theirs = folders
    ours = QwenTokenizer.from_pretrained(folder)
    assert ours.padding_side == theirs.padding_side
    for user_texts in (["", generate_text(PROMPTS[1])], [generate_text(PROMPTS[-1])], [generate_text("")],
                       ["", generate_text(PROMPTS[3]), generate_text(PROMPTS[-1])]):
        ref = theirs(text=[GENERATE_TEMPLATE.format(t) for t in user_texts],
                     max_length=MAX_SEQUENCE_LENGTH + GENERATE_DROP, padding=True, truncation=True, return_tensors="np")
        ids, mask = ours.generate(user_texts)
        assert np.array_equal(ids, ref["input_ids"]) and np.array_equal(mask, ref["attention_mask"])
    ids, mask = ours.generate([generate_text(PROMPTS[-1])])
    assert ids.shape == (1, MAX_SEQUENCE_LENGTH + GENERATE_DROP) and mask.all()


def test_template_and_constants_are_the_pipelines():
    """The template, the dropped count and the max_sequence_length default as both installed pipelines hold them;
    the '[Generate]: ' prefix as their __call__ writes it."""
    import inspect

    from diffusers.pipelines.dreamlite import pipeline_dreamlite, pipeline_dreamlite_mobile
    for module, cls in ((pipeline_dreamlite, "DreamLitePipeline"), (pipeline_dreamlite_mobile,
                                                                     "DreamLiteMobilePipeline")):
        pipe = getattr(module, cls)
        empty = pipe(text_encoder=None, tokenizer=None, processor=None, vae=None, unet=None, scheduler=None)
        assert empty.prompt_template_encode_generate == GENERATE_TEMPLATE
        assert empty.prompt_template_encode_generate_start_idx == GENERATE_DROP
        assert 'f"[Generate]: {prompt}"' in inspect.getsource(pipe.__call__)
        assert inspect.signature(pipe.__call__).parameters["max_sequence_length"].default == MAX_SEQUENCE_LENGTH


def test_the_34_dropped_tokens_are_the_system_prompt(folders):
    """Qwen's pre-tokenizer cuts the template's text before the user turn ('<|im_start|>system\\n...background:
    <|im_end|>\\n<|im_start|>user\\n') into exactly 34 pieces (vocabulary-independent: 26 words and marks of the
    system prompt, 3 special tokens, 'system', 'user' and 3 newlines), so with any vocabulary in which each of
    these common pieces is one token (Qwen's, and the trained test vocabulary) the pipeline's 34 drops exactly the
    system prompt and '<|im_start|>user\\n', and the prompt's first token stays first."""
    folder, _ = folders
    tok = QwenTokenizer.from_pretrained(folder)
    assert tok.prefix_pieces() == GENERATE_DROP
    prefix = GENERATE_TEMPLATE.split("{}")[0]
    assert len(tok.encode(prefix)) == GENERATE_DROP
    for p in ("", "a photo of a cat"):
        full = tok.encode(GENERATE_TEMPLATE.format(generate_text(p)))
        assert full[:GENERATE_DROP] == tok.encode(prefix)
        assert tok.decode(full[GENERATE_DROP:]) == f"[Generate]: {p}<|im_end|>\n<|im_start|>assistant\n"


def test_folder_errors_name_the_problem(tmp_path, folders):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        QwenTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "WordPiece"}}')
    with pytest.raises(TokenizerError, match="BPE"):
        QwenTokenizer.from_pretrained(tmp_path)
    folder, _ = folders
    pipeline = tmp_path / "pipe"
    (pipeline / "tokenizer").mkdir(parents=True)
    for f in folder.iterdir():
        (pipeline / "tokenizer" / f.name).write_bytes(f.read_bytes())
    assert QwenTokenizer.from_pretrained(pipeline).encode("a cat") == QwenTokenizer.from_pretrained(folder).encode(
        "a cat")
