"""The examples run as they stand: each numbered script exits 0 and writes its file; compare_with_diffusers.py,
on a random tiny diffusers pipeline built offline, finds every common point in agreement (float32 and float64,
within the parity-test tolerances 1e-5 / 1e-10 of max|reference|), shares at least 80% of mdref's points with
the diffusers trace, and with --perturb names exactly the perturbed layer as the first divergence."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mdref
from oracles import within

pytestmark = pytest.mark.numerics          # also run under other BLAS / oneDNN kernels (.ci/run)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

NUMBERED = {
    "01_tokenize.py": "mdref_tokens.npy",
    "02_text_encoder.py": "mdref_text_embeddings.npy",
    "03_unet_one_step.py": "mdref_x0.npy",
    "04_decode.py": "mdref_decoded.png",
    "05_pipeline.py": "mdref_pipeline.png",
    "06_trace_and_compare.py": "mdref_trace_b.safetensors",
}


@pytest.mark.parametrize("script", list(NUMBERED))
def test_numbered_example_runs(script, tmp_path):
    """`python examples/NN_name.py OUT` from the repository root: exit status 0 and the output file in OUT."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, str(EXAMPLES / script), str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / NUMBERED[script]).is_file(), run.stdout
    assert not [p for p in ROOT.glob("mdref_*") if p.is_file()], "examples must not write into the repository"


# ---- compare_with_diffusers.py ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def example():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("compare_with_diffusers", EXAMPLES / "compare_with_diffusers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def float32_run(example, tmp_path_factory):
    """The default invocation: builds the random tiny model itself (under OUT/model)."""
    out = tmp_path_factory.mktemp("compare-f32")
    status = example.main(["--out", str(out)])
    return out, status


def _report(out):
    """Recompute the report from the two trace files the example wrote (mdref is the reference)."""
    ours, _ = mdref.load_trace(out / "mdref.safetensors")
    theirs, manifest = mdref.load_trace(out / "diffusers.safetensors")
    return mdref.compare(ours, theirs), ours, manifest


def _check_agreement(out, status, tolerance):
    report, ours, _ = _report(out)
    worst = max(report.points, key=lambda p: p.rel_to_max)
    print(f"{out.name}: {len(report.points)} common points of mdref's {len(ours)}, only in mdref "
          f"{report.only_in_a}, only in diffusers {report.only_in_b}; largest rel-to-max error "
          f"{worst.rel_to_max:.3g} at {worst.name}")
    assert status == 0 and report.ok, report.first_divergence
    assert len(report.points) >= 0.8 * len(ours)
    within(f"{out.name}: largest rel-to-max error ({worst.name})", worst.rel_to_max, tolerance)


def test_compare_with_diffusers_float32(float32_run):
    out, status = float32_run
    _check_agreement(out, status, 1e-5)


def test_compare_with_diffusers_float64(example, float32_run, tmp_path):
    model = float32_run[0] / "model" / "sd-tiny"        # the same random model, as a --model folder
    status = example.main(["--model", str(model), "--dtype", "float64", "--out", str(tmp_path)])
    _check_agreement(tmp_path, status, 1e-10)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compare_with_diffusers_names_the_perturbed_layer(example, float32_run, tmp_path, dtype):
    model = float32_run[0] / "model" / "sd-tiny"
    status = example.main(["--model", str(model), "--dtype", dtype, "--perturb", "--out", str(tmp_path)])
    report, _, manifest = _report(tmp_path)
    print(f"{dtype}: perturbed {manifest['perturbed']}, compare named {report.first_divergence}")
    assert status == 1
    assert manifest["perturbed"].startswith("unet.mid_block.")
    assert report.first_divergence == manifest["perturbed"]
