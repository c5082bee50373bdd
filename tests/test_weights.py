"""Tests for mdref.formats.safetensors: safetensors reading (F32, F16, BF16, F64), writing, schema validation, refusal of
pickle formats, corrupt files, seeded initialisation, loading, and nest/flatten.

Expected values never come from mdref itself: files are written by the `safetensors` library, by torch, or
byte by byte from the format's specification (8-byte little-endian header length, JSON header, raw data);
BF16 bit patterns are decoded with math.ldexp from their sign, exponent and mantissa fields.
"""

import hashlib
import json
import math
import os
import pathlib
import pickle
import struct

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors import safe_open

from mdref.formats import safetensors as weights
from mdref.formats.safetensors import WeightsError

FLOATS = [np.float16, np.float32, np.float64]


def write_raw(path, entries, metadata=None):
    """A safetensors file written from the specification: entries = [(key, dtype name, shape, raw bytes)]."""
    header, body = {}, b""
    for key, dtype, shape, raw in entries:
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)                                 # the format pads the header to 8 bytes
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(blob)) + blob + body)
    return path


def decode_bf16(bits):
    """bfloat16 = 1 sign bit, 8 exponent bits (bias 127), 7 mantissa bits; decoded field by field."""
    sign = -1.0 if bits >> 15 else 1.0
    exponent, mantissa = (bits >> 7) & 0xFF, bits & 0x7F
    if exponent == 0xFF:
        return sign * math.inf if mantissa == 0 else math.nan
    if exponent == 0:                                               # zero and subnormals: m * 2^-133
        return sign * math.ldexp(mantissa, -133)
    return sign * math.ldexp(128 + mantissa, exponent - 127 - 7)


def same_floats(a, b):
    """Equal values, equal signs of zero, NaN where NaN."""
    with np.errstate(invalid="ignore"):                              # signalling NaNs become quiet NaNs
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    nan = np.isnan(a)
    return (a.shape == b.shape and np.array_equal(nan, np.isnan(b))
            and np.array_equal(a[~nan], b[~nan]) and np.array_equal(np.signbit(a[~nan]), np.signbit(b[~nan])))


# ---- reading -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS + [np.int64, np.int32, np.uint8])
def test_read_file_written_by_safetensors_library(tmp_path, dtype):
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        src = {"a.weight": rng.standard_normal((3, 5)).astype(dtype), "a.bias": rng.standard_normal(5).astype(dtype),
               "scalar": np.array(2.5, dtype), "empty": np.zeros((0, 4), dtype)}
    else:
        src = {"ids": rng.integers(0, 200, (2, 7)).astype(dtype)}
    safetensors.numpy.save_file(src, tmp_path / "m.safetensors", metadata={"format": "np"})
    integer = np.dtype(dtype).kind != "f"
    if integer:                                                     # model weights refuse integer tensors
        with pytest.raises(WeightsError, match=r"'ids' has dtype [IU]\d+, which mdref does not read"):
            weights.read_safetensors(tmp_path / "m.safetensors")
    got, meta = weights.read_safetensors(tmp_path / "m.safetensors", allow_int=integer)   # trace files read them
    assert meta == {"format": "np"} and set(got) == set(src)
    for k, v in src.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v), k


def test_read_every_float16_bit_pattern(tmp_path):
    src = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    safetensors.numpy.save_file({"all": src}, tmp_path / "f16.safetensors")
    got, _ = weights.read_safetensors(tmp_path / "f16.safetensors")
    assert got["all"].dtype == np.float16 and np.array_equal(got["all"].view(np.uint16), src.view(np.uint16))


def test_read_every_bf16_bit_pattern_written_by_hand(tmp_path):
    """All 65536 BF16 patterns, decoded field by field, incl. +-0, subnormals, +-inf and NaNs; widened to float32."""
    bits = np.arange(2**16, dtype=np.uint16)
    path = write_raw(tmp_path / "bf16.safetensors", [("all", "BF16", (256, 256), bits.astype("<u2").tobytes())],
                     metadata={"source": "by hand"})
    got, meta = weights.read_safetensors(path)
    expected = np.array([decode_bf16(int(b)) for b in bits]).reshape(256, 256)
    assert meta == {"source": "by hand"}
    assert got["all"].dtype == np.float32 and same_floats(got["all"], expected)


