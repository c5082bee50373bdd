"""Compare two traces point by point and name the first point that diverges.

Metrics per common point (a is the reference, b the candidate, both widened to float64), computed over the
positions where a and b are both finite:
  max_abs    max |a - b|
  max_rel    max |a - b| / max(|a|, tiny)           (elementwise; large where a is near zero)
  rel_to_max max |a - b| / max |a|                  (the tolerance mdref's parity tests use)
  nmse       sum (a - b)^2 / sum a^2
  cosine     <a, b> / (|a| |b|)
  psnr_db    10 log10(max|a|^2 / mean (a - b)^2)    (inf when those positions are identical)
Over no positions at all (an empty point, or one that is non-finite everywhere) max_abs, rel_to_max and nmse
are 0, cosine 1 and psnr_db inf. Metrics are None when the shapes differ (nothing is computed).

Non-finite values (NaN, +inf, -inf). Per point the report counts them in a and in b separately (nonfinite_a,
nonfinite_b), gives the first position of each in C order (first_nonfinite_a / _b, None if there is none), and
counts the positions where a and b do not hold the *same* non-finite value (nonfinite_mismatch). A position
agrees when a and b are both NaN, or both +inf, or both -inf: a candidate that reproduces the reference's
overflow exactly agrees (mdref's reference holds a non-finite value only when one studies overflow). A NaN or
inf in one trace where the other holds anything else is a mismatch. A point agrees when the shapes are equal,
nonfinite_mismatch is 0 and max_abs <= atol + rtol * max|a| (max over the finite-in-both positions). At the
first divergence the excerpt lists the mismatched non-finite positions first, then the largest finite
differences.

Tolerance, chosen per point. A point agrees when max_abs <= atol + rtol * max|a|, with rtol from the point's
*precision*: the compute dtype each trace declares for it (manifest "point_precision" {name: dtype}, else the
trace's "precision", else the dtype the tensor is stored in), the less precise of the two sides, looked up in
DEFAULT_RTOL (float64 1e-9, float32 1e-4, float16 2e-2, bfloat16 5e-2) and raised where the point's own
arithmetic is known to be ill-conditioned in that dtype (POINT_RTOL: the sinusoidal timestep embeddings). So a
candidate that stores its image in float16 loosens that point only, and a float16 run saved as float32 arrays is
judged as float16 when its manifest says so. Integer points (token ids, masks: stored as integers on either side)
are compared exactly, whatever the tolerance. An explicit rtol / atol overrides the defaults for every float point.

JSON (CompareReport.to_json, `mdref compare --json`) is strict JSON (RFC 8259): non-finite floats are written as
the strings "nan", "inf" and "-inf" (a PSNR of identical points is "inf"), metrics not computed as null.
"""

from __future__ import annotations

import fnmatch
import json
import math
import numbers
from dataclasses import asdict, dataclass, field

import numpy as np

from .trace import PRECISIONS, Trace, load_trace, point_matcher, point_precisions

__all__ = ["PointReport", "CompareReport", "compare", "default_tolerance", "point_tolerance", "format_report",
           "DEFAULT_RTOL", "POINT_RTOL"]

# Default rtol (relative to max |reference| of each point) by the point's precision (the less precise side).
DEFAULT_RTOL = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
DEFAULT_ATOL = 1e-30
EXACT = "exact"                           # the precision of an integer point: compared value for value
# Points whose arithmetic in a dtype errs by more than that dtype's default: {dtype: {glob: rtol}}.
# The timestep embedding is a sinusoid of t * f_i with t up to T - 1 = 999: in float32 the argument itself is
# rounded to a grid of ulp(999) = 6.1e-5 and f_i = exp(-ln(10^4) i / half) carries a few ulps more, so sin / cos
# err by up to ~2 * 999 * 2^-24 * 2 = 2.4e-4 of their range before the two linear layers, against float64 (the
# float32 runs of every shipped model and preset measured 1.0-1.2e-4 there; benchmarks/kernel-spread.md).
POINT_RTOL = {"float32": {"*time_embedding": 4e-4}}


