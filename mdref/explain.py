"""`mdref explain`: one self-contained HTML page that walks a prompt through the pipeline, tokens to pixels, and the
per-token cross-attention maps the page is built from.

    pairs = mdref.explain.cross_attention_maps(pipe, "a red circle", seed=0)   # [(token string, map [H, W]), ...]
    page = mdref.explain.explain_page(pipe, "a red circle", seed=0)           # str: the whole HTML page

The explainer sits beside the model files, not inside them. It runs the pipeline once under a trace that keeps a
summary of every recorded point and where in the code it was recorded, and asks for the on-request points
``<block>.attn2.probs`` (`mdref.unet.attention_probs`: the weight each pixel's query gives each text token, per
head). Each section's explanation is the docstring of the code that ran (inspect), and each layer is cited by
module, function and line, so the page holds no second copy of prose to drift.

How the cross-attention maps are made: `attention_maps`.
"""

from __future__ import annotations

import ast
import base64
import html
import inspect
import io
import re
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, pipeline, sampler, text_encoder, tokenizer, unet
from . import decoder as decoder_math
from .io.safetensors import flatten
from .trace import Trace, recording

__all__ = ["AttentionMaps", "Explanation", "cross_attention_maps", "attention_maps", "block_maps", "explain",
           "explain_page", "render_page", "prompt_tokens", "PROBS"]

PROBS = ".attn2.probs"                          # the suffix of the on-request cross-attention points
KEEP = ("tokens", "text_embeddings", "noise", "latents.x0", "image")   # points the page needs whole
CHANNELS = 8                                    # channels of a point the page pictures
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


# ---- recording: a summary and a code location per point ------------------------------------------------------
@dataclass
class Where:
    """Where a point was recorded: the function holding the record call (`code`, a code object, and `line`), and
    the function that computed the array when the call's argument is a call to one (`computed_by`, or None)."""
    code: object
    line: int
    computed_by: object = None


@dataclass
class Point:
    """One recorded point: shape, dtype, mean / std / min / max, where it was recorded, a few channels of batch
    row 0 for a picture (`channels`: [c, h, w], or [N, c] pixels-as-tokens) and per-token norms of [B, T, D]."""
    name: str
    shape: tuple
    dtype: str
    stats: dict
    where: Where | None
    channels: np.ndarray | None = None
    norms: np.ndarray | None = None


class Recorder(Trace):
    """A trace that keeps a `Point` per recorded name (and the whole array only for KEEP and the probabilities),
    and asks for the on-request cross-attention probabilities of every UNet block."""

    def __init__(self, max_channels=CHANNELS):
        super().__init__(None, on_request=f"unet.*{PROBS}")
        self.points = {}
        self.max_channels = max_channels

    def add(self, name, x):
        name = self.unique(name)
        a = np.asarray(x)
        keep = name.split("#")[0] in KEEP or name.split("#")[0].endswith(PROBS)
        self.arrays[name] = np.array(a, copy=True) if keep else None
        p = Point(name, tuple(a.shape), str(a.dtype), _stats(a), _caller())
        c = self.max_channels
        if a.ndim == 4 and a.dtype.kind == "f":
            p.channels = np.array(a[0, :c], copy=True)                          # [c, h, w]
        elif a.ndim == 3 and a.dtype.kind == "f" and name.startswith("unet."):
            p.channels = np.array(a[0, :, :c], copy=True)                       # [N, c] pixels as tokens
        if a.ndim == 3 and a.dtype.kind == "f" and name.startswith("text_encoder."):
            p.norms = np.linalg.norm(a[0].astype(np.float64), axis=-1)          # [T]
        self.points[name] = p


def _stats(a):
    if a.size == 0 or a.dtype.kind not in "fiu":
        return {}
    s = {"min": float(a.min()), "max": float(a.max())}
    if a.dtype.kind == "f":
        s.update(mean=float(a.mean(dtype=np.float64)), std=float(a.std(dtype=np.float64)))
    return s


_CALLS = {}


