"""Issue 27: trust that travels. `compare` cannot be fooled (integer points exact, tolerance per point from its
declared precision, a broken pipe keeps the status), the last bad inputs end in one named error, and the kernel
that ran is recorded.

Every case below failed on the code before this change: ids off by 4 agreed, a float16 image loosened a float32
UNet point to 2e-2, a float16 trace saved as float32 arrays was judged at 1e-4, `compare | head` exited 0, ...
"""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mdref
from mdref.cli import main
from mdref.comparison import compare
from mdref.io import ConfigError
from mdref.trace import TraceError, load_trace, save_trace
from oracles import kernel

pytestmark = pytest.mark.numerics          # also run under other BLAS / oneDNN kernels (.ci/run)

ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err):
    lines = [line for line in err.splitlines() if line.startswith("mdref: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- the kernel that ran ----------------------------------------------------------------------------------------
def test_the_kernel_that_ran_is_recorded(record_property):
    """The BLAS kernel and thread count of this run are known (the pytest header prints them), and a forced
    kernel (OPENBLAS_CORETYPE, as .ci/run's second pass sets it) is the one that runs."""
    k = kernel()
    record_property("kernel", json.dumps(k))
    print("kernel:", k)
    assert k["numpy_blas"].startswith("openblas")
    forced = os.environ.get("OPENBLAS_CORETYPE")
    if forced:
        assert forced.lower() in k["numpy_blas"].lower(), (forced, k)
    if os.environ.get("OPENBLAS_NUM_THREADS") == "1":
        assert k["numpy_blas"].endswith(" 1 threads"), k


# ---- compare cannot be fooled ----------------------------------------------------------------------------------
def _trace(**points):
    return {k: np.asarray(v) for k, v in points.items()}


def test_integer_points_are_compared_exactly():
    ids = np.array([[49406, 320, 1125, 49407, 49407]], np.int64)
    off = ids.copy()
    off[0, 2] += 1                                          # a tokenizer bug: one id off by one
    image = np.linspace(0, 1, 12, dtype=np.float32)
    r = compare(_trace(tokens=ids, image=image), _trace(tokens=off, image=image))
    assert r.first_divergence == "tokens" and r.points[0].precision == "exact" and r.points[0].rtol is None
    r = compare(_trace(tokens=ids), _trace(tokens=off), rtol=1.0)   # no tolerance makes ids agree
    assert r.first_divergence == "tokens"
    r = compare(_trace(tokens=ids), _trace(tokens=ids.astype(np.float32)))   # saved as floats: equal values agree
    assert r.ok


def test_a_float16_image_does_not_loosen_a_float32_point():
    g = np.random.default_rng(0)
    unet = g.standard_normal((1, 8, 4, 4)).astype(np.float32)
    image = g.uniform(0, 1, (1, 3, 8, 8)).astype(np.float32)
    cand = _trace(**{"unet.out": unet * 1.01, "image": image.astype(np.float16)})   # 1% off in float32
    r = compare(_trace(**{"unet.out": unet, "image": image}), cand)
    assert r.first_divergence == "unet.out"
    by = {p.name: p for p in r.points}
    assert by["unet.out"].rtol == 1e-4 and by["image"].rtol == 2e-2 and by["image"].precision == "float16"


def test_the_declared_precision_is_what_counts(tmp_path):
    """A runtime that computes in float16 and saves float32 arrays declares it; undeclared, the stored dtype counts."""
    g = np.random.default_rng(1)
    ref = _trace(**{"unet.out": g.standard_normal(64).astype(np.float64)})
    cand = {"unet.out": (ref["unet.out"] * (1 + 1e-3)).astype(np.float32)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_trace(a, ref, {"precision": "float64"})
    save_trace(b, cand)
    assert compare(a, b).first_divergence == "unet.out"              # float32: 1e-3 is over 1e-4
    save_trace(b, cand, {"precision": "float16"})
    r = compare(a, b)
    assert r.ok and r.points[0].precision == "float16"
    save_trace(b, cand, {"precision": "float16", "point_precision": {"unet.out": "float32"}})
    assert compare(a, b).first_divergence == "unet.out"              # the point's own declaration wins
    assert load_trace(b)[1]["point_precision"] == {"unet.out": "float32"}


def test_old_style_precision_descriptions_still_read(tmp_path):
    p = tmp_path / "t.safetensors"
    save_trace(p, {"x": np.ones(3, np.float32)}, {"precision": "float16, upcast attention"})
    assert compare(p, p).points[0].precision == "float16"


@pytest.mark.parametrize("manifest, needle", [
    ({"precision": "float8"}, "precision\" must be one of float64, float32, float16, bfloat16 (or null), found 'float8'"),
    ({"point_precision": {"x": "half"}}, "point_precision\" of 'x' must be one of"),
    ({"point_precision": {"y": "float16"}}, "names 'y', which is not a tensor"),
    ({"point_precision": ["x"]}, "expected manifest \"point_precision\" to be an object"),
])
def test_bad_precision_declarations_are_named(tmp_path, capsys, manifest, needle):
    from mdref.formats.safetensors import write_safetensors

    p = tmp_path / "t.safetensors"
    write_safetensors(p, {"x": np.ones(2, np.float32)}, {"mdref_manifest": json.dumps(manifest)})
    code, _, err = run(["compare", p, p], capsys)
    assert code == 2 and needle in one_error(err)


def test_a_dtypes_entry_that_contradicts_the_tensor_is_an_error(tmp_path, capsys):
    from mdref.formats.safetensors import write_safetensors

    p = tmp_path / "t.safetensors"
    write_safetensors(p, {"unet.out": np.ones(2, np.float32)},
                      {"mdref_manifest": json.dumps({"dtypes": {"unet.out": "float16"}})})
    with pytest.raises(TraceError, match="'unet.out' is float16, but the file stores it as float32"):
        load_trace(p)
    code, _, err = run(["compare", p, p], capsys)
    assert code == 2 and "'unet.out'" in one_error(err)


def test_require_all(tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_trace(a, {"x": np.ones(2, np.float32), "y": np.ones(2, np.float32)})
    save_trace(b, {"x": np.ones(2, np.float32), "z": np.ones(2, np.float32)})
    assert run(["compare", a, b], capsys)[0] == 0
    code, out, _ = run(["compare", a, b, "--require-all"], capsys)
    assert code == 1 and "missing on one side" in out
    code, out, _ = run(["compare", a, b, "--require-all", "--json"], capsys)
    d = json.loads(out)
    assert code == 1 and d["ok"] is False and d["only_in_a"] == ["y"] and d["only_in_b"] == ["z"]


def test_complex_points_are_refused():
    with pytest.raises(ValueError, match="point 'x' holds complex128 values"):
        compare({"x": np.ones(2)}, {"x": np.ones(2) + 1j})


def test_save_trace_refuses_what_load_trace_would(tmp_path):
    for bad, needle in (({5: np.ones(2)}, "non-empty strings, found 5"), ({"": np.ones(2)}, "found ''"),
                        ({"x": np.ones(2) + 1j}, "complex128"), ({"x\udcff": np.ones(2)}, "not valid Unicode")):
        with pytest.raises(TraceError, match=needle):
            save_trace(tmp_path / "t.safetensors", bad)
        assert list(tmp_path.iterdir()) == []


def test_a_broken_pipe_keeps_the_status(tmp_path):
    """`mdref compare a b | head -1` on diverging traces: mdref's own exit status is 1, not 0."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    names = [f"p{i}" for i in range(2000)]                # a long report, so the pipe closes mid-way
    save_trace(a, {n: np.ones(4, np.float32) for n in names})
    save_trace(b, {n: np.full(4, 2.0, np.float32) for n in names})
    for extra in ([], ["--json"]):
        p = subprocess.Popen([sys.executable, "-m", "mdref", "compare", str(a), str(b), *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        p.stdout.readline()
        p.stdout.close()                                   # what `| head -1` does
        assert p.wait(timeout=60) == 1, extra
        assert b"Traceback" not in p.stderr.read()


# ---- float32 against the float64 golden, at compare's defaults -------------------------------------------------
@pytest.mark.parametrize("source", ["default", "tiny", "mobilediffusion"])
def test_a_float32_trace_agrees_with_the_float64_trace_at_the_defaults(source):
    """What a runtime author does: a float32 trace (here mdref's own) against the float64 ground truth, with no
    tolerance given. Every point must agree, unet.time_embedding included (POINT_RTOL: its sinusoid is
    ill-conditioned in float32), for the shipped model and every pipeline preset (mobilediffusion at 128x128)."""
    def traced(dtype):
        pipe = (mdref.Pipeline.from_pretrained(None, dtype=dtype) if source == "default"
                else mdref.Pipeline.from_preset(source, seed=0, dtype=dtype))
        size = dict(height=128, width=128) if source == "mobilediffusion" else {}
        with mdref.trace() as t:
            pipe.run("a large red circle on the left, blue background", seed=0, **size)
        t.meta["precision"] = pipe.compute.name
        return t
    r = compare(traced(np.float64), traced(np.float32))
    worst = max(r.points, key=lambda p: (p.rel_to_max or 0) / (p.rtol or 1))
    print(f"{source}: {len(r.points)} points; closest to its tolerance {worst.name} {worst.rel_to_max:.2e} "
          f"(rtol {worst.rtol:g})")
    assert r.ok, (r.first_divergence, [(p.name, p.rel_to_max, p.rtol) for p in r.points if not p.ok][:3])


# ---- the last bad inputs ---------------------------------------------------------------------------------------
def _folder(tmp_path):
    """A pipeline folder of the tiny preset."""
    pipe = mdref.Pipeline.from_preset("tiny")
    root = tmp_path / "model"
    pipe.text_encoder.save_pretrained(root / "text_encoder")
    pipe.unet.save_pretrained(root / "unet")
    pipe.decoder.save_pretrained(root / "vae")
    return root


@pytest.mark.parametrize("edit, needle", [
    (lambda d: '{"a": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
    (lambda d: json.dumps(d)[:-1] + ', "in_channels": 8}', "'in_channels' appears twice"),
    (lambda d: json.dumps({**d, "layers_per_block": 10 ** 9}), "layers_per_block must be an int in [1, 64], found 1000000000"),
    (lambda d: json.dumps({**d, "block_out_channels": [32, 64, 10 ** 6]}), "must be an int in [1, 65_536]"),
    (lambda d: json.dumps({**d, "transformer_layers_per_block": 1e9}), "must be an int in [0, 64]"),
    (lambda d: json.dumps({**d, "mid_transformer_layers": 10 ** 12}), "in [1, 64]"),
])
def test_bad_unet_config_is_refused_before_anything_is_built(tmp_path, capsys, edit, needle):
    root = _folder(tmp_path)
    cfg = root / "unet" / "config.json"
    cfg.write_text(edit(json.loads(cfg.read_text())))
    t0 = time.perf_counter()
    code, _, err = run(["info", "--model", root], capsys)
    assert code == 2 and needle in one_error(err) and str(cfg) in err
    assert time.perf_counter() - t0 < 20


def test_bad_scheduler_and_text_configs(tmp_path, capsys):
    root = _folder(tmp_path)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "MDRefScheduler", "num_train_timesteps": 10 ** 12, "beta_start": 1e-4, "beta_end": 0.02,
         "beta_schedule": "linear", "prediction_type": "sample"}))
    code, _, err = run(["info", "--model", root], capsys)
    assert code == 2 and "num_train_timesteps must be an int in [2, 100_000]" in one_error(err)
    (root / "scheduler" / "scheduler_config.json").unlink()
    cfg = root / "text_encoder" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "num_hidden_layers": 10 ** 9}))
    code, _, err = run(["info", "--model", root], capsys)
    assert code == 2 and "num_hidden_layers must be an int in [1, 64]" in one_error(err)


def test_weights_beyond_the_memory_limit_are_refused_before_they_are_drawn(monkeypatch):
    monkeypatch.setenv("MDREF_MAX_MEMORY", "64M")
    cfg = dict(mdref.io.presets.PIPELINE_PRESETS["tiny"]["unet"], block_out_channels=[1024, 1024, 1024],
               norm_num_groups=8)
    with pytest.raises(ConfigError, match=r"UNet.from_config: the config's weights need .* GiB, more than the "
                                          r"0.1 GiB memory limit \(MDREF_MAX_MEMORY\)"):
        mdref.UNet.from_config(cfg)


def test_seeds_of_seeded_weights_are_checked():
    for bad in (1.5, -1, 2 ** 64, True, "3"):
        with pytest.raises(ValueError, match=r"seed must be an integer with 0 <= seed < 2\*\*64"):
            mdref.Pipeline.from_preset("tiny", seed=bad)
        with pytest.raises(ValueError, match=r"UNet.from_config: seed must be an integer"):
            mdref.UNet.from_preset("mobilediffusion", seed=bad)
    # The largest seed: each component's seed (seed + its offset) wraps modulo 2**64, for a Python int as for
    # numpy's uint64 (which wraps by itself), so both give the same weights.
    a = mdref.Pipeline.from_preset("tiny", seed=np.uint64(2 ** 64 - 1))
    b = mdref.Pipeline.from_preset("tiny", seed=2 ** 64 - 1)
    wrapped = mdref.UNet.from_config(b.unet.config, seed=0)                 # the UNet's offset is 1: 2**64 -> 0
    assert np.array_equal(a.unet.params["conv_in"]["weight"], b.unet.params["conv_in"]["weight"])
    assert np.array_equal(b.unet.params["conv_in"]["weight"], wrapped.params["conv_in"]["weight"])


def test_memory_limit_in_golden_is_one_named_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mdref", "golden", str(tmp_path / "g")], capture_output=True,
                       text=True, env=dict(ENV, MDREF_MAX_MEMORY="1K"))
    assert r.returncode == 2 and "needs about" in one_error(r.stderr) and "MDREF_MAX_MEMORY" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_default_model_folder_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mdref", "generate", "x", "-o", str(tmp_path / "o.png")],
                       capture_output=True, text=True, env=dict(ENV, MDREF_DEFAULT_MODEL=str(tmp_path / "missing")))
    assert r.returncode == 2 and "MDREF_DEFAULT_MODEL=" in one_error(r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_golden_leaves_nothing_behind(tmp_path):
    out = tmp_path / "g"
    p = subprocess.Popen([sys.executable, "-m", "mdref", "golden", str(out), "--preset", "mobilediffusion"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not any(tmp_path.glob(".mdref-*.tmp")):
        time.sleep(0.05)                                   # the temporary bundle exists: the write is under way
    assert any(tmp_path.glob(".mdref-*.tmp")), p.stderr.read() if p.poll() is not None else "no temporary bundle"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143
    assert b"Traceback" not in p.stderr.read()
    assert list(tmp_path.iterdir()) == []


def test_replaced_outputs_keep_their_mode(tmp_path, capsys):
    png, trace_file = tmp_path / "o.png", tmp_path / "t.safetensors"
    for path, argv in ((png, ["generate", "x", "-o", png]), (trace_file, ["trace", "x", "-o", trace_file])):
        path.write_bytes(b"old")
        path.chmod(0o600)
        code, _, err = run(argv + ["--preset", "tiny"], capsys)
        assert code == 0, err
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() != b"old"


@pytest.mark.parametrize("suffix, fmt", [(".jpg", "JPEG"), (".JPEG", "JPEG"), (".webp", "WEBP"), (".png", "PNG")])
def test_the_image_format_follows_the_extension(tmp_path, capsys, suffix, fmt):
    out = tmp_path / f"o{suffix}"
    code, _, err = run(["generate", "a red circle", "-o", out, "--preset", "tiny", "--seed", "3"], capsys)
    assert code == 0, err
    with Image.open(out) as im:
        assert im.format == fmt and im.size == (64, 64)
        if fmt == "JPEG":
            assert json.loads(im.info["comment"])["seed"] == "3"


def test_only_the_weights_read_are_hashed(tmp_path):
    root = _folder(tmp_path)
    (root / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"never read")
    (root / "unused").mkdir()
    (root / "unused" / "big.safetensors").write_bytes(b"never read")
    hashed = mdref.Pipeline.from_pretrained(root).weights_sha256()
    assert set(hashed) == {"text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                           "vae/diffusion_pytorch_model.safetensors"}


def test_the_readme_noise_of_every_draw_works_at_one_step(tmp_path, capsys):
    """The README's noise layout [steps, B, C, h, w] at --steps 1 is [1, B, C, h, w]: the CLI takes it as the API."""
    noise = np.random.default_rng(0).standard_normal((1, 1, 8, 8, 8))
    np.save(tmp_path / "n.npy", noise)
    code, _, err = run(["generate", "x", "-o", tmp_path / "a.png", "--preset", "tiny", "--noise",
                        tmp_path / "n.npy"], capsys)
    assert code == 0, err
    api = mdref.Pipeline.from_preset("tiny").run("x", noise=noise)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), api.pixels[0])


def test_schema_mismatch_is_one_line(tmp_path, capsys):
    root = _folder(tmp_path)
    from mdref.formats.safetensors import read_safetensors, write_safetensors

    f = root / "unet" / "diffusion_pytorch_model.safetensors"
    t, meta = read_safetensors(f)
    t.pop("conv_in.bias")
    t["stray.weight"] = np.ones(2, np.float32)
    write_safetensors(f, t, meta)
    code, _, err = run(["info", "--model", root], capsys)
    line = one_error(err)
    assert code == 2 and err.strip() == line
    assert "missing keys (1): conv_in.bias; unexpected keys (1): stray.weight" in line


def test_output_encoding_and_locale(tmp_path):
    """PYTHONIOENCODING=ascii: non-ASCII text is escaped, not a UnicodeEncodeError. A non-UTF-8 locale (ASCII,
    no UTF-8 mode): the prompt's UTF-8 bytes are still read as the prompt they spell."""
    r = subprocess.run([sys.executable, "-m", "mdref", "precision", "gr\u00f6\u00dfer", "--preset", "tiny",
                        "--points", "unet.out"], capture_output=True, env=dict(ENV, PYTHONIOENCODING="ascii"))
    assert r.returncode == 0, r.stderr
    assert b"gr\\xf6\\xdfer" in r.stdout
    out = tmp_path / "o.png"
    env = dict(ENV, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    r = subprocess.run([sys.executable, "-m", "mdref", "generate", "gr\u00f6\u00dfer".encode("utf-8"), "-o",
                        str(out), "--preset", "tiny"], capture_output=True, env=env)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.text["prompt"] == "gr\u00f6\u00dfer"


def test_a_size_the_model_was_not_trained_at_warns(tmp_path, capsys):
    code, _, err = run(["generate", "a red circle", "-o", tmp_path / "o.png", "--height", "128", "--width", "128"],
                       capsys)
    assert code == 0 and "trained at 64x64; at 128x128" in err
    code, _, err = run(["generate", "a red circle", "-o", tmp_path / "o.png"], capsys)
    assert code == 0 and "trained at" not in err
