"""Does float16 storage change what the shipped model draws? (issue 5 allows float16 weights; mdref computes in float32)

    python recipe/train.py --out runs/r22f --stages decproj --export /tmp/f32 --export-float32  # the same, float32
    python recipe/check_float16.py --float16 weights/default --float32 /tmp/f32 [--n 200]

Both folders go through mdref's NumPy pipeline with the same held-out prompts and noise
(benchmark_adherence.complete_prompts and the open prompts at 16 seeds). Prints the largest 8-bit difference between
the two pictures, how many pixels differ at all, the adherence of each, and on how many samples evaluate.py reads a
different scene.
"""

from __future__ import annotations

import argparse

import numpy as np

import data
from benchmark_adherence import OPEN_PROMPTS, complete_prompts
from evaluate import ATTRS, evaluate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--float16", required=True, help="pipeline folder with float16 safetensors")
    ap.add_argument("--float32", required=True, help="the same model exported as float32")
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args(argv)
    import mdref

    combos, prompts = complete_prompts(a.n, seed=0)
    prompts += [data.prompt(*spec) for spec in OPEN_PROMPTS for _ in range(16)]
    px = {}
    for name in ("float16", "float32"):
        pipe = mdref.Pipeline.from_pretrained(getattr(a, name))
        batches = range(0, len(prompts), 50)
        px[name] = np.concatenate([pipe.run(prompts[b:b + 50], seed=2000 + b).pixels for b in batches])
    diff = np.abs(px["float16"].astype(np.int16) - px["float32"].astype(np.int16))
    print(f"{len(prompts)} samples ({a.n} held-out complete, {len(prompts) - a.n} open): max 8-bit difference "
          f"{diff.max()}, pixels that differ {np.mean(diff > 0):.2e}")
    reads = {k: [evaluate(img) for img in v] for k, v in px.items()}
    for name, rs in reads.items():
        acc = {k: np.mean([r[k] == c[j] for r, c in zip(rs, combos)]) for j, k in enumerate(ATTRS)}
        clean = np.mean([r["clean"] for r in rs[a.n:]])
        print(f"{name}: " + " ".join(f"{k} {v:.4f}" for k, v in acc.items()) + f"; open prompts clean {clean:.4f}")
    changed = sum(any(r16[k] != r32[k] for k in ATTRS + ["clean"]) for r16, r32 in zip(*reads.values()))
    print(f"samples read differently: {changed} of {len(prompts)}")


if __name__ == "__main__":
    main()
