"""mdref's convolution forms timed shape by shape against torch (issue 33): the measurement behind
ops.CONV_BLOCK_BYTES and the choice of form in ops.conv2d. See benchmarks/README.md, "conv_forms.py".

    python benchmarks/conv_forms.py [--components taesd,md-lite,sd-vae,md-unet,sd21-unet] [--blocks 4:0,4:2048]
                                    [--rounds 5] [--threads 1] [--dtype float32] [--markdown out.md] [--json out.json]
    python benchmarks/conv_forms.py --ablation [--components ...] [--rounds N] [--threads 1] ...

1. Shapes: each component's mdref side (benchmarks/components.py, full size, batch 1) runs once with ops.conv2d,
   ops.upsample_conv2d and ops.norm_silu_conv2d wrapped, recording every call's form and shapes and how often.
2. Every distinct shape with a 3x3 (or larger) dense kernel is timed in each form, interleaved, min over --rounds:
   conv      torch F.conv2d | conv2d@N:M (ops.conv2d with CONV_BLOCK_BYTES = N MiB, CONV_MIN_COLUMNS = M) | rows /
             taps (each of its im2col forms forced, at the default block) | shifted / im2col (the forms before
             issue 33, which the float16 emulation still runs: ops._conv_emulated)
   upsample  torch interpolate + conv2d | upsample_conv2d@N:M (its phase form, at every size) |
             conv2d(upsample_nearest2d(x)) (taps, default block)
   norm      torch group_norm + silu + conv2d | norm_silu_conv2d@N:M | norm rows / taps | conv2d(group_norm(x))
   (1x1 and depthwise convs are one matmul / one multiply per tap and are not timed.)
3. Per component: the sum over its shapes of count x time, per form, against torch's.
--ablation instead times each whole component (mdref side, float32) with this round's forms switched on one by one
(the forms before issue 33; + conv2d by taps; + upsample_conv2d; + norm_silu_conv2d), and torch, interleaved.

With --threads 1 (the default) both sides run one thread and the clock is the thread's CPU time (time.thread_time),
which other processes on a shared machine inflate far less than wall time; with more threads, wall time.
Timings are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
MIB = 2**20


def collect(names):
    """{component: Counter((kind, C, O, H, W, kh, kw, stride, padding, groups) -> calls)} from one forward each."""
    import components as C

    from mdref import decoder, ops
    calls = collections.Counter()
    originals = {k: getattr(ops, k) for k in ("conv2d", "upsample_conv2d", "norm_silu_conv2d")}
    modules = (ops, decoder)                             # decoder.py imports the ops by name

    def hook(kind, fn):
        def run(x, *a, **kw):
            p = a[1] if kind == "norm" else a[0]
            O, Cg, kh, kw_ = p["weight"].shape
            key = (kind, x.shape[1], O, x.shape[2], x.shape[3], kh, kw_, kw.get("stride", 1), kw.get("padding", 0),
                   kw.get("groups", 1) if kind == "conv" else 1)
            calls[key] += 1
            return fn(x, *a, **kw)
        return run
    out = {}
    try:
        for kind, name in (("conv", "conv2d"), ("upsample", "upsample_conv2d"), ("norm", "norm_silu_conv2d")):
            for m in modules:
                setattr(m, name, hook(kind, originals[name]))
        for name in names:
            comp = C.COMPONENTS[name]()
            obj = comp["mdref"](np.float32)
            calls.clear()
            comp["call_mdref"](obj, comp["inputs"](1))
            out[name] = collections.Counter(calls)
            del obj
            print(f"  {name}: {sum(calls.values())} conv calls, {len(calls)} shapes", file=sys.stderr, flush=True)
    finally:
        for k, v in originals.items():
            for m in modules:
                setattr(m, k, v)
    return out


def timed(key):
    """kh x kw >= 9 and a dense (ungrouped) kernel: the shapes whose form ops.conv2d chooses."""
    kind, C, O, H, W, kh, kw, stride, padding, groups = key
    return kh * kw > 1 and groups == 1


def _setting(b):
    """'4:2048' -> the ops constants it names (CONV_BLOCK_BYTES in MiB : CONV_MIN_COLUMNS)."""
    mib, cols = b.split(":")
    return dict(CONV_BLOCK_BYTES=int(float(mib) * MIB), CONV_MIN_COLUMNS=int(cols))


def forms(key, dtype, blocks, torch):
    """{form name: zero-argument callable} for one shape; random data, weights ~ 1/sqrt(fan_in)."""
    from mdref import ops
    kind, C, O, H, W, kh, kw, stride, padding, _ = key
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, C, H, W)).astype(dtype)
    p = {"weight": (rng.standard_normal((O, C, kh, kw)) / math.sqrt(C * kh * kw)).astype(dtype),
         "bias": rng.standard_normal(O).astype(dtype)}
    norm = {"weight": np.ones(C, dtype), "bias": np.zeros(C, dtype)}
    tx, tw, tb = (torch.from_numpy(a) for a in (x, p["weight"], p["bias"]))
    tn = [torch.from_numpy(a) for a in (norm["weight"], norm["bias"])]
    conv = dict(stride=stride, padding=padding)

    def former(a, stride, padding):
        """conv2d as before issue 33 (ops._conv_emulated: shifted above 64 x 64 output pixels at stride 1, else
        im2col)."""
        Ho, Wo = (a.shape[2] + 2 * padding - kh) // stride + 1, (a.shape[3] + 2 * padding - kw) // stride + 1
        return ops._conv_emulated(a, p["weight"], p["bias"], stride, padding, 1, Ho, Wo)

    def patched(fn, **consts):
        def run():
            saved = {k: getattr(ops, k) for k in consts}
            for k, v in consts.items():
                setattr(ops, k, v)
            try:
                return fn()
            finally:
                for k, v in saved.items():
                    setattr(ops, k, v)
        return run
    f = {}
    if kind == "conv":
        f["torch"] = lambda: F.conv2d(tx, tw, tb, **conv)
        for b in blocks:
            f[f"conv2d@{b}"] = patched(lambda: ops.conv2d(x, p, **conv), **_setting(b))
        for name, per_channel in (("rows", 0), ("taps", 2**62)):                 # each im2col form, forced
            f[name] = patched(lambda: ops.conv2d(x, p, **conv), ROWS_MIN_PIXELS_PER_CHANNEL=per_channel)
        if stride == 1:
            f["shifted"] = patched(lambda: former(x, stride, padding), SHIFTED_MIN_PIXELS=-1)
        f["im2col"] = patched(lambda: former(x, stride, padding), SHIFTED_MIN_PIXELS=2**62)
    elif kind == "upsample":
        f["torch"] = lambda: F.conv2d(F.interpolate(tx, scale_factor=2, mode="nearest"), tw, tb, padding=padding)
        for b in blocks:
            f[f"upsample_conv2d@{b}"] = patched(lambda: ops.upsample_conv2d(x, p, padding=padding), **_setting(b),
                                                UPSAMPLE_MIN_PIXELS=0)                  # the phase form
        f["conv2d(upsample)"] = lambda: ops.conv2d(ops.upsample_nearest2d(x, 2), p, padding=padding)
        f["former"] = lambda: former(ops.upsample_nearest2d(x, 2), 1, padding)
    else:
        groups = 32 if C % 32 == 0 else 1
        f["torch"] = lambda: F.conv2d(F.silu(F.group_norm(tx, groups, *tn, 1e-6)), tw, tb, **conv)
        for b in blocks:
            f[f"norm_silu_conv2d@{b}"] = patched(
                lambda: ops.norm_silu_conv2d(x, norm, p, groups=groups, eps=1e-6, **conv), **_setting(b))
        for name, per_channel in (("rows", 0), ("taps", 2**62)):
            f[f"norm {name}"] = patched(lambda: ops.norm_silu_conv2d(x, norm, p, groups=groups, eps=1e-6, **conv),
                                        ROWS_MIN_PIXELS_PER_CHANNEL=per_channel)
        f["conv2d(group_norm)"] = lambda: ops.conv2d(ops.group_norm(x, norm, groups, 1e-6, silu=True), p, **conv)
        f["former"] = lambda: former(ops.group_norm(x, norm, groups, 1e-6, silu=True), stride, padding)
    return f


def measure(fs, rounds, clock):
    ts = {k: [] for k in fs}
    for fn in fs.values():                                   # warm-up
        fn()
    for _ in range(rounds):
        for k, fn in fs.items():
            t0 = clock()
            fn()
            ts[k].append(clock() - t0)
    return {k: min(v) for k, v in ts.items()}


def label(key):
    kind, C, O, H, W, kh, kw, stride, padding, groups = key
    s = f"{kind} {C}->{O} {kh}x{kw} @{H}x{W}"
    return s + (f" s{stride}" if stride != 1 else "") + ("" if padding == kh // 2 else f" p{padding}")


# ---- ablation: whole components with each fast form switched back in turn --------------------------------------
def _former_conv(x, p, *, stride=1, padding=0, groups=1):
    """ops.conv2d with the forms it had before issue 33 (what the float16 emulation still runs)."""
    from mdref import ops
    O, _, kh, kw = p["weight"].shape
    Ho, Wo = (x.shape[2] + 2 * padding - kh) // stride + 1, (x.shape[3] + 2 * padding - kw) // stride + 1
    return ops._conv_emulated(x, p["weight"], p.get("bias"), stride, padding, groups, Ho, Wo)


def variants():
    """(name, {function name: replacement}) from the forms before issue 33 to all of this round's, cumulative."""
    from mdref import ops

    def composed(conv):
        up = lambda x, p, *, scale=2, padding=1: conv(ops.upsample_nearest2d(x, scale), p, padding=padding)  # noqa
        norm = lambda x, norm, p, *, groups, eps, stride=1, padding=0: conv(                                    # noqa
            ops.group_norm(x, norm, groups, eps, silu=True), p, stride=stride, padding=padding)
        return up, norm
    former_up, former_norm = composed(_former_conv)
    taps_up, taps_norm = composed(ops.conv2d)
    return [("former forms", dict(conv2d=_former_conv, upsample_conv2d=former_up, norm_silu_conv2d=former_norm)),
            ("+ conv by taps", dict(upsample_conv2d=taps_up, norm_silu_conv2d=taps_norm)),
            ("+ upsample_conv2d", dict(norm_silu_conv2d=taps_norm)),
            ("+ norm_silu_conv2d (all)", {})]


