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

__all__ = ["Trace", "trace", "record", "active"]

_ACTIVE = contextvars.ContextVar("mdref_trace", default=None)


class Trace:
    """An ordered record of named arrays. `points` filters what is kept: None keeps everything; a string is a
    glob (``unet.*attn2``) or, prefixed with ``re:``, a regular expression; a list keeps a name matching any."""

    def __init__(self, points=None):
        patterns = [points] if isinstance(points, str) else list(points or [])
        self._matchers = [re.compile(p[3:]).search if p.startswith("re:")
                          else re.compile(fnmatch.translate(p)).match for p in patterns]
        self.arrays = {}          # name -> array, in execution order
        self.meta = {}            # free-form facts about the run (prompt, seed, timestep, ...)

    def wants(self, name):
        return not self._matchers or any(m(name) for m in self._matchers)

    def add(self, name, x):
        if name in self.arrays:   # the same layer run again (a second sampling step): keep both
            n = 1
            while f"{name}#{n}" in self.arrays:
                n += 1
            name = f"{name}#{n}"
        self.arrays[name] = np.array(x, copy=True)

    def __getitem__(self, name):
        return self.arrays[name]

    def __contains__(self, name):
        return name in self.arrays

    def names(self):
        return list(self.arrays)


@contextmanager
def trace(points=None):
    """Record activations inside the block: ``with mdref.trace("unet.*") as t: pipe(...)``."""
    t = Trace(points)
    token = _ACTIVE.set(t)
    try:
        yield t
    finally:
        _ACTIVE.reset(token)


def active():
    """The trace being recorded, or None."""
    return _ACTIVE.get()


def record(name, x):
    """Keep x under `name` if a trace is active and wants it; return x unchanged either way."""
    t = _ACTIVE.get()
    if t is not None and t.wants(name):
        t.add(name, x)
    return x


# ---- trace files -------------------------------------------------------------------------------------
MANIFEST_KEY = "mdref_manifest"


def save_trace(path, t, manifest=None):
    """Write a trace as one safetensors file: one tensor per point (float arrays kept in their dtype), and
    in the metadata a JSON manifest whose "points" lists the names in execution order."""
    import json

    from .weights import write_safetensors

    arrays = t.arrays if isinstance(t, Trace) else dict(t)
    manifest = dict(getattr(t, "meta", {}) or {}, **(manifest or {}))
    manifest["points"] = list(arrays)
    manifest["dtypes"] = {k: str(np.asarray(v).dtype) for k, v in arrays.items()}
    write_safetensors(path, {k: np.asarray(v) for k, v in arrays.items()},
                      metadata={MANIFEST_KEY: json.dumps(manifest, default=str)})


def load_trace(path):
    """Read a trace file written by save_trace (or by any tool writing the same format).
    Returns (ordered {name: array}, manifest). Files without a manifest keep the file's key order."""
    import json

    from .weights import read_safetensors

    tensors, meta = read_safetensors(path, allow_int=True)     # traces keep integer token ids
    manifest = json.loads(meta[MANIFEST_KEY]) if MANIFEST_KEY in meta else {}
    order = [n for n in manifest.get("points", []) if n in tensors]
    order += [n for n in tensors if n not in order]
    return {n: tensors[n] for n in order}, manifest
