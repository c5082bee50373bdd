"""Pipeline.run's argument checks (InputError naming the argument), the memory estimate and its refusal before any
allocation, and the NaN / Inf stage checks that name the first non-finite trace point (issue 16)."""

import time
import tracemalloc

import numpy as np
import pytest

import mdref.pipeline as pipeline_module
from mdref import sampler
from mdref.pipeline import (InputError, MemoryLimitError, NonFiniteError, Pipeline, estimate_peak_bytes, memory_limit,
                            parse_bytes)
from mdref.trace import trace

LATENT = (1, 8, 8, 8)


@pytest.fixture
def pipe():
    return Pipeline.from_preset("tiny", seed=0)          # fresh each test: some tests plant NaN in its weights


def _noise(dtype=np.float64, shape=LATENT):
    return np.random.Generator(np.random.PCG64(1)).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("kwargs, argument, fragment", [
    (dict(seed=None), "seed", "found None"),
    (dict(seed=-1), "seed", "found -1"),
    (dict(seed=True), "seed", "found True"),
    (dict(seed=np.bool_(False)), "seed", "found"),
    (dict(seed=1.5), "seed", "found 1.5"),
    (dict(seed=2.0), "seed", "found 2.0"),
    (dict(seed=2 ** 64), "seed", "2**64"),
    (dict(seed="3"), "seed", "'3'"),
    (dict(prompt={"a red circle": 1}), "prompt", "non-empty list of strings"),
    (dict(prompt=[]), "prompt", "non-empty list"),
    (dict(prompt=["a", 3]), "prompt", "list of strings"),
    (dict(prompt=b"a red circle"), "prompt", "found b'a red circle'"),
    (dict(prompt=None), "prompt", "found None"),
    (dict(prompt="caf\udcc3"), "prompt", "not valid UTF-8"),
    (dict(negative_prompt=3, guidance_scale=2.0), "negative_prompt", "must be a string"),
    (dict(steps=0), "steps", "found 0"),
    (dict(steps=-1), "steps", "found -1"),
    (dict(steps=1001), "steps", "num_train_timesteps = 1000"),
    (dict(steps=2 ** 31), "steps", "found 2147483648"),
    (dict(steps=1.0), "steps", "found 1.0"),
    (dict(steps=True), "steps", "found True"),
    (dict(guidance_scale=float("nan")), "guidance_scale", "found nan"),
    (dict(guidance_scale=float("inf")), "guidance_scale", "found inf"),
    (dict(guidance_scale=10 ** 400), "guidance_scale", "in [0, 50]"),
    (dict(guidance_scale=-1), "guidance_scale", "in [0, 50]"),
    (dict(guidance_scale=51), "guidance_scale", "found 51"),
    (dict(negative_prompt="blue"), "negative_prompt", "only with classifier-free guidance"),
    (dict(negative_prompt="blue", guidance_scale=1.0), "negative_prompt", "found guidance 1.0"),
    (dict(guidance_scale="3"), "guidance_scale", "'3'"),
    (dict(guidance_scale=True), "guidance_scale", "found True"),
    (dict(height=0), "height", "0 is not supported"),
    (dict(width=0), "width", "0 is not supported"),
    (dict(height=0, width=0), "height", "multiples of 32"),
    (dict(height=-64), "height", "-64"),
    (dict(height=48), "height", "multiples of 32"),
    (dict(height=64.0), "height", "64.0"),
    (dict(width=True), "width", "True"),
    (dict(noise=_noise(np.complex128)), "noise", "complex128"),
    (dict(noise=_noise(np.int64)), "noise", "int64"),
    (dict(noise=np.empty(LATENT, object)), "noise", "object"),
    (dict(noise=np.zeros(LATENT, bool)), "noise", "bool"),
    (dict(noise=np.zeros((1, 8, 4, 4))), "noise", "has shape (1, 8, 4, 4)"),
    (dict(noise=np.zeros((2,) + LATENT)), "noise", "has shape (2, 1, 8, 8, 8)"),
    (dict(noise=np.where(np.arange(512).reshape(LATENT) == 7, np.nan, 0.0)), "noise", "1 NaN, 0 Inf of 512"),
    (dict(noise=np.full(LATENT, np.inf, np.float32)), "noise", "0 NaN, 512 Inf of 512"),
    (dict(noise=np.full(LATENT, 1e39)), "noise", "beyond float32's range"),
    (dict(max_memory="lots"), "max_memory", "'lots'"),
    (dict(max_memory=0), "max_memory", "0"),
])
def test_bad_arguments_raise_input_error_naming_the_argument(pipe, kwargs, argument, fragment):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "a red circle")
    with pytest.raises(InputError) as e:
        pipe.run(prompt, **kwargs)
    assert isinstance(e.value, ValueError)
    assert e.value.argument == argument and str(e.value).startswith(argument)
    assert fragment in str(e.value)


