"""Pipeline: end-to-end parity with diffusers' StableDiffusionPipeline (one step, EulerDiscreteScheduler trailing),
parameter counts of the presets, seeds and noise conventions."""

import numpy as np
import pytest

import mdref
from mdref import sampler
from mdref.io.presets import PIPELINE_PRESETS as PRESETS
from mdref.pipeline import Pipeline, to_pixels
from oracles import within

pytestmark = pytest.mark.numerics          # also run under other BLAS / oneDNN kernels (.ci/run)


def _preset_count(name):
    """Parameters of a pipeline preset, from the weight schemas (no weights are materialised)."""
    spec = PRESETS[name]
    total = 0
    for key, kind in (("text_encoder", mdref.TextEncoder), ("unet", mdref.UNet), ("decoder", mdref.Decoder)):
        entry = spec[key]
        config = kind.as_config(kind.presets[entry] if isinstance(entry, str) else entry, key)
        total += sum(int(np.prod(shape)) for shape in kind.param_schema(config).values())
    return total


def test_mobilediffusion_preset_is_520m():
    """docs/architecture.md: 520M parameters in total (CLIP-L text tower + 386M UNet + 9.8M decoder), within 2%."""
    n = _preset_count("mobilediffusion")
    assert abs(n - 520e6) <= 0.02 * 520e6, n


def test_tiny_preset_runs_and_is_deterministic():
    pipe = Pipeline.from_preset("tiny", seed=0)
    r1 = pipe.run("a red circle", seed=3)
    r2 = pipe.run("a red circle", seed=3)
    r3 = pipe.run("a red circle", seed=4)
    assert r1.pixels.shape == (1, 64, 64, 3) and r1.pixels.dtype == np.uint8
    np.testing.assert_array_equal(r1.image, r2.image)
    assert not np.array_equal(r1.noise, r3.noise)
    # Noise convention: PCG64(seed).standard_normal in float64, then cast.
    expected = np.random.Generator(np.random.PCG64(3)).standard_normal((1, 1, 8, 8, 8))[0].astype(np.float32)
    np.testing.assert_array_equal(r1.noise, expected)
    # A noise array overrides the seed.
    r4 = pipe.run("a red circle", seed=99, noise=r1.noise)
    np.testing.assert_array_equal(r4.image, r1.image)
    assert set(r1.timings) == {"tokenize", "text_encoder", "unet", "decoder"}


def test_pixels_convention():
    x = np.array([-1.5, -1, 0, 0.5, 1, 2], dtype=np.float32).reshape(1, 1, 1, 6).repeat(3, axis=1)
    assert to_pixels(x)[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]


def test_bad_inputs_name_the_problem():
    pipe = Pipeline.from_preset("tiny", seed=0)
    with pytest.raises(ValueError, match="multiples of 32"):
        pipe.run("x", height=48, width=64)
    with pytest.raises(ValueError, match=r"noise has shape \(1, 8, 4, 4\)"):
        pipe.run("x", noise=np.zeros((1, 8, 4, 4), np.float32))
    with pytest.raises(ValueError, match="prompt"):
        pipe.run([])
    with pytest.raises(mdref.ConfigError, match="unknown preset"):
        Pipeline.from_preset("nope")
    with pytest.raises(mdref.ConfigError, match="no such model folder"):
        Pipeline.from_pretrained("/nonexistent/model")


def test_list_of_prompts_and_few_steps():
    pipe = Pipeline.from_preset("tiny", seed=0)
    images = pipe(["a red circle", "a blue square"], seed=1, steps=2)
    assert len(images) == 2 and images[0].size == (64, 64)
    r = pipe.run("a red circle", steps=4)
    assert r.timesteps == [999, 749, 499, 249]


