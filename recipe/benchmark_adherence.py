"""Prompt-adherence benchmark of a one-step model through mdref's NumPy pipeline (issue 5's targets).

    python recipe/benchmark_adherence.py [--model weights/default] [--n 400] [--json out.json]

1. Complete prompts from the held-out attribute combinations (recipe/heldout.json), both word orders, random
   noise: per-attribute accuracy and all-five accuracy, judged by recipe/evaluate.py.
2. Prompts that leave attributes out: over 16 seeds each, the fraction of samples showing exactly one clean shape,
   how often the attributes that ARE given are obeyed, and how many distinct values the open attributes take.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402
from evaluate import ATTRS, evaluate  # noqa: E402

TARGETS = {"background": 0.98, "colour": 0.98, "position": 0.95, "size": 0.95, "shape": 0.90, "all": 0.85}
# (shape, colour, background, position, size); None = left out of the prompt
OPEN_PROMPTS = [
    (None, None, None, None, None), ("circle", "red", None, None, None), ("triangle", None, None, "top", "small"),
    ("square", None, "blue", None, "large"), (None, "green", None, "right", None), ("circle", None, None, None, None),
    (None, None, "white", None, None), ("triangle", "yellow", None, None, "large"),
    ("square", None, "black", "center", None), ("circle", "purple", None, "bottom", None),
    (None, "orange", "blue", None, None), (None, None, None, "left", "small"),
]


def complete_prompts(n, seed=0):
    rng = random.Random(seed)
    combos = [rng.choice(data.HELDOUT) for _ in range(n)]
    return combos, [data.prompt(*c, order=i % 2) for i, c in enumerate(combos)]


def run_complete(pipe, n, batch=50, seed=0):
    combos, prompts = complete_prompts(n, seed)
    hits = {k: 0 for k in ATTRS}
    allfive, clean = 0, 0
    for b in range(0, n, batch):
        px = pipe.run(prompts[b:b + batch], seed=1000 + b).pixels  # uint8 [B, H, W, 3]
        for img, c in zip(px, combos[b:b + batch]):
            r = evaluate(img)
            ok = [r[k] == v for k, v in zip(ATTRS, c)]
            for k, o in zip(ATTRS, ok):
                hits[k] += o
            allfive += all(ok)
            clean += r["clean"]
    return {**{k: v / n for k, v in hits.items()}, "all": allfive / n, "clean": clean / n}


def run_open(pipe, seeds=16):
    rows = []
    for spec in OPEN_PROMPTS:
        text = data.prompt(*spec)
        px = pipe.run([text] * seeds, seed=7).pixels  # 16 different noises
        rs = [evaluate(img) for img in px]
        given = [k for k, v in zip(ATTRS, spec) if v is not None]
        open_ = [k for k, v in zip(ATTRS, spec) if v is None]
        obey = np.mean([all(r[k] == v for k, v in zip(ATTRS, spec) if v is not None) for r in rs])
        distinct = {k: len({r[k] for r in rs if r["clean"]}) for k in open_}
        tuples = len({tuple(r[k] for k in open_) for r in rs if r["clean"]})
        rows.append({"prompt": text, "clean": float(np.mean([r["clean"] for r in rs])), "given_obeyed": float(obey),
                     "given": given, "distinct_open_values": distinct, "distinct_open_tuples": tuples})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline folder (default: the embedded default model)")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import mdref

    pipe = mdref.Pipeline.from_pretrained(a.model)
    t0 = time.time()
    comp = run_complete(pipe, a.n)
    t1 = time.time()
    opn = run_open(pipe)
    t2 = time.time()
    print(f"complete held-out prompts (n={a.n}, {t1 - t0:.1f}s):")
    for k in ATTRS + ["all"]:
        tgt = TARGETS.get(k)
        print(f"  {k:10s} {comp[k]:.4f}  target >= {tgt}  {'ok' if comp[k] >= tgt else 'MISSED'}")
    print(f"  one clean shape: {comp['clean']:.4f}")
    print(f"prompts with attributes left out (16 seeds each, {t2 - t1:.1f}s):")
    for r in opn:
        print(f"  {r['prompt']!r:55s} clean {r['clean']:.3f}  given obeyed {r['given_obeyed']:.3f}  "
              f"distinct open tuples {r['distinct_open_tuples']:2d}  per attribute {r['distinct_open_values']}")
    clean = float(np.mean([r["clean"] for r in opn]))
    min_t = min(r["distinct_open_tuples"] for r in opn)
    print(f"  mean clean {clean:.4f} (target >= 0.9); min distinct open tuples {min_t} (target >= 3)")
    if a.json:
        Path(a.json).write_text(json.dumps({"complete": comp, "open": opn, "open_clean_mean": clean,
                                            "open_min_distinct": min_t}, indent=1) + "\n")


if __name__ == "__main__":
    main()
