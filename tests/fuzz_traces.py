"""Seeded fuzzing of trace files: load_trace + compare + the `mdref compare` command on mutated traces.

Each case is one trace file: a valid trace (float16/32/64 and int64 points, 0-d and empty arrays, sometimes NaN and
inf values) whose manifest, metadata or bytes are mutated in one of many ways (see MUTATIONS). A case must end in
either a *clean error* (load_trace raises mdref.io.WeightsError or mdref.trace.TraceError, and
`mdref compare` exits 2 with one `mdref: error:` line) or a *clean report* (compare returns a report, the trace
agrees with itself, --json is strict JSON, exit 0 or 1). Anything else (another exception, a traceback, a report
that is not strict JSON, a trace that disagrees with itself) is counted under "other" and printed.

tests/test_compare_hardening.py runs a few hundred cases in CI. For a long run:

    python tests/fuzz_traces.py --long 10000 [--seed 0]

"Bytes" mutations flip or cut bytes anywhere in the file, so they also exercise read_safetensors' header checks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import struct
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

from mdref.cli import main
from mdref.comparison import compare, format_report
from mdref.trace import MANIFEST_KEY, TraceError, load_trace
from mdref.formats.safetensors import WeightsError

_CODES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
          np.dtype(np.int64): "I64"}


def raw_trace(arrays, metadata, *, header_extra=None):
    """Bytes of a safetensors file with these arrays and exactly this `__metadata__` value (any JSON value, or
    a ready-made string spliced in verbatim when it is bytes)."""
    header, chunks, off = {}, [], 0
    for k, v in arrays.items():
        b = np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")).tobytes()
        header[k] = {"dtype": _CODES[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        chunks.append(b)
        off += len(b)
    header.update(header_extra or {})
    blob = json.dumps(header).encode()
    if metadata is not None:
        meta = metadata if isinstance(metadata, bytes) else json.dumps(metadata).encode()
        blob = blob[:-1] + (b', "__metadata__": ' if header else b'"__metadata__": ') + meta + b"}"
    return struct.pack("<Q", len(blob)) + blob + b"".join(chunks)


def base_arrays(rng):
    """A small valid trace: int64 tokens, floats of three dtypes, a 0-d and an empty point; sometimes NaN/inf."""
    arrays = {"tokens": rng.integers(0, 49408, (1, 5)).astype(np.int64)}
    for i in range(int(rng.integers(1, 5))):
        dt = [np.float16, np.float32, np.float64][int(rng.integers(3))]
        shape = tuple(int(s) for s in rng.integers(1, 4, int(rng.integers(1, 4))))
        x = rng.standard_normal(shape).astype(dt)
        if rng.random() < 0.3:
            x.ravel()[int(rng.integers(x.size))] = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
        arrays[f"unet.down_blocks.{i}"] = x
    if rng.random() < 0.3:
        arrays["scalar"] = np.asarray(rng.standard_normal(), np.float32)
    if rng.random() < 0.3:
        arrays["empty"] = np.zeros((0, 3), np.float32)
    return arrays


def _random_json(rng, depth=0):
    k = int(rng.integers(8 if depth < 3 else 5))
    if k == 0:
        return None
    if k == 1:
        return bool(rng.integers(2))
    if k == 2:
        return int(rng.integers(-10**6, 10**6)) * (10 ** int(rng.integers(0, 30)))
    if k == 3:
        return float(rng.choice([0.5, -1e308, 1e308, 3.0]))
    if k == 4:
        return "".join(chr(int(c)) for c in rng.integers(32, 0x2000, int(rng.integers(0, 6))))
    if k in (5, 6):
        return [_random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    return {str(i): _random_json(rng, depth + 1) for i in range(int(rng.integers(0, 4)))}


def _manifest(arrays):
    return {"prompt": "p", "seed": 0, "points": list(arrays), "dtypes": {k: str(v.dtype) for k, v in arrays.items()}}


def mutate(rng, arrays):
    """(mutation name, file bytes)."""
    names = list(arrays)
    m = _manifest(arrays)
    kind = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
    if kind == "valid":
        meta = {MANIFEST_KEY: json.dumps(m)}
    elif kind == "no manifest":
        meta = {"other": "x"} if rng.random() < 0.5 else None
    elif kind == "manifest value":                # null, number, list, string ... as the whole manifest
        meta = {MANIFEST_KEY: json.dumps(_random_json(rng))}
    elif kind == "manifest not json":
        text = json.dumps(m)
        meta = {MANIFEST_KEY: text[:int(rng.integers(0, len(text)))] + ["", "}", "x", "\\", "\u00e9"][int(rng.integers(5))]}
    elif kind == "deep nesting":
        n = int(rng.integers(500, 200_000))
        meta = {MANIFEST_KEY: "[" * n + "]" * n if rng.random() < 0.5 else '{"a":' * n + "1" + "}" * n}
    elif kind == "points value":
        m["points"] = _random_json(rng)
        meta = {MANIFEST_KEY: json.dumps(m)}
    elif kind == "points element":
        pts = list(names)
        pts[int(rng.integers(len(pts)))] = _random_json(rng)
        m["points"] = pts
        meta = {MANIFEST_KEY: json.dumps(m)}
    elif kind == "points duplicate":
        m["points"] = names + [names[int(rng.integers(len(names)))]]
        meta = {MANIFEST_KEY: json.dumps(m)}
    elif kind == "points missing tensor":
        m["points"] = names + ["no.such.point"]
        meta = {MANIFEST_KEY: json.dumps(m)}
    elif kind == "points subset shuffled":
        pts = list(rng.permutation(names))[:int(rng.integers(0, len(names) + 1))]
        m["points"] = [str(p) for p in pts]
        meta = {MANIFEST_KEY: json.dumps(m)}
    elif kind == "dtypes value":
        m["dtypes"] = _random_json(rng) if rng.random() < 0.5 else {names[0]: _random_json(rng)}
        meta = {MANIFEST_KEY: json.dumps(m)}
    elif kind == "duplicate key":
        text = json.dumps(m)
        meta = {MANIFEST_KEY: text[:-1] + ', "points": ' + json.dumps(names) + "}"}
    elif kind == "metadata value not string":
        return kind, raw_trace(arrays, {MANIFEST_KEY: _random_json(rng)})
    elif kind == "metadata not object":
        return kind, raw_trace(arrays, _random_json(rng))
    elif kind == "nan constants in manifest":
        meta = {MANIFEST_KEY: json.dumps(m)[:-1] + ', "x": NaN, "y": -Infinity}'}
    elif kind == "bytes":
        data = bytearray(raw_trace(arrays, {MANIFEST_KEY: json.dumps(m)}))
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.2:
                del data[int(rng.integers(len(data))):]
                if not data:
                    break
            else:
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
        return kind, bytes(data)
    else:
        raise AssertionError(kind)
    return kind, raw_trace(arrays, meta)


MUTATIONS = ["valid", "no manifest", "manifest value", "manifest not json", "deep nesting", "points value",
             "points element", "points duplicate", "points missing tensor", "points subset shuffled", "dtypes value",
             "duplicate key", "metadata value not string", "metadata not object", "nan constants in manifest",
             "bytes"]


def _strict_json(text):
    def refuse(c):
        raise ValueError(f"non-strict JSON constant {c}")
    return json.loads(text, parse_constant=refuse)


def check_case(path, ref_path):
    """'clean error', 'clean report' or 'other: ...' for one trace file."""
    try:
        arrays, _ = load_trace(path)
    except (WeightsError, TraceError):
        outcome = "clean error"
    except Exception as e:                      # noqa: BLE001 - the point: anything else is a finding
        return f"other: load_trace {type(e).__name__}: {str(e)[:120]}", traceback.format_exc()
    else:
        try:
            if arrays:
                self_report = compare(arrays, arrays)
                if not self_report.ok:
                    return f"other: trace disagrees with itself at {self_report.first_divergence}", ""
            r = compare(ref_path, path)
            format_report(r)
            _strict_json(r.to_json())
        except Exception as e:                  # noqa: BLE001
            return f"other: compare {type(e).__name__}: {str(e)[:120]}", traceback.format_exc()
        outcome = "clean report"
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["compare", str(ref_path), str(path), "--json"])
    except Exception as e:                      # noqa: BLE001
        return f"other: cli {type(e).__name__}: {str(e)[:120]}", traceback.format_exc()
    if outcome == "clean error" and not (code == 2 and err.getvalue().count("mdref: error:") == 1
                                         and "\n" not in err.getvalue().rstrip("\n")):
        return f"other: cli exit {code} for an unreadable trace: {err.getvalue()[:200]!r}", ""
    if outcome == "clean report":
        if code == 2:                           # the only exit-2 path left: no points in common
            if "no points in common" not in err.getvalue():
                return f"other: cli exit 2: {err.getvalue()[:200]!r}", ""
        elif code in (0, 1):
            try:
                _strict_json(out.getvalue())
            except ValueError as e:
                return f"other: cli --json output is not strict JSON ({e})", ""
        else:
            return f"other: cli exit {code}", ""
    return outcome, ""


def run(n, seed=0, verbose=False):
    """Run n seeded cases; returns (Counter of outcomes, Counter of mutation kinds, list of 'other' details)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    outcomes, kinds, others = Counter(), Counter(), []
    with tempfile.TemporaryDirectory(prefix="mdref-fuzz-") as d:
        d = Path(d)
        ref_path = d / "ref.safetensors"
        ref_path.write_bytes(raw_trace(base_arrays(np.random.Generator(np.random.PCG64(seed + 1))), None))
        path = d / "case.safetensors"
        for i in range(n):
            arrays = base_arrays(rng) if rng.random() < 0.7 else load_trace(ref_path)[0]
            kind, data = mutate(rng, arrays)
            path.write_bytes(data)
            outcome, tb = check_case(path, ref_path)
            kinds[kind] += 1
            outcomes[outcome.split(":")[0]] += 1
            if outcome.startswith("other"):
                others.append((i, kind, outcome, tb))
                if verbose:
                    print(f"case {i} ({kind}): {outcome}\n{tb}", file=sys.stderr)
    return outcomes, kinds, others


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--long", type=int, default=1000, metavar="N", help="number of cases (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true", help="print each 'other' case with its traceback")
    a = ap.parse_args()
    outcomes, kinds, others = run(a.long, a.seed, a.verbose)
    print(f"cases {a.long} (seed {a.seed}): clean errors {outcomes['clean error']}, clean reports "
          f"{outcomes['clean report']}, other {outcomes['other']}")
    print("mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    for i, kind, outcome, _ in others[:20]:
        print(f"  case {i} ({kind}): {outcome}")
    sys.exit(1 if others else 0)
