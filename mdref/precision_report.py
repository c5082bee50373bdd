"""`mdref precision`: a compute dtype against float64 ground truth, point by point, on the same tokens and noise.

Per traced point, in execution order (both runs record the same names; the low-precision run's copies are the
rounded values a device would hold, see mdref.trace.record):
  rel_err        max |x - ref| / max |ref|, over the positions finite in both (mdref.comparison's rel_to_max)
  nmse           sum (x - ref)^2 / sum ref^2, same positions
  max_abs        the largest finite |x| of the candidate
  headroom_log2  log2(largest finite value of the dtype / max_abs): how many doublings are left before overflow;
                 where the candidate holds a NaN / Inf, or a float32 value beyond the range (a sum an emulated
                 device keeps in float32, such as q k^T under most profiles), it is taken at
                 max(max_abs, ref_max_abs) and is negative when the value is beyond the dtype's range
  ref_max_abs    the largest |ref|
  nonfinite      NaN + Inf count in the candidate
first_nonfinite is the first point whose candidate holds a NaN or an Inf; first_beyond_range the first point whose
float64 value exceeds the dtype's largest finite value (where a device must overflow, whatever its kernels do).
With the on-request points <attention>.qk and <attention>.scores (q k^T before and after the 1/sqrt(d) scale, `mdref
precision --scores`), least_headroom names, for each of the two kinds, the point of least headroom: an unscaled
q k^T below 1 (headroom_log2 < 0) overflows on a device that rounds q k^T before scaling it (profile qk-first)
even when the scaled scores fit. Likewise <norm>.sum_sq, the sum of x^2 an RMSNorm divides by the width (Qwen's
text model, DreamLite's q / k norms and text projection): a device that accumulates it in float16 overflows where
its headroom is below 1, although the emulated RMSNorm (its statistics in float32) stays finite.
Integer points (token ids) are not rated. Non-finite values are reported, never refused.
"""

from __future__ import annotations

import json
import math

import numpy as np

from .comparison import _strict, compare
from .precision import finfo_max

__all__ = ["precision_report", "format_precision"]

# The on-request points whose least headroom the report names (`mdref precision --scores`), by name suffix.
KINDS = {"qk": "q k^T before the 1/sqrt(d) scale", "scores": "the scaled scores",
         "sum_sq": "an RMSNorm's sum of squares"}


def precision_report(reference, candidate, dtype, *, points=None):
    """reference, candidate: Traces (or {name: array}) of the float64 and the `dtype` run. Returns a dict:
    {dtype, dtype_max, first_nonfinite, first_beyond_range, points: [row, ...]} (module docstring)."""
    top = finfo_max(dtype)
    ref_arrays = reference.arrays if hasattr(reference, "arrays") else reference
    cand_arrays = candidate.arrays if hasattr(candidate, "arrays") else candidate
    floats = lambda arrays: {n: v for n, v in arrays.items() if np.asarray(v).dtype.kind == "f"}
    cmp = compare(floats(ref_arrays), floats(cand_arrays), rtol=np.inf, points=points)
    rows = []
    for pr in cmp.points:
        x = np.asarray(cand_arrays[pr.name], dtype=np.float64)
        ref = np.asarray(ref_arrays[pr.name], dtype=np.float64)
        finite = np.abs(x[np.isfinite(x)])
        big = float(finite.max()) if finite.size else 0.0
        ref_big = float(np.abs(ref[np.isfinite(ref)]).max()) if ref.size else 0.0
        held = max(big, ref_big) if pr.nonfinite_b or big > top else big      # what the device had to hold
        rows.append({
            "name": pr.name, "shape": list(pr.shape_b), "rel_err": pr.rel_to_max, "nmse": pr.nmse,
            "max_abs": big, "headroom_log2": math.log2(top / held) if held > 0 else math.inf,
            "ref_max_abs": ref_big, "nonfinite": int(pr.nonfinite_b),
        })
    least = {}
    for kind in KINDS:
        of_kind = [r for r in rows if r["name"].endswith(f".{kind}")]
        if of_kind:
            r = min(of_kind, key=lambda r: r["headroom_log2"])
            least[kind] = {"name": r["name"], "headroom_log2": r["headroom_log2"]}
    return {
        "dtype": dtype, "dtype_max": top,
        "first_nonfinite": next((r["name"] for r in rows if r["nonfinite"]), None),
        "first_beyond_range": next((r["name"] for r in rows if r["ref_max_abs"] > top), None),
        **({"least_headroom": least} if least else {}),
        "points": rows,
    }


def to_json(report):
    """Strict JSON (non-finite floats as "nan" / "inf" / "-inf")."""
    return json.dumps(_strict(report), indent=1, allow_nan=False)


def format_precision(report):
    """The report as a table, the first non-finite and first out-of-range points marked."""
    lines = [f"{'point':<60} {'shape':>18} {'rel err':>9} {'nmse':>9} {'max|x|':>9} {'headroom':>9} "
             f"{'nonfinite':>9}"]
    for r in report["points"]:
        mark = ""
        if r["name"] == report["first_nonfinite"]:
            mark += "  <-- FIRST NON-FINITE"
        if r["name"] == report["first_beyond_range"]:
            mark += "  <-- float64 value beyond the range"
        lines.append(f"{r['name']:<60} {str(tuple(r['shape'])):>18} {r['rel_err']:9.2e} {r['nmse']:9.2e} "
                     f"{r['max_abs']:9.3g} {'2^' + format(r['headroom_log2'], '.1f'):>9} {r['nonfinite']:9d}{mark}")
    first = report["first_nonfinite"]
    lines.append("")
    lines.append(f"first point holding NaN / Inf in {report['dtype']}: {first or 'none'}")
    lines.append(f"first point whose float64 value exceeds {report['dtype']}'s largest finite value "
                 f"({report['dtype_max']:.6g}): {report['first_beyond_range'] or 'none'}")
    for kind, what in KINDS.items():
        least = report.get("least_headroom", {}).get(kind)
        if least:
            beyond = "  (beyond the range: overflows where it is rounded)" if least["headroom_log2"] < 0 else ""
            lines.append(f"least headroom of {what}: 2^{least['headroom_log2']:.1f} at {least['name']}{beyond}")
    rated = [r for r in report["points"] if math.isfinite(r["rel_err"])]
    if rated:
        worst = max(rated, key=lambda r: r["rel_err"])
        lines.append(f"largest error relative to max|float64|: {worst['rel_err']:.3e} at {worst['name']}")
    return "\n".join(lines)
