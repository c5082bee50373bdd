"""mdref.QwenTextEncoder (mdref/qwen_text.py) against transformers' Qwen3VLForConditionalGeneration, random weights.

The oracle is what DreamLite's pipelines call: ``Qwen3VLForConditionalGeneration(input_ids, attention_mask,
output_hidden_states=True).hidden_states[-1]`` (a tiny vision tower beside it, unused by text), saved with
save_pretrained and read back by mdref. Whole [B, T, D] tensors are compared:
  float32 against the float32 oracle:  max |mdref - torch| <= 1e-5 * max |torch|;
  float64 against the float64 oracle:  <= 1e-10 * max |torch|, the oracle patched where transformers computes
    in float32 whatever the dtype (RMSNorm, rotary cos / sin: tests/qwen_oracles.float64_exact);
  float32 mdref against the float64 oracle, a bound derived from float32's unit roundoff u = 2^-24: every layer
    adds rounding of relative size <= n u per dot product of length n <= max(D, I, H d) and the softmax / norms
    a few u more; over L layers with a stated factor 16 for the growth through the residual stream and the
    attention: 16 * L * n * u (3 layers, n = 96: 2.7e-4). It holds on any x86-64 BLAS kernel.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qwen_oracles import TEXT_CONFIG, float64_exact, qwen_vl_model, rel_err  # noqa: E402

from mdref import qwen_text  # noqa: E402
from mdref.io import ConfigError, QwenTextConfig, QwenTextEncoder  # noqa: E402
from mdref.io.presets import QWEN_TEXT_PRESETS  # noqa: E402
from mdref.trace import trace  # noqa: E402

TOL = {np.float32: 1e-5, np.float64: 1e-10}
U32 = 2.0 ** -24


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    model = qwen_vl_model()
    folder = tmp_path_factory.mktemp("qwen") / "text_encoder"
    model.save_pretrained(folder)
    return model, folder


def batch(seed=0, B=3, T=23, pad_right=(0, 5, 11)):
    """Token ids over the whole vocabulary (specials included) and a right-padding mask per row."""
    ids = np.random.default_rng(seed).integers(0, TEXT_CONFIG["vocab_size"], (B, T))
    mask = np.ones((B, T), np.int64)
    for b, n in enumerate(pad_right):
        if n:
            mask[b, -n:] = 0
            ids[b, -n:] = 151643
    return ids, mask


def run_oracle(model, ids, mask, dtype):
    m = model.double() if dtype == np.float64 else model.float()
    with torch.no_grad():
        out = m(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    return out.hidden_states[-1].numpy()


# ---- parity ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_hidden_states_match_transformers(oracle, dtype, monkeypatch):
    model, folder = oracle
    if dtype == np.float64:
        float64_exact(monkeypatch)
    ids, mask = batch()
    ref = run_oracle(model, ids, mask, dtype)
    ours = QwenTextEncoder.from_pretrained(folder, dtype=dtype)(ids, mask)
    err = rel_err(ours, ref)
    print(f"\n[qwen_text] {np.dtype(dtype).name}: max |mdref - transformers| / max |transformers| = {err:.3e}")
    assert ours.dtype == dtype and ours.shape == ref.shape and err <= TOL[dtype]


def test_float32_is_bounded_against_float64(oracle, monkeypatch):
    model, folder = oracle
    float64_exact(monkeypatch)
    ids, mask = batch(1)
    ref = run_oracle(model, ids, mask, np.float64)
    cfg = QwenTextConfig.from_dict(TEXT_CONFIG)
    n = max(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim)
    bound = 16 * cfg.num_hidden_layers * n * U32
    err = rel_err(QwenTextEncoder.from_pretrained(folder)(ids, mask), ref)
    print(f"\n[qwen_text] float32 mdref vs float64 oracle: {err:.3e} (bound {bound:.2e})")
    assert err <= bound


def test_hidden_states_last_is_after_the_final_norm(oracle):
    """What transformers returns as hidden_states[-1] is last_hidden_state (tie_last_hidden_states), not the last
    layer's raw output: the pipelines' text features are normed. mdref's trace holds both."""
    model, folder = oracle
    ids, mask = batch(2)
    ref = run_oracle(model, ids, mask, np.float32)
    with torch.no_grad():
        last = model.model.language_model(input_ids=torch.from_numpy(ids),
                                          attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    assert np.array_equal(ref, last)
    with trace() as t:
        ours = QwenTextEncoder.from_pretrained(folder)(ids, mask)
    assert np.array_equal(t["text_encoder.norm"], ours)
    assert rel_err(t[f"text_encoder.layers.{TEXT_CONFIG['num_hidden_layers'] - 1}"], ref) > 0.01


def test_text_positions_are_one_dimensional(oracle):
    """With no image the M-RoPE position ids reduce to arange(T) in all three components: passing them explicitly
    as [3, B, T] changes nothing, and the padding mask does not shift them (a left-padded row's tokens sit at
    positions n_pad, n_pad + 1, ..., as mdref computes)."""
    model, folder = oracle
    ids, mask = batch(3, pad_right=(0, 0, 0))
    mask[1, :4] = 0                                              # left padding on row 1
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        implicit = model(input_ids=ids_t, attention_mask=mask_t, output_hidden_states=True).hidden_states[-1]
        pos = torch.arange(ids.shape[1]).expand(3, ids.shape[0], -1)
        explicit = model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos,
                         output_hidden_states=True).hidden_states[-1]
    assert torch.equal(implicit, explicit)
    ours = QwenTextEncoder.from_pretrained(folder)(ids, mask)
    valid = mask.astype(bool)                                    # left-padding rows see nothing: not compared
    assert rel_err(ours[valid], implicit.numpy()[valid]) <= 1e-5


