"""mdref.DreamLiteUNet against diffusers' DreamLiteUNetModel built here with random weights (offline, small sizes).

Every block kind is in the configs below: down blocks with and without self-attention ("replace": the hidden state
becomes norm1(x)) and plain ones, the same for the up blocks, a mid block of two (transformer, ResNet) pairs; MQA
(one K/V head) and GQA (2 K/V heads for 4 query heads); q/k RMSNorm on and off; separable ResNets widening to 2x
and plain ones; a padded text mask; the in-context width concatenation (a latent twice as wide as high, right half
zeros). Whole output tensors, batch 2, two timesteps: float32 <= 1e-5 relative (max|a-b| / max|b|), float64 <=
1e-10. The full-size preset's parameter count is checked against diffusers built on the meta device.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.models.unets.unet_dreamlite import DreamLiteUNetModel  # noqa: E402

from mdref.io import ConfigError, DreamLiteUNet, DreamLiteUNetConfig, UNet  # noqa: E402
from mdref.io.presets import DREAMLITE_UNET_PRESETS  # noqa: E402
from mdref.trace import trace  # noqa: E402
from oracles import randomize, rel_err, within  # noqa: E402
from test_unet import timestep_embedding_f64  # noqa: E402

pytestmark = pytest.mark.numerics

NOSELF_DOWN, CA_DOWN, DOWN = ("DreamLiteCrossAttnNoSelfAttnDownBlock2D", "DreamLiteCrossAttnDownBlock2D",
                              "DreamLiteDownBlock2D")
NOSELF_UP, CA_UP, UP = "DreamLiteCrossAttnNoSelfAttnUpBlock2D", "DreamLiteCrossAttnUpBlock2D", "DreamLiteUpBlock2D"
COMMON = dict(encoder_hid_dim=24, encoder_hid_dim_type="text_proj_rms", addition_embed_type="time",
              addition_time_embed_dim=8, projection_class_embeddings_input_dim=16, norm_num_groups=8)
CONFIGS = {
    # DreamLite's own layout (the class defaults' block types), shrunk: MQA, q/k RMSNorm, separable 2x ResNets,
    # FFN x3, linear projections, a mid block of two (transformer, ResNet) pairs.
    "dreamlite": dict(COMMON, block_out_channels=[16, 32, 48], layers_per_block=1,
                      transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 2, 4], cross_attention_dim=32,
                      use_linear_projection=True, ff_mult=3, num_kv_heads=1, num_mid_layers=2),
    # Other block types and options: a plain down block, no-self-attention blocks on the inner levels, GQA 4 -> 2,
    # no q/k norm, ordinary ResNets, conv projections, the aliases DreamLite's configs use for two block types,
    # only_cross_attention on the innermost level.
    "variant": dict(COMMON, block_out_channels=[16, 32, 32],
                    down_block_types=[DOWN, "CrossAttnDownRemoveSelfAttnBlock2D", CA_DOWN],
                    up_block_types=[CA_UP, "CrossAttnUpRemoveSelfAttnBlock2DV1", UP], layers_per_block=[1, 2, 1],
                    transformer_layers_per_block=1, attention_head_dim=4, cross_attention_dim=16, qk_norm=None,
                    use_sep_conv=False, ff_mult=2, num_kv_heads=2, freq_shift=1, flip_sin_to_cos=False,
                    only_cross_attention=[False, False, True]),  # attn1 over the text: diffusers gives it no mask
}
B, h, w, T = 2, 8, 8, 6
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def rms_norm_in_input_dtype(self, x):
    """diffusers RMSNorm.forward (CPU path) with the mean square in x's dtype: diffusers takes it in float32 whatever
    the dtype, so its float64 model is not float64 end to end; mdref's float64 mode is."""
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    x = x * self.weight if self.weight is not None else x
    return x + self.bias if getattr(self, "bias", None) is not None else x


def float64_oracle(monkeypatch):
    monkeypatch.setattr(diffusers.models.embeddings, "get_timestep_embedding", timestep_embedding_f64)
    monkeypatch.setattr(diffusers.models.normalization.RMSNorm, "forward", rms_norm_in_input_dtype)