def _record_calls(filename):
    """The record(...) / record_on_request(...) calls of a source file: [(first line, last line, call node)]."""
    if filename not in _CALLS:
        try:
            tree = ast.parse(Path(filename).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            tree = ast.Module(body=[], type_ignores=[])
        _CALLS[filename] = [(n.lineno, n.end_lineno, n) for n in ast.walk(tree) if isinstance(n, ast.Call)
                            and isinstance(n.func, ast.Name) and n.func.id in ("record", "record_on_request")]
    return _CALLS[filename]


def _caller():
    """The frame that called record (the first outside mdref.trace and this module) as a Where."""
    f = sys._getframe(1)
    while f is not None and f.f_globals.get("__name__") in ("mdref.trace", __name__):
        f = f.f_back
    if f is None:
        return None
    where = Where(f.f_code, f.f_lineno)
    spans = [(end - start, call) for start, end, call in _record_calls(f.f_code.co_filename)
             if start <= f.f_lineno <= end]
    if spans:
        call = min(spans, key=lambda s: s[0])[1]
        arg = call.args[1] if len(call.args) > 1 else None
        arg = arg.body if isinstance(arg, ast.Lambda) else arg
        if isinstance(arg, ast.Call):
            fn = arg.func
            if isinstance(fn, ast.Name):
                obj = f.f_globals.get(fn.id)
            elif isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name):
                obj = getattr(f.f_globals.get(fn.value.id), fn.attr, None)
            else:
                obj = None
            where.computed_by = obj if inspect.isfunction(obj) else None
    return where


# ---- tokens ---------------------------------------------------------------------------------------------------
def prompt_tokens(tok, ids):
    """One row of token ids -> [(position, id, string, kind)] for every position; kind is 'start' (BOS),
    'token', 'end' (the first EOS after the start) or 'pad' (every position after the end)."""
    rows, ended = [], False
    for i, t in enumerate(int(x) for x in ids):
        if ended:
            kind = "pad"
        elif i == 0 and t == tok.bos_id:
            kind = "start"
        elif t == tok.eos_id:
            kind, ended = "end", True
        else:
            kind = "token"
        text = tok.backend.decode([t], skip_special_tokens=False).replace(tokenizer.END_OF_WORD, "").strip()
        rows.append((i, t, text or tok.backend.id_to_token(t) or "", kind))
    return rows


# ---- cross-attention maps -------------------------------------------------------------------------------------
@dataclass
class AttentionMaps:
    """Cross-attention maps of one prompt, tokens in prompt order (start and end tokens included, padding not).

    `blocks`: {block name: float64 [n, H, W]}, `resolutions`: {(h, w) of the attention grid: [n, H, W]},
    `overall`: [n, H, W]; every map at image resolution and summing to 1 (all zeros for a token that gets no
    weight anywhere, which only ReLU attention can do). `share`: {block: [n]} the mean weight each token gets."""
    tokens: list
    ids: list
    blocks: dict
    grids: dict                    # block name -> (h, w) of its attention grid
    resolutions: dict
    overall: np.ndarray
    share: dict

    def pairs(self, maps=None):
        """[(token string, map [H, W])] of `maps` ([n, H, W]; default the overall maps)."""
        maps = self.overall if maps is None else maps
        return [(t, m) for t, m in zip(self.tokens, maps)]


def _normalised(m):
    total = m.sum(axis=(-2, -1), keepdims=True)
    return np.divide(m, total, out=np.zeros_like(m), where=total > 0)


