"""What the tests share: one relative error, one random initialisation of PyTorch oracles, one bounded check that
says what it measured, and the unit roundoffs the bounds are derived from.

A numerical assertion in these tests is a fact about mdref on any x86-64 machine, not about one machine's BLAS
kernel: it bounds mdref against a float64 result with a margin derived from the dtype's unit roundoff (below), or
it compares with a third-party float32 / float16 result (PyTorch) with a margin that covers every kernel measured
(benchmarks/kernel_spread.py runs the numerical tests under the default OpenBLAS / oneDNN kernels, under forced
AVX2 kernels and with one thread; benchmarks/kernel-spread.md holds the result). `within` asserts a bound and,
when MDREF_ERROR_LOG names a file, appends what it measured there (one JSON object per line), which is how that
spread is collected. `kernel()` says which kernels ran; the pytest header prints it.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

# Unit roundoffs (half an ulp of 1): a correctly rounded operation errs by at most this, relative.
U64 = 2.0 ** -53
U32 = 2.0 ** -24
U16 = 2.0 ** -11
UBF16 = 2.0 ** -8


def rel_err(ours, ref):
    """max |ours - ref| / max |ref| over whole tensors, in float64 (the measure every parity test uses)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def nmse(a, ref):
    """sum (a - ref)^2 / sum ref^2, in float64."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(((a - ref) ** 2).sum() / (ref ** 2).sum())


def within(what, err, bound, why=""):
    """Assert err <= bound (both finite numbers), printing and logging the measurement (MDREF_ERROR_LOG)."""
    err, bound = float(err), float(bound)
    print(f"{what}: {err:.3e} (bound {bound:.1e}{'; ' + why if why else ''})")
    log = os.environ.get("MDREF_ERROR_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        with open(log, "a") as f:
            f.write(json.dumps({"test": test, "what": what, "err": err, "bound": bound}) + "\n")
    assert math.isfinite(err) and err <= bound, f"{what}: {err:.3e} > bound {bound:.1e}"
    return err


def randomize(model, seed, *, spread=0.1):
    """Every parameter of a PyTorch module random, so no wrong eps, affine or bias hides behind the defaults (ones
    / zeros, or diffusers' zero-initialised output layers): matrices and kernels ~ N(0, 1/fan_in), norm scales
    ~ 1 + N(0, spread^2), other vectors ~ N(0, spread^2). Drawn in float64 from torch.Generator(seed)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.ndim > 1:
                p.copy_(r / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + spread * r)
            else:
                p.copy_(spread * r)
    return model.eval()


def kernel():
    """Which kernels this process computes with: OpenBLAS's core type and threads (numpy), PyTorch's CPU capability
    and threads, and the environment variables that force them."""
    info = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "ONEDNN_MAX_CPU_ISA",
                                       "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS") if k in os.environ}
    try:
        from threadpoolctl import threadpool_info

        blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if blas:
            info["numpy_blas"] = f"{blas[0].get('internal_api')} {blas[0].get('architecture')} " \
                                 f"{blas[0].get('num_threads')} threads"
    except ImportError:
        info["numpy_blas"] = "unknown (threadpoolctl not installed)"
    try:
        import torch

        info["torch_cpu"] = f"{torch.backends.cpu.get_cpu_capability()} {torch.get_num_threads()} threads"
    except ImportError:
        pass
    return info
