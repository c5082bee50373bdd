"""Procedural one-shape scenes and their prompts (issue 5's task), rendered in batches with torch.

A scene is one shape (circle / square / triangle) of one colour on a plain background of another colour, at one
of five positions, in one of two sizes, with +-3 px position jitter and +-1 px size jitter. Images are 64x64 RGB
in [-1, 1] (NCHW float) or uint8 HWC. Edges are antialiased with a signed-distance ramp one pixel wide.

10% of the 1,680 attribute combinations are held out (fixed seed 1234) and listed in recipe/heldout.json.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import torch

SHAPES = ["circle", "square", "triangle"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
POSITIONS = ["left", "right", "top", "bottom", "center"]
SIZES = ["small", "large"]
PALETTE = {  # RGB uint8
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (35, 65, 225), "yellow": (245, 215, 35),
    "purple": (135, 45, 175), "orange": (245, 135, 25), "white": (245, 245, 245), "black": (15, 15, 15),
}
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                   "center": "in the center"}
IMAGE_SIZE = 64
OFFSET = 13  # px from the image centre for left/right/top/bottom
POSITION_XY = {"left": (-OFFSET, 0), "right": (OFFSET, 0), "top": (0, -OFFSET), "bottom": (0, OFFSET), "center": (0, 0)}
RADIUS = {"small": 9.0, "large": 15.0}  # half the shape's width in px; small shapes are >= 16 px across
SQUARE_SCALE = 1.0  # square half-side / r: small squares are 16-20 px wide (0.9 before 2026-11-26 14:05)
TRIANGLE_SCALE = 1.15  # triangles are drawn a little wider so their area is not much below a circle's
POS_JITTER = 3.0
SIZE_JITTER = 1.0
HELDOUT_SEED = 1234
HELDOUT_FILE = Path(__file__).with_name("heldout.json")

# a combination: (shape, colour, background, position, size)
ALL_COMBOS = [(s, c, b, p, z) for s, c, b, p, z in itertools.product(SHAPES, COLOURS, COLOURS, POSITIONS, SIZES)
              if c != b]
assert len(ALL_COMBOS) == 1680


def heldout_combos():
    """The fixed 10% of combinations never rendered in training (seeded shuffle)."""
    rng = random.Random(HELDOUT_SEED)
    combos = list(ALL_COMBOS)
    rng.shuffle(combos)
    return sorted(combos[: len(combos) // 10])


HELDOUT = heldout_combos()
HELDOUT_SET = set(HELDOUT)
TRAIN_COMBOS = [c for c in ALL_COMBOS if c not in HELDOUT_SET]


def write_heldout_json(path=HELDOUT_FILE):
    keys = ["shape", "colour", "background", "position", "size"]
    data = {"seed": HELDOUT_SEED, "count": len(HELDOUT), "attributes": keys,
            "combinations": [dict(zip(keys, c)) for c in HELDOUT]}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def prompt(shape, colour, background, position, size, order=0):
    """Prompt text; any attribute may be None (left out). order 0: 'a ..., X background'; 1: 'X background, a ...'."""
    words = ["a"] + [w for w in (size, colour) if w] + [shape or "shape"]
    obj = " ".join(words) + (" " + POSITION_PHRASE[position] if position else "")
    if not background:
        return obj
    bg = f"{background} background"
    return f"{obj}, {bg}" if order == 0 else f"{bg}, {obj}"


def sample_prompt_attributes(combos, gen, p_complete=0.5, p_drop=0.35):
    """(attributes, word order) per combo; with prob 1 - p_complete each attribute is dropped (None) independently
    with prob p_drop."""
    out = []
    for c in combos:
        keep = [True] * 5
        if torch.rand((), generator=gen).item() > p_complete:
            keep = (torch.rand(5, generator=gen) > p_drop).tolist()
        attrs = [a if k else None for a, k in zip(c, keep)]
        order = int(torch.rand((), generator=gen).item() < 0.5)
        out.append((attrs, order))
    return out


def sample_prompt_patterns(combos, gen, p_complete=0.4):
    """(attributes, word order) per combo, every pattern of open prompt equally likely: with prob p_complete all five
    attributes are given; otherwise the number given k is uniform over 0..4 and which k uniform among the C(5, k)
    subsets. (sample_prompt_attributes' independent drops make prompts giving 0 or 1 attribute rare: 0.5% and 5%.)"""
    out = []
    for c in combos:
        keep = [True] * 5
        if torch.rand((), generator=gen).item() >= p_complete:
            k = int(torch.randint(5, (), generator=gen).item())  # attributes given, 0..4
            given = set(torch.randperm(5, generator=gen)[:k].tolist())
            keep = [i in given for i in range(5)]
        attrs = [a if k else None for a, k in zip(c, keep)]
        order = int(torch.rand((), generator=gen).item() < 0.5)
        out.append((attrs, order))
    return out


def sample_prompts(combos, gen, p_complete=0.5, p_drop=0.35):
    """Prompts for combos, attributes dropped as sample_prompt_attributes does."""
    return [prompt(*attrs, order=order) for attrs, order in sample_prompt_attributes(combos, gen, p_complete, p_drop)]


def sample_combos(n, gen, combos=TRAIN_COMBOS):
    idx = torch.randint(len(combos), (n,), generator=gen).tolist()
    return [combos[i] for i in idx]


def render(combos, gen=None, jitter=True, size=IMAGE_SIZE, device=None):
    """Render scenes -> float tensor [B, 3, size, size] in [-1, 1] (random draws on the CPU generator `gen`)."""
    B = len(combos)
    s = size / IMAGE_SIZE
    cx = torch.tensor([POSITION_XY[c[3]][0] for c in combos], dtype=torch.float32) * s + size / 2
    cy = torch.tensor([POSITION_XY[c[3]][1] for c in combos], dtype=torch.float32) * s + size / 2
    r = torch.tensor([RADIUS[c[4]] for c in combos], dtype=torch.float32) * s
    if jitter:
        cx = cx + (torch.rand(B, generator=gen) * 2 - 1) * POS_JITTER * s
        cy = cy + (torch.rand(B, generator=gen) * 2 - 1) * POS_JITTER * s
        r = r + (torch.rand(B, generator=gen) * 2 - 1) * SIZE_JITTER * s
    cx, cy, r = cx.to(device), cy.to(device), r.to(device)
    yy, xx = torch.meshgrid(torch.arange(size, device=device) + 0.5, torch.arange(size, device=device) + 0.5,
                            indexing="ij")  # [H, W]
    dx = xx[None] - cx[:, None, None]  # [B, H, W]
    dy = yy[None] - cy[:, None, None]
    rr = r[:, None, None]
    sd_circle = torch.sqrt(dx * dx + dy * dy) - rr
    sd_square = torch.maximum(dx.abs(), dy.abs()) - rr * SQUARE_SCALE
    # upward triangle (r scaled by TRIANGLE_SCALE): apex (0, -r), base y = +0.8 r spanning x in [-r, r]
    rr = rr * TRIANGLE_SCALE
    h = 1.8 * rr
    norm = torch.sqrt(h * h + rr * rr)
    sd_base = dy - 0.8 * rr
    sd_right = (h * dx - rr * (dy + rr)) / norm  # edge (0,-r) -> (r, 0.8r)
    sd_left = (-h * dx - rr * (dy + rr)) / norm  # edge (0,-r) -> (-r, 0.8r)
    sd_tri = torch.maximum(sd_base, torch.maximum(sd_left, sd_right))
    kind = torch.tensor([SHAPES.index(c[0]) for c in combos], device=device)[:, None, None]
    sd = torch.where(kind == 0, sd_circle, torch.where(kind == 1, sd_square, sd_tri))
    alpha = (0.5 - sd * s ** -1).clamp(0, 1)[:, None]  # [B, 1, H, W]
    fg = torch.tensor([PALETTE[c[1]] for c in combos], dtype=torch.float32, device=device)[:, :, None, None] / 127.5 - 1
    bg = torch.tensor([PALETTE[c[2]] for c in combos], dtype=torch.float32, device=device)[:, :, None, None] / 127.5 - 1
    return alpha * fg + (1 - alpha) * bg  # [B, 3, H, W]


def to_uint8(x):
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (numpy)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


if __name__ == "__main__":
    write_heldout_json()
    g = torch.Generator().manual_seed(0)
    cs = sample_combos(8, g)
    print(sample_prompts(cs, g))
    print(len(TRAIN_COMBOS), len(HELDOUT))
