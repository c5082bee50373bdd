"""The `mdref` command: the main job writes a PNG with metadata; bad input gets one message and exit status 2."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mdref import __version__
from mdref.cli import main


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    code, out, _ = run([], capsys)
    assert code == 0 and "generate" in out and "compare" in out


def test_console_script_is_installed():
    r = subprocess.run([sys.executable, "-m", "mdref.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and __version__ in r.stdout


def test_generate_writes_png_with_metadata(tmp_path, capsys):
    out = tmp_path / "out.png"
    code, _, err = run(["generate", "a red circle", "-o", str(out), "--preset", "tiny", "--seed", "5"], capsys)
    assert code == 0
    for stage in ("tokenize", "text_encoder", "unet", "decoder"):
        assert stage in err
    img = Image.open(out)
    assert img.size == (64, 64)
    assert img.text["prompt"] == "a red circle" and img.text["seed"] == "5"
    assert img.text["model"] == "preset:tiny" and img.text["mdref_version"] == __version__
    assert "weights_sha256" in img.text and "steps" in img.text
    assert not list(tmp_path.glob(".*tmp*"))            # the temporary file was renamed away


def test_generate_with_noise_file_matches_seed(tmp_path, capsys):
    noise = np.random.Generator(np.random.PCG64(5)).standard_normal((1, 8, 8, 8))
    np.save(tmp_path / "n.npy", noise)
    run(["generate", "x", "-o", str(tmp_path / "a.png"), "--preset", "tiny", "--seed", "5"], capsys)
    run(["generate", "x", "-o", str(tmp_path / "b.png"), "--preset", "tiny", "--noise", str(tmp_path / "n.npy")],
        capsys)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--model", "/nonexistent/folder"], "no such folder"),
    (["--preset", "tiny", "--height", "40"], "multiples of 32"),
    (["--preset", "tiny", "--noise", "/nonexistent.npy"], "no such file"),
    (["--preset", "tiny", "--noise", "BAD"], "not a readable .npy"),
    (["--preset", "tiny", "--noise", "WRONGSHAPE"], "expected (1, 8, 8, 8)"),
    (["--preset", "tiny", "--steps", "0"], "--steps"),
])
def test_generate_bad_input_exits_2(tmp_path, capsys, argv, message):
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    np.save(tmp_path / "wrong.npy", np.zeros((1, 8, 4, 4)))
    argv = [{"BAD": str(tmp_path / "bad.npy"), "WRONGSHAPE": str(tmp_path / "wrong.npy")}.get(a, a) for a in argv]
    code, _, err = run(["generate", "x", "-o", str(tmp_path / "o.png")] + argv, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.count("mdref: error:") == 1
    assert not (tmp_path / "o.png").exists()


def test_generate_bad_input_in_a_subprocess_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mdref.cli", "generate", "x", "-o", str(tmp_path / "o.png"),
                        "--preset", "tiny", "--width", "50"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "multiples of 32" in r.stderr


def test_info(capsys):
    code, out, _ = run(["info", "--preset", "tiny"], capsys)
    d = json.loads(out)
    assert code == 0 and d["latent_shape"] == [1, 8, 8, 8] and d["prediction_type"] == "sample"
    assert d["parameters"]["total"] == sum(v for k, v in d["parameters"].items() if k != "total")
    assert sum(d["unet_parameters_by_block"].values()) == d["parameters"]["unet"]
    assert {"down_blocks.0", "mid_block", "up_blocks.2"} <= set(d["unet_parameters_by_block"])
