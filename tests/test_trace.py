"""Golden-reference tooling: traces, compare naming the first divergence, golden bundles, float64 ground truth."""

import json

import numpy as np
import pytest

import mdref
from mdref.cli import main
from mdref.comparison import compare
from mdref.pipeline import Pipeline
from mdref.trace import load_trace, save_trace, trace

pytestmark = pytest.mark.numerics          # also run under other BLAS / oneDNN kernels (.ci/run)

PROMPT = "a large red circle on the left, blue background"


@pytest.fixture(scope="module")
def tiny64():
    return Pipeline.from_preset("tiny", seed=0, dtype=np.float64)


def _trace(pipe, points=None):
    with trace(points) as t:
        pipe.run(PROMPT, seed=0)
    return t


def test_recording_is_off_by_default_and_filters(tiny64):
    assert mdref.trace_active() is None
    t = _trace(tiny64, "unet.*attn2")
    assert t.names() and all(n.startswith("unet.") and n.endswith("attn2") for n in t.names())
    t = _trace(tiny64, ["tokens", "re:^decoder\\.up_blocks\\.[0-9]+$"])
    assert t.names()[0] == "tokens" and all(n == "tokens" or n.startswith("decoder.up_blocks.") for n in t.names())


def test_pipeline_points_in_execution_order(tiny64):
    names = _trace(tiny64).names()
    want = ["tokens", "text_embeddings", "noise", "unet.time_embedding", "unet.out", "latents.x0", "decoder.out",
            "image"]
    for n in want:
        assert n in names, n
    assert [names.index(n) for n in want] == sorted(names.index(n) for n in want)
    assert "text_encoder.encoder.layers.1" in names
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2" in names
    assert "decoder.up_blocks.2" in names


def test_trace_file_round_trip_with_manifest(tiny64, tmp_path):
    t = _trace(tiny64)
    save_trace(tmp_path / "t.safetensors", t, {"prompt": PROMPT, "seed": 0})
    arrays, manifest = load_trace(tmp_path / "t.safetensors")
    assert list(arrays) == t.names() == manifest["points"]
    assert manifest["prompt"] == PROMPT
    for n in t.names():
        np.testing.assert_array_equal(arrays[n], t[n])


def test_compare_names_exactly_the_perturbed_layer(tiny64):
    """One weight in one mid-network layer perturbed: compare's first divergence is that layer."""
    ref = _trace(tiny64)
    bad = Pipeline.from_preset("tiny", seed=0, dtype=np.float64)
    w = bad.unet.params["down_blocks"]["1"]["attentions"]["0"]["transformer_blocks"]["0"]["attn2"]["to_out"]["0"]
    w["weight"] = w["weight"].copy()
    w["weight"][3, 5] += 1e-3
    report = compare(ref, _trace(bad))
    assert report.first_divergence == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    idx = [p.name for p in report.points].index(report.first_divergence)
    assert all(p.ok for p in report.points[:idx])
    assert not report.ok and report.excerpt


def test_compare_detects_a_groupnorm_eps_change_in_float64(tiny64, monkeypatch):
    """1e-6 vs 1e-5 in the transformers' input GroupNorm: invisible to the eye, caught by compare in float64
    at the first transformer."""
    ref = _trace(tiny64)
    spec = tiny64.unet.spec                                            # the eps is a spec field, visible here
    monkeypatch.setattr(tiny64.unet, "spec", spec.replace_layers("transformer", norm_eps=1e-5))
    report = compare(ref, _trace(tiny64))
    assert report.first_divergence is not None
    assert report.first_divergence.startswith("unet.down_blocks.1.attentions.0")
    worst = max(p.rel_to_max for p in report.points)
    assert worst < 1e-2          # a small change, yet above the float64 default tolerance
    monkeypatch.setattr(tiny64.unet, "spec", spec)
    assert compare(ref, _trace(tiny64)).ok


