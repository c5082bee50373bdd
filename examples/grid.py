"""A grid of prompts x seeds drawn by the embedded default model, one UNet evaluation per image.

Each row is one prompt, each column one seed; the prompt is written to the left of its row.
Writes OUT/mdref_grid.png (OUT: first argument, default /tmp).

    python examples/grid.py [OUT]
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import mdref

PROMPTS = [
    "a large red circle on the left, blue background",          # complete: all five attributes given
    "a small yellow triangle at the top, black background",
    "green background, a large white square in the center",
    "a small purple square at the bottom, orange background",
    "a red circle",                                             # open: the model picks the rest per seed
    "a small blue triangle",
    "a yellow square at the top",
    "a shape on the right, white background",
    "a shape",
]
SEEDS = range(6)
SCALE = 2                                     # nearest-neighbour upscaling of each 64x64 image
LABEL_WIDTH = 270

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp")
out.mkdir(parents=True, exist_ok=True)
pipe = mdref.Pipeline.from_pretrained()
h, w = pipe.default_size()
rows = []
for prompt in PROMPTS:
    images = pipe([prompt] * len(SEEDS), noise=np.concatenate(
        [mdref.sampler.initial_noise(pipe.latent_shape(1), seed, pipe.dtype) for seed in SEEDS]))
    row = np.concatenate([np.asarray(im) for im in images], axis=1)           # [h, w * seeds, 3]
    rows.append(row.repeat(SCALE, axis=0).repeat(SCALE, axis=1))
grid = Image.new("RGB", (LABEL_WIDTH + rows[0].shape[1], sum(r.shape[0] for r in rows)), "white")
draw = ImageDraw.Draw(grid)
for i, (prompt, row) in enumerate(zip(PROMPTS, rows)):
    grid.paste(Image.fromarray(row), (LABEL_WIDTH, i * row.shape[0]))
    draw.text((6, i * row.shape[0] + row.shape[0] // 2 - 6), prompt, fill="black")
grid.save(out / "mdref_grid.png")
print(f"{pipe}: {len(PROMPTS)} prompts x {len(SEEDS)} seeds -> {out / 'mdref_grid.png'}")
