"""`mdref match`: a candidate's tensors, named anyhow and laid out as a runtime lays them out, mapped onto mdref's
points by shape and value (mdref/matching.py). Synthetic traces built here: every layout the module documents, a
distractor of the same size, a near-copy that makes a match ambiguous, a wrong value (low), a missing point
(unmatched), one candidate serving two identical points; and the command's one error path."""

import json

import numpy as np
import pytest

import mdref
from mdref import cli
from mdref.matching import match

RNG = np.random.default_rng(0)


def _reference():
    r = lambda *s: RNG.standard_normal(s).astype(np.float32)
    ref = {
        "unet.conv_in": r(1, 8, 4, 4),                       # NCHW
        "unet.attn": r(1, 16, 8),                            # [B, N, C]
        "unet.time_embedding": r(1, 32),
        "text_encoder.layer": r(2, 6, 5),                    # [B, T, D], B = 2: [T, B, D] is another order
        "unet.mid_block": r(1, 4, 2, 2),
        "unet.mid_block.resnets.1": None,                    # the same array as unet.mid_block
        "decoder.out": r(1, 3, 4, 4),
        "image": r(1, 3, 8, 8),                              # no counterpart
    }
    ref["unet.mid_block.resnets.1"] = ref["unet.mid_block"].copy()
    return ref


def _candidate(ref):
    return {
        "node_17": ref["unet.conv_in"].transpose(0, 2, 3, 1).reshape(1, 16, 8),          # [B, HW, C]
        "node_3": ref["unet.attn"].transpose(0, 2, 1).reshape(1, 8, 4, 4),               # NCHW of [B, N, C]
        "gemm_out": ref["unet.time_embedding"].reshape(32),                               # no batch axis
        "enc_2": ref["text_encoder.layer"].transpose(1, 0, 2).copy(),                     # [T, B, D]
        "mid": ref["unet.mid_block"].astype(np.float16),                                  # float16 runtime
        "dec": ref["decoder.out"] + np.float32(0.1) * np.abs(ref["decoder.out"]).max(),   # off by 0.1: low
        "noise_like": RNG.standard_normal((1, 8, 4, 4)).astype(np.float32),               # same size, other values
        "zeros": np.zeros((3, 4, 4, 4), np.float32),
        "ids": np.arange(5, dtype=np.int64),
    }


def test_every_layout_is_found_and_confidence_says_how_sure():
    ref = _reference()
    report = match(ref, _candidate(ref))
    by = {p.point: p for p in report.points}
    assert [p.point for p in report.points] == list(ref)
    assert (by["unet.conv_in"].tensor, by["unet.conv_in"].layout) == ("node_17", "channels_last")
    assert (by["unet.attn"].tensor, by["unet.attn"].layout) == ("node_3", "channels_first")
    assert by["text_encoder.layer"].layout == "seq_first" and by["unet.time_embedding"].tensor == "gemm_out"
    for name in ("unet.conv_in", "unet.attn", "unet.time_embedding", "text_encoder.layer"):
        assert by[name].confidence == "exact" and by[name].err == 0, name
        assert np.array_equal(report.mapped[name], ref[name]), name
    # float16 copy: err is float16 rounding (<= 2**-11 relative to the largest value), both identical points map to it
    for name in ("unet.mid_block", "unet.mid_block.resnets.1"):
        assert by[name].tensor == "mid" and by[name].confidence == "high" and 0 < by[name].err <= 2.0 ** -11
        assert report.mapped[name].dtype == np.float16
    assert by["decoder.out"].confidence == "low" and abs(by["decoder.out"].err - 0.1) < 1e-6
    assert by["image"].confidence == "unmatched" and by["image"].tensor is None
    assert report.unmatched == ["image"] and not report.ok
    assert set(report.unused) == {"noise_like", "zeros", "ids"}
    # the runner-up: another tensor of the size, or the same one read in another layout, both far off
    assert by["unet.conv_in"].runner_up in ("noise_like", "node_17") and by["unet.conv_in"].runner_up_err > 1


def test_a_near_copy_makes_a_match_ambiguous_and_a_zero_tensor_never_matches():
    ref = {"x": RNG.standard_normal((1, 4, 3, 3))}
    a = ref["x"] * (1 + 1e-4)
    b = ref["x"] * (1 + 3e-4)
    report = match(ref, {"a": a, "b": b})
    assert report.points[0].tensor == "a" and report.points[0].confidence == "ambiguous"
    assert match(ref, {"z": np.zeros(36)}).points[0].confidence == "unmatched"        # zeros score 1 > 0.5
    assert match(ref, {"b": b}, agree=1e-4).points[0].confidence == "low"


def test_non_finite_values():
    """A NaN where the reference is finite is never a match; NaN where the reference holds NaN is."""
    x = RNG.standard_normal((1, 2, 2, 2))
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    assert match({"p": x}, {"c": bad}).points[0].confidence == "unmatched"
    assert match({"p": bad}, {"c": bad.copy()}).points[0].confidence == "exact"


def test_command_writes_a_trace_compare_reads(tmp_path, capsys):
    ref = _reference()
    mdref.save_trace(tmp_path / "ref.safetensors", ref)
    from mdref.formats.safetensors import write_safetensors
    write_safetensors(tmp_path / "cand.safetensors", _candidate(ref))
    argv = ["match", str(tmp_path / "ref.safetensors"), str(tmp_path / "cand.safetensors"), "-o",
            str(tmp_path / "mapped.safetensors")]
    assert cli.main(argv + ["--json"]) == 1                                    # `image` stays unmatched
    out = json.loads(capsys.readouterr().out)
    assert out["unmatched"] == ["image"] and out["counts"] == {"exact": 4, "high": 2, "low": 1, "unmatched": 1}
    mapped, manifest = mdref.load_trace(tmp_path / "mapped.safetensors")
    assert list(mapped) == [n for n in ref if n != "image"]
    assert manifest["match"]["unet.conv_in"] == {"tensor": "node_17", "layout": "channels_last", "err": 0.0,
                                                 "confidence": "exact"}
    report = mdref.compare(tmp_path / "ref.safetensors", tmp_path / "mapped.safetensors")
    assert report.first_divergence == "decoder.out"
    assert cli.main(argv) == 1 and "unmatched: image" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["match", "missing.safetensors", "{cand}", "-o", "{out}"], "missing.safetensors: no such trace file"),
    (["match", "{ref}", "{cand}", "-o", "{tmp}"], "-o"),
    (["match", "{ref}", "{cand}", "-o", "{out}", "--margin", "-1"], "--margin must be a number >= 0"),
    (["match", "{ref}", "{junk}", "-o", "{out}"], "not a readable trace file"),
])
def test_bad_input_is_one_error_line(argv, says, tmp_path, capsys):
    mdref.save_trace(tmp_path / "ref.safetensors", {"x": np.ones((1, 2), np.float32)})
    mdref.save_trace(tmp_path / "cand.safetensors", {"y": np.ones((1, 2), np.float32)})
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    fill = dict(ref=tmp_path / "ref.safetensors", cand=tmp_path / "cand.safetensors", out=tmp_path / "o.safetensors",
                tmp=tmp_path, junk=tmp_path / "junk.safetensors")
    assert cli.main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mdref: error: ") and says in err[0], err
    assert not (tmp_path / "o.safetensors").exists()
