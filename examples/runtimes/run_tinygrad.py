"""tinygrad against mdref: its ONNX runner executes the exported graphs on golden case N, `mdref compare` checks.

    pip install "mdref[export]" tinygrad==0.14.0
    apt-get install clang                        # tinygrad's CPU device compiles its kernels with clang
    python examples/runtimes/run_tinygrad.py                         # float32
    python examples/runtimes/run_tinygrad.py --dtype float16         # the float16 export: tinygrad computes float16

tinygrad.nn.onnx.OnnxRunner on the CPU device (DEV=CPU). With --points every point is a graph output, so one run
returns them all. Exit status: `mdref compare`'s.
"""

from __future__ import annotations

import os
import sys

import common


def runner(folder, manifest):
    """run_graph for mdref.exported.run_exported: one OnnxRunner per graph, every graph output by name."""
    os.environ.setdefault("DEV", "CPU")
    from tinygrad.nn.onnx import OnnxRunner

    runners = {g: OnnxRunner(str(folder / e["file"])) for g, e in manifest["graphs"].items()}
    for r in runners.values():
        # tinygrad 0.14's Gather fast path for constant indices reads them as a flat list and fails on the text
        # encoder's [1, 77] position ids (TypeError: '<' between list and int): those take the general path.
        for node in r.graph_nodes:
            if node.op == "Gather" and node.inputs[1] in r.graph_values and r.graph_values[node.inputs[1]].ndim > 1:
                r.const_names.discard(node.inputs[1])

    def run_graph(graph, feeds):
        return {name: t.numpy() for name, t in runners[graph](feeds).items()}
    return run_graph


def main(argv=None):
    from importlib.metadata import version

    args = common.parse_args(__doc__.split("\n\n")[0], argv)
    return common.onnx_recipe(args, f"tinygrad {version('tinygrad')}", runner)


if __name__ == "__main__":
    sys.exit(main())
