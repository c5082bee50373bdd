"""mdref.TextEncoder against transformers' CLIPTextModel with the same random weights.

Each oracle is built inside the test (offline), given random weights in every parameter (norm scales and biases
included, so no term is trivially 1 or 0), saved with save_pretrained (safetensors) and read back by mdref.
Inputs are real prompts tokenized by mdref's Tokenizer (vocab 49408). Whole last_hidden_state tensors are compared:
  float32: max |mdref - torch| <= 1e-5 * max |torch|   (float32 rounding differs in matmul order only)
  float64: the oracle in .double(), <= 1e-10 * max |torch|
transformers 5 runs CLIP attention through torch's scaled_dot_product_attention (attn_implementation 'sdpa',
its default): it computes in the input dtype, so the float64 oracle is float64 throughout. (The 'eager' path
computes its softmax in float32 even for float64 inputs, which would cap float64 agreement near 1e-7.)
"""

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from mdref.trace import trace as trace_activations  # noqa: E402
from mdref.io import ConfigError  # noqa: E402
from mdref.io import TextEncoder, TextEncoderConfig  # noqa: E402
from mdref.io.presets import TEXT_ENCODER_PRESETS as PRESETS  # noqa: E402
from mdref.tokenizer import Tokenizer  # noqa: E402
from mdref.formats.safetensors import WeightsError  # noqa: E402
from oracles import randomize, rel_err, within  # noqa: E402

pytestmark = pytest.mark.numerics          # also run under other BLAS / oneDNN kernels (.ci/run)

TOL = {np.float32: 1e-5, np.float64: 1e-10}

PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon, highly detailed, 8k",
           "", "Hello!!! It's 2024 -- café 日本 😀", " ".join(["lorem ipsum dolor"] * 40)]

CONFIGS = {
    # name: (CLIPTextConfig kwargs, tokenizer pad token)
    "w64-h4-l2-quick_gelu": (dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=256,
                                  hidden_act="quick_gelu"), "<|endoftext|>"),
    "w48-h3-l3-gelu-eos2": (dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=3, intermediate_size=96,
                                 hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1), "<|endoftext|>"),
    "w32-h1-l1-gelu_new": (dict(hidden_size=32, num_attention_heads=1, num_hidden_layers=1, intermediate_size=64,
                                hidden_act="gelu_new"), "<|endoftext|>"),
    "w96-h8-l2-gelu-pad0-eps1e-6": (dict(hidden_size=96, num_attention_heads=8, num_hidden_layers=2,
                                         intermediate_size=384, hidden_act="gelu", layer_norm_eps=1e-6), "!"),
    "w32-h2-l2-gelu_pytorch_tanh": (dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                                         intermediate_size=128, hidden_act="gelu_pytorch_tanh"), "<|endoftext|>"),
}


def build_oracle(tmp_path, name, seed=0):
    """A random CLIPTextModel saved to tmp_path/name; returns (model, folder)."""
    kwargs, _ = CONFIGS[name]
    model = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**kwargs)), seed)
    folder = tmp_path / name
    model.save_pretrained(folder)
    return model, folder