def block_maps(probs, n_tokens, image_size):
    """One block's cross-attention probabilities [steps or B, heads, N, T] (N = h*w pixels of its grid, the image's
    aspect) -> (maps [n_tokens, H, W] for tokens 0 .. n_tokens-1: the weight averaged over heads and over the
    first axis, upsampled nearest to the image and normalised to sum 1; share [n_tokens]; grid (h, w))."""
    probs = np.asarray(probs, dtype=np.float64)
    H, W = image_size
    N = probs.shape[2]
    h = int(round((N * H / W) ** 0.5))
    w = N // h if h else 0
    if h * w != N or H % h or W % w:
        raise ValueError(f"attention over {N} pixels does not tile a {H}x{W} image")
    p = probs.mean(axis=(0, 1))[:, :n_tokens]                                   # [N, n]
    grid = p.T.reshape(n_tokens, h, w)                                          # [n, h, w]
    up = np.repeat(np.repeat(grid, H // h, axis=1), W // w, axis=2)             # [n, H, W]
    return _normalised(up), p.mean(axis=0), (h, w)


def attention_maps(trace, n_tokens, image_size, tokens=(), ids=()):
    """Per-token maps from the ``<block>.attn2.probs`` points of a trace: in each block the probabilities averaged
    over heads (and sampling steps, the repeats ``name#k``) give each token a weight per pixel of the block's grid,
    upsampled (nearest) to the image and normalised to sum to 1 (block_maps); a resolution's map is the mean of its
    blocks' maps, the overall map the mean of all blocks' maps, each normalised again. A token's share is the mean
    weight it receives over pixels and heads. Raises ValueError when the trace holds none (no cross-attention)."""
    groups = {}
    for name in trace.names():
        base = name.split("#")[0]
        if base.endswith(PROBS) and trace.arrays[name] is not None:
            groups.setdefault(base[: -len(PROBS)], []).append(trace.arrays[name][:1])   # batch row 0
    if not groups:
        raise ValueError("the UNet recorded no cross-attention probabilities (it has no transformer blocks)")
    blocks, share, grids, by_res = {}, {}, {}, {}
    for block, arrays in groups.items():
        blocks[block], share[block], grids[block] = block_maps(np.concatenate(arrays), n_tokens, image_size)
        by_res.setdefault(grids[block], []).append(blocks[block])
    resolutions = {g: _normalised(np.mean(ms, axis=0)) for g, ms in sorted(by_res.items(), reverse=True)}
    overall = _normalised(np.mean(list(blocks.values()), axis=0))
    return AttentionMaps(list(tokens), list(ids), blocks, grids, resolutions, overall, share)


def _run(pipe, prompt, seed, noise, steps):
    """One pipeline run under a Recorder: (Result, Recorder, seconds)."""
    if not isinstance(prompt, str):
        raise pipeline.InputError("prompt", f"must be one str, found {type(prompt).__name__}")
    t0 = time.perf_counter()
    with recording(Recorder()) as rec:
        result = pipe.run(prompt, seed=seed, noise=noise, steps=steps)
    return result, rec, time.perf_counter() - t0


def _maps_of(pipe, result, rec):
    rows = [r for r in prompt_tokens(pipe.tokenizer, result.token_ids[0]) if r[3] != "pad"]
    return attention_maps(rec, len(rows), result.image.shape[2:], [r[2] for r in rows], [r[1] for r in rows])


def cross_attention_maps(pipe, prompt, seed=0, noise=None, *, steps=1, per_block=False):
    """Per prompt token, in prompt order (start and end tokens included, padding not): (token string, map), each
    map float64 [H, W] at image resolution summing to 1, the cross-attention of one run averaged over heads and
    blocks (see attention_maps). per_block=True returns (pairs, {block name: pairs}) instead."""
    result, rec, _ = _run(pipe, prompt, seed, noise, steps)
    maps = _maps_of(pipe, result, rec)
    if per_block:
        return maps.pairs(), {b: maps.pairs(m) for b, m in maps.blocks.items()}
    return maps.pairs()


# ---- the explanation: one run, every fact the page shows ------------------------------------------------------
@dataclass
class Explanation:
    """What the page shows: the arguments, the pipeline's Result, the Recorder, the attention maps, timings."""
    pipe: object
    prompt: str
    seed: int
    noise_given: bool
    steps: int
    result: object
    recorder: Recorder
    maps: AttentionMaps
    run_s: float
    timings: dict = field(default_factory=dict)


def explain(pipe, prompt, seed=0, noise=None, steps=1):
    """Run the pipeline once under a Recorder and collect what the page shows (an Explanation)."""
    result, rec, run_s = _run(pipe, prompt, seed, noise, steps)
    return Explanation(pipe, prompt, seed, noise is not None, steps, result, rec, _maps_of(pipe, result, rec),
                       run_s, dict(result.timings))


def explain_page(pipe, prompt, seed=0, noise=None, steps=1):
    """The whole HTML page for one prompt (a str): explain, then render_page."""
    t0 = time.perf_counter()
    e = explain(pipe, prompt, seed=seed, noise=noise, steps=steps)
    return render_page(e, started=t0)


# ---- pictures -------------------------------------------------------------------------------------------------
VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)


def _png(a):
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


def _heat_rgba(m):
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


class _Page:
    """HTML pieces and the functions the page cites (their sources are appended at the end)."""

    def __init__(self):
        self.cited = {}                               # key -> (anchor, label, source text)

    def cite(self, obj, line=None):
        """A function / method / code object -> a link to its source at the end of the page, labelled
        'mdref/unet.py:29 resnet' (or with `line`, the line of a call inside it: 'mdref/unet.py:97 in ...')."""
        if obj is None:
            return ""
        code = getattr(obj, "__code__", obj)
        if not hasattr(code, "co_filename"):
            return ""
        qual = getattr(obj, "__qualname__", None) or getattr(code, "co_qualname", code.co_name)
        module = getattr(obj, "__module__", None) or _module_of(code.co_filename)
        try:
            lines, first = inspect.getsourcelines(obj)
        except (OSError, TypeError):
            lines, first = [], code.co_firstlineno
        key = (code.co_filename, first)
        if key not in self.cited:
            anchor = "src-" + re.sub(r"[^A-Za-z0-9]+", "-", f"{module}-{qual}").strip("-")
            self.cited[key] = (anchor, f"{_relpath(code.co_filename)}:{first} {module}.{qual}",
                               textwrap.dedent("".join(lines)).rstrip() if lines else "")
        anchor = self.cited[key][0]
        short = qual.rsplit(".", 1)[-1] if "." in qual and "<" not in qual else qual
        label = (f"{_relpath(code.co_filename)}:{first} {short}" if line is None
                 else f"{_relpath(code.co_filename)}:{line} in {short}")
        return f'<a href="#{anchor}"><code>{html.escape(label)}</code></a>'

    def where(self, w):
        """'recorded at file:line in F, computed by G (file:line)' for a Where."""
        if w is None:
            return ""
        text = f"recorded at {self.cite(w.code, w.line)}"
        if w.computed_by is not None:
            text += f"<br>computed by {self.cite(w.computed_by)}"
        return text

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


def _module_of(filename):
    rel = _relpath(filename)
    return rel[:-3].replace("/", ".") if rel.endswith(".py") else rel


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


def _picture(p, grid=None, tile=20):
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
    return (f'<img class="pix" alt="{html.escape(p.name)} channels" src="{_png(t)}" '
            f'width="{t.shape[1] * scale}" height="{t.shape[0] * scale}">')


def _table(head, rows, cls=""):
    h = "".join(f"<th>{x}</th>" for x in head)
    # a table wider than the page (one column per token) scrolls inside its box instead of widening the page
    return f'<div class="wide"><table class="{cls}"><tr>{h}</tr>' + "".join(rows) + "</table></div>"


def _points_table(page, points, grid_of=lambda name: None):
    rows = []
    for p in points:
        rows.append(f"<tr><td><code>{html.escape(p.name)}</code></td><td>{list(p.shape)}</td>{_stats_cells(p)}"
                    f'<td>{_picture(p, grid_of(p.name))}</td><td class="where">{page.where(p.where)}</td></tr>')
    return _table(["point", "shape", "mean", "std", "min", "max", f"channels (first {CHANNELS}, each scaled to its "
                   "own range)", "code"], rows)


def render_page(e, started=None):
    """An Explanation -> the page (str): six sections, tokens to pixels, then the code cited."""
    t0 = time.perf_counter()
    page, pipe, res, rec = _Page(), e.pipe, e.result, e.recorder
    pts = rec.points
    tok = pipe.tokenizer
    rows = prompt_tokens(tok, res.token_ids[0])
    shown = [r for r in rows if r[3] != "pad"]
    H, W = res.image.shape[2:]
    image_uri = _png(res.pixels[0])
    style = CSS + f".over{{background-image:url({image_uri});height:{84 * H // W}px}}\n"
    body = []

    def section(sid, title, *parts):
        body.append(f'<section id="{sid}"><h2>{title}</h2>' + "\n".join(parts) + "</section>")

    # 1. tokens
    pads = [r for r in rows if r[3] == "pad"]
    trs = [f'<tr class="{k}"><td class="n">{i}</td><td><code>{html.escape(s)}</code></td><td class="n">{t}</td>'
           f"<td>{k}</td></tr>" for i, t, s, k in shown]
    if pads:
        trs.append(f'<tr class="pad"><td class="n">{pads[0][0]}&ndash;{pads[-1][0]}</td><td><code>'
                   f'{html.escape(tok.pad_token)}</code></td><td class="n">{tok.pad_id}</td><td>pad '
                   f"&times; {len(pads)}</td></tr>")
    same = " (the end token's id: the end is the first one)" if tok.pad_id == tok.eos_id else ""
    section("tokens", "1. The prompt as tokens",
            page.doc(tokenizer, 1), page.doc(tokenizer.Tokenizer.__call__),
            f"<p>Prompt <code>{html.escape(e.prompt)}</code>: {len(shown)} tokens of {tok.max_length} positions. "
            f"This tokenizer pads with <code>{html.escape(tok.pad_token)}</code> = id {tok.pad_id}{same}; "
            f"start <code>{html.escape(tok.bos_token)}</code> = {tok.bos_id}, end "
            f"<code>{html.escape(tok.eos_token)}</code> = {tok.eos_id}.</p>",
            _table(["position", "token", "id", "kind"], trs, "tokens"),
            f"<p>Recorded as <code>tokens</code> {list(pts['tokens'].shape)} in {page.where(pts['tokens'].where)}"
            f"</p>" if "tokens" in pts else "")

    # 2. text encoder
    te = [p for n, p in pts.items() if n.startswith("text_encoder.") and p.norms is not None]
    n = len(shown)
    trs = []
    for p in te:
        v = p.norms
        top = max(v[:n].max(), v[n:].mean() if len(v) > n else 0) or 1
        cells = "".join(f'<td class="n" style="background:rgba(106,143,216,{v[i] / top * 0.6:.2f})">{v[i]:.3g}</td>'
                        for i in range(n))
        pad = f'<td class="n">{v[n:].mean():.3g}</td>' if len(v) > n else "<td></td>"
        trs.append(f'<tr><td><code>{html.escape(p.name)}</code><div class="where">{page.where(p.where)}</div>'
                   f"</td>{cells}{pad}</tr>")
    emb = res.text_embeddings
    section("text-encoder", "2. The text encoder",
            page.doc(text_encoder, 2), page.doc(text_encoder.encoder_layer),
            "<p>Per layer, the L2 norm of each token's activation (row shade: relative to the row's largest).</p>",
            _table(["point"] + [f"<code>{html.escape(r[2])}</code>" for r in shown] + ["pad (mean)"], trs),
            f"<p>Final embeddings <code>text_embeddings</code>: shape {list(emb.shape)} ({emb.dtype}), what every "
            f"cross-attention of the UNet reads.</p>")

    # 3. noise and timesteps
    cfg = pipe.scheduler
    abar = sampler.alphas_cumprod(cfg, np.float64)
    fn = sampler.sample_euler if cfg.sampler == "euler" else sampler.sample_x0
    clause = _clause(inspect.getdoc(sampler.predict_x0) or "", cfg.prediction_type)
    noise = pts.get("noise")
    section("noise", "3. The noise and the timesteps",
            page.doc(sampler, 1), page.doc(fn), page.doc(sampler.predict_x0),
            f"<p>This model: sampler <code>{cfg.sampler}</code>, prediction type <code>{cfg.prediction_type}"
            f"</code>" + (f"; its clause of predict_x0: <code>{html.escape(clause)}</code>" if clause else "")
            + ".</p>",
            _table(["step", "timestep t", "abar_t", "sqrt(abar_t)", "sqrt(1 - abar_t)"],
                   [f'<tr><td class="n">{k}</td><td class="n">{t}</td><td class="n">{abar[t]:.6g}</td>'
                    f'<td class="n">{np.sqrt(abar[t]):.6g}</td><td class="n">{np.sqrt(1 - abar[t]):.6g}</td></tr>'
                    for k, t in enumerate(res.timesteps)]),
            f"<p>Noise: {'the --noise array given' if e.noise_given else f'PCG64({e.seed}).standard_normal'}, "
            f"shape {list(res.noise.shape)}.</p>",
            _points_table(page, [noise]) if noise else "")

    # 4. the UNet
    section("unet", "4. The UNet", page.doc(unet, 1), *_unet_parts(page, pipe, pts))

    # 5. cross-attention
    section("attention", "5. Cross-attention maps per prompt token",
            page.doc(unet.attention), page.doc(unet.attention_probs), page.doc(attention_maps),
            *_attention_parts(page, e.maps, pts, H, W))

    # 6. x0, decoder, image
    x0 = pts.get("latents.x0")
    dec = [p for nm, p in pts.items() if nm.startswith("decoder.")]
    img = res.image
    clipped = int((img < -1).sum() + (img > 1).sum())
    err = np.abs(res.pixels[0].astype(np.float64) / 255 - np.clip((img[0].transpose(1, 2, 0) + 1) / 2, 0, 1)).max()
    kind = pipe.decoder.config.kind
    section("decoder", "6. x0, the decoder and the image",
            page.doc(pipeline.Pipeline.decode), page.doc(decoder_math, 1),
            page.doc(decoder_math.kl_decode if kind == "kl" else decoder_math.taesd_decode),
            "<h3>x0, the clean latent</h3>", _points_table(page, [x0]) if x0 else "",
            f"<p>The decoder sees <code>x0 / {pipe.decoder.scaling_factor:.6g} + {pipe.decoder.shift_factor or 0}"
            "</code>.</p><h3>The decoder's stages</h3>", _points_table(page, dec),
            "<h3>The image and its 8-bit conversion</h3>", page.doc(pipeline.to_pixels),
            f'<p><img class="pix" alt="the final image" src="{image_uri}" width="{max(256, W)}" '
            f'height="{max(256, W) * H // W}"></p>'
            f"<p>{H}x{W} pixels; {clipped} of {img.size} decoder outputs lay outside [-1, 1] and were clipped; the "
            f"8-bit rounding moved a value by at most {err * 255:.3f} of a level.</p>")

    build_s = time.perf_counter() - (started if started is not None else t0)
    d = pipe.describe()
    untrained = " (UNTRAINED seeded weights)" if pipe.untrained else ""
    header = (f"<h1>mdref explain: <code>{html.escape(e.prompt)}</code></h1>"
              f"<p>Model <code>{html.escape(str(pipe.source))}</code>{untrained}"
              f", {d['parameters']['total']:,} parameters, {d['dtype']}; seed {e.seed if not e.noise_given else '-'}"
              f", {e.steps} step(s); mdref {__version__}. Pipeline run {e.run_s * 1000:.0f} ms "
              f"(" + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in e.timings.items()) + ")"
              f"; page built in {build_s:.2f} s.</p>"
              '<nav><a href="#tokens">1 tokens</a><a href="#text-encoder">2 text encoder</a><a href="#noise">3 noise'
              '</a><a href="#unet">4 UNet</a><a href="#attention">5 cross-attention</a><a href="#decoder">6 decoder'
              '</a><a href="#source">code</a></nav>'
              f'<div class="first"><img class="pix" alt="the final image" src="{image_uri}" width="160" '
              f'height="{160 * H // W}"><div><b>Look first</b> at <a href="#attention">section 5</a>: where each '
              "word of the prompt looked in the picture. Then follow the run from the tokens (1) to the pixels (6); "
              "every section quotes the docstring of the code that ran and links to that code "
              '(<a href="#source">at the end</a>).</div></div>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>mdref explain: {html.escape(e.prompt)}</title><style>{style}</style></head><body>"
            + header + "\n".join(body) + page.sources() + "</body></html>\n")


