"""`mdref export onnx DIR`: a model mdref loads, as three ONNX graphs named the way mdref names things.

    DIR/text_encoder.onnx   tokens int64 [B, 77]                      -> text_embeddings [B, 77, D]
    DIR/unet.onnx           sample [B, C, h, w], timestep float32 [B], context [B, 77, D] -> unet.out [B, C, h, w]
    DIR/decoder.onnx        decoder_input [B, c, h, w] (x0 / scaling_factor + shift_factor) -> decoder.out, [-1, 1]
    DIR/points.json         inputs / outputs, the conventions that chain them, every point's value name

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript; opset 20), on the PyTorch modules of
mdref_torch.build. Every point mdref records for the model (mdref_torch.points: the rules from module paths to
point names) is the name of a value in the graph, and with ``points=True`` also a graph output. Initializers keep
the checkpoint's parameter paths (``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.bias``): the
exporter runs unoptimised and onnxscript's optimiser then runs with a rule that folds no node reading a parameter
(folding would turn ``Transpose(to_q.weight)`` into an anonymous ``val_17``), so `edit_initializer` finds a layer's
weights by name. Shapes are static: batch 1 and the model's default size (`export_onnx(..., batch, height, width)`).

float16 (``dtype="float16"``): the PyTorch modules are cast with ``.half()`` and exported, so every weight,
activation and op is float16 except what the model computes in float32 whatever its dtype: the UNet's timestep
sinusoid (``t * exp(-log(10000) i / half)``, then sin / cos, cast to float16 after), whose frequency table stays a
float32 constant. Both ONNX float16 converters (onnxconverter-common, onnxruntime.transformers.float16) move that
region to float16, and at t = 999 the argument's float16 spacing is 0.5: sin / cos are off by up to ~0.25 and
`mdref compare` names ``unet.time_embedding`` (docs/runtimes.md). The export checks that every Sin / Cos reads
float32 and lists the float32 values in points.json (``float32_kept``). Graph inputs are float16 but the token
ids (int64) and the timestep (float32).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .build import torch_module
from .points import RULES, PIPELINE_POINTS, PIPELINE_PREFIX, PointOutputs, module_points, recorded_points

__all__ = ["export_onnx", "prepare", "Prepared", "manifest_head", "torch_manifest", "OPSET", "GRAPHS",
           "edit_initializer", "read_initializer"]

OPSET = 20
GRAPHS = ("text_encoder", "unet", "decoder")
MAIN_OUTPUT = {"text_encoder": "text_embeddings", "unet": "unet.out", "decoder": "decoder.out"}
INPUT_NAMES = {"text_encoder": ["tokens"], "unet": ["sample", "timestep", "context"], "decoder": ["decoder_input"]}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def example_inputs(pipe, batch=1, height=None, width=None):
    """{graph: tuple of numpy arrays} the graphs are exported (and mdref's points listed) with: the tokens of an
    empty prompt, seeded noise of the latent's shape at t = T - 1, and the text embeddings of those tokens."""
    ids = pipe.tokenizer([""] * batch)                                          # int64 [B, 77]
    shape = pipe.latent_shape(batch, height, width)                            # [B, C, h, w]
    noise = np.random.Generator(np.random.PCG64(0)).standard_normal(shape).astype(np.float32)
    t = np.full((batch,), pipe.scheduler.num_train_timesteps - 1, np.float32)
    context = pipe.text_encoder(ids).astype(np.float32)                        # [B, 77, D]
    return {"text_encoder": (ids,), "unet": (noise, t, context), "decoder": (noise,)}


def _no_param_folding(params):
    """onnxscript's should_fold: never fold a node that reads a parameter (its initializer keeps its name)."""
    return lambda node: False if any(v is not None and v.name in params for v in node.inputs) else None


def _float32_kept(model):
    """What a float16 graph keeps in float32: {"values": [...], "initializers": {name: shape}}, or a RuntimeError
    naming a Sin / Cos node whose input is float16 (the timestep sinusoid must stay float32)."""
    import onnx_ir as ir

    values, inits = [], {}
    for node in model.graph.all_nodes():
        if node.op_type in ("Sin", "Cos") and node.inputs[0].dtype != ir.DataType.FLOAT:
            raise RuntimeError(f"float16 export: {node.op_type} node {node.name} reads {node.inputs[0].dtype}; the "
                               f"timestep sinusoid must stay float32")
        for v in node.inputs:
            if v is not None and v.is_initializer() and v.dtype == ir.DataType.FLOAT:
                inits[v.name] = [int(d) for d in v.shape]
        values += [v.name for v in node.outputs if v.dtype == ir.DataType.FLOAT]
    return {"values": values, "initializers": inits}


class Prepared:
    """One component ready to export: its PyTorch module wrapped to return every point (`wrapper`, a
    PointOutputs), the example arguments (`args`, torch tensors in the export dtype), the input names, the output
    names (`names`: the main output first, then the points in execution order) and the points mdref records
    (`recorded`). Runtimes that export from PyTorch themselves (ExecuTorch, LiteRT) start from this too."""

    def __init__(self, pipe, graph, inputs, dtype="float32"):
        self.graph, self.dtype = graph, dtype
        self.module = torch_module(getattr(pipe, graph))
        self.recorded = recorded_points(pipe, graph, inputs)
        self.main = MAIN_OUTPUT[graph]
        mapped = {p: n for p, n in module_points(self.module, graph, set(self.recorded)).items()
                  if n != self.main}                                    # the main output stands for them
        self.wrapper = PointOutputs(self.module, mapped)
        self.input_names = INPUT_NAMES[graph]
        args = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
        # the order the points run in (and their shapes) from one float32 run: PyTorch's float16 CPU kernels are
        # slow (minutes for a 512x512 decoder), and the order does not depend on the dtype
        self.names = [self.main] + self.wrapper.trace_order(*args)[1:]
        self.shapes = dict(zip(self.names, self.wrapper.shapes))
        if dtype == "float16":
            self.wrapper.half()
            args = [a.half() if a.is_floating_point() and name != "timestep" else a
                    for a, name in zip(args, self.input_names)]
        self.args = tuple(args)
        prefix = PIPELINE_PREFIX[graph]
        self.module_of = {n: (f"{prefix}.{p}" if p else prefix) for p, n in mapped.items()}
        self.module_of[self.main] = prefix

    def entry(self, shapes, *, points=True):
        """This graph's entry of points.json; `shapes` {output name: shape}."""
        dtype_name = lambda t: str(t.dtype).removeprefix("torch.")
        return {
            "inputs": [{"name": n, "dtype": dtype_name(a), "shape": list(a.shape)}
                       for n, a in zip(self.input_names, self.args)],
            "outputs": [{"name": n, "dtype": self.dtype, "shape": shapes[n]}
                        for n in (self.names if points else self.names[:1])],
            # every mapped value, in execution order: value name (== point name), its module, shape, output or not
            "points": {n: {"value": n, "module": self.module_of[n], "shape": shapes[n],
                           "output": points or n == self.main} for n in self.names[1:] + self.names[:1]},
            "not_exported": [n for n in self.recorded if n not in self.names],
            "parameters": len(self.module.state_dict()),
        }

    def run(self):
        """The wrapper's outputs on the example arguments: {name: numpy array} (a PyTorch reference run)."""
        with torch.no_grad():
            return {n: x.detach().numpy() for n, x in zip(self.names, self.wrapper(*self.args))}


def _export_graph(prepared, path, *, points, log):
    """Export one Prepared component to `path`; returns its entry of points.json."""
    import onnxscript.optimizer

    t0 = time.perf_counter()
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(prepared.wrapper, prepared.args, dynamo=True, optimize=False,
                                    opset_version=OPSET, input_names=prepared.input_names,
                                    output_names=prepared.names, verbose=False)
    model = program.model
    onnxscript.optimizer.optimize_ir(model, should_fold=_no_param_folding(set(prepared.module.state_dict())))
    kept = _float32_kept(model) if prepared.dtype == "float16" else None
    outputs = list(model.graph.outputs)
    if [v.name for v in outputs] != prepared.names:
        raise RuntimeError(f"{prepared.graph}: the exporter named the outputs {[v.name for v in outputs][:4]}..., "
                           f"not {prepared.names[:4]}...")
    if not points:                                  # the values keep their point names inside the graph
        model.graph.outputs[:] = outputs[:1]
    program.save(str(path))
    entry = dict(file=path.name, **prepared.entry({v.name: [int(d) for d in v.shape] for v in outputs},
                                                  points=points))
    if kept is not None:
        entry["float32_kept"] = dict(kept, why="computed in float32 whatever the model's dtype (the timestep "
                                     "sinusoid and its frequency table: at t = 999 the argument's float16 spacing is "
                                     "0.5, sin / cos would be off by up to ~0.25)")
    log(f"{prepared.graph:<13} {model.graph.num_nodes():5d} nodes, {len(prepared.names)} points, "
        f"{time.perf_counter() - t0:6.1f} s -> {path.name}")
    return entry


@contextmanager
def _quiet_exporter():
    """torch.onnx's registry warns about every torchvision op it skips: not news to an mdref user."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def manifest_head(pipe, dtype, exporter):
    """The keys of points.json that do not depend on the graphs."""
    from mdref import __version__

    return {
        "mdref_version": __version__, "model": pipe.source, "untrained": pipe.untrained,
        "weights_sha256": pipe.weights_sha256(), "dtype": dtype, "exporter": exporter,
        "rules": [{"module": p, "point": t} for p, t in RULES],
        "conventions": conventions(pipe, dtype),
        "pipeline_points": dict(zip(PIPELINE_POINTS, (
            "the text encoder's input (graph input 'tokens')",
            "the initial noise: the UNet's 'sample' at the first step (x0 sampler)",
            "the sampler's draw 0 (the same array as noise)",
            "the sampler's x0 after each UNet call (conventions.sampler)",
            "the clean latent the decoder receives, before decoder_input",
            "clip((decoder.out + 1) / 2, 0, 1), before 8-bit rounding"))),
        "graphs": {},
    }


def prepare(pipe, dtype="float32", batch=1, height=None, width=None):
    """{graph: Prepared} for the three components of an mdref Pipeline computing float32."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(TORCH_DTYPES)}")
    if pipe.compute.name != "float32":
        raise ValueError(f"export a pipeline loaded in float32 (this one computes {pipe.compute.name}); "
                         f"dtype='float16' makes the float16 graphs")
    inputs = example_inputs(pipe, batch, height, width)
    return {graph: Prepared(pipe, graph, inputs[graph], dtype) for graph in GRAPHS}


