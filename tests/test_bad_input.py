"""Every bad command-line input gets one `mdref: error: ...` line naming the argument, exit status 2, no traceback,
and leaves no file behind (issue 16). The table runs `mdref.cli.main` in-process with the `tiny` preset."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mdref.cli import main

LATENT = (1, 8, 8, 8)          # the tiny preset's latent at its default 64 x 64 image


def _npy_header(path, shape, dtype="<f4"):
    """A .npy file whose header claims `shape` but holds no data (written by hand, not by numpy.save)."""
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header)


def _inputs(d):
    """The bad input files, by placeholder name."""
    d.mkdir()
    files = {}

    def save(name, arr, **kw):
        files[name] = d / f"{name.lower()}.npy"
        np.save(files[name], arr, **kw)

    files["EMPTY"] = d / "empty.npy"
    files["EMPTY"].write_bytes(b"")
    files["TEXT"] = d / "text.npy"
    files["TEXT"].write_text("0.1 0.2 0.3\n")
    files["NPZ"] = d / "noise.npz"
    np.savez(files["NPZ"], noise=np.zeros(LATENT, np.float32))
    files["HUGE"] = d / "huge.npy"
    _npy_header(files["HUGE"], (2 ** 20, 2 ** 20, 2 ** 9))          # 2 TiB of float32 claimed, 0 bytes held
    files["TRUNCATED"] = d / "truncated.npy"
    _npy_header(files["TRUNCATED"], LATENT)                          # the right shape, no data
    save("INT", np.zeros(LATENT, np.int64))
    save("BOOL", np.zeros(LATENT, bool))
    save("COMPLEX", np.zeros(LATENT, np.complex128))
    save("OBJECT", np.empty(LATENT, object), allow_pickle=True)
    save("STRUCT", np.zeros(LATENT, [("a", "<f4"), ("b", "<f4")]))
    save("WRONGSHAPE", np.zeros((1, 8, 4, 4), np.float32))
    save("TWOSTEPS", np.zeros((2,) + LATENT, np.float32))           # a per-step array, but --steps is 1
    save("SCALAR", np.float32(0.5))
    nan = np.zeros(LATENT, np.float32)
    nan[0, 3, 2, 1] = np.nan
    save("NAN", nan)
    inf = np.zeros(LATENT, np.float64)
    inf[0, 0, 0, 0] = -np.inf
    save("INF", inf)
    save("BEYOND", np.full(LATENT, 1e39))                            # finite in float64, inf in float32
    save("BIG", np.full(LATENT, 1e38, np.float32))                   # finite, overflows inside the UNet
    files["DIR"] = d / "folder.npy"
    files["DIR"].mkdir()
    return files


G = ["generate", "a red circle", "-o", "OUT", "--preset", "tiny"]
T = ["trace", "a red circle", "-o", "OUT", "--preset", "tiny"]
P = ["precision", "a red circle", "--preset", "tiny"]

# (argv, fragments every one of which the error line must hold)
TABLE = [
    (G + ["--steps", "0"], ["--steps", "from 1 to num_train_timesteps = 1000", "found 0"]),
    (G + ["--steps", "-3"], ["--steps", "found -3"]),
    (G + ["--steps", "1001"], ["--steps", "num_train_timesteps = 1000", "found 1001"]),
    (G + ["--steps", "2147483648"], ["--steps", "found 2147483648"]),
    (G + ["--steps", "two"], ["argument --steps", "invalid int value"]),
    (G + ["--seed", "-1"], ["--seed", "0 <= seed < 2**64", "found -1"]),
    (G + ["--seed", str(2 ** 64)], ["--seed", f"found {2 ** 64}"]),
    (G + ["--seed", "1.5"], ["argument --seed", "invalid int value"]),
    (G + ["--height", "0", "--width", "0"], ["--height 0", "positive multiples of 32"]),
    (G + ["--width", "0"], ["--width 0", "multiples of 32"]),
    (G + ["--height", "-64"], ["--height -64", "multiples of 32"]),
    (G + ["--height", "40"], ["--height 40", "multiples of 32"]),
    (G + ["--height", "100000", "--width", "100000"], ["--height/--width", "100000x100000", "needs about",
                                                       "GiB limit"]),
    (G + ["--max-memory", "1M"], ["--height/--width", "64x64", "needs about", "1.0 MiB limit (--max-memory)"]),
    (G + ["--max-memory", "lots"], ["--max-memory", "'lots'"]),
    (G + ["--max-memory", "0"], ["--max-memory", "'0'"]),
    (G + ["--max-memory=-5G"], ["--max-memory", "'-5G'"]),
    (G + ["--guidance", "nan"], ["--guidance", "a number in [0, 50]", "found nan"]),
    (G + ["--guidance", "inf"], ["--guidance", "found inf"]),
    (G + ["--guidance=-inf"], ["--guidance", "found -inf"]),
    (G + ["--guidance", "strong"], ["argument --guidance", "invalid float value"]),
    (G + ["--guidance", "2", "--negative-prompt", "\udcfe"], ["--negative-prompt", "not valid UTF-8", "0xfe"]),
    (["generate", "\udcff", "-o", "OUT", "--preset", "tiny"], ["the prompt", "not valid UTF-8", "0xff"]),
    (["generate", "caf\udcc3", "-o", "OUT", "--preset", "tiny"], ["the prompt", "not valid UTF-8", "0xc3 at byte 3"]),
    (G + ["--noise", "MISSING"], ["--noise", "no such file"]),
    (G + ["--noise", "DIR"], ["--noise", "no such file"]),
    (G + ["--noise", "EMPTY"], ["--noise", "not a readable .npy"]),
    (G + ["--noise", "TEXT"], ["--noise", "not a readable .npy"]),
    (G + ["--noise", "NPZ"], ["--noise", ".npz archive"]),
    (G + ["--noise", "HUGE"], ["--noise", "has shape (1048576, 1048576, 512)", "expected (1, 8, 8, 8)"]),
    (G + ["--noise", "TRUNCATED"], ["--noise", "truncated", "2048 bytes"]),
    (G + ["--noise", "INT"], ["--noise", "real floating-point", "int64"]),
    (G + ["--noise", "BOOL"], ["--noise", "real floating-point", "bool"]),
    (G + ["--noise", "COMPLEX"], ["--noise", "real floating-point", "complex128"]),
    (G + ["--noise", "OBJECT"], ["--noise", "real floating-point", "object"]),
    (G + ["--noise", "STRUCT"], ["--noise", "real floating-point"]),
    (G + ["--noise", "WRONGSHAPE"], ["--noise", "has shape (1, 8, 4, 4)", "expected (1, 8, 8, 8)"]),
    (G + ["--noise", "TWOSTEPS"], ["--noise", "has shape (2, 1, 8, 8, 8)"]),
    (G + ["--noise", "SCALAR"], ["--noise", "has shape ()"]),
    (G + ["--noise", "NAN"], ["--noise", "non-finite", "1 NaN, 0 Inf of 512"]),
    (G + ["--noise", "INF"], ["--noise", "non-finite", "0 NaN, 1 Inf of 512"]),
    (G + ["--noise", "BEYOND"], ["--noise", "beyond float32's range"]),
    (G + ["--noise", "BIG"], ["the UNet's output holds non-finite values", "first non-finite point: unet.",
                              "--allow-nonfinite"]),
    (G + ["--no-such-option"], ["unrecognized arguments: --no-such-option"]),
    (G + ["--dtype", "float8"], ["argument --dtype", "invalid choice"]),
    (G + ["--dtype", "float16", "--upcast", "attn"], ["--upcast attn", "unknown", "attention"]),
    (G + ["--upcast", "norm"], ["--upcast norm", "float16 or bfloat16"]),
    (G + ["--dtype", "bfloat16", "--downcast", "attention"], ["--downcast attention", "unknown", "norm"]),
    (["generate", "x", "-o", "OUT", "--preset", "nope"], ["unknown preset 'nope'"]),
    (T + ["--steps", "1001"], ["--steps", "found 1001"]),
    (T + ["--seed", "-1"], ["--seed", "found -1"]),
    (T + ["--noise", "NAN"], ["--noise", "non-finite"]),
    (T + ["--noise", "BIG"], ["first non-finite point: unet."]),
    (P + ["--height", "0"], ["--height 0"]),
    (P + ["--guidance", "nan"], ["--guidance", "found nan"]),
    (P + ["--noise", "COMPLEX"], ["--noise", "complex128"]),
    (P + ["--dtype", "float64"], ["--dtype float64 is the reference"]),
    # issue 27: options that cannot apply, seeds of weights, the image format, the guidance range
    (G + ["--weights-seed", "-1"], ["--weights-seed", "0 <= seed < 2**64", "found -1"]),
    (G + ["--weights-seed", str(2 ** 64)], ["--weights-seed", f"found {2 ** 64}"]),
    (["generate", "x", "-o", "OUT", "--weights-seed", "3"], ["--weights-seed 3", "only with --preset"]),
    (G + ["--negative-prompt", "blue"], ["--negative-prompt", "only with classifier-free guidance", "None"]),
    (G + ["--negative-prompt", "", "--guidance", "1"], ["--negative-prompt", "--guidance > 1", "1.0"]),
    (G + ["--guidance", "51"], ["--guidance", "[0, 50]", "found 51"]),
    (G + ["--guidance=-0.5"], ["--guidance", "[0, 50]", "found -0.5"]),
    (["generate", "x", "-o", "OUT.gif", "--preset", "tiny"], ["-o", "unknown image extension '.gif'", ".png"]),
    (["generate", "x", "-o", "OUT.", "--preset", "tiny"], ["-o", "unknown image extension"]),
    (G[:-2] + ["--dtype", "float32", "--upcast", "attention"], ["--upcast attention", "float16 or bfloat16"]),
]


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("argv, fragments", TABLE, ids=[" ".join(a[:1] + a[6:]) or a[1] for a, _ in TABLE])
def test_bad_cli_input(tmp_path, capsys, argv, fragments):
    files = _inputs(tmp_path / "in")
    files["MISSING"] = tmp_path / "in" / "missing.npy"
    out = tmp_path / "out.png"
    argv = [str(out) if a == "OUT" else str(tmp_path / a) if a.startswith("OUT.") else str(files[a]) if a in files
            else a for a in argv]
    before = _listing(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("mdref: error:")]
    assert len(errors) == 1, err
    assert err.splitlines()[-1] == errors[0]                    # the error is the last word
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in err and "Warning" not in err
    assert _listing(tmp_path) == before                         # nothing written, no temporary file left


def test_table_is_large():
    assert len(TABLE) >= 30


@pytest.mark.parametrize("module", ["mdref", "mdref.cli"])
def test_prompt_that_is_not_utf8_in_a_subprocess(tmp_path, module):
    """The OS hands Python the bytes b'\\xff' as the surrogate '\\udcff' (surrogateescape); mdref refuses it."""
    out = tmp_path / "o.png"
    env = dict(os.environ, LC_ALL="C.UTF-8", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", module, "generate", b"a \xff circle", "-o", str(out), "--preset",
                        "tiny"], capture_output=True, env=env, cwd=tmp_path)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, err
    assert b"Traceback" not in r.stderr
    errors = [line for line in err.splitlines() if line.startswith("mdref: error:")]
    assert len(errors) == 1 and "the prompt is not valid UTF-8" in errors[0] and "0xff" in errors[0], err
    assert list(tmp_path.iterdir()) == []


def test_valid_non_ascii_prompt_in_a_subprocess(tmp_path):
    out = tmp_path / "o.png"
    r = subprocess.run([sys.executable, "-m", "mdref", "generate", "ein roter Kreis \u2013 caf\u00e9", "-o", str(out),
                        "--preset", "tiny"], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8"))
    assert r.returncode == 0, r.stderr
    assert out.is_file()


def test_subprocess_steps_too_large_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mdref", "generate", "x", "-o", str(tmp_path / "o.png"), "--preset",
                        "tiny", "--steps", "2147483648"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "mdref: error: --steps" in r.stderr
    assert list(tmp_path.iterdir()) == []