@dataclass
class PointReport:
    name: str
    shape_a: tuple
    shape_b: tuple
    max_abs: float | None = None
    max_rel: float | None = None
    rel_to_max: float | None = None
    nmse: float | None = None
    cosine: float | None = None
    psnr_db: float | None = None
    nonfinite_a: int = 0                  # NaN / inf count in a
    nonfinite_b: int = 0                  # NaN / inf count in b
    first_nonfinite_a: tuple | None = None
    first_nonfinite_b: tuple | None = None
    nonfinite_mismatch: int = 0           # positions where a and b do not hold the same non-finite value
    precision: str | None = None          # "exact" (integer point) or the dtype whose tolerance applies
    rtol: float | None = None             # the tolerance this point was judged by (None: exact)
    atol: float | None = None
    ok: bool = False


def _strict(x):
    """x with non-finite floats as "nan" / "inf" / "-inf" and tuples as lists: what json.dumps(allow_nan=False)
    accepts."""
    if isinstance(x, float):
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else "inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


@dataclass
class CompareReport:
    points: list = field(default_factory=list)       # PointReport, in execution order of a
    first_divergence: str | None = None
    only_in_a: list = field(default_factory=list)
    only_in_b: list = field(default_factory=list)
    rtol: float | None = None                         # an explicit override; None: per point (PointReport.rtol)
    atol: float | None = None
    excerpt: list = field(default_factory=list)       # (index, a value, b value) at the first divergence
    require_all: bool = False                         # points missing on either side make the report fail

    @property
    def missing(self):
        """Points one trace holds and the other lacks (after the points filter)."""
        return self.only_in_a + self.only_in_b

    @property
    def ok(self):
        return (self.first_divergence is None and bool(self.points)
                and not (self.require_all and self.missing))

    def to_dict(self):
        """The report as Python values (floats may be nan / inf; see to_json for strict JSON)."""
        return dict(asdict(self), ok=self.ok)

    def to_json(self, indent=1):
        """The report as strict JSON: non-finite floats as the strings "nan", "inf", "-inf"."""
        return json.dumps(_strict(self.to_dict()), indent=indent, allow_nan=False)


def default_tolerance(dtypes):
    """rtol for the least precise of the given precision names (unknown names, or none, count as float32)."""
    worst = max((PRECISIONS.index(d) if d in PRECISIONS else 1) for d in dtypes) if dtypes else 1
    return DEFAULT_RTOL[PRECISIONS[worst]]


def point_tolerance(name, precision_a, precision_b):
    """(precision, rtol) a point is judged by: EXACT when either side is an integer point, else the less precise
    of the two precisions and its default rtol, raised by POINT_RTOL where the point's own arithmetic needs it."""
    if EXACT in (precision_a, precision_b):
        return EXACT, None
    precision = PRECISIONS[max(PRECISIONS.index(precision_a), PRECISIONS.index(precision_b))]
    rtol = DEFAULT_RTOL[precision]
    for glob, floor in POINT_RTOL.get(precision, {}).items():
        if fnmatch.fnmatchcase(name.split("#")[0], glob):
            rtol = max(rtol, floor)
    return precision, rtol


def _as_trace(x, side):
    """A Trace, a {name: array} dict or a path -> (ordered {name: array}, {name: precision or EXACT}).
    Complex arrays are refused (traces hold real values: comparing them as floats would drop the imaginary part)."""
    if isinstance(x, Trace):
        arrays, manifest = x.arrays, x.meta
    elif isinstance(x, dict):
        arrays, manifest = x, {}
    else:
        arrays, manifest = load_trace(x)
    for name, v in arrays.items():
        kind = np.asarray(v).dtype.kind
        if kind not in "fiub":
            raise ValueError(f"trace {side}: point {name!r} holds {np.asarray(v).dtype} values; trace points are "
                             f"real floating-point or integer arrays")
    return arrays, point_precisions(arrays, manifest, EXACT)