def test_read_bf16_of_float32_source_values_by_hand(tmp_path):
    """bf16 bits are the top 16 bits of a float32: for float32 values whose low 16 bits are zero the file holds
    them exactly, and reading gives the source back bit for bit. Mixed with F16 and F32 tensors in one file."""
    rng = np.random.default_rng(1)
    src = rng.standard_normal((4, 6)).astype(np.float32)
    src = (src.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)   # exactly representable in bf16
    src[0, :4] = [0.0, -0.0, np.inf, -np.inf]
    top = (src.view(np.uint32) >> 16).astype("<u2")
    f16 = rng.standard_normal(3).astype(np.float16)
    f32 = rng.standard_normal((2, 2)).astype(np.float32)
    path = write_raw(tmp_path / "mixed.safetensors", [("h", "F16", (3,), f16.astype("<f2").tobytes()),
                                                      ("b", "BF16", src.shape, top.tobytes()),
                                                      ("f", "F32", f32.shape, f32.astype("<f4").tobytes())])
    got, meta = weights.read_safetensors(path)
    assert meta == {}
    assert got["b"].dtype == np.float32 and same_floats(got["b"], src)
    assert got["h"].dtype == np.float16 and np.array_equal(got["h"], f16)
    assert got["f"].dtype == np.float32 and np.array_equal(got["f"], f32)


