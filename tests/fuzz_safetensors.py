"""Differential fuzzing of mdref.formats.safetensors.read_safetensors against the official safetensors parser.

Valid files are mutated (byte flips, header JSON edits of offsets, shapes, dtypes, metadata and fields,
duplicate keys, deep nesting, truncation, appended bytes, wrong header length). For every case mdref must
either raise WeightsError, or load exactly what the official parser (safetensors.deserialize, the Rust
reader) returns: the same keys, dtypes, shapes, bytes and metadata. Whatever mdref accepts, the official
parser must accept too. Anything else (another exception, a disagreement) is a finding.

The pytest module tests/test_safetensors_spec.py runs a few hundred seeded cases; for a long run:

    python tests/fuzz_safetensors.py --long 20000 [--seed 0]

prints the counts. The name does not start with test_, so pytest does not collect this file.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy
from safetensors import safe_open

from mdref.formats.safetensors import WeightsError, read_safetensors, write_safetensors

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "f32", "", "U64"]
ODD_NUMBERS = ["1.0", "8.5", "-0", "-1", "1e400", "1e2", "Infinity", "-Infinity", "NaN", "true", "false",
               "null", '"4"', "18446744073709551616", "18446744073709551615", "9223372036854775807",
               "4294967296", "[]", "{}", "0"]


def base_files(rng):
    """A handful of valid files: mixed float dtypes, BF16, empty and 0-d tensors, metadata; as bytes."""
    files = []
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "w.safetensors"
        write_safetensors(p, {"a.weight": rng.standard_normal((3, 4)).astype(np.float32),
                              "a.bias": rng.standard_normal(4).astype(np.float16),
                              "s": np.array(1.5, np.float64), "e": np.zeros((0, 3), np.float32)},
                          {"format": "np", "step": "3"})
        files.append(p.read_bytes())
        write_safetensors(p, {"tokens": rng.integers(0, 500, (1, 8)), "m": np.array([True, False, True]),
                              "x": rng.standard_normal(5).astype(np.float32)})
        files.append(p.read_bytes())
    safe = {"w": rng.standard_normal((2, 3)).astype(np.float32), "v": rng.standard_normal(7).astype(np.float64)}
    files.append(safetensors.numpy.save(safe, metadata={"k": "v"}))
    bits = rng.integers(0, 2**16, 6).astype("<u2").tobytes()
    files.append(_assemble({"b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
                            "h": {"dtype": "F16", "shape": [2], "data_offsets": [12, 16]}},
                           bits + rng.integers(0, 256, 4, dtype=np.uint8).tobytes()))
    return files


def _assemble(header, body, text=None, pad=True):
    blob = (text if text is not None else json.dumps(header, separators=(",", ":"))).encode("utf-8", "surrogatepass")
    if pad:
        blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + body


def _split(data):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _edit_header(rng, header, body):
    """One JSON-level edit; returns (header text, body)."""
    keys = [k for k in header if k != "__metadata__"]
    kind = rng.integers(0, 13)
    text = None
    if kind == 0 and keys:                                           # shift an offset
        k = keys[rng.integers(len(keys))]
        header[k]["data_offsets"][rng.integers(2)] += int(rng.choice([-8, -4, -2, -1, 1, 2, 4, 8]))
    elif kind == 1 and keys:                                         # an odd number in offsets or shape
        k = keys[rng.integers(len(keys))]
        field = "data_offsets" if rng.integers(2) or not header[k]["shape"] else "shape"
        i = rng.integers(len(header[k][field]))
        header[k][field][i] = "@@ODD@@"
        text = json.dumps(header, separators=(",", ":")).replace('"@@ODD@@"', str(rng.choice(ODD_NUMBERS)))
    elif kind == 2 and keys:                                         # reshape: add, drop or change a dimension
        k = keys[rng.integers(len(keys))]
        shape = header[k]["shape"]
        op = rng.integers(3)
        if op == 0:
            shape.insert(int(rng.integers(len(shape) + 1)), int(rng.choice([0, 1, 2, 3, 2**32, 2**63])))
        elif op == 1 and shape:
            shape.pop(int(rng.integers(len(shape))))
        elif shape:
            shape[rng.integers(len(shape))] = int(rng.integers(0, 9))
    elif kind == 3 and keys:                                         # another dtype
        header[keys[rng.integers(len(keys))]]["dtype"] = str(rng.choice(DTYPES))
    elif kind == 4:                                                  # metadata of another kind
        header["__metadata__"] = [None, [], {"x": 1}, {"x": {"y": "z"}}, {"x": None}, "s", {"k": "v"}, {},
                                  {"\u00e9": "\u2603"}][rng.integers(9)]
    elif kind == 5 and keys:                                         # an extra or missing field
        k = keys[rng.integers(len(keys))]
        if rng.integers(2):
            header[k]["extra"] = 1
        else:
            header[k].pop(["dtype", "shape", "data_offsets"][rng.integers(3)])
    elif kind == 6 and keys:                                         # a duplicate key, spelt in the text
        k = keys[rng.integers(len(keys))]
        t = json.dumps(header, separators=(",", ":"))
        text = t[:-1] + "," + json.dumps(k) + ":" + json.dumps(header[k]) + "}"
    elif kind == 7:                                                  # deep nesting somewhere
        depth = int(rng.choice([2, 3, 4, 50, 2000, 200_000]))
        t = json.dumps(header, separators=(",", ":"))
        text = t[:-1] + (',' if len(header) else '') + '"deep":' + "[" * depth + "]" * depth + "}"
    elif kind == 8 and keys:                                         # swap two tensors' offsets
        a, b = (keys[i] for i in rng.integers(len(keys), size=2))
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    elif kind == 9 and keys:                                         # remove a tensor (leaves a hole or a tail)
        header.pop(keys[rng.integers(len(keys))])
    elif kind == 10:                                                 # padding / whitespace variants
        t = json.dumps(header, separators=(",", ":"))
        text = [" " + t, t + "\n", t + "\0", t + "  x", "\ufeff" + t, t.replace(":", " : "), t[:-1]][rng.integers(7)]
    elif kind == 11 and keys:                                        # a key spelt with escapes
        k = keys[rng.integers(len(keys))]
        t = json.dumps(header, separators=(",", ":"))
        text = t.replace(json.dumps(k), ['"\\ud800"', '"\\u0061"', '"a\\u0000"', '"\\/"'][rng.integers(4)], 1)
    elif kind == 12 and keys:                                        # the tensor entry itself replaced
        header[keys[rng.integers(len(keys))]] = [None, 5, [], "F32", {}][rng.integers(5)]
    return (text if text is not None else json.dumps(header, separators=(",", ":"))), body


def mutate(rng, data):
    """1 to 3 random mutations of a valid file."""
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.integers(0, 8)
        if kind == 6 and len(data) >= 8:                             # byte flips in the data: still valid
            n = struct.unpack("<Q", data[:8])[0]
            if 8 + n < len(data):
                b = bytearray(data)
                b[int(rng.integers(8 + n, len(data)))] = int(rng.integers(256))
                data = bytes(b)
        elif kind == 7:                                              # benign: key order, spaces, metadata
            try:
                header, body = _split(data)
                items = list(header.items())
                order = rng.permutation(len(items))
                header = {items[i][0]: items[i][1] for i in order}
                if rng.integers(2):
                    header["__metadata__"] = {"note": "\u2603 fuzz", "n": str(int(rng.integers(99)))}
                text = json.dumps(header, indent=int(rng.integers(0, 3)) or None, ensure_ascii=bool(rng.integers(2)))
                data = _assemble(None, body, text=text + " " * int(rng.integers(0, 9)), pad=False)
            except Exception:
                continue
        elif kind == 0 and data:                                     # byte flips
            b = bytearray(data)
            for i in rng.integers(0, len(b), size=int(rng.integers(1, 4))):
                b[i] = int(rng.integers(256))
            data = bytes(b)
        elif kind == 1:                                              # truncation
            data = data[:int(rng.integers(0, len(data) + 1))]
        elif kind == 2:                                              # appended bytes
            data = data + rng.integers(0, 256, int(rng.choice([1, 2, 4, 8, 100])), dtype=np.uint8).tobytes()
        elif kind == 3:                                              # a wrong header length
            if len(data) >= 8:
                (n,) = struct.unpack("<Q", data[:8])
                n = int(rng.choice([n - 1, n + 1, n + 8, 0, 2**63, 100_000_001, len(data)]))
                data = struct.pack("<Q", n % 2**64) + data[8:]
        else:                                                        # JSON-level edits
            try:
                header, body = _split(data)
            except Exception:                                        # already broken: flip a byte instead
                continue
            if not isinstance(header, dict):
                continue
            try:
                text, body = _edit_header(rng, header, body)
            except (TypeError, KeyError, IndexError, AttributeError, ValueError):
                continue                                             # an earlier edit broke the entry's shape
            data = _assemble(None, body, text=text, pad=bool(rng.integers(2)))
    return data


def official(data, path):
    """The official parser's reading: ({key: (dtype, shape, bytes)}, metadata), or None if it refuses."""
    try:
        got = {k: (v["dtype"], tuple(v["shape"]), bytes(v["data"])) for k, v in safetensors.deserialize(data)}
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
    except Exception:                                                # SafetensorError, and anything it raises
        return None
    return got, meta


