"""The page of `mdref explain`: six sections, tokens to pixels, then the code cited. Each section quotes the
docstring of the code that ran and cites it by file and line (docs/explain.md)."""

from __future__ import annotations

import html
import inspect
import re
import time

import numpy as np

from .. import __version__, pipeline, sampler, text_encoder, tokenizer, unet
from .. import decoder as decoder_math
from ..formats.safetensors import flatten
from .maps import PROBS, attention_maps, prompt_tokens
from .recorder import explain
from .widgets import CSS, Page, heat_rgba, png, points_table, table

__all__ = ["explain_page", "render_page"]

KIND = {"none": "no transformer", "cross": "cross-only (attn2 + FFN)", "full": "full (attn1 + attn2 + FFN)"}
SECTIONS = [("tokens", "1 tokens"), ("text-encoder", "2 text encoder"), ("noise", "3 noise"), ("unet", "4 UNet"),
            ("attention", "5 cross-attention"), ("decoder", "6 decoder"), ("source", "code")]


def explain_page(pipe, prompt, seed=0, noise=None, steps=1):
    """The whole HTML page for one prompt (a str): explain, then render_page."""
    t0 = time.perf_counter()
    return render_page(explain(pipe, prompt, seed=seed, noise=noise, steps=steps), started=t0)


def render_page(e, started=None):
    """An Explanation -> the page (str): six sections, tokens to pixels, then the code cited."""
    t0 = time.perf_counter()
    page = Page(e.pipe.decoder.config.kind)
    H, W = e.result.image.shape[2:]
    image_uri = png(e.result.pixels[0])
    style = CSS + f".over{{background-image:url({image_uri});height:{84 * H // W}px}}\n"
    body = [tokens_section(page, e), text_encoder_section(page, e), noise_section(page, e), unet_section(page, e),
            attention_section(page, e), decoder_section(page, e, image_uri)]
    build_s = time.perf_counter() - (started if started is not None else t0)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>mdref explain: {html.escape(e.prompt)}</title><style>{style}</style></head><body>"
            + header(e, image_uri, build_s) + "\n".join(body) + page.sources() + "</body></html>\n")


def section(sid, title, *parts):
    return f'<section id="{sid}"><h2>{title}</h2>' + "\n".join(parts) + "</section>"


def header(e, image_uri, build_s):
    """The title, the run's facts, the navigation and where to look first."""
    pipe, (H, W) = e.pipe, e.result.image.shape[2:]
    d = pipe.describe()
    untrained = " (UNTRAINED seeded weights)" if pipe.untrained else ""
    timings = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in e.timings.items())
    return (f"<h1>mdref explain: <code>{html.escape(e.prompt)}</code></h1>"
            f"<p>Model <code>{html.escape(str(pipe.source))}</code>{untrained}, {d['parameters']['total']:,} "
            f"parameters, {d['dtype']}; seed {e.seed if not e.noise_given else '-'}, {e.steps} step(s); mdref "
            f"{__version__}. Pipeline run {e.run_s * 1000:.0f} ms ({timings}); page built in {build_s:.2f} s.</p>"
            "<nav>" + "".join(f'<a href="#{sid}">{label}</a>' for sid, label in SECTIONS) + "</nav>"
            f'<div class="first"><img class="pix" alt="the final image" src="{image_uri}" width="160" '
            f'height="{160 * H // W}"><div><b>Look first</b> at <a href="#attention">section 5</a>: where each '
            "word of the prompt looked in the picture. Then follow the run from the tokens (1) to the pixels (6); "
            "every section quotes the docstring of the code that ran and links to that code "
            '(<a href="#source">at the end</a>).</div></div>')


