"""Decoder tests. The oracle is diffusers: AutoencoderKL.decode and AutoencoderTiny.decode with random weights
built here, saved to tmp_path, loaded by mdref. Whole tensors are compared.

Tolerances (common rules): float32 max|err| <= 1e-5 * max|ref|, float64 <= 1e-10 * max|ref|. Both are far above
what summation order alone explains (about 1e-6 and 1e-14 relative here) and far below what any wrong eps, missing
bias or mis-ordered layer produces (>= 1e-3).
"""

import json

import numpy as np
import pytest

from mdref.io import ConfigError
from mdref.io import Decoder, DecoderConfig
from mdref.io.decoder_config import config_from_diffusers
from mdref.io.keymaps import diffusers_to_raw_taesd, raw_taesd_to_diffusers
from mdref.io.presets import DECODER_PRESETS as PRESETS
from mdref.decoder import taesd_stages
from mdref.trace import trace as tracing
from mdref.formats.safetensors import WeightsError, read_safetensors, write_safetensors
from oracles import randomize, rel_err, within

pytestmark = pytest.mark.numerics          # also run under other BLAS / oneDNN kernels (.ci/run)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = {np.float32: 1e-5, np.float64: 1e-10}
KL_CFG = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
              down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
              scaling_factor=0.3, shift_factor=0.1)
TINY_CFG = dict(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16),
                num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(2, 1, 1), latent_channels=4)




def oracle(vae, latents, dtype):
    model = vae.double() if dtype == np.float64 else vae.float()
    with torch.no_grad():
        return model.decode(torch.from_numpy(latents)).sample.numpy()


@pytest.fixture(scope="module")
def kl_folder(tmp_path_factory):
    vae = randomize(diffusers.AutoencoderKL(**KL_CFG), seed=1, spread=0.3)
    folder = tmp_path_factory.mktemp("kl")
    vae.save_pretrained(folder)                                     # full checkpoint: encoder + quant_conv too
    return vae, folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    vae = randomize(diffusers.AutoencoderTiny(**TINY_CFG), seed=2, spread=0.3)
    folder = tmp_path_factory.mktemp("tiny")
    vae.save_pretrained(folder)
    return vae, folder


# Latent sizes: small, and large enough that upsample_conv2d takes its phase form (ops.UPSAMPLE_MIN_PIXELS).
SIZES = pytest.mark.parametrize("hw", [(5, 7), (17, 16)], ids=["small", "phase-form"])


@SIZES
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kl_matches_diffusers(kl_folder, dtype, hw):
    vae, folder = kl_folder
    keys = read_safetensors(folder / "diffusion_pytorch_model.safetensors")[0]
    assert any(k.startswith("encoder.") for k in keys) and any(k.startswith("quant_conv.") for k in keys)
    latents = np.random.default_rng(0).standard_normal((2, 4) + hw).astype(dtype)   # batch 2, non-square
    dec = Decoder.from_pretrained(folder, dtype=dtype)
    assert dec.scaling_factor == 0.3 and dec.shift_factor == 0.1 and dec.upsampling_factor == 4
    got, ref = dec(latents), oracle(vae, latents, dtype)
    assert got.shape == ref.shape == (2, 3, 4 * hw[0], 4 * hw[1]) and got.dtype == dtype
    within(f"AutoencoderKL.decode {np.dtype(dtype).name}", rel_err(got, ref), TOL[dtype])


@pytest.mark.parametrize("variant", [dict(use_post_quant_conv=False), dict(mid_block_add_attention=False),
                                     dict(layers_per_block=0, block_out_channels=(8, 16), latent_channels=8)])
def test_kl_variants_match_diffusers(variant, tmp_path):
    """The config switches: no post_quant_conv, no mid attention, one ResNet per up block, 8 latent channels."""
    cfg = {**KL_CFG, **variant}
    levels = len(cfg["block_out_channels"])
    cfg.update(down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)
    vae = randomize(diffusers.AutoencoderKL(**cfg), seed=5, spread=0.3)
    vae.save_pretrained(tmp_path)
    dec = Decoder.from_pretrained(tmp_path)
    latents = np.random.default_rng(5).standard_normal((2, vae.config.latent_channels, 4, 6)).astype(np.float32)
    within(f"AutoencoderKL {variant} float32", rel_err(dec(latents), oracle(vae, latents, np.float32)), 1e-5)


@SIZES
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiny_matches_diffusers(tiny_folder, dtype, hw):
    vae, folder = tiny_folder
    latents = 2 * np.random.default_rng(1).standard_normal((2, 4) + hw).astype(dtype)  # |x| > 3 hits the clamp
    dec = Decoder.from_pretrained(folder, dtype=dtype)
    assert dec.scaling_factor == 1.0 and dec.shift_factor == 0.0 and dec.upsampling_factor == 4
    got, ref = dec(latents), oracle(vae, latents, dtype)
    assert got.shape == ref.shape == (2, 3, 4 * hw[0], 4 * hw[1])
    within(f"AutoencoderTiny.decode {np.dtype(dtype).name}", rel_err(got, ref), TOL[dtype])


