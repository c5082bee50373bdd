"""mdref.UNet against the oracle, diffusers UNet2DConditionModel, with random weights built here (offline).

Each config is a shrunk cousin of a public checkpoint layout. Whole output tensors are compared for batch 2,
two different timesteps and a non-square latent: float32 max abs error <= 1e-5 * max|reference| (float32
rounding through a few dozen layers), float64 (oracle in .double()) <= 1e-10 * max|reference|.
"""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import mdref.formats.safetensors as W  # noqa: E402
from mdref.io import ConfigError  # noqa: E402
from mdref.trace import trace  # noqa: E402
from mdref import ops  # noqa: E402
from mdref.io import UNet, UNetConfig  # noqa: E402
from oracles import randomize, rel_err, within  # noqa: E402

pytestmark = pytest.mark.numerics          # also run under other BLAS / oneDNN kernels (.ci/run)

CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"

CONFIGS = {
    # SD-1.5: 4 levels, conv projections, one head count everywhere, 2 ResNets per level, a mid block.
    "sd15": dict(block_out_channels=[32, 64, 64, 64], down_block_types=[CA_DOWN] * 3 + [DOWN],
                 up_block_types=[UP] + [CA_UP] * 3, layers_per_block=2, attention_head_dim=4,
                 cross_attention_dim=24, norm_num_groups=8),
    # SD-2.1 / SD-Turbo: linear projections, per-level heads, upcast_attention (no effect in f32 / f64).
    "sd21_turbo": dict(block_out_channels=[32, 64, 64, 64], down_block_types=[CA_DOWN] * 3 + [DOWN],
                       up_block_types=[UP] + [CA_UP] * 3, layers_per_block=2, attention_head_dim=[2, 4, 8, 8],
                       cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
                       upcast_attention=True),
    # SDXS-512: no mid block, one ResNet per level, only_cross_attention per level (attn1 over the text).
    "sdxs": dict(block_out_channels=[32, 48, 64], down_block_types=[DOWN, CA_DOWN, CA_DOWN],
                 up_block_types=[CA_UP, CA_UP, UP], layers_per_block=1, attention_head_dim=[2, 4, 4],
                 only_cross_attention=[False, True, False], mid_block_type=None, cross_attention_dim=24,
                 norm_num_groups=8, use_linear_projection=True),
    # SDXL-like (without its added embeddings): no transformer at the top, more transformer layers lower down,
    # per-level ResNet counts, a different time-embedding phase.
    "sdxl_like": dict(block_out_channels=[32, 48, 64], down_block_types=[DOWN, CA_DOWN, CA_DOWN],
                      up_block_types=[CA_UP, CA_UP, UP], layers_per_block=[2, 1, 2],
                      transformer_layers_per_block=[1, 2, 3], attention_head_dim=[1, 2, 4],
                      cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
                      flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6),
    # BK-SDM-Tiny: fewer ResNets (1 per down block), no mid block.
    "bk_sdm_tiny": dict(block_out_channels=[32, 64, 64, 64], down_block_types=[CA_DOWN] * 3 + [DOWN],
                        up_block_types=[UP] + [CA_UP] * 3, layers_per_block=1, attention_head_dim=8,
                        mid_block_type=None, cross_attention_dim=24, norm_num_groups=8),
}
B, H, W_, T = 2, 16, 24, 7
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}