def ablation(names, rounds, clock):
    """{component: {variant or 'torch': min seconds}}: each component with every variant and torch, interleaved."""
    import components as C
    import torch

    from mdref import decoder, ops
    out = {}
    for name in names:
        comp = C.COMPONENTS[name]()
        m = comp["mdref"](np.float32)
        x = comp["inputs"](1)
        t = comp["torch_from"](m)
        tx = tuple(torch.from_numpy(v.copy()) for v in x)

        def run(patch):
            saved = {(mod, k): getattr(mod, k) for k in patch for mod in (ops, decoder) if hasattr(mod, k)}
            for mod, k in saved:
                setattr(mod, k, patch[k])
            try:
                comp["call_mdref"](m, x)
            finally:
                for (mod, k), v in saved.items():
                    setattr(mod, k, v)
        fs = {v: (lambda patch=patch: run(patch)) for v, patch in variants()}
        fs["torch"] = lambda: comp["call_torch"](t, tx)
        with torch.inference_mode():
            out[name] = measure(fs, rounds, clock)
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}s" for k, v in out[name].items()), file=sys.stderr, flush=True)
    return out


def markdown(report):
    a = report["args"]
    lines = [f"# mdref conv forms vs torch, shape by shape ({a['dtype']}, {a['threads']} thread(s), "
             f"{'thread CPU time' if a['threads'] == 1 else 'wall time'}, min of {a['rounds']})", ""]
    lines += [f"- {k}: {v}" for k, v in report["machine"].items()]
    lines += ["- conv2d@N:M / upsample_conv2d@N:M / norm_silu_conv2d@N:M: ops.CONV_BLOCK_BYTES = N MiB, "
              "ops.CONV_MIN_COLUMNS = M; rows, taps: ops._conv_rows / ops._conv_taps forced (default block); "
              "shifted, im2col: the forms before issue 33 (ops._conv_emulated); each cell: ms, and / torch", ""]
    for kind in ("conv", "upsample", "norm"):
        rows = [r for r in report["shapes"] if r["key"][0] == kind]
        if not rows:
            continue
        names = list(rows[0]["ms"])
        for r in rows:
            names += [n for n in r["ms"] if n not in names]
        lines += [f"## {kind}", "", "| shape | calls | GFLOP | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
        for r in rows:
            t = r["ms"]["torch"]
            cells = [f"{r['ms'][n]:.1f} ({r['ms'][n] / t:.2f})" if n in r["ms"] else "-" for n in names]
            lines.append(f"| {label(r['key'])} | {r['calls']} | {r['gflop']:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Per component: sum of calls x time over the timed shapes, / torch", "",
              "| component | torch s | " + " | ".join(f"{b}" for b in a["blocks"]) + " | former forms |",
              "|" + "---|" * (3 + len(a["blocks"]))]
    for name, tot in report["totals"].items():
        t = tot["torch"]
        cells = [f"{tot[f'@{b}'] / t:.3f}" for b in a["blocks"]] + [f"{tot['former'] / t:.3f}"]
        lines.append(f"| {name} | {t:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "former forms: conv2d as before issue 33 (shifted above 64x64 output pixels at stride 1, else "
              "im2col), on upsample_nearest2d(x) and on group_norm(x, silu=True) where the new form fuses those.", ""]
    return "\n".join(lines)


def ablation_markdown(report):
    a = report["args"]
    names = [v for v, _ in variants()]
    lines = [f"# mdref components with this round's conv forms switched on one by one, / torch (float32, "
             f"{a['threads']} thread(s), {'thread CPU time' if a['threads'] == 1 else 'wall time'}, min of "
             f"{a['rounds']})", ""]
    lines += [f"- {k}: {v}" for k, v in report["machine"].items()]
    lines += ["", "| component | torch s | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
    for comp, t in report["ablation"].items():
        lines.append(f"| {comp} | {t['torch']:.3f} | " + " | ".join(f"{t[n]:.3f} s ({t[n] / t['torch']:.2f})"
                                                                     for n in names) + " |")
    lines += ["", "former forms: conv2d as before issue 33 on upsample_nearest2d(x) and group_norm(x, silu=True); "
              "each next column adds one form (the ResNet's in-place additions are in every column).", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--components", default="taesd,md-lite,sd-vae,md-unet,sd21-unet")
    ap.add_argument("--blocks", default="4:1024,8:2048,16:4096",
                    help="column block settings to time, CONV_BLOCK_BYTES in MiB : CONV_MIN_COLUMNS")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--ablation", action="store_true",
                    help="time whole components instead, with this round's forms switched on one by one")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    a = ap.parse_args(argv)
    import threadpoolctl
    threadpoolctl.threadpool_limits(a.threads)
    import torch
    torch.set_num_threads(a.threads)
    import run
    clock = time.thread_time if a.threads == 1 else time.perf_counter
    blocks = a.blocks.split(",")
    pools = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
    report = {"args": {**vars(a), "blocks": blocks}, "shapes": [], "totals": {}, "machine": {
        "CPU": f"{run.cpu_model()} ({os.cpu_count()} CPUs)", "NumPy": np.__version__,
        "torch": torch.__version__, "BLAS": f"{pools[0].get('internal_api')} {pools[0].get('version')} kernel "
                                            f"{pools[0].get('architecture')}" if pools else "?",
        "torch CPU capability": torch.backends.cpu.get_cpu_capability(),
        "env": {k: v for k, v in os.environ.items() if k in run.KERNEL_VARS}}}
    names = a.components.split(",")
    if a.ablation:
        report["ablation"] = ablation(names, a.rounds, clock)
        return run.write_report(report, ablation_markdown(report), a.markdown, a.json)
    per_component = collect(names)
    shapes = collections.Counter()
    for c in per_component.values():
        shapes.update({k: n for k, n in c.items() if timed(k)})
    dtype = np.dtype(a.dtype).type
    ms = {}
    with torch.inference_mode():
        for i, key in enumerate(sorted(shapes, key=lambda k: (k[0], -k[3] * k[4], k[1]))):
            kind, C, O, H, W, kh, kw, stride, padding, _ = key
            Ho, Wo = (H + 2 * padding - kh) // stride + 1, (W + 2 * padding - kw) // stride + 1
            scale = 4 if kind == "upsample" else 1
            gflop = 2 * O * C * kh * kw * Ho * Wo * scale / 1e9
            ms[key] = {k: v * 1e3 for k, v in measure(forms(key, dtype, blocks, torch), a.rounds, clock).items()}
            report["shapes"].append({"key": list(key), "calls": shapes[key], "gflop": gflop, "ms": ms[key]})
            print(f"  [{i + 1}/{len(shapes)}] {label(key)}: " + ", ".join(f"{k} {v:.1f}" for k, v in ms[key].items()),
                  file=sys.stderr, flush=True)
    for name, c in per_component.items():
        tot = collections.defaultdict(float)
        for key, n in c.items():
            if not timed(key):
                continue
            m = ms[key]
            tot["torch"] += n * m["torch"] / 1e3
            for b in blocks:
                tot[f"@{b}"] += n * next(v for k, v in m.items() if k.endswith(f"@{b}")) / 1e3
            former = ("shifted" if key[3] * key[4] > 64 * 64 and key[7] == 1 else "im2col") if key[0] == "conv" \
                else "former"
            tot["former"] += n * m[former] / 1e3
        report["totals"][name] = dict(tot)
        report.setdefault("calls", {})[name] = [[list(k), n] for k, n in c.items()]
    run.write_report(report, markdown(report), a.markdown, a.json)


if __name__ == "__main__":
    main()