def test_raw_taesd_layout(tiny_folder, tmp_path):
    """taesd.py's Sequential has Clamp() at index 0, so its keys are diffusers' decoder.layers.N + 1."""
    vae, _ = tiny_folder
    raw = {f"{int(k.split('.')[1]) + 1}.{k.split('.', 2)[2]}": v.numpy()
           for k, v in vae.decoder.state_dict().items()}              # "layers.0.weight" -> "1.weight"
    assert "1.weight" in raw and "3.conv.0.weight" in raw
    write_safetensors(tmp_path / "taesd_decoder.safetensors", raw)
    latents = np.random.default_rng(2).standard_normal((2, 4, 3, 4)).astype(np.float32)
    ref = oracle(vae, latents, np.float32)                          # diffusers: [-1, 1]
    for path in (tmp_path, tmp_path / "taesd_decoder.safetensors"):
        dec = Decoder.from_pretrained(path)
        assert dec.config.num_decoder_blocks == (2, 1, 1) and dec.config.decoder_block_out_channels == (16,) * 3
        within("raw TAESD layout float32", rel_err(dec(latents), ref), TOL[np.float32])
    flat = raw_taesd_to_diffusers(raw)
    assert diffusers_to_raw_taesd(flat).keys() == raw.keys()
    with pytest.raises(WeightsError, match="layers after"):
        Decoder.from_pretrained(_write(tmp_path / "extra", {**raw, "99.weight": raw["1.weight"]}))


def _write(folder, flat, config=None, name="taesd_decoder.safetensors"):
    folder.mkdir()
    write_safetensors(folder / name, flat)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_stray_keys_are_errors(kl_folder, tiny_folder, tmp_path):
    name = "diffusion_pytorch_model.safetensors"
    for (vae, folder), stray in [(kl_folder, "decoder.extra.weight"), (kl_folder, "quant_conv_2.weight"),
                                 (tiny_folder, "quant_conv.weight"), (tiny_folder, "post_quant_conv.weight")]:
        flat = read_safetensors(folder / name)[0]
        cfg = json.loads((folder / "config.json").read_text())
        bad = _write(tmp_path / f"{folder.name}-{stray}", {**flat, stray: np.zeros(3, np.float32)}, cfg, name)
        with pytest.raises(WeightsError, match="unexpected keys.*" + stray.replace(".", r"\.")):
            Decoder.from_pretrained(bad)
    flat = read_safetensors(kl_folder[1] / name)[0]                 # a missing decoder key is named too
    del flat["decoder.conv_out.bias"]
    bad = _write(tmp_path / "missing", flat, json.loads((kl_folder[1] / "config.json").read_text()), name)
    with pytest.raises(WeightsError, match=r"missing keys.*decoder\.conv_out\.bias"):
        Decoder.from_pretrained(bad)


