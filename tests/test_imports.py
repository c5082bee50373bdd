"""The package's dependency rule: mdref/ imports only numpy, safetensors, tokenizers, pillow and the standard
library (docs/architecture.md), and never unpickles (no pickle-family module, every np.load with allow_pickle=False).
One exception: `mdref export` (cli.py) imports the sibling package mdref_torch (PyTorch, ONNX) inside the command's
function, never at module level, so `import mdref` and every other command run without torch."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mdref"
ALLOWED = {"numpy", "safetensors", "tokenizers", "PIL", "mdref"}
PICKLE_FAMILY = {"pickle", "_pickle", "shelve", "marshal"}  # standard-library modules that unpickle
LAZY = {"cli.py": {"mdref_torch"}}                          # imported inside a function only
FILES = sorted(PACKAGE.rglob("*.py"))


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name.split(".")[0]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module.split(".")[0]


def _top_level_imports(tree):
    """The imports that run when the module is imported (outside any function body)."""
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    return [(line, mod) for line, mod in _imports(ast.Module(body=[n for n in ast.walk(tree) if id(n) not in inside
                                                                    and isinstance(n, (ast.Import, ast.ImportFrom))],
                                                              type_ignores=[]))]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_imports_only_the_allowed_packages(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    lazy = LAZY.get(path.name, set()) if path.parent == PACKAGE else set()
    bad = [(line, mod) for line, mod in _imports(tree)
           if mod in PICKLE_FAMILY or not (mod in ALLOWED or mod in sys.stdlib_module_names or mod in lazy)]
    assert not bad, f"{path.name}: imports outside numpy/safetensors/tokenizers/pillow/stdlib: {bad}"
    eager = [(line, mod) for line, mod in _top_level_imports(tree) if mod in lazy]
    assert not eager, f"{path.name}: imports {eager} at module level; only inside the command that needs them"


def test_import_mdref_does_not_import_torch():
    """Run in a fresh interpreter: importing mdref and its CLI loads neither torch nor mdref_torch."""
    import subprocess
    code = ("import sys, mdref, mdref.cli, mdref.matching, mdref.exported; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mdref_torch', 'onnx')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_np_load_never_allows_pickle(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name) and node.func.value.id in ("np", "numpy")):
            kw = {k.arg: k.value for k in node.keywords}
            assert "allow_pickle" in kw and isinstance(kw["allow_pickle"], ast.Constant) \
                and kw["allow_pickle"].value is False, f"{path.name}:{node.lineno}: np.load without allow_pickle=False"


def test_the_rule_sees_an_import():
    """The checks above can fail: a file importing torch or ftfy is caught, and so is a lazy import at module
    level."""
    tree = ast.parse("import os\nfrom ftfy import fix_text\nimport torch.nn\n")
    assert [m for _, m in _imports(tree) if not (m in ALLOWED or m in sys.stdlib_module_names)] == ["ftfy", "torch"]
    tree = ast.parse("import mdref_torch\ndef f():\n    from mdref_torch.export import export_onnx\n")
    assert [m for _, m in _top_level_imports(tree)] == ["mdref_torch"]