def _mdref_bytes(dtype, arr):
    if dtype == "BF16":
        return (np.asarray(arr, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def check(data, path, allow_int):
    """One case. Returns the outcome name; raises AssertionError on a disagreement."""
    path.write_bytes(data)
    theirs = official(data, path)
    try:
        tensors, meta = read_safetensors(path, allow_int=allow_int)
    except WeightsError as e:
        assert str(path) in str(e), f"the error does not name the file: {e}"
        return "error (official refuses too)" if theirs is None else "error (official accepts; mdref stricter)"
    assert theirs is not None, "mdref loaded a file the official parser refuses"
    got, their_meta = theirs
    assert set(tensors) == set(got), (sorted(tensors), sorted(got))
    assert meta == their_meta, (meta, their_meta)
    for k, arr in tensors.items():
        dtype, shape, raw = got[k]
        assert arr.shape == shape, (k, arr.shape, shape)
        assert _mdref_bytes(dtype, arr) == raw, k
    return "load (equal to official)"


def run(n, seed=0, progress=False):
    """n seeded cases; returns a Counter of outcomes. Disagreements are counted as 'FINDING: ...'."""
    rng = np.random.default_rng(seed)
    bases = base_files(rng)
    counts = Counter()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "case.safetensors"
        for i in range(n):
            data = mutate(rng, bases[rng.integers(len(bases))])
            allow_int = bool(rng.integers(2))
            try:
                counts[check(data, path, allow_int)] += 1
            except AssertionError as e:
                counts[f"FINDING: {e}"[:200]] += 1
            except Exception as e:                                   # not a WeightsError: a finding
                counts[f"FINDING: {type(e).__name__}: {e}"[:200]] += 1
            if progress and (i + 1) % 5000 == 0:
                print(f"  {i + 1} cases ...", file=sys.stderr)
    counts["cases"] = n
    return counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--long", type=int, default=20000, metavar="N", help="number of cases (default 20000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    counts = run(args.long, args.seed, progress=True)
    for k in sorted(counts, key=lambda k: (k.startswith("FINDING"), k)):
        print(f"{counts[k]:8d}  {k}")
    findings = sum(v for k, v in counts.items() if k.startswith("FINDING"))
    print(f"{findings} findings, {time.perf_counter() - t0:.1f} s")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
