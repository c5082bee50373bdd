"""Whole SDXL-family images: mdref.Pipeline on a StableDiffusionXLPipeline folder against diffusers 0.42 on the same
folder and noise, with random tiny weights built here (two towers, a "text_time" UNet, a 2-level AutoencoderKL with
SDXL's scaling 0.13025 and force_upcast), saved with save_pretrained and read back by mdref.

Cases, as the model cards drive them (docs/sdxl.md): SDXL-Turbo (EulerAncestral trailing, 1 step, guidance 0),
SDXL-Lightning (Euler trailing, prediction "sample", 1 step), an LCM-distilled UNet with time_cond_proj_dim at a custom
timestep [399] and guidance 2.5 (no CFG pass), and classifier-free guidance (guidance 5) with the negative prompt left
out (force_zeros_for_empty_prompt: zeros) and given. Batch 2, a non-square image.

Bounds, float32: the latent and the decoded image <= 1e-5 of max |reference| (the project's float32 contract, as the
UNet's: float32 rounding through a few dozen layers, both sides), the 8-bit images within one level (a value within
float32 rounding of a .5 boundary may round either way). float64: <= 1e-10 of max |x| for the latent and the decoded
image against the oracle in float64 with diffusers' float32 steps made float64 (float64_oracle says which).
"""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import mdref  # noqa: E402
from mdref.cli import main  # noqa: E402
from mdref.pipeline import Pipeline  # noqa: E402
from mdref.tokenizer import EOS  # noqa: E402
from mdref.trace import trace  # noqa: E402
from oracles import randomize, rel_err, within  # noqa: E402
from test_sampler_distilled import SDXL_BASE, SDXL_TURBO, float64_step  # noqa: E402
from test_text_encoder_sdxl import BIG_G, CLIP_L, write_sdxl_tokenizer  # noqa: E402
from test_unet import timestep_embedding_f64  # noqa: E402
from test_unet_sdxl import guidance_embedding_f64  # noqa: E402

pytestmark = pytest.mark.numerics

PROMPTS = ["a photo of a cat!", "an astronaut riding a horse"]
HEIGHT, WIDTH = 32, 24                                   # latent 16 x 12 (VAE x2)
CONTEXT, POOLED, A = CLIP_L["hidden_size"] + BIG_G["hidden_size"], BIG_G["projection_dim"], 8
UNET = dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 2], attention_head_dim=[2, 4], cross_attention_dim=CONTEXT,
            addition_embed_type="text_time", addition_time_embed_dim=A,
            projection_class_embeddings_input_dim=POOLED + 6 * A, use_linear_projection=True, norm_num_groups=8)


VAE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
           norm_num_groups=8, scaling_factor=0.13025, force_upcast=True)
STATS = ([0.1, -0.2, 0.3, 0.05], [0.9, 1.1, 0.7, 1.3])       # Playground-v2.5-style per-channel latent statistics


def scheduler(name):
    base = {k: v for k, v in SDXL_BASE.items() if k != "_class_name"}
    if name == "turbo":
        return diffusers.EulerAncestralDiscreteScheduler.from_config(
            {k: v for k, v in SDXL_TURBO.items() if k != "_class_name"})
    if name == "lightning":
        return diffusers.EulerDiscreteScheduler.from_config(base, timestep_spacing="trailing", prediction_type="sample")
    if name == "lcm":
        return diffusers.LCMScheduler.from_config(base)
    return diffusers.EulerDiscreteScheduler.from_config(base, timestep_spacing="trailing")       # "cfg"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-parts")
    write_sdxl_tokenizer(root / "tokenizer", EOS)
    write_sdxl_tokenizer(root / "tokenizer_2", "!")
    torch.manual_seed(0)
    return dict(
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
        text_encoder=randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L)), 0),
        text_encoder_2=randomize(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            **BIG_G, bos_token_id=0, eos_token_id=2, pad_token_id=1)), 1),
        vae=randomize(diffusers.AutoencoderKL(**VAE), 2),
        vae_stats=randomize(diffusers.AutoencoderKL(**VAE, latents_mean=STATS[0], latents_std=STATS[1]), 2),
        vae_tiny=randomize(diffusers.AutoencoderTiny(
            encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
            num_decoder_blocks=(1, 2), latent_channels=4), 5),
        unet=randomize(diffusers.UNet2DConditionModel(**UNET), 3),
        unet_lcm=randomize(diffusers.UNet2DConditionModel(**UNET, time_cond_proj_dim=16), 4))