def _clause(doc, prediction_type):
    """The part of predict_x0's docstring that names `prediction_type` ('sample: the output itself')."""
    flat = " ".join(doc.split())
    m = re.search(rf"\b{re.escape(prediction_type)}\b[^:;]*(?:\([^)]*\))?[^:;]*:\s*([^;]*)", flat)
    return f"{prediction_type}: {m.group(1).rstrip('.')}" if m else ""


KIND = {"none": "no transformer", "cross": "cross-only (attn2 + FFN)", "full": "full (attn1 + attn2 + FFN)"}


def _unet_parts(page, pipe, pts):
    spec = pipe.unet.spec
    flat = flatten(pipe.unet.params)
    stages = spec.stages
    trs, grids = [], {}
    for st in stages:
        count = sum(int(np.size(v)) for k, v in flat.items() if k.startswith(st.name + "."))
        first = pts.get(f"unet.{st.name}.resnets.0")
        grid = first.shape[2:] if first is not None and len(first.shape) == 4 else None
        grids[st.name] = grid
        t, resnets = st.transformer, st.of("resnet")
        kind = KIND[t.kind] + (", attn1 reads the text" if t.only_cross else "") if t else KIND["none"]
        resample = {"downsample": "down", "upsample": "up"}.get(st.layers[-1].kind, "")
        trs.append(f"<tr><td><code>{st.name}</code></td><td>{page.cite(unet.block)}</td><td>{kind}</td>"
                   f'<td class="n">{st.channels}</td><td class="n">{t.heads if t else ""}</td>'
                   f'<td class="n">{t.depth if t else ""}</td>'
                   f"<td>{' '.join(f'{r.c_in}&rarr;{r.c_out}' for r in resnets)}</td>"
                   f"<td>{'yes' if resnets[0].spec.separable else ''}</td><td>{resample}</td>"
                   f"<td>{'x'.join(map(str, grid)) if grid else ''}</td><td class=\"n\">{count:,}</td></tr>")
    rest = sum(int(np.size(v)) for k, v in flat.items() if not k.startswith(tuple(st.name + "." for st in stages)))
    trs.append(f'<tr><td colspan="10">time embedding, conv_in, conv_norm_out, conv_out</td><td class="n">{rest:,}'
               f"</td></tr>")
    arch = _table(["block", "code", "kind", "channels", "heads", "transformer layers", "ResNets (in&rarr;out)",
                   "separable", "resample", "grid h x w", "parameters"], trs)
    t = next((st.transformer for st in stages if st.transformer), None)
    parts = [page.doc(unet.unet), "<h3>The architecture</h3>", arch,
             f"<p>{pipe.unet.num_parameters():,} parameters" + (
                 f"; weighting <code>{t.weighting}</code>, shared K/V <code>{t.shared_kv}</code>, FFN "
                 f"<code>{t.ff_activation}</code>" if t else "") + f", context width {spec.context_dim}.</p>",
             "<h3>Every recorded point</h3>"]

    def grid_of(name):
        m = re.match(r"unet\.((?:down|up)_blocks\.\d+|mid_block)\.", name)
        return grids.get(m.group(1)) if m else None

    groups = {}
    for nm, p in pts.items():
        if nm.startswith("unet.") and not nm.split("#")[0].endswith(PROBS):
            m = re.match(r"unet\.((?:down|up)_blocks\.\d+|mid_block)", nm)
            groups.setdefault(m.group(1) if m else "unet", []).append(p)
    for g, ps in groups.items():
        parts.append(f"<details><summary><b><code>{g}</code></b> ({len(ps)} points)</summary>"
                     + _points_table(page, ps, grid_of) + "</details>")
    return parts