def test_guidance_changes_output_and_scale_one_is_identity():
    pipe = Pipeline.from_preset("tiny", seed=0)
    base = pipe.run("a red circle", seed=0)
    same = pipe.run("a red circle", seed=0, guidance_scale=1.0)
    g = pipe.run("a red circle", seed=0, guidance_scale=3.0, negative_prompt="blue")
    np.testing.assert_array_equal(base.x0, same.x0)
    assert not np.allclose(base.x0, g.x0)


# ---- end-to-end parity against diffusers --------------------------------------------------------------------------
def _randomize(module, torch, seed, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.ndim == 1:       # norm scales around 1
                p.copy_(1 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd-tiny")
    tok_dir = folder / "tok-src"
    mdref.Tokenizer.from_pretrained(None).save_pretrained(tok_dir)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
    for i, m in enumerate((text_encoder, unet, vae)):
        _randomize(m, torch, i)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="trailing")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd", safe_serialization=True)
    return folder / "sd", pipe


def test_end_to_end_matches_diffusers_one_step(sd_folder):
    """diffusers StableDiffusionPipeline(num_inference_steps=1, guidance_scale=0, latents=noise) vs mdref on the same
    folder and noise: decoded images within 1e-4 (float32) before 8-bit quantisation."""
    torch = pytest.importorskip("torch")
    folder, ref_pipe = sd_folder
    prompts = ["a large red circle on the left, blue background", "a small green triangle"]
    noise = np.random.Generator(np.random.PCG64(7)).standard_normal((2, 4, 8, 16)).astype(np.float32)
    with torch.no_grad():
        out = ref_pipe(prompts, num_inference_steps=1, guidance_scale=0.0, latents=torch.from_numpy(noise),
                       height=16, width=32, output_type="latent")
        latents = out.images
        ref_image = ref_pipe.vae.decode(latents / ref_pipe.vae.config.scaling_factor).sample.numpy()
        ref_np = ref_pipe(prompts, num_inference_steps=1, guidance_scale=0.0, latents=torch.from_numpy(noise),
                          height=16, width=32, output_type="np").images          # [B, H, W, 3] in [0, 1]
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.scheduler.sampler == "euler"
    r = pipe.run(prompts, noise=noise, height=16, width=32)
    err_latent = np.abs(r.x0 - latents.numpy()).max() / np.abs(latents.numpy()).max()
    err_image = np.abs(r.image - ref_image).max()
    ours_np = np.clip((r.image.astype(np.float64) + 1) / 2, 0, 1).transpose(0, 2, 3, 1)
    err_np = np.abs(ours_np - ref_np).max()
    print(f"e2e float32: latent rel {err_latent:.2e}, image abs {err_image:.2e}, [0,1] image abs {err_np:.2e}")
    assert np.abs(ref_image).max() > 0.1          # the random model does draw something
    within("e2e float32 image max abs", err_image, 1e-4)
    within("e2e float32 [0, 1] image max abs", err_np, 1e-4)


def test_end_to_end_float64_runs_and_is_closer(sd_folder):
    """The same folder in float64: agrees with the float32 run to float32 rounding."""
    folder, _ = sd_folder
    noise = np.random.Generator(np.random.PCG64(7)).standard_normal((1, 4, 8, 8))
    r32 = Pipeline.from_pretrained(folder).run("a red circle", noise=noise)
    r64 = Pipeline.from_pretrained(folder, dtype=np.float64).run("a red circle", noise=noise)
    assert r64.image.dtype == np.float64
    within("float32 vs float64 image max abs", np.abs(r32.image - r64.image).max(), 1e-4)


def test_default_model_loads():
    pipe = Pipeline.from_pretrained() if (mdref.pipeline.DEFAULT_MODEL_DIR / "unet").is_dir() else None
    if pipe is None:
        pytest.skip("no trained default model in weights/default yet")
    assert not pipe.untrained
    assert pipe("a large red circle on the left, blue background", seed=0).size == pipe.default_size()[::-1]


def test_sampler_is_imported_from_mdref():
    assert mdref.sampler is sampler
