"""Classical evaluator for one-shape scenes: reads a uint8 HxWx3 image and decides background colour, shape colour,
shape class, position and size (NumPy only).

- background: the palette colour nearest the median of the 2-px border frame
- shape colour: nearest palette colour (other than the background) to the median of pixels far from the background
- mask: pixels closer to the shape colour than to the background (projection on the bg -> fg line > 0.5);
  the largest 4-connected component is the shape; other components over MIN_BLOB px count as extra blobs
- box: the mask's bounding box; position: its centre relative to the image centre (centre box +-CENTER_BOX px, else the larger axis)
- size: mask area / the class's area per r^2 (r = half the shape's width) above / below SIZE_R2
- class: row widths of the mask over the top and bottom fifths of its bounding box, and the fill ratio of the box
"""

from __future__ import annotations


import numpy as np

from data import COLOURS, PALETTE, SQUARE_SCALE, TRIANGLE_SCALE

PAL = np.array([PALETTE[c] for c in COLOURS], dtype=np.float64)  # [8, 3]
CENTER_BOX = 6.5  # px at 64x64
SIZE_R2 = 144.0  # r^2 threshold (r = 12 px at 64x64): small shapes have r <= 10, large r >= 14
SHAPE_AREA = {"circle": np.pi, "square": 4 * SQUARE_SCALE ** 2, "triangle": 1.8 * TRIANGLE_SCALE ** 2}  # area / r^2
FAR_FROM_BG = 60.0  # RGB distance for the first (colour) pass
MIN_BLOB = 12  # px at 64x64: smaller specks are ignored when counting shapes
ATTRS = ["shape", "colour", "background", "position", "size"]


def _nearest(rgb, exclude=None):
    d = np.linalg.norm(PAL - rgb[None], axis=1)
    if exclude is not None:
        d[exclude] = np.inf
    return int(np.argmin(d))


def components(mask):
    """4-connected component labels of a boolean mask by iterated min-label propagation (no scipy)."""
    H, W = mask.shape
    big = H * W + 1
    lab = np.where(mask, np.arange(H * W).reshape(H, W), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nb = np.minimum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        nb = np.where(mask, nb, big)
        if np.array_equal(nb, lab):
            break
        lab = nb
    ids, counts = np.unique(lab[mask], return_counts=True)
    return lab, ids, counts


def evaluate(img):
    """uint8 [H, W, 3] -> dict(shape, colour, background, position, size, blobs, clean, box, features); box is the
    shape's bounding box (y0, y1, x0, x1) in pixels, end-exclusive (absent when no shape is found)."""
    img = np.asarray(img, dtype=np.float64)
    H, W, _ = img.shape
    s = H / 64.0
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    bg_i = _nearest(np.median(border, axis=0))
    bg = PAL[bg_i]
    far = np.linalg.norm(img - bg, axis=-1) > FAR_FROM_BG
    if far.sum() < 4:
        return {"shape": None, "colour": None, "background": COLOURS[bg_i], "position": None, "size": None,
                "blobs": 0, "clean": False}
    fg_i = _nearest(np.median(img[far], axis=0), exclude=bg_i)
    fg = PAL[fg_i]
    t = ((img - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))  # [H, W] 0 at bg, 1 at fg
    mask0 = t > 0.5
    if mask0.sum() == 0:
        mask0 = far
    lab, ids, counts = components(mask0)
    mask = lab == ids[np.argmax(counts)]
    blobs = int((counts >= MIN_BLOB * s * s).sum())
    ys, xs = np.nonzero(mask)
    area = mask.sum() / (s * s)
    cx, cy = (xs.min() + xs.max() + 1) / (2 * s) - 32, (ys.min() + ys.max() + 1) / (2 * s) - 32  # bbox centre
    if abs(cx) < CENTER_BOX and abs(cy) < CENTER_BOX:
        pos = "center"
    elif abs(cx) > abs(cy):
        pos = "left" if cx < 0 else "right"
    else:
        pos = "top" if cy < 0 else "bottom"
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1].astype(np.float64)
    h, w = box.shape
    fill = box.mean()
    k = max(1, int(round(h / 5)))
    top_w, bot_w = box[:k].sum(1).mean() / w, box[-k:].sum(1).mean() / w
    if bot_w - top_w > 0.3:
        shape = "triangle"
    elif fill > 0.9 or min(top_w, bot_w) > 0.82:
        shape = "square"
    else:
        shape = "circle"
    r2 = area / SHAPE_AREA[shape]  # the shape's r^2 (r = half its width, data.RADIUS)
    size = "large" if r2 > SIZE_R2 else "small"
    return {"shape": shape, "colour": COLOURS[fg_i], "background": COLOURS[bg_i], "position": pos, "size": size,
            "blobs": blobs, "clean": blobs == 1, "box": (int(y0), int(y1), int(x0), int(x1)),
            "features": {"fill": float(fill), "top_w": float(top_w), "bot_w": float(bot_w), "area": float(area), "r2": float(r2)}}


def score(images, combos):
    """Per-attribute accuracy and all-five accuracy of evaluate() on images against (shape, colour, bg, pos, size)."""
    hits = {k: 0 for k in ATTRS}
    allfive = 0
    wrong = []
    for img, c in zip(images, combos):
        r = evaluate(img)
        ok = [r[k] == v for k, v in zip(ATTRS, c)]
        for k, o in zip(ATTRS, ok):
            hits[k] += o
        allfive += all(ok)
        if not all(ok):
            wrong.append((c, {k: r[k] for k in ATTRS}, r.get("features")))
    n = len(combos)
    return {**{k: v / n for k, v in hits.items()}, "all": allfive / n}, wrong


if __name__ == "__main__":
    import torch

    import data

    g = torch.Generator().manual_seed(7)
    cs = data.sample_combos(1000, g, data.ALL_COMBOS)
    imgs = data.to_uint8(data.render(cs, g))
    acc, wrong = score(imgs, cs)
    print("ground truth (1000 renders):", {k: round(v, 4) for k, v in acc.items()})
    for w in wrong[:10]:
        print(w)