def _metrics(a, b):
    """Metrics over 1-D float64 arrays of finite values (see the module docstring); and max |a|."""
    if not a.size:
        return dict(max_abs=0.0, max_rel=0.0, rel_to_max=0.0, nmse=0.0, cosine=1.0, psnr_db=float("inf")), 0.0
    tiny = np.finfo(np.float64).tiny
    with np.errstate(over="ignore"):               # b - a of finite float64 extremes may overflow: honest inf
        absd = np.abs(b - a)
        max_abs = float(absd.max())
        max_rel = float(np.max(absd / np.maximum(np.abs(a), tiny)))
    peak = float(np.max(np.abs(a)))
    # Sums of squares of a / s, b / s and their difference, s the largest magnitude: they cannot overflow.
    s = max(peak, float(np.max(np.abs(b))))
    if s == 0:
        sum_dd = sum_aa = sum_bb = dot = 0.0
    else:
        as_, bs = a / s, b / s
        ds = bs - as_
        sum_dd, sum_aa, sum_bb = float(ds @ ds), float(as_ @ as_), float(bs @ bs)
        dot = float(as_ @ bs)
    rms_ratio = math.sqrt(sum_dd / a.size)         # rms(a - b) / s
    if rms_ratio == 0:
        psnr = float("inf")
    elif peak == 0:
        psnr = float("-inf")
    else:
        psnr = 20 * math.log10(peak / s / rms_ratio)
    return dict(
        max_abs=max_abs,
        max_rel=max_rel,
        rel_to_max=max_abs / peak if peak > 0 else (0.0 if max_abs == 0 else float("inf")),
        nmse=sum_dd / sum_aa if sum_aa > 0 else (0.0 if sum_dd == 0 else float("inf")),
        cosine=dot / (math.sqrt(sum_aa) * math.sqrt(sum_bb)) if sum_aa > 0 and sum_bb > 0 else float(sum_aa == sum_bb),
        psnr_db=psnr,
    ), peak


def _index(flat_index, shape):
    return tuple(int(i) for i in np.unravel_index(int(flat_index), shape)) if shape else ()


def _compare_point(name, xa, xb, precision, rtol, atol, n_excerpt):
    """One PointReport, and the excerpt to show if it is the first divergence. rtol None: exact (every value
    equal; an integer point)."""
    pr = PointReport(name, tuple(xa.shape), tuple(xb.shape), precision=precision, rtol=rtol,
                     atol=None if rtol is None else atol)
    if xa.shape != xb.shape:
        return pr, []
    fa, fb = np.isfinite(xa), np.isfinite(xb)
    both = fa & fb
    same_nonfinite = ~fa & ~fb & ((np.isnan(xa) & np.isnan(xb)) | (xa == xb))   # NaN/NaN, +inf/+inf, -inf/-inf
    mismatch = ~both & ~same_nonfinite
    pr.nonfinite_a, pr.nonfinite_b = int((~fa).sum()), int((~fb).sum())
    pr.first_nonfinite_a = _index(np.argmin(fa), xa.shape) if pr.nonfinite_a else None
    pr.first_nonfinite_b = _index(np.argmin(fb), xb.shape) if pr.nonfinite_b else None
    pr.nonfinite_mismatch = int(mismatch.sum())
    ra, rb = xa[both], xb[both]
    m, peak = _metrics(ra, rb)
    for k, v in m.items():
        setattr(pr, k, v)
    tol = 0.0 if rtol is None else atol + (rtol * peak if peak > 0 else 0.0)
    pr.ok = bool(pr.nonfinite_mismatch == 0 and pr.max_abs <= tol)
    if pr.ok or not xa.size:
        return pr, []
    flat_a, flat_b = xa.ravel(), xb.ravel()
    picks = list(np.flatnonzero(mismatch.ravel())[:n_excerpt])          # non-finite mismatches first
    if len(picks) < n_excerpt and ra.size:
        where = np.flatnonzero(both.ravel())
        with np.errstate(over="ignore"):
            diff = np.abs(rb - ra)
        order = np.argsort(-diff, kind="stable")[:n_excerpt - len(picks)]
        picks += [where[j] for j in order if diff[j] > 0]
    return pr, [(_index(j, xa.shape), float(flat_a[j]), float(flat_b[j])) for j in picks]


def _check_tol(value, name):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, found {value!r}")
    return float(value)


