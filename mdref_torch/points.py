"""From PyTorch module paths to mdref point names, and a forward that returns every point as an extra output.

The rules (docs/runtimes.md repeats them). A module path is written from the pipeline down, as diffusers'
``StableDiffusionPipeline`` names its parts: ``text_encoder.text_model.encoder.layers.0``, ``unet.mid_block``,
``vae.decoder.up_blocks.2``. Then:

| module path | mdref point |
|---|---|
| ``text_encoder`` (the whole CLIPTextModel) | ``text_embeddings`` |
| ``text_encoder.text_model.<p>`` | ``text_encoder.<p>`` |
| ``unet`` (the whole UNet) | ``unet.out`` |
| ``unet.<p>`` | ``unet.<p>`` |
| ``vae.post_quant_conv`` | ``decoder.post_quant_conv`` |
| ``vae.decoder`` (the whole decoder network) | ``decoder.out`` |
| ``vae.decoder.<p>`` | ``decoder.<p>`` |

1. A module's value is the first tensor of what its forward returns: the tensor, the first element of a tuple or
   list (attention weights and skip lists follow it), or the ``.sample`` / ``.last_hidden_state`` of an output object.
2. A mapped name is a point when mdref records it for this model (`recorded_points` runs mdref once on a small
   input and lists the names); everything else (``unet.conv_out``, ``vae.decoder.conv_norm_out``, a LayerNorm)
   is not. So a point mdref starts recording maps without a new rule: a finer decoder trace point
   ``decoder.mid_block.resnets.0`` is the output of ``vae.decoder.mid_block.resnets.0``.
3. mdref points no module produces are pipeline points, computed outside the three graphs: ``tokens`` (the graph
   input), ``noise``, ``sampler.noise``, ``sampler.x0``, ``latents.x0`` (the sampler's arithmetic on ``unet.out``)
   and ``image`` (``clip((decoder.out + 1) / 2, 0, 1)``).
Exported graphs keep the same names: with ``--points`` each point is a graph output named by its point name;
without, it is still the name of the value inside the graph.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn as nn

__all__ = ["RULES", "point_name", "module_points", "recorded_points", "PointOutputs", "first_tensor",
           "PIPELINE_PREFIX", "PIPELINE_POINTS"]

# (module path pattern, point name template), tried in order; the first full match names the module.
RULES = [
    (r"text_encoder", "text_embeddings"),
    (r"text_encoder\.text_model\.(?P<p>.+)", "text_encoder.{p}"),
    (r"unet", "unet.out"),
    (r"unet\.(?P<p>.+)", "unet.{p}"),
    (r"vae\.post_quant_conv", "decoder.post_quant_conv"),
    (r"vae\.decoder", "decoder.out"),
    (r"vae\.decoder\.(?P<p>.+)", "decoder.{p}"),
]
_RULES = [(re.compile(p), t) for p, t in RULES]

# The pipeline path of each component's PyTorch module (mdref_torch.build): where its module paths start.
PIPELINE_PREFIX = {"text_encoder": "text_encoder", "unet": "unet", "decoder": "vae"}
# mdref points that no module of the three graphs produces (rule 3).
PIPELINE_POINTS = ("tokens", "noise", "sampler.noise", "sampler.x0", "latents.x0", "image")


def point_name(path):
    """The mdref point name a module path maps to by RULES (None when no rule applies), e.g.
    ``vae.decoder.up_blocks.2.resnets.1`` -> ``decoder.up_blocks.2.resnets.1``."""
    for pattern, template in _RULES:
        m = pattern.fullmatch(path)
        if m:
            return template.format(**m.groupdict())
    return None


def module_points(module, component, recorded):
    """{module path inside `module`: point name} for the modules of a component's PyTorch module whose mapped
    name mdref records (`recorded`, a set of names); "" is the module itself."""
    prefix = PIPELINE_PREFIX[component]
    out = {}
    for path, _ in module.named_modules():
        name = point_name(f"{prefix}.{path}" if path else prefix)
        if name is not None and name in recorded:
            out[path] = name
    return out


def recorded_points(pipe, component, inputs):
    """The names mdref records when its `component` ("text_encoder", "unet", "decoder") runs on `inputs`, in
    execution order (the component's own call, not the pipeline's: a trace of one call)."""
    import mdref

    with mdref.trace() as t:
        getattr(pipe, component)(*inputs)
    names = t.names()
    if component == "text_encoder":                # the pipeline records the encoder's output under this name
        names.append("text_embeddings")
    return names


def first_tensor(out):
    """Rule 1: the tensor a module's output stands for."""
    for attr in ("sample", "last_hidden_state"):
        if hasattr(out, attr) and torch.is_tensor(getattr(out, attr)):
            return getattr(out, attr)
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    return out


class PointOutputs(nn.Module):
    """``module``'s forward returning (output, *point values): the output of every module in `points`
    ({module path: point name}; "" is the output itself), in the order they ran.

    The wrapper takes over `module`'s children, parameters and buffers as its own (no prefix is added), so its
    state_dict keys, and the initializer names of a graph exported from it, are the checkpoint's keys. `names`
    lists the outputs' point names after one call (`trace_order`)."""

    def __init__(self, module, points):
        super().__init__()
        self._modules, self._parameters, self._buffers = module._modules, module._parameters, module._buffers
        object.__setattr__(self, "inner", module)                  # not a child: no "inner." prefix
        self.points = dict(points)
        self.main = self.points.pop("", None)
        self.names = None

    def forward(self, *args):
        seen = []
        modules = dict(self.inner.named_modules())
        hooks = [modules[path].register_forward_hook(lambda m, a, out, n=name: seen.append((n, first_tensor(out))))
                 for path, name in self.points.items()]
        try:
            out = first_tensor(self.inner(*args))
        finally:
            for h in hooks:
                h.remove()
        if self.names is None:
            self.names = [n for n, _ in seen]
        elif [n for n, _ in seen] != self.names:
            raise RuntimeError("the module ran its points in another order than in trace_order")
        returned, outputs = set(), []
        for x in (out, *(x for _, x in seen)):       # one tensor under two names (a block's output and its last
            outputs.append(x.clone() if id(x) in returned else x)    # layer's): one graph value per name
            returned.add(id(x))
        return tuple(outputs)

    def trace_order(self, *args):
        """Run once (no gradients) to fix the output order; returns the outputs' names, the main output first."""
        self.names = None
        with torch.no_grad():
            self.shapes = [list(x.shape) for x in self(*args)]          # the outputs' shapes, in order
        missing = sorted(set(self.points.values()) - set(self.names))
        if missing:
            raise RuntimeError(f"modules of points {missing[:5]} did not run")
        if len(set(self.names)) != len(self.names):
            raise RuntimeError("a point module ran twice; one output per point cannot name both calls")
        return [self.main or "output", *self.names]


def as_numpy(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