def test_compare_cli_exit_codes(tiny64, tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    t = _trace(tiny64)
    save_trace(a, t)
    save_trace(b, t)
    assert main(["compare", str(a), str(b)]) == 0
    changed = dict(t.arrays)
    changed["unet.out"] = changed["unet.out"] + 1e-3
    save_trace(b, changed)
    assert main(["compare", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "FIRST DIVERGENCE" in out and "unet.out" in out
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert main(["compare", str(a), str(tmp_path / "junk.safetensors")]) == 2
    save_trace(b, {"other": np.zeros(3)})
    assert main(["compare", str(a), str(b)]) == 2
    assert main(["compare", str(a), str(tmp_path / "missing.safetensors")]) == 2
    capsys.readouterr()
    assert main(["compare", str(a), str(a), "--json", "--points", "unet.*"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["first_divergence"] is None and report["points"]
    assert all(p["name"].startswith("unet.") for p in report["points"])


def test_trace_cli_and_manifest(tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    assert main(["trace", PROMPT, "-o", str(out), "--preset", "tiny", "--seed", "3", "--points", "unet.*",
                 "--points", "image"]) == 0
    arrays, manifest = load_trace(out)
    assert set(arrays) and all(n.startswith("unet.") or n == "image" for n in arrays)
    for key in ("mdref_version", "numpy_version", "model", "weights_sha256", "prompt", "token_ids", "seed",
                "noise_source", "timesteps", "dtype", "points"):
        assert key in manifest, key
    assert manifest["timesteps"] == [999.0] and manifest["seed"] == 3


def test_golden_bundle(tmp_path, capsys):
    assert main(["golden", str(tmp_path / "g"), "--preset", "tiny"]) == 0
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert len(manifest["cases"]) >= 3
    case = tmp_path / "g" / manifest["cases"][0]["name"]
    for f in ("token_ids.npy", "text_embeddings.npy", "noise.npy", "unet_out.npy", "x0.npy", "image.npy",
              "image.png", "trace.safetensors"):
        assert (case / f).is_file(), f
    # The bundle is self-consistent: rerunning mdref on its noise reproduces its image bit for bit.
    pipe = Pipeline.from_preset("tiny", seed=0)
    r = pipe.run(manifest["cases"][0]["prompt"], noise=np.load(case / "noise.npy"))
    np.testing.assert_array_equal(r.image, np.load(case / "image.npy"))
    np.testing.assert_array_equal(r.token_ids, np.load(case / "token_ids.npy"))


def test_precision_reports_float32_error_growth(capsys):
    assert main(["precision", PROMPT, "--preset", "tiny", "--points", "unet.out", "--points", "image",
                 "--points", "text_embeddings"]) == 0
    out = capsys.readouterr().out
    assert "unet.out" in out and "text_embeddings" in out
    pipe32 = Pipeline.from_preset("tiny", seed=0)
    pipe64 = Pipeline.from_preset("tiny", seed=0, dtype=np.float64)
    with trace("unet.out") as t32:
        pipe32.run(PROMPT)
    with trace("unet.out") as t64:
        pipe64.run(PROMPT)
    report = compare(t64, t32, rtol=1e-5)
    assert report.ok, report.points            # float32 rounding only: well under 1e-5 of max |unet.out|
    assert report.points[0].max_abs > 0         # ... but not zero: the runs really are in two precisions


def test_save_trace_stores_big_endian_arrays_as_the_little_endian_format_says(tmp_path):
    """A runtime on a big-endian host (or a '>f4' array from a file) is stored by value, not refused."""
    x = np.arange(6, dtype=">f4").reshape(2, 3) / 7
    ids = np.arange(3, dtype=">i8")
    save_trace(tmp_path / "t.safetensors", {"x": x, "tokens": ids})
    arrays, _ = load_trace(tmp_path / "t.safetensors")
    assert arrays["x"].dtype == np.float32 and np.array_equal(arrays["x"], x)
    assert arrays["tokens"].dtype == np.int64 and np.array_equal(arrays["tokens"], ids)
