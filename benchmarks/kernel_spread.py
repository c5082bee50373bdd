"""How far mdref's numerical tests and golden bundle move when the BLAS / oneDNN kernels change.

    python benchmarks/kernel_spread.py [--out benchmarks/kernel-spread.md] [--configs default,avx2-1thread,...]

One machine can compute with several kernels: OpenBLAS picks its kernel by CPU (OPENBLAS_CORETYPE forces one;
Haswell is AVX2 + FMA, Sandybridge AVX without FMA), PyTorch's ATen by ATEN_CPU_CAPABILITY (avx512 / avx2 /
default) and oneDNN by ONEDNN_MAX_CPU_ISA, and both sum in another order with another thread count. This script
runs, under each configuration below (each in its own processes, the environment set for them only):

1. the numerical tests (tests/oracles.within logs every bounded error to MDREF_ERROR_LOG), and reports per
   assertion the error under each configuration, its bound and the smallest margin (bound / largest error);
2. `mdref golden` of the embedded default model, compared point by point with the shipped weights/golden (float32)
   and with a float64 golden of the same cases, and reports per point kind the largest relative error.

A bound whose margin is under 2 on any configuration is flagged: it would assert a fact about one machine's kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "default": {},
    "1thread": {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    "avx2": {"OPENBLAS_CORETYPE": "Haswell", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "avx2-1thread": {"OPENBLAS_CORETYPE": "Haswell", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                     "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    "sandybridge": {"OPENBLAS_CORETYPE": "Sandybridge", "ATEN_CPU_CAPABILITY": "default"},
}
# The tests whose assertions are numerical: those marked `numerics` (parity, precision, golden, recipe parity, ops,
# sampler), as .ci/run's second pass selects them.
TESTS = ["-m", "numerics"]
KINDS = [("tokens", "tokens"), ("text encoder", "text_encoder."), ("text embeddings", "text_embeddings"),
         ("noise", "noise"), ("time embedding", "unet.time_embedding"), ("UNet", "unet."), ("x0", "latents.x0"),
         ("sampler", "sampler."), ("decoder", "decoder."), ("image", "image")]


def _env(config):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **CONFIGS[config])
    for k in ("OPENBLAS_CORETYPE", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OPENBLAS_NUM_THREADS",
              "OMP_NUM_THREADS"):
        if k not in CONFIGS[config] and k in os.environ:
            del env[k]
    return env


def run_tests(config, log):
    env = dict(_env(config), MDREF_ERROR_LOG=str(log))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    tail = p.stdout.strip().splitlines()[-1:] if p.stdout.strip() else [p.stderr.strip()[-200:]]
    print(f"{config}: pytest exit {p.returncode} in {time.perf_counter() - t0:.0f} s ({tail[0] if tail else ''})",
          file=sys.stderr)
    failed = [line for line in p.stdout.splitlines() if line.startswith("FAILED")]
    return p.returncode, failed


def run_golden(config, folder, dtype):
    subprocess.run([sys.executable, "-m", "mdref", "golden", str(folder), "--dtype", dtype], cwd=ROOT,
                   env=_env(config), check=True, capture_output=True)


def kind_of(name):
    for kind, prefix in KINDS:
        if name == prefix or name.startswith(prefix):
            return kind
    return "other"


def golden_spread(a_dir, b_dir):
    """{point kind: largest max|a - b| / max|b|} over every case's trace (b is the reference)."""
    from mdref.trace import load_trace

    worst = {}
    for case in sorted(p for p in Path(b_dir).iterdir() if (p / "trace.safetensors").is_file()):
        ta, _ = load_trace(Path(a_dir) / case.name / "trace.safetensors")
        tb, _ = load_trace(case / "trace.safetensors")
        for name, ref in tb.items():
            a, ref = np.asarray(ta[name], np.float64), np.asarray(ref, np.float64)
            scale = np.abs(ref).max()
            err = float(np.abs(a - ref).max() / scale) if scale > 0 else float(np.abs(a).max())
            k = kind_of(name)
            worst[k] = max(worst.get(k, 0.0), err)
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "kernel-spread.md"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args(argv)
    configs = args.configs.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="mdref-spread-"))
    errors, status = {}, {}
    for c in configs:
        if not args.skip_tests:
            log = tmp / f"{c}.jsonl"
            status[c] = run_tests(c, log)
            for line in log.read_text().splitlines() if log.is_file() else []:
                r = json.loads(line)
                errors.setdefault((r["test"], r["what"]), {"bound": r["bound"]})[c] = r["err"]
        run_golden(c, tmp / f"golden-{c}", "float32")
    run_golden("default", tmp / "golden-float64", "float64")
    report = render(configs, errors, status, tmp)
    Path(args.out).write_text(report)
    print(report)


def kernel_line(config):
    code = "import sys; sys.path.insert(0, 'tests'); import numpy, torch; from oracles import kernel; print(kernel())"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(config), capture_output=True, text=True)
    return p.stdout.strip() or p.stderr.strip()[-200:]


def render(configs, errors, status, tmp):
    import platform

    lines = ["# Numerical results across kernels (`benchmarks/kernel_spread.py`)", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
             f"{time.strftime('%Y-%m-%d')}. Configurations (environment set for that run only):", ""]
    for c in configs:
        env = " ".join(f"{k}={v}" for k, v in CONFIGS[c].items()) or "(environment as found)"
        lines.append(f"- **{c}**: `{env}` -> {kernel_line(c)}")
    if status:
        lines += ["", "pytest per configuration: " + "; ".join(
            f"{c} exit {s[0]}" + (f" ({len(s[1])} failed: {', '.join(s[1][:3])})" if s[1] else "")
            for c, s in status.items())]
    if errors:
        lines += ["", "## Every bounded error (tests/oracles.within), smallest margin first", "",
                  "| test | what | " + " | ".join(configs) + " | bound | margin |",
                  "|---|---|" + "---|" * len(configs) + "---|---|"]
        rows = []
        for (test, what), r in errors.items():
            worst = max((r[c] for c in configs if c in r), default=0.0)
            margin = r["bound"] / worst if worst > 0 else float("inf")
            rows.append((margin, test, what, r))
        for margin, test, what, r in sorted(rows, key=lambda x: x[0]):
            cells = " | ".join(f"{r[c]:.2e}" if c in r else "-" for c in configs)
            flag = " **<2**" if margin < 2 else ""
            lines.append(f"| {test.split('::')[-1]} | {what} | {cells} | {r['bound']:.0e} | {margin:.1f}{flag} |")
    lines += ["", "## The golden bundle: largest relative error per point kind (max|a - b| / max|b| per point)", "",
              "| point kind | " + " | ".join(f"{c} vs shipped" for c in configs)
              + " | " + " | ".join(f"{c} vs float64" for c in configs) + " |",
              "|---|" + "---|" * (2 * len(configs))]
    shipped = ROOT / "weights" / "golden"
    vs_shipped = {c: golden_spread(tmp / f"golden-{c}", shipped) for c in configs}
    vs_f64 = {c: golden_spread(tmp / f"golden-{c}", tmp / "golden-float64") for c in configs}
    for kind, _ in KINDS:
        cells = [f"{vs_shipped[c].get(kind, float('nan')):.1e}" for c in configs]
        cells += [f"{vs_f64[c].get(kind, float('nan')):.1e}" for c in configs]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