def tokenize(pad_token="<|endoftext|>", max_length=77, prompts=PROMPTS):
    tok = Tokenizer.from_pretrained(None, fix_text=False, max_length=max_length)
    if pad_token != tok.pad_token:
        tok = Tokenizer(tok.vocab, tok.merges, pad_token=pad_token, max_length=max_length, fix_text=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the long prompt is truncated on purpose
        return tok(prompts)


def run_oracle(model, ids, dtype):
    m = model.double() if dtype == np.float64 else model.float()
    with torch.no_grad():
        out = m(torch.from_numpy(ids))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def check(ours, ref, dtype, key):
    assert ours.dtype == dtype and ours.shape == ref.shape
    within(f"text encoder {key}: max |mdref - transformers| / max |transformers|", rel_err(ours, ref), TOL[dtype])


# ---- parity ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_last_hidden_state_matches_transformers(tmp_path, name, dtype):
    model, folder = build_oracle(tmp_path, name)
    ids = tokenize(CONFIGS[name][1])
    ref, ref_pooled = run_oracle(model, ids, dtype)
    te = TextEncoder.from_pretrained(folder, dtype=dtype)
    hidden = te(ids)
    check(hidden, ref, dtype, f"{name}/{np.dtype(dtype).name}")
    check(te.pooled(ids, hidden), ref_pooled, dtype, f"{name}/pooled/{np.dtype(dtype).name}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_shorter_sequence(tmp_path, dtype):
    """T < 77 (position embeddings sliced, mask [T, T]) as CLIPTextModel accepts it."""
    model, folder = build_oracle(tmp_path, "w64-h4-l2-quick_gelu")
    ids = tokenize(max_length=20)
    check(TextEncoder.from_pretrained(folder, dtype=dtype)(ids), run_oracle(model, ids, dtype)[0], dtype,
          f"T=20/{np.dtype(dtype).name}")


def test_trace_points_match_transformers_modules(tmp_path):
    """Every trace point equals the output of the transformers module of the same name (float64)."""
    model, folder = build_oracle(tmp_path, "w48-h3-l3-gelu-eos2")
    model = model.double()
    ids = tokenize()
    captured = {}
    for mod_name, module in model.named_modules():
        if mod_name == "embeddings" or mod_name == "final_layer_norm" or (
                mod_name.startswith("encoder.layers.") and mod_name.count(".") in (2, 3)
                and mod_name.split(".")[-1] in ("self_attn", "mlp") + tuple("0123456789")):
            module.register_forward_hook(lambda m, i, o, n=mod_name: captured.__setitem__(
                n, (o[0] if isinstance(o, tuple) else o).numpy().copy()))
    with torch.no_grad():
        model(torch.from_numpy(ids))
    te = TextEncoder.from_pretrained(folder, dtype=np.float64)
    with trace_activations() as t:
        te(ids)
    expected = ["embeddings"] + [f"encoder.layers.{i}{s}" for i in range(3) for s in (".self_attn", ".mlp", "")] \
        + ["final_layer_norm"]
    assert t.names() == ["text_encoder." + n for n in expected]
    assert set(captured) == set(expected)
    for n in expected:
        within(f"trace point {n} float64", rel_err(t["text_encoder." + n], captured[n]), 1e-10)


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_half_precision_checkpoints(tmp_path, storage):
    """F16 / BF16 files load exactly (widened to float32); the result matches the oracle run in float32 on the
    same rounded weights."""
    model = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CONFIGS["w64-h4-l2-quick_gelu"][0])), 3)
    model.to(getattr(torch, storage)).save_pretrained(tmp_path / storage)
    ids = tokenize()
    ref, _ = run_oracle(model.float(), ids, np.float32)
    check(TextEncoder.from_pretrained(tmp_path / storage)(ids), ref, np.float32, f"{storage}-file/float32")


# ---- layouts ------------------------------------------------------------------------------------------------------
def test_key_prefix_file_and_pipeline_layouts(tmp_path):
    """Keys with 'text_model.' (transformers 4, SD folders) or without (transformers 5); the old position_ids
    buffer; a single .safetensors path; a pipeline folder holding text_encoder/: all load to the same model."""
    model, folder = build_oracle(tmp_path, "w32-h1-l1-gelu_new")
    ids = tokenize()
    expected = TextEncoder.from_pretrained(folder)(ids)
    state = {"text_model." + k: v.contiguous() for k, v in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    prefixed = tmp_path / "pipeline" / "text_encoder"
    prefixed.mkdir(parents=True)
    (prefixed / "config.json").write_text((folder / "config.json").read_text())
    safetensors_torch.save_file(state, prefixed / "model.safetensors", metadata={"format": "pt"})
    for path in (prefixed, prefixed / "model.safetensors", tmp_path / "pipeline", folder / "model.safetensors"):
        assert np.array_equal(TextEncoder.from_pretrained(path)(ids), expected), path


def test_save_pretrained_is_read_by_transformers(tmp_path):
    """mdref's folder (config.json + 'text_model.'-prefixed model.safetensors) loads in transformers and gives
    the same output; a seeded mdref model round-trips through its own files bit for bit."""
    te = TextEncoder.from_config(TextEncoderConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                                   intermediate_size=128, hidden_act="gelu"), seed=7)
    folder = te.save_pretrained(tmp_path / "mdref")
    ids = tokenize()
    assert np.array_equal(TextEncoder.from_pretrained(folder)(ids), te(ids))
    from safetensors import safe_open
    with safe_open(folder / "model.safetensors", "np") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = transformers.CLIPTextModel.from_pretrained(folder).eval()
    ref, _ = run_oracle(oracle, ids, np.float32)
    check(te(ids), ref, np.float32, "mdref-saved-seeded/float32")


