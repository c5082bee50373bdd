"""`mdref export onnx` (extra "export") checked the way a runtime author uses it: the embedded default model,
exported with --points, run in ONNX Runtime on golden case 0's token ids and noise, chained by mdref's own sampler
(mdref.exported.run_exported), agrees with the shipped golden trace at every one of its points at `mdref compare`'s
default tolerance (float32: 1e-4 of max|x|); the --dtype float16 export agrees at the float16 tolerance (2e-2) and
keeps the timestep sinusoid in float32. Plus the graphs' interface (inputs, outputs named by points, initializers
named by parameter paths), a point value kept inside a graph exported without --points, an edited initializer named
by `mdref compare`, `mdref match` on every value ORT computes under scrambled names, and the one error line when
the extra is not installed.

Each export takes ~30-60 s on 2 cores (torch.export + onnxscript); the module exports twice (float32, float16)."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import mdref
from mdref import cli
from mdref.exported import load_points, run_exported

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "weights" / "golden" / "case0"
DEFAULT = ROOT / "weights" / "default"
pytestmark = pytest.mark.skipif(not (GOLDEN / "trace.safetensors").is_file(), reason="no golden bundle")

_spec = importlib.util.spec_from_file_location("run_onnxruntime", ROOT / "examples" / "runtimes" / "run_onnxruntime.py")
sys.path.insert(0, str(ROOT / "examples" / "runtimes"))        # its `import common`
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)
sys.path.remove(str(ROOT / "examples" / "runtimes"))


def _export(tmp_path_factory, *extra):
    folder = tmp_path_factory.mktemp("export") / "out"
    assert cli.main(["export", "onnx", str(folder), "--points", *extra]) == 0
    return folder


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    return _export(tmp_path_factory)


@pytest.fixture(scope="module")
def f16(tmp_path_factory):
    return _export(tmp_path_factory, "--dtype", "float16")


def _ort_trace(folder, manifest=None):
    manifest = manifest or load_points(folder)
    return run_exported(recipe.runner(folder, manifest), manifest, np.load(GOLDEN / "token_ids.npy"),
                        np.load(GOLDEN / "noise.npy"))


def test_graph_interface(f32):
    """Inputs as the interface says; every point an output named by its point; initializers named by the
    checkpoint's parameter paths (every parameter of the shipped files, e.g. a cross-attention bias)."""
    m = load_points(f32)
    assert set(m["graphs"]) == {"text_encoder", "unet", "decoder"}
    loaded = {g: onnx.load(str(f32 / e["file"])) for g, e in m["graphs"].items()}
    inputs = {g: [(i.name, i.type.tensor_type.elem_type, len(i.type.tensor_type.shape.dim))
                  for i in model.graph.input] for g, model in loaded.items()}
    P = onnx.TensorProto
    assert inputs["text_encoder"] == [("tokens", P.INT64, 2)]
    assert inputs["unet"] == [("sample", P.FLOAT, 4), ("timestep", P.FLOAT, 1), ("context", P.FLOAT, 3)]
    assert inputs["decoder"] == [("decoder_input", P.FLOAT, 4)]
    for g, main in (("text_encoder", "text_embeddings"), ("unet", "unet.out"), ("decoder", "decoder.out")):
        outputs = [o.name for o in loaded[g].graph.output]
        assert outputs[0] == main and sorted(outputs) == sorted(m["graphs"][g]["points"]), g
        assert not m["graphs"][g]["not_exported"], g
    golden, _ = mdref.load_trace(GOLDEN / "trace.safetensors")
    exported = {p for e in m["graphs"].values() for p in e["points"]}
    assert set(golden) - exported <= set(m["pipeline_points"]), set(golden) - exported - set(m["pipeline_points"])
    from mdref.formats.safetensors import read_safetensors
    for g, sub, file in (("text_encoder", "text_encoder", "model.safetensors"),
                         ("unet", "unet", "diffusion_pytorch_model.safetensors"),
                         ("decoder", "vae", "diffusion_pytorch_model.safetensors")):
        keys = set(read_safetensors(DEFAULT / sub / file)[0])
        inits = {i.name for i in loaded[g].graph.initializer}
        assert keys <= inits, (g, sorted(keys - inits)[:5])
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.bias" in \
        {i.name for i in loaded["unet"].graph.initializer}


