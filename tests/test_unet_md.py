"""MobileDiffusion-only UNet layers, which diffusers does not have: mdref against mdref_torch/twin.py (a PyTorch twin
written independently from docs/mobilediffusion_unet.md, with the same weight names), plus invariants.

Tolerances as for the diffusers parity tests: whole tensors, float32 max abs error <= 1e-5 * max|reference|,
float64 <= 1e-10 * max|reference|.
"""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")                  # mdref_torch/twin.py borrows diffusers' timestep embedding

import mdref.formats.safetensors as W  # noqa: E402
from mdref import unet as U  # noqa: E402
from mdref.io import ConfigError, UNet, UNetConfig  # noqa: E402
from mdref.io.presets import UNET_PRESETS  # noqa: E402
from mdref.io.schema import transformer as transformer_schema  # noqa: E402
from mdref.trace import trace  # noqa: E402
from mdref.params import tree  # noqa: E402
from mdref.specs import TransformerSpec  # noqa: E402
from oracles import randomize, rel_err, within  # noqa: E402

pytestmark = pytest.mark.numerics          # also run under other BLAS / oneDNN kernels (.ci/run)

from mdref_torch import twin  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
RNG = np.random.default_rng




def params_of(module, dtype):
    """The twin's state_dict as an mdref parameter tree (same key names, so no mapping)."""
    return tree(W.nest({k: v.detach().numpy().astype(np_dtype(dtype)) for k, v in module.state_dict().items()}),
                "block")


def block_spec(kind, heads, weighting):
    """What a BasicTransformerBlock reads, in one line: shared K/V, SwiGLU, diffusers' LayerNorm eps (the default)."""
    return dict(spec=TransformerSpec(kind, heads=heads, weighting=weighting, shared_kv=True, ff_activation="swiglu"))


def np_dtype(dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def check(name, ours, ref, dtype):
    ref = ref.detach().numpy()
    assert ours.shape == ref.shape
    within(f"{name} {dtype}: max|err|/max|ref|", rel_err(ours, ref), TOLERANCE[dtype])


def tensors(dtype, *shapes, seed=0):
    g = RNG(seed)
    arrays = [g.standard_normal(s).astype(np_dtype(dtype)) for s in shapes]
    return arrays, [torch.tensor(a) for a in arrays]


# ---- layers against the twin --------------------------------------------------------------------------------------
@DTYPES
@pytest.mark.parametrize("mode", ["cross", "self"])
@pytest.mark.parametrize("shared_kv", [True, False], ids=["shared_kv", "separate_kv"])
@pytest.mark.parametrize("weighting", ["softmax", "relu"])
def test_attention_matches_twin(weighting, shared_kv, mode, dtype):
    kv_dim = 24 if mode == "cross" else 32
    m = randomize(twin.Attention(32, kv_dim, 4, shared_kv, weighting), seed=1).to(dtype)
    (x, ctx), (tx, tctx) = tensors(dtype, (2, 20, 32), (2, 7, 24))
    if mode == "self":
        ctx, tctx = None, None
    with torch.no_grad():
        ref = m(tx, tctx)
    ours = U.attention(x, ctx, **params_of(m, dtype), heads=4, weighting=weighting, shared_kv=shared_kv)
    check(f"attention {weighting} shared_kv={shared_kv} {mode}", ours, ref, dtype)


@DTYPES
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_feed_forward_matches_twin(activation, dtype):
    m = randomize(twin.FeedForward(32, 3, activation), seed=3).to(dtype)
    (x,), (tx,) = tensors(dtype, (2, 20, 32))
    with torch.no_grad():
        ref = m(tx)
    check(f"ff {activation}", U.feed_forward(x, **params_of(m, dtype), activation=activation), ref, dtype)


@DTYPES
@pytest.mark.parametrize("c_in, c_out", [(16, 32), (32, 32)])
def test_separable_resnet_matches_twin(c_in, c_out, dtype):
    m = randomize(twin.ResnetBlock2D(c_in, c_out, 40, 8, 1e-5, True), seed=4).to(dtype)
    (x, temb), (tx, ttemb) = tensors(dtype, (2, c_in, 6, 10), (2, 40))
    with torch.no_grad():
        ref = m(tx, ttemb)
    ours = U.resnet(x, temb, **params_of(m, dtype), groups=8, eps=1e-5, separable=True)
    check(f"separable resnet {c_in}->{c_out}", ours, ref, dtype)


@DTYPES
@pytest.mark.parametrize("kind", ["cross", "full"])
def test_transformer_block_matches_twin(kind, dtype):
    cfg = twin.resolve_config(twin.tiny_md_config(attention_weighting="relu" if kind == "full" else "softmax"))
    m = randomize(twin.BasicTransformerBlock(32, 24, 4, kind, cfg), seed=5).to(dtype)
    (x, ctx), (tx, tctx) = tensors(dtype, (2, 20, 32), (2, 7, 24))
    with torch.no_grad():
        ref = m(tx, tctx)
    ours = U.transformer_block(x, ctx, **params_of(m, dtype), **block_spec(kind, 4, cfg["attention_weighting"]))
    check(f"{kind} transformer block", ours, ref, dtype)


# ---- whole small MobileDiffusion UNets against the twin -------------------------------------------------------
MD_CONFIGS = {
    "md_tiny": twin.tiny_md_config(),                                     # the preset's layout, shrunk
    "md_relu_deeper": twin.tiny_md_config(attention_weighting="relu", layers_per_block=[2, 1, 1],
                                          transformer_layers_per_block=[0, 2, 1], mid_transformer_layers=3,
                                          use_linear_projection=False),
    "md_separate_kv_geglu": twin.tiny_md_config(shared_kv=False, ff_activation="geglu", ff_mult=2,
                                                separable_conv=[True, False, True]),
}


def timestep_embedding_f64(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                           max_period=10000):
    """diffusers' get_timestep_embedding computed in float64 instead of float32."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = scale * timesteps[:, None].double() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return torch.nn.functional.pad(emb, (0, 1, 0, 0)) if embedding_dim % 2 else emb


def save_twin(model, config, folder):
    """The twin's weights and config in the diffusers folder layout that UNet.from_pretrained reads."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    W.write_safetensors(folder / "diffusion_pytorch_model.safetensors",
                        {k: v.detach().numpy() for k, v in model.state_dict().items()})


