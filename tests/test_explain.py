"""`mdref explain` and mdref.explain: the recorded attention is the layer's attention, the maps are distributions
that differ per token, recording costs nothing when off, the command's error path, and the page in a real browser
(headless Chromium; skipped without one, except under CI=... where a missing browser fails)."""

import inspect
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mdref
from mdref import explain, unet
from mdref.cli import main
from mdref.params import tree

from devtools import DevTools, chromium_or_skip

PROMPT = "a large red circle on the left, blue background"
TOKENS = ["<|startoftext|>", "a", "large", "red", "circle", "on", "the", "left", ",", "blue", "background",
          "<|endoftext|>"]
SECTIONS = ["tokens", "text-encoder", "noise", "unet", "attention", "decoder"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def pipe():
    return mdref.Pipeline.from_pretrained()


# ---- the recorded attention is the layer's attention ------------------------------------------------------------
def _known_layer(P):
    """unet.attention inputs whose attention weights are P [heads, N, T] exactly: identity projections, one-hot
    keys (key j of every head is e_j, d = T) and queries log(P) * sqrt(d), so q k_j / sqrt(d) = log P[:, :, j]."""
    heads, N, T = P.shape
    d = T
    x = (np.log(P) * np.sqrt(d)).transpose(1, 0, 2).reshape(1, N, heads * d)       # [1, N, heads*d]
    context = np.eye(T)[None]                                                      # [1, T, T]
    params = tree(dict(to_q={"weight": np.eye(heads * d)}, to_kv={"weight": np.tile(np.eye(T), (heads, 1))},
                       to_out={"0": {"weight": np.eye(heads * d)}}), "blk.attn2")
    return x, context, params


def _random_attention(rng, heads, N, T):
    P = rng.uniform(0.05, 1.0, (heads, N, T))
    return P / P.sum(-1, keepdims=True)


def test_recorded_probabilities_equal_the_known_attention_of_a_hand_built_layer():
    rng = np.random.default_rng(0)
    P = _random_attention(rng, heads=2, N=4, T=5)
    x, context, params = _known_layer(P)
    with mdref.trace("nothing", on_request="blk.attn2.probs") as t:
        out = unet.attention(x, context, **params, heads=2, shared_kv=True, name=params)     # named by its path
    assert t.names() == ["blk.attn2.probs"]
    np.testing.assert_allclose(t["blk.attn2.probs"], P[None], rtol=1e-12, atol=0)
    # the layer's output is the known attention applied to the values (value j of each head is e_j): P itself
    np.testing.assert_allclose(out, P.transpose(1, 0, 2).reshape(1, 4, 10), rtol=1e-12, atol=1e-15)


def test_the_map_of_a_known_attention_is_its_head_mean_upsampled_and_normalised():
    rng = np.random.default_rng(1)
    P = _random_attention(rng, heads=2, N=4, T=5)                                  # a 2x2 grid, 5 tokens
    x, context, params = _known_layer(P)
    with mdref.trace("nothing", on_request="*.probs") as t:
        unet.attention(x, context, **params, heads=2, shared_kv=True, name="blk.attn2")
    maps = explain.attention_maps(t, n_tokens=3, image_size=(8, 8), tokens=["s", "x", "e"])
    assert list(maps.blocks) == ["blk"] and maps.grids["blk"] == (2, 2)
    for j in range(3):
        expected = np.kron(P[:, :, j].mean(0).reshape(2, 2), np.ones((4, 4)))    # nearest 2x2 -> 8x8
        expected /= expected.sum()
        np.testing.assert_allclose(maps.overall[j], expected, rtol=1e-12)
        np.testing.assert_allclose(maps.blocks["blk"][j], expected, rtol=1e-12)
    np.testing.assert_allclose(maps.share["blk"], P.mean(axis=(0, 1))[:3], rtol=1e-12)


@pytest.mark.parametrize("weighting", ["softmax", "relu"])
def test_attention_probs_are_the_plain_formula(weighting):
    """attention_probs against softmax(q k^T / sqrt(d)) (or relu(.) / T) written out per head here."""
    rng = np.random.default_rng(2)
    B, N, T, heads, d = 2, 6, 7, 3, 4
    q, k = rng.standard_normal((B, N, heads * d)), rng.standard_normal((B, T, heads * d))
    got = unet.attention_probs(q, k, heads=heads, weighting=weighting)
    assert got.shape == (B, heads, N, T)
    for b in range(B):
        for h in range(heads):
            s = q[b, :, h * d:(h + 1) * d] @ k[b, :, h * d:(h + 1) * d].T / np.sqrt(d)
            w = np.exp(s - s.max(1, keepdims=True)) if weighting == "softmax" else np.maximum(s, 0) / T
            w = w / w.sum(1, keepdims=True) if weighting == "softmax" else w
            np.testing.assert_allclose(got[b, h], w, rtol=1e-12, atol=1e-15)


def test_recording_the_probabilities_costs_nothing_when_off(pipe, monkeypatch):
    """Without an on-request trace the probabilities are never computed, not even under a trace of everything."""
    def refuse(*a, **k):
        raise AssertionError("attention_probs was called")

    before = pipe.run("a red circle", seed=3).pixels
    monkeypatch.setattr(unet, "attention_probs", refuse)
    assert np.array_equal(pipe.run("a red circle", seed=3).pixels, before)
    with mdref.trace() as t:
        pipe.run("a red circle", seed=3)
    assert t.names() and not [n for n in t.names() if n.endswith(".probs")]
    with pytest.raises(AssertionError, match="attention_probs was called"):
        with mdref.trace("unet.out", on_request="*.attn2.probs"):
            pipe.run("a red circle", seed=3)


# ---- the maps of the default model -------------------------------------------------------------------------------
def test_cross_attention_maps_of_the_default_model(pipe):
    pairs, per_block = explain.cross_attention_maps(pipe, PROMPT, seed=0, per_block=True)
    assert [t for t, _ in pairs] == TOKENS
    H, W = pipe.default_size()
    for token, m in pairs:
        assert m.shape == (H, W) and m.dtype == np.float64 and (m >= 0).all()
        assert abs(m.sum() - 1) < 1e-9, token
    for i in range(len(pairs)):                   # maps differ between tokens
        for j in range(i + 1, len(pairs)):
            assert np.abs(pairs[i][1] - pairs[j][1]).max() > 1e-4 * pairs[i][1].max(), (TOKENS[i], TOKENS[j])
    assert len(per_block) == 7                    # the default UNet's cross-attention blocks
    for block, bp in per_block.items():
        assert [t for t, _ in bp] == TOKENS and block.startswith("unet.")
        assert all(abs(m.sum() - 1) < 1e-9 and m.shape == (H, W) for _, m in bp)
    # the overall map is the blocks' mean (each block a distribution, so the mean is one too)
    np.testing.assert_allclose(pairs[4][1], np.mean([bp[4][1] for bp in per_block.values()], axis=0), rtol=1e-12)
    again = explain.cross_attention_maps(pipe, PROMPT, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(pairs, again))
    other = explain.cross_attention_maps(pipe, PROMPT, seed=1)
    assert not np.array_equal(pairs[4][1], other[4][1])


def test_more_steps_average_the_repeated_blocks(pipe):
    pairs = explain.cross_attention_maps(pipe, "a red circle", seed=0, steps=2)
    assert [t for t, _ in pairs][1:4] == ["a", "red", "circle"]
    assert all(abs(m.sum() - 1) < 1e-9 for _, m in pairs)


def test_mdref_explain_is_imported_on_first_use():
    code = ("import sys, mdref; assert 'mdref.explain' not in sys.modules; "
            "assert mdref.explain.cross_attention_maps is sys.modules['mdref.explain'].cross_attention_maps")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_prompt_must_be_one_string(pipe):
    with pytest.raises(mdref.pipeline.InputError, match="prompt must be one str"):
        explain.cross_attention_maps(pipe, ["a", "b"])


# ---- the page ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def page_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("explain") / "page.html"
    t0 = time.perf_counter()
    assert main(["explain", PROMPT, "-o", str(path)]) == 0
    return path, time.perf_counter() - t0


def test_the_page_is_self_contained_and_has_every_section(page_file):
    path, _ = page_file
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text and "<link" not in text and "@import" not in text
    external = re.findall(r"""(?:src|href)\s*=\s*["'](?!data:|#)([^"']*)""", text) \
        + re.findall(r"url\((?!data:)([^)]*)\)", text)
    assert external == []
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in text
    assert len(re.findall(r'<img class="token-map', text)) == len(TOKENS)


def test_the_page_quotes_the_docstrings_and_cites_the_code(page_file):
    import html

    text = page_file[0].read_text(encoding="utf-8")
    assert html.escape(inspect.getdoc(mdref.sampler.predict_x0)) in text
    assert html.escape(inspect.getdoc(mdref.Pipeline.decode)) in text
    for fn in (unet.attention, unet.resnet, unet.attention_probs, mdref.text_encoder.encoder_layer):
        line = inspect.getsourcelines(fn)[1]
        assert f"mdref/{fn.__module__.split('.')[-1]}.py:{line} {fn.__name__}" in text, fn.__name__
    assert html.escape(inspect.getsource(unet.attention_probs).strip()) in text      # the source, at the end


ROOT = Path(__file__).resolve().parent.parent


def test_every_citation_is_the_def_line_of_the_function_shown(page_file):
    """The page cites the code that ran: every 'mdref/<file>.py:N name' it shows (links and the sources at the end)
    is the line of `def name` in that file, the emulated ops included (issue 27: they were cited at the decorator's
    file, mdref/precision.py, while their code is in mdref/ops.py)."""
    text = page_file[0].read_text(encoding="utf-8")
    labels = set(re.findall(r"<code>(mdref/[\w/]+\.py):(\d+) ([\w.]+)</code>", text))
    assert len(labels) > 30
    shown = {name.rsplit(".", 1)[-1] for _, _, name in labels}
    assert {"layer_norm", "conv2d", "attention", "resnet", "block", "__call__"} <= shown, shown
    for path, line, name in labels:
        source = (ROOT / path).read_text().splitlines()[int(line) - 1]
        assert re.match(rf"\s*def {re.escape(name.rsplit('.', 1)[-1])}\(", source), (path, line, name, source)
    assert "mdref/precision.py" not in text


def test_every_recorded_point_has_the_function_that_computed_it(pipe):
    """explain.POINT_FUNCTIONS covers every point a run records (guided, two steps, every on-request point, a TAESD
    decoder's), and its rows for the UNet's layer kinds name the functions unet.LAYERS calls."""
    with mdref.trace(None, on_request="*") as t:
        pipe.run(PROMPT, seed=0, steps=2, guidance_scale=2.0, negative_prompt="green")
    taesd = mdref.Decoder.from_preset("taesd")
    with mdref.trace() as td:
        taesd(np.zeros((1, 4, 8, 8), np.float32))
    assert [n for n in t.names() if explain.computed_by(n) is None] == []
    assert [n for n in td.names() if explain.computed_by(n, "tiny") is None] == []
    assert explain.computed_by("decoder.out", "tiny") is mdref.decoder.taesd_decode
    groups = {"resnet": "resnets", "transformer": "attentions", "downsample": "downsamplers", "upsample": "upsamplers"}
    assert set(unet.LAYERS) == set(groups)
    for kind, group in groups.items():
        fn = explain.computed_by(f"unet.up_blocks.1.{group}.0")
        assert fn.__name__ in unet.LAYERS[kind].__code__.co_names, (kind, fn)


def _listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--model", "{tmp}/no-model"], "no such folder"),
    (["--steps", "0"], "--steps must be an integer"),
    (["--seed", "-1"], "--seed"),
    (["--noise", "{tmp}/missing.npy"], "no such file"),
    (["--noise", "{tmp}/wrong.npy"], "has shape (1, 8, 4, 4), expected (1, 8, 8, 8)"),
    (["--steps", "x"], "invalid int value"),
])
def test_explain_bad_input_exits_2_and_leaves_nothing(tmp_path, capsys, argv, message):
    np.save(tmp_path / "wrong.npy", np.zeros((1, 8, 4, 4)))
    before = _listing(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["explain", "a red circle", "-o", str(tmp_path / "page.html")] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mdref: error: ") and message in err and err.count("\n") == 1, err
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("output, message", [("{tmp}/missing/page.html", "no such folder"),
                                             ("{tmp}", "exists and is a folder"), ("", "empty path")])
def test_explain_bad_output_exits_2_before_running(tmp_path, capsys, output, message):
    before = _listing(tmp_path)
    assert main(["explain", "a red circle", "-o", output.replace("{tmp}", str(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mdref: error: -o") and message in err, err
    assert _listing(tmp_path) == before


def test_explain_in_a_subprocess_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mdref", "explain", "x", "-o", str(tmp_path / "p.html"), "--steps",
                        "-3"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("mdref: error: --steps")
    assert _listing(tmp_path) == []


# ---- in a real browser -------------------------------------------------------------------------------------------
CHECKS = """(() => {
  const ids = %s;
  const maps = [...document.querySelectorAll("#attention img.token-map")];
  return {
    sections: ids.filter(id => { const s = document.getElementById(id);
                                 return s && s.tagName === "SECTION" && s.getBoundingClientRect().height > 100; }),
    tokens: maps.map(i => i.alt),
    shown: maps.filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width >= 64).length,
    broken: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    images: document.images.length,
    width: document.documentElement.scrollWidth, height: document.documentElement.scrollHeight,
  };
})()"""


def test_the_page_renders_in_headless_chromium(page_file, tmp_path):
    exe = chromium_or_skip()
    path, _ = page_file
    tools = DevTools(exe, tmp_path / "profile")
    try:
        session = tools.open(path.as_uri(), width=1200, height=900)
        result = tools.evaluate(session, CHECKS % json.dumps(SECTIONS))
        png = tools.screenshot(session, 1200, min(result["height"], 16000))
    finally:
        tools.close()
    ARTIFACTS.mkdir(exist_ok=True)
    for where in (ARTIFACTS / "explain-page.png", tmp_path / "explain-page.png"):
        where.write_bytes(png)
    assert tools.errors() == []
    assert [u for u in tools.requested() if not (u.startswith("data:") or u == path.as_uri())] == []
    assert result["sections"] == SECTIONS
    assert result["tokens"] == TOKENS and result["shown"] == len(TOKENS)
    assert result["broken"] == [] and result["images"] > len(TOKENS)
    assert result["width"] <= 1200 + 1
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
