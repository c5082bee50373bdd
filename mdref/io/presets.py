"""Named architectures: config dicts in the checkpoints' own keys, built with seeded weights (no file needed).

Component presets are used by ``TextEncoder.from_preset``, ``UNet.from_preset`` and ``Decoder.from_preset``; a
pipeline preset names a component preset or spells out a config dict. Parameter counts and the reasoning behind
the MobileDiffusion choices are in weights/README.md and docs/mobilediffusion_unet.md.
"""

from __future__ import annotations

__all__ = ["TEXT_ENCODER_PRESETS", "TEXT_ENCODER_WITH_PROJECTION_PRESETS", "QWEN_TEXT_PRESETS", "UNET_PRESETS",
           "DREAMLITE_UNET_PRESETS", "DECODER_PRESETS", "PIPELINE_PRESETS", "COMPONENT_SEED_OFFSET"]

TEXT_ENCODER_PRESETS = {
    # OpenAI CLIP ViT-L/14 text tower: SD-1.x's text encoder and MobileDiffusion's (123,060,480 parameters).
    "clip-vit-l-14": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          hidden_act="quick_gelu"),
    # OpenCLIP ViT-H/14 text tower as SD-2.x / SD-Turbo ship it (24 layers trained, the last one dropped).
    "openclip-vit-h-14-sd2": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                  num_attention_heads=16, hidden_act="gelu"),
}

TEXT_ENCODER_WITH_PROJECTION_PRESETS = {
    # OpenCLIP ViT-bigG/14 text tower with its projection, as SDXL's text_encoder_2/config.json states it
    # (laion/CLIP-ViT-bigG-14-laion2B-39B-b160k; 694,659,840 parameters). Its token ids are the legacy ones of
    # configs saved before transformers PR #24773: eos_token_id 2 makes the pooled token the position of the largest
    # id, which is the EOS (49407) for every prompt the CLIP tokenizers produce.
    "openclip-vit-bigg-14": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                 num_attention_heads=20, hidden_act="gelu", projection_dim=1280, bos_token_id=0,
                                 eos_token_id=2, pad_token_id=1),
}

QWEN_TEXT_PRESETS = {
    # The language model of Qwen3-VL-2B-Instruct, DreamLite's text encoder (hidden_states[-1], width 2048), with the
    # values of its config.json as published (transformers 4.57 spelling: rope_theta + rope_scaling): 1,720,574,976
    # parameters without the (tied) LM head and the vision tower; tests/test_qwen_text.py counts transformers' own.
    "qwen3-vl-2b-text": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                             max_position_embeddings=262144, rms_norm_eps=1e-6, attention_bias=False,
                             rope_parameters=dict(rope_type="default", rope_theta=5000000.0, mrope_section=[24, 20, 20],
                                                  mrope_interleaved=True)),
    # A tiny model with every feature (GQA 4 -> 2 heads, head_dim != hidden / heads) and Qwen's full vocabulary, so
    # real token ids fit: 4.9M parameters, nearly all of them the embedding. UNTRAINED.
    "qwen-text-tiny": dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
                           max_position_embeddings=4096, rms_norm_eps=1e-6,
                           rope_parameters=dict(rope_type="default", rope_theta=5000000.0)),
}

UNET_PRESETS = {
    # MobileDiffusion as mdref reads the paper (docs/architecture.md, "MobileDiffusion as mdref reads it"): 386M.
    "mobilediffusion": dict(
        sample_size=64, in_channels=8, out_channels=8,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[320, 640, 1024], layers_per_block=[2, 1, 1], transformer_layers_per_block=[0, 1, 1],
        attention_head_dim=[5, 10, 16], cross_attention_dim=768, use_linear_projection=True,
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
        transformer_kind=["none", "cross", "full"], mid_transformer_layers=16, shared_kv=True,
        attention_weighting="softmax", ff_activation="swiglu", ff_mult=3, separable_conv=[False, True, True],
        prediction_type="epsilon"),
}

DREAMLITE_UNET_PRESETS = {
    # DreamLite's UNet (carlofkl/DreamLite-{base,mobile}, unet/config.json as reported by third parties: nothing here
    # can download it): DreamLiteUNetModel's default block types, 3 levels [256, 512, 896] with 4 / 8 / 14 heads of
    # 64, transformer depth [1, 2, 4], MQA (one K/V head), q/k RMSNorm, FFN x3, separable ResNets, Qwen3-VL-2B text
    # features (2048) projected to 2304, time ids [w, h]. layers_per_block 2, linear projections and
    # addition_time_embed_dim 256 are assumptions; 389,968,388 parameters (diffusers counts the same on the meta
    # device, tests/test_dreamlite_unet.py), the paper's "0.39B".
    "dreamlite-unet": dict(
        _class_name="DreamLiteUNetModel", sample_size=128, in_channels=4, out_channels=4,
        down_block_types=["DreamLiteCrossAttnNoSelfAttnDownBlock2D", "DreamLiteCrossAttnNoSelfAttnDownBlock2D",
                          "DreamLiteCrossAttnDownBlock2D"],
        mid_block_type="DreamLiteUNetMidBlock2DCrossAttn",
        up_block_types=["DreamLiteCrossAttnUpBlock2D", "DreamLiteCrossAttnNoSelfAttnUpBlock2D", "DreamLiteUpBlock2D"],
        block_out_channels=[256, 512, 896], layers_per_block=2, transformer_layers_per_block=[1, 2, 4],
        attention_head_dim=[4, 8, 14], cross_attention_dim=2304, encoder_hid_dim=2048,
        encoder_hid_dim_type="text_proj_rms", addition_embed_type="time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=512, use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5,
        qk_norm="rms_norm", use_sep_conv=True, ff_mult=3, num_kv_heads=1, num_mid_layers=1),
}