def test_good_arguments_of_every_accepted_kind(pipe):
    base = pipe.run("a red circle", seed=3)
    assert np.array_equal(pipe.run(("a red circle",), seed=np.int64(3)).pixels, base.pixels)
    assert np.array_equal(pipe.run(["a red circle"], seed=np.uint64(3), steps=np.int32(1)).pixels, base.pixels)
    pipe.run("x", seed=2 ** 64 - 1, height=np.int64(32), width=96, guidance_scale=np.float32(2), steps=2)
    pipe.run("x", noise=_noise(np.float16), guidance_scale=0.5)         # float16 noise and a scale <= 1 (no CFG) are fine
    # The image size is what was asked: an explicit size is never replaced by the default.
    assert pipe.run("x", height=32, width=96).pixels.shape == (1, 32, 96, 3)


def test_seed_none_no_longer_draws_from_os_entropy(pipe):
    with pytest.raises(InputError, match="seed"):
        pipe("x", seed=None)


def test_sampler_steps_checked_too():
    with pytest.raises(ValueError, match="steps"):
        sampler.trailing_timesteps(1000, 0)


# ---- memory ------------------------------------------------------------------------------------------------------
def _fail(*args, **kwargs):
    raise AssertionError("the model ran: the refusal must come before anything is computed")