def test_onnxruntime_agrees_with_the_golden_trace_at_every_point(f32):
    report = mdref.compare(GOLDEN / "trace.safetensors", _ort_trace(f32))
    golden, _ = mdref.load_trace(GOLDEN / "trace.safetensors")
    worst = max(report.points, key=lambda p: p.rel_to_max)
    print(f"ORT float32: {len(report.points)} points, worst rel err {worst.rel_to_max:.2e} at {worst.name}")
    assert {p.precision for p in report.points} == {"float32", "exact"}              # tokens: integers
    assert not report.only_in_a and len(report.points) == len(golden)
    assert report.ok, report.first_divergence


def test_float16_export_agrees_at_the_float16_tolerance(f16):
    """At t = 999 a float16 sinusoid is off by up to ~0.25 (rel err 0.36 at unet.time_embedding in the converters'
    graphs); computed in float32, the time embedding's error is that of a few float16 roundings of two linear
    layers: under 20 u (u = 2**-11, 9.8e-3)."""
    m = load_points(f16)
    kept = m["graphs"]["unet"]["float32_kept"]
    assert kept["initializers"] and kept["values"], kept            # the frequency table and the sinusoid
    model = onnx.load(str(f16 / "unet.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    types |= {i.name: i.data_type for i in model.graph.initializer}
    sinusoid = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert sinusoid and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in sinusoid)
    assert [i["dtype"] for i in m["graphs"]["unet"]["inputs"]] == ["float16", "float32", "float16"]
    report = mdref.compare(GOLDEN / "trace.safetensors", _ort_trace(f16, m))
    worst = max(report.points, key=lambda p: p.rel_to_max)
    temb = next(p for p in report.points if p.name == "unet.time_embedding")
    print(f"ORT float16: {len(report.points)} points, worst {worst.rel_to_max:.2e} at {worst.name}; "
          f"unet.time_embedding {temb.rel_to_max:.2e}")
    assert {p.precision for p in report.points} == {"float16", "exact"} and not report.only_in_a
    assert report.ok, report.first_divergence
    assert temb.rel_to_max < 20 * 2.0 ** -11


def test_an_edited_initializer_is_named_by_compare(f32, tmp_path):
    """edit_initializer finds a layer's bias by its parameter path; +1e-2 on one entry is named at that layer."""
    from mdref_torch.export import edit_initializer, read_initializer

    folder = tmp_path / "edited"
    shutil.copytree(f32, folder)
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.bias"
    old = edit_initializer(folder / "unet.onnx", name, lambda b: b + np.eye(1, b.size, 0, b.dtype)[0] * 1e-2)
    assert np.array_equal(read_initializer(onnx.load(str(folder / "unet.onnx")), name) - old,
                          np.eye(1, old.size, 0, old.dtype)[0] * np.float32(1e-2))
    report = mdref.compare(GOLDEN / "trace.safetensors", _ort_trace(folder))
    assert report.first_divergence == "unet.mid_block.attentions.0.transformer_blocks.0.attn2"


def test_an_edited_initializer_is_the_first_local_divergence(f32, tmp_path):
    """mdref compare --local: mdref re-run with ORT's value forced at every point. The edited layer's own
    (local) error is over its tolerance; every point after it computes, in mdref, from ORT's inputs exactly what
    ORT computes, so its local error stays within float32 rounding, though the edit reaches it end to end."""
    from mdref_torch.export import edit_initializer

    folder = tmp_path / "edited"
    shutil.copytree(f32, folder)
    edit_initializer(folder / "unet.onnx", "mid_block.resnets.0.conv1.depthwise.bias", lambda b: b + 0.05)
    report = mdref.compare(GOLDEN / "trace.safetensors", _ort_trace(folder), local=mdref.Pipeline.from_pretrained())
    names = [p.name for p in report.points]
    at = names.index("unet.mid_block.resnets.0")
    assert report.first_local_divergence == "unet.mid_block.resnets.0"
    after = [p for p in report.points[at + 1:] if p.local is not None and p.precision != "exact"]
    worst = max(after, key=lambda p: p.local["rel_to_max"])
    print(f"edited: local {report.points[at].local['rel_to_max']:.2e} at the edited ResNet; worst local after it "
          f"{worst.local['rel_to_max']:.2e} at {worst.name}; end to end {report.first_divergence}")
    assert all(p.local["ok"] for p in after) and any(not p.ok for p in after)


def test_without_points_each_point_is_still_a_named_value(tmp_path):
    """Exported without --points, a graph has its main output only, and each point is the name of the value
    inside it (the text encoder: the quickest to export)."""
    from mdref_torch.export import _export_graph, example_inputs, Prepared

    pipe = mdref.Pipeline.from_pretrained()
    prep = Prepared(pipe, "text_encoder", example_inputs(pipe)["text_encoder"])
    entry = _export_graph(prep, tmp_path / "text_encoder.onnx", points=False, log=print)
    model = onnx.load(str(tmp_path / "text_encoder.onnx"))
    assert [o.name for o in model.graph.output] == ["text_embeddings"] == [o["name"] for o in entry["outputs"]]
    values = {o for n in model.graph.node for o in n.output}
    assert set(entry["points"]) <= values and len(entry["points"]) == 9
    assert not any(p["output"] for n, p in entry["points"].items() if n != "text_embeddings")


def _all_values(folder, m):
    """Every value ORT computes in the three graphs (each made a graph output), under scrambled names."""
    rng = np.random.default_rng(0)
    out = {}

    def run_graph(graph, feeds):
        model = onnx.shape_inference.infer_shapes(onnx.load(str(folder / m["graphs"][graph]["file"])))
        have = {o.name for o in model.graph.output}
        for v in model.graph.value_info:
            if v.name not in have:
                model.graph.output.append(v)
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in s.get_outputs()]
        results = dict(zip(names, s.run(None, feeds)))
        for k, v in [*feeds.items(), *results.items()]:
            out[f"{graph}/{k}"] = np.asarray(v)
        return results

    run_exported(run_graph, m, np.load(GOLDEN / "token_ids.npy"), np.load(GOLDEN / "noise.npy"))
    keys = list(out)
    rng.shuffle(keys)
    return {f"t{i:04d}": out[k] for i, k in enumerate(keys)}