@DTYPES
@pytest.mark.parametrize("name", list(MD_CONFIGS))
def test_md_unet_matches_twin(name, dtype, tmp_path, monkeypatch):
    config = MD_CONFIGS[name]
    torch.manual_seed(0)
    model = randomize(twin.TwinUNet(config), seed=6)
    save_twin(model, config, tmp_path)
    model = model.to(dtype)
    if dtype == torch.float64:
        # The twin, like diffusers, computes the timestep embedding in float32; mdref's float64 mode is float64
        # throughout, so the twin's embedding is made float64 for this comparison.
        monkeypatch.setattr(twin, "get_timestep_embedding", timestep_embedding_f64)
    (sample, context), (tsample, tcontext) = tensors(dtype, (2, 8, 8, 12), (2, 5, 24), seed=7)
    t = np.array([999, 40])
    with torch.no_grad():
        ref = model(tsample, torch.tensor(t), tcontext)
    unet = UNet.from_pretrained(tmp_path, dtype=np_dtype(dtype))
    assert unet.num_parameters() == sum(p.numel() for p in model.parameters())
    check(name, unet(sample, t, context), ref, dtype)


# ---- invariants ---------------------------------------------------------------------------------------------------
def random_attention_params(dim, kv_dim, seed, shared_kv):
    g = RNG(seed)
    p = {"to_q": {"weight": g.standard_normal((dim, dim))}, "to_out": {"0": {"weight": g.standard_normal((dim, dim)),
                                                                          "bias": g.standard_normal(dim)}}}
    p["to_kv" if shared_kv else "to_k"] = {"weight": g.standard_normal((dim, kv_dim))}
    return tree(p, "attn")


@pytest.mark.parametrize("weighting", ["softmax", "relu"])
def test_shared_kv_equals_standard_attention_with_equal_k_and_v(weighting):
    shared = random_attention_params(16, 12, seed=8, shared_kv=True)
    standard = {"to_q": shared["to_q"], "to_k": shared["to_kv"], "to_v": shared["to_kv"], "to_out": shared["to_out"]}
    x, ctx = RNG(9).standard_normal((2, 10, 16)), RNG(10).standard_normal((2, 6, 12))
    a = U.attention(x, ctx, **shared, heads=2, weighting=weighting, shared_kv=True)
    b = U.attention(x, ctx, **standard, heads=2, weighting=weighting)
    np.testing.assert_array_equal(a, b)


def test_relu_attention_of_all_negative_scores_is_zero():
    """q k^T < 0 everywhere (q from positive inputs, k = -inputs) -> relu weights 0 -> output = to_out bias."""
    dim = 8
    bias = RNG(11).standard_normal(dim)
    p = tree({"to_q": {"weight": np.eye(dim)}, "to_kv": {"weight": -np.eye(dim)},
              "to_out": {"0": {"weight": RNG(12).standard_normal((dim, dim)), "bias": bias}}}, "attn")
    x, ctx = RNG(13).uniform(0.1, 1, (2, 5, dim)), RNG(14).uniform(0.1, 1, (2, 4, dim))
    out = U.attention(x, ctx, **p, heads=2, weighting="relu", shared_kv=True)
    np.testing.assert_array_equal(out, np.broadcast_to(bias, out.shape))


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["cross", "full"]), depth=st.integers(1, 2), heads=st.sampled_from([1, 2, 4]),
       only_cross=st.booleans(), shared_kv=st.booleans(), weighting=st.sampled_from(["softmax", "relu"]),
       ff=st.sampled_from(["geglu", "swiglu"]), linear=st.booleans(), seed=st.integers(0, 2**31))
