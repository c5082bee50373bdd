"""Issue 16, real-world hardening of compare / trace / golden / precision and of output paths.

Every bad input gets exit status 2, one `mdref: error:` line naming the thing, and leaves no file behind; NaN and inf
are compared by the rules in mdref/comparison.py's docstring; --json is strict JSON; a seeded fuzz of trace files
ends only in named errors or clean reports (tests/fuzz_traces.py; `--long N` for a long run).
"""

import errno
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mdref.formats.safetensors
from mdref.cli import main
from mdref.comparison import compare, format_report
from mdref.outputs import OutputError, atomic_write, check_output_path
from mdref.trace import MANIFEST_KEY, PatternError, Trace, TraceError, load_trace, point_matcher, save_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_traces  # noqa: E402

PROMPT = "a red circle"
TINY = ["--preset", "tiny"]


def files(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_usage_error(code, err, *needles):
    assert code == 2, err
    assert err.count("mdref: error:") == 1 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]            # the error is the last line (timings may come before it)
    assert line.startswith("mdref: error:"), err
    for n in needles:
        assert n in line, (n, err)


def write_raw(path, metadata, arrays=None):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "tokens": np.arange(5, dtype=np.int64)} \
        if arrays is None else arrays
    Path(path).write_bytes(fuzz_traces.raw_trace(arrays, metadata))


# ---- compare: malformed trace files --------------------------------------------------------------------------
def _m(obj):
    return {MANIFEST_KEY: obj if isinstance(obj, str) else json.dumps(obj)}


