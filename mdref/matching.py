"""Name a runtime's tensors by mdref's points, by shape and value: for runtimes that lose PyTorch's module names
(TFLite / LiteRT, Core ML, ggml, a hand-written port), dump every tensor the runtime holds, named however it names
them, and `match` finds which one is which mdref point.

For each point of the reference trace (in its order) every candidate tensor with the same number of elements is
read in each layout that fits the point's shape, and scored by

    err = max |candidate - reference| / max |reference|       (float64, over the positions finite in both)

Layouts (the candidate's memory order -> the point's shape): ``same`` (a plain reshape: [1, C, H, W] from [C, H, W]
or [C, H*W]), ``channels_last`` (a point [B, C, H, W] from [B, H, W, C] or [B, H*W, C]), ``channels_first`` (a
point [B, N, C] from [B, C, N] or [B, C, H, W]), ``transposed`` (a point [A, B] from [B, A]) and ``seq_first`` (a
point [B, T, D] from [T, B, D]). The point's match is the (tensor, layout) of smallest err. Its confidence:
  exact      err == 0
  high       err <= agree (default 2e-2: float16's tolerance) and every candidate holding other values is at least
             `margin` (default 10) times further away
  ambiguous  err <= agree, but another candidate with other values is within `margin` times err
  low        agree < err <= max_error (default 0.5): mapped, but this runtime's value differs here (or it is the
             wrong tensor); `mdref compare` on the mapped trace says how much
  unmatched  no candidate has the point's element count, or the best err is above max_error (a tensor of zeros
             scores 1)
Candidates holding the same values as the best (a Reshape's output and its input) do not count against it. One
candidate may be the match of several points that hold the same array (``noise`` / ``sampler.noise``,
``unet.mid_block`` / ``unet.mid_block.resnets.1``).

The mapped trace holds, for every point matched (all but unmatched), the candidate in the point's layout, under the
point's name, in the reference's order; its manifest's ``"match"`` says where each came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .comparison import _strict
from .trace import Trace, load_trace

__all__ = ["match", "MatchReport", "PointMatch", "LAYOUTS", "format_match"]

AGREE = 2e-2
MARGIN = 10.0
MAX_ERROR = 0.5


def _layouts(shape):
    """[(name, candidate shape, permutation)]: reading a candidate as `cand.reshape(s).transpose(p)` gives `shape`."""
    out = [("same", tuple(shape), None)]
    if len(shape) == 4:
        b, c, h, w = shape
        out.append(("channels_last", (b, h, w, c), (0, 3, 1, 2)))
    if len(shape) == 3:
        b, n, c = shape
        out.append(("channels_first", (b, c, n), (0, 2, 1)))
        out.append(("seq_first", (n, b, c), (1, 0, 2)))
    if len(shape) == 2:
        out.append(("transposed", (shape[1], shape[0]), (1, 0)))
    return out


LAYOUTS = ("same", "channels_last", "channels_first", "seq_first", "transposed")


def _view(cand, shape, perm):
    x = cand.reshape(shape)
    return x if perm is None else x.transpose(perm)


def _err(ref, x, peak):
    """max |x - ref| / max |ref| over the positions finite in both (inf where x is non-finite but ref is not)."""
    fr, fx = np.isfinite(ref), np.isfinite(x)
    if (fr & ~fx).any():
        return math.inf
    both = fr & fx
    if not both.any():
        return 0.0
    d = float(np.max(np.abs(x[both] - ref[both])))
    return d / peak if peak > 0 else (0.0 if d == 0 else math.inf)


@dataclass
class PointMatch:
    point: str
    shape: tuple
    tensor: str | None = None          # the candidate's name
    tensor_shape: tuple | None = None
    layout: str | None = None
    err: float | None = None           # max |d| / max |ref|
    runner_up: str | None = None       # the closest (tensor, layout) holding other values
    runner_up_err: float | None = None
    confidence: str = "unmatched"
    candidates: int = 0                # tensors of the same element count


@dataclass
class MatchReport:
    points: list = field(default_factory=list)      # PointMatch, in the reference's order
    unused: list = field(default_factory=list)      # candidate names matched to no point
    agree: float = AGREE
    margin: float = MARGIN
    max_error: float = MAX_ERROR
    mapped: dict = field(default_factory=dict, repr=False)   # point -> array in the point's layout

    @property
    def unmatched(self):
        return [p.point for p in self.points if p.confidence == "unmatched"]

    @property
    def ok(self):
        return not self.unmatched

    def counts(self):
        out = {}
        for p in self.points:
            out[p.confidence] = out.get(p.confidence, 0) + 1
        return out

    def to_dict(self):
        d = {k: v for k, v in asdict(self).items() if k != "mapped"}
        return dict(d, unmatched=self.unmatched, counts=self.counts(), ok=self.ok)

    def to_json(self, indent=1):
        return json.dumps(_strict(self.to_dict()), indent=indent, allow_nan=False)

    def trace(self):
        """The mapped trace: every matched point's candidate, in the point's layout, in the reference's order."""
        t = Trace()
        for p in self.points:
            if p.point in self.mapped:
                t.add(p.point, self.mapped[p.point])
        t.meta["match"] = {p.point: {"tensor": p.tensor, "layout": p.layout, "err": p.err,
                                     "confidence": p.confidence} for p in self.points if p.point in self.mapped}
        return t