def test_seeded_init_is_deterministic():
    cfg = TextEncoderConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64)
    ids = tokenize()
    a, b, c = (TextEncoder.from_config(cfg, seed=s)(ids) for s in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert TextEncoder.from_config(cfg, dtype=np.float64)(ids).dtype == np.float64


# ---- preset -------------------------------------------------------------------------------------------------------
def test_clip_vit_l_14_preset_parameter_count():
    """The preset has exactly as many parameters as transformers' CLIPTextModel of the same config (~123M)."""
    te = TextEncoder.from_preset("clip-vit-l-14")
    cfg = te.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
            cfg.max_position_embeddings, cfg.vocab_size) == (768, 12, 12, 3072, "quick_gelu", 77, 49408)
    with torch.device("meta"):                            # shapes only: no 0.5 GB allocation for the oracle
        oracle = transformers.CLIPTextModel(transformers.CLIPTextConfig(**te.config.to_dict()))
    n = oracle.num_parameters()
    print(f"\n[text_encoder] clip-vit-l-14: mdref {te.num_parameters():,} parameters, transformers {n:,}")
    assert te.num_parameters() == n == 123_060_480
    assert sum(v.size for v in _leaves(te.params)) == n
    out = te(tokenize(prompts=["a red circle"]))
    assert out.shape == (1, 77, 768) and np.isfinite(out).all()


def test_presets_match_transformers_counts():
    for name, preset in PRESETS.items():
        cfg = TextEncoderConfig.from_dict(preset)
        with torch.device("meta"):
            oracle = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg.to_dict()))
        assert sum(int(np.prod(s)) for s in TextEncoder.param_schema(cfg).values()) == oracle.num_parameters(), name


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


# ---- errors -------------------------------------------------------------------------------------------------------
def test_missing_and_misshaped_keys_are_named(tmp_path):
    model, folder = build_oracle(tmp_path, "w32-h1-l1-gelu_new")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["encoder.layers.0.mlp.fc1.bias"]
    state["final_layer_norm.weight"] = torch.ones(31)
    safetensors_torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError) as err:
        TextEncoder.from_pretrained(folder)
    message = str(err.value)
    assert "missing keys (1): encoder.layers.0.mlp.fc1.bias" in message
    assert "wrong shape for final_layer_norm.weight: expected (32,), found (31,)" in message


def test_unexpected_key_is_named(tmp_path):
    model, folder = build_oracle(tmp_path, "w32-h1-l1-gelu_new")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["encoder.layers.7.mlp.fc1.bias"] = torch.zeros(64)
    safetensors_torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): encoder.layers.7.mlp.fc1.bias"):
        TextEncoder.from_pretrained(folder)


def test_pickle_checkpoints_are_refused(tmp_path):
    model, folder = build_oracle(tmp_path, "w32-h1-l1-gelu_new")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(WeightsError, match="safetensors only"):
        TextEncoder.from_pretrained(folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="safetensors only"):
        TextEncoder.from_pretrained(folder)


def test_config_errors_are_named(tmp_path):
    with pytest.raises(ConfigError, match="hidden_act must be one of .*, found 'relu'"):
        TextEncoderConfig.from_dict({"hidden_act": "relu"})
    with pytest.raises(ConfigError, match="unsupported config keys \\['use_rotary'\\]"):
        TextEncoderConfig.from_dict({"use_rotary": True})
    with pytest.raises(ConfigError, match="not divisible"):
        TextEncoderConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ConfigError, match="unknown preset"):
        TextEncoder.from_preset("clip-vit-z-99")
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {}}))
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="model_type 'clip'"):
        TextEncoder.from_pretrained(folder)


def test_bad_ids_are_refused():
    te = TextEncoder.from_config(TextEncoderConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                                   intermediate_size=64))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        te(np.zeros((1, 78), dtype=np.int64))
    with pytest.raises(ValueError, match="token ids"):
        te(np.full((1, 5), 49408))
    with pytest.raises(ValueError, match="integer array"):
        te(np.zeros((1, 5), dtype=np.float32))
