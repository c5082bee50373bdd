"""Real half-precision runtimes against mdref's float64, point by point: the measured side of the float16 profiles.

    # one runtime per run, each in an environment that has it (pins: examples/runtimes/run_*.py docstrings)
    python benchmarks/float16_runtimes.py --runtime onnxruntime --out benchmarks/float16-runtimes
    python benchmarks/float16_runtimes.py --runtime tinygrad    --out benchmarks/float16-runtimes
    python benchmarks/float16_runtimes.py --runtime executorch  --out benchmarks/float16-runtimes
    python benchmarks/float16_runtimes.py --report benchmarks/float16-runtimes    # -> results.json + results.md

Runtimes: ONNX Runtime and tinygrad run `mdref export onnx --dtype float16` (float16 weights and activations, the
timestep sinusoid float32); ExecuTorch runs the float16 PyTorch modules lowered to XNNPACK. Cases (the constructed
overflows of shared/notes/real-runtimes-2026-12.md):
  default      the embedded default model, golden case 0 (prompt and seed)
  conv_in_300  (a) the default UNet with conv_in.bias + 300: GroupNorm statistics of ~300-sized values (x^2 > 65504)
  decoder_x4   the full-size `mobilediffusion-lite` decoder (seed 2) at 512x512, fed a seeded latent x 4
               (activations ~30: no overflow in any profile)
  decoder_x64  (b) the same decoder fed the latent x 64 (activations ~400 from post_quant_conv on: x^2 > 65504
               in every GroupNorm)
  attn_q172    (c) the default UNet's mid attn1 with to_q x 172 and to_kv x 30: scores after the 1/sqrt(d) scale
               below 65504, q k^T before it above (1.6e5)
Per case and runtime: every point's rel err (max |runtime - float64| / max |float64| over the positions finite in
both), its non-finite count, and the first point where the runtime holds a NaN or an Inf. The lead adds the
emulation's named profiles beside these (mdref precision), so the JSON keeps every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "runtimes"))

import mdref  # noqa: E402
from mdref.exported import run_exported  # noqa: E402
from mdref.golden import GOLDEN_CASES  # noqa: E402

CASES = ("default", "conv_in_300", "decoder_x4", "decoder_x64", "attn_q172")
DECODER_SCALE = {"decoder_x4": 4, "decoder_x64": 64}
ATTN = ("mid_block", "attentions", "0", "transformer_blocks", "0", "attn1")


def _edit(pipe, case):
    """Apply a case's weight change to an mdref pipeline (float32 or float64 arrays, in place)."""
    p = pipe.unet.params
    if case == "conv_in_300":
        p["conv_in"]["bias"] += 300
    elif case == "attn_q172":
        a = p
        for k in ATTN:
            a = a[k]
        a["to_q"]["weight"] *= 172
        a["to_kv"]["weight"] *= 30
    return pipe


def _pipelines(case):
    """(float32 pipeline to export, float64 reference pipeline) for a whole-pipeline case."""
    return (_edit(mdref.Pipeline.from_pretrained(), case),
            _edit(mdref.Pipeline.from_pretrained(dtype=np.float64), case))


def _decoder_case(case):
    """(float32 decoder holder, float64 decoder, latent) for a decoder case (DECODER_SCALE)."""
    dec32 = mdref.Decoder.from_preset("mobilediffusion-lite", seed=2)
    dec64 = mdref.Decoder.from_preset("mobilediffusion-lite", seed=2, dtype=np.float64)
    z = DECODER_SCALE[case] * np.random.Generator(np.random.PCG64(0)).standard_normal((1, 8, 64, 64))
    return SimpleNamespace(decoder=dec32), dec64, z


def reference(case):
    """The float64 trace of a case, and (token ids, noise) or the decoder's input."""
    if case in DECODER_SCALE:
        _, dec64, z = _decoder_case(case)
        with mdref.trace() as t:
            dec64(z)
        return t.arrays, z
    _, pipe64 = _pipelines(case)
    prompt, seed = GOLDEN_CASES[0]
    with mdref.trace() as t, np.errstate(all="ignore"):
        pipe64.run(prompt, seed=seed, allow_nonfinite=True)
    return t.arrays, (t["tokens"], t["noise"])