def folder_for(parts, case, tmp_path):
    """A StableDiffusionXLPipeline for `case` (the watermarker off: it would change the image) and its folder."""
    kw = {k: v for k, v in parts.items() if k not in ("unet_lcm", "vae_stats", "vae_tiny")}
    if case == "lcm":
        kw["unet"] = parts["unet_lcm"]
    if case in ("stats", "taesdxl"):
        kw["vae"] = parts["vae_stats" if case == "stats" else "vae_tiny"]
    pipe = diffusers.StableDiffusionXLPipeline(**kw, scheduler=scheduler(case), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / case, safe_serialization=True)
    return pipe, tmp_path / case


CASES = {   # name: (diffusers call arguments, mdref run arguments)
    "turbo": (dict(num_inference_steps=1, guidance_scale=0.0), dict()),
    "lightning": (dict(num_inference_steps=1, guidance_scale=0.0), dict()),
    "lcm": (dict(timesteps=[399], guidance_scale=2.5), dict(timesteps=[399], guidance_scale=2.5)),
    "cfg": (dict(num_inference_steps=1, guidance_scale=5.0), dict(guidance_scale=5.0)),
    "cfg_negative": (dict(num_inference_steps=1, guidance_scale=5.0, negative_prompt="a blurry photo!"),
                     dict(guidance_scale=5.0, negative_prompt="a blurry photo!")),
    "stats": (dict(num_inference_steps=1, guidance_scale=0.0), dict()),              # VAE latents_mean / std
    "taesdxl": (dict(num_inference_steps=1, guidance_scale=0.0), dict()),            # AutoencoderTiny, scale 1.0
}
SAMPLER = {"turbo": "euler_ancestral", "lightning": "euler", "lcm": "lcm", "cfg": "euler", "cfg_negative": "euler",
           "stats": "euler", "taesdxl": "euler"}