def test_trace_points_match_transformers_modules(oracle, monkeypatch):
    """Every trace point equals the output of the transformers module of the same name (float64)."""
    model, folder = oracle
    float64_exact(monkeypatch)
    model = model.double()
    lm = model.model.language_model
    captured = {}
    for name, module in lm.named_modules():
        if name in ("embed_tokens", "norm") or (name.startswith("layers.") and (
                name.count(".") == 1 or name.split(".")[-1] in ("self_attn", "mlp")) and name.count(".") <= 2):
            module.register_forward_hook(lambda m, i, o, n=name: captured.__setitem__(
                n, (o[0] if isinstance(o, tuple) else o).numpy().copy()))
    ids, mask = batch(4)
    with torch.no_grad():
        model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    with trace() as t:
        QwenTextEncoder.from_pretrained(folder, dtype=np.float64)(ids, mask)
    L = TEXT_CONFIG["num_hidden_layers"]
    expected = ["embed_tokens"] + [f"layers.{i}{s}" for i in range(L) for s in (".self_attn", ".mlp", "")] + ["norm"]
    assert t.names() == ["text_encoder." + n for n in expected] and set(captured) == set(expected)
    for n in expected:
        assert rel_err(t["text_encoder." + n], captured[n]) <= 1e-10, n


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_half_precision_checkpoints(tmp_path, storage):
    """F16 / BF16 files (Qwen3-VL ships bf16) load exactly, widened to float32; the oracle is the file loaded by
    transformers in float32. (Not the half model cast back with .float(): Module.to(float16) rounds the rotary
    inv_freq buffer too, and .float() keeps the rounded table; from_pretrained(dtype=...) recomputes it in float32.)"""
    qwen_vl_model(seed=5).to(getattr(torch, storage)).save_pretrained(tmp_path / storage)
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / storage, dtype=torch.float32)
    ids, mask = batch(5)
    ref = run_oracle(model.eval(), ids, mask, np.float32)
    assert rel_err(QwenTextEncoder.from_pretrained(tmp_path / storage)(ids, mask), ref) <= 1e-5


