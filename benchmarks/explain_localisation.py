"""Does the embedded default model's cross-attention localise? (issue 19's measurement)

    HF_HUB_OFFLINE=1 python benchmarks/explain_localisation.py [--n 50] [--json out.json]

For n complete prompts (recipe/benchmark_adherence.py's held-out complete prompts, both word orders, seed 1000 + i)
one run each through `mdref.explain.explain`; recipe/evaluate.py reads the drawn picture and gives the shape's
bounding box. Per token class the mass of the token's cross-attention map (mdref.explain.attention_maps: averaged
over heads and blocks, at image resolution, summing to 1) that falls inside the box is set against the box's share
of the image, which is what a uniform map would put there. mass / share > 1 means the token looks at the object.
Reported for the overall map and per attention grid. Pictures in which the reader finds no shape are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipe"))
from benchmark_adherence import complete_prompts  # noqa: E402
from evaluate import ATTRS, evaluate  # noqa: E402

import mdref  # noqa: E402
from mdref import explain  # noqa: E402


POSITION_WORDS = {"left", "right", "top", "bottom", "center"}


def token_classes(tokens, combo):
    """{class: [positions]} of the prompt's tokens: shape, the shape's colour, size, the background's colour, the
    position word, the other words (a, on, the, at, in, ',', background) and the start / end tokens.
    combo = (shape, colour, background, position, size)."""
    shape, colour, background, _, size = combo
    out = {"shape": [], "colour": [], "size": [], "background colour": [], "position word": [], "other words": [],
           "start": [0], "end": [len(tokens) - 1]}
    for i, t in enumerate(tokens[1:-1], start=1):
        nxt = tokens[i + 1]
        cls = ("shape" if t == shape else "size" if t == size else "colour" if t == colour and nxt == shape
               else "background colour" if t == background and nxt == "background"
               else "position word" if t in POSITION_WORDS else "other words")
        out[cls].append(i)
    return {k: v for k, v in out.items() if v}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)

    pipe = mdref.Pipeline.from_pretrained()
    combos, prompts = complete_prompts(args.n)
    rows, skipped, correct = [], 0, 0
    t0 = time.perf_counter()
    for i, (combo, prompt) in enumerate(zip(combos, prompts)):
        e = explain.explain(pipe, prompt, seed=1000 + i)
        read = evaluate(e.result.pixels[0])
        if read["shape"] is None:
            skipped += 1
            continue
        correct += all(read[k] == v for k, v in zip(ATTRS, combo))
        y0, y1, x0, x1 = read["box"]
        H, W = e.maps.overall.shape[1:]
        share = (y1 - y0) * (x1 - x0) / (H * W)
        classes = token_classes(e.maps.tokens, combo)
        views = {"all blocks": e.maps.overall}
        views.update({f"grid {g[0]}x{g[1]}": m for g, m in e.maps.resolutions.items()})
        for view, maps in views.items():
            for cls, pos in classes.items():          # a class of several tokens: their mean mass
                rows.append({"view": view, "class": cls, "share": share, "prompt": prompt,
                             "mass": float(np.mean([maps[j, y0:y1, x0:x1].sum() for j in pos]))})
    seconds = time.perf_counter() - t0

    summary = {}
    for view in dict.fromkeys(r["view"] for r in rows):
        for cls in dict.fromkeys(r["class"] for r in rows):
            sel = [r for r in rows if r["view"] == view and r["class"] == cls]
            if not sel:
                continue
            mass, share = np.array([r["mass"] for r in sel]), np.array([r["share"] for r in sel])
            summary.setdefault(view, {})[cls] = {
                "n": len(sel), "mean_mass_in_box": float(mass.mean()), "mean_box_share": float(share.mean()),
                "mean_ratio": float((mass / share).mean()), "fraction_above_share": float((mass > share).mean())}
    out = {"model": pipe.source, "prompts": args.n, "read": args.n - skipped, "all_five_correct": correct,
           "seconds": seconds, "summary": summary}
    print(f"{args.n} complete prompts (held-out combinations), seeds 1000..{999 + args.n}; the reader found a shape "
          f"in {args.n - skipped}, all five attributes right in {correct}; {seconds:.1f} s")
    for view, per in summary.items():
        print(f"\n{view}:\n  {'token':<18} {'n':>3} {'mass in box':>12} {'box share':>10} {'mass/share':>11} "
              f"{'mass>share':>11}")
        for cls, s in per.items():
            print(f"  {cls:<18} {s['n']:>3} {s['mean_mass_in_box']:>12.3f} {s['mean_box_share']:>10.3f} "
                  f"{s['mean_ratio']:>11.2f} {s['fraction_above_share']:>11.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