@pytest.mark.parametrize("case", list(CASES))
def test_sdxl_image_matches_diffusers(parts, case, tmp_path):
    theirs_kw, ours_kw = CASES[case]
    ref_pipe, folder = folder_for(parts, case.removesuffix("_negative"), tmp_path)
    noise = np.random.Generator(np.random.PCG64(7)).standard_normal((2, 4, HEIGHT // 2, WIDTH // 2))
    noise = noise.astype(np.float32)
    call = dict(prompt=PROMPTS, latents=torch.from_numpy(noise), height=HEIGHT, width=WIDTH, **theirs_kw)
    with torch.no_grad():
        latents = ref_pipe(**call, output_type="latent").images.numpy()
        z = torch.from_numpy(latents)
        if case == "stats":                                                  # P:1276-1287
            z = z * torch.tensor(STATS[1]).view(1, 4, 1, 1) / 0.13025 + torch.tensor(STATS[0]).view(1, 4, 1, 1)
        elif case != "taesdxl":                                              # TAESDXL: scaling_factor 1.0
            z = z / 0.13025
        ref_image = ref_pipe.vae.decode(z).sample.numpy()
        ref_np = ref_pipe(**call, output_type="np").images                  # [B, H, W, 3] in [0, 1], float32
        (_, _, pooled, neg_pooled) = ref_pipe.encode_prompt(
            PROMPTS, do_classifier_free_guidance=True, negative_prompt=theirs_kw.get("negative_prompt"))

    pipe = Pipeline.from_pretrained(folder)
    assert pipe.scheduler.sampler == SAMPLER[case]
    assert pipe.force_zeros_for_empty_prompt is True and pipe.default_size() == (16, 16)
    with trace() as tr:
        r = pipe.run(PROMPTS, noise=noise, height=HEIGHT, width=WIDTH, **ours_kw)
    assert np.abs(ref_image).max() > 0.1                                     # the random model does draw something
    within(f"sdxl {case} pooled text_embeds", rel_err(r.pooled_text_embeddings, pooled.numpy()), 1e-5)
    np.testing.assert_array_equal(tr["text_embeds"], r.pooled_text_embeddings)
    np.testing.assert_array_equal(tr["time_ids"], [[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]] * 2)
    if case == "cfg":                                                        # left out: zeros, as diffusers'
        assert not tr["negative_text_embeds"].any() and not tr["negative_text_embeddings"].any()
        assert not neg_pooled.any()
    if case == "cfg_negative":                                               # given: its encoding
        within(f"sdxl {case} negative pooled", rel_err(tr["negative_text_embeds"], neg_pooled.numpy()), 1e-5)
    within(f"sdxl {case} latent", rel_err(r.x0, latents), 1e-5)
    within(f"sdxl {case} image", rel_err(r.image, ref_image), 1e-5)
    theirs8 = np.round(ref_np.astype(np.float64) * 255)
    levels = np.abs(r.pixels.astype(np.float64) - theirs8)
    assert levels.max() <= 1, f"8-bit images differ by {levels.max()} levels"
    print(f"sdxl {case}: {int((levels > 0).sum())} of {levels.size} 8-bit values differ by one level")


def test_latent_statistics_are_checked():
    """latents_mean / latents_std: both or neither, latent_channels finite numbers each, a std never 0; they survive
    save_pretrained (diffusers' keys)."""
    from mdref.io import ConfigError
    from mdref.io.decoder_config import config_from_diffusers
    base = {"_class_name": "AutoencoderKL", "block_out_channels": [16, 32], "norm_num_groups": 8}
    ok = config_from_diffusers({**base, "latents_mean": STATS[0], "latents_std": STATS[1]})
    assert ok.latents_std == tuple(STATS[1]) and ok.to_dict()["latents_mean"] == STATS[0]
    for bad, match in (({"latents_mean": STATS[0]}, "set together"),
                       ({"latents_mean": STATS[0][:3], "latents_std": STATS[1][:3]}, "latents_mean"),
                       ({"latents_mean": STATS[0], "latents_std": [1.0, 0.0, 1.0, 1.0]}, r"latents_std\[1\]")):
        with pytest.raises(ConfigError, match=match):
            config_from_diffusers({**base, **bad})


def test_sdxl_folder_facts(parts, tmp_path, capsys):
    """The folder's second tower counts in num_parameters, `mdref info`'s facts name the added conditioning, and a
    folder with text_encoder_2/ but no tokenizer_2/ is refused by name."""
    _, folder = folder_for(parts, "lcm", tmp_path)
    pipe = Pipeline.from_pretrained(folder)
    n = pipe.num_parameters()
    assert n["text_encoder_2"] == sum(p.numel() for p in parts["text_encoder_2"].parameters())
    assert n["unet"] == sum(p.numel() for p in parts["unet_lcm"].parameters())
    assert main(["info", "--model", str(folder)]) == 0                       # mdref info prints describe()
    facts = json.loads(capsys.readouterr().out)
    assert facts["conditioning"] == {
        "text_encoders": ["text_encoder", "text_encoder_2"], "addition_embed_type": "text_time",
        "addition_time_embed_dim": A, "time_cond_proj_dim": 16, "force_zeros_for_empty_prompt": True}
    assert facts["parameters"]["text_encoder_2"] == n["text_encoder_2"] and facts["image_size"] == [16, 16]
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(mdref.ConfigError, match="tokenizer_2"):
        Pipeline.from_pretrained(folder)


def float64_oracle(folder, monkeypatch):
    """StableDiffusionXLPipeline read from `folder` in float64, with the float32 steps of docs/sdxl.md ("float64:
    what diffusers keeps in float32") made float64, each patch as tests/test_sampler_distilled.py and
    tests/test_unet_sdxl.py make it: the timestep / time-id sinusoids, the guidance embedding's ln(10000), the
    Euler steps' cast of the latent to float32 (float64_step), their float32 sigma table (recomputed from the widened
    alphas_cumprod after set_timesteps), LCM's float32 sqrt(abar) and boundary scalings."""
    monkeypatch.setattr(diffusers.models.embeddings, "get_timestep_embedding", timestep_embedding_f64)
    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "get_guidance_scale_embedding", guidance_embedding_f64)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float64, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    cls = type(ref.scheduler)
    euler = cls in (diffusers.EulerDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler)
    sched = (float64_step(cls) if euler else cls).from_config(ref.scheduler.config)
    abar = sched.alphas_cumprod.double()
    if euler:
        set_timesteps = sched.set_timesteps

        def widened(*args, **kwargs):
            set_timesteps(*args, **kwargs)
            sigmas = ((1 - abar) / abar) ** 0.5
            sched.sigmas = torch.cat([sigmas[sched.timesteps.long()], torch.zeros(1, dtype=torch.float64)])
        sched.set_timesteps = widened
    else:
        sched.alphas_cumprod = abar
        scalings = sched.get_scalings_for_boundary_condition_discrete
        sched.get_scalings_for_boundary_condition_discrete = lambda t: scalings(t.double())
    ref.scheduler = sched
    return ref


@pytest.mark.parametrize("case", ["turbo", "lightning", "lcm", "cfg"])
def test_sdxl_image_matches_diffusers_float64(parts, case, tmp_path, monkeypatch):
    """float64 end to end against the float64-patched oracle: latent and decoded image <= 1e-10 of max |x|."""
    theirs_kw, ours_kw = CASES[case]
    _, folder = folder_for(parts, case, tmp_path)
    ref = float64_oracle(folder, monkeypatch)
    noise = np.random.Generator(np.random.PCG64(7)).standard_normal((2, 4, HEIGHT // 2, WIDTH // 2))
    with torch.no_grad():
        latents = ref(prompt=PROMPTS, latents=torch.from_numpy(noise), height=HEIGHT, width=WIDTH,
                      output_type="latent", **theirs_kw).images
        assert latents.dtype == torch.float64
        ref_image = ref.vae.decode(latents / 0.13025).sample.numpy()
    r = Pipeline.from_pretrained(folder, dtype=np.float64).run(PROMPTS, noise=noise, height=HEIGHT, width=WIDTH,
                                                               **ours_kw)
    assert r.x0.dtype == r.image.dtype == np.float64
    within(f"sdxl {case} float64 latent", rel_err(r.x0, latents.numpy()), 1e-10)
    within(f"sdxl {case} float64 image", rel_err(r.image, ref_image), 1e-10)


def test_sdxl_folder_through_trace_compare_and_explain(parts, tmp_path, capsys):
    """mdref trace / compare (with --local, which replays the run under teacher forcing) / explain work on an SDXL
    folder, across the new points; every point the run records is explained by some layer function."""
    from mdref.explain import computed_by
    _, folder = folder_for(parts, "lcm", tmp_path)
    a, b, page = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "page.html"
    for out, seed in ((a, 1), (b, 1)):
        assert main(["trace", "a cat!", "--guidance", "2.5", "--seed", str(seed), "-o", str(out),
                     "--model", str(folder)]) == 0
    assert main(["compare", str(a), str(b), "--json", "--local", "--model", str(folder)]) == 0
    report = json.loads(capsys.readouterr().out)
    names = {p["name"] for p in report["points"]}
    assert {"tokens_2", "text_embeds", "time_ids", "unet.add_time_proj", "unet.add_embedding",
            "text_encoder_2.text_projection", "text_encoder_2.encoder.layers.1"} <= names, sorted(names)[:20]
    assert [n for n in names if computed_by(n) is None] == []
    assert main(["explain", "a cat!", "-o", str(page), "--model", str(folder)]) == 0
    assert "unet.add_embedding" in page.read_text()
