"""mdref's float16 profiles against real half-precision runtimes, point by point: the evidence for the profiles.

    HF_HUB_OFFLINE=1 python benchmarks/float16_profiles.py            # -> benchmarks/float16-profiles.md (+ .json)
    HF_HUB_OFFLINE=1 python benchmarks/float16_profiles.py --islands  # which ONNX ops ORT's CPU runs in float32

The measured side is benchmarks/float16-runtimes/results.json (benchmarks/float16_runtimes.py: ONNX Runtime on the
float16 ONNX export, ExecuTorch / XNNPACK on the float16 PyTorch modules; each point's rel err against mdref's
float64). For every profile of mdref.precision.PROFILES this script runs mdref's float16 emulation on the same cases
and the same inputs, chained exactly as the runtimes were (mdref.exported.run_exported: the float16 graphs' inputs
rounded to float16, the sampler in float32 between them; the edited weights rounded to float16 after the edit, as
the exported graphs hold them), and reports per runtime and profile:

  ratio     measured / emulated rel err per point (points finite in both runs, emulated error > 0): median, and the
            range (min, max) over the points; the main output's ratio per case beside it
  overflow  per case, the first non-finite point of the runtime and of the emulation, or a collapsed main output
            (finite but rel err >= 0.5, e.g. all zeros): predicted (both fail), missed (the runtime only), false
            alarm (the emulation only)

Cases (benchmarks/float16_runtimes.py): default (golden case 0), conv_in_300 (a), decoder_x4, decoder_x64 (b),
attn_q172 (c).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import float16_runtimes as runtimes  # noqa: E402

import mdref  # noqa: E402
from mdref.exported import run_exported  # noqa: E402
from mdref.precision import PROFILES, round_to  # noqa: E402

MEASURED = ROOT / "benchmarks" / "float16-runtimes" / "results.json"
MAIN = ("unet.out", "decoder.out")
COLLAPSED = 0.5             # a main output this far off (rel err) is lost though finite: counted as an overflow


def _round_params(dst, src):
    """dst's arrays (a float16 component's parameter tree) set to src's (the edited float32 tree), rounded."""
    for k, v in src.items():
        if isinstance(v, dict):
            _round_params(dst[k], v)
        elif isinstance(v, list):
            for a, b in zip(dst[k], v):
                _round_params(a, b) if isinstance(b, dict) else None
        elif isinstance(v, np.ndarray) and v.dtype.kind == "f":
            dst[k] = round_to(v, "float16")


def emulated_pipeline(case, profile):
    """The float16 pipeline of a whole-pipeline case under `profile`, its weights those of the edited float32 model
    rounded (what the float16 export holds)."""
    p32 = runtimes._edit(mdref.Pipeline.from_pretrained(), case)
    p16 = mdref.Pipeline.from_pretrained(dtype="float16", profile=profile)
    _round_params(p16.unet.params, p32.unet.params)
    return p16


def graph_runner(pipe):
    """run_graph for run_exported that runs mdref's emulated components: feeds as the runtimes got them (float16
    values), every point the component records returned by name, the main outputs as the graphs name them."""
    def run_graph(graph, feeds):
        f = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feeds.items()}
        with mdref.trace() as t, np.errstate(all="ignore"):
            if graph == "text_encoder":
                out = {"text_embeddings": pipe.text_encoder(f["tokens"])}
            elif graph == "unet":
                out = {"unet.out": pipe.unet(f["sample"], f["timestep"], f["context"])}
            else:
                out = {"decoder.out": pipe.decoder(f["decoder_input"])}
        return {**{k: round_to(v, "float16") for k, v in t.arrays.items()},
                **{k: round_to(v, "float16") for k, v in out.items()}}
    return run_graph


def manifest_of_default(work):
    """points.json of the default model's float16 export (the graphs' inputs and points; the cases' edits change
    weights only)."""
    from mdref_torch.export import export_onnx

    folder = work / "exported"
    if not (folder / "points.json").is_file():
        export_onnx(mdref.Pipeline.from_pretrained(), folder, points=True, dtype="float16")
    return json.loads((folder / "points.json").read_text())


