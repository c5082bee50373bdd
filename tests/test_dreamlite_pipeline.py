"""Whole images: mdref.Pipeline.from_pretrained(folder) against diffusers' DreamLiteMobilePipeline, same folder.

The folder is a DreamLiteMobilePipeline built here from tiny random parts and written by save_pretrained: the Qwen
tokenizer and Qwen3-VL text model of tests/qwen_oracles.py, a small DreamLiteUNetModel with every DreamLite feature
(test_dreamlite_unet.CONFIGS["dreamlite"], text width 64), a random AutoencoderTiny (TAESDXL's layout, narrow) and
FlowMatchEulerDiscreteScheduler with DreamLite's settings. DreamLiteMobilePipeline takes no latents=, so its
prepare_latents is patched to return the test's noise. 4 steps, a 64 x 128 image (latent 8 x 16, the UNet sees
8 x 32). Images in [0, 1] compared whole: float32 <= 1e-5 relative, float64 <= 1e-10 (the oracle patched where it
computes in float32 whatever the dtype: Qwen's RMSNorm and RoPE, diffusers' RMSNorm, the timestep sinusoids and
the scheduler step's cast); 8-bit images within one level.
"""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers.models.unets.unet_dreamlite import DreamLiteUNetModel  # noqa: E402
from qwen_oracles import TEXT_CONFIG, float64_exact, qwen_tokenizer_folder, qwen_vl_model  # noqa: E402
from test_dreamlite_unet import CONFIGS, float64_oracle  # noqa: E402
from test_flow_sampler import DREAMLITE, FLOAT64_STEP  # noqa: E402

import mdref  # noqa: E402
import mdref.cli  # noqa: E402
from mdref.dreamlite import DreamLitePipeline  # noqa: E402
from mdref.formats.safetensors import read_safetensors, write_safetensors  # noqa: E402
from mdref.trace import trace  # noqa: E402
from oracles import randomize, rel_err, within  # noqa: E402

