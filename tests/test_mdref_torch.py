"""mdref_torch: the PyTorch module of every mdref component computes what mdref computes (float32, max abs error
<= 1e-5 * max|mdref|, as the other parity tests), with the checkpoint's keys; the rules from module paths to point
names; every point a wrapper returns equals mdref's value of that point; a point mdref starts recording (the finer
decoder points) is picked up by the rules without a change."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import mdref  # noqa: E402
from mdref.formats.safetensors import flatten  # noqa: E402
from mdref_torch import build, points  # noqa: E402
from mdref_torch.export import example_inputs, prepare  # noqa: E402


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("source", ["default", "tiny"])
def test_modules_match_mdref_and_keep_the_checkpoint_keys(source):
    pipe = mdref.Pipeline.from_pretrained() if source == "default" else mdref.Pipeline.from_preset("tiny")
    inputs = example_inputs(pipe)
    for name, module in build.pipeline_modules(pipe).items():
        component = getattr(pipe, name)
        assert set(module.state_dict()) >= set(component.checkpoint_keys(flatten(component.params))), name
        with torch.no_grad():
            theirs = points.first_tensor(module(*[torch.from_numpy(np.asarray(a)) for a in inputs[name]]))
        err = rel_err(theirs.numpy(), component(*inputs[name]))
        print(f"{source} {name}: rel err {err:.2e}")
        assert err <= 1e-5, (name, err)


def test_taesd_decoder():
    dec = mdref.Decoder.from_preset("taesd")
    z = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        theirs = build.torch_module(dec)(torch.from_numpy(z)).numpy()
    assert rel_err(theirs, dec(z)) <= 1e-5


@pytest.mark.parametrize("path, point", [
    ("text_encoder", "text_embeddings"),
    ("text_encoder.text_model.encoder.layers.3.self_attn", "text_encoder.encoder.layers.3.self_attn"),
    ("unet", "unet.out"),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2", "unet.down_blocks.1.attentions.0."
                                                                   "transformer_blocks.0.attn2"),
    ("vae.post_quant_conv", "decoder.post_quant_conv"),
    ("vae.decoder", "decoder.out"),
    ("vae.decoder.up_blocks.2.resnets.1", "decoder.up_blocks.2.resnets.1"),
    ("vae.decoder.mid_block.attentions.0", "decoder.mid_block.attentions.0"),
    ("vae.encoder.conv_in", None),
    ("safety_checker", None),
])
def test_rules(path, point):
    assert points.point_name(path) == point


def test_every_wrapper_output_is_mdrefs_point_value():
    """The default model's three wrappers: each output (main and points) against mdref's trace of the same call,
    within 1e-5 of max|mdref|, but unet.time_embedding: the sinusoid's argument t * f at t = 999 carries a float32
    rounding of up to 999 * 2**-24 = 6e-5 (absolute), which sin / cos pass on and torch and numpy round differently;
    through the two linear layers that is up to ~1e-4 of the embedding's max (measured 5.4e-5): bound 2e-4."""
    pipe = mdref.Pipeline.from_pretrained()
    inputs = example_inputs(pipe)
    for name, prep in prepare(pipe).items():
        with mdref.trace() as t:
            out = getattr(pipe, name)(*inputs[name])
        ref = dict(t.arrays, **{prep.main: out})
        got = prep.run()
        assert len(got) == len(prep.names) and not prep.entry({n: list(x.shape) for n, x in got.items()})[
            "not_exported"]
        for point, value in got.items():
            bound = 2e-4 if point == "unet.time_embedding" else 1e-5
            assert rel_err(value, ref[point]) <= bound, (point, rel_err(value, ref[point]))


def test_a_finer_decoder_point_maps_without_a_new_rule():
    """When mdref records the decoder's ResNets, mid attention and upsamplers, the rules find their modules."""
    dec = build.torch_module(mdref.Pipeline.from_pretrained().decoder)
    finer = {"decoder.mid_block.resnets.0", "decoder.mid_block.attentions.0", "decoder.up_blocks.2.resnets.1",
             "decoder.up_blocks.2.upsamplers.0", "decoder.mid_block"}
    mapped = points.module_points(dec, "decoder", finer)
    assert sorted(mapped.values()) == sorted(finer)
    assert mapped["decoder.up_blocks.2.upsamplers.0"] == "decoder.up_blocks.2.upsamplers.0"
