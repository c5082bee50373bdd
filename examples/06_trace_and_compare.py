"""Tracing and comparing: record every layer's output, change one weight, let mdref.compare find the layer.

mdref.trace() records named arrays at every layer boundary (names = checkpoint key prefixes, e.g.
"unet.mid_block.resnets.0"); save_trace writes them as one safetensors file; compare() walks two traces in
execution order and names the first point that differs beyond the tolerance. This is what a runtime author
does with their own trace (see compare_with_diffusers.py). Writes OUT/mdref_trace_{a,b}.safetensors
(OUT: first argument, default /tmp).

    python examples/06_trace_and_compare.py [OUT]
    mdref compare OUT/mdref_trace_a.safetensors OUT/mdref_trace_b.safetensors   # the same, from the shell
"""
import sys
from pathlib import Path

import numpy as np

import mdref

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp")
out.mkdir(parents=True, exist_ok=True)
# float64: each point's default tolerance is then 1e-9 of its max|x| (float32: 1e-4), so even a small change shows.
pipe = mdref.Pipeline.from_pretrained(dtype=np.float64)        # the embedded default model
prompt = "a large red circle on the left, blue background"

with mdref.trace() as a:                                       # every point
    pipe.run(prompt, seed=0)
mdref.save_trace(out / "mdref_trace_a.safetensors", a, {"prompt": prompt, "seed": 0})
print(f"recorded {len(a.names())} points: {', '.join(a.names()[:4])}, ..., {a.names()[-1]}")

# Add 1e-3 to one weight of a mid-network layer: the first conv of the UNet's middle ResNet.
conv1 = pipe.unet.params["mid_block"]["resnets"]["0"]["conv1"]
weight = conv1["weight"] if "weight" in conv1 else conv1["pointwise"]["weight"]   # plain or separable conv
weight[0, 0, 0, 0] += 1e-3
with mdref.trace() as b:
    pipe.run(prompt, seed=0)
weight[0, 0, 0, 0] -= 1e-3
mdref.save_trace(out / "mdref_trace_b.safetensors", b, {"prompt": prompt, "seed": 0, "perturbed": "mid_block"})

report = mdref.compare(out / "mdref_trace_a.safetensors", out / "mdref_trace_b.safetensors")
diverged = [p for p in report.points if not p.ok]
print(f"{len(report.points) - len(diverged)} points agree, {len(diverged)} diverge "
      f"(tolerance {diverged[0].rtol:g} * max|a| in {diverged[0].precision}):")
for p in diverged[:4]:                                         # execution order: the cause comes first
    print(f"  {p.name:<56} max|a - b| / max|a| = {p.rel_to_max:.2e}")
print(f"compare named {report.first_divergence!r} (the perturbed layer is unet.mid_block.resnets.0)")
sys.exit(0 if report.first_divergence == "unet.mid_block.resnets.0" else 1)