def tokens_section(page, e):
    """1. The prompt's token ids, one row per position (the padding as one row)."""
    tok, pts = e.pipe.tokenizer, e.recorder.points
    rows = prompt_tokens(tok, e.result.token_ids[0])
    shown, pads = [r for r in rows if r[3] != "pad"], [r for r in rows if r[3] == "pad"]
    trs = [f'<tr class="{k}"><td class="n">{i}</td><td><code>{html.escape(s)}</code></td><td class="n">{t}</td>'
           f"<td>{k}</td></tr>" for i, t, s, k in shown]
    if pads:
        trs.append(f'<tr class="pad"><td class="n">{pads[0][0]}&ndash;{pads[-1][0]}</td><td><code>'
                   f'{html.escape(tok.pad_token)}</code></td><td class="n">{tok.pad_id}</td><td>pad '
                   f"&times; {len(pads)}</td></tr>")
    same = " (the end token's id: the end is the first one)" if tok.pad_id == tok.eos_id else ""
    return section(
        "tokens", "1. The prompt as tokens", page.doc(tokenizer, 1), page.doc(tokenizer.Tokenizer.__call__),
        f"<p>Prompt <code>{html.escape(e.prompt)}</code>: {len(shown)} tokens of {tok.max_length} positions. "
        f"This tokenizer pads with <code>{html.escape(tok.pad_token)}</code> = id {tok.pad_id}{same}; "
        f"start <code>{html.escape(tok.bos_token)}</code> = {tok.bos_id}, end "
        f"<code>{html.escape(tok.eos_token)}</code> = {tok.eos_id}.</p>",
        table(["position", "token", "id", "kind"], trs, "tokens"),
        f"<p>Recorded as <code>tokens</code> {list(pts['tokens'].shape)}, {page.computed('tokens')}</p>"
        if "tokens" in pts else "")


def text_encoder_section(page, e):
    """2. Per text-encoder point, the L2 norm of each token's activation."""
    shown = [r for r in prompt_tokens(e.pipe.tokenizer, e.result.token_ids[0]) if r[3] != "pad"]
    n, trs = len(shown), []
    for p in (p for name, p in e.recorder.points.items() if name.startswith("text_encoder.") and p.norms is not None):
        v = p.norms
        top = max(v[:n].max(), v[n:].mean() if len(v) > n else 0) or 1
        cells = "".join(f'<td class="n" style="background:rgba(106,143,216,{v[i] / top * 0.6:.2f})">{v[i]:.3g}</td>'
                        for i in range(n))
        pad = f'<td class="n">{v[n:].mean():.3g}</td>' if len(v) > n else "<td></td>"
        trs.append(f'<tr><td><code>{html.escape(p.name)}</code><div class="where">{page.computed(p.name)}</div>'
                   f"</td>{cells}{pad}</tr>")
    emb = e.result.text_embeddings
    return section(
        "text-encoder", "2. The text encoder", page.doc(text_encoder, 2), page.doc(text_encoder.encoder_layer),
        "<p>Per layer, the L2 norm of each token's activation (row shade: relative to the row's largest).</p>",
        table(["point"] + [f"<code>{html.escape(r[2])}</code>" for r in shown] + ["pad (mean)"], trs),
        f"<p>Final embeddings <code>text_embeddings</code>: shape {list(emb.shape)} ({emb.dtype}), what every "
        f"cross-attention of the UNet reads.</p>")


def noise_section(page, e):
    """3. The sampler, its timesteps with their schedule values, and the noise."""
    cfg, res = e.pipe.scheduler, e.result
    abar = sampler.alphas_cumprod(cfg, np.float64)
    fn = sampler.sample_euler if cfg.sampler == "euler" else sampler.sample_x0
    clause = _clause(inspect.getdoc(sampler.predict_x0) or "", cfg.prediction_type)
    noise = e.recorder.points.get("noise")
    rows = [f'<tr><td class="n">{k}</td><td class="n">{t}</td><td class="n">{abar[t]:.6g}</td>'
            f'<td class="n">{np.sqrt(abar[t]):.6g}</td><td class="n">{np.sqrt(1 - abar[t]):.6g}</td></tr>'
            for k, t in enumerate(res.timesteps)]
    return section(
        "noise", "3. The noise and the timesteps", page.doc(sampler, 1), page.doc(fn), page.doc(sampler.predict_x0),
        f"<p>This model: sampler <code>{cfg.sampler}</code>, prediction type <code>{cfg.prediction_type}</code>"
        + (f"; its clause of predict_x0: <code>{html.escape(clause)}</code>" if clause else "") + ".</p>",
        table(["step", "timestep t", "abar_t", "sqrt(abar_t)", "sqrt(1 - abar_t)"], rows),
        f"<p>Noise: {'the --noise array given' if e.noise_given else f'PCG64({e.seed}).standard_normal'}, "
        f"shape {list(res.noise.shape)}.</p>", points_table(page, [noise]) if noise else "")