def _onnx_graphs(case, folder):
    """The float16 ONNX graphs of a case in `folder` (exported once, shared by ORT and tinygrad)."""
    from mdref_torch.export import Prepared, _export_graph, example_inputs, export_onnx

    if (folder / "done").is_file():
        return json.loads((folder / "done").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    if case in DECODER_SCALE:
        holder, _, z = _decoder_case(case)
        prep = Prepared(holder, "decoder", (z.astype(np.float32),), "float16")
        manifest = {"graphs": {"decoder": _export_graph(prep, folder / "decoder.onnx", points=True, log=print)}}
    else:
        pipe, _ = _pipelines(case)
        export_onnx(pipe, folder / "exported", points=True, dtype="float16")
        manifest = json.loads((folder / "exported" / "points.json").read_text())
        for g in manifest["graphs"].values():
            g["file"] = f"exported/{g['file']}"
    (folder / "done").write_text(json.dumps(manifest))
    return manifest


def runner(runtime, case, work):
    """(run_graph, manifest) for a runtime on a case's float16 model."""
    if runtime in ("onnxruntime", "tinygrad"):
        manifest = _onnx_graphs(case, work / f"onnx-{case}")
        folder = work / f"onnx-{case}"
        if runtime == "onnxruntime":
            import run_onnxruntime
            return run_onnxruntime.runner(folder, manifest), manifest
        import run_tinygrad
        return run_tinygrad.runner(folder, manifest), manifest
    if runtime == "executorch":
        import run_executorch
        from mdref_torch.export import Prepared, prepare, torch_manifest

        if case in DECODER_SCALE:
            holder, _, z = _decoder_case(case)
            prepared = {"decoder": Prepared(holder, "decoder", (z.astype(np.float32),), "float16")}
            manifest = {"graphs": {"decoder": prepared["decoder"].entry(prepared["decoder"].shapes)}}
        else:
            pipe, _ = _pipelines(case)
            prepared = prepare(pipe, "float16")
            manifest = torch_manifest(pipe, prepared, "executorch")
        compiled = {g: run_executorch.compile_graph(p, work) for g, p in prepared.items()}

        def run_graph(graph, feeds):
            p = prepared[graph]
            return dict(zip(p.names, compiled[graph]([feeds[n] for n in p.input_names])))
        return run_graph, manifest
    raise SystemExit(f"--runtime {runtime}: expected onnxruntime, tinygrad or executorch")


def measure(runtime, case, work):
    ref, inputs = reference(case)
    run_graph, manifest = runner(runtime, case, work)
    t0 = time.perf_counter()
    with np.errstate(all="ignore"):
        if case in DECODER_SCALE:
            out = run_graph("decoder", {"decoder_input": inputs.astype(np.float16)})
            cand = {n: np.asarray(out[n]) for n in manifest["graphs"]["decoder"]["points"]}
        else:
            cand = run_exported(run_graph, manifest, *inputs).arrays
    seconds = time.perf_counter() - t0
    report = mdref.compare(ref, cand, rtol=2e-2)
    first = next((p.name for p in report.points if p.nonfinite_b), None)
    first_ref = next((p.name for p in report.points if p.nonfinite_a), None)
    return {"runtime": runtime, "case": case, "seconds": round(seconds, 2), "first_nonfinite": first,
            "first_nonfinite_float64": first_ref,
            "points": {p.name: {"rel_err": p.rel_to_max, "nonfinite": p.nonfinite_b, "nmse": p.nmse}
                       for p in report.points}}


def version(runtime):
    from importlib.metadata import version as v
    return f"{runtime} {v(runtime)}"


def report(folder):
    """Merge every <runtime>.json of `folder` into results.json and results.md."""
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name != "results.json"]
    runs = [r for res in results for r in res["runs"]]
    (folder / "results.json").write_text(json.dumps({"runs": runs, "versions": [r["version"] for r in results]},
                                                    indent=1) + "\n")
    lines = ["# Real float16 runtimes against mdref float64", "",
             "Per case and runtime: the largest rel err (max |runtime - float64| / max |float64|) over the points "
             "that hold no NaN / Inf, its point, `unet.out` / `decoder.out`, and the first point holding a NaN or "
             "an Inf. Made by "
             "`benchmarks/float16_runtimes.py`; versions: " + ", ".join(r["version"] for r in results) + ".", "",
             "| case | runtime | worst rel err | at | main output rel err | first non-finite (runtime) | "
             "first non-finite (float64) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (CASES.index(r["case"]), r["runtime"])):
        # a point holding NaN / Inf has its error over the finite positions only: shown as non-finite instead
        pts = {k: v for k, v in r["points"].items() if v["rel_err"] is not None and not v["nonfinite"]}
        worst = max(pts, key=lambda k: pts[k]["rel_err"]) if pts else None
        main = next(k for k in ("unet.out", "decoder.out") if k in r["points"])
        m = r["points"][main]
        main_err = f"{main} {m['rel_err']:.3g}" if not m["nonfinite"] else f"{main} {m['nonfinite']} non-finite"
        lines.append(f"| {r['case']} | {r['runtime']} | {pts[worst]['rel_err']:.3g} | {worst} | {main_err} | "
                     f"{r['first_nonfinite'] or '-'} | {r['first_nonfinite_float64'] or '-'} |")
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", choices=["onnxruntime", "tinygrad", "executorch"])
    ap.add_argument("--case", action="append", choices=CASES, help="default: all")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "float16-runtimes"))
    ap.add_argument("--work", help="folder for exported graphs (default: a temporary folder)")
    ap.add_argument("--report", metavar="DIR", help="merge the runtimes' JSON files of DIR into results.md")
    args = ap.parse_args(argv)
    if args.report:
        return report(Path(args.report))
    if not args.runtime:
        ap.error("--runtime or --report")
    work = Path(args.work or tempfile.mkdtemp(prefix="mdref-f16-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.runtime}.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []      # earlier cases of this runtime
    for case in args.case or CASES:
        t0 = time.perf_counter()
        runs = [r for r in runs if r["case"] != case] + [measure(args.runtime, case, work)]
        print(f"{args.runtime} {case}: first non-finite {runs[-1]['first_nonfinite']}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        path.write_text(json.dumps({"version": version(args.runtime), "runs": runs}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
