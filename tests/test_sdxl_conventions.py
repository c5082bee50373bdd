"""The diffusers facts docs/sdxl.md states for the SDXL UNet and pipeline parts, checked on the installed diffusers:
if an upgrade changes one of them, this fails and the page (and mdref) must follow. The full-size UNets are built on
the meta device (shapes only, no 10 GB allocation)."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from oracles import U32, within  # noqa: E402

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32)
LAYOUTS = {   # docs/sdxl.md, "Layouts": name -> (changes to SDXL base, parameters)
    "sdxl": ({}, 2_567_463_684),
    "sdxl+time_cond_proj": (dict(time_cond_proj_dim=256), 2_567_545_604),
    "ssd-1b": (dict(transformer_layers_per_block=[1, 2, 4], mid_block_type="UNetMidBlock2D",
                    reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [1, 1, 1]]), 1_331_334_404),
    "vega": (dict(transformer_layers_per_block=[1, 1, 2], mid_block_type="UNetMidBlock2D"), 745_225_604),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_full_size_unet_layouts(name):
    changes, count = LAYOUTS[name]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**{**SDXL_UNET, **changes})
    n = sum(p.numel() for p in unet.parameters())
    print(f"\n[sdxl] {name}: {n:,} parameters")
    assert n == count
    assert tuple(unet.add_embedding.linear_1.weight.shape) == (1280, 2816)
    heads = [a.transformer_blocks[0].attn1.heads for b in unet.down_blocks for a in getattr(b, "attentions", [])]
    assert set(heads) == {10, 20}                      # attention_head_dim lists the number of heads: 64 wide each
    if name in ("ssd-1b", "vega"):
        assert len(unet.mid_block.resnets) == 1 and not unet.mid_block.attentions
    if name == "ssd-1b":
        depths = [len(a.transformer_blocks) for b in unet.up_blocks for a in getattr(b, "attentions", [])]
        assert depths == [4, 4, 10, 2, 1, 1]


def test_time_ids_guidance_embedding_and_cfg_rule():
    """[h, w, top, left, h, w]; the guidance embedding's formula (w - 1 scaled by 1000, divisor half - 1, sin then
    cos); no CFG pass with time_cond_proj_dim even for guidance_scale > 1."""
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D",
        "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=48,
        attention_head_dim=[2, 4], addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8, norm_num_groups=8, time_cond_proj_dim=16)
    pipe = diffusers.StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                               tokenizer_2=None, unet=unet, scheduler=None, add_watermarker=False)
    ids = pipe._get_add_time_ids((64, 48), (3, 5), (32, 16), dtype=torch.float32, text_encoder_projection_dim=24)
    assert ids.tolist() == [[64.0, 48.0, 3.0, 5.0, 32.0, 16.0]]
    w = np.array([0.0, 0.5, 7.0])
    emb = pipe.get_guidance_scale_embedding(torch.tensor(w, dtype=torch.float32), embedding_dim=16).numpy()
    freqs = np.exp(-np.arange(8) * math.log(10000) / 7)
    expected = np.concatenate([np.sin(1000 * w[:, None] * freqs), np.cos(1000 * w[:, None] * freqs)], axis=1)
    # float32 arguments up to 7000 rad: the frequency ln(10000) / 7 (u32), times i (u32), through exp (<= 1 ulp,
    # 2 u32), times 1000 w (u32) errs by <= 5 u32 relative: sin / cos move by <= 5 u32 x 7000 = 2.1e-3.
    within("guidance embedding vs its formula (float32 arguments)", np.abs(emb - expected).max(), 5 * U32 * 7000)
    pipe._guidance_scale = 5.0
    assert not pipe.do_classifier_free_guidance
    assert pipe.default_sample_size * pipe.vae_scale_factor == 64        # sample_size 8 x 8 (no VAE: factor 8)
