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

from .precision import rounded

__all__ = ["Trace", "TraceError", "PatternError", "point_matcher", "trace", "record", "record_on_request", "record_unbuilt", "recording",
           "active", "save_trace", "load_trace", "first_nonfinite"]

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


@contextmanager
def recording(t):
    """Make `t` (a Trace, or a subclass that keeps something else, such as mdref.explain.Recorder) the active
    trace inside the block; trace() is recording(Trace(points))."""
    token = _ACTIVE.set(t)
    try:
        yield t
    finally:
        _ACTIVE.reset(token)


def active():
    """The trace being recorded, or None."""
    return _ACTIVE.get()


def record(name, x):
    """Keep x under `name` if a trace is active and wants it; return x unchanged either way. Under an emulated
    low precision (mdref.precision) the kept copy is rounded to that dtype: the value a device would hold."""
    t = _ACTIVE.get()
    if t is not None and t.wants(name):
        t.add(name, rounded(x))
    return x


def record_on_request(name, compute):
    """Keep compute() under `name` if the active trace asked for this on-request point (trace(on_request=...)).
    compute is not called otherwise: the extra work costs one context-variable lookup when nobody asks."""
    t = _ACTIVE.get()
    if t is not None and t.requests(name):
        t.add(name, rounded(compute()))


def record_unbuilt(name, compute):
    """A point the fast path never builds (TAESD's upsampled image, fused into the next conv): keep compute() under
    `name` if a trace is active and wants it, as `record` would; compute is not called otherwise."""
    t = _ACTIVE.get()
    if t is not None and t.wants(name):
        t.add(name, rounded(compute()))


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
    token = _ACTIVE.set(t)
    try:
        run()
    except _Found:
        pass
    finally:
        _ACTIVE.reset(token)
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
    from .io.safetensors import write_safetensors

    arrays = t.arrays if isinstance(t, Trace) else dict(t)
    manifest = dict(getattr(t, "meta", {}) or {}, **(manifest or {}))
    manifest["points"] = list(arrays)
    manifest["dtypes"] = {k: str(np.asarray(v).dtype) for k, v in arrays.items()}
    text = json.dumps(manifest, default=str)
    tensors = {k: np.asarray(v) for k, v in arrays.items()}
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, metadata={MANIFEST_KEY: text}), what)


def _check_manifest(meta, tensors):
    """The manifest of a trace file's metadata, validated against its tensors (see load_trace)."""
    from .io.safetensors import no_duplicate_keys

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
    if "dtypes" in manifest:
        dtypes = manifest["dtypes"]
        if not isinstance(dtypes, dict):
            raise TraceError(f"expected manifest \"dtypes\" to be an object {{point: dtype name}}, found "
                             f"{_json_type(dtypes)}")
        for n, d in dtypes.items():
            if not isinstance(d, str):
                raise TraceError(f"expected manifest \"dtypes\" of {n!r} to be a dtype name, found {_json_type(d)}")
            if n not in tensors:
                raise TraceError(f"manifest \"dtypes\" names {n!r}, which is not a tensor in the file")
    return manifest


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
    from .io.safetensors import read_safetensors

    tensors, meta = read_safetensors(path, allow_int=True)     # traces keep integer token ids
    manifest = _check_manifest(meta, tensors)
    order = list(manifest.get("points", []))
    listed = set(order)
    order += [n for n in tensors if n not in listed]
    return {n: tensors[n] for n in order}, manifest
