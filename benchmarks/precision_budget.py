"""The float16 / bfloat16 error budget of docs/precision.md: per component output, the error of an emulated run
against float64 on the same tokens, noise and weights, with and without upcasts; and the emulation's slowdown
against float32 (min of --runs, the two interleaved).

    HF_HUB_OFFLINE=1 python benchmarks/precision_budget.py                      # embedded default model
    HF_HUB_OFFLINE=1 python benchmarks/precision_budget.py --preset mobilediffusion --runs 1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import mdref
from mdref.precision import DEFAULT_PROFILE
from mdref.precision_report import precision_report

POINTS = ["text_embeddings", "unet.out", "latents.x0", "decoder.out"]
# (dtype, upcast, profile); profile None: the default (mdref.precision.DEFAULT_PROFILE)
CONFIGS = [("float16", None, None), ("float16", None, "fused"), ("float16", None, "float32-islands"),
           ("float16", "attention,norm", None), ("float16", "decoder", None), ("bfloat16", None, None),
           ("bfloat16", "attention,norm", None)]
PROMPT = "a large red circle on the left, blue background"


def load(args, dtype, upcast=None, profile=None):
    if args.preset:
        return mdref.Pipeline.from_preset(args.preset, seed=0, dtype=dtype, upcast=upcast, profile=profile)
    return mdref.Pipeline.from_pretrained(None, dtype=dtype, upcast=upcast, profile=profile)


def traced(pipe):
    with mdref.trace() as t:
        pipe.run(PROMPT, seed=0, allow_nonfinite=True)
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", help="a pipeline preset (default: the embedded default model)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs for the slowdown (default 3)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    ref = traced(load(args, np.float64))
    rows = []
    for dtype, upcast, profile in CONFIGS:
        pipe = load(args, dtype, upcast, profile)
        rep = precision_report(ref, traced(pipe), dtype)
        by = {r["name"]: r for r in rep["points"]}
        low = min(rep["points"], key=lambda r: r["headroom_log2"])
        rows.append({"dtype": dtype, "upcast": upcast or "-", "profile": profile or DEFAULT_PROFILE,
                     "first_nonfinite": rep["first_nonfinite"],
                     "min_headroom_log2": low["headroom_log2"], "min_headroom_at": low["name"],
                     **{p: {"rel_err": by[p]["rel_err"], "nmse": by[p]["nmse"]} for p in POINTS}})
        print(json.dumps(rows[-1]), flush=True)
    timing = {}
    pipes = {name: load(args, name) for name in ("float32", "float16", "bfloat16")}
    for _ in range(args.runs):
        for name, pipe in pipes.items():
            t0 = time.perf_counter()
            pipe.run(PROMPT, seed=0, allow_nonfinite=True)
            timing[name] = min(timing.get(name, np.inf), time.perf_counter() - t0)
    print(json.dumps({"seconds": timing, "slowdown": {k: v / timing["float32"] for k, v in timing.items()}}))
    print("\n| dtype | profile | upcast | " + " | ".join(f"{p} rel err / NMSE" for p in POINTS)
          + " | first non-finite | least headroom |")
    print("|---|---|---|" + "---|" * (len(POINTS) + 2))
    for r in rows:
        cells = " | ".join(f"{r[p]['rel_err']:.2e} / {r[p]['nmse']:.1e}" for p in POINTS)
        print(f"| {r['dtype']} | {r['profile']} | {r['upcast']} | {cells} | {r['first_nonfinite'] or 'none'} | "
              f"2^{r['min_headroom_log2']:.1f} at {r['min_headroom_at']} |")
    print("\nslowdown vs float32 (min of %d): " % args.runs
          + ", ".join(f"{k} {timing[k]:.3f} s ({timing[k] / timing['float32']:.2f}x)" for k in timing))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "seconds": timing}, f, indent=1)


if __name__ == "__main__":
    main()
