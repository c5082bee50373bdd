"""read_safetensors follows the safetensors format's specification (README "Format" of huggingface/safetensors)
and refuses, by name, what it forbids; whatever mdref accepts the official parser accepts too, equal.

Bad files are built byte by byte here from the specification (8-byte little-endian header size N, N bytes of
UTF-8 JSON, then the byte buffer); expected messages are written by hand. The differential fuzz cases come
from tests/fuzz_safetensors.py (seeded), checked against safetensors.deserialize, the official Rust parser.
"""

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from mdref.formats import safetensors as weights
from mdref.trace import load_trace
from mdref.formats.safetensors import WeightsError

_spec = importlib.util.spec_from_file_location("fuzz_safetensors", Path(__file__).with_name("fuzz_safetensors.py"))
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


def raw_file(header_text, body=b"", pad=True):
    blob = header_text.encode("utf-8", "surrogatepass") if isinstance(header_text, str) else header_text
    if pad:
        blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + body


def entry(dtype="F32", shape="[1]", offsets="[0, 4]"):
    return f'{{"dtype": "{dtype}", "shape": {shape}, "data_offsets": {offsets}}}'


def one(key="a", **kw):
    return "{" + json.dumps(key) + ": " + entry(**kw) + "}"


Z4, Z8 = b"\0" * 4, b"\0" * 8

