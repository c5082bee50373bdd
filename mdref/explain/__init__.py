"""`mdref explain`: one self-contained HTML page that walks a prompt through the pipeline, tokens to pixels, and the
per-token cross-attention maps the page is built from.

    pairs = mdref.explain.cross_attention_maps(pipe, "a red circle", seed=0)   # [(token string, map [H, W]), ...]
    page = mdref.explain.explain_page(pipe, "a red circle", seed=0)           # str: the whole HTML page

The explainer sits beside the model files, not inside them, in three parts:

    maps.py      the attention-map science: the probabilities of one run -> per-token maps (`attention_maps`)
    recorder.py  one run kept for the page (`Recorder`, a trace of point summaries) and `POINT_FUNCTIONS`, the
                 table from point kinds to the layer functions that computed them
    page.py      the HTML, one function per section; widgets.py its style, pictures, tables and citations

Each section's explanation is the docstring of the code that ran (inspect), and each function is cited by file and
the line of its `def`, so the page holds no second copy of prose to drift (docs/explain.md).
"""

from .maps import PROBS, AttentionMaps, attention_maps, block_maps, cross_attention_maps, prompt_tokens
from .page import explain_page, render_page
from .recorder import POINT_FUNCTIONS, Explanation, Point, Recorder, computed_by, explain

__all__ = ["AttentionMaps", "Explanation", "Point", "Recorder", "POINT_FUNCTIONS", "PROBS", "cross_attention_maps",
           "attention_maps", "block_maps", "computed_by", "explain", "explain_page", "render_page", "prompt_tokens"]