def test_a_transformer_with_a_zero_output_projection_returns_its_input(kind, depth, heads, only_cross, shared_kv,
                                                                       weighting, ff, linear, seed):
    """Transformer2DModel is residual around proj_out: with proj_out zero the output is the input, exactly, for any
    TransformerSpec (built in one line). Its parameters are drawn from io.schema's keys for that spec, so the schema
    and the layers' signatures agree on every spec, and each block is recorded under its path."""
    spec = TransformerSpec(kind, depth, heads, only_cross and kind == "full", shared_kv, weighting, ff, ff_mult=2,
                           groups=4, linear_projection=linear)
    flat = W.init_params(transformer_schema("t", spec, 8, 6), seed, np.float64)
    flat = {k: np.zeros_like(v) if k.startswith("t.proj_out.") else v for k, v in W.flatten(flat).items()}
    p = tree(W.nest(flat)["t"], "unet.t")
    x, ctx = RNG(seed % 1000).standard_normal((2, 8, 3, 2)), RNG(seed % 1000 + 1).standard_normal((2, 5, 6))
    with trace(r"re:transformer_blocks\.\d+$") as t:
        out = U.transformer_2d(x, ctx, **p, spec=spec)
    np.testing.assert_array_equal(out, x)
    assert t.names() == [f"unet.t.transformer_blocks.{k}" for k in range(depth)]


def test_cross_only_block_ignores_self_attention_weights(tmp_path):
    cfg = twin.resolve_config(twin.tiny_md_config())
    full = randomize(twin.BasicTransformerBlock(32, 24, 4, "full", cfg), seed=15).double()
    p = params_of(full, torch.float64)                                  # has norm1 / attn1
    cross_only = {k: v for k, v in p.items() if k not in ("norm1", "attn1")}
    x, ctx = RNG(16).standard_normal((2, 12, 32)), RNG(17).standard_normal((2, 5, 24))
    kw = block_spec("cross", 4, "softmax")
    np.testing.assert_array_equal(U.transformer_block(x, ctx, **p, **kw),
                                  U.transformer_block(x, ctx, **cross_only, **kw))
    # ... and a checkpoint that carries attn1 weights for a cross-only level is refused, naming the keys.
    config = twin.tiny_md_config()
    unet = UNet.from_config(UNetConfig.from_dict(config), seed=0)
    flat = W.flatten(unet.params)
    flat["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"] = np.zeros((32, 32), np.float32)
    (tmp_path / "config.json").write_text(json.dumps(config))
    W.write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", flat)
    with pytest.raises(W.WeightsError, match=r"unexpected keys.*down_blocks\.1\.attentions\.0\.transformer_blocks"
                                             r"\.0\.attn1\.to_q\.weight"):
        UNet.from_pretrained(tmp_path)


def test_mobilediffusion_preset_layout_and_parameter_count():
    cfg = UNetConfig.from_dict(UNET_PRESETS["mobilediffusion"])
    schema = UNet.param_schema(cfg)
    n = sum(int(np.prod(s)) for s in schema.values())
    print(f"mobilediffusion preset: {n:,} parameters")
    assert abs(n - 386e6) <= 0.01 * 386e6
    resnets = {k.split(".norm1")[0] for k in schema if k.endswith("norm1.weight") and ".resnets." in k}
    assert len(resnets) == 13                      # 2+1+1 down, 2 mid, 3+2+2 up (see weights/README.md)
    assert cfg.in_channels == cfg.out_channels == 8 and cfg.block_out_channels == [320, 640, 1024]
    assert not any(k.startswith(("down_blocks.0.attentions", "up_blocks.2.attentions")) for k in schema)
    level1 = [k for k in schema if k.startswith(("down_blocks.1.attentions", "up_blocks.1.attentions"))]
    assert level1 and not any(".attn1." in k or ".norm1." in k for k in level1)          # cross-only
    assert "mid_block.attentions.0.transformer_blocks.15.attn1.to_kv.weight" in schema    # full, shared K/V
    assert "down_blocks.1.resnets.0.conv1.depthwise.weight" in schema                      # separable
    assert "down_blocks.0.resnets.0.conv1.weight" in schema                                # regular at the top
    assert schema["mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"] == (6 * 1024, 1024)


@pytest.mark.parametrize("change, key", [
    (dict(transformer_kind=["cross", "cross", "full"]), "transformer_kind"),      # level 0 is a DownBlock2D
    (dict(transformer_kind=["none", "self", "full"]), "transformer_kind"),
    (dict(only_cross_attention=[False, True, False]), "only_cross_attention"),   # level 1 is cross-only already
    (dict(separable_conv=[False, True]), "separable_conv"),
    (dict(attention_weighting="sigmoid"), "attention_weighting"),
    (dict(ff_activation="gelu"), "ff_activation"),
    (dict(mid_block_type=None, mid_transformer_layers=2), "mid_transformer_layers"),
    (dict(attention_head_dim=[1, 3, 2]), "attention_head_dim"),                 # 3 heads do not divide 32
])
def test_inconsistent_md_config_names_the_key(change, key):
    with pytest.raises(ConfigError, match=key):
        UNetConfig.from_dict(dict(twin.tiny_md_config(), **change))