def test_match_names_every_ort_value_by_value(f32, tmp_path):
    """`mdref match`: ORT's ~900 values under names that say nothing; every golden point but `image` (computed
    outside the graphs) is matched, exactly or with high confidence, and the mapped trace agrees with the golden
    one at every point."""
    from mdref.formats.safetensors import write_safetensors

    cand = _all_values(f32, load_points(f32))
    write_safetensors(tmp_path / "ort.safetensors", cand)
    status = cli.main(["match", str(GOLDEN / "trace.safetensors"), str(tmp_path / "ort.safetensors"), "-o",
                       str(tmp_path / "mapped.safetensors"), "--json"])
    assert status == 1                                     # `image` has no counterpart
    mapped, manifest = mdref.load_trace(tmp_path / "mapped.safetensors")
    golden, _ = mdref.load_trace(GOLDEN / "trace.safetensors")
    assert set(golden) - set(mapped) == {"image"}
    assert {v["confidence"] for v in manifest["match"].values()} <= {"exact", "high"}, \
        {k: v for k, v in manifest["match"].items() if v["confidence"] not in ("exact", "high")}
    assert mdref.compare(golden, mapped).ok
    print(f"match: {len(mapped)} of {len(golden)} points among {len(cand)} ORT values")


def test_export_without_the_extra_says_how_to_install(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert cli.main(["export", "onnx", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mdref: error: ") and 'pip install "mdref[export]"' in err[0]
    assert "onnxscript" in err[0] and not (tmp_path / "x").exists()
