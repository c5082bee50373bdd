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

Local error (teacher forcing; compare(a, b, local=pipe), `mdref compare --local`). End to end, a point's error
is inherited from every layer before it. With `local`, mdref re-runs the pipeline with the candidate's recorded
value *forced* at every recorded point: what flows on from a point (mdref.trace.record's return value) is the
candidate's array, so each layer computes from the candidate's inputs, and mdref's output there is compared with
the candidate's own: the layer's local error. A wrong layer shows a large local error at its own point and small
local errors downstream, however large the error it passes on. What is forced: every point the candidate holds
under mdref's names (tokens, text embeddings, noise, every block, transformer sub-layer and ResNet output, x0);
values inside a point's layer that are not points (a norm's output, attention scores) are computed by mdref from
the forced inputs, so a point's local error covers everything between the points before it and itself. Per
point the report holds `local` (rel_to_max, max_abs, nmse, ok by the point's tolerance) beside the end-to-end
metrics, and `first_local_divergence` names the first point whose local error is over its tolerance.

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
    local: dict | None = None             # with compare(local=...): the layer's own error (module docstring)


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
    first_local_divergence: str | None = None         # with local=: the first point whose local error is over

    @property
    def missing(self):
        """Points one trace holds and the other lacks (after the points filter)."""
        return self.only_in_a + self.only_in_b

    @property
    def ok(self):
        return (self.first_divergence is None and self.first_local_divergence is None and bool(self.points)
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
    """A Trace, a {name: array} dict or a path -> (ordered {name: array}, {name: precision or EXACT}, manifest).
    Complex arrays are refused (traces hold real values: comparing them as floats would drop the imaginary part)."""
    if isinstance(x, Trace):
        arrays, manifest = x.arrays, x.meta
    elif isinstance(x, dict):
        arrays, manifest = x, {}
    else:
        arrays, manifest = load_trace(x)
    manifest = manifest or {}
    for name, v in arrays.items():
        kind = np.asarray(v).dtype.kind
        if kind not in "fiub":
            raise ValueError(f"trace {side}: point {name!r} holds {np.asarray(v).dtype} values; trace points are "
                             f"real floating-point or integer arrays")
    return arrays, point_precisions(arrays, manifest, EXACT), manifest


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


def compare(a, b, *, rtol=None, atol=None, points=None, excerpt=6, require_all=False, local=None):
    """Compare trace b against reference trace a (Trace, dict or trace-file path). Returns a CompareReport
    whose first_divergence names the first point, in a's execution order, that diverges (see the module
    docstring for the metrics, the per-point tolerance and NaN / inf). points filters names
    (mdref.trace.point_matcher); require_all makes points missing on either side a failure (report.ok False).
    local: a mdref.Pipeline to re-run under teacher forcing with b's values (the local error of each point)."""
    keep = point_matcher(points)
    arr_a, prec_a, meta_a = _as_trace(a, "a")
    arr_b, prec_b, meta_b = _as_trace(b, "b")
    rtol = None if rtol is None else _check_tol(rtol, "rtol")
    atol = None if atol is None else _check_tol(atol, "atol")
    forced = None if local is None else teacher_forced(local, arr_b, {**meta_a, **meta_b})
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
        if forced is not None and name in forced:
            pr.local = _local(np.asarray(forced[name], np.float64), xb, pr)
            if not pr.local["ok"] and report.first_local_divergence is None:
                report.first_local_divergence = name
        report.points.append(pr)
        if not pr.ok and report.first_divergence is None:
            report.first_divergence = name
            report.excerpt = ex
    return report


class TeacherForcing(Trace):
    """A trace that keeps what mdref computes at every point and passes the candidate's value on instead, so each
    layer computes from the candidate's inputs (see the module docstring)."""

    def __init__(self, candidate):
        super().__init__(None)
        self.candidate, self._next = candidate, None

    def add(self, name, x):
        name = self.unique(name)
        self.arrays[name] = np.array(x, copy=True)
        self._next = self.candidate.get(name)

    def passed_on(self, x):
        c, self._next = self._next, None
        if c is None or np.shape(c) != np.shape(x):
            return x
        return np.array(c, dtype=np.asarray(x).dtype)        # the candidate's value, in mdref's dtype


def teacher_forced(pipe, candidate, manifest):
    """{point: mdref's value computed from the candidate's forced inputs}: pipe re-run under TeacherForcing. The
    run's arguments come from the traces' manifests (prompt, seed, steps, guidance) and the candidate's own points
    (its tokens fix the batch, its noise the latent size); NaN / Inf are kept, not refused."""
    from .trace import recording

    prompt = manifest.get("prompt")
    ids = candidate.get("tokens")
    batch = np.shape(ids)[0] if ids is not None and np.ndim(ids) == 2 else 1
    prompts = prompt if isinstance(prompt, list) else [prompt if isinstance(prompt, str) else ""] * batch
    arguments = dict(seed=manifest.get("seed") or 0, steps=max(1, sum(1 for n in candidate
                                                                        if n.split("#")[0] == "sampler.x0")))
    noise = candidate.get("noise")
    if noise is not None and np.ndim(noise) == 4:
        f = pipe.decoder.upsampling_factor
        arguments.update(height=np.shape(noise)[2] * f, width=np.shape(noise)[3] * f)
    if manifest.get("guidance_scale") is not None:
        arguments.update(guidance_scale=manifest["guidance_scale"],
                         negative_prompt=manifest.get("negative_prompt"))
    t = TeacherForcing(candidate)
    with recording(t), np.errstate(all="ignore"):
        pipe.run(prompts, allow_nonfinite=True, **arguments)
    return t.arrays


def _local(mine, theirs, pr):
    """The local error of one point: mdref's value from the candidate's inputs against the candidate's."""
    if mine.shape != theirs.shape:
        return {"rel_to_max": None, "max_abs": None, "nmse": None, "ok": False}
    both = np.isfinite(mine) & np.isfinite(theirs)
    m, peak = _metrics(mine[both], theirs[both])
    tol = 0.0 if pr.rtol is None else pr.atol + (pr.rtol * peak if peak > 0 else 0.0)
    same = np.array_equal(np.isnan(mine), np.isnan(theirs)) and np.array_equal(mine[~both], theirs[~both],
                                                                                  equal_nan=True)
    return {"rel_to_max": m["rel_to_max"], "max_abs": m["max_abs"], "nmse": m["nmse"],
            "ok": bool(same and m["max_abs"] <= tol)}


def _num(x, spec):
    return format(x, spec) if x is not None else format("-", spec.split(".")[0].rstrip("efg") + "s")


def format_report(report, *, all_points=True):
    """Human-readable table of a CompareReport (nan / inf printed as such)."""
    show_nf = any(p.nonfinite_a or p.nonfinite_b for p in report.points)
    show_local = any(p.local is not None for p in report.points)
    head = (f"{'point':<64} {'shape':>18} {'max_abs':>10} {'rel/max':>10} {'tol':>8} {'nmse':>10} {'cosine':>12} "
            f"{'psnr':>8}" + (f" {'local':>10}" if show_local else "") + (f" {'nonfinite a/b':>15}" if show_nf else ""))
    lines = [head]
    for pr in report.points:
        first = pr.name == report.first_divergence
        if not (all_points or first or not pr.ok or pr.name == report.first_local_divergence):
            continue
        mark = "  <-- FIRST DIVERGENCE" if first else ("  x" if not pr.ok else "")
        if pr.shape_a != pr.shape_b:
            lines.append(f"{pr.name:<64} shape {pr.shape_a} vs {pr.shape_b}{mark}")
            continue
        nf = f" {f'{pr.nonfinite_a}/{pr.nonfinite_b}':>15}" if show_nf else ""
        tol = "exact" if pr.rtol is None else f"{pr.rtol:.0e}"
        loc = "" if not show_local else f" {_num(pr.local and pr.local['rel_to_max'], '10.3e')}"
        mark += "  <-- FIRST LOCAL DIVERGENCE" if pr.name == report.first_local_divergence else ""
        lines.append(f"{pr.name:<64} {str(pr.shape_a):>18} {pr.max_abs:10.3e} {pr.rel_to_max:10.3e} {tol:>8} "
                     f"{pr.nmse:10.3e} {pr.cosine:12.9f} {pr.psnr_db:8.1f}{loc}{nf}{mark}")
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
    if show_local:
        lines.append(f"first local divergence: {report.first_local_divergence or 'none'} (local: each layer run by mdref "
                     f"from the candidate's own inputs, against the candidate's output)")
    if report.require_all and report.missing:
        lines.append(f"--require-all: {len(report.missing)} points are missing on one side: FAIL")
    if report.only_in_a:
        lines.append(f"only in a ({len(report.only_in_a)}): " + ", ".join(report.only_in_a[:10]))
    if report.only_in_b:
        lines.append(f"only in b ({len(report.only_in_b)}): " + ", ".join(report.only_in_b[:10]))
    return "\n".join(lines)