def _attention_figure(m, step, label, caption, cls):
    """One token's map over the final image: the map subsampled by `step` (it is constant on step x step cells),
    as an RGBA heat picture laid over the image (CSS background)."""
    small = m[::step[0], ::step[1]]
    return (f'<figure><div class="over"><img class="{cls} pix" alt="{html.escape(label)}" '
            f'src="{_png(_heat_rgba(small))}"></div><figcaption><code>{html.escape(label)}</code><br>'
            f"{caption}</figcaption></figure>")


def _attention_parts(page, maps, pts, H, W):
    n = len(maps.tokens)
    finest = max(maps.grids.values())
    mean_share = np.mean([maps.share[b] for b in maps.blocks], axis=0)

    def row(ms, grid, cls, share):
        step = (H // grid[0], W // grid[1])
        figs = [_attention_figure(ms[i], step, maps.tokens[i],
                                  f"{share[i] * 100:.1f}% &middot; {ms[i].max() * H * W:.1f}&times;",
                                  cls) for i in range(n)]
        return '<div class="maps">' + "".join(figs) + "</div>"

    parts = [f"<p>{n} tokens (start and end included). Each picture is one token's map over the final image: "
             "colour and opacity by the map's value relative to its own peak. Under each: the token's share (the "
             "mean weight it receives over pixels and heads) and the map's peak against a uniform map.</p>",
             f"<h3>All {len(maps.blocks)} cross-attention blocks, averaged</h3>",
             row(maps.overall, finest, "token-map", mean_share)]
    for grid, ms in maps.resolutions.items():
        blocks = [b for b, g in maps.grids.items() if g == grid]
        share = np.mean([maps.share[b] for b in blocks], axis=0)
        parts += [f"<h3>Attention grid {grid[0]}x{grid[1]}: {len(blocks)} blocks averaged</h3>",
                  row(ms, grid, "res-map", share)]
    parts.append(f"<details><summary><b>Per block</b> ({len(maps.blocks)} blocks)</summary>")
    for b, ms in maps.blocks.items():
        p = pts.get(b + PROBS)
        parts += [f"<h3><code>{html.escape(b)}</code>, grid {maps.grids[b][0]}x{maps.grids[b][1]}"
                  + (f", probabilities {list(p.shape)} recorded in {page.where(p.where)}" if p else "") + "</h3>",
                  row(ms, maps.grids[b], "block-map", maps.share[b])]
    parts.append("</details>")
    return parts
