"""ONNX Runtime against mdref: export the model, run it in ORT on a golden case's token ids and noise, compare.

    pip install "mdref[export]"                    # torch 2.13.0, onnx 1.23.2, onnxscript 0.7.2, onnxruntime 1.32.0
    python examples/runtimes/run_onnxruntime.py                      # the embedded default model, float32
    python examples/runtimes/run_onnxruntime.py --dtype float16      # the float16 export
    python examples/runtimes/run_onnxruntime.py --preset mobilediffusion --case 1

CPU execution provider, graph optimisations at ORT's default level (all). Exit status: `mdref compare`'s.
"""

from __future__ import annotations

import sys

import common


def runner(folder, manifest, **session_options):
    """run_graph for mdref.exported.run_exported: one InferenceSession per graph, every output by name."""
    import onnxruntime as ort

    sessions = {g: ort.InferenceSession(str(folder / e["file"]), providers=["CPUExecutionProvider"],
                                        **session_options) for g, e in manifest["graphs"].items()}

    def run_graph(graph, feeds):
        s = sessions[graph]
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
    return run_graph


def main(argv=None):
    import onnxruntime as ort

    args = common.parse_args(__doc__.split("\n\n")[0], argv)
    return common.onnx_recipe(args, f"onnxruntime {ort.__version__}", runner)


if __name__ == "__main__":
    sys.exit(main())