def _clause(doc, prediction_type):
    """The part of predict_x0's docstring that names `prediction_type` ('sample: the output itself')."""
    flat = " ".join(doc.split())
    m = re.search(rf"\b{re.escape(prediction_type)}\b[^:;]*(?:\([^)]*\))?[^:;]*:\s*([^;]*)", flat)
    return f"{prediction_type}: {m.group(1).rstrip('.')}" if m else ""


def unet_section(page, e):
    """4. The UNet: its stage plan as a table (one row per block), then every recorded point, grouped by block."""
    pipe, pts = e.pipe, e.recorder.points
    spec = pipe.unet.spec
    flat = flatten(pipe.unet.params)
    grids = {}
    for st in spec.stages:                               # the attention grid of a block: its first ResNet's output
        first = pts.get(f"unet.{st.name}.{st.layers[0].name}")
        grids[st.name] = first.shape[2:] if first is not None and len(first.shape) == 4 else None
    trs = [_stage_row(page, st, grids[st.name], sum(int(np.size(v)) for k, v in flat.items()
                                                    if k.startswith(st.name + "."))) for st in spec.stages]
    rest = sum(int(np.size(v)) for k, v in flat.items() if not k.startswith(tuple(st.name + "." for st in spec.stages)))
    trs.append(f'<tr><td colspan="10">time embedding, conv_in, conv_norm_out, conv_out</td><td class="n">{rest:,}'
               f"</td></tr>")
    t = next((st.transformer for st in spec.stages if st.transformer), None)
    facts = (f"; weighting <code>{t.weighting}</code>, shared K/V <code>{t.shared_kv}</code>, FFN "
             f"<code>{t.ff_activation}</code>" if t else "")
    parts = [page.doc(unet, 1), page.doc(unet.unet), page.doc(unet.block), "<h3>The architecture</h3>",
             table(["block", "code", "kind", "channels", "heads", "transformer layers", "ResNets (in&rarr;out)",
                    "separable", "resample", "grid h x w", "parameters"], trs),
             f"<p>{pipe.unet.num_parameters():,} parameters{facts}, context width {spec.context_dim}.</p>",
             "<h3>Every recorded point</h3>"]
    groups = {}
    for name, p in pts.items():
        if name.startswith("unet.") and not name.split("#")[0].endswith(PROBS):
            groups.setdefault(_block_of(name) or "unet", []).append(p)
    for g, ps in groups.items():
        parts.append(f"<details><summary><b><code>{g}</code></b> ({len(ps)} points)</summary>"
                     + points_table(page, ps, lambda name: grids.get(_block_of(name))) + "</details>")
    return section("unet", "4. The UNet", *parts)


def _block_of(name):
    """The UNet block ("down_blocks.1", "mid_block", "up_blocks.0") a point name lies in, or None."""
    m = re.match(r"unet\.((?:down|up)_blocks\.\d+|mid_block)", name)
    return m.group(1) if m else None


def _stage_row(page, st, grid, count):
    """One row of the UNet's architecture table: a stage and the layers its layer list holds."""
    t, resnets = st.transformer, st.of("resnet")
    kind = KIND[t.kind] + (", attn1 reads the text" if t.only_cross else "") if t else KIND["none"]
    resample = {"downsample": "down", "upsample": "up"}.get(st.layers[-1].kind, "")
    return (f"<tr><td><code>{st.name}</code></td><td>{page.cite(unet.block)}</td><td>{kind}</td>"
            f'<td class="n">{st.channels}</td><td class="n">{t.heads if t else ""}</td>'
            f'<td class="n">{t.depth if t else ""}</td>'
            f"<td>{' '.join(f'{r.c_in}&rarr;{r.c_out}' for r in resnets)}</td>"
            f"<td>{'yes' if resnets and resnets[0].spec.separable else ''}</td><td>{resample}</td>"
            f"<td>{'x'.join(map(str, grid)) if grid else ''}</td><td class=\"n\">{count:,}</td></tr>")