BAD_TRACES = [
    ("manifest null", _m(None), "expected the manifest to be a JSON object, found null"),
    ("manifest a number", _m(5), "expected the manifest to be a JSON object, found a number"),
    ("manifest a list", _m([1, 2]), "found a list"),
    ("manifest a string", _m('"points"'), "found a string"),
    ("manifest not JSON", _m('{"points": ['), "is not valid JSON"),
    ("manifest nested too deeply", _m("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    ("manifest key twice", _m('{"points": ["a"], "points": ["tokens"]}'), "the key 'points' twice"),
    ("points an int", _m({"points": 3}), 'expected manifest "points" to be a list of point names, found a number'),
    ("points an object", _m({"points": {"a": 1}}), "found an object"),
    ("points holds a number", _m({"points": ["a", 7]}), "to hold point names (strings), found a number 7"),
    ("points holds null", _m({"points": [None]}), "found null"),
    ("points duplicate", _m({"points": ["a", "tokens", "a"]}), "lists 'a' twice"),
    ("points missing tensor", _m({"points": ["a", "gone"]}), "names 'gone', which is not a tensor in the file"),
    ("dtypes a list", _m({"points": ["a"], "dtypes": ["float32"]}), 'expected manifest "dtypes" to be an object'),
    ("dtypes value a number", _m({"dtypes": {"a": 32}}), 'manifest "dtypes" of \'a\' to be a dtype name'),
    ("dtypes missing tensor", _m({"dtypes": {"gone": "float32"}}), "names 'gone', which is not a tensor"),
    # Metadata that is not string -> string is refused by the safetensors reader itself (its spec's rule).
    ("manifest not a string", {MANIFEST_KEY: {"points": ["a"]}}, "not a safetensors file"),
    ("metadata a list", [MANIFEST_KEY], "__metadata__ must be an object of string -> string"),
]


@pytest.mark.parametrize("metadata, message", [c[1:] for c in BAD_TRACES], ids=[c[0] for c in BAD_TRACES])
def test_compare_malformed_manifest_is_a_named_error(tmp_path, capsys, metadata, message):
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    write_raw(good, _m({"points": ["tokens", "a"]}))
    write_raw(bad, metadata)
    with pytest.raises((TraceError, mdref.io.WeightsError), match=None) as e:
        load_trace(bad)
    assert message in str(e.value) or message == "metadata"
    before = files(tmp_path)
    for argv in (["compare", str(good), str(bad)], ["compare", str(bad), str(good), "--json"]):
        code, out, err = run(argv, capsys)
        assert_usage_error(code, err, str(bad), "not a readable trace file", message)
        assert out == ""
    assert files(tmp_path) == before


def test_compare_other_bad_inputs(tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    write_raw(good, _m({"points": ["tokens", "a"]}))
    (tmp_path / "junk.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"not json")
    (tmp_path / "folder.safetensors").mkdir()
    cases = [
        (["compare", str(good), str(tmp_path / "junk.safetensors")], ["junk.safetensors", "not a safetensors file"]),
        (["compare", str(good), str(tmp_path / "folder.safetensors")], ["folder.safetensors", "not a regular file"]),
        (["compare", str(good), str(tmp_path / "missing.safetensors")], ["missing.safetensors", "no such trace file"]),
        (["compare", str(good), str(good), "--points", "re:("], ["--points", "'re:('", "not a valid regular expr"]),
        (["compare", str(good), str(good), "--rtol", "-1"], ["--rtol must be a number >= 0, got -1"]),
        (["compare", str(good), str(good), "--atol", "nan"], ["--atol must be a number >= 0, got nan"]),
        (["compare", str(good), str(good), "--points", "nomatch"], ["no points in common", "nomatch"]),
    ]
    before = files(tmp_path)
    for argv, needles in cases:
        code, out, err = run(argv, capsys)
        assert_usage_error(code, err, *needles)
    assert files(tmp_path) == before


def test_load_trace_order_and_tolerated_forms(tmp_path):
    """What stays valid: no manifest (file key order), a subset in "points" (the rest follows), NaN in the
    manifest, int64 points."""
    arrays = {"z": np.zeros(2, np.float32), "tokens": np.arange(3, dtype=np.int64), "m": np.ones(1, np.float64)}
    p = tmp_path / "t.safetensors"
    write_raw(p, None, arrays)
    assert list(load_trace(p)[0]) == ["z", "tokens", "m"]
    write_raw(p, _m({"points": ["m", "z"]}), arrays)
    arr, manifest = load_trace(p)
    assert list(arr) == ["m", "z", "tokens"] and arr["tokens"].dtype == np.int64
    write_raw(p, _m('{"points": [], "x": NaN}'), arrays)
    assert np.isnan(load_trace(p)[1]["x"])


# ---- the one point matcher -------------------------------------------------------------------------------------
def test_point_matcher_is_shared_and_refuses_bad_patterns():
    keep = point_matcher(["unet.*", "re:^image$"])
    assert keep("unet.out") and keep("image") and not keep("images") and not keep("decoder.out")
    assert point_matcher(None)("x") and point_matcher([])("x")
    assert Trace("unet.*").wants("unet.out") and not Trace("unet.*").wants("tokens")
    for bad, needle in (("re:(", "'re:('"), (["ok", "re:[a-"], "'re:[a-'"), ([3], "found int"), (3, "points 3")):
        with pytest.raises(PatternError, match=None) as e:
            point_matcher(bad)
        assert needle in str(e.value) and isinstance(e.value, ValueError)
    with pytest.raises(PatternError):
        Trace("re:(")
    with pytest.raises(PatternError):
        compare({"a": np.zeros(1)}, {"a": np.zeros(1)}, points="re:(")


# ---- NaN / inf semantics ------------------------------------------------------------------------------------------
def _one(a, b, **kw):
    r = compare({"p": np.asarray(a, np.float32)}, {"p": np.asarray(b, np.float32)}, **kw)
    return r, r.points[0]


def test_a_trace_with_nan_and_inf_agrees_with_itself():
    x = np.array([[1.0, np.nan, 3.0], [np.inf, -np.inf, 6.0]], np.float32)
    r, p = _one(x, x.copy())
    assert r.ok and p.ok and r.first_divergence is None
    assert (p.nonfinite_a, p.nonfinite_b, p.nonfinite_mismatch) == (3, 3, 0)
    assert p.first_nonfinite_a == (0, 1) and p.first_nonfinite_b == (0, 1)
    assert p.max_abs == 0.0 and p.psnr_db == float("inf") and p.cosine == pytest.approx(1.0)


@pytest.mark.parametrize("a, b, mismatches", [
    ([1.0, 2.0, 3.0], [1.0, np.nan, 3.0], 1),          # candidate NaN where the reference is finite
    ([1.0, np.nan, 3.0], [1.0, 2.0, 3.0], 1),          # reference NaN, candidate finite
    ([1.0, np.inf, 3.0], [1.0, -np.inf, 3.0], 1),      # opposite infinities
    ([1.0, np.inf, 3.0], [1.0, np.nan, 3.0], 1),       # inf vs NaN
    ([np.nan, 2.0, np.inf], [1.0, 2.0, np.inf], 1),    # one of two non-finite positions reproduced
    ([np.nan, np.nan, 3.0], [np.inf, 2.0, 3.0], 2),
])
def test_nonfinite_mismatch_diverges_whatever_the_tolerance(a, b, mismatches):
    r, p = _one(a, b, rtol=np.inf)
    assert not p.ok and r.first_divergence == "p" and p.nonfinite_mismatch == mismatches
    assert p.nonfinite_a == int((~np.isfinite(a)).sum()) and p.nonfinite_b == int((~np.isfinite(b)).sum())
    # the excerpt starts with the mismatched non-finite positions, not with zero differences
    first = r.excerpt[:mismatches]
    for idx, va, vb in first:
        assert not (np.isfinite(va) and np.isfinite(vb))
    assert len({idx for idx, _, _ in r.excerpt}) == len(r.excerpt)


def test_metrics_are_over_the_finite_in_both_positions():
    a = np.array([np.nan, 1.0, 2.0, 4.0])
    b = np.array([np.nan, 1.0, 2.5, 4.0])
    r = compare({"p": a}, {"p": b}, rtol=0.2)
    p = r.points[0]
    assert p.ok and p.max_abs == 0.5 and p.rel_to_max == 0.125
    assert p.nmse == pytest.approx(0.25 / 21.0)
    assert p.psnr_db == pytest.approx(10 * np.log10(16.0 / (0.25 / 3)))
    r = compare({"p": a}, {"p": b}, rtol=0.1)          # the finite difference alone now exceeds the tolerance
    assert r.first_divergence == "p" and r.excerpt == [((2,), 2.0, 2.5)]


def test_compare_checks_its_tolerances():
    x = {"p": np.ones(2)}
    assert compare(x, x, rtol=np.float32(1e-3), atol=0).ok
    for bad in (-1.0, float("nan"), "1e-3", True):
        with pytest.raises(ValueError, match="rtol must be a number >= 0"):
            compare(x, x, rtol=bad)


def test_all_nan_point_agrees_with_all_nan():
    r, p = _one([np.nan, np.nan], [np.nan, np.nan])
    assert r.ok and p.max_abs == 0.0 and p.nonfinite_a == 2


def test_finite_extremes_do_not_overflow_into_nan():
    big = np.finfo(np.float64).max
    r = compare({"p": np.array([big, -big])}, {"p": np.array([-big, big])})
    p = r.points[0]
    assert not p.ok and p.max_abs == float("inf") and np.isfinite(p.nmse) and p.nmse == pytest.approx(4.0)
    assert p.cosine == pytest.approx(-1.0) and np.isfinite(p.psnr_db)


def test_human_table_shows_nan_and_inf(capsys):
    a = np.array([1.0, np.nan, 3.0], np.float32)
    r, _ = _one(a, np.array([1.0, 2.0, 3.0], np.float32))
    text = format_report(r)
    assert "nonfinite a/b" in text and "1/0" in text
    assert "at (1,): a = nan  b = 2  diff = nan" in text
    assert "non-finite values: a 1 (first at (1,)), b 0 (first at None); 1 positions" in text
    r, _ = _one(a, a)
    assert "inf" in format_report(r).splitlines()[1]       # PSNR of identical points


def test_json_is_strict_and_spells_nonfinite_values(tmp_path, capsys):
    a = {"p": np.array([1.0, np.nan, np.inf], np.float32), "q": np.ones(3, np.float32)}
    b = {"p": np.array([1.0, 5.0, np.inf], np.float32), "q": np.ones(3, np.float32)}
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_trace(pa, a)
    save_trace(pb, b)
    code, out, _ = run(["compare", str(pa), str(pb), "--json"], capsys)
    assert code == 1

    def refuse(c):
        raise AssertionError(f"non-strict JSON constant {c}")
    d = json.loads(out, parse_constant=refuse)
    assert d["ok"] is False and d["first_divergence"] == "p"
    p, q = d["points"]
    assert p["nonfinite_a"] == 2 and p["nonfinite_b"] == 1 and p["nonfinite_mismatch"] == 1
    assert p["first_nonfinite_a"] == [1] and p["first_nonfinite_b"] == [2]
    assert q["psnr_db"] == "inf" and q["max_abs"] == 0.0
    assert d["excerpt"][0] == [[1], "nan", 5.0]
    code, out, _ = run(["compare", str(pa), str(pa), "--json"], capsys)
    assert code == 0 and json.loads(out, parse_constant=refuse)["ok"] is True
    # shapes that differ: metrics not computed are null
    save_trace(pb, {"p": np.ones(2, np.float32)})
    code, out, _ = run(["compare", str(pa), str(pb), "--json"], capsys)
    assert code == 1 and json.loads(out, parse_constant=refuse)["points"][0]["max_abs"] is None


# ---- precision ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("points, needles", [
    (["nomatch"], ["--points nomatch", "no traced point matches"]),
    (["re:("], ["--points", "'re:('", "regular expression"]),
])
def test_precision_bad_points(capsys, points, needles):
    argv = ["precision", PROMPT] + TINY + [a for p in points for a in ("--points", p)]
    code, out, err = run(argv, capsys)
    assert_usage_error(code, err, *needles)


# ---- output paths: generate -o, trace -o ------------------------------------------------------------------------
OUTPUT_CASES = [
    ("existing folder", lambda d: (d / "sub").mkdir() or d / "sub", "exists and is a folder"),
    ("empty", lambda d: "", "empty path"),
    ("missing folder", lambda d: d / "missing" / "o.out", "no such folder"),
    ("under a file", lambda d: (d / "f").write_text("x") and d / "f" / "o.out", "is not a folder"),
    ("trailing slash", lambda d: f"{d}/newdir/", "names a folder"),
    ("name too long", lambda d: d / ("n" * 300), "longer than the filesystem's limit"),
    ("symlink to a file", lambda d: (d / "real").write_text("keep") and os.symlink(d / "real", d / "ln") or d / "ln",
     "is a symbolic link"),
    ("dangling symlink", lambda d: os.symlink(d / "nowhere", d / "ln") or d / "ln", "is a symbolic link"),
    ("fifo", lambda d: os.mkfifo(d / "fifo") or d / "fifo", "exists and is a FIFO"),
    ("proc", lambda d: "/proc/mdref-test-output", "cannot create files in /proc"),
]


@pytest.mark.parametrize("command", ["generate", "trace"])
@pytest.mark.parametrize("make, message", [c[1:] for c in OUTPUT_CASES], ids=[c[0] for c in OUTPUT_CASES])
def test_bad_output_path_fails_before_the_model_runs(tmp_path, capsys, monkeypatch, command, make, message):
    target = str(make(tmp_path))
    before = files(tmp_path)
    stat_before = {p: os.lstat(tmp_path / p) for p in before}

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")
    monkeypatch.setattr("mdref.cli.load_pipeline", no_model)
    code, _, err = run([command, PROMPT, "-o", target] + TINY, capsys)
    assert_usage_error(code, err, "-o", message)
    assert files(tmp_path) == before
    for p, st in stat_before.items():             # nothing replaced: same inode, same kind
        assert os.lstat(tmp_path / p).st_ino == st.st_ino
    if (tmp_path / "real").exists():
        assert (tmp_path / "real").read_text() == "keep"


def test_device_targets_are_refused_by_the_helper(tmp_path):
    """/dev/null is checked only through the helper (a regression in a command must not replace it as root)."""
    with pytest.raises(OutputError, match="exists and is a device"):
        check_output_path("/dev/null", "-o")
    with pytest.raises(OutputError, match="exists and is a device"):
        atomic_write("/dev/null", lambda tmp: Path(tmp).write_bytes(b"x"), "-o")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_trace_full_disk_leaves_nothing(tmp_path, capsys, monkeypatch):
    real_open = open

    class Full:
        """A file that takes the first 16 bytes, then reports a full disk."""
        def __init__(self, path, mode):
            self.f = real_open(path, mode)
            self.n = 0

        def write(self, b):
            if self.n + len(b) > 16:
                _enospc()
            self.n += len(b)
            return self.f.write(b)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(mdref.formats.safetensors, "open", Full, raising=False)
    out = tmp_path / "t.safetensors"
    code, _, err = run(["trace", PROMPT, "-o", str(out)] + TINY + ["--points", "unet.out"], capsys)
    assert_usage_error(code, err, f"-o {out}: could not write (No space left on device)")
    assert files(tmp_path) == []
    # an existing file is not touched by a failed write
    out.write_bytes(b"old")
    code, _, err = run(["trace", PROMPT, "-o", str(out)] + TINY + ["--points", "unet.out"], capsys)
    assert code == 2 and out.read_bytes() == b"old" and files(tmp_path) == ["t.safetensors"]


def test_generate_full_disk_leaves_nothing(tmp_path, capsys, monkeypatch):
    def partial_then_full(self, fp, *a, **k):
        Path(fp).write_bytes(b"\x89PNG partial")
        _enospc()
    monkeypatch.setattr(Image.Image, "save", partial_then_full)
    out = tmp_path / "o.png"
    code, _, err = run(["generate", PROMPT, "-o", str(out)] + TINY, capsys)
    assert_usage_error(code, err, f"-o {out}: could not write (No space left on device)")
    assert files(tmp_path) == []


def test_outputs_still_work_and_replace_a_regular_file(tmp_path, capsys):
    out = tmp_path / "o.png"
    out.write_bytes(b"old")
    assert main(["generate", PROMPT, "-o", str(out)] + TINY) == 0
    assert Image.open(out).size == (64, 64) and files(tmp_path) == ["o.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask          # a normal file's mode, not a temp file's 0600
    t = tmp_path / "t.safetensors"
    assert main(["trace", PROMPT, "-o", str(t), "--points", "unet.out"] + TINY) == 0
    assert list(load_trace(t)[0]) == ["unet.out"] and files(tmp_path) == ["o.png", "t.safetensors"]
    code, _, err = run(["trace", PROMPT, "-o", str(tmp_path / "u.safetensors"), "--points", "nomatch"] + TINY,
                       capsys)
    assert_usage_error(code, err, "--points nomatch", "no traced point matches")
    assert files(tmp_path) == ["o.png", "t.safetensors"]


# ---- golden DIR ---------------------------------------------------------------------------------------------------
GOLDEN_CASES = [
    ("existing file", lambda d: (d / "g").write_text("x") and d / "g", "exists and is not a folder"),
    ("non-empty folder", lambda d: (d / "g").mkdir() or (d / "g" / "old.txt").write_text("x") and d / "g",
     "exists and is not empty"),
    ("under a file", lambda d: (d / "f").write_text("x") and d / "f" / "g", "is not a folder"),
    ("missing parent", lambda d: d / "missing" / "g", "no such folder"),
    ("symlink to a folder", lambda d: (d / "real").mkdir() or os.symlink(d / "real", d / "g") or d / "g",
     "is a symbolic link"),
    ("empty", lambda d: "", "empty path"),
    ("proc", lambda d: "/proc/mdref-golden-test", "cannot create files in /proc"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in GOLDEN_CASES], ids=[c[0] for c in GOLDEN_CASES])
def test_golden_bad_dir(tmp_path, capsys, monkeypatch, make, message):
    target = str(make(tmp_path))
    before = files(tmp_path)
    monkeypatch.setattr("mdref.cli.load_pipeline", lambda *a, **k: pytest.fail("model loaded before DIR check"))
    code, _, err = run(["golden", target] + TINY, capsys)
    assert_usage_error(code, err, "DIR", message)
    assert files(tmp_path) == before


def test_golden_failure_midway_leaves_nothing_and_empty_dir_is_used(tmp_path, capsys, monkeypatch):
    calls = []
    real_save = Image.Image.save

    def fail_on_second_case(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 2:
            _enospc()
        return real_save(self, fp, *a, **k)
    monkeypatch.setattr(Image.Image, "save", fail_on_second_case)
    g = tmp_path / "g"
    code, _, err = run(["golden", str(g)] + TINY, capsys)
    assert_usage_error(code, err, f"DIR {g}: could not write (No space left on device)")
    assert len(calls) == 2 and files(tmp_path) == []            # case0 was written, then all of it removed
    monkeypatch.setattr(Image.Image, "save", real_save)
    g.mkdir()                                                    # an existing empty folder is fine
    assert main(["golden", str(g)] + TINY) == 0
    assert (g / "manifest.json").is_file() and (g / "case0" / "trace.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["g"]


# ---- fuzz -----------------------------------------------------------------------------------------------------
def test_fuzzed_traces_end_in_named_errors_or_clean_reports():
    """300 seeded mutated trace files (~1 s): load_trace + compare + `mdref compare --json` never crash."""
    outcomes, kinds, others = fuzz_traces.run(300, seed=16)
    assert not others, "\n".join(f"case {i} ({k}): {o}\n{tb}" for i, k, o, tb in others[:5])
    assert outcomes["clean error"] > 100 and outcomes["clean report"] > 30        # both paths exercised
    assert len(kinds) == len(fuzz_traces.MUTATIONS)
