"""Run the graphs `mdref export onnx` wrote in any runtime, chained as mdref's pipeline chains its components,
and record what the runtime computed under mdref's point names: a trace `mdref compare` reads.

    manifest = load_points("exported/")                          # points.json
    t = run_exported(run_graph, manifest, token_ids, noise)      # run_graph(graph, feeds) -> {output: array}
    mdref.save_trace("runtime.safetensors", t)

`run_graph("text_encoder" | "unet" | "decoder", feeds)` runs one graph in the runtime under test and returns its
outputs by name (all of them, or at least the main one: `text_embeddings`, `unet.out`, `decoder.out`); every
output named like a point of the graph is recorded. Between the graphs this module does what the pipeline does
(README, "Conventions"), with mdref's own code: the sampler (`mdref.sampler.sample`, the runtime's UNet as its
model, so `sampler.x0` / `latents.x0` are the sampler's arithmetic on the runtime's `unet.out`), the decoder input
``x0 / scaling_factor + shift_factor``, and the image ``clip((decoder.out + 1) / 2, 0, 1)``. Arrays enter each graph
in its inputs' dtypes (float16 graphs get float16 tensors; the timestep is float32 [B]) and are recorded as the
runtime returned them; the trace declares the graphs' dtype as its precision (manifest "precision"), so every point
of a float16 run, the sampler's and the image included, is compared at the float16 tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import sampler
from .io.scheduler_config import scheduler_config_from_diffusers
from .trace import Trace, recording

__all__ = ["load_points", "run_exported", "GRAPHS"]

GRAPHS = ("text_encoder", "unet", "decoder")


def load_points(directory):
    """points.json of an exported folder (a dict), checked for the keys run_exported reads; ValueError names a
    missing one."""
    path = Path(directory) / "points.json"
    if not path.is_file():
        raise ValueError(f"{directory}: no points.json (expected the folder `mdref export onnx` wrote)")
    manifest = json.loads(path.read_text())
    for key in ("graphs", "conventions"):
        if key not in manifest:
            raise ValueError(f"{path}: no {key!r}")
    missing = [g for g in GRAPHS if g not in manifest["graphs"]]
    if missing:
        raise ValueError(f"{path}: no graph entries for {missing}")
    return manifest


def _input_dtypes(entry):
    return {i["name"]: np.dtype(i["dtype"]) for i in entry["inputs"]}


def _run(run_graph, graph, entry, feeds, t, main):
    """Run one graph, record its outputs that are points (in the graph's execution order), return the main one."""
    dtypes = _input_dtypes(entry)
    out = run_graph(graph, {k: np.ascontiguousarray(v, dtype=dtypes[k]) for k, v in feeds.items()})
    if main not in out:
        raise ValueError(f"{graph}: the runtime returned {sorted(out)[:5]}, not the main output {main!r}")
    for name in entry["points"]:
        if name in out:
            t.add(name, np.asarray(out[name]))
    return np.asarray(out[main])


def run_exported(run_graph, manifest, token_ids, noise, *, steps=1, trace=None):
    """The exported pipeline on `token_ids` (int [B, 77]) and `noise` ([B, C, h, w], or [steps, B, C, h, w]),
    each graph run by `run_graph`; returns the Trace (`trace`, or a new one) of every point recorded."""
    t = Trace() if trace is None else trace
    graphs, conv = manifest["graphs"], manifest["conventions"]
    t.meta.setdefault("precision", manifest.get("dtype", "float32"))     # the graphs' compute dtype: compare's
                                                                          # tolerance for every point of the run
    ids = np.asarray(token_ids)
    t.add("tokens", ids)
    context = _run(run_graph, "text_encoder", graphs["text_encoder"], {"tokens": ids}, t, "text_embeddings")
    unet = graphs["unet"]
    sample_dtype = _input_dtypes(unet)["sample"]
    noise = np.asarray(noise)
    t.add("noise", (noise[0] if noise.ndim == 5 else noise).astype(sample_dtype))
    cfg = scheduler_config_from_diffusers(conv["scheduler"], where="points.json conventions.scheduler")

    def model(x, step):
        feeds = {"sample": x, "timestep": np.full((x.shape[0],), step, np.float32), "context": context}
        return _run(run_graph, "unet", unet, feeds, t, "unet.out").astype(np.float32)

    shape = noise.shape[1:] if noise.ndim == 5 else noise.shape
    with recording(t):                                   # the sampler records sampler.noise and sampler.x0 itself
        x0 = sampler.sample(model, cfg, shape, steps=steps, noise=noise.astype(np.float32), dtype=np.float32)
    t.add("latents.x0", x0)
    z = x0 / np.float32(conv["scaling_factor"]) + np.float32(conv["shift_factor"])      # [B, c, h, w]
    image = _run(run_graph, "decoder", graphs["decoder"], {"decoder_input": z}, t, "decoder.out")
    t.add("image", np.clip((image.astype(np.float32) + 1) / 2, 0, 1))
    return t
