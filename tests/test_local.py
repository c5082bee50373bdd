"""Teacher-forced local error (issue 29): `compare(a, b, local=pipe)` / `mdref compare --local` re-runs mdref with
the candidate's value forced at every recorded point, so each layer's own error is measured apart from what it
inherits. A bug planted in one layer must show a large local error at that layer only."""

import json

import numpy as np
import pytest

import mdref
from mdref.cli import main
from mdref.comparison import TeacherForcing, compare
from mdref.trace import recording, save_trace

pytestmark = pytest.mark.numerics

PROMPT = "a large red circle on the left, blue background"


@pytest.fixture(scope="module")
def tiny():
    return mdref.Pipeline.from_preset("tiny", seed=0)


def _traced(pipe, **kw):
    with mdref.trace() as t:
        pipe.run(PROMPT, seed=0, **kw)
    t.meta.update(prompt=PROMPT, seed=0, precision=pipe.compute.name)
    return t


@pytest.mark.parametrize("where, key, point", [
    (("mid_block", "resnets", "0", "conv1", "depthwise", "bias"), 0, "unet.mid_block.resnets.0"),
    (("decoder", "up_blocks", "1", "resnets", "0", "norm2", "bias"), 3, "decoder.up_blocks.1.resnets.0"),   # its ResNet
])
def test_a_planted_bug_is_local_to_its_layer(tiny, where, key, point):
    """The bug's own point: large local error, the first local divergence; every point after it: local error
    within float32 rounding (the layers there compute from the buggy inputs exactly as the candidate did), while
    end to end they inherit the bug."""
    reference = _traced(tiny)
    params = (tiny.unet if where[0] != "decoder" else tiny.decoder).params
    for k in where[:-1]:
        params = params[k]
    params[where[-1]][key] += 0.5
    try:
        candidate = _traced(tiny)
    finally:
        params[where[-1]][key] -= 0.5
    r = compare(reference, candidate, local=tiny)
    names = [p.name for p in r.points]
    at = names.index(point)
    assert r.first_local_divergence == point, (r.first_local_divergence, point)
    assert r.first_divergence is not None and names.index(r.first_divergence) <= at
    by = {p.name: p for p in r.points}
    assert by[point].local["rel_to_max"] > 1e-3
    after = [p for p in r.points[at + 1:] if p.local is not None]
    assert after and all(p.local["ok"] for p in after), [(p.name, p.local) for p in after if not p.local["ok"]]
    assert any(not p.ok for p in after)                                 # ... though they inherit the bug end to end
    assert not r.ok
    worst = max(p.local["rel_to_max"] for p in after)
    print(f"{point}: local {by[point].local['rel_to_max']:.2e}; worst local after it {worst:.2e}")


def test_an_identical_candidate_has_no_local_error(tiny):
    a = _traced(tiny)
    r = compare(a, a, local=tiny)
    assert r.ok and r.first_local_divergence is None
    assert all(p.local is not None and p.local["max_abs"] == 0 for p in r.points)


def test_forcing_passes_the_candidates_values_on(tiny):
    """What flows on from a point is the candidate's array: forcing the text embeddings to zeros makes the UNet
    run on zeros (its time embedding stays mdref's own)."""
    a = _traced(tiny)
    forced = {"text_embeddings": np.zeros_like(a["text_embeddings"])}
    t = TeacherForcing(forced)
    with recording(t):
        tiny.run(PROMPT, seed=0)
    with mdref.trace() as ref:
        tiny.unet(a["noise"], 999, np.zeros_like(a["text_embeddings"]))
    np.testing.assert_array_equal(t.arrays["unet.out"], ref["unet.out"])
    np.testing.assert_array_equal(t.arrays["unet.time_embedding"], a["unet.time_embedding"])


def test_the_command_reports_local_errors(tiny, tmp_path, capsys):
    reference = _traced(tiny)
    conv = tiny.unet.params["conv_in"]["bias"]
    conv[0] += 0.5
    try:
        candidate = _traced(tiny)
    finally:
        conv[0] -= 0.5
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_trace(a, reference)
    save_trace(b, candidate)
    code = main([str(a), str(b)][:0] + ["compare", str(a), str(b), "--local", "--preset", "tiny", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["first_local_divergence"] == "unet.conv_in"
    points = {p["name"]: p for p in out["points"]}
    assert points["unet.conv_in"]["local"]["ok"] is False and points["unet.out"]["local"]["ok"] is True
    code = main(["compare", str(a), str(b), "--local", "--preset", "tiny"])
    text = capsys.readouterr().out
    assert code == 1 and "FIRST LOCAL DIVERGENCE" in text and "first local divergence: unet.conv_in" in text
    code = main(["compare", str(a), str(b), "--preset", "tiny"])
    assert code == 2 and "applies only with --local" in capsys.readouterr().err
