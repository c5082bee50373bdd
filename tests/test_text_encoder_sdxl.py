"""SDXL's two text towers against transformers and diffusers, with random weights built here (offline):

* mdref.TextEncoder (CLIP-L style, quick_gelu) and mdref.TextEncoderWithProjection (OpenCLIP-bigG style, exact gelu,
  text_projection without bias) against transformers' CLIPTextModel / CLIPTextModelWithProjection: every entry of
  ``hidden_states`` (output_hidden_states=True), ``text_embeds`` and ``last_hidden_state``, for both pad conventions
  (tokenizer/ pads with '<|endoftext|>' = 49407, tokenizer_2/ with '!' = 0, so a literal '!' is id 0 too) and both
  pooling rules (eos_token_id 49407: the first EOS; the legacy 2 that SDXL's text_encoder_2 config states: argmax);
* mdref.pipeline.encode_prompts against diffusers' StableDiffusionXLPipeline.encode_prompt: the whole concatenated
  [B, 77, D_1 + D_2] embeddings and the pooled [B, P] output, with and without clip_skip, from SDXL-style tokenizer
  folders built from the bundled CLIP vocabulary.

Tolerances, relative to the oracle's max |x|, always against the oracle run in float64 (so the float32 assertion
does not depend on which float32 kernels torch picks on this machine):
  float32: <= 1e-5. A priori: each output passes L layers of reductions no longer than R = max(D, I, T) terms, each
           adding at most R * u32 (u32 = 6e-8) relative error in the worst case; for the towers below
           (L <= 3, R = 77 or 160) the worst case is L * R * u32 <= 3e-5 and rounding errors of random sign grow as
           sqrt(R) instead, ~2e-6. The 1e-5 bound is the project's float32 contract and sits between the two.
  float64: <= 1e-10 (u64 = 1.1e-16: the same a-priori worst case is 5e-14).
transformers 5 runs CLIP attention through scaled_dot_product_attention (attn_implementation 'sdpa'), which computes
in the input dtype, so the float64 oracles are float64 throughout.
"""

import copy
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mdref  # noqa: E402
from mdref.io import TextEncoder, TextEncoderWithProjection, TextEncoderWithProjectionConfig  # noqa: E402
from mdref.io.presets import TEXT_ENCODER_PRESETS, TEXT_ENCODER_WITH_PROJECTION_PRESETS  # noqa: E402
from mdref.pipeline import InputError, encode_prompts  # noqa: E402
from mdref.tokenizer import BOS, EOS, SHIPPED_DIR, Tokenizer, clip_vocab, read_merges  # noqa: E402
from mdref.trace import trace  # noqa: E402
from oracles import randomize, rel_err, within  # noqa: E402

pytestmark = pytest.mark.numerics          # also run under other BLAS / oneDNN kernels (.ci/run)

TOL = {np.float32: 1e-5, np.float64: 1e-10}

PROMPTS = ["a photo of a cat!", "hello!!! world! !", "", "!", "an astronaut riding a horse on the moon, 8k",
           "<|StartOfText|> and <|ENDOFTEXT|> in capitals", " ".join(["wow!"] * 45)]

# Tiny towers with SDXL's structure: encoder 1 CLIP-L style, encoder 2 OpenCLIP-bigG style with a projection.
CLIP_L = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu")
BIG_G = dict(hidden_size=40, intermediate_size=160, num_hidden_layers=3, num_attention_heads=5, hidden_act="gelu",
             projection_dim=24)


def _added(content, normalized=True):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False}


def _plain(entry):
    """An AddedToken object as special_tokens_map.json / added_tokens_decoder hold it (no "__type")."""
    return {k: v for k, v in entry.items() if k != "__type"}