# name -> (file bytes, regex the message must match besides the file name)
BAD = {
    "overlapping offsets": (raw_file('{"a": ' + entry(shape="[2]", offsets="[0, 8]") + ', "b": '
                                     + entry(offsets="[4, 8]") + "}", Z8), r"'b'.*\[4, 8\] overlaps 'a'"),
    "identical offsets": (raw_file('{"a": ' + entry() + ', "b": ' + entry() + "}", Z4), r"overlaps"),
    "hole between tensors": (raw_file('{"a": ' + entry() + ', "b": ' + entry(offsets="[8, 12]") + "}", Z8 + Z4),
                             r"'b'.*leaves a hole \[4, 8\) after 'a'"),
    "hole at the start": (raw_file(one(offsets="[4, 8]"), Z8), r"'a'.*leaves a hole \[0, 4\) at the start"),
    "offsets reversed": (raw_file(one(shape="[0]", offsets="[4, 0]"), Z4), r"'a'.*\[4, 0\] end before they begin"),
    "trailing bytes": (raw_file(one(), Z4 + b"xyz"), r"cover 4 bytes but the data section holds 7: 3 trailing"),
    "data cut short": (raw_file(one(shape="[2]", offsets="[0, 8]"), Z4), r"cover 8 bytes .* holds 4: truncated"),
    "fractional offset": (raw_file(one(offsets="[0, 8.5]"), Z8), r"'a'.*data_offsets\[1\] must be a non-negative "
                                                                  r"integer.*found 8\.5"),
    "offset written 4.0": (raw_file(one(offsets="[0, 4.0]"), Z4), r"data_offsets\[1\].*found 4\.0"),
    "offset 1e400": (raw_file(one(offsets="[0, 1e400]"), Z4), r"data_offsets\[1\].*found 1e400"),
    "negative offset": (raw_file(one(offsets="[-4, 0]"), Z4), r"data_offsets\[0\].*found -4"),
    "offset -0": (raw_file(one(shape="[0]", offsets="[-0, 0]")), r"data_offsets\[0\].*found -0"),
    "offset true": (raw_file(one(shape="[0]", offsets="[true, 0]")), r"data_offsets\[0\].*found True"),
    "offset a string": (raw_file(one(offsets='["0", 4]'), Z4), r"data_offsets\[0\].*found '0'"),
    "three offsets": (raw_file(one(offsets="[0, 4, 4]"), Z4), r"'a'.*data_offsets must be a list \[begin, end\]"),
    "shape 1.0": (raw_file(one(shape="[1.0]"), Z4), r"'a'.*shape entry 0 must be a non-negative integer.*found 1\.0"),
    "shape Infinity": (raw_file(one(shape="[Infinity]"), Z4), r"shape entry 0.*found Infinity"),
    "shape NaN": (raw_file(one(shape="[NaN]"), Z4), r"shape entry 0.*found NaN"),
    "shape negative": (raw_file(one(shape="[-1, -4]"), Z4), r"shape entry 0.*found -1"),
    "shape bool": (raw_file(one(shape="[true]"), Z4), r"shape entry 0.*found True"),
    "shape nested list": (raw_file(one(shape="[[1]]"), Z4), r"nested 4 levels deep"),
    "shape not a list": (raw_file(one(shape="4"), Z4), r"'a'.*shape must be a list of integers, found 4"),
    "shape entry 2**64": (raw_file(one(shape="[0, 18446744073709551616]", offsets="[0, 0]")),
                          r"shape entry 1.*below 2\*\*64, found 18446744073709551616"),
    "shape product overflows": (raw_file(one(shape="[4294967296, 4294967296, 0]", offsets="[0, 0]")),
                                r"'a'.*shape \[4294967296, 4294967296, 0\] is too large"),
    "empty but too large for numpy": (raw_file(one(shape="[0, 9223372036854775807]", offsets="[0, 0]")),
                                      r"is too large"),
    "shape disagrees with offsets": (raw_file(one(shape="[3]", offsets="[0, 8]"), Z8),
                                     r"'a' \(F32 \[3\]\) needs 12 bytes.*span 8"),
    "dtype I8": (raw_file(one(dtype="I8", shape="[4]"), Z4), r"'a' has dtype I8.*expected one of F64, F32, F16, BF16\)"),
    "dtype BOOL": (raw_file(one(dtype="BOOL", shape="[4]"), Z4), r"'a' has dtype BOOL"),
    "dtype I64": (raw_file(one(dtype="I64", offsets="[0, 8]"), Z8), r"'a' has dtype I64"),
    "dtype U8": (raw_file(one(dtype="U8", shape="[4]"), Z4), r"'a' has dtype U8"),
    "dtype F8_E4M3": (raw_file(one(dtype="F8_E4M3", shape="[4]"), Z4), r"'a' has dtype F8_E4M3"),
    "dtype lower case": (raw_file(one(dtype="f32"), Z4), r"'a' has dtype f32"),
    "metadata a list": (raw_file('{"__metadata__": ["x"], "a": ' + entry() + "}", Z4),
                        r"__metadata__ must be an object of string -> string, found \['x'\]"),
    "metadata null": (raw_file('{"__metadata__": null, "a": ' + entry() + "}", Z4), r"__metadata__ .* found None"),
    "metadata value a number": (raw_file('{"__metadata__": {"step": 3}, "a": ' + entry() + "}", Z4),
                                r"__metadata__ must be .* found 'step': 3"),
    "metadata value 1.5": (raw_file('{"__metadata__": {"lr": 1.5}, "a": ' + entry() + "}", Z4), r"found 'lr': 1\.5"),
    "metadata value an object": (raw_file('{"__metadata__": {"x": {"y": "z"}}, "a": ' + entry() + "}", Z4),
                                 r"found 'x': \{'y': 'z'\}"),
    "duplicate tensor key": (raw_file('{"a": ' + entry() + ', "a": ' + entry() + "}", Z4),
                             r"the key 'a' appears twice"),
    "duplicate field": (raw_file('{"a": {"dtype": "F32", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', Z4),
                        r"the key 'dtype' appears twice"),
    "duplicate __metadata__": (raw_file('{"__metadata__": {}, "__metadata__": {}, "a": ' + entry() + "}", Z4),
                               r"the key '__metadata__' appears twice"),
    "unknown field": (raw_file('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "order": "C"}}', Z4),
                      r"'a' has header fields \['data_offsets', 'dtype', 'order', 'shape'\], expected exactly"),
    "missing field": (raw_file('{"a": {"dtype": "F32", "shape": [1]}}'), r"'a' has header fields \['dtype', 'shape'\]"),
    "entry not an object": (raw_file('{"a": [0, 4]}', Z4), r"'a' has a malformed header entry \[0, 4\]"),
    "nested 200,000 deep": (raw_file('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}"),
                            r"nested 200001 levels deep; a safetensors header needs at most 3"),
    "nested 5 deep": (raw_file('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": [[[[]]]]}', Z4),
                      r"nested 5 levels deep"),
    "header over 100 MB": (struct.pack("<Q", 100_000_001) + b"{}", r"header length 100000001 is over the 100000000-byte"),
    "header size 2**64 - 1": (struct.pack("<Q", 2**64 - 1) + b"{}", r"over the 100000000-byte limit"),
    "header beyond the file": (struct.pack("<Q", 64) + b'{"a": 1}', r"header length 64 runs past the end of the 16-byte"),
    "header starts with a space": (raw_file(" " + one(), Z4), r"must begin with '\{', found b' \{"),
    "header starts with a BOM": (raw_file("\ufeff" + one(), Z4), r"must begin with '\{'"),
    "header padded with NUL": (raw_file(one().encode() + b"\0" * 3, Z4, pad=False),
                               r"has '\\x00\\x00\\x00' after its JSON object \(only space padding"),
    "two JSON objects": (raw_file(one() + "{}", Z4), r"has '\{\} *' after its JSON object"),
    "header not UTF-8": (raw_file(b'{"\xff": ' + entry().encode() + b"}", Z4), r"the header is not UTF-8"),
    "lone surrogate key": (raw_file(one(key="\ud800"), Z4), r"tensor key '\\ud800' is not valid Unicode"),
    "header not an object": (raw_file("[1, 2]"), r"must begin with '\{'"),
    "header JSON broken": (raw_file('{"a": '), r"unreadable header"),
    "header length 0": (struct.pack("<Q", 0), r"must begin with '\{', found b''"),
    "shorter than 8 bytes": (b"\x08\0\0", r"shorter than its 8-byte header length"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_file_is_refused_by_name(tmp_path, name):
    data, pattern = BAD[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(WeightsError, match=pattern) as e:
        weights.read_safetensors(path)
    assert str(path) in str(e.value)


# Files the specification allows and the official parser reads: mdref reads them too, equal.
GOOD = {
    "keys not in offset order": (raw_file('{"b": ' + entry(offsets="[4, 8]") + ', "a": ' + entry() + "}",
                                          np.array([1.5, -2.0], "<f4").tobytes()), {"a": [1.5], "b": [-2.0]}),
    "empty tensors share an offset": (raw_file('{"e": ' + entry(shape="[0, 3]", offsets="[0, 0]") + ', "f": '
                                               + entry(shape="[2, 0]", offsets="[0, 0]") + ', "a": ' + entry() + "}",
                                               np.array([7.0], "<f4").tobytes()),
                                      {"e": np.zeros((0, 3)), "f": np.zeros((2, 0)), "a": [7.0]}),
    "empty file": (raw_file("{}"), {}),
    "scalar": (raw_file(one(shape="[]"), np.array(3.25, "<f4").tobytes()), {"a": np.array(3.25)}),
    "whitespace inside, spaces after": (raw_file('{ "a" :\n\t' + entry() + " }" + " " * 13, Z4, pad=False), {"a": [0.0]}),
    "escapes in keys": (raw_file('{"\\u0061\\/b": ' + entry() + ', "__metadata__": {"\\u00e9": "\\u2603"}}', Z4),
                        {"a/b": [0.0]}),
}


@pytest.mark.parametrize("name", list(GOOD))
def test_valid_file_reads_like_the_official_parser(tmp_path, name):
    data, expected = GOOD[name]
    path = tmp_path / "good.safetensors"
    path.write_bytes(data)
    tensors, _ = weights.read_safetensors(path)
    assert set(tensors) == set(expected)
    for k, v in expected.items():
        assert tensors[k].shape == np.shape(v) and np.array_equal(tensors[k], v), k
    assert fuzz.check(data, path, allow_int=False) == "load (equal to official)"


def test_metadata_escapes_are_decoded(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(GOOD["escapes in keys"][0])
    assert weights.read_safetensors(path)[1] == {"\u00e9": "\u2603"}


def test_integer_tensors_read_only_when_allowed(tmp_path):
    """Model weights refuse integer tensors; trace files (load_trace) keep their int64 token ids."""
    ids = np.array([[49406, 320, 49407]], np.int64)
    path = tmp_path / "t.safetensors"
    safetensors.numpy.save_file({"tokens": ids, "mask": np.array([True, False]),
                                 "x": np.ones(2, np.float32)}, str(path))
    with pytest.raises(WeightsError, match=r"'(tokens|mask)' has dtype (I64|BOOL)"):
        weights.read_safetensors(path)
    got, _ = weights.read_safetensors(path, allow_int=True)
    assert got["tokens"].dtype == np.int64 and np.array_equal(got["tokens"], ids)
    assert got["mask"].dtype == np.bool_ and got["mask"].tolist() == [True, False]
    arrays, _ = load_trace(path)
    assert np.array_equal(arrays["tokens"], ids)


def test_written_files_are_spec_conformant(tmp_path):
    """write_safetensors: header padded with spaces to 8 bytes, data in offset order tiling the buffer,
    read back equal by the official parser."""
    rng = np.random.default_rng(5)
    src = {"z": rng.standard_normal(3).astype(np.float16), "a": rng.standard_normal((2, 2)),
           "m": np.zeros((0, 2), np.float32), "tokens": rng.integers(0, 9, 4)}
    path = tmp_path / "w.safetensors"
    weights.write_safetensors(path, src, {"k": "v"})
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0 and data[8:9] == b"{"
    text = data[8:8 + n].decode()
    assert text == text.rstrip(" ") + " " * (len(text) - len(text.rstrip(" ")))
    header = json.loads(text)
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(data) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert fuzz.check(data, path, allow_int=True) == "load (equal to official)"


def test_fuzz_mdref_accepts_only_what_the_official_parser_accepts():
    """Seeded, bounded differential fuzzing (3000 cases, about a second): mdref either raises WeightsError
    naming the file, or loads exactly what the official parser reads. No other outcome."""
    counts = fuzz.run(3000, seed=1)
    findings = {k: v for k, v in counts.items() if k.startswith("FINDING")}
    assert not findings, findings
    assert counts["cases"] == 3000
    # every outcome is exercised (so the test can fail on each side)
    assert counts["load (equal to official)"] >= 50, counts
    assert counts["error (official refuses too)"] >= 500, counts
    assert counts["error (official accepts; mdref stricter)"] >= 10, counts


def test_fuzz_oracle_catches_a_lax_reader(tmp_path, monkeypatch):
    """The differential check is not vacuous: a reader that ignored trailing bytes, or misread a value,
    is reported."""
    path = tmp_path / "x.safetensors"
    junk = raw_file(one(), Z4 + b"junk")
    path.write_bytes(junk)
    assert fuzz.official(junk, path) is None                        # the official parser refuses trailing bytes
    assert fuzz.check(junk, path, allow_int=False) == "error (official refuses too)"
    monkeypatch.setattr(fuzz, "read_safetensors", lambda p, allow_int: ({"a": np.zeros(1, np.float32)}, {}))
    with pytest.raises(AssertionError, match="official parser refuses"):
        fuzz.check(junk, path, allow_int=False)
    good = raw_file(one(), np.array([2.0], "<f4").tobytes())
    with pytest.raises(AssertionError):                            # 0.0 read where the file holds 2.0
        fuzz.check(good, path, allow_int=False)


def test_integer_tensors_allowed_by_key(tmp_path):
    """allow_int may name the keys that may hold integers (a CLIP checkpoint's position_ids buffer); any other
    integer tensor is still refused, by name."""
    path = tmp_path / "te.safetensors"
    safetensors.numpy.save_file({"text_model.embeddings.position_ids": np.arange(77)[None],
                                 "w": np.ones(2, np.float32)}, str(path))
    got, _ = weights.read_safetensors(path, allow_int={"text_model.embeddings.position_ids"})
    assert got["text_model.embeddings.position_ids"].dtype == np.int64
    with pytest.raises(WeightsError, match=r"'text_model.embeddings.position_ids' has dtype I64"):
        weights.read_safetensors(path, allow_int={"embeddings.position_ids"})
