"""What every runtime recipe in this folder shares: the command line, mdref's reference trace of a golden case,
the export, and the comparison. A recipe supplies only `run_graph(graph, feeds) -> {output name: array}` for its
runtime (and, for runtimes that do not read ONNX, its own export from mdref_torch.export.prepare).

    python examples/runtimes/run_onnxruntime.py [--model PATH | --preset NAME] [--dtype float16] [--case N]
                                                [--out DIR]

Steps: (1) mdref runs golden case N (GOLDEN_CASES: prompt and seed) and keeps every point: the reference trace and
its token ids and noise; (2) `mdref export onnx OUT/exported --points [--dtype D]`; (3) the runtime runs the three
graphs on those token ids and noise, chained by mdref.exported.run_exported (mdref's sampler and decoder-input
arithmetic between them), writing OUT/<runtime>.safetensors; (4) `mdref compare OUT/mdref.safetensors
OUT/<runtime>.safetensors`: its exit status is the script's (0 every point agrees at the default tolerance for the
dtype, 1 a point diverges).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mdref
from mdref import cli
from mdref.exported import load_points, run_exported
from mdref.golden import GOLDEN_CASES


def parse_args(description, argv=None, dtypes=("float32", "float16"), extra=None):
    """The recipes' shared options; `extra(parser)` adds a runtime's own."""
    ap = argparse.ArgumentParser(description=description)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--model", help="diffusers-style pipeline folder (default: the embedded model)")
    g.add_argument("--preset", help="a named architecture with seeded weights (mobilediffusion, tiny)")
    ap.add_argument("--dtype", choices=dtypes, default="float32", help="the exported / compiled model's dtype")
    ap.add_argument("--case", type=int, default=0, choices=range(len(GOLDEN_CASES)), help="golden case (default 0)")
    ap.add_argument("--out", help="working folder (default: a new temporary folder)")
    ap.add_argument("--exported", help="reuse this `mdref export onnx --points` folder instead of exporting")
    if extra:
        extra(ap)
    return ap.parse_args(argv)


def load(args):
    """The float32 pipeline the arguments name, and the folder to work in."""
    pipe = (mdref.Pipeline.from_preset(args.preset) if args.preset else mdref.Pipeline.from_pretrained(args.model))
    out = Path(args.out or tempfile.mkdtemp(prefix="mdref-runtime-"))
    out.mkdir(parents=True, exist_ok=True)
    return pipe, out


def reference(pipe, case, out):
    """mdref's trace of golden case `case` (float32), saved to OUT/mdref.safetensors; returns (token ids, noise)."""
    prompt, seed = GOLDEN_CASES[case]
    with mdref.trace() as t:
        pipe.run(prompt, seed=seed)
    mdref.save_trace(out / "mdref.safetensors", t, {"prompt": prompt, "seed": seed, "runtime": "mdref"})
    return t["tokens"], t["noise"]


def export(args, out):
    """`mdref export onnx OUT/exported --points [--dtype]` (or the folder --exported names); returns the folder."""
    if args.exported:
        return Path(args.exported)
    folder = out / f"exported-{args.dtype}"
    if not (folder / "points.json").is_file():
        argv = ["export", "onnx", str(folder), "--points", "--dtype", args.dtype]
        argv += ["--model", args.model] if args.model else ["--preset", args.preset] if args.preset else []
        status = cli.main(argv)
        if status:
            sys.exit(status)
    return folder


def finish(run_graph, manifest, ids, noise, out, runtime, facts=None):
    """Run the exported pipeline with `run_graph`, save OUT/<runtime>.safetensors, print `mdref compare` against
    mdref's trace and return its exit status."""
    t0 = time.perf_counter()
    t = run_exported(run_graph, manifest, ids, noise)
    seconds = time.perf_counter() - t0
    path = out / f"{runtime.split()[0].lower()}.safetensors"
    mdref.save_trace(path, t, dict(facts or {}, runtime=runtime, dtype=manifest["dtype"]))
    print(f"{runtime}: ran the three graphs in {seconds:.2f} s, {len(t.names())} points\n"
          f"$ mdref compare {out / 'mdref.safetensors'} {path}")
    return cli.main(["compare", str(out / "mdref.safetensors"), str(path), "--only-failures"])


def worst(out, runtime):
    """(largest rel_to_max, its point, points compared, all agree) of OUT/<runtime>.safetensors against mdref."""
    r = mdref.compare(out / "mdref.safetensors", out / f"{runtime.split()[0].lower()}.safetensors")
    w = max(r.points, key=lambda p: p.rel_to_max)
    return w.rel_to_max, w.name, len(r.points), r.ok


def summary(out, runtime, dtype):
    """One JSON line for docs/runtimes.md's table."""
    err, where, n, ok = worst(out, runtime)
    print(json.dumps({"runtime": runtime, "dtype": dtype, "points": n, "agree": ok, "worst_rel_err": err,
                      "where": where}))


def exported_manifest(args, out):
    folder = export(args, out)
    return folder, load_points(folder)


def onnx_recipe(args, runtime, make_runner):
    """For runtimes that read the exported ONNX graphs: `make_runner(folder, manifest)` returns run_graph. Runs
    golden case N, compares, returns `mdref compare`'s exit status."""
    pipe, out = load(args)
    ids, noise = reference(pipe, args.case, out)
    folder, manifest = exported_manifest(args, out)
    status = finish(make_runner(folder, manifest), manifest, ids, noise, out, runtime)
    summary(out, runtime, args.dtype)
    return status


def torch_recipe(args, runtime, compile_graph):
    """For runtimes that compile from PyTorch themselves (ExecuTorch, LiteRT): `compile_graph(prepared, out)`
    turns one mdref_torch.export.Prepared (a module returning its main output and every point, with example
    arguments) into `run(list of numpy inputs) -> list of numpy outputs` in the wrapper's output order. Runs golden
    case N, compares, returns `mdref compare`'s exit status."""
    from mdref_torch.export import prepare, torch_manifest

    pipe, out = load(args)
    ids, noise = reference(pipe, args.case, out)
    prepared = prepare(pipe, args.dtype)
    manifest = torch_manifest(pipe, prepared, runtime)
    compiled = {}
    for graph, prep in prepared.items():
        t0 = time.perf_counter()
        compiled[graph] = compile_graph(prep, out)
        print(f"{graph:<13} compiled in {time.perf_counter() - t0:.1f} s ({len(prep.names)} outputs)")

    def run_graph(graph, feeds):
        prep = prepared[graph]
        return dict(zip(prep.names, compiled[graph]([feeds[n] for n in prep.input_names])))

    status = finish(run_graph, manifest, ids, noise, out, runtime)
    summary(out, runtime, args.dtype)
    return status