def torch_manifest(pipe, prepared, exporter):
    """points.json's content for graphs a runtime compiles from the PyTorch wrappers itself (ExecuTorch, LiteRT):
    their outputs are the wrappers' outputs, the main one first, then every point (shapes from one PyTorch run)."""
    dtype = next(iter(prepared.values())).dtype
    manifest = manifest_head(pipe, dtype, exporter)
    for graph, prep in prepared.items():
        manifest["graphs"][graph] = prep.entry(prep.shapes)
    return manifest


def export_onnx(pipe, directory, *, points=False, dtype="float32", batch=1, height=None, width=None, log=None):
    """Export `pipe` (an mdref.Pipeline computing float32) into the new (or empty) folder `directory`: the three
    graphs and points.json; returns the points.json dict. Raises mdref.outputs.OutputError (before anything is
    exported) if the folder cannot be used, ValueError for a bad dtype."""
    import onnx
    import onnxscript
    from mdref.outputs import atomic_dir, check_output_dir

    check_output_dir(directory, "DIR")
    log = log or (lambda s: print(s, file=sys.stderr))
    prepared = prepare(pipe, dtype, batch, height, width)
    manifest = manifest_head(pipe, dtype, f"torch.onnx.export(dynamo=True), opset {OPSET}; torch "
                                          f"{torch.__version__}, onnxscript {onnxscript.__version__}, onnx "
                                          f"{onnx.__version__}")

    def fill(tmp):
        for graph, prep in prepared.items():
            manifest["graphs"][graph] = _export_graph(prep, Path(tmp) / f"{graph}.onnx", points=points, log=log)
        (Path(tmp) / "points.json").write_text(json.dumps(manifest, indent=1) + "\n")

    atomic_dir(directory, fill, "DIR")
    return manifest


