"""Golden bundles: fixed prompts and seeds run through a pipeline, every intermediate saved in formats any
language reads (.npy, .png, safetensors, JSON), so a runtime can be checked stage by stage.

DIR must not exist, or be an empty folder: mdref never mixes a new bundle with old files (remove an old bundle
first). The bundle is written into a temporary folder next to DIR and renamed to DIR at the end, so a failure
(a full disk, an interrupt) leaves nothing behind; see mdref.outputs.

Layout (documented in the README):
    DIR/manifest.json                 model, versions, conventions, the list of cases and files
    DIR/<case>/token_ids.npy          int64 [1, 77]
    DIR/<case>/text_embeddings.npy    [1, 77, D]   text encoder last hidden state
    DIR/<case>/noise.npy              [1, C, h, w] initial latent noise
    DIR/<case>/timesteps.npy          int64 [steps] the UNet's timesteps, in call order
    DIR/<case>/unet_out.npy           [1, C, h, w] raw UNet output of the (last) step
    DIR/<case>/x0.npy                 [1, C, h, w] clean latent
    DIR/<case>/decoder_input.npy      [1, C, h, w] what the decoder is fed: x0 / scaling_factor + shift_factor
    DIR/<case>/image.npy              [1, 3, H, W] decoder output, float in [-1, 1]
    DIR/<case>/image.png              8-bit image: round(clip((x + 1) / 2, 0, 1) * 255)
    DIR/<case>/trace.safetensors      every traced point (mdref trace format)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import __version__
from .outputs import atomic_dir
from .trace import save_trace, trace

__all__ = ["GOLDEN_CASES", "write_golden"]

GOLDEN_CASES = [
    ("a large red circle on the left, blue background", 0),
    ("a small yellow triangle at the top, black background", 1),
    ("green background, a large white square in the center", 2),
    ("a purple circle", 3),
]


# How the arrays of a bundle are stored, by compute dtype (the values are those the run held: rounded when emulated).
ARRAYS = {"float16": "float16 (the emulated run's values, exactly)",
          "bfloat16": "float32 holding bfloat16 values (.npy has no bfloat16; every value is exactly a bfloat16)"}


def _as_float16(a):
    a = np.asarray(a)
    return a.astype(np.float16) if a.dtype.kind == "f" else a


def write_golden(pipe, directory, *, cases=GOLDEN_CASES, dtype_name="float32", points=None):
    """Run each (prompt, seed) case and write the bundle into the new (or empty) folder `directory`; returns the
    manifest dict. Raises mdref.outputs.OutputError (before any case is run) if `directory` cannot be used."""
    manifest = {}
    atomic_dir(directory, lambda tmp: manifest.update(_fill(pipe, Path(tmp), cases, dtype_name, points)), "DIR")
    return manifest


def _fill(pipe, directory, cases, dtype_name, points):
    manifest = {
        "mdref_version": __version__, "numpy_version": np.__version__, "model": pipe.source,
        "untrained": pipe.untrained, "weights_sha256": pipe.weights_sha256(), "dtype": dtype_name,
        "precision": pipe.compute.name,          # what mdref compare judges the bundle's traces by
        "emulation": None if pipe.precision is None else pipe.precision.describe(),
        "arrays": ARRAYS.get(pipe.compute.name, pipe.compute.name),
        "conventions": {
            "noise": "numpy.random.Generator(numpy.random.PCG64(seed)).standard_normal(shape) in float64, then cast",
            "timestep": "one step at t = num_train_timesteps - 1",
            "pixels": "round(clip((image + 1) / 2, 0, 1) * 255)",
            "decoder_input": "x0 / scaling_factor + shift_factor",
        },
        "pipeline": pipe.describe(),
        "cases": [],
    }
    store = _as_float16 if pipe.compute.name == "float16" else (lambda a: a)
    for i, (prompt, seed) in enumerate(cases):
        case = directory / f"case{i}"
        case.mkdir()
        with trace(points) as t:
            r = pipe.run(prompt, seed=seed)
        unet_out = t["unet.out"] if "unet.out" in t else None
        arrays = {"token_ids": r.token_ids, "text_embeddings": r.text_embeddings, "noise": r.noise,
                  "timesteps": np.asarray(r.timesteps, np.int64), "unet_out": unet_out, "x0": r.x0,
                  "decoder_input": pipe.decoder_input(r.x0), "image": r.image}
        arrays = {k: None if v is None else store(v) for k, v in arrays.items()}
        t.arrays = {k: store(v) for k, v in t.arrays.items()}
        for name, arr in arrays.items():
            if arr is not None:
                np.save(case / f"{name}.npy", arr)
        r.pil()[0].save(case / "image.png")
        save_trace(case / "trace.safetensors", t, {"prompt": prompt, "seed": seed, "dtype": dtype_name,
                                                   "precision": pipe.compute.name, "model": pipe.source,
                                                   "mdref_version": __version__})
        manifest["cases"].append({
            "name": case.name, "prompt": prompt, "seed": seed, "timesteps": [float(x) for x in r.timesteps],
            "files": {f"{k}.npy": list(np.shape(v)) for k, v in arrays.items() if v is not None}
            | {"image.png": list(r.pixels.shape[1:]), "trace.safetensors": len(t.arrays)},
        })
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest
