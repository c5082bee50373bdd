"""Named activation recording. Components call ``record(name, x)`` at layer boundaries; it does nothing unless
a ``trace()`` context is active, so recording costs one context-variable lookup when off.

Names are the checkpoint key prefixes of the layer that produced the array, with the component as the first
part (``unet.down_blocks.1.attentions.0``, ``text_encoder.encoder.layers.3``, ``decoder.up_blocks.2``),
so they line up with the weights and with PyTorch module names.
"""

from __future__ import annotations

import contextvars
import fnmatch
import re
from contextlib import contextmanager

import numpy as np

from .ops import rounded, scoped

__all__ = ["Trace", "TraceError", "PatternError", "point_matcher", "trace", "record", "record_on_request",
           "record_unbuilt", "point", "recording", "active", "save_trace", "load_trace", "first_nonfinite",
           "PRECISIONS", "point_precisions"]

# Compute precisions a trace may declare, most precise first (manifest "precision" / "point_precision").
PRECISIONS = ("float64", "float32", "float16", "bfloat16")

_ACTIVE = contextvars.ContextVar("mdref_trace", default=None)


class PatternError(ValueError):
    """A point pattern is not a string, or a ``re:`` pattern is not a valid regular expression."""


class TraceError(ValueError):
    """A trace file's manifest does not have the documented form (see load_trace)."""


def point_matcher(points):
    """``points`` -> ``keep(name) -> bool``: the one point filter of trace(), Trace and compare().

    None or an empty list keeps every name; a string is a glob matched against the whole name (``unet.*attn2``)
    or, prefixed with ``re:``, a regular expression searched in the name; a list keeps a name matching any of its
    patterns. Raises PatternError naming the pattern for a non-string or an invalid regular expression."""
    try:
        patterns = [points] if isinstance(points, str) else list(points or [])
    except TypeError:
        raise PatternError(f"points {points!r}: expected a glob or re:REGEX string, or a list of them") from None
    matchers = []
    for p in patterns:
        if not isinstance(p, str):
            raise PatternError(f"point pattern {p!r}: expected a glob or re:REGEX string, found {type(p).__name__}")
        try:
            matchers.append(re.compile(p[3:]).search if p.startswith("re:") else re.compile(fnmatch.translate(p)).match)
        except (re.error, RecursionError, OverflowError) as e:
            raise PatternError(f"point pattern {p!r} is not a valid regular expression ({e})") from None
    if not matchers:
        return lambda name: True
    return lambda name: any(m(name) for m in matchers)


class Trace:
    """An ordered record of named arrays. `points` filters what is kept (see point_matcher): None keeps everything;
    a string is a glob (``unet.*attn2``) or, prefixed with ``re:``, a regular expression; a list keeps a name
    matching any. `on_request` (patterns as `points`) asks for the on-request points that no trace keeps unless it
    names them, because they cost extra work: the attention probabilities ``<block>.attn2.probs``."""

    def __init__(self, points=None, *, on_request=None):
        self.wants = point_matcher(points)
        self.requests = point_matcher(on_request) if on_request else (lambda name: False)
        self.arrays = {}          # name -> array, in execution order
        self.meta = {}            # free-form facts about the run (prompt, seed, timestep, ...)

    @classmethod
    def of(cls, arrays, meta=None):
        """A trace holding these arrays (in this order) and manifest facts, e.g. load_trace(path)'s."""
        t = cls()
        t.arrays, t.meta = dict(arrays), dict(meta or {})
        return t

    def unique(self, name):
        """The name a new array gets: `name`, or `name#n` if the same layer ran before (a second sampling step)."""
        if name in self.arrays:
            n = 1
            while f"{name}#{n}" in self.arrays:
                n += 1
            name = f"{name}#{n}"
        return name

    def add(self, name, x):
        self.arrays[self.unique(name)] = np.array(x, copy=True)

    def passed_on(self, x):
        """What flows on from the point just added: x itself (mdref.comparison.TeacherForcing passes another
        trace's value on instead)."""
        return x

    def __getitem__(self, name):
        return self.arrays[name]

    def __contains__(self, name):
        return name in self.arrays

    def names(self):
        return list(self.arrays)


@contextmanager
def trace(points=None, *, on_request=None):
    """Record activations inside the block: ``with mdref.trace("unet.*") as t: pipe(...)``; on-request points
    too when `on_request` names them: ``trace("unet.out", on_request="*.attn2.probs")`` (see Trace)."""
    with recording(Trace(points, on_request=on_request)) as t:
        yield t


def recording(t):
    """Make `t` (a Trace, or a subclass that keeps something else, such as mdref.explain.Recorder) the active
    trace inside the block; trace() is recording(Trace(points))."""
    return scoped(_ACTIVE, t)


def active():
    """The trace being recorded, or None."""
    return _ACTIVE.get()


def point(name, *parts):
    """A point's name: `name` (a str, or a parameter node of mdref.params, named by its path), then `parts`."""
    return ".".join((name if isinstance(name, str) else name.path,) + parts)


def record(name, x):
    """Keep x under `name` (a str, or the parameters of the layer that computed x: their path names the point) if a
    trace is active and wants it, and return what flows on from the point: x itself, or, under teacher forcing
    (mdref.comparison.TeacherForcing), a candidate trace's value. So every layer uses the value record returns.
    Under an emulated low precision (mdref.precision) the kept copy is rounded to that dtype: the value a device
    would hold."""
    t = _ACTIVE.get()
    if t is not None and t.wants(name := point(name)):
        t.add(name, rounded(x))
        return t.passed_on(x)
    return x


def record_on_request(name, compute, *, held=False):
    """Keep compute() under `name` (as record) if the active trace asked for this on-request point
    (trace(on_request=...)). compute is not called otherwise: the extra work costs one context-variable lookup when
    nobody asks. held=True: compute() returns the value as an emulated device holds it (rounded, or not, at its own
    rounding points, e.g. a float32 sum), kept as it is instead of rounded."""
    t = _ACTIVE.get()
    if t is not None and t.requests(name := point(name)):
        t.add(name, compute() if held else rounded(compute()))


def record_unbuilt(name, compute):
    """A point the fast path never builds (TAESD's upsampled image, fused into the next conv): keep compute() under
    `name` if a trace is active and wants it, as `record` would; compute is not called otherwise. Returns the value
    teacher forcing passes on in its place, or None when the fused path may go on (nothing forced)."""
    t = _ACTIVE.get()
    if t is None or not t.wants(name := point(name)):
        return None
    x = compute()
    t.add(name, rounded(x))
    passed = t.passed_on(x)
    return None if passed is x else passed


# ---- the first non-finite point ----------------------------------------------------------------------
def nonfinite_counts(x):
    """(NaN count, Inf count, size) of an array."""
    x = np.asarray(x)
    return int(np.isnan(x).sum()), int(np.isinf(x).sum()), int(x.size)


class _Found(Exception):
    pass


class _FirstNonFinite(Trace):
    """A trace that keeps no arrays: it notes the first point holding a NaN or an Inf and stops the run there."""

    def __init__(self):
        super().__init__()
        self.found = None                     # (point name, (NaN, Inf, size))

    def add(self, name, x):
        name = self.unique(name)
        self.arrays[name] = None              # the names only, so that repeated layers are numbered as in trace()
        a = np.asarray(x)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            self.found = (name, nonfinite_counts(a))
            raise _Found


def first_nonfinite(run):
    """Call ``run()`` with every point recorded, and return (name, (NaN, Inf, size)) of the first recorded point
    holding a NaN or an Inf (the run stops there), or None if none does. Names are those trace() gives."""
    t = _FirstNonFinite()
    try:
        with scoped(_ACTIVE, t):
            run()
    except _Found:
        pass
    return t.found


# ---- trace files -------------------------------------------------------------------------------------
MANIFEST_KEY = "mdref_manifest"


def save_trace(path, t, manifest=None, *, what="trace file"):
    """Write a trace as one safetensors file: one tensor per point (float arrays kept in their dtype), and
    in the metadata a JSON manifest whose "points" lists the names in execution order. The file is written
    through mdref.outputs.atomic_write: the path is checked first (OutputError for a folder, device, link, missing
    folder, ...), and a failed write leaves nothing behind; `what` names the path in those errors."""
    import json

    from .outputs import atomic_write
    from .formats.safetensors import write_safetensors

    arrays = t.arrays if isinstance(t, Trace) else dict(t)
    for name, v in arrays.items():                 # what load_trace would refuse is refused before writing
        if not isinstance(name, str) or not name:
            raise TraceError(f"save_trace: point names must be non-empty strings, found {_short(name)}")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise TraceError(f"save_trace: point name {name!r} is not valid Unicode text") from None
        if np.asarray(v).dtype.kind not in "fiub":
            raise TraceError(f"save_trace: point {name!r} holds {np.asarray(v).dtype} values; a trace stores real "
                             f"floating-point or integer arrays")
    manifest = dict(getattr(t, "meta", {}) or {}, **(manifest or {}))
    manifest["points"] = list(arrays)
    manifest["dtypes"] = {k: np.asarray(v).dtype.name for k, v in arrays.items()}
    text = json.dumps(manifest, default=str)
    tensors = {k: np.asarray(v) for k, v in arrays.items()}
    _check_manifest({MANIFEST_KEY: text}, tensors, manifest["dtypes"])
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, metadata={MANIFEST_KEY: text}), what)


def _check_manifest(meta, tensors, stored=None):
    """The manifest of a trace file's metadata, validated against its tensors and (stored) the dtypes the file
    stores them in (see load_trace)."""
    from .formats.safetensors import no_duplicate_keys

    import json

    if not isinstance(meta, dict):
        raise TraceError(f"expected the safetensors metadata to be a JSON object, found {type(meta).__name__}")
    if MANIFEST_KEY not in meta:
        return {}
    text = meta[MANIFEST_KEY]
    if not isinstance(text, str):
        raise TraceError(f"expected metadata {MANIFEST_KEY!r} to be a JSON string, found {type(text).__name__}")
    try:
        manifest = json.loads(text, object_pairs_hook=no_duplicate_keys(
            lambda k: TraceError(f"the manifest has the key {k!r} twice")))
    except (ValueError, RecursionError) as e:
        if isinstance(e, TraceError):
            raise
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise TraceError(f"metadata {MANIFEST_KEY!r} is not valid JSON ({why})") from None
    if not isinstance(manifest, dict):
        raise TraceError(f"expected the manifest to be a JSON object, found {_json_type(manifest)}")
    points = manifest.get("points")
    if "points" in manifest:
        if not isinstance(points, list):
            raise TraceError(f"expected manifest \"points\" to be a list of point names, found {_json_type(points)}")
        seen = set()
        for n in points:
            if not isinstance(n, str):
                raise TraceError(f"expected manifest \"points\" to hold point names (strings), found {_json_type(n)} "
                                 f"{_short(n)}")
            if n in seen:
                raise TraceError(f"manifest \"points\" lists {n!r} twice")
            if n not in tensors:
                raise TraceError(f"manifest \"points\" names {n!r}, which is not a tensor in the file")
            seen.add(n)
    for n, d in _point_map(manifest, "dtypes", "dtype name", tensors).items():
        if not isinstance(d, str):
            raise TraceError(f"expected manifest \"dtypes\" of {n!r} to be a dtype name, found {_json_type(d)}")
        if stored is not None and d != stored[n]:
            raise TraceError(f"manifest \"dtypes\" says point {n!r} is {d}, but the file stores it as {stored[n]}")
    if "precision" in manifest:
        precision_name(manifest["precision"], "manifest \"precision\"")
    for n, d in _point_map(manifest, "point_precision", "precision", tensors).items():
        if precision_name(d, f"manifest \"point_precision\" of {n!r}") is None:
            raise TraceError(f"manifest \"point_precision\" of {n!r} must name a precision, found null")
    return manifest


def _point_map(manifest, key, what, tensors):
    """manifest[key] as an object {point: value} whose points are tensors of the file ({} when absent)."""
    per_point = manifest.get(key, {})
    if not isinstance(per_point, dict):
        raise TraceError(f"expected manifest \"{key}\" to be an object {{point: {what}}}, found {_json_type(per_point)}")
    for n in per_point:
        if n not in tensors:
            raise TraceError(f"manifest \"{key}\" names {n!r}, which is not a tensor in the file")
    return per_point


def precision_name(value, what="precision"):
    """A declared compute precision: one of PRECISIONS, or None (undeclared). Traces written by mdref before
    precisions were declared hold a description such as "float16, upcast attention": its first word counts."""
    if value is None:
        return None
    if isinstance(value, str) and value.split(",")[0].strip() in PRECISIONS:
        return value.split(",")[0].strip()
    raise TraceError(f"{what} must be one of {', '.join(PRECISIONS)} (or null), found {_short(value)}")


def point_precisions(arrays, manifest, exact="exact"):
    """{point: the precision it was computed in}: `exact` for integer arrays (token ids, masks), else the
    manifest's "point_precision" entry, else the trace's "precision", else the dtype the tensor is stored in
    ("dtypes" entries name bfloat16, which numpy widens to float32)."""
    manifest = manifest or {}
    trace_level = precision_name(manifest.get("precision"), "manifest \"precision\"")
    per_point, stored = manifest.get("point_precision") or {}, manifest.get("dtypes") or {}
    out = {}
    for name, v in arrays.items():
        if np.asarray(v).dtype.kind in "iub":
            out[name] = exact
        elif name in per_point:
            out[name] = precision_name(per_point[name], f"point_precision of {name!r}")
        elif trace_level is not None:
            out[name] = trace_level
        else:
            d = stored.get(name, str(np.asarray(v).dtype))
            out[name] = d if d in PRECISIONS else "float32"
    return out


def _json_type(x):
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(x), type(x).__name__)


def _short(x, n=40):
    r = repr(x)
    return r if len(r) <= n else r[:n] + "..."


def load_trace(path):
    """Read a trace file written by save_trace (or by any tool writing the same format).
    Returns (ordered {name: array}, manifest).

    The manifest is optional; if present (metadata key ``mdref_manifest``) it must be a JSON object; its
    ``"points"``, if present, a list of distinct names of tensors in the file, giving their execution order
    (tensors it does not list follow in file order; a file without "points" keeps the file's key order); its
    ``"dtypes"``, if present, an object {tensor name: dtype name}. Anything else raises TraceError saying what was
    expected; an unreadable safetensors file raises mdref.io.WeightsError."""
    from .formats.safetensors import read_safetensors

    tensors, meta, stored = read_safetensors(path, allow_int=True, stored_dtypes=True)   # traces keep integer ids
    manifest = _check_manifest(meta, tensors, stored)
    order = list(manifest.get("points", []))
    listed = set(order)
    order += [n for n in tensors if n not in listed]
    return {n: tensors[n] for n in order}, manifest
