"""Per-token cross-attention maps: where each word of the prompt looked in the picture.

    pairs = mdref.explain.cross_attention_maps(pipe, "a red circle", seed=0)   # [(token string, map [H, W]), ...]

One run of the pipeline under a trace that asks for the on-request points ``<block>.attn2.probs``
(`mdref.unet.attention_probs`: the weight each pixel's query gives each text token, per head); `attention_maps`
says how the maps are made from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import pipeline, tokenizer
from ..trace import trace

__all__ = ["PROBS", "AttentionMaps", "prompt_tokens", "block_maps", "attention_maps", "cross_attention_maps",
           "maps_of"]

PROBS = ".attn2.probs"                          # the suffix of the on-request cross-attention points


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


def maps_of(pipe, result, t):
    """The AttentionMaps of one pipeline Result from a trace `t` that holds its probabilities."""
    rows = [r for r in prompt_tokens(pipe.tokenizer, result.token_ids[0]) if r[3] != "pad"]
    return attention_maps(t, len(rows), result.image.shape[2:], [r[2] for r in rows], [r[1] for r in rows])


def check_prompt(prompt):
    if not isinstance(prompt, str):
        raise pipeline.InputError("prompt", f"must be one str, found {type(prompt).__name__}")


def cross_attention_maps(pipe, prompt, seed=0, noise=None, *, steps=1, per_block=False):
    """Per prompt token, in prompt order (start and end tokens included, padding not): (token string, map), each
    map float64 [H, W] at image resolution summing to 1, the cross-attention of one run averaged over heads and
    blocks (see attention_maps). per_block=True returns (pairs, {block name: pairs}) instead."""
    check_prompt(prompt)
    with trace(f"unet.*{PROBS}", on_request=f"unet.*{PROBS}") as t:          # the probabilities only
        result = pipe.run(prompt, seed=seed, noise=noise, steps=steps)
    maps = maps_of(pipe, result, t)
    if per_block:
        return maps.pairs(), {b: maps.pairs(m) for b, m in maps.blocks.items()}
    return maps.pairs()