def emulate(case, profile, manifest, ref, inputs):
    """{point: {rel_err, nonfinite}} and the first non-finite point of the emulation of `case` under `profile`."""
    if case in runtimes.DECODER_SCALE:
        dec = mdref.Decoder.from_preset("mobilediffusion-lite", seed=2, dtype="float16", profile=profile)
        with mdref.trace() as t, np.errstate(all="ignore"):
            dec(round_to(inputs, "float16"))                          # fed as the float16 graph was
        cand = t.arrays
    else:
        cand = run_exported(graph_runner(emulated_pipeline(case, profile)), manifest, *inputs).arrays
    report = mdref.compare(ref, cand, rtol=2e-2)
    return ({p.name: {"rel_err": p.rel_to_max, "nonfinite": p.nonfinite_b} for p in report.points},
            next((p.name for p in report.points if p.nonfinite_b), None))


def ratios(measured, emulated):
    """measured / emulated rel err over the points finite in both, with an emulated error > 0."""
    out = {}
    for name, m in measured.items():
        e = emulated.get(name)
        if e is None or m["nonfinite"] or e["nonfinite"] or m["rel_err"] is None or e["rel_err"] is None:
            continue
        if e["rel_err"] > 0 and np.isfinite(e["rel_err"]) and np.isfinite(m["rel_err"]):
            out[name] = m["rel_err"] / e["rel_err"]
    return out