def test_too_large_is_refused_before_anything_is_allocated(pipe, monkeypatch):
    for component in (pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.decoder):
        monkeypatch.setattr(type(component), "__call__", _fail)
    monkeypatch.setattr(sampler, "sampling_noise", _fail)
    t0 = time.perf_counter()
    tracemalloc.start()
    with pytest.raises(MemoryLimitError) as e:
        pipe.run("x", height=100000, width=100000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t0 < 2 and peak < 2 ** 20
    assert e.value.argument == "image size" and e.value.needed > e.value.limit
    assert "100000x100000" in str(e.value) and "needs about" in str(e.value) and "GiB limit" in str(e.value)
    with pytest.raises(MemoryLimitError, match="1000 steps"):           # steps x latent noise draws count too
        pipe.run("x", height=8192, width=8192, steps=1000, max_memory="64G")


def test_memory_limit_sources(monkeypatch):
    monkeypatch.delenv("MDREF_MAX_MEMORY", raising=False)
    limit, source = memory_limit()
    assert source == "physical memory" and limit > 2 ** 28
    monkeypatch.setenv("MDREF_MAX_MEMORY", "3G")
    assert memory_limit() == (3 * 2 ** 30, "MDREF_MAX_MEMORY")
    assert memory_limit("512M") == (512 * 2 ** 20, "max_memory")
    assert memory_limit(12345) == (12345, "max_memory")
    assert parse_bytes("1.5 GiB") == 3 * 2 ** 29 and parse_bytes("2k") == 2048 and parse_bytes("100") == 100
    monkeypatch.setenv("MDREF_MAX_MEMORY", "plenty")
    with pytest.raises(InputError, match="MDREF_MAX_MEMORY"):
        memory_limit()


def test_ordinary_sizes_pass_and_a_small_limit_refuses(pipe, monkeypatch):
    monkeypatch.delenv("MDREF_MAX_MEMORY", raising=False)
    pipe.check("x")
    pipe.check("x", height=512, width=512, steps=4)
    pipe.run("x", max_memory="1G")
    with pytest.raises(MemoryLimitError, match="more than the 1.0 MiB limit"):
        pipe.run("x", max_memory="1M")
    monkeypatch.setenv("MDREF_MAX_MEMORY", "1M")
    with pytest.raises(MemoryLimitError, match="MDREF_MAX_MEMORY"):
        pipe.run("x")


@pytest.mark.parametrize("size, steps", [(64, 1), (128, 3), (256, 1)])
def test_estimate_covers_the_measured_peak(pipe, size, steps):
    """The estimate is meant to be on the high side of what the run holds (weights + tracemalloc's peak of the run:
    NumPy reports its allocations to tracemalloc), and not wildly above it."""
    weights = pipe.num_parameters()["total"] * 4
    pipe.run("x")                                                    # lazy one-time set-up is not the run's
    tracemalloc.start()
    pipe.run("x", height=size, width=size, steps=steps)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    estimate = estimate_peak_bytes(pipe, 1, size, size, steps)
    assert weights + peak <= estimate <= 3 * (weights + peak)


def test_estimate_grows_with_size_batch_and_steps(pipe):
    e = estimate_peak_bytes
    assert e(pipe, 1, 64, 64) < e(pipe, 1, 128, 128) < e(pipe, 1, 256, 256)
    assert e(pipe, 1, 256, 256) < e(pipe, 2, 256, 256) and e(pipe, 1, 64, 64, 1) < e(pipe, 1, 64, 64, 100)
    # 100000 x 100000: the decoder alone holds a 16-channel float32 image of 10**10 pixels (640 GB) at least.
    assert e(pipe, 1, 100000, 100000) > 16 * 4 * 10 ** 10


# ---- non-finite values -------------------------------------------------------------------------------------------
def _first_nonfinite_by_hand(pipe, **kwargs):
    """The first traced point holding NaN / Inf, found by this test's own scan of a full trace."""
    with np.errstate(all="ignore"), trace() as t:
        result = pipe.run("a red circle", allow_nonfinite=True, **kwargs)
    return next(n for n in t.names() if np.asarray(t[n]).dtype.kind == "f" and not np.isfinite(t[n]).all()), result


def test_nan_in_one_unet_weight_names_a_point_inside_that_layer(pipe):
    block = pipe.unet.params["mid_block"]["attentions"]["0"]["transformer_blocks"]["0"]
    block["attn2"]["to_q"]["weight"][0, 0] = np.nan
    with pytest.raises(NonFiniteError) as e:
        pipe.run("a red circle")
    # attn1 of that block runs first and is finite; attn2 reads the planted weight
    assert e.value.point == "unet.mid_block.attentions.0.transformer_blocks.0.attn2"
    assert e.value.stage == "UNet" and e.value.point_counts[0] > 0
    assert "the UNet's output holds non-finite values" in str(e.value)
    assert f"first non-finite point: {e.value.point} (" in str(e.value)


def test_nan_in_the_text_encoder_and_decoder_names_their_stage(pipe):
    pipe.text_encoder.params["encoder"]["layers"]["1"]["mlp"]["fc2"]["weight"][5, 7] = np.nan
    with pytest.raises(NonFiniteError) as e:
        pipe.run("a red circle")
    assert e.value.stage == "text encoder" and e.value.point == "text_encoder.encoder.layers.1.mlp"
    other = Pipeline.from_preset("tiny", seed=0)
    other.decoder.params["decoder"]["up_blocks"]["2"]["resnets"]["0"]["conv2"]["weight"][0, 0, 1, 1] = np.inf
    with pytest.raises(NonFiniteError) as e:
        other.run("a red circle")
    assert e.value.stage == "decoder" and e.value.point == "decoder.up_blocks.2.resnets.0"    # the ResNet itself


def test_huge_finite_noise_names_the_first_point_that_overflows(pipe):
    noise = np.full(LATENT, 1e38, np.float32)                        # finite, so the up-front check lets it in
    expected, _ = _first_nonfinite_by_hand(pipe, noise=noise)
    with pytest.raises(NonFiniteError) as e:
        pipe.run("a red circle", noise=noise)
    assert e.value.point == expected and expected.startswith("unet.")
    assert e.value.stage == "UNet"


def test_allow_nonfinite_returns_the_result(pipe):
    pipe.unet.params["mid_block"]["resnets"]["1"]["conv1"]["pointwise"]["weight"][...] = np.nan
    with np.errstate(all="ignore"):
        r = pipe.run("a red circle", allow_nonfinite=True)
    assert np.isnan(r.image).all() and r.pixels.dtype == np.uint8 and (r.pixels == 0).all()   # NaN -> 0


def test_the_normal_path_runs_once(pipe, monkeypatch):
    monkeypatch.setattr(pipeline_module, "first_nonfinite", _fail)
    calls = []
    call = type(pipe.unet).__call__
    monkeypatch.setattr(type(pipe.unet), "__call__", lambda *a: calls.append(1) or call(*a))
    pipe.run("a red circle", steps=2)
    assert len(calls) == 2                                           # one UNet call per step, no repeat


def test_cli_allow_nonfinite_writes_the_png(tmp_path, capsys):
    from mdref.cli import main

    np.save(tmp_path / "n.npy", np.full(LATENT, 1e38, np.float32))
    out = tmp_path / "o.png"
    argv = ["generate", "x", "-o", str(out), "--preset", "tiny", "--noise", str(tmp_path / "n.npy")]
    assert main(argv) == 2 and not out.exists()
    assert "first non-finite point: unet." in capsys.readouterr().err
    with np.errstate(all="ignore"):
        assert main(argv + ["--allow-nonfinite"]) == 0
    assert out.is_file()


def test_precision_reports_nonfinite_points_instead_of_crashing(tmp_path, capsys):
    from mdref.cli import main

    np.save(tmp_path / "n.npy", np.full(LATENT, 1e38, np.float32))    # overflows in float32, not in float64
    with np.errstate(all="ignore"):
        assert main(["precision", "x", "--preset", "tiny", "--noise", str(tmp_path / "n.npy")]) == 0
    out = capsys.readouterr().out
    assert "first point holding NaN / Inf in float32: unet." in out and "in float64" not in out
