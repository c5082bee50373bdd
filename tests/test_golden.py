"""The shipped golden bundle (weights/golden) of the embedded default model: today's code reproduces it.

The bundle was written by `mdref golden weights/golden` when the default model was exported. If a change to any
layer moves the default model's output, this test names the stage that moved (tokens, text embeddings, UNet output,
x0, image) with the measured error. Tolerance: 1e-5 of max |stored| in float32 — the stored arrays are float32
results of the same code; different BLAS builds or thread counts reorder sums (measured ~1e-7), not more.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from mdref.io.pipeline_folder import DEFAULT_MODEL_DIR
from mdref.pipeline import Pipeline
from mdref.trace import trace

GOLDEN = Path(__file__).resolve().parent.parent / "weights" / "golden"

pytestmark = pytest.mark.skipif(not (GOLDEN / "manifest.json").is_file() or not (DEFAULT_MODEL_DIR / "unet").is_dir(),
                                reason="no shipped golden bundle / default model")


def test_golden_bundle_reproduces():
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    pipe = Pipeline.from_pretrained()
    assert manifest["weights_sha256"] == pipe.weights_sha256(), "the default model changed: regenerate weights/golden"
    for case in manifest["cases"]:
        d = GOLDEN / case["name"]
        noise = np.load(d / "noise.npy")
        with trace("unet.out") as t:
            r = pipe.run(case["prompt"], noise=noise)
        np.testing.assert_array_equal(r.token_ids, np.load(d / "token_ids.npy"))
        np.testing.assert_array_equal(noise, np.random.Generator(np.random.PCG64(case["seed"])).standard_normal(
            noise.shape).astype(np.float32))
        for name, ours in (("text_embeddings", r.text_embeddings), ("unet_out", t["unet.out"]), ("x0", r.x0),
                           ("image", r.image)):
            ref = np.load(d / f"{name}.npy")
            err = np.abs(ours - ref).max() / np.abs(ref).max()
            assert err <= 1e-5, f"{case['name']} {name}: {err:.2e} of max|golden|"