# ---- layouts, config, presets -------------------------------------------------------------------------------------
def test_text_model_folder_and_save_pretrained_round_trip(tmp_path, oracle):
    """A bare Qwen3VLTextModel folder (no prefix, model_type qwen3_vl_text) loads; mdref's save_pretrained is read
    by transformers' Qwen3VLTextModel and gives the same last_hidden_state."""
    model, folder = oracle
    ids, mask = batch(6)
    expected = QwenTextEncoder.from_pretrained(folder)(ids, mask)
    model.model.language_model.save_pretrained(tmp_path / "bare")
    assert np.array_equal(QwenTextEncoder.from_pretrained(tmp_path / "bare")(ids, mask), expected)
    saved = QwenTextEncoder.from_pretrained(folder).save_pretrained(tmp_path / "mdref")
    back = transformers.Qwen3VLTextModel.from_pretrained(saved).eval()
    with torch.no_grad():
        ref = back(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    assert rel_err(expected, ref) <= 1e-5
    assert np.array_equal(QwenTextEncoder.from_pretrained(saved)(ids, mask), expected)


def test_transformers_4_config_spelling(tmp_path):
    """Qwen3-VL's published config.json (transformers 4.57): rope_theta and rope_scaling at the text_config's top
    level. mdref reads it as transformers 5 does (rope_parameters)."""
    old = {k: v for k, v in TEXT_CONFIG.items() if k != "rope_parameters"}
    old.update(rope_theta=5000000, rope_scaling=dict(rope_type="default", mrope_section=[4, 4, 4],
                                                     mrope_interleaved=True), model_type="qwen3_vl_text",
               bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True, torch_dtype="bfloat16")
    full = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "text_config": old,
            "vision_config": {"depth": 24}, "image_token_id": 151655, "tie_word_embeddings": True}
    ours = QwenTextConfig.from_dict(full)
    assert ours.rope_parameters["rope_theta"] == 5e6
    theirs = transformers.Qwen3VLConfig(**{k: v for k, v in full.items() if k != "architectures"}).text_config
    assert theirs.rope_parameters["rope_theta"] == ours.rope_parameters["rope_theta"]
    for bad, match in ((dict(old, hidden_act="gelu"), "hidden_act"),
                       (dict(old, rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope"),
                       (dict(old, num_key_value_heads=3), "multiple"), (dict(old, sliding_windowz=1), "unsupported")):
        with pytest.raises(ConfigError, match=match):
            QwenTextConfig.from_dict(bad)


@pytest.mark.parametrize("name", list(QWEN_TEXT_PRESETS))
def test_preset_parameter_counts_match_transformers(name):
    """transformers' Qwen3VLTextModel built on the meta device from the same config has as many parameters as
    mdref's schema (the full-size preset is DreamLite's text encoder: 1,720,574,976)."""
    cfg = QWEN_TEXT_PRESETS[name]
    with torch.device("meta"):
        model = transformers.Qwen3VLTextModel(transformers.Qwen3VLTextConfig(**json.loads(json.dumps(cfg))))
    theirs = sum(p.numel() for p in model.parameters())
    ours = QwenTextEncoder.param_schema(QwenTextConfig.from_dict(cfg))
    assert sum(int(np.prod(s)) for s in ours.values()) == theirs
    assert {k: tuple(v) for k, v in ours.items()} == {k: tuple(p.shape) for k, p in model.named_parameters()}
    if name == "qwen3-vl-2b-text":
        assert theirs == 1_720_574_976


def test_tiny_preset_runs_and_errors_name_the_input():
    te = QwenTextEncoder.from_preset("qwen-text-tiny", seed=1)
    ids, mask = batch(7, T=9, pad_right=(0, 2, 0))
    out = te(ids, mask)
    assert out.shape == (3, 9, 32) and np.isfinite(out).all()
    for bad, match in (((ids.astype(float), None), "integer"), ((ids + 151936, None), r"\[0, 151936\)"),
                       ((ids, mask[:, :3]), "attention_mask")):
        with pytest.raises(ValueError, match=match):
            te(*bad)


def test_rope_table_is_torchs_within_one_ulp():
    """mdref's inv_freq is the correctly rounded float32 table; torch's float32 pow differs on a few entries by one
    last bit (a 6e-8 relative change of one frequency), which the float32 tolerance absorbs."""
    for theta in (5e6, 1e6, 1e4):
        for d in (16, 24, 64, 128):
            ours = qwen_text.rope_angles(np.ones(1), d, theta)[0]
            theirs = (1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))).numpy()
            assert np.abs(ours.view(np.int32) - theirs.view(np.int32)).max() <= 1


def test_prompt_embeddings_matches_the_pipelines_extraction():
    """qwen_text.prompt_embeddings == DreamLitePipeline's _extract_masked_hidden, [drop:], pad_sequence, mask, and
    the text_pad_embedding blend, on a left- and right-padded batch."""
    from diffusers.pipelines.dreamlite.pipeline_dreamlite import DreamLitePipeline
    from torch.nn.utils.rnn import pad_sequence
    rng = np.random.default_rng(8)
    hidden = rng.standard_normal((3, 12, 5))
    mask = np.ones((3, 12), np.int64)
    mask[1, 9:] = 0
    mask[2, :3] = 0
    pad = rng.standard_normal(5)
    rows = [e[4:] for e in DreamLitePipeline._extract_masked_hidden(torch.from_numpy(hidden), torch.from_numpy(mask))]
    ref = pad_sequence(rows, batch_first=True, padding_value=0).numpy()
    ref_mask = np.zeros(ref.shape[:2], np.int64)
    for b, r in enumerate(rows):
        ref_mask[b, :len(r)] = 1
    embeds, m = qwen_text.prompt_embeddings(hidden, mask, 4)
    assert np.array_equal(embeds, ref) and np.array_equal(m, ref_mask)
    blended, _ = qwen_text.prompt_embeddings(hidden, mask, 4, pad_embedding=pad)
    assert np.array_equal(blended, ref * ref_mask[..., None] + pad * (1 - ref_mask[..., None]))


def test_seeded_init_is_deterministic():
    a, b, c = (QwenTextEncoder.from_preset("qwen-text-tiny", seed=s) for s in (0, 0, 1))
    ids, _ = batch(9, T=5, pad_right=(0, 0, 0))
    assert np.array_equal(a(ids), b(ids)) and not np.array_equal(a(ids), c(ids))