def test_deprecated_attention_names(kl_folder, tmp_path):
    vae, folder = kl_folder
    name = "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    flat = {}
    for k, v in read_safetensors(folder / name)[0].items():
        for new, dep in old.items():
            k = k.replace(f"mid_block.attentions.0.{new}.", f"mid_block.attentions.0.{dep}.")
        flat[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in flat
    moved = _write(tmp_path / "old", flat, json.loads((folder / "config.json").read_text()), name)
    latents = np.random.default_rng(3).standard_normal((1, 4, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(Decoder.from_pretrained(moved)(latents), Decoder.from_pretrained(folder)(latents))


def test_save_pretrained_round_trip(kl_folder, tiny_folder, tmp_path):
    latents = np.random.default_rng(4).standard_normal((1, 4, 4, 3)).astype(np.float32)
    for vae, folder in (kl_folder, tiny_folder):
        dec = Decoder.from_pretrained(folder)
        dec.save_pretrained(tmp_path / folder.name)
        again = Decoder.from_pretrained(tmp_path / folder.name)
        assert again.config == dec.config
        assert set(read_safetensors(tmp_path / folder.name / "diffusion_pytorch_model.safetensors")[0]) == \
            set(Decoder.param_schema(dec.config))                           # decode side only
        np.testing.assert_array_equal(again(latents), dec(latents))
        theirs = type(vae).from_pretrained(tmp_path / folder.name)   # diffusers reads mdref's folder too
        within(f"diffusers on mdref's {type(vae).__name__} folder", rel_err(dec(latents),
                      oracle(theirs, latents, np.float32)), TOL[np.float32])


def test_lite_preset_parameter_count_and_schema():
    """MobileDiffusion's decoder has ~9.8M parameters (paper); the preset must be within 5%, and its key/shape
    schema must be exactly what diffusers' AutoencoderKL builds for the same config."""
    dec = Decoder.from_preset("mobilediffusion-lite")
    n = dec.num_parameters()
    print(f"mobilediffusion-lite decoder: {n} parameters ({(n / 9.8e6 - 1) * 100:+.2f}% vs 9.8M)")
    assert abs(n / 9.8e6 - 1) <= 0.05
    cfg = dec.config
    assert cfg.latent_channels == 8 and cfg.upsampling_factor == 8 and cfg.kind == "kl"
    vae = diffusers.AutoencoderKL(block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                                  latent_channels=8, down_block_types=["DownEncoderBlock2D"] * 4,
                                  up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=cfg.norm_num_groups)
    theirs = {k: tuple(v.shape) for k, v in vae.state_dict().items() if not k.startswith(("encoder.", "quant_conv."))}
    assert theirs == {k: tuple(v) for k, v in Decoder.param_schema(cfg).items()}
    assert Decoder.from_preset("sd-vae").num_parameters() == 49_490_199    # SD's decoder: the paper's 49.5M


def test_config_errors(kl_folder):
    cfg = json.loads((kl_folder[1] / "config.json").read_text())
    assert config_from_diffusers(cfg).norm_eps == 1e-6
    for key, value, msg in [("mid_block_type", "x", "unsupported config keys"), ("act_fn", "gelu", "act_fn"),
                            ("up_block_types", ["AttnUpDecoderBlock2D"] * 3, "up_block_types"),
                            ("latents_mean", [0.0] * 4, "latents_mean")]:
        with pytest.raises(ConfigError, match=msg):
            config_from_diffusers({**cfg, key: value})
    with pytest.raises(ConfigError, match="_class_name"):
        config_from_diffusers({**cfg, "_class_name": "VQModel"})
    with pytest.raises(ConfigError, match="divisible"):
        DecoderConfig(block_out_channels=(24,), norm_num_groups=32)
    with pytest.raises(ConfigError, match="Decoder: unknown preset"):
        Decoder.from_preset("nope")
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\].*\(1, 3, 2, 2\)"):
        Decoder.from_preset("taesd")(np.zeros((1, 3, 2, 2)))
    assert set(PRESETS) >= {"mobilediffusion-lite", "taesd", "sd-vae"}


def test_trace_points(kl_folder, tiny_folder):
    latents = np.zeros((1, 4, 2, 3), np.float32)
    with tracing("decoder.*") as t:
        Decoder.from_pretrained(kl_folder[1])(latents)
    # every ResNet, the mid attention and every upsampler under its parameter path, as the UNet's (issue 29)
    up = [[f"decoder.up_blocks.{i}.resnets.{j}" for j in range(3)]
          + ([f"decoder.up_blocks.{i}.upsamplers.0"] if i < 2 else []) + [f"decoder.up_blocks.{i}"] for i in range(3)]
    assert t.names() == ["decoder.post_quant_conv", "decoder.conv_in", "decoder.mid_block.resnets.0",
                         "decoder.mid_block.attentions.0", "decoder.mid_block.resnets.1", "decoder.mid_block",
                         *up[0], *up[1], *up[2], "decoder.out"]
    with tracing("decoder.*") as t:
        dec = Decoder.from_pretrained(tiny_folder[1])
        dec(latents)
    assert t.names()[:2] == ["decoder.layers.0", "decoder.layers.1"] and t.names()[-1] == "decoder.out"
    # The upsample stages are fused into the next conv; traced, they still record the upsampled image.
    ups = [i for i, s in enumerate(taesd_stages(dec.spec)) if s == "upsample"]
    assert ups and t.names() == [f"decoder.layers.{i}" for i in range(len(taesd_stages(dec.spec)))] + ["decoder.out"]
    for i in ups:
        np.testing.assert_array_equal(t[f"decoder.layers.{i}"], t[f"decoder.layers.{i - 1}"].repeat(2, 2).repeat(2, 3))


def test_a_forced_upsample_stage_feeds_the_next_conv(tiny_folder):
    """TAESD's upsample stage is fused into the next conv (ops.upsample_conv2d) and never built; under teacher
    forcing (mdref compare --local) the candidate's upsampled image is what that conv reads."""
    from mdref.comparison import TeacherForcing
    from mdref.ops import conv2d
    from mdref.trace import recording

    dec = Decoder.from_pretrained(tiny_folder[1])
    stages = taesd_stages(dec.spec)
    i = stages.index("upsample")
    latents = np.random.default_rng(3).standard_normal((1, 4, 17, 16)).astype(np.float32)   # the phase form's size
    with tracing("decoder.*") as t:
        dec(latents)
    forced = np.random.default_rng(4).standard_normal(t[f"decoder.layers.{i}"].shape).astype(np.float32)
    tf = TeacherForcing({f"decoder.layers.{i}": forced})
    with recording(tf):
        dec(latents)
    np.testing.assert_array_equal(tf.arrays[f"decoder.layers.{i}"], t[f"decoder.layers.{i}"])   # mdref's own value
    expected = conv2d(forced, dec.params["decoder"]["layers"][str(i + 1)], padding=1)
    np.testing.assert_array_equal(tf.arrays[f"decoder.layers.{i + 1}"], expected)
    assert not np.array_equal(expected, t[f"decoder.layers.{i + 1}"])