def test_read_bf16_written_by_torch(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    src = {"w": torch.randn(5, 7, generator=g).to(torch.bfloat16) * 1000,
           "v": torch.tensor([0.0, -0.0, 1e-40, -3.0e38, float("inf"), 1 / 3]).to(torch.bfloat16)}
    safetensors_torch.save_file(src, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    got, meta = weights.read_safetensors(tmp_path / "t.safetensors")
    assert meta == {"format": "pt"}
    for k, t in src.items():
        assert got[k].dtype == np.float32 and same_floats(got[k], t.float().numpy()), k  # widening is exact


def test_hand_written_bf16_file_agrees_with_torch_reader(tmp_path):
    """Cross-check of this file's own hand writer: torch's safetensors reader sees the same values."""
    pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    bits = np.random.default_rng(2).integers(0, 2**16, 500).astype("<u2")
    path = write_raw(tmp_path / "x.safetensors", [("x", "BF16", (500,), bits.tobytes())])
    ours = weights.read_safetensors(path)[0]["x"]
    theirs = safetensors_torch.load_file(str(path))["x"].float().numpy()
    assert same_floats(ours, theirs)


# ---- writing -----------------------------------------------------------------------------------------
keys = st.text(min_size=1, max_size=10).filter(lambda k: k != "__metadata__")


@pytest.mark.parametrize("dtype", FLOATS, ids=["f16", "f32", "f64"])
@settings(max_examples=25)
@given(data=st.data())
def test_write_read_round_trip(tmp_path_factory, dtype, data):
    """Any keys, any shapes (0-d and zero-size included), any values (NaN payloads, infinities): bit-identical
    after write_safetensors + read_safetensors, and readable by the safetensors library too."""
    arrays = hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    tensors = data.draw(st.dictionaries(keys, arrays, max_size=4))
    if tensors and data.draw(st.booleans()):                        # a non-contiguous view
        k = next(iter(tensors))
        tensors[k] = tensors[k].T
    metadata = data.draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    path = tmp_path_factory.mktemp("rt") / "w.safetensors"
    weights.write_safetensors(path, tensors, metadata)
    got, meta = weights.read_safetensors(path)
    assert meta == metadata and set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes(), k
    lib = safetensors.numpy.load_file(str(path))
    for k, v in tensors.items():
        if v.ndim:                                                  # (the numpy reader returns 0-d tensors as 1-d)
            assert lib[k].shape == v.shape and lib[k].tobytes() == v.tobytes(), k
    assert (safe_open(str(path), "np").metadata() or {}) == metadata
    assert os.listdir(path.parent) == ["w.safetensors"]             # the temporary file was renamed away


def test_metadata_round_trip_stringifies_values(tmp_path):
    weights.write_safetensors(tmp_path / "m.safetensors", {"x": np.zeros(2, np.float32)},
                              {"format": "pt", "step": 3, "lr": 0.5})
    assert weights.read_safetensors(tmp_path / "m.safetensors")[1] == {"format": "pt", "step": "3", "lr": "0.5"}


def test_write_refuses_dtypes_safetensors_cannot_hold(tmp_path):
    with pytest.raises(WeightsError, match=r"'z'.*complex"):
        weights.write_safetensors(tmp_path / "c.safetensors", {"z": np.zeros(2, np.complex64)})


# ---- schema validation -------------------------------------------------------------------------------
SCHEMA = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "norm.weight": (4,), "norm.bias": (4,),
          "proj.weight": (2, 4)}


def test_check_schema_accepts_a_match():
    weights.check_schema({k: np.zeros(s) for k, s in SCHEMA.items()}, SCHEMA)


def test_check_schema_reports_missing_unexpected_and_wrong_shape_together():
    found = {k: np.zeros(s) for k, s in SCHEMA.items() if k not in ("norm.bias", "conv.bias")}
    found["proj.weight"] = np.zeros((4, 2))
    found["conv.weight"] = np.zeros((4, 3, 1, 1))
    found["extra.weight"] = np.zeros(7)
    with pytest.raises(WeightsError) as e:
        weights.check_schema(found, SCHEMA, where="unet.safetensors")
    msg = str(e.value)
    for needle in ["unet.safetensors", "missing", "norm.bias", "conv.bias", "unexpected", "extra.weight",
                   "wrong shape for proj.weight: expected (2, 4), found (4, 2)",
                   "wrong shape for conv.weight: expected (4, 3, 3, 3), found (4, 3, 1, 1)"]:
        assert needle in msg, f"{needle!r} not in:\n{msg}"


def test_check_schema_lists_many_problems_without_flooding():
    schema = {f"k{i}": (1,) for i in range(50)}
    with pytest.raises(WeightsError, match=r"missing keys \(50\).*\.\.\.") as e:
        weights.check_schema({}, schema)
    assert len(str(e.value)) < 1000


# ---- refusal of pickle formats -----------------------------------------------------------------------
class _Trap:
    """Unpickling this creates a directory: proof that something was unpickled."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth", ".PT", ".Bin"])
def test_pickle_formats_are_refused_unread(tmp_path, monkeypatch, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(_Trap(str(marker))))

    def no_reading(*args, **kwargs):
        raise AssertionError("the file was opened")
    monkeypatch.setattr(pathlib.Path, "read_bytes", no_reading)
    monkeypatch.setattr(pickle, "load", no_reading)
    monkeypatch.setattr(pickle, "loads", no_reading)
    for call in (lambda: weights.read_safetensors(path), lambda: weights.read_safetensors(str(path)),
                 lambda: weights.refuse_pickle(path)):
        with pytest.raises(WeightsError, match="safetensors only"):
            call()
    assert not marker.exists()


def test_refusal_comes_before_existence_check(tmp_path):
    with pytest.raises(WeightsError, match="safetensors only"):
        weights.read_safetensors(tmp_path / "missing.ckpt")
    with pytest.raises(WeightsError, match="no such weights file"):
        weights.read_safetensors(tmp_path / "missing.safetensors")


# ---- corrupt files -----------------------------------------------------------------------------------
def _valid_file(tmp_path):
    rng = np.random.default_rng(3)
    safetensors.numpy.save_file({"a": rng.standard_normal((3, 4)).astype(np.float32),
                                 "b": rng.standard_normal(5).astype(np.float16)}, tmp_path / "ok.safetensors")
    return (tmp_path / "ok.safetensors").read_bytes()


def _header(d):
    blob = json.dumps(d).encode()
    return struct.pack("<Q", len(blob)) + blob


CORRUPT = {
    "empty": b"",
    "shorter than the length field": b"\x01\x02\x03",
    "garbage": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    "header length past the end": struct.pack("<Q", 10**6) + b'{"a": 1}',
    "header not JSON": struct.pack("<Q", 4) + b"\xff\xfe\x00\x01",
    "header not an object": _header([1, 2, 3]),
    "entry not an object": _header({"a": 5}),
    "entry without offsets": _header({"a": {"dtype": "F32", "shape": [1]}}),
    "offsets past the end": _header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}) + b"\0" * 4,
    "offsets disagree with shape": _header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}) + b"\0" * 8,
    "negative shape": _header({"a": {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]}}) + b"\0" * 8,
    "odd byte count for BF16": _header({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 3]}}) + b"\0" * 3,
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt_file_raises_weights_error(tmp_path, name):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(CORRUPT[name])
    with pytest.raises(WeightsError, match="bad.safetensors"):
        weights.read_safetensors(path)


def test_unsupported_dtype_is_named(tmp_path):
    path = tmp_path / "f8.safetensors"
    path.write_bytes(_header({"q": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}) + b"\0\0")
    with pytest.raises(WeightsError, match=r"'q'.*F8_E4M3"):
        weights.read_safetensors(path)


@settings(max_examples=40)
@given(cut=st.integers(0, 10**6))
def test_every_truncation_raises_weights_error(tmp_path_factory, cut):
    folder = tmp_path_factory.mktemp("cut")
    data = _valid_file(folder)
    path = folder / "cut.safetensors"
    path.write_bytes(data[: cut % len(data)])                      # strictly shorter than the valid file
    with pytest.raises(WeightsError):
        weights.read_safetensors(path)


@settings(max_examples=40)
@given(blob=st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_weights_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("junk") / "junk.safetensors"
    path.write_bytes(blob)
    try:
        tensors, meta = weights.read_safetensors(path)
    except WeightsError:
        return
    assert isinstance(tensors, dict)                                # the rare valid file: fine


def test_truncated_file_fails_with_weights_error(tmp_path):
    data = _valid_file(tmp_path)
    (tmp_path / "t.safetensors").write_bytes(data[:-3])
    with pytest.raises(WeightsError, match="truncated"):
        weights.read_safetensors(tmp_path / "t.safetensors")


# ---- seeded initialisation ---------------------------------------------------------------------------
INIT_SCHEMA = {"token_embedding.weight": (1000, 16), "lin.weight": (64, 256), "lin.bias": (64,),
               "conv.weight": (32, 8, 3, 3), "conv.bias": (32,), "norm.weight": (300,), "norm.bias": (300,)}


def _bits(tree):
    return {k: v.tobytes() for k, v in weights.flatten(tree).items()}


@pytest.mark.parametrize("dtype", FLOATS, ids=["f16", "f32", "f64"])
def test_init_params_is_deterministic_per_seed(dtype):
    a, b = weights.init_params(INIT_SCHEMA, seed=7, dtype=dtype), weights.init_params(INIT_SCHEMA, seed=7, dtype=dtype)
    c = weights.init_params(INIT_SCHEMA, seed=8, dtype=dtype)
    assert _bits(a) == _bits(b)
    for k in ("token_embedding.weight", "lin.weight", "conv.weight"):
        assert _bits(a)[k] != _bits(c)[k], k
    for k, v in weights.flatten(a).items():
        assert v.dtype == dtype and v.shape == INIT_SCHEMA[k], k


def test_init_params_draws_float32_per_key_independent_of_order_dtype_and_threads():
    """Other dtypes are the float32 draw cast; a tensor depends only on (seed, key, shape), not on the schema's
    order, the other keys or the thread count."""
    f32 = weights.flatten(weights.init_params(INIT_SCHEMA, seed=3, dtype=np.float32))
    f64 = weights.flatten(weights.init_params(INIT_SCHEMA, seed=3, dtype=np.float64))
    assert all(np.array_equal(f64[k], f32[k].astype(np.float64)) for k in INIT_SCHEMA)
    shuffled = dict(reversed(list({**INIT_SCHEMA, "late.weight": (5, 5)}.items())))
    for threads in (1, 3):
        other = weights.flatten(weights.init_params(shuffled, seed=3, threads=threads))
        assert all(np.array_equal(other[k], f32[k]) for k in INIT_SCHEMA)


def test_init_params_first_tensor_is_the_documented_draw():
    """Rebuilt here from the docstring: PCG64(SeedSequence([seed, sha256(key)[:16] little-endian])), float32
    uniform in [0, 1), mapped to U(-a, a) with a = 0.02 sqrt(3) for an embedding."""
    got = weights.flatten(weights.init_params(INIT_SCHEMA, seed=3))["token_embedding.weight"]
    h = int.from_bytes(hashlib.sha256(b"token_embedding.weight").digest()[:16], "little")
    u = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, h]))).random((1000, 16), dtype=np.float32)
    a = np.float32(0.02 * math.sqrt(3))
    np.testing.assert_array_equal(got, u * (2 * a) - a)
    assert got.dtype == np.float32


def test_init_params_distribution_rules():
    """Documented: matrices and kernels ~ U(-a, a) with variance 1/fan_in; embeddings std 0.02; 1-D weights = 1;
    biases = 0. Bounds are exact; sample mean and std are checked to 6 standard errors (for a uniform, the std
    of the sample std is about std * sqrt(0.8 / (4 n)) = std / sqrt(5 n); sqrt(2 n) is used, looser)."""
    p = weights.flatten(weights.init_params(INIT_SCHEMA, seed=0, dtype=np.float64))
    for key, std in [("token_embedding.weight", 0.02), ("lin.weight", 1 / math.sqrt(256)),
                     ("conv.weight", 1 / math.sqrt(8 * 9))]:
        x = p[key].ravel()
        assert np.abs(x).max() <= std * math.sqrt(3) * (1 + 1e-6), key
        assert np.abs(x).max() > 0.99 * std * math.sqrt(3), key          # the whole interval is used
        assert abs(x.mean()) < 6 * std / math.sqrt(x.size), key
        assert abs(x.std() / std - 1) < 6 / math.sqrt(2 * x.size), key
    assert np.all(p["norm.weight"] == 1)
    assert all(np.all(p[k] == 0) for k in ("lin.bias", "conv.bias", "norm.bias"))


def test_init_params_returns_a_nested_tree():
    p = weights.init_params({"down_blocks.0.resnets.1.conv1.weight": (2, 2, 3, 3)}, seed=0)
    assert p["down_blocks"]["0"]["resnets"]["1"]["conv1"]["weight"].shape == (2, 2, 3, 3)


# ---- nest / flatten ----------------------------------------------------------------------------------
parts = st.one_of(st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True), st.integers(0, 12).map(str))
trees = st.recursive(st.integers(), lambda sub: st.dictionaries(parts, sub, min_size=1, max_size=4), max_leaves=20)


@given(tree=trees.filter(lambda t: isinstance(t, dict)))
def test_nest_and_flatten_are_inverse(tree):
    flat = weights.flatten(tree)
    assert all(isinstance(k, str) for k in flat)
    assert weights.nest(flat) == tree
    assert weights.flatten(weights.nest(flat)) == flat and list(weights.flatten(weights.nest(flat))) == list(flat)


def test_nest_keeps_numeric_parts_as_strings():
    tree = weights.nest({"down_blocks.0.resnets.10.conv1.weight": 1, "down_blocks.0.resnets.2.norm.bias": 2})
    assert tree["down_blocks"]["0"]["resnets"]["10"]["conv1"]["weight"] == 1
    assert tree["down_blocks"]["0"]["resnets"]["2"]["norm"]["bias"] == 2


def test_sha256_file(tmp_path):
    blob = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(blob)
    assert weights.sha256_file(tmp_path / "f", chunk=1000) == hashlib.sha256(blob).hexdigest()
