"""LiteRT (TFLite) against mdref: the PyTorch modules of mdref_torch converted by litert-torch, on golden case N.

    pip install "mdref[export]" litert-torch==0.10.0 torch==2.13.0  # torch pinned: litert-torch would pull another
    python examples/runtimes/run_litert.py                           # float32

litert-torch converts each component's mdref_torch.export.Prepared wrapper (its module returning the main output
and every point mdref records, in execution order) to a .tflite flatbuffer and runs it in the LiteRT interpreter
(CPU, XNNPACK delegate); TFLite keeps no module names, so the output list is the point list (or, for a model
converted elsewhere, dump its tensors and let `mdref match` name them). Exit status: `mdref compare`'s.
"""

from __future__ import annotations

import sys

import numpy as np

import common


def compile_graph(prep, out):
    import litert_torch

    model = litert_torch.convert(prep.wrapper.eval(), prep.args)
    model.export(str(out / f"{prep.graph}-{prep.dtype}.tflite"))
    # TFLite takes the token ids as int32 (litert-torch lowers int64 inputs to int32)
    return lambda inputs: [np.asarray(x) for x in model(*[a.astype(np.int32) if a.dtype == np.int64 else a
                                                          for a in inputs])]


def main(argv=None):
    from importlib.metadata import version

    args = common.parse_args(__doc__.split("\n\n")[0], argv, dtypes=("float32",))
    return common.torch_recipe(args, f"litert {version('ai-edge-litert')} (litert-torch {version('litert-torch')})",
                               compile_graph)


if __name__ == "__main__":
    sys.exit(main())
