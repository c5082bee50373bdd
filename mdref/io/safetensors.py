"""Weights I/O: safetensors only (never unpickle), strict key/shape validation, seeded initialisation.

A component describes its weights as a *schema*: an ordered dict ``{checkpoint key: shape}``. Loading reads
a safetensors file, checks it against the schema (missing, unexpected and mis-shaped keys are reported
together), casts to the compute dtype and nests the flat keys (``a.b.weight`` -> ``p["a"]["b"]["weight"]``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

__all__ = ["WeightsError", "read_safetensors", "write_safetensors", "check_schema", "nest", "flatten",
           "init_params", "load_params", "sha256_file", "refuse_pickle"]

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")

# safetensors dtype names -> numpy dtypes (BF16 has none: it is widened to float32 by hand).
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class WeightsError(ValueError):
    """A weights file or parameter tree does not match what the model expects."""


def refuse_pickle(path):
    """Raise for pickle-based checkpoint formats: mdref reads safetensors only."""
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        raise WeightsError(f"{path}: mdref reads safetensors only and never unpickles "
                           f"(convert the checkpoint to .safetensors first)")


def read_safetensors(path):
    """Read a .safetensors file into {key: numpy array}, plus its metadata dict.

    F32, F16, F64 and integer tensors are read as stored; BF16 (the top 16 bits of a float32) is widened to
    float32 exactly by shifting the bits. Returns (tensors, metadata)."""
    refuse_pickle(path)
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    data = path.read_bytes()
    if len(data) < 8:
        raise WeightsError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n:]
    tensors = {}
    for key, info in header.items():
        try:
            start, end = (int(o) for o in info["data_offsets"])
            shape = tuple(int(s) for s in info["shape"])
            dtype = str(info["dtype"])
        except (TypeError, KeyError, ValueError):
            raise WeightsError(f"{path}: tensor {key!r} has a malformed header entry {info!r}") from None
        if dtype != "BF16" and dtype not in _DTYPES:
            raise WeightsError(f"{path}: tensor {key!r} has dtype {dtype}, which mdref does not read "
                               f"(expected one of F64, F32, F16, BF16)")
        itemsize = 2 if dtype == "BF16" else np.dtype(_DTYPES[dtype]).itemsize
        # A truncated or corrupt file must fail here, by name, not in np.frombuffer / reshape.
        if (not 0 <= start <= end <= len(body) or min(shape, default=0) < 0
                or end - start != itemsize * int(np.prod(shape))):
            raise WeightsError(f"{path}: tensor {key!r} ({dtype} {list(shape)}) expects bytes "
                               f"[{start}, {end}) of a {len(body)}-byte data section: truncated or corrupt file")
        raw = body[start:end]
        if dtype == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))
        tensors[key] = arr.reshape(shape)
    return tensors, metadata


def write_safetensors(path, tensors, metadata=None):
    """Write {key: array} to .safetensors (atomically: a temporary file, then a rename).
    Arrays keep their dtype (float16/float32/float64/int)."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for key in sorted(tensors):
        arr = np.asarray(tensors[key])            # not ascontiguousarray: it makes 0-d arrays 1-d
        if arr.dtype not in names:
            raise WeightsError(f"write_safetensors: {key!r} has dtype {arr.dtype}, which cannot be stored")
        buf = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[key] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + len(buf)]}
        chunks.append(buf)
        offset += len(buf)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for c in chunks:
                f.write(c)
        os.replace(tmp, path)
    except BaseException:             # a full disk, say: leave no partial temporary file behind
        if tmp.is_file():
            tmp.unlink()
        raise


def check_schema(found, schema, where="weights"):
    """Compare {key: array} with {key: expected shape}; raise one WeightsError listing every problem."""
    missing = [k for k in schema if k not in found]
    unexpected = sorted(k for k in found if k not in schema)
    wrong = [(k, tuple(schema[k]), tuple(found[k].shape)) for k in schema
             if k in found and tuple(found[k].shape) != tuple(schema[k])]
    if not (missing or unexpected or wrong):
        return
    lines = [f"{where} do not match the model config:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20])
                     + (" ..." if len(unexpected) > 20 else ""))
    for k, exp, got in wrong[:20]:
        lines.append(f"  wrong shape for {k}: expected {exp}, found {got}")
    if len(wrong) > 20:
        lines.append(f"  ... and {len(wrong) - 20} more wrong shapes")
    raise WeightsError("\n".join(lines))


def nest(flat):
    """{"a.b.weight": x} -> {"a": {"b": {"weight": x}}}. Numeric path parts stay string keys ("0")."""
    tree = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten(tree, prefix=""):
    """Inverse of nest."""
    flat = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, name + "."))
        else:
            flat[name] = v
    return flat


def init_params(schema, seed, dtype=np.float32):
    """Seeded weights for a schema, so any config can run without a file.

    Draws come from numpy.random.Generator(PCG64(seed)) in float64, in schema order, then are cast:
    matrices and kernels ~ N(0, 1/fan_in); embeddings ~ N(0, 0.02^2); 1-D weights (norm scales) = 1;
    biases = 0. The same seed and schema always give the same bits."""
    rng = np.random.Generator(np.random.PCG64(seed))
    flat = {}
    for key, shape in schema.items():
        shape = tuple(shape)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "bias" or (leaf != "weight" and len(shape) == 1):
            arr = np.zeros(shape)
        elif len(shape) == 1:
            arr = np.ones(shape)
        elif key.endswith("embedding.weight"):          # token / position embedding tables
            arr = rng.standard_normal(shape) * 0.02
        else:
            fan_in = int(np.prod(shape[1:]))
            arr = rng.standard_normal(shape) / np.sqrt(fan_in)
        flat[key] = arr.astype(dtype)
    return nest(flat)


def load_params(paths, schema, dtype=np.float32, *, strip_prefixes=(), where=None):
    """Read one or more safetensors files, strip optional key prefixes, validate against the schema,
    cast to dtype and nest. Returns (params, metadata of the first file)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    flat, meta = {}, {}
    for i, p in enumerate(paths):
        t, m = read_safetensors(p)
        flat.update(t)
        if i == 0:
            meta = m
    for prefix in strip_prefixes:
        if flat and all(k.startswith(prefix) for k in flat):
            flat = {k[len(prefix):]: v for k, v in flat.items()}
    check_schema(flat, schema, where or ", ".join(str(p) for p in paths))
    return nest({k: flat[k].astype(dtype) for k in schema}), meta


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