def make_oracle(config, seed, path):
    torch.manual_seed(seed)
    model = DreamLiteUNetModel(**config).eval()
    randomize(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    return model


def inputs(config, seed):
    """In-context input: the latent [B, 4, h, w] concatenated on the width with zeros; text features with the last
    two positions of row 1 padded (zero vectors, mask 0); time ids [w, h] of the image."""
    g = np.random.default_rng(seed)
    latent = g.standard_normal((B, 4, h, w))
    sample = np.concatenate([latent, np.zeros_like(latent)], axis=3)             # [B, 4, h, 2w]
    context = g.standard_normal((B, T, config["encoder_hid_dim"]))
    mask = np.ones((B, T), np.int64)
    mask[1, -2:] = 0
    context[1, -2:] = 0
    return sample, np.array([999.0, 250.0]), context, mask, np.array([[8.0 * w, 8.0 * h]] * B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_diffusers(name, dtype, tmp_path, monkeypatch):
    config = CONFIGS[name]
    model = make_oracle(config, seed=1, path=tmp_path).to(dtype)
    sample, t, context, mask, ids = inputs(config, seed=2)
    if dtype == torch.float64:
        float64_oracle(monkeypatch)
    with torch.no_grad():
        ref = model(torch.tensor(sample, dtype=dtype), torch.tensor(t, dtype=dtype),
                    torch.tensor(context, dtype=dtype), encoder_attention_mask=torch.tensor(mask),
                    added_cond_kwargs={"time_ids": torch.tensor(ids, dtype=dtype)}).sample.numpy()

    unet = UNet.from_pretrained(tmp_path, dtype=np.float64 if dtype == torch.float64 else np.float32)
    assert isinstance(unet, DreamLiteUNet)
    assert unet.num_parameters() == sum(p.numel() for p in model.parameters())
    ours = unet(sample, t, context, encoder_attention_mask=mask, time_ids=ids)
    assert ours.shape == ref.shape == sample.shape
    within(f"DreamLite UNet {name} {dtype}", rel_err(ours, ref), TOLERANCE[dtype])
    # the output cropped to the left half (what the pipeline keeps) agrees as well
    within(f"DreamLite UNet {name} {dtype}, left half", rel_err(ours[..., :w], ref[..., :w]), TOLERANCE[dtype])


def test_the_mask_and_the_trap_change_the_output(tmp_path, monkeypatch):
    """The mask matters (a padded position's bias is -10000, not 0), and a "replace" block is not a skipped attn1:
    running the no-self-attention blocks as MobileDiffusion's "cross" blocks (residual kept) moves the output."""
    config = CONFIGS["dreamlite"]
    make_oracle(config, seed=3, path=tmp_path)
    unet = UNet.from_pretrained(tmp_path, dtype=np.float64)
    sample, t, context, mask, ids = inputs(config, seed=4)
    context[1, -2:] = 1.0                                                          # padded positions not zero
    out = unet(sample, t, context, encoder_attention_mask=mask, time_ids=ids)
    assert rel_err(unet(sample, t, context, time_ids=ids), out) > 1e-3
    assert rel_err(unet(sample[1:], t[1:], context[1:, :-2], time_ids=ids[1:]), out[1:]) < 1e-12   # row 1: 2 padded
    kinds = {layer.spec.kind for st in unet.spec.stages for layer in st.of("transformer")}
    assert kinds == {"replace", "full"}
    from mdref import ops
    import mdref.dreamlite_unet as unet_math
    right = unet_math.dreamlite_transformer_block

    def skipped_attn1(x, context, *, norm1, norm2, attn2, norm3, ff, attn1=None, spec, bias):
        """The trap: a no-self-attention block read as "skip attn1, keep the residual stream"."""
        if spec.kind == "full":
            return right(x, context, norm1=norm1, norm2=norm2, attn2=attn2, norm3=norm3, ff=ff, attn1=attn1,
                         spec=spec, bias=bias)
        kw = dict(heads=spec.heads, kv_heads=spec.kv_heads, qk_norm_eps=spec.qk_norm_eps, bias=bias)
        x = x + unet_math.mqa_attention(ops.layer_norm(x, norm2, spec.layer_norm_eps), context, **attn2, **kw)
        return x + unet_math.feed_forward(ops.layer_norm(x, norm3, spec.layer_norm_eps), **ff,
                                          activation=spec.ff_activation)

    monkeypatch.setattr(unet_math, "dreamlite_transformer_block", skipped_attn1)
    assert rel_err(unet(sample, t, context, encoder_attention_mask=mask, time_ids=ids), out) > 1e-3
    monkeypatch.undo()
    with trace() as tr:
        unet(sample, t, context, encoder_attention_mask=mask, time_ids=ids)
    block = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    for point in ["unet.time_embedding", "unet.add_embedding", "unet.encoder_hid_proj", f"{block}.norm1",
                  f"{block}.attn2", f"{block}.ff", "unet.mid_block.attentions.1", "unet.mid_block.resnets.2",
                  "unet.up_blocks.1.attentions.0.transformer_blocks.0.norm1", "unet.out"]:
        assert point in tr, point


def test_full_size_preset_parameter_count():
    """The preset's count equals diffusers' DreamLiteUNetModel built from the same config on the meta device."""
    config = {k: v for k, v in DREAMLITE_UNET_PRESETS["dreamlite-unet"].items() if not k.startswith("_")}
    with torch.device("meta"):
        model = DreamLiteUNetModel(**config)
    expected = sum(p.numel() for p in model.parameters())
    assert DreamLiteUNet.param_schema(DreamLiteUNetConfig.from_dict(config)) is not None
    from mdref.io.schema import num_parameters
    assert num_parameters(DreamLiteUNet.param_schema(DreamLiteUNetConfig.from_dict(config))) == expected
    assert expected == 389_968_388
    assert "dreamlite-unet" in UNet.presets


@pytest.mark.parametrize("key, value", [("encoder_hid_dim_type", "text_proj"), ("addition_embed_type", "text_time"),
                                        ("qk_norm", "layer_norm"), ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 3),
                                        ("num_kv_heads", 3), ("projection_class_embeddings_input_dim", 32)])
def test_unsupported_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key.split("_")[0]):
        DreamLiteUNetConfig.from_dict(dict(CONFIGS["dreamlite"], **{key: value}))


def test_bad_inputs_name_the_argument():
    unet = DreamLiteUNet.from_config(CONFIGS["dreamlite"])
    sample, context, ids = np.zeros((2, 4, 8, 16)), np.zeros((2, T, 24)), np.ones((2, 2))
    with pytest.raises(ValueError, match="time_ids"):
        unet(sample, 1, context)
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        unet(sample, 1, context, encoder_attention_mask=np.ones((2, T + 1)), time_ids=ids)
    with pytest.raises(ValueError, match=r"context must be \[B=2, T, 24\]"):
        unet(sample, 1, np.zeros((2, T, 32)), time_ids=ids)
