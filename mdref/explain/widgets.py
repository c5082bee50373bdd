"""The page's building blocks: its style, pictures of arrays, tables, and citations of the code that ran."""

from __future__ import annotations

import base64
import html
import inspect
import io
import re
import textwrap
from pathlib import Path

import numpy as np

from .recorder import CHANNELS, computed_by

PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent


# ---- pictures -------------------------------------------------------------------------------------------------
VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)


def png(a):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _colour(v):
    """[...] in [0, 1] -> [..., 3] uint8 along a viridis-like ramp."""
    x = np.clip(v, 0, 1) * (len(VIRIDIS) - 1)
    i = np.minimum(x.astype(int), len(VIRIDIS) - 2)
    f = (x - i)[..., None]
    return np.round(VIRIDIS[i] * (1 - f) + VIRIDIS[i + 1] * f).astype(np.uint8)


def heat_rgba(m):
    """A map [h, w] -> RGBA uint8: colour and opacity by m / max m (transparent where the map is 0)."""
    top = m.max()
    v = m / top if top > 0 else np.zeros_like(m)
    return np.concatenate([_colour(v), np.round(210 * v)[..., None].astype(np.uint8)], axis=-1)


def _shrink(a, limit):
    """[c, h, w] -> at most `limit` pixels a side: block means over an integer factor (a stride when it does not
    divide)."""
    c, h, w = a.shape
    f = max(1, -(-max(h, w) // limit))
    if f == 1:
        return a
    if h % f == 0 and w % f == 0:
        return a.reshape(c, h // f, f, w // f, f).mean(axis=(2, 4))
    return a[:, ::f, ::f]


def _tiles(ch, limit=32):
    """Channels [c, h, w] -> one grey uint8 picture, each channel scaled to its own min..max, 1 px apart."""
    ch = _shrink(np.asarray(ch, np.float64), limit)
    c, h, w = ch.shape
    out = np.full((h, c * (w + 1) - 1), 255, np.uint8)
    for i in range(c):
        x = ch[i]
        lo, hi = x.min(), x.max()
        x = (x - lo) / (hi - lo) if hi > lo else np.full_like(x, 0.5)
        out[:, i * (w + 1): i * (w + 1) + w] = np.round(x * 255).astype(np.uint8)
    return out


# ---- the page -------------------------------------------------------------------------------------------------
CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1180px;padding:0 18px 60px;color:#1d1d1f}
h1{font-size:24px;margin:18px 0 4px} h2{margin-top:34px;border-bottom:2px solid #ddd;padding-bottom:4px}
h3{margin:18px 0 6px;font-size:16px} code,pre{font:13px/1.35 ui-monospace,monospace}
.doc{background:#f4f6fa;border-left:4px solid #6a8fd8;padding:6px 10px;margin:8px 0;white-space:pre-wrap}
.doc .cite{color:#555;font-size:12px;white-space:normal}
table{border-collapse:collapse;margin:6px 0;font-size:13px} td,th{border:1px solid #ddd;padding:2px 6px}
th{background:#f0f0f0;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.pad td{color:#999;background:#fafafa} .pix{image-rendering:pixelated}
.maps{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0} figure{margin:0;text-align:center;font-size:12px}
figcaption{max-width:88px;overflow-wrap:anywhere}
.over{position:relative;width:84px;height:84px;background-size:100% 100%;image-rendering:pixelated}
.over img{position:absolute;left:0;top:0;width:100%;height:100%;image-rendering:pixelated}
.first{display:flex;gap:18px;align-items:flex-start;background:#fff8e6;border:1px solid #f0d58a;padding:10px}
.where{font-size:12px;color:#444} .where code{font-size:12px}
nav a{margin-right:12px} details{margin:6px 0} summary{cursor:pointer}
.src pre{background:#fbfbfb;border:1px solid #e4e4e4;padding:6px;overflow-x:auto}
.wide{overflow-x:auto;max-width:100%}
"""


class Page:
    """The functions the page cites (their sources are appended at the end) and the HTML pieces that cite them."""

    def __init__(self, decoder_kind="kl"):
        self.cited = {}                               # (file, def line) -> (anchor, label, source text)
        self.decoder_kind = decoder_kind              # which decoder's functions computed the decoder's points

    def cite(self, obj):
        """A function or method -> a link to its source at the end of the page, labelled with the file and the line
        of its `def` ('mdref/unet.py:36 resnet'); an op wrapped by the emulation decorator is cited as written."""
        if obj is None:
            return ""
        obj = inspect.unwrap(obj)
        code = getattr(obj, "__code__", None)
        if code is None:
            return ""
        qual, module = obj.__qualname__, obj.__module__
        lines, first = inspect.getsourcelines(obj)
        line = first + next(i for i, t in enumerate(lines) if t.lstrip().startswith(("def ", "async def ")))
        key = (code.co_filename, line)
        if key not in self.cited:
            anchor = "src-" + re.sub(r"[^A-Za-z0-9]+", "-", f"{module}-{qual}").strip("-")
            self.cited[key] = (anchor, f"{_relpath(code.co_filename)}:{line} {module}.{qual}",
                               textwrap.dedent("".join(lines)).rstrip())
        label = f"{_relpath(code.co_filename)}:{line} {qual.rsplit('.', 1)[-1]}"
        return f'<a href="#{self.cited[key][0]}"><code>{html.escape(label)}</code></a>'

    def computed(self, name):
        """'computed by <the function of POINT_FUNCTIONS>' for a point name."""
        fn = computed_by(name, self.decoder_kind)
        return f"computed by {self.cite(fn)}" if fn is not None else ""

    def doc(self, obj, paragraphs=1):
        """obj's docstring (its first `paragraphs`), as the page shows it, citing obj."""
        text = "\n\n".join((inspect.getdoc(obj) or "").split("\n\n")[:paragraphs])
        cite = self.cite(obj) if not inspect.ismodule(obj) else f"<code>{html.escape(_relpath(obj.__file__))}</code>"
        return f'<div class="doc">{_code_spans(text)}<div class="cite">{cite}</div></div>'

    def sources(self):
        out = ['<section id="source"><h2>The code cited on this page</h2>']
        for anchor, label, src in sorted(self.cited.values(), key=lambda c: c[1]):
            out.append(f'<details class="src" id="{anchor}"><summary><code>{html.escape(label)}</code></summary>'
                       f'<pre>{html.escape(src)}</pre></details>')
        return "\n".join(out + ["</section>"])


def _relpath(filename):
    p = Path(filename).resolve()
    try:
        return p.relative_to(PACKAGE_ROOT).as_posix()
    except ValueError:
        return p.name


def _code_spans(text):
    """Escape a docstring; ``x`` and `x` become <code>."""
    t = html.escape(text)
    return re.sub(r"``(.+?)``|`([^`\n]+)`", lambda m: f"<code>{m.group(1) or m.group(2)}</code>", t)


def _num(x):
    return "" if x is None else f"{x:.4g}"


def _stats_cells(p):
    s = p.stats
    return "".join(f'<td class="n">{_num(s.get(k))}</td>' for k in ("mean", "std", "min", "max"))


def picture(p, grid=None, tile=20):
    """A Point's channels as an <img> (spatial points only), each channel shown about `tile` px wide."""
    ch = p.channels
    if ch is None:
        return ""
    if ch.ndim == 2:                                                  # [N, c] pixels as tokens
        if grid is None or grid[0] * grid[1] != ch.shape[0]:
            return ""
        ch = ch.T.reshape(ch.shape[1], *grid)
    t = _tiles(ch)
    scale = max(1, tile // min(ch.shape[2], 32))
    return (f'<img class="pix" alt="{html.escape(p.name)} channels" src="{png(t)}" '
            f'width="{t.shape[1] * scale}" height="{t.shape[0] * scale}">')


def table(head, rows, cls=""):
    h = "".join(f"<th>{x}</th>" for x in head)
    # a table wider than the page (one column per token) scrolls inside its box instead of widening the page
    return f'<div class="wide"><table class="{cls}"><tr>{h}</tr>' + "".join(rows) + "</table></div>"


def points_table(page, points, grid_of=lambda name: None):
    rows = []
    for p in points:
        rows.append(f"<tr><td><code>{html.escape(p.name)}</code></td><td>{list(p.shape)}</td>{_stats_cells(p)}"
                    f'<td>{picture(p, grid_of(p.name))}</td><td class="where">{page.computed(p.name)}</td></tr>')
    return table(["point", "shape", "mean", "std", "min", "max", f"channels (first {CHANNELS}, each scaled to its "
                   "own range)", "code"], rows)
