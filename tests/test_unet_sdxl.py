"""mdref.UNet's SDXL-family parts against diffusers 0.42's UNet2DConditionModel, built here with random weights:
the "text_time" added embedding (pooled text + 6 time ids), the LCM guidance embedding (time_cond_proj_dim), per-block
transformer depths with reverse_transformer_layers_per_block and the one-ResNet UNetMidBlock2D (SSD-1B / Vega), and
the full-size presets' parameter counts against diffusers built from the same configs on the meta device.

Whole outputs, batch 2, two timesteps, a non-square latent: float32 <= 1e-5 of max |reference| (the bound of
tests/test_unet.py: float32 rounding through a few dozen layers), float64 <= 1e-10 with the oracle in .double() and its
float32 sinusoids (time_proj, add_time_proj: both call embeddings.get_timestep_embedding) made float64 (mdref's float64
is float64 end to end; diffusers computes them in float32 whatever the model's dtype).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from mdref.io import UNet, UNetConfig  # noqa: E402
from mdref.io.presets import UNET_PRESETS  # noqa: E402
from mdref.trace import trace  # noqa: E402
from mdref.unet import guidance_embedding  # noqa: E402
from oracles import U32, U64, randomize, rel_err, within  # noqa: E402
from test_unet import timestep_embedding_f64  # noqa: E402

pytestmark = pytest.mark.numerics

DOWN, CA_DOWN, CA_UP, UP = "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"
P, K, A = 24, 6, 8                      # pooled width, time ids, addition_time_embed_dim
SDXL_TINY = dict(block_out_channels=[32, 64], layers_per_block=1, down_block_types=[DOWN, CA_DOWN],
                 up_block_types=[CA_UP, UP], transformer_layers_per_block=[1, 2], attention_head_dim=[2, 4],
                 cross_attention_dim=48, addition_embed_type="text_time", addition_time_embed_dim=A,
                 projection_class_embeddings_input_dim=P + K * A, use_linear_projection=True, norm_num_groups=8)
CONFIGS = {
    "text_time": SDXL_TINY,
    # LCM-distilled SDXL: the guidance embedding on top of text_time
    "text_time_cond_proj": dict(SDXL_TINY, time_cond_proj_dim=16),
    # SSD-1B-like: per-block down depths, separate up depths, a one-ResNet mid block; 3 levels, 2 ResNets per block
    "ssd1b_like": dict(SDXL_TINY, block_out_channels=[16, 32, 32], layers_per_block=2,
                       down_block_types=[DOWN, CA_DOWN, CA_DOWN], up_block_types=[CA_UP, CA_UP, UP],
                       attention_head_dim=[2, 2, 4], transformer_layers_per_block=[1, [2, 1], [1, 3]],
                       reverse_transformer_layers_per_block=[[3, 1, 2], [0, 1, 2], [1, 1, 1]],
                       mid_block_type="UNetMidBlock2D"),
    # Vega-like: list depths, up blocks reversed, one-ResNet mid block
    "vega_like": dict(SDXL_TINY, transformer_layers_per_block=[1, 3], mid_block_type="UNetMidBlock2D"),
}
B, H, W_, T = 2, 8, 12, 5
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
GUIDANCE_EMBEDDING = diffusers.StableDiffusionXLPipeline.get_guidance_scale_embedding   # P:758 (self unused)


def guidance_embedding_f64(self, w, embedding_dim=512, dtype=torch.float64):
    """GUIDANCE_EMBEDDING with its one float32 step made float64: diffusers takes ln(10000) from
    torch.log(torch.tensor(10000.0)), a float32 tensor, whatever `dtype` is (P:780)."""
    w = w.double() * 1000.0
    half = embedding_dim // 2
    step = torch.log(torch.tensor(10000.0, dtype=torch.float64)) / (half - 1)
    emb = w[:, None] * torch.exp(torch.arange(half, dtype=torch.float64) * -step)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if embedding_dim % 2 else emb


def make_oracle(config, seed, tmp_path):
    torch.manual_seed(seed)
    model = randomize(diffusers.UNet2DConditionModel(**config), seed)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def inputs(seed):
    g = np.random.default_rng(seed)
    sample = g.standard_normal((B, 4, H, W_))
    context = g.standard_normal((B, T, 48))
    text_embeds = g.standard_normal((B, P))
    time_ids = np.array([[64, 48, 3, 5, 64, 48], [96, 32, 0, 7, 80, 40]], np.float64)   # distinct: order shows
    return sample, np.array([999, 37]), context, text_embeds, time_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(name, dtype, tmp_path, monkeypatch, record_property):
    config = CONFIGS[name]
    model = make_oracle(config, seed=11, tmp_path=tmp_path).to(dtype)
    sample, t, context, text_embeds, time_ids = inputs(seed=12)
    w = np.array([0.5, 7.0])                                       # guidance_scale - 1 for 1.5 and 8
    if dtype == torch.float64:                                     # see the module docstring
        monkeypatch.setattr(diffusers.models.embeddings, "get_timestep_embedding", timestep_embedding_f64)
    tt = lambda a: torch.tensor(a, dtype=dtype)                    # noqa: E731
    kwargs = dict(added_cond_kwargs=dict(text_embeds=tt(text_embeds), time_ids=tt(time_ids)))
    ours_kw = dict(text_embeds=text_embeds, time_ids=time_ids)
    if config.get("time_cond_proj_dim"):
        ours_kw["guidance"] = w
        if dtype == torch.float64:     # the pipeline's function (P:758) made float64 (guidance_embedding_f64)
            kwargs["timestep_cond"] = guidance_embedding_f64(None, torch.tensor(w), 16)
        else:                          # float32: both sides get mdref's embedding (test_guidance_embedding bounds it)
            kwargs["timestep_cond"] = torch.tensor(guidance_embedding(w.astype(np.float32), 16))
    hooks = {}
    for module in ("add_time_proj", "add_embedding", "time_embedding"):
        getattr(model, module).register_forward_hook(lambda m, i, o, n=module: hooks.__setitem__(n, o.numpy()))
    with torch.no_grad():
        ref = model(tt(sample), torch.tensor(t), tt(context), **kwargs).sample.numpy()

    unet = UNet.from_pretrained(tmp_path, dtype=np.float64 if dtype == torch.float64 else np.float32)
    assert unet.num_parameters() == sum(p.numel() for p in model.parameters())
    with trace() as tr:
        ours = unet(sample, t, context, **ours_kw)
    assert ours.shape == ref.shape == (B, 4, H, W_)
    tol = TOLERANCE[dtype]
    for point in ("add_time_proj", "add_embedding", "time_embedding"):
        ref_point = hooks[point].reshape(B, -1)                     # add_time_proj: [B*K, A] -> [B, K*A]
        within(f"{name} {dtype} unet.{point}", rel_err(tr[f"unet.{point}"], ref_point), tol)
    record_property("max_rel_error", within(f"{name} {dtype}: max|err|/max|ref|", rel_err(ours, ref), tol))


def test_guidance_embedding():
    """mdref.unet.guidance_embedding against diffusers' get_guidance_scale_embedding: float64 (the oracle's float32
    ln(10000) made float64) and float32 against it, each within the bound derived here with its unit roundoff u.
    Its arguments are 1000 w f_i: a frequency f_i = exp(-i s) carries the rounding of i s (~2 u relative, so
    ~2 u i s absolute) times f_i, largest at i s = 1 (f = 1/e), plus the exp and the products (~3 u):
    |d arg| <= 1000 |w| (2/e + 3) u, and sin / cos pass it on 1:1. A float32 oracle is no reference here:
    diffusers' float32 embedding lies as far from float64 as mdref's (both measured)."""
    w = np.array([0.0, 0.5, 1.5, 7.0, 14.0])                     # guidance 1 .. 15
    for dim in (16, 256, 17):
        ref = guidance_embedding_f64(None, torch.tensor(w), dim).numpy()
        within(f"guidance embedding f64 dim {dim}", np.abs(guidance_embedding(w, dim) - ref).max(),
               1000 * w.max() * (2 / np.e + 3) * U64, "derived as below, in float64")
        as_shipped = GUIDANCE_EMBEDDING(None, torch.tensor(w), dim, dtype=torch.float64).numpy()
        assert np.abs(as_shipped - ref).max() > 1e-8            # the float32 ln(10000) the oracle patch removes
        bound = 1000 * w.max() * (2 / np.e + 3) * U32
        ours = guidance_embedding(w.astype(np.float32), dim)
        assert ours.dtype == np.float32
        theirs = GUIDANCE_EMBEDDING(None, torch.tensor(w, dtype=torch.float32), dim).numpy()
        within(f"guidance embedding f32 dim {dim}", np.abs(ours - ref).max(), bound, "derived, see docstring")
        within(f"diffusers' guidance embedding f32 dim {dim}", np.abs(theirs - ref).max(), bound, "same bound")


def test_added_conditions_change_the_output_and_are_checked():
    """Each added input reaches the output (a swapped time id or another guidance changes it), and a missing,
    unexpected or mis-shaped one is a ValueError naming it."""
    unet = UNet.from_config(CONFIGS["text_time_cond_proj"], seed=3)
    sample, t, context, text_embeds, time_ids = inputs(seed=4)
    out = unet(sample, t, context, text_embeds=text_embeds, time_ids=time_ids, guidance=1.5)
    assert not np.allclose(out, unet(sample, t, context, text_embeds=text_embeds, time_ids=time_ids[:, ::-1],
                                     guidance=1.5))
    assert not np.allclose(out, unet(sample, t, context, text_embeds=text_embeds, time_ids=time_ids, guidance=0.5))
    with pytest.raises(ValueError, match="guidance is required"):
        unet(sample, t, context, text_embeds=text_embeds, time_ids=time_ids)
    with pytest.raises(ValueError, match="text_embeds is required"):
        unet(sample, t, context, time_ids=time_ids, guidance=1.5)
    with pytest.raises(ValueError, match=r"P \+ K \* 8 = 72"):
        unet(sample, t, context, text_embeds=text_embeds[:, :20], time_ids=time_ids, guidance=1.5)
    plain = UNet.from_config(dict(CONFIGS["text_time"], addition_embed_type=None, addition_time_embed_dim=None,
                                  projection_class_embeddings_input_dim=None))
    with pytest.raises(ValueError, match="time_ids is not taken"):
        plain(sample, t, context, time_ids=time_ids)


def test_ssd1b_layout_is_the_plan():
    """The stage plan of the SSD-1B-like config: per-ResNet depths down and up, one ResNet in the mid block."""
    spec = UNet.from_config(CONFIGS["ssd1b_like"]).spec
    depths = lambda st: [layer.spec.depth for layer in st.of("transformer")]   # noqa: E731
    assert [depths(st) for st in spec.down] == [[], [2, 1], [1, 3]]
    assert [depths(st) for st in spec.up] == [[3, 1, 2], [0, 1, 2], []]
    assert [layer.kind for layer in spec.mid.layers] == ["resnet"]


@pytest.mark.parametrize("name, count", [("sdxl-unet", 2_567_463_684), ("ssd-1b-unet", 1_331_334_404),
                                         ("vega-unet", 745_225_604)])
def test_full_size_presets_count_as_diffusers(name, count):
    """Parameter counts of the full-size presets equal diffusers' UNet2DConditionModel built from the same config on
    the meta device (no weights allocated); with time_cond_proj_dim 256 too (cond_proj adds 256 x 320)."""
    assert name in UNet.presets
    config = UNET_PRESETS[name]
    for extra in ({}, {"time_cond_proj_dim": 256}):
        cfg = UNetConfig.from_dict(dict(config, **extra))
        ours = UNet.param_schema(cfg)
        with torch.device("meta"):
            model = diffusers.UNet2DConditionModel.from_config(dict(config, **extra))
        theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert ours == theirs                                      # every key and shape
        assert sum(np.prod(s) for s in ours.values()) == count + (256 * 320 if extra else 0)
