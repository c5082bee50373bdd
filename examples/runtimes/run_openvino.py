"""OpenVINO against mdref: it reads the exported ONNX graphs, runs them on golden case N, `mdref compare` checks.

    pip install "mdref[export]" openvino==2026.4.1
    python examples/runtimes/run_openvino.py                         # float32
    python examples/runtimes/run_openvino.py --dtype float16         # the float16 export
    python examples/runtimes/run_openvino.py --hint default          # the CPU plugin's own choice

CPU device. `--hint` sets INFERENCE_PRECISION_HINT: f32 (the default here: float32 is what the float32 comparison
is about), bf16, f16, or `default` (leave it unset). Measured on an AMD EPYC with avx512_bf16 (docs/runtimes.md):
left unset, the plugin computes in **bfloat16** (its OPTIMIZATION_CAPABILITIES list BF16): at float32's tolerance
the first text encoder layer diverges (4e-3, bfloat16 rounding), and at bfloat16's (`mdref compare --rtol 5e-2`)
exactly one point does, unet.time_embedding (rel err 3.96: the timestep sinusoid's argument 999 * freq rounded to
bfloat16, whose spacing at 999 is 4); with f32 every point agrees. A CPU without AVX512-BF16 / AMX computes f32
whatever the hint; one without AVX512-FP16 ignores f16. Exit status: `mdref compare`'s.
"""

from __future__ import annotations

import sys

import common


def runner(folder, manifest, hint="f32"):
    """run_graph for mdref.exported.run_exported: one compiled model per graph, outputs by their tensor names."""
    import openvino as ov

    core = ov.Core()
    config = {} if hint == "default" else {"INFERENCE_PRECISION_HINT": hint}
    compiled = {g: core.compile_model(core.read_model(str(folder / e["file"])), "CPU", config)
                for g, e in manifest["graphs"].items()}

    def run_graph(graph, feeds):
        results = compiled[graph](feeds)
        return {name: results[port] for port in compiled[graph].outputs for name in port.get_names()}
    return run_graph


def main(argv=None):
    import openvino as ov

    args = common.parse_args(__doc__.split("\n\n")[0], argv, extra=lambda ap: ap.add_argument(
        "--hint", choices=["f32", "bf16", "f16", "default"], default="f32", help="INFERENCE_PRECISION_HINT"))
    used = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT") if args.hint == "default" else args.hint
    return common.onnx_recipe(args, f"openvino {ov.__version__.split('-')[0]} {args.hint} ({used})",
                              lambda folder, manifest: runner(folder, manifest, args.hint))


if __name__ == "__main__":
    sys.exit(main())