def timestep_embedding_f64(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                           max_period=10000):
    """diffusers.models.embeddings.get_timestep_embedding computed in float64 instead of float32."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift)
    emb = scale * timesteps[:, None].double() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return torch.nn.functional.pad(emb, (0, 1, 0, 0)) if embedding_dim % 2 else emb


def make_oracle(config, seed, tmp_path):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    randomize(model, seed)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def inputs(config, seed):
    g = np.random.default_rng(seed)
    sample = g.standard_normal((B, config.get("in_channels", 4), H, W_))
    context = g.standard_normal((B, T, config["cross_attention_dim"]))
    return sample, np.array([999, 37]), context


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(name, dtype, tmp_path, monkeypatch, record_property):
    config = CONFIGS[name]
    model = make_oracle(config, seed=1, tmp_path=tmp_path).to(dtype)
    sample, t, context = inputs(config, seed=2)
    monkeypatch.setattr(ops, "UPSAMPLE_MIN_PIXELS", 0)   # the upsamplers' phase form even on these small images
    if dtype == torch.float64:
        # diffusers computes the timestep embedding in float32 whatever the model dtype; mdref's float64 mode is
        # float64 throughout, so the oracle's embedding is made float64 too for this comparison.
        monkeypatch.setattr(diffusers.models.embeddings, "get_timestep_embedding", timestep_embedding_f64)
    with torch.no_grad():
        ref = model(torch.tensor(sample, dtype=dtype), torch.tensor(t), torch.tensor(context, dtype=dtype)).sample
    ref = ref.numpy()

    unet = UNet.from_pretrained(tmp_path, dtype=np.float64 if dtype == torch.float64 else np.float32)
    assert unet.num_parameters() == sum(p.numel() for p in model.parameters())
    ours = unet(sample, t, context)

    assert ours.shape == ref.shape == (B, config.get("out_channels", 4), H, W_)
    record_property("max_rel_error", within(f"{name} {dtype}: max|err|/max|ref|", rel_err(ours, ref), TOLERANCE[dtype]))


def test_scalar_timestep_and_trace_points(tmp_path):
    """A scalar timestep equals the same value per sample; the documented trace points are recorded."""
    config = CONFIGS["sdxs"]
    make_oracle(config, seed=3, tmp_path=tmp_path)
    unet = UNet.from_pretrained(tmp_path)
    sample, _, context = inputs(config, seed=4)
    with trace() as tr:
        out = unet(sample, 500, context)
    np.testing.assert_array_equal(out, unet(sample, np.array([500, 500]), context))
    for point in ["unet.time_embedding", "unet.conv_in", "unet.down_blocks.0.resnets.0",
                  "unet.down_blocks.0.downsamplers.0", "unet.down_blocks.1.attentions.0",
                  "unet.down_blocks.1.attentions.0.transformer_blocks.0",
                  "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1",
                  "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2",
                  "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff",
                  "unet.up_blocks.0.resnets.1", "unet.up_blocks.0.upsamplers.0", "unet.up_blocks.2", "unet.out"]:
        assert point in tr, point
    np.testing.assert_array_equal(tr["unet.out"], out)


def test_save_pretrained_round_trip(tmp_path):
    unet = UNet.from_config(UNetConfig.from_dict(CONFIGS["sd21_turbo"]), seed=5)
    unet.save_pretrained(tmp_path / "m")
    again = UNet.from_pretrained(tmp_path / "m")
    assert again.config == unet.config
    sample, t, context = inputs(CONFIGS["sd21_turbo"], seed=6)
    np.testing.assert_array_equal(again(sample, t, context), unet(sample, t, context))
    # diffusers reads the folder too, key for key
    model = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "m")
    assert set(model.state_dict()) == set(W.flatten(unet.params))


def test_size_not_divisible_is_a_clear_error():
    unet = UNet.from_config(UNetConfig.from_dict(CONFIGS["sd15"]))   # 4 levels: H, W divisible by 8
    with pytest.raises(ValueError, match=r"divisible by 8.*H=18, W=24"):
        unet(np.zeros((1, 4, 18, 24)), 1, np.zeros((1, T, 24)))


@pytest.mark.parametrize("key, value", [("foo_bar", 1), ("addition_embed_type", "text_time"),
                                        ("class_embed_type", "timestep"), ("time_cond_proj_dim", 256),
                                        ("resnet_time_scale_shift", "scale_shift"), ("act_fn", "gelu"),
                                        ("center_input_sample", True), ("attention_type", "gated"),
                                        ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 4),
                                        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn")])
def test_unsupported_config_names_the_key(key, value, tmp_path):
    config = dict(CONFIGS["sd15"], **{key: value})
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=key):
        UNet.from_pretrained(tmp_path)


def test_harmless_keys_are_ignored():
    cfg = UNetConfig.from_dict(dict(CONFIGS["sd15"], dropout=0.1, _class_name="UNet2DConditionModel",
                                    _diffusers_version="0.42.1", mid_block_only_cross_attention=None,
                                    addition_embed_type_num_heads=64, act_fn="silu", num_attention_heads=None))
    assert cfg.block_out_channels == [32, 64, 64, 64]


def test_missing_weight_names_the_key(tmp_path):
    make_oracle(CONFIGS["bk_sdm_tiny"], seed=7, tmp_path=tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors, _ = W.read_safetensors(path)
    del tensors["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    W.write_safetensors(path, tensors)
    with pytest.raises(W.WeightsError, match=r"missing keys.*down_blocks\.1\.attentions\.0\.transformer_blocks"
                                             r"\.0\.attn2\.to_k\.weight"):
        UNet.from_pretrained(tmp_path)


def test_bad_inputs_name_the_argument():
    unet = UNet.from_config(UNetConfig.from_dict(CONFIGS["sdxs"]))    # 3 levels, context width 24
    sample, context = np.zeros((2, 4, 8, 8)), np.zeros((2, T, 24))
    with pytest.raises(ValueError, match=r"context must be \[B=2, T, 24\]"):
        unet(sample, 1, np.zeros((2, T, 32)))
    with pytest.raises(ValueError, match=r"timestep must be a scalar or have shape \[B=2\]"):
        unet(sample, np.array([1, 2, 3]), context)
    with pytest.raises(ValueError, match=r"sample must be \[B, 4, H, W\]"):
        unet(np.zeros((2, 3, 8, 8)), 1, context)
    with pytest.raises(ValueError, match="dtype must be float32, float64, float16 or bfloat16"):
        UNet.from_config(UNetConfig.from_dict(CONFIGS["sdxs"]), dtype=np.int32)