def _arrays(x):
    if isinstance(x, Trace):
        return x.arrays
    if isinstance(x, dict):
        return x
    return load_trace(x)[0]


def match(reference, candidate, *, agree=AGREE, margin=MARGIN, max_error=MAX_ERROR):
    """Map the tensors of `candidate` (a trace file, Trace or {name: array}, named anyhow) onto the points of
    `reference` (mdref's trace) by shape and value; returns a MatchReport (see the module docstring)."""
    for name, v in (("agree", agree), ("margin", margin), ("max_error", max_error)):
        if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a finite number >= 0, found {v!r}")
    ref, cand = _arrays(reference), _arrays(candidate)
    by_size = {}
    for name, a in cand.items():
        by_size.setdefault(np.asarray(a).size, []).append(name)
    cache = {}

    def as64(name):
        if name not in cache:
            cache[name] = np.asarray(cand[name], dtype=np.float64).ravel()
        return cache[name]

    report = MatchReport(agree=agree, margin=margin, max_error=max_error)
    used = set()
    for point, r in ref.items():
        r = np.asarray(r, dtype=np.float64)
        pm = PointMatch(point, tuple(r.shape))
        names = by_size.get(r.size, []) if r.size else []
        pm.candidates = len(names)
        finite = r[np.isfinite(r)]
        peak = float(np.max(np.abs(finite))) if finite.size else 0.0
        scored = []                                           # (err, name, layout, view)
        for name in names:
            c = as64(name)
            for layout, shape, perm in _layouts(r.shape):
                x = _view(c, shape, perm)
                scored.append((_err(r, x, peak), name, layout, x))
        scored.sort(key=lambda s: s[0])
        if scored and scored[0][0] <= max_error:
            err, name, layout, best = scored[0]
            rival = next((s for s in scored[1:] if not np.array_equal(s[3], best, equal_nan=True)), None)
            pm.tensor, pm.tensor_shape, pm.layout, pm.err = name, tuple(np.shape(cand[name])), layout, err
            if rival is not None:
                pm.runner_up, pm.runner_up_err = rival[1], rival[0]
            if err == 0 and (rival is None or rival[0] > 0):
                pm.confidence = "exact"
            elif err <= agree:
                pm.confidence = "high" if rival is None or rival[0] >= margin * err else "ambiguous"
            else:
                pm.confidence = "low"
            report.mapped[point] = _view(np.asarray(cand[name]).ravel(), *next(
                (s, p) for lay, s, p in _layouts(r.shape) if lay == layout))
            used.add(name)
        report.points.append(pm)
    report.unused = [n for n in cand if n not in used]
    return report


def format_match(report, *, all_points=True):
    """Human-readable table of a MatchReport."""
    lines = [f"{'point':<60} {'tensor':<44} {'layout':<14} {'err':>9} {'next':>9}  confidence"]
    for p in report.points:
        if not all_points and p.confidence in ("exact", "high"):
            continue
        if p.tensor is None:
            why = "no tensor of its size" if not p.candidates else f"best of {p.candidates} above max_error"
            lines.append(f"{p.point:<60} {'-':<44} {'-':<14} {'-':>9} {'-':>9}  unmatched ({why})")
            continue
        nxt = "-" if p.runner_up_err is None else f"{p.runner_up_err:9.2e}"
        lines.append(f"{p.point:<60} {p.tensor[-44:]:<44} {p.layout:<14} {p.err:9.2e} {nxt:>9}  {p.confidence}")
    counts = ", ".join(f"{n} {k}" for k, n in sorted(report.counts().items()))
    lines.append(f"\n{len(report.points)} points: {counts}; {len(report.unused)} candidate tensors unused "
                 f"(agree <= {report.agree:g}, margin {report.margin:g}, max_error {report.max_error:g})")
    if report.unmatched:
        lines.append("unmatched: " + ", ".join(report.unmatched[:10]) + (" ..." if len(report.unmatched) > 10 else ""))
    return "\n".join(lines)