# SDXL base 1.0's unet/config.json (stabilityai/stable-diffusion-xl-base-1.0; SDXL-Turbo, SDXL-Lightning, DMD2 and
# Hyper-SDXL share the architecture, SDXL-Turbo's states sample_size 64): 2,567,463,684 parameters. Every key as
# published, so the preset also exercises the config reader on a real file's content (upcast_attention null).
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    class_embed_type=None, class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3,
    cross_attention_dim=2048, cross_attention_norm=None,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    dual_cross_attention=False, encoder_hid_dim=None, encoder_hid_dim_type=None, flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, layers_per_block=2, mid_block_only_cross_attention=None, mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05, norm_num_groups=32, num_attention_heads=None,
    num_class_embeds=None, only_cross_attention=False, out_channels=4, projection_class_embeddings_input_dim=2816,
    resnet_out_scale_factor=1.0, resnet_skip_time_act=False, resnet_time_scale_shift="default", sample_size=128,
    time_cond_proj_dim=None, time_embedding_act_fn=None, time_embedding_dim=None, time_embedding_type="positional",
    timestep_post_act=None, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], upcast_attention=None,
    use_linear_projection=True)

UNET_PRESETS = {
    **UNET_PRESETS,
    "sdxl-unet": SDXL_UNET,
    # SSD-1B (segmind/SSD-1B, "1.3B"): SDXL with blocks removed: 1,331,334,404 parameters. Its depths are those
    # ComfyUI's model detection reads off the published weights (docs/sdxl.md); its config.json was not at hand.
    "ssd-1b-unet": dict(SDXL_UNET, transformer_layers_per_block=[1, 2, 4],
                        reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], [1, 1, 1]],
                        mid_block_type="UNetMidBlock2D"),
    # Segmind Vega ("745M"): 745,225,604 parameters; depths as SSD-1B's (same source), up blocks the reversed down.
    "vega-unet": dict(SDXL_UNET, transformer_layers_per_block=[1, 1, 2], mid_block_type="UNetMidBlock2D"),
}

DECODER_PRESETS = {
    # MobileDiffusion's pruned VAE decoder (paper: ~9.8M parameters vs SD's 49.5M): see docs/decoders.md.
    "mobilediffusion-lite": dict(kind="kl", latent_channels=8, block_out_channels=(64, 128, 256, 256),
                                 layers_per_block=1, norm_num_groups=32, scaling_factor=1.0),
    # Stable Diffusion 1.x / 2.x VAE decoder (49.5M with post_quant_conv).
    "sd-vae": dict(kind="kl", latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                   norm_num_groups=32, scaling_factor=0.18215),
    # TAESD (madebyollin/taesd) for SD 1.x / 2.x latents.
    "taesd": dict(kind="tiny", latent_channels=4, scaling_factor=1.0, shift_factor=0.0),
}

PIPELINE_PRESETS = {
    # The full-size MobileDiffusion architecture (~520M parameters).
    "mobilediffusion": dict(
        text_encoder="clip-vit-l-14", unet="mobilediffusion", decoder="mobilediffusion-lite",
        scheduler=dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                       beta_end=0.012, timestep_spacing="trailing")),
    # A few-million-parameter model with every MobileDiffusion feature, for tests and demos. UNTRAINED.
    "tiny": dict(
        text_encoder=dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        unet=dict(sample_size=8, in_channels=8, out_channels=8,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  block_out_channels=[32, 64, 64], layers_per_block=1, attention_head_dim=[2, 2, 4],
                  cross_attention_dim=64, use_linear_projection=True, norm_num_groups=8,
                  transformer_kind=["none", "cross", "full"], mid_transformer_layers=2, shared_kv=True,
                  ff_activation="swiglu", ff_mult=3, separable_conv=[False, True, True], prediction_type="sample"),
        decoder=dict(kind="kl", latent_channels=8, block_out_channels=[16, 32, 32, 32], layers_per_block=1,
                     norm_num_groups=8, scaling_factor=1.0, shift_factor=0.0),
        scheduler=dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                       timestep_spacing="trailing")),
}

# A pipeline preset built with seed s draws each component's weights from seed s + this offset, so the three
# components never share a random stream.
COMPONENT_SEED_OFFSET = {"text_encoder": 0, "unet": 1, "decoder": 2}