def run(work):
    measured = json.loads(MEASURED.read_text())
    cases = sorted({r["case"] for r in measured["runs"]}, key=runtimes.CASES.index)
    manifest = manifest_of_default(work)
    emulations = {}
    for case in cases:
        ref, inputs = runtimes.reference(case)
        for profile in PROFILES:
            t0 = time.perf_counter()
            points, first = emulate(case, profile, manifest, ref, inputs)
            emulations[(case, profile)] = {"points": points, "first_nonfinite": first}
            print(f"{case} {profile}: first non-finite {first}, {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for r in measured["runs"]:
        for profile in PROFILES:
            e = emulations[(r["case"], profile)]
            rs = ratios(r["points"], e["points"])
            main = next(k for k in MAIN if k in r["points"])
            rows.append({"runtime": r["runtime"], "case": r["case"], "profile": profile, "ratios": rs,
                         "main": main, "main_ratio": rs.get(main),
                         "main_measured": r["points"][main]["rel_err"] if not r["points"][main]["nonfinite"] else None,
                         "main_emulated": e["points"][main]["rel_err"] if not e["points"][main]["nonfinite"] else None,
                         "first_nonfinite_runtime": r["first_nonfinite"],
                         "first_nonfinite_emulated": e["first_nonfinite"]})
    return {"versions": measured["versions"], "profiles": {k: v.about for k, v in PROFILES.items()}, "rows": rows}


def _failed(first_nonfinite, main_err):
    """How a run failed: its first non-finite point, "collapsed" when the main output is finite but lost (rel err
    >= COLLAPSED: e.g. the decoder's output all zeros), or None."""
    if first_nonfinite:
        return first_nonfinite
    return "collapsed" if main_err is not None and main_err >= COLLAPSED else None


def _verdict(row):
    a = _failed(row["first_nonfinite_runtime"], row["main_measured"])
    b = _failed(row["first_nonfinite_emulated"], row["main_emulated"])
    if a and b:
        return "predicted" + ("" if a == b else f" (at {b.split('.')[-1]}, runtime {a.split('.')[-1]})")
    return "missed" if a else (f"false alarm ({'collapsed output' if b == 'collapsed' else 'NaN / Inf'})" if b
                               else "finite, both")


def table(result):
    """The markdown of float16-profiles.md."""
    rows = result["rows"]
    runtimes_ = sorted({r["runtime"] for r in rows})
    lines = ["# mdref's float16 profiles against real runtimes", "",
             "Made by `benchmarks/float16_profiles.py` from the measured runs of `benchmarks/float16_runtimes.py` "
             f"({', '.join(result['versions'])}). Ratio = the runtime's rel err / the emulation's rel err at the "
             "same point (max |x - float64| / max |float64|; points finite in both runs); 1 = the profile predicts "
             "the runtime's error exactly. Overflow: a non-finite point, or a main output lost though finite (rel err "
             f">= {COLLAPSED}).", "",
             "| runtime | profile | points | median ratio | range | main output ratio per case | overflow: "
             "predicted / missed / false alarm |", "|---|---|---|---|---|---|---|"]
    for rt in runtimes_:
        for profile in result["profiles"]:
            sel = [r for r in rows if r["runtime"] == rt and r["profile"] == profile]
            allr = [v for r in sel for v in r["ratios"].values()]
            verdicts = [_verdict(r) for r in sel]
            counts = [sum(v.startswith(k) for v in verdicts) for k in ("predicted", "missed", "false alarm")]
            mains = ", ".join(f"{r['case']} {r['main_ratio']:.2f}" if r["main_ratio"] is not None
                              else f"{r['case']} -" for r in sel)
            lines.append(f"| {rt} | {profile} | {len(allr)} | {statistics.median(allr):.2f} | "
                         f"{min(allr):.2f} - {max(allr):.2f} | {mains} | {counts[0]} / {counts[1]} / {counts[2]} |")
    lines += ["", "Per case: the first non-finite point of the runtime and of each profile's emulation, and the main "
              "output's rel err (measured / emulated).", "",
              "| case | runtime | runtime's first non-finite | " + " | ".join(result["profiles"]) + " |",
              "|---|---|---|" + "---|" * len(result["profiles"])]
    for case in runtimes.CASES:
        for rt in runtimes_:
            sel = {r["profile"]: r for r in rows if r["runtime"] == rt and r["case"] == case}
            if not sel:
                continue
            first = next(iter(sel.values()))
            cells = []
            for p in result["profiles"]:
                r = sel[p]
                err = (f"{r['main']} {r['main_measured']:.2g} / {r['main_emulated']:.2g}"
                       if r["main_measured"] is not None and r["main_emulated"] is not None else r["main"] + " -")
                cells.append(f"{_verdict(r)}; {err}")
            lines.append(f"| {case} | {rt} | {first['first_nonfinite_runtime'] or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- which ops ORT's CPU provider computes in float32 ----------------------------------------------------------
def islands(work):
    """Export the default model in float16 with its points, let ONNX Runtime optimise each graph for the CPU
    provider, and count, per op type, the nodes that run in float16 and in float32 (their first input's dtype), and
    what produces each value Cast back to float16 (where the float32 islands end: the only roundings)."""
    import collections

    import onnx
    import onnxruntime as ort

    manifest_of_default(work)
    lines = [f"ONNX Runtime {ort.__version__}, CPUExecutionProvider, default optimisation level; the default model's "
             "float16 export with --points (untyped: ORT's NCHWc layout nodes, float32 only, which shape inference "
             "does not type)", ""]
    for g in ("text_encoder", "unet", "decoder"):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(work / f"{g}.optimised.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(work / "exported" / f"{g}.onnx"), so, providers=["CPUExecutionProvider"])
        m = onnx.shape_inference.infer_shapes(onnx.load(so.optimized_model_filepath))
        dtype = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.value_info, *m.graph.input,
                                                                   *m.graph.output]}
        dtype |= {i.name: i.data_type for i in m.graph.initializer}
        names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
        producer = {o: n for n in m.graph.node for o in n.output}
        readers = collections.Counter(i for n in m.graph.node for i in n.input)
        ops = collections.defaultdict(collections.Counter)
        ends, outputs_only = collections.Counter(), collections.Counter()
        for n in m.graph.node:
            ops[n.op_type][names.get(dtype.get(n.input[0]) if n.input else None, "untyped")] += 1
            if n.op_type == "Cast" and {a.name: a.i for a in n.attribute}["to"] == onnx.TensorProto.FLOAT16:
                p = producer.get(n.input[0])
                while p is not None and p.op_type in ("ReorderOutput", "Reshape", "Transpose"):
                    p = producer.get(p.input[0])
                (ends if readers[n.output[0]] else outputs_only)["graph input" if p is None else p.op_type] += 1
        lines.append(f"{g}: per op type, nodes by the dtype they read: "
                     + "; ".join(f"{op} {dict(c)}" for op, c in sorted(ops.items()) if op != "Cast"))
        lines.append(f"{g}: values cast back to float16 and read by a float16 op (an island's end: a rounding on "
                     f"the data path), by the op that computed them: {dict(ends)}; cast only for a graph output (a "
                     f"recorded point; the path stays float32): {dict(outputs_only)}")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "float16-profiles.md"))
    ap.add_argument("--work", help="folder for the export (default: a temporary folder)")
    ap.add_argument("--islands", action="store_true", help="only print which ops ORT's CPU runs in float32")
    ap.add_argument("--table", action="store_true", help="only rewrite the markdown from the JSON beside --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.table:
        out.write_text(table(json.loads(out.with_suffix(".json").read_text())))
        print(out.read_text())
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="mdref-f16p-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.islands:
        islands(work)
        return 0
    result = run(work)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    out.write_text(table(result))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
