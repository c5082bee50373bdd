"""Where the files shipped with mdref live: the CLIP vocabulary (clip/) and the embedded default model (default/).

In the repository they sit in the top-level weights/ folder. A built wheel (and `pip install .`) carries them
inside the package, as mdref/_weights/ (pyproject.toml maps the package mdref._weights to weights/). A source
checkout or an editable install has no mdref/_weights/ folder and reads the repository's weights/ directly.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent          # mdref/

# How PNG and golden metadata name the embedded default model: a label, not a site-packages path.
DEFAULT_MODEL_LABEL = "mdref:default"


def weights_dir():
    """The folder holding clip/ and default/: mdref/_weights/ when installed from a wheel, else weights/."""
    packaged = _PACKAGE / "_weights"
    return packaged if packaged.is_dir() else _PACKAGE.parent / "weights"