def _attention_figure(m, step, label, caption, cls):
    """One token's map over the final image: the map subsampled by `step` (it is constant on step x step cells),
    as an RGBA heat picture laid over the image (CSS background)."""
    small = m[::step[0], ::step[1]]
    return (f'<figure><div class="over"><img class="{cls} pix" alt="{html.escape(label)}" '
            f'src="{png(heat_rgba(small))}"></div><figcaption><code>{html.escape(label)}</code><br>'
            f"{caption}</figcaption></figure>")


def attention_section(page, e):
    """5. The cross-attention maps: all blocks averaged, per attention grid, per block."""
    maps, pts, (H, W) = e.maps, e.recorder.points, e.result.image.shape[2:]
    n = len(maps.tokens)

    def row(ms, grid, cls, share):
        step = (H // grid[0], W // grid[1])
        return '<div class="maps">' + "".join(
            _attention_figure(ms[i], step, maps.tokens[i], f"{share[i] * 100:.1f}% &middot; "
                              f"{ms[i].max() * H * W:.1f}&times;", cls) for i in range(n)) + "</div>"

    parts = [page.doc(unet.attention), page.doc(unet.attention_probs), page.doc(attention_maps),
             f"<p>{n} tokens (start and end included). Each picture is one token's map over the final image: "
             "colour and opacity by the map's value relative to its own peak. Under each: the token's share (the "
             "mean weight it receives over pixels and heads) and the map's peak against a uniform map.</p>",
             f"<h3>All {len(maps.blocks)} cross-attention blocks, averaged</h3>",
             row(maps.overall, max(maps.grids.values()), "token-map",
                 np.mean([maps.share[b] for b in maps.blocks], axis=0))]
    for grid, ms in maps.resolutions.items():
        blocks = [b for b, g in maps.grids.items() if g == grid]
        parts += [f"<h3>Attention grid {grid[0]}x{grid[1]}: {len(blocks)} blocks averaged</h3>",
                  row(ms, grid, "res-map", np.mean([maps.share[b] for b in blocks], axis=0))]
    parts.append(f"<details><summary><b>Per block</b> ({len(maps.blocks)} blocks)</summary>")
    for b, ms in maps.blocks.items():
        p = pts.get(b + PROBS)
        parts += [f"<h3><code>{html.escape(b)}</code>, grid {maps.grids[b][0]}x{maps.grids[b][1]}"
                  + (f", probabilities {list(p.shape)} {page.computed(p.name)}" if p else "") + "</h3>",
                  row(ms, maps.grids[b], "block-map", maps.share[b])]
    parts.append("</details>")
    return section("attention", "5. Cross-attention maps per prompt token", *parts)


def decoder_section(page, e, image_uri):
    """6. x0, the decoder's points, and the image with its 8-bit conversion."""
    pipe, pts, res = e.pipe, e.recorder.points, e.result
    img, (H, W) = res.image, res.image.shape[2:]
    x0 = pts.get("latents.x0")
    clipped = int((img < -1).sum() + (img > 1).sum())
    err = np.abs(res.pixels[0].astype(np.float64) / 255 - np.clip((img[0].transpose(1, 2, 0) + 1) / 2, 0, 1)).max()
    decode = decoder_math.kl_decode if pipe.decoder.config.kind == "kl" else decoder_math.taesd_decode
    return section(
        "decoder", "6. x0, the decoder and the image",
        page.doc(pipeline.Pipeline.decode), page.doc(decoder_math, 1), page.doc(decode),
        "<h3>x0, the clean latent</h3>", points_table(page, [x0]) if x0 else "",
        f"<p>The decoder sees <code>x0 / {pipe.decoder.scaling_factor:.6g} + {pipe.decoder.shift_factor or 0}"
        "</code>.</p><h3>The decoder's stages</h3>",
        points_table(page, [p for name, p in pts.items() if name.startswith("decoder.")]),
        "<h3>The image and its 8-bit conversion</h3>", page.doc(pipeline.to_pixels),
        f'<p><img class="pix" alt="the final image" src="{image_uri}" width="{max(256, W)}" '
        f'height="{max(256, W) * H // W}"></p>'
        f"<p>{H}x{W} pixels; {clipped} of {img.size} decoder outputs lay outside [-1, 1] and were clipped; the "
        f"8-bit rounding moved a value by at most {err * 255:.3f} of a level.</p>")
