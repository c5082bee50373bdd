"""The package's dependency rule: mdref/ imports only numpy, safetensors, tokenizers, pillow and the standard
library (docs/architecture.md), and never unpickles (no pickle-family module, every np.load with allow_pickle=False)."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mdref"
ALLOWED = {"numpy", "safetensors", "tokenizers", "PIL", "mdref"}
PICKLE_FAMILY = {"pickle", "_pickle", "shelve", "marshal"}  # standard-library modules that unpickle
FILES = sorted(PACKAGE.rglob("*.py"))


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name.split(".")[0]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module.split(".")[0]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_imports_only_the_allowed_packages(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [(line, mod) for line, mod in _imports(tree)
           if mod in PICKLE_FAMILY or not (mod in ALLOWED or mod in sys.stdlib_module_names)]
    assert not bad, f"{path.name}: imports outside numpy/safetensors/tokenizers/pillow/stdlib: {bad}"


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
    """The checks above can fail: a file importing torch or ftfy is caught."""
    tree = ast.parse("import os\nfrom ftfy import fix_text\nimport torch.nn\n")
    assert [m for _, m in _imports(tree) if not (m in ALLOWED or m in sys.stdlib_module_names)] == ["ftfy", "torch"]
