"""The built distribution carries everything: an installed wheel draws the README's picture from any folder.

The test builds the sdist from a copy of this checkout, builds the wheel from the unpacked sdist (so the sdist is
proved to carry what the wheel is built from), installs the wheel into a fresh virtual environment that cannot see
this checkout, and runs `mdref generate` there, in another folder. The picture must be pixel-identical to the one
this (editable) install draws in-process.

Offline by construction: the sdist and wheel are built with the setuptools of this environment (no build
isolation, nothing downloaded; the `test` extra requires a setuptools that reads `license = "MIT"`). The fresh
venv (no --system-site-packages) gets the wheel with --no-deps; its runtime dependencies (numpy, safetensors,
tokenizers, pillow) are symlinked from this environment into a folder that a .pth file puts on its path. Only
those four packages are linked, never this environment's site-packages itself, so the venv has no route to the
editable mdref (the test asserts that mdref is imported from the venv, and that torch is not importable there).
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mdref

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a large red circle on the left, blue background"
pytestmark = pytest.mark.skipif(not (REPO / "weights" / "default" / "unet").is_dir(), reason="no default model")

# Copied to build from: what git tracks, without the virtual environments and build outputs of a working tree.
SKIP = {".git", ".venv", ".venv-ci", "build", "dist", "runs", "__pycache__", ".pytest_cache", ".hypothesis"}


def _run(cmd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MDREF_DEFAULT_MODEL", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300, **kw)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _link_runtime_deps(target):
    """Symlink numpy, safetensors, tokenizers and PIL (with their bundled .libs folders and dist-info) into target."""
    import numpy
    import PIL
    import safetensors
    import tokenizers
    target.mkdir()
    for mod, dist in ((numpy, "numpy"), (safetensors, "safetensors"), (tokenizers, "tokenizers"), (PIL, "pillow")):
        pkg = Path(mod.__file__).resolve().parent
        site = pkg.parent
        for entry in [pkg, *site.glob(f"{dist}.libs"), *site.glob(f"{dist}-*.dist-info")]:
            (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    t0 = time.perf_counter()
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")
                                                              or n.startswith(".venv")])
    dist = tmp / "dist"
    _run([sys.executable, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(dist)!r})"], cwd=src)
    (sdist,) = dist.glob("mdref-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
        tf.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (tmp / "unpacked").iterdir()
    _run([sys.executable, "-m", "pip", "wheel", unpacked, "--no-deps", "--no-build-isolation", "-w", dist, "-q"])
    (wheel,) = dist.glob("mdref-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    _link_runtime_deps(tmp / "deps")
    (purelib / "mdref_test_deps.pth").write_text(str(tmp / "deps") + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel])
    yield {"sdist_names": names, "wheel": wheel, "venv": venv, "python": python, "purelib": purelib,
           "setup_s": time.perf_counter() - t0}


def test_sdist_carries_what_the_wheel_is_built_from(wheel_env):
    names = {n.split("/", 1)[1] for n in wheel_env["sdist_names"] if "/" in n}
    for needed in ["pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "mdref/__main__.py",
                   "weights/clip/merges.txt", "weights/default/unet/diffusion_pytorch_model.safetensors",
                   "weights/golden/manifest.json", "tests/test_wheel.py", "tests/fuzz_safetensors.py",
                   "docs/decoders.md", "examples/01_tokenize.py", "recipe/train.py", "mdref_torch/twin.py",
                   "examples/runtimes/run_onnxruntime.py"]:
        assert needed in names, f"the sdist lacks {needed}"


def test_wheel_carries_vocabulary_and_default_model_not_golden(wheel_env):
    with zipfile.ZipFile(wheel_env["wheel"]) as z:
        names = set(z.namelist())
    tracked = {str(p.relative_to(REPO / "weights")) for sub in ("clip", "default")
               for p in (REPO / "weights" / sub).rglob("*") if p.is_file()}
    assert {f"mdref/_weights/{n}" for n in tracked} <= names
    assert not any(n.startswith("mdref/_weights/golden") for n in names), "weights/golden (the test bundle) stays out"
    assert "mdref/__main__.py" in names
    assert {"mdref/live.html", "mdref/live.css", "mdref/live.js"} <= names, "the `mdref live` page is package data"
    assert {"mdref_torch/__init__.py", "mdref_torch/twin.py", "mdref_torch/export.py"} <= names
    # every module of the package, subpackages included (mdref.explain was once left out of the package list)
    modules = {str(f.relative_to(REPO)) for f in (REPO / "mdref").rglob("*.py") if "__pycache__" not in f.parts}
    assert modules <= names, sorted(modules - names)


def test_without_torch_the_export_command_says_how_to_install(wheel_env, tmp_path):
    """The wheel's venv has no torch: `import mdref_torch` names the extra, `mdref export` says it in one line."""
    p = subprocess.run([str(wheel_env["python"]), "-c", "import mdref_torch"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert p.returncode == 1 and 'pip install "mdref[export]"' in p.stderr.splitlines()[-1], p.stderr
    p = subprocess.run([str(wheel_env["venv"] / "bin" / "mdref"), "export", "onnx", "out"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("mdref: error: mdref export needs torch") and 'pip install "mdref[export]"' in p.stderr
    assert not (tmp_path / "out").exists()


def test_installed_wheel_draws_the_readme_picture_from_another_folder(wheel_env, tmp_path):
    venv, python = wheel_env["venv"], wheel_env["python"]
    where = _run([python, "-c", "import mdref, mdref.pipeline as p, mdref.tokenizer as t; "
                  "print(mdref.__file__); print(p.DEFAULT_MODEL_DIR); print(t.SHIPPED_DIR)\n"
                  "try:\n import torch\nexcept ImportError:\n print('no torch')"], cwd=tmp_path).stdout.split("\n")
    assert Path(where[0]).is_relative_to(wheel_env["purelib"]), f"the venv imports mdref from {where[0]}"
    assert Path(where[1]) == wheel_env["purelib"] / "mdref" / "_weights" / "default" and where[3] == "no torch"
    assert Path(where[2]) == wheel_env["purelib"] / "mdref" / "_weights" / "clip"

    t0 = time.perf_counter()
    p = _run([venv / "bin" / "mdref", "generate", PROMPT, "-o", "x.png"], cwd=tmp_path)
    draw_s = time.perf_counter() - t0
    assert "no trained default model" not in p.stderr and "UNTRAINED" not in p.stderr, p.stderr
    png = Image.open(tmp_path / "x.png")
    png.load()
    ours = mdref.Pipeline.from_pretrained()(PROMPT, seed=0)
    assert png.size == ours.size and np.array_equal(np.asarray(png.convert("RGB")), np.asarray(ours.convert("RGB")))
    # The PNG metadata names the embedded model by label, never by a site-packages path.
    assert png.text["model"] == "mdref:default", png.text["model"]
    assert not any(str(venv) in v or "site-packages" in v for v in png.text.values())
    print(f"wheel: build + venv {wheel_env['setup_s']:.1f} s, mdref generate {draw_s:.1f} s")


def test_installed_wheel_serves_the_live_page(wheel_env, tmp_path):
    """`mdref live`'s page files are read from the installed package (importlib.resources), not from a checkout."""
    code = ("import json; from mdref import live; s = live.make_server('127.0.0.1', 0); "
            "print(json.dumps({n: len(b) for n, b in s.pages.items()})); print(live.__file__); s.server_close()")
    out = _run([wheel_env["python"], "-c", code], cwd=tmp_path).stdout.split("\n")
    pages = json.loads(out[0])
    assert set(pages) == {"live.html", "live.css", "live.js"} and min(pages.values()) > 500, pages
    assert Path(out[1]).is_relative_to(wheel_env["purelib"]), out[1]


def test_python_dash_m_mdref_runs_the_cli(wheel_env, tmp_path):
    p = _run([wheel_env["python"], "-m", "mdref", "--version"], cwd=tmp_path)
    assert p.stdout.strip() == f"mdref {mdref.__version__}"
    info = _run([wheel_env["python"], "-m", "mdref", "info"], cwd=tmp_path)
    assert "mdref:default" in info.stdout and "site-packages" not in info.stdout, info.stdout


def test_editable_install_reads_the_repository_weights():
    """The editable install (this environment) keeps reading weights/ of the checkout."""
    from mdref.pipeline import DEFAULT_MODEL_DIR
    from mdref.tokenizer import SHIPPED_DIR
    if os.environ.get("MDREF_DEFAULT_MODEL"):
        pytest.skip("MDREF_DEFAULT_MODEL overrides the default model")
    assert SHIPPED_DIR == REPO / "weights" / "clip" and DEFAULT_MODEL_DIR == REPO / "weights" / "default"
    pipe = mdref.Pipeline.from_pretrained()
    assert pipe.source == "mdref:default" and pipe.path == REPO / "weights" / "default"
    assert set(pipe.weights_sha256()) == {"text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                                          "vae/diffusion_pytorch_model.safetensors"}
    assert json.loads((REPO / "weights" / "golden" / "manifest.json").read_text())["weights_sha256"] == \
        pipe.weights_sha256()