TOL = {np.float32: 1e-5, np.float64: 1e-10}
C, h, w = 4, 8, 16
PROMPT = "a red cube on a blue table, studio light"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A DreamLiteMobilePipeline folder with random weights (save_pretrained)."""
    from diffusers.pipelines.dreamlite import DreamLiteMobilePipeline
    root = tmp_path_factory.mktemp("dreamlite_pipe")
    qwen_tokenizer_folder(root / "tok")
    torch.manual_seed(0)
    unet = randomize(DreamLiteUNetModel(**dict(CONFIGS["dreamlite"], encoder_hid_dim=TEXT_CONFIG["hidden_size"])), 5)
    vae = randomize(diffusers.AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                                              num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4,
                                              latent_channels=C), 6)
    pipe = DreamLiteMobilePipeline(text_encoder=qwen_vl_model(seed=11), tokenizer=transformers.AutoTokenizer.
                                   from_pretrained(root / "tok"), processor=None, vae=vae, unet=unet,
                                   scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**DREAMLITE))
    pipe.save_pretrained(root / "pipe")
    from diffusers.pipelines.dreamlite import DreamLitePipeline as Base
    Base(**pipe.components).save_pretrained(root / "base")         # the base model's pipeline, same parts
    return root / "pipe"


def reference(folder, dtype, noise, monkeypatch, **kwargs):
    from diffusers.pipelines.dreamlite import DreamLiteMobilePipeline, DreamLitePipeline
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    cls = DreamLitePipeline if folder.name == "base" else DreamLiteMobilePipeline
    # a saved DreamLite pipeline does not load back without processor= (it saved processor=None as nothing)
    pipe = cls.from_pretrained(folder, dtype=torch_dtype, processor=None)
    monkeypatch.setattr(pipe, "prepare_latents", lambda *a, **k: torch.from_numpy(noise.copy()))
    # output_type "pt": "np" casts the image to float32 (image_processor.pt_to_numpy calls .float())
    out = pipe(PROMPT, height=h * 8, width=w * 8, num_inference_steps=4, output_type="pt", **kwargs).images
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("kind", ["mobile", "base"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_images_match_the_pipeline(folder, dtype, kind, monkeypatch):
    """mobile: DreamLiteMobilePipeline, 4 steps; base: DreamLitePipeline with its guidance 3.5 on the padded batch
    [negative "", prompt] (the mask hides the negative row's padding), 4 steps instead of its 30 (time)."""
    folder = folder if kind == "mobile" else folder.parent / "base"
    # Guided float32 is judged against the float64 oracle: guidance 3.5 amplifies float32 rounding (this random
    # model, 4 steps: diffusers' own float32 is 4.9e-6 from float64, mdref's 6.8e-6, the two 4.6e-6 .. 9.2e-6
    # apart under the default / Haswell / AVX2 / one-thread kernels), so float32 against float32 would leave no
    # margin under the same 1e-5.
    oracle = np.float64 if kind == "base" else dtype
    if oracle == np.float64:
        float64_exact(monkeypatch)
        float64_oracle(monkeypatch)
        monkeypatch.setattr(diffusers.FlowMatchEulerDiscreteScheduler, "step", FLOAT64_STEP)
    noise = np.random.default_rng(1).standard_normal((1, C, h, w))
    ref = reference(folder, oracle, noise.astype(oracle), monkeypatch)                 # [1, H, W, 3] in [0, 1]
    noise = noise.astype(dtype)
    pipe = mdref.Pipeline.from_pretrained(folder, dtype=dtype)
    assert isinstance(pipe, DreamLitePipeline) and pipe.guided == (kind == "base")
    result = pipe.run(PROMPT, noise=noise, height=h * 8, width=w * 8, steps=4)
    ours = np.clip(result.image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    within(f"DreamLite {kind} image {np.dtype(dtype).name} vs diffusers {np.dtype(oracle).name}", rel_err(ours, ref),
           TOL[dtype])
    pixels = np.round(ref * 255).astype(np.int64)
    assert np.abs(result.pixels.astype(np.int64) - pixels).max() <= 1


def test_text_embeddings_as_an_array_and_traces(folder, tmp_path, capsys):
    """The text features given as an array draw the same image as the prompt's; traces of two runs compare
    (mdref.compare) with every point equal, and the UNet's points sit under parameter paths."""
    pipe = mdref.Pipeline.from_pretrained(folder)
    context, mask, _ = pipe.text_features([PROMPT])
    with trace() as a:
        one = pipe.run(PROMPT, seed=3, height=64, width=128)
    with trace() as b:
        two = pipe.run(PROMPT, seed=3, height=64, width=128, text_embeddings=context, text_mask=mask)
    np.testing.assert_array_equal(one.image, two.image)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.norm1" in a and "unet.encoder_hid_proj" in a
    report = mdref.compare(a, b, points=["unet.*", "latents.x0", "image"])
    assert report.ok and report.points
    size = ["--model", str(folder), "--height", "64", "--width", "128"]
    for name, dtype in (("a", "float32"), ("b", "float16")):               # traces with manifests (the prompt)
        assert mdref.cli.main(["trace", PROMPT, *size, "--dtype", dtype, "-o", str(tmp_path / f"{name}.st")]) == 0
    capsys.readouterr()
    assert mdref.cli.main(["compare", str(tmp_path / "a.st"), str(tmp_path / "b.st"), "--local", "--model",
                           str(folder)]) == 0
    out = capsys.readouterr().out
    assert "first local divergence: none" in out and "unet.down_blocks.0.attentions.0.transformer_blocks.0.norm1" in out
    np.save(tmp_path / "ctx.npy", context)
    code = mdref.cli.main(["generate", PROMPT, "--model", str(folder), "--height", "64", "--width", "128",
                           "--text-embeddings", str(tmp_path / "ctx.npy"), "-o", str(tmp_path / "x.png")])
    assert code == 0 and (tmp_path / "x.png").is_file()
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DreamLiteMobilePipeline"


def test_bad_arguments_name_themselves(folder):
    pipe = mdref.Pipeline.from_pretrained(folder)
    with pytest.raises(mdref.pipeline.InputError, match="guidance_scale"):
        pipe.run(PROMPT, guidance_scale=3.5)
    with pytest.raises(mdref.pipeline.InputError, match="text_embeddings"):
        pipe.run(PROMPT, height=64, width=128, text_embeddings=np.zeros((1, 5, 7)))
    with pytest.raises(mdref.pipeline.InputError, match="steps"):
        pipe.run(PROMPT, steps=0)
    assert pipe.default_size() == (1024, 1024) and pipe.default_steps == 4     # the pipeline's defaults
    base = mdref.Pipeline.from_pretrained(folder.parent / "base")
    assert base.guided and base.default_steps == 30
    with pytest.raises(mdref.pipeline.InputError, match="guidance_scale"):
        base.run(PROMPT, guidance_scale=float("nan"))


def test_the_memory_guard_covers_dreamlite(folder, tmp_path):
    """The memory estimate counts the UNet's in-context input (twice the latent's width) and the 200 text tokens;
    a run that cannot fit is refused before anything runs, as for every pipeline."""
    pipe = mdref.Pipeline.from_pretrained(folder)
    with pytest.raises(mdref.pipeline.MemoryLimitError, match="1024x1024"):
        pipe.run(PROMPT, max_memory="1M")
    code = mdref.cli.main(["generate", PROMPT, "--model", str(folder), "--height", "64", "--width", "64",
                           "--max-memory", "1K", "-o", str(tmp_path / "x.png")])
    assert code == 2 and not (tmp_path / "x.png").exists()
    assert pipe.run(PROMPT, height=64, width=64, max_memory="64G").image.shape == (1, 3, 64, 64)


def _precision(capsys, folder, *extra):
    code = mdref.cli.main(["precision", PROMPT, "--model", str(folder), "--dtype", "float16", "--height", "64",
                           "--width", "64", "--scores", "--json", *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_precision_reports_the_rms_norm_sums_of_squares(folder, tmp_path, capsys):
    """RMSNorm in float16 is a known device failure: the sum of x^2 it divides by the width overflows 65504 long
    before x does. `mdref precision --scores` reports every RMSNorm's sum (<norm>.sum_sq: the Qwen text model's
    norms, the UNet's q / k norms and text projection) with its headroom. Text projection weights x 64 put the sum
    beyond float16 while every value stays in range: that point is named first, and the emulated RMSNorm (its
    statistics in float32) keeps the run finite."""
    report = _precision(capsys, folder)
    sums = {r["name"]: r for r in report["points"] if r["name"].endswith(".sum_sq")}
    assert {"text_encoder.layers.0.input_layernorm.sum_sq", "text_encoder.layers.0.self_attn.q_norm.sum_sq",
            "text_encoder.norm.sum_sq", "unet.encoder_hid_proj.1.sum_sq"} <= set(sums)
    assert any(n.endswith("attn2.norm_q.sum_sq") for n in sums) and any(n.endswith("attn2.norm_k.sum_sq") for n in sums)
    least = min(sums.values(), key=lambda r: r["headroom_log2"])
    assert report["least_headroom"]["sum_sq"] == {"name": least["name"], "headroom_log2": least["headroom_log2"]}
    assert report["first_nonfinite"] is None and least["headroom_log2"] > 0

    scaled = tmp_path / "scaled"
    shutil.copytree(folder, scaled)
    weights = scaled / "unet" / "diffusion_pytorch_model.safetensors"
    tensors, meta = read_safetensors(weights)
    tensors = dict(tensors, **{"encoder_hid_proj.0.weight": tensors["encoder_hid_proj.0.weight"] * 64})
    write_safetensors(weights, tensors, meta)
    report = _precision(capsys, scaled)
    rows = {r["name"]: r for r in report["points"]}
    hid = rows["unet.encoder_hid_proj.1.sum_sq"]
    assert hid["ref_max_abs"] > 65504 and hid["headroom_log2"] < 0 and hid["nonfinite"] > 0
    assert report["first_nonfinite"] == "unet.encoder_hid_proj.1.sum_sq"
    assert rows["unet.encoder_hid_proj"]["nonfinite"] == 0 and rows["unet.out"]["nonfinite"] == 0
