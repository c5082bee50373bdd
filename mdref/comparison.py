"""Compare two traces point by point and name the first point that diverges.

Metrics per common point (a is the reference, b the candidate, both widened to float64):
  max_abs   max |a - b|
  max_rel   max |a - b| / max(|a|, tiny)           (elementwise; large where a is near zero)
  rel_to_max max |a - b| / max |a|                  (the tolerance mdref's parity tests use)
  nmse      sum (a - b)^2 / sum a^2
  cosine    <a, b> / (|a| |b|)
  psnr_db   10 log10(max|a|^2 / mean (a - b)^2)
A point agrees when max_abs <= atol + rtol * max|a| and the shapes are equal.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from .trace import Trace, load_trace

__all__ = ["PointReport", "CompareReport", "compare", "default_tolerance"]

# Default rtol (relative to max |reference| of each point) by the least precise dtype involved.
DEFAULT_RTOL = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
DEFAULT_ATOL = 1e-30


@dataclass
class PointReport:
    name: str
    shape_a: tuple
    shape_b: tuple
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    rel_to_max: float = float("nan")
    nmse: float = float("nan")
    cosine: float = float("nan")
    psnr_db: float = float("nan")
    ok: bool = False


@dataclass
class CompareReport:
    points: list = field(default_factory=list)       # PointReport, in execution order of a
    first_divergence: str | None = None
    only_in_a: list = field(default_factory=list)
    only_in_b: list = field(default_factory=list)
    rtol: float = 0.0
    atol: float = 0.0
    excerpt: list = field(default_factory=list)       # (index, a value, b value) at the first divergence

    @property
    def ok(self):
        return self.first_divergence is None and bool(self.points)

    def to_dict(self):
        return asdict(self)


def default_tolerance(dtypes):
    """rtol for the least precise of the given float dtype names (unknown names, or none, count as float32)."""
    order = ["bfloat16", "float16", "float32", "float64"]
    worst = min((order.index(d) if d in order else 2) for d in dtypes) if dtypes else 2
    return DEFAULT_RTOL[order[worst]]


def _as_trace(x):
    """A Trace, a {name: array} dict or a path -> (ordered dict, dtype names)."""
    if isinstance(x, Trace):
        arrays = x.arrays
    elif isinstance(x, dict):
        arrays = x
    else:
        arrays, _ = load_trace(x)
    return arrays, {str(np.asarray(v).dtype) for v in arrays.values() if np.asarray(v).dtype.kind == "f"}


def _matcher(points):
    if points is None:
        return lambda n: True
    pats = [points] if isinstance(points, str) else list(points)
    ms = [re.compile(p[3:]).search if p.startswith("re:") else re.compile(fnmatch.translate(p)).match for p in pats]
    return lambda n: any(m(n) for m in ms)


def _metrics(a, b):
    d = b - a
    absd = np.abs(d)
    peak = float(np.max(np.abs(a))) if a.size else 0.0
    mse = float(np.mean(d * d)) if a.size else 0.0
    tiny = np.finfo(np.float64).tiny
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return dict(
        max_abs=float(absd.max()) if a.size else 0.0,
        max_rel=float(np.max(absd / np.maximum(np.abs(a), tiny))) if a.size else 0.0,
        rel_to_max=float(absd.max() / peak) if peak > 0 else (0.0 if not absd.any() else float("inf")),
        nmse=float(np.sum(d * d) / max(float(np.sum(a * a)), tiny)),
        cosine=float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na > 0 and nb > 0 else float(na == nb),
        psnr_db=float(10 * np.log10(peak * peak / mse)) if mse > 0 and peak > 0 else float("inf"),
    ), peak


def compare(a, b, *, rtol=None, atol=None, points=None, excerpt=6):
    """Compare trace b against reference trace a (Trace, dict or trace-file path). Returns a CompareReport
    whose first_divergence names the first point, in a's execution order, that exceeds the tolerance."""
    arr_a, dt_a = _as_trace(a)
    arr_b, dt_b = _as_trace(b)
    keep = _matcher(points)
    rtol = default_tolerance(dt_a | dt_b) if rtol is None else rtol
    atol = DEFAULT_ATOL if atol is None else atol
    report = CompareReport(rtol=rtol, atol=atol,
                           only_in_a=[n for n in arr_a if keep(n) and n not in arr_b],
                           only_in_b=[n for n in arr_b if keep(n) and n not in arr_a])
    for name in arr_a:
        if not keep(name) or name not in arr_b:
            continue
        xa = np.asarray(arr_a[name], dtype=np.float64)
        xb = np.asarray(arr_b[name], dtype=np.float64)
        pr = PointReport(name, tuple(xa.shape), tuple(xb.shape))
        if xa.shape == xb.shape:
            m, peak = _metrics(xa, xb)
            for k, v in m.items():
                setattr(pr, k, v)
            pr.ok = bool(np.all(np.isfinite(xb)) and pr.max_abs <= atol + rtol * peak)
        report.points.append(pr)
        if not pr.ok and report.first_divergence is None:
            report.first_divergence = name
            if xa.shape == xb.shape and xa.size:
                idx = np.argsort(-np.abs(xb - xa), axis=None)[:excerpt]
                report.excerpt = [(tuple(int(i) for i in np.unravel_index(j, xa.shape)),
                                   float(xa.ravel()[j]), float(xb.ravel()[j])) for j in idx]
    return report


def format_report(report, *, all_points=True):
    """Human-readable table of a CompareReport."""
    lines = [f"{'point':<64} {'shape':>18} {'max_abs':>10} {'rel/max':>10} {'nmse':>10} {'cosine':>12} {'psnr':>8}"]
    for pr in report.points:
        first = pr.name == report.first_divergence
        if not (all_points or first or not pr.ok):
            continue
        mark = "  <-- FIRST DIVERGENCE" if first else ("  x" if not pr.ok else "")
        if pr.shape_a != pr.shape_b:
            lines.append(f"{pr.name:<64} shape {pr.shape_a} vs {pr.shape_b}{mark}")
            continue
        lines.append(f"{pr.name:<64} {str(pr.shape_a):>18} {pr.max_abs:10.3e} {pr.rel_to_max:10.3e} "
                     f"{pr.nmse:10.3e} {pr.cosine:12.9f} {pr.psnr_db:8.1f}{mark}")
    if report.first_divergence:
        lines.append(f"\nfirst divergence: {report.first_divergence} (tolerance: max_abs <= {report.atol:g} + "
                     f"{report.rtol:g} * max|a|)")
        for idx, va, vb in report.excerpt:
            lines.append(f"  at {idx}: a = {va:.9g}  b = {vb:.9g}  diff = {vb - va:.3e}")
    else:
        lines.append(f"\nall {len(report.points)} common points agree (rtol {report.rtol:g}, atol {report.atol:g})")
    if report.only_in_a:
        lines.append(f"only in a ({len(report.only_in_a)}): " + ", ".join(report.only_in_a[:10]))
    if report.only_in_b:
        lines.append(f"only in b ({len(report.only_in_b)}): " + ", ".join(report.only_in_b[:10]))
    return "\n".join(lines)