def compare(a, b, *, rtol=None, atol=None, points=None, excerpt=6, require_all=False):
    """Compare trace b against reference trace a (Trace, dict or trace-file path). Returns a CompareReport
    whose first_divergence names the first point, in a's execution order, that diverges (see the module
    docstring for the metrics, the per-point tolerance and NaN / inf). points filters names
    (mdref.trace.point_matcher); require_all makes points missing on either side a failure (report.ok False)."""
    keep = point_matcher(points)
    arr_a, prec_a = _as_trace(a, "a")
    arr_b, prec_b = _as_trace(b, "b")
    rtol = None if rtol is None else _check_tol(rtol, "rtol")
    atol = None if atol is None else _check_tol(atol, "atol")
    report = CompareReport(rtol=rtol, atol=atol, require_all=bool(require_all),
                           only_in_a=[n for n in arr_a if keep(n) and n not in arr_b],
                           only_in_b=[n for n in arr_b if keep(n) and n not in arr_a])
    for name in arr_a:
        if not keep(name) or name not in arr_b:
            continue
        precision, point_rtol = point_tolerance(name, prec_a[name], prec_b[name])
        if point_rtol is not None and rtol is not None:
            point_rtol = rtol
        xa = np.asarray(arr_a[name], dtype=np.float64)
        xb = np.asarray(arr_b[name], dtype=np.float64)
        pr, ex = _compare_point(name, xa, xb, precision, point_rtol, DEFAULT_ATOL if atol is None else atol,
                                excerpt)
        report.points.append(pr)
        if not pr.ok and report.first_divergence is None:
            report.first_divergence = name
            report.excerpt = ex
    return report


def _num(x, spec):
    return format(x, spec) if x is not None else format("-", spec.split(".")[0].rstrip("efg") + "s")


def format_report(report, *, all_points=True):
    """Human-readable table of a CompareReport (nan / inf printed as such)."""
    show_nf = any(p.nonfinite_a or p.nonfinite_b for p in report.points)
    head = (f"{'point':<64} {'shape':>18} {'max_abs':>10} {'rel/max':>10} {'tol':>8} {'nmse':>10} {'cosine':>12} "
            f"{'psnr':>8}" + (f" {'nonfinite a/b':>15}" if show_nf else ""))
    lines = [head]
    for pr in report.points:
        first = pr.name == report.first_divergence
        if not (all_points or first or not pr.ok):
            continue
        mark = "  <-- FIRST DIVERGENCE" if first else ("  x" if not pr.ok else "")
        if pr.shape_a != pr.shape_b:
            lines.append(f"{pr.name:<64} shape {pr.shape_a} vs {pr.shape_b}{mark}")
            continue
        nf = f" {f'{pr.nonfinite_a}/{pr.nonfinite_b}':>15}" if show_nf else ""
        tol = "exact" if pr.rtol is None else f"{pr.rtol:.0e}"
        lines.append(f"{pr.name:<64} {str(pr.shape_a):>18} {pr.max_abs:10.3e} {pr.rel_to_max:10.3e} {tol:>8} "
                     f"{pr.nmse:10.3e} {pr.cosine:12.9f} {pr.psnr_db:8.1f}{nf}{mark}")
    if report.first_divergence:
        pr = next(p for p in report.points if p.name == report.first_divergence)
        rule = ("every value equal (an integer point)" if pr.rtol is None else
                f"max_abs <= {pr.atol:g} + {pr.rtol:g} * max|a|, {pr.precision}")
        lines.append(f"\nfirst divergence: {report.first_divergence} (tolerance: {rule}; NaN / inf must sit at the "
                     f"same positions in a and b)")
        if pr.shape_a != pr.shape_b:
            lines.append(f"  shapes differ: a {pr.shape_a}, b {pr.shape_b}")
        elif pr.nonfinite_a or pr.nonfinite_b:
            lines.append(f"  non-finite values: a {pr.nonfinite_a} (first at {pr.first_nonfinite_a}), "
                         f"b {pr.nonfinite_b} (first at {pr.first_nonfinite_b}); "
                         f"{pr.nonfinite_mismatch} positions where a and b differ in them")
        for idx, va, vb in report.excerpt:
            lines.append(f"  at {idx}: a = {va:.9g}  b = {vb:.9g}  diff = {vb - va:.3e}")
    else:
        how = (f"rtol {report.rtol:g}" if report.rtol is not None else "each by its own precision's tolerance")
        lines.append(f"\nall {len(report.points)} common points agree ({how})")
    if report.require_all and report.missing:
        lines.append(f"--require-all: {len(report.missing)} points are missing on one side: FAIL")
    if report.only_in_a:
        lines.append(f"only in a ({len(report.only_in_a)}): " + ", ".join(report.only_in_a[:10]))
    if report.only_in_b:
        lines.append(f"only in b ({len(report.only_in_b)}): " + ", ".join(report.only_in_b[:10]))
    return "\n".join(lines)