def conventions(pipe, dtype):
    """How to feed the graphs and chain them, as mdref's pipeline does (README, "Conventions")."""
    from mdref.io.scheduler_config import scheduler_config_to_dict
    from mdref.sampler import trailing_timesteps

    s = pipe.scheduler
    return {
        "tokens": f"CLIP BPE (mdref.Tokenizer, golden token_ids.npy), int64 [B, 77]: {pipe.tokenizer.bos_id}, the "
                  f"prompt's tokens, {pipe.tokenizer.eos_id}, then the pad id {pipe.tokenizer.pad_id}",
        "noise": "numpy.random.Generator(numpy.random.PCG64(seed)).standard_normal(latent shape) in float64, cast "
                 f"to {dtype} (golden noise.npy)",
        "timesteps": {str(n): [int(t) for t in trailing_timesteps(s.num_train_timesteps, n)] for n in (1, 2, 4)},
        "timestep_input": "float32 [B], the integer timestep as a float",
        "sampler": f"mdref.sampler.sample with the UNet graph as the model: sampler {s.sampler!r}, prediction_type "
                   f"{s.prediction_type!r} (one step: x0 = " + {
                       "sample": "unet.out", "epsilon": "(noise - sqrt(1 - abar) unet.out) / sqrt(abar)",
                       "v_prediction": "sqrt(abar) noise - sqrt(1 - abar) unet.out"}[s.prediction_type] + ")",
        "scheduler": scheduler_config_to_dict(s),
        "decoder_input": "x0 / scaling_factor + shift_factor",
        "scaling_factor": pipe.decoder.scaling_factor, "shift_factor": pipe.decoder.shift_factor,
        "image": "decoder.out in [-1, 1]; pixels round(clip((x + 1) / 2, 0, 1) * 255)",
    }


# ---- initializers by parameter path -------------------------------------------------------------------------------
def read_initializer(model, name):
    """The initializer `name` (a checkpoint parameter path) of an onnx.ModelProto as a numpy array."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(f"no initializer {name!r} in the graph")


def edit_initializer(path, name, change, out=None):
    """Load the ONNX file `path`, replace initializer `name` by change(its array), save to `out` (default: in
    place). Returns the old array. E.g. plant a bug: edit_initializer("unet.onnx", "mid_block.attentions.0."
    "transformer_blocks.0.attn2.to_out.0.bias", lambda b: b + np.eye(1, b.size, 0, b.dtype)[0] * 1e-2)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            old = numpy_helper.to_array(init)
            new = np.asarray(change(old.copy()), dtype=old.dtype)
            if new.shape != old.shape:
                raise ValueError(f"{name}: the new array has shape {new.shape}, the initializer {old.shape}")
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(new, name))
            onnx.save(model, str(out or path))
            return old
    raise KeyError(f"{path}: no initializer {name!r}")