def write_sdxl_tokenizer(folder, pad_token):
    """A tokenizer folder laid out as SDXL's tokenizer/ (pad '<|endoftext|>') and tokenizer_2/ (pad '!') are:
    vocab.json + merges.txt from the bundled OpenAI merges, BOS / EOS / UNK declared as AddedToken objects with
    normalized true, the pad token as a plain string."""
    merges = read_merges(SHIPPED_DIR / "merges.txt")
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    specials = {"bos_token": _added(BOS), "eos_token": _added(EOS), "unk_token": _added(EOS), "pad_token": pad_token}
    config = {"add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
              "errors": "replace", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    plain = {k: (_plain(v) if isinstance(v, dict) else v) for k, v in specials.items()}
    (folder / "special_tokens_map.json").write_text(json.dumps(plain, indent=2))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An SDXL-style folder holding tokenizer/, tokenizer_2/, text_encoder/, text_encoder_2/ (transformers'
    save_pretrained), plus the torch models and tokenizers."""
    root = tmp_path_factory.mktemp("sdxl-text")
    write_sdxl_tokenizer(root / "tokenizer", EOS)
    write_sdxl_tokenizer(root / "tokenizer_2", "!")
    te1 = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L)), 0)
    te2 = randomize(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        **BIG_G, bos_token_id=0, eos_token_id=2, pad_token_id=1)), 1)          # the legacy ids SDXL ships
    te1.save_pretrained(root / "text_encoder")
    te2.save_pretrained(root / "text_encoder_2")
    tok1 = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
    tok2 = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer_2")
    return root, te1, te2, tok1, tok2


def hf_ids(tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array(tok(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"])


def our_ids(tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # the long prompt is truncated on purpose
        return tok(prompts)


def check(ours, ref, dtype, what):
    ref = ref.numpy() if hasattr(ref, "numpy") else ref
    assert ours.dtype == dtype and ours.shape == ref.shape, (what, ours.dtype, ours.shape, ref.shape)
    return within(f"[sdxl text] {what} {np.dtype(dtype).name}: max |mdref - float64 oracle| / max",
                  rel_err(ours, ref), TOL[dtype])


# ---- tokenizers --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sub,pad_id", [("tokenizer", 49407), ("tokenizer_2", 0)])
def test_sdxl_tokenizers_match_transformers(folders, sub, pad_id):
    """The ids transformers' CLIPTokenizer gives from each SDXL tokenizer folder, '!' and capitalised specials
    included: with tokenizer_2 every '!' is the pad id 0; with both folders '<|StartOfText|>' is matched after
    lowercasing (BOS declared normalized), '<|ENDOFTEXT|>' only by tokenizer_2 (in tokenizer/ the pad string
    '<|endoftext|>' is the last declaration of EOS and sets normalized false)."""
    root, *_ = folders
    hf = transformers.CLIPTokenizer.from_pretrained(root / sub)
    ours = Tokenizer.from_pretrained(root / sub)
    assert ours.pad_id == hf.pad_token_id == pad_id
    np.testing.assert_array_equal(our_ids(ours, PROMPTS), hf_ids(hf, PROMPTS))
    caps = our_ids(ours, ["<|StartOfText|>", "<|ENDOFTEXT|>", "a!"])
    assert caps[0, :3].tolist() == [49406, 49406, 49407]
    assert caps[1, :3].tolist() == ([49406, 49407, 49407] if pad_id == 0 else [49406, 27, 347])
    assert caps[2, :4].tolist() == ([49406, 320, 0, 49407] if pad_id == 0 else [49406, 320, 256, 49407])


def test_tokenizer_flag_rules_match_transformers(tmp_path):
    """Where the 'normalized' flag of a special token comes from, as transformers 5 reads it: a later declaration of
    the same string wins (bos, eos, unk, pad), special_tokens_map.json wins over tokenizer_config.json, and
    added_tokens_decoder / tokenizer.json's added_tokens win over both. Each variant gives transformers' ids."""
    probe = ["<|StartOfText|> x", "<|ENDOFTEXT|>!", "a ! b"]
    base = write_sdxl_tokenizer(tmp_path / "base", "!")
    variants = {
        "unk-false": {"unk_token": _added(EOS, False)},
        "eos-false-unk-true": {"eos_token": _added(EOS, False)},
        "no-flag-key": {k: {kk: vv for kk, vv in _added(t).items() if kk != "normalized"}
                        for k, t in (("bos_token", BOS), ("eos_token", EOS), ("unk_token", EOS))},
        "pad-normalized": {"pad_token": _added("!")},
        "decoder": {"added_tokens_decoder": {"49406": {**_plain(_added(BOS, False)), "special": True},
                                             "49407": {**_plain(_added(EOS, True)), "special": True}}},
    }
    for name, change in variants.items():
        folder = tmp_path / name
        folder.mkdir()
        for f in ("vocab.json", "merges.txt"):
            (folder / f).write_bytes((base / f).read_bytes())
        config = {**json.loads((base / "tokenizer_config.json").read_text()), **change}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        hf = transformers.CLIPTokenizer.from_pretrained(folder)
        np.testing.assert_array_equal(our_ids(Tokenizer.from_pretrained(folder), probe), hf_ids(hf, probe), name)
    v5 = tmp_path / "saved-by-transformers-5"                  # tokenizer.json + tokenizer_config.json only
    transformers.CLIPTokenizer.from_pretrained(base).save_pretrained(v5)
    assert not (v5 / "vocab.json").exists()
    ours = Tokenizer.from_pretrained(v5)
    assert ours.normalized_specials == {BOS, EOS}
    np.testing.assert_array_equal(our_ids(ours, probe + PROMPTS),
                                  hf_ids(transformers.CLIPTokenizer.from_pretrained(v5), probe + PROMPTS))


def test_tokenizer_flags_round_trip_and_refusals(tmp_path, folders):
    root, *_ = folders
    tok = Tokenizer.from_pretrained(root / "tokenizer_2")
    assert tok.normalized_specials == {BOS, EOS} and "normalized_specials" in repr(tok)
    again = Tokenizer.from_pretrained(tok.save_pretrained(tmp_path / "saved"))
    assert again.normalized_specials == tok.normalized_specials and again.pad_id == 0
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path / "saved")
    np.testing.assert_array_equal(our_ids(again, PROMPTS), hf_ids(hf, PROMPTS))
    config = json.loads((root / "tokenizer_2" / "tokenizer_config.json").read_text())
    bad = tmp_path / "lstrip"
    bad.mkdir()
    for f in ("vocab.json", "merges.txt"):
        (bad / f).write_bytes((root / "tokenizer_2" / f).read_bytes())
    (bad / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": {**_added(BOS), "lstrip": True}}))
    with pytest.raises(mdref.ConfigError, match=r"json: special token '<\|startoftext\|>' sets lstrip"):
        Tokenizer.from_pretrained(bad)
    with pytest.raises(mdref.ConfigError, match="not special tokens"):
        Tokenizer(tok.vocab, tok.merges, normalized_specials=["hello"])


# ---- the towers against transformers --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("eos", ["legacy-2", "49407"])
def test_projection_tower_matches_transformers(tmp_path, folders, dtype, eos):
    """CLIPTextModelWithProjection(ids, output_hidden_states=True): every hidden state, last_hidden_state and
    text_embeds, with tokenizer_2's ids (pad 0, '!' = 0) and with tokenizer/'s (pad 49407), for both pooling rules."""
    root, _, te2, tok1, tok2 = folders
    model = te2
    if eos == "49407":                                          # the same weights under the modern pooling rule
        model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**BIG_G))
        model.load_state_dict(te2.state_dict())
        model.eval().save_pretrained(tmp_path / "te2")
    folder = root / "text_encoder_2" if eos == "legacy-2" else tmp_path / "te2"
    ours = TextEncoderWithProjection.from_pretrained(folder, dtype=dtype)
    assert ours.config.eos_token_id == (2 if eos == "legacy-2" else 49407)
    oracle = copy.deepcopy(model).double()
    for tok in (tok2, tok1):
        ids = hf_ids(tok, PROMPTS)
        with torch.no_grad():
            out = oracle(torch.from_numpy(ids), output_hidden_states=True)
        L = ours.spec.layers
        assert len(out.hidden_states) == L + 1
        for k in range(1, L + 2):
            check(ours.hidden_state(ids, -k), out.hidden_states[-k], dtype,
                  f"te2 hidden_states[-{k}] pad {tok.pad_token_id}")
        check(ours(ids), out.last_hidden_state, dtype, "te2 last_hidden_state")
        check(ours.text_embeds(ids), out.text_embeds, dtype, f"te2 text_embeds eos={eos}")
        hidden, pooled = ours.hidden_state_and_text_embeds(ids, -2)
        np.testing.assert_array_equal(hidden, ours.hidden_state(ids, -2))
        np.testing.assert_array_equal(pooled, ours.text_embeds(ids))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_clip_l_tower_hidden_states_match_transformers(folders, dtype):
    root, te1, _, tok1, tok2 = folders
    ours = TextEncoder.from_pretrained(root / "text_encoder", dtype=dtype)
    oracle = copy.deepcopy(te1).double()
    for tok in (tok1, tok2):
        ids = hf_ids(tok, PROMPTS)
        with torch.no_grad():
            out = oracle(torch.from_numpy(ids), output_hidden_states=True)
        for k in range(1, ours.spec.layers + 2):
            check(ours.hidden_state(ids, -k), out.hidden_states[-k], dtype, f"te1 hidden_states[-{k}]")
        check(ours.pooled(ids), out.pooler_output, dtype, "te1 pooler_output")


def test_hidden_state_runs_only_the_layers_it_needs_and_names_its_trace(folders):
    """hidden_states[-2] of a 3-layer tower runs layers 0 and 1 (recorded as text_encoder.encoder.layers.k); the
    projection tower is traced as text_encoder_2.*, its head as text_encoder_2.text_projection."""
    root, *_ = folders
    te1 = TextEncoder.from_pretrained(root / "text_encoder", dtype=np.float64)
    te2 = TextEncoderWithProjection.from_pretrained(root / "text_encoder_2", dtype=np.float64)
    ids = our_ids(Tokenizer.from_pretrained(root / "tokenizer_2"), PROMPTS[:2])
    with trace() as t:
        h1 = te1.hidden_state(ids, -2)
    assert t.names() == ["text_encoder.embeddings"] + [f"text_encoder.encoder.layers.{i}{s}" for i in range(2)
                                                       for s in (".self_attn", ".mlp", "")]
    np.testing.assert_array_equal(t["text_encoder.encoder.layers.1"], h1)
    with trace() as t:
        h2, pooled = te2.hidden_state_and_text_embeds(ids, -2)
    assert t.names()[0] == "text_encoder_2.embeddings" and t.names()[-2:] == [
        "text_encoder_2.final_layer_norm", "text_encoder_2.text_projection"]
    assert "text_encoder_2.encoder.layers.2" in t.names()
    np.testing.assert_array_equal(t["text_encoder_2.encoder.layers.1"], h2)
    np.testing.assert_array_equal(t["text_encoder_2.text_projection"], pooled)
    assert te1.hidden_state(ids, 0).shape == (2, 77, 32)                    # the embeddings
    for bad in (4, -5, 1.0, True):
        with pytest.raises(ValueError, match=r"hidden state index must be an int in \[-4, 3\]"):
            te1.hidden_state(ids, bad)


# ---- the whole SDXL text conditioning against diffusers ---------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl_encode(folders):
    """diffusers' StableDiffusionXLPipeline holding the two towers and tokenizers (no UNet, VAE or scheduler:
    encode_prompt reads none of them)."""
    diffusers = pytest.importorskip("diffusers")
    root, te1, te2, tok1, tok2 = folders
    pipe = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                               tokenizer_2=tok2, unet=None, scheduler=None, add_watermarker=False)
    return pipe


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("clip_skip", [None, 1])
def test_encode_prompts_matches_diffusers(folders, sdxl_encode, dtype, clip_skip):
    """encode_prompt(prompt, negative_prompt=...) with CFG: prompt_embeds [B, 77, 32 + 40] (hidden_states[-2] of each
    tower, or [-(clip_skip + 2)]), pooled_prompt_embeds = text_embeds [B, 24]; the negative embeddings always use
    hidden_states[-2] (diffusers ignores clip_skip there)."""
    root, te1, te2, *_ = folders
    pipe = copy.deepcopy(sdxl_encode)
    negatives = ["blurry!", "", "ugly", "", "x", "!!", "low quality"]
    if dtype == np.float64:
        pipe.text_encoder.double()
        pipe.text_encoder_2.double()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True,
                                                      negative_prompt=negatives, clip_skip=clip_skip)
    tokenizers = [Tokenizer.from_pretrained(root / "tokenizer"), Tokenizer.from_pretrained(root / "tokenizer_2")]
    encoders = [TextEncoder.from_pretrained(root / "text_encoder", dtype=dtype),
                TextEncoderWithProjection.from_pretrained(root / "text_encoder_2", dtype=dtype)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, our_pooled = encode_prompts(PROMPTS, tokenizers, encoders, clip_skip=clip_skip)
        neg, neg_pooled = encode_prompts(negatives, tokenizers, encoders)
    assert ours.shape == (len(PROMPTS), 77, 72) and our_pooled.shape == (len(PROMPTS), 24)
    check(ours, pe, dtype, f"prompt_embeds clip_skip={clip_skip}")
    check(our_pooled, pooled, dtype, "pooled_prompt_embeds")
    check(neg, npe, dtype, "negative_prompt_embeds")
    check(neg_pooled, npooled, dtype, "negative_pooled_prompt_embeds")


def test_force_zeros_for_empty_prompt_is_zeros_not_the_encoding_of_empty(sdxl_encode):
    """The convention the pipeline must reproduce (docs/sdxl.md): with force_zeros_for_empty_prompt (True in
    SDXL's model_index.json) and negative_prompt None, the negative embeddings and pooled output are zeros; an
    explicit "" is encoded like any prompt."""
    with torch.no_grad():
        _, npe, _, npooled = sdxl_encode.encode_prompt(["a cat"], device="cpu", do_classifier_free_guidance=True)
        _, npe_empty, _, _ = sdxl_encode.encode_prompt(["a cat"], device="cpu", do_classifier_free_guidance=True,
                                                        negative_prompt="")
    assert sdxl_encode.config.force_zeros_for_empty_prompt is True
    assert not npe.any() and not npooled.any() and npe_empty.abs().max() > 0.1


def test_encode_prompts_checks_clip_skip(folders):
    root, *_ = folders
    tokenizers = [Tokenizer.from_pretrained(root / "tokenizer"), Tokenizer.from_pretrained(root / "tokenizer_2")]
    encoders = [TextEncoder.from_pretrained(root / "text_encoder"),
                TextEncoderWithProjection.from_pretrained(root / "text_encoder_2")]
    for bad in (-1, 3, 1.5):
        with pytest.raises(InputError, match=r"clip_skip must be None or an int in \[0, 2\]"):
            encode_prompts(["a"], tokenizers, encoders, clip_skip=bad)
    hidden, pooled = encode_prompts(["a"], tokenizers[:1], encoders[:1])            # one tower, no projection
    assert hidden.shape == (1, 77, 32) and pooled is None


# ---- files -----------------------------------------------------------------------------------------------------------
def test_projection_tower_files(tmp_path, folders):
    """transformers' folder, a pipeline folder holding text_encoder_2/, and mdref's own save all load to the same
    model; mdref's save loads in transformers (text_model.* + text_projection.weight) with the same outputs; a plain
    TextEncoder reads the same checkpoint without its head."""
    root, _, te2, _, tok2 = folders
    ids = hf_ids(tok2, PROMPTS)
    a = TextEncoderWithProjection.from_pretrained(root / "text_encoder_2")
    b = TextEncoderWithProjection.from_pretrained(root)
    np.testing.assert_array_equal(a.text_embeds(ids), b.text_embeds(ids))
    saved = a.save_pretrained(tmp_path / "mdref-te2")
    from safetensors import safe_open
    with safe_open(saved / "model.safetensors", "np") as f:
        keys = set(f.keys())
    assert "text_projection.weight" in keys
    assert all(k.startswith("text_model.") for k in keys - {"text_projection.weight"})
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["CLIPTextModelWithProjection"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = transformers.CLIPTextModelWithProjection.from_pretrained(saved).eval().double()
    with torch.no_grad():
        ref = back(torch.from_numpy(ids)).text_embeds.numpy()
    check(TextEncoderWithProjection.from_pretrained(saved, dtype=np.float64).text_embeds(ids), ref, np.float64,
          "mdref-saved text_embeds")
    plain = TextEncoder.from_pretrained(root / "text_encoder_2")
    np.testing.assert_array_equal(plain(ids), a(ids))
    assert plain.num_parameters() + 40 * 24 == a.num_parameters()


def test_bigg_preset_parameter_count():
    """OpenCLIP-bigG with projection: 694,659,840 parameters, as transformers' CLIPTextModelWithProjection of the
    same config (built on the meta device: no 2.8 GB allocation); CLIP-L without: 123,060,480."""
    cfg = TextEncoderWithProjectionConfig.from_dict(TEXT_ENCODER_WITH_PROJECTION_PRESETS["openclip-vit-bigg-14"])
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
            cfg.projection_dim, cfg.eos_token_id) == (1280, 32, 20, 5120, "gelu", 1280, 2)
    with torch.device("meta"):
        big = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**cfg.to_dict()))
        clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_ENCODER_PRESETS["clip-vit-l-14"]))
    n = sum(int(np.prod(s)) for s in TextEncoderWithProjection.param_schema(cfg).values())
    print(f"\n[sdxl text] openclip-vit-bigg-14: mdref {n:,}, transformers {big.num_parameters():,}")
    assert n == big.num_parameters() == 694_659_840
    assert clip_l.num_parameters() == 123_060_480
    assert sorted(TextEncoderWithProjection.presets) == ["openclip-vit-bigg-14"]
