"""ExecuTorch (XNNPACK) against mdref: the PyTorch modules of mdref_torch, lowered to XNNPACK, on golden case N.

    pip install "mdref[export]" executorch==1.5.1 torch==2.13.0     # torch pinned: executorch would pull another
    python examples/runtimes/run_executorch.py                       # float32
    python examples/runtimes/run_executorch.py --dtype float16       # the modules cast to float16: XNNPACK fp16

ExecuTorch has no ONNX reader: each component's mdref_torch.export.Prepared wrapper (its module returning the main
output and every point mdref records, in execution order) goes through torch.export, to_edge_transform_and_lower
with the XnnpackPartitioner, and runs in executorch.runtime; its output list is the point list. Exit status:
`mdref compare`'s.
"""

from __future__ import annotations

import sys

import common


def compile_graph(prep, out):
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    program = torch.export.export(prep.wrapper, prep.args)
    pte = out / f"{prep.graph}-{prep.dtype}.pte"
    pte.write_bytes(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    method = Runtime.get().load_program(pte).load_method("forward")
    return lambda inputs: [x.numpy() for x in method.execute([torch.from_numpy(a) for a in inputs])]


def main(argv=None):
    from importlib.metadata import version

    args = common.parse_args(__doc__.split("\n\n")[0], argv)
    return common.torch_recipe(args, f"executorch {version('executorch')} xnnpack", compile_graph)


if __name__ == "__main__":
    sys.exit(main())
