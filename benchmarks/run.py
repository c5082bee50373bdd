"""mdref vs PyTorch, component by component, at full size with seeded weights (issues 17, 33). See
benchmarks/README.md.

    python benchmarks/run.py [--quick] [--components clip,md-unet,...] [--runs N] [--float64 none|small|all]
                             [--kernels default,avx2] [--clock wall|cpu] [--threads 2] [--rss-batches 1,4]
                             [--no-rss] [--json out.json] [--markdown out.md]

Each component runs in child processes, one after the other, so that at most one component's weights are in
memory: one child per kernel set (the machine's default kernels, then the forced AVX2 ones: AVX2_ENV, set in that
child's environment only) builds both sides and times them interleaved (mdref, torch, mdref, torch, ...), and for
peak RSS one child per side (and batch) builds only that side and calls it once. Timings are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The forced AVX2 run: the kernels an AVX2-only machine (an AMD EPYC before Zen 4, an older Xeon) runs, on both sides.
AVX2_ENV = {"OPENBLAS_CORETYPE": "Haswell",           # NumPy's OpenBLAS: the Haswell (AVX2) kernels
            "ONEDNN_MAX_CPU_ISA": "AVX2",             # torch's convolutions (oneDNN)
            "MKL_ENABLE_INSTRUCTIONS": "AVX2",        # torch's matmuls (MKL)
            "ATEN_CPU_CAPABILITY": "avx2"}            # torch's elementwise kernels
# + NPY_DISABLE_CPU_FEATURES: NumPy's own AVX-512 loops, named as this NumPy build names them (npy_avx512_targets)
KERNEL_VARS = (*AVX2_ENV, "NPY_DISABLE_CPU_FEATURES", "OPENBLAS_L2_SIZE")
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
GIB = 1024 ** 3
MATMUL_N = 2048


# ===================================================================================================== child side
def _set_threads(threads):
    import torch
    torch.set_num_threads(threads)
    return torch


def blas_info():
    """Which BLAS / OpenMP libraries are loaded, their kernel and thread counts (threadpoolctl if installed)."""
    try:
        import threadpoolctl
        return {"source": "threadpoolctl", "pools": [
            {k: d.get(k) for k in ("user_api", "internal_api", "version", "architecture", "num_threads",
                                   "threading_layer", "prefix")} for d in threadpoolctl.threadpool_info()]}
    except ImportError:
        import numpy as np
        try:
            blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
            desc = {k: blas.get(k) for k in ("name", "version", "openblas configuration")}
        except Exception as e:                                     # noqa: BLE001 (numpy < 1.25: no dict mode)
            desc = {"name": f"unknown ({e})"}
        return {"source": "numpy.show_config (pip install threadpoolctl for the kernel and threads)",
                "pools": [dict(user_api="blas", internal_api=desc.get("name"), version=desc.get("version"),
                               architecture=None, num_threads=None, build=desc.get("openblas configuration"))]}


def _mem():
    """(VmRSS, VmHWM) in bytes from /proc/self/status (None off Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out.get("VmRSS"), out.get("VmHWM")


def _reset_peak():
    """Reset the process's peak RSS (VmHWM) to its current RSS: Linux >= 4.0, `echo 5 > /proc/self/clear_refs`."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _ru_maxrss():
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024           # bytes


def npy_avx512_targets():
    """NumPy's dispatch targets above AVX2 in this build (2.x: X86_V4, AVX512_ICL, ...; 1.x: AVX512F, ...)."""
    from numpy._core._multiarray_umath import __cpu_dispatch__
    return [t for t in __cpu_dispatch__ if "AVX512" in t or t == "X86_V4"]


def kernel_env(kernel, clock):
    """This process's environment for a timing child: the kernel variables removed (default) or set (avx2), and
    one thread for every library when the clock is the thread's CPU time."""
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_VARS}
    if kernel == "avx2":
        env.update(AVX2_ENV)
        if npy_avx512_targets():
            env["NPY_DISABLE_CPU_FEATURES"] = " ".join(npy_avx512_targets())
    if clock == "cpu":
        env.update({k: "1" for k in THREAD_VARS})
    return env


def _clock(name):
    return time.thread_time if name == "cpu" else time.perf_counter


def matmul_gflops(torch=None, repeats=3, clock=time.perf_counter):
    """min-of-`repeats` GFLOP/s of a 2048^3 float32 matmul in NumPy and (if given) torch, after one warm-up."""
    import numpy as np
    r = np.random.default_rng(0)
    a, b = (r.standard_normal((MATMUL_N, MATMUL_N)).astype(np.float32) for _ in range(2))
    flops = 2 * MATMUL_N ** 3
    out = {}
    sides = {"numpy": lambda: a @ b}
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        sides["torch"] = lambda: torch.matmul(ta, tb)
    for name, fn in sides.items():
        fn()
        ts = []
        for _ in range(repeats):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
        out[name] = flops / min(ts) / 1e9
    return out


def _max_rel(a, b):
    """max|a - b| / max|b| (b the torch side), in float64."""
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def child_time(a):
    """Build both sides, count the torch side's FLOPs once, warm up, then time them interleaved."""
    import numpy as np
    torch = _set_threads(a.threads)
    import components as C
    comp = C.COMPONENTS[a.component]()
    clock = _clock(a.clock)
    res = {"component": a.component, "env": {k: os.environ.get(k) for k in KERNEL_VARS}, "clock": a.clock,
           "torch_capability": torch.backends.cpu.get_cpu_capability()}
    res["matmul_gflops"] = matmul_gflops(torch, clock=clock)
    t0 = time.perf_counter()
    m32 = comp["mdref"](np.float32)
    res["build_mdref_s"] = time.perf_counter() - t0
    res["weights_bytes"] = C.weight_bytes(m32)
    x = comp["inputs"](1)
    t0 = time.perf_counter()
    t32 = comp["torch_from"](m32)
    res["build_torch_s"] = time.perf_counter() - t0
    tx = tuple(torch.from_numpy(v.copy()) for v in x)
    sides = {"mdref": lambda: comp["call_mdref"](m32, x), "torch": lambda: comp["call_torch"](t32, tx)}
    from torch.utils.flop_counter import FlopCounterMode
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        sides["torch"]()
    res["flops"] = int(fc.get_total_flops())
    if a.float64 == "all" or (a.float64 == "small" and comp["small"]):
        import copy
        m64 = C.cast(m32, np.float64)
        t64 = copy.deepcopy(t32).double()
        tx64 = tuple(v.double() if v.is_floating_point() else v for v in tx)
        sides["mdref_f64"] = lambda: comp["call_mdref"](m64, x)
        sides["torch_f64"] = lambda: comp["call_torch"](t64, tx64)
    times = {k: [] for k in sides}
    last, outs = {}, {}
    with torch.inference_mode():
        for i in range(a.warmup + a.runs):              # round i: every side once, in a fixed interleaved order
            for k, fn in sides.items():
                t0 = clock()
                y = fn()
                dt = last[k] = clock() - t0
                if i >= a.warmup:
                    times[k].append(dt)
                if k not in outs:
                    outs[k] = y.numpy() if hasattr(y, "numpy") else np.asarray(y)
            print(f"    [{a.component}] round {i + 1}/{a.warmup + a.runs}"
                  f"{' (warm-up)' if i < a.warmup else ''}: " +
                  ", ".join(f"{k} {last[k]:.3f}s" for k in sides), file=sys.stderr,
                  flush=True)
    res["times"] = times
    if "torch" in outs:
        res["max_rel_diff"] = _max_rel(outs["mdref"], outs["torch"])
    if "torch_f64" in outs:
        res["max_rel_diff_f64"] = _max_rel(outs["mdref_f64"], outs["torch_f64"])
    res["blas"] = blas_info()
    res["torch_threads"] = None if torch is None else torch.get_num_threads()
    return res


def child_rss(a):
    """Build ONE side (mdref with seeded weights, or the torch module with torch's own init) and call it once at
    batch a.batch. Reports the process's ru_maxrss (import + build + call) and the peak during the call (VmHWM
    reset after the build)."""
    import numpy as np
    torch = _set_threads(a.threads) if a.side == "torch" else None
    import components as C
    comp = C.COMPONENTS[a.component]()
    t0 = time.perf_counter()
    if a.side == "mdref":
        obj = comp["mdref"](np.float32)
        weights = C.weight_bytes(obj)
    else:
        obj = comp["torch_alone"]()
        weights = sum(p.numel() * p.element_size() for p in obj.parameters())
    build = time.perf_counter() - t0
    x = comp["inputs"](a.batch)
    rss_built, _ = _mem()
    reset = _reset_peak()
    t0 = time.perf_counter()
    if torch is None:
        comp["call_mdref"](obj, x)
    else:
        with torch.inference_mode():
            comp["call_torch"](obj, tuple(torch.from_numpy(v.copy()) for v in x))
    call = time.perf_counter() - t0
    _, hwm = _mem()
    return {"component": a.component, "side": a.side, "batch": a.batch, "weights_bytes": weights,
            "build_s": build, "call_s": call, "rss_after_build": rss_built,
            "peak_call": hwm if reset else None, "ru_maxrss": _ru_maxrss(),
            "torch_imported": "torch" in sys.modules}


# =============================================================================================== orchestrator
def _spawn(args, env=None):
    """Run this file as a child with `args`; return its JSON result (None, with the error printed, on failure)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args, "--out", out], env=env)
        if p.returncode != 0:
            print(f"  child {' '.join(args)} failed with exit status {p.returncode}", file=sys.stderr)
            return None
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _s(xs):
    return f"{min(xs):.3f} / {statistics.median(xs):.3f}" if xs else "-"


def _g(b):
    return "-" if b is None else f"{b / GIB:.3f}"


KERNEL_TITLES = {"default": "the machine's default kernels",
                 "avx2": "forced AVX2 kernels (" + ", ".join(f"{k}={v}" for k, v in AVX2_ENV.items())
                         + ", NPY_DISABLE_CPU_FEATURES = NumPy's AVX-512 targets)"}
TARGET_RATIO = {"pipeline": 1.0}           # issue 33: mdref / torch <= 1.25 for every component, <= 1.0 for this
TARGET_F64 = 2.2                           # float64 / float32 time (mdref)
TARGET_RSS_GIB = 1.5                       # mdref peak RSS at batch 4 <= weights + this


def _speed_table(rows):
    head = ["component", "torch side", "GFLOP", "mdref s", "torch s", "mdref/torch", "mdref GFLOP/s",
            "torch GFLOP/s", "matmul np/torch GFLOP/s", "max rel diff", "f64/f32 mdref", "f64/f32 torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r.get("times", {})
        mn = {k: min(v) for k, v in t.items() if v}
        fl = r.get("flops")
        row = [r["label"], r["torch_label"], f"{fl / 1e9:.1f}" if fl else "-", _s(t.get("mdref")),
               _s(t.get("torch")), f"{mn['mdref'] / mn['torch']:.2f}" if "torch" in mn else "-",
               f"{fl / mn['mdref'] / 1e9:.1f}" if fl else "-", f"{fl / mn['torch'] / 1e9:.1f}" if fl else "-",
               f"{r['matmul_gflops'].get('numpy', 0):.0f} / {r['matmul_gflops'].get('torch', 0):.0f}",
               f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else "-",
               f"{mn['mdref_f64'] / mn['mdref']:.2f}" if "mdref_f64" in mn else "-",
               f"{mn['torch_f64'] / mn['torch']:.2f}" if "torch_f64" in mn else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _ratio(r, num="mdref", den="torch"):
    t = r.get("times", {})
    return min(t[num]) / min(t[den]) if t.get(num) and t.get(den) else None


def markdown(report):
    m, args = report["machine"], report["args"]
    clock = "thread CPU time, one thread on both sides" if args["clock"] == "cpu" else "wall time"
    lines = ["# mdref vs PyTorch (seeded full-size weights, float32, batch 1 unless noted)", "",
             f"- CPU: {m['cpu']} ({m['cpus']} CPUs); Python {m['python']}, NumPy {m['numpy']}, torch {m['torch']}",
             f"- torch threads: {m['torch_threads']}; runs: {args['runs']} timed after {args['warmup']} warm-up, "
             f"interleaved; times are min / median seconds of {clock}"]
    for kernel, k in m["kernels"].items():
        pools = ", ".join(f"{p.get('internal_api')} {p.get('version') or ''} kernel {p.get('architecture')} "
                          f"{p.get('num_threads')} threads" for p in k["blas"]["pools"])
        env = ", ".join(f"{v}={k['env'][v]}" for v in KERNEL_VARS if k["env"].get(v)) or "no kernel variable set"
        lines.append(f"- {kernel}: {env}; {pools}; torch CPU capability {k['torch_capability']}")
    mm = report.get("matmul_gflops") or {}
    lines.append(f"- 2048^3 float32 matmul, best over the component children: NumPy {mm.get('numpy', 0):.0f} GFLOP/s, "
                 f"torch {mm.get('torch', 0):.0f} GFLOP/s")
    kernels = list(m["kernels"])
    by = {(r["component"], r["kernel"]): r for r in report["speed"]}
    comps = list(dict.fromkeys(r["component"] for r in report["speed"]))
    head = ["component"] + [f"mdref/torch, {k}" for k in kernels] + [f"f64/f32 mdref, {k}" for k in kernels]
    lines += ["", "## Targets (issue 33)", "",
              f"mdref / torch <= 1.25 (the pipeline <= 1.0), float64 / float32 <= {TARGET_F64}; ratios of minimum "
              "times in one child.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in comps:
        cells = []
        for k in kernels:
            x = _ratio(by[(c, k)]) if (c, k) in by else None
            cells.append("-" if x is None else f"{x:.2f} {'ok' if x <= TARGET_RATIO.get(c, 1.25) else 'MISS'}")
        for k in kernels:
            x = _ratio(by[(c, k)], "mdref_f64", "mdref") if (c, k) in by else None
            cells.append("-" if x is None else f"{x:.2f} {'ok' if x <= TARGET_F64 else 'MISS'}")
        lines.append(f"| {by[(c, kernels[0])]['label'] if (c, kernels[0]) in by else c} | " + " | ".join(cells) + " |")
    for k in kernels:
        lines += ["", f"## Speed, {KERNEL_TITLES[k]}", "", *_speed_table([r for r in report["speed"]
                                                                          if r["kernel"] == k])]
    if report["rss"]:
        lines += ["", f"## Peak RSS (GiB; one child process per side, default kernels; target: mdref peak <= weights + "
                  f"{TARGET_RSS_GIB} GiB)", "",
                  "| component | batch | weights (f32) | mdref peak in call | mdref ru_maxrss | mdref peak - weights "
                  "| torch peak in call | torch ru_maxrss | mdref call s | torch call s |",
                  "|" + "---|" * 10]
        for r in report["rss"]:
            md, pt = r.get("mdref") or {}, r.get("torch") or {}
            w = md.get("weights_bytes") or pt.get("weights_bytes")
            over = (md["peak_call"] - w) / GIB if md.get("peak_call") and w else None
            lines.append(f"| {r['label']} | {r['batch']} | {_g(w)} | {_g(md.get('peak_call'))} | "
                         f"{_g(md.get('ru_maxrss'))} | {'-' if over is None else f'{over:+.2f}'}"
                         f"{'' if over is None else (' ok' if over <= TARGET_RSS_GIB else ' OVER')} | "
                         f"{_g(pt.get('peak_call'))} | {_g(pt.get('ru_maxrss'))} | {md.get('call_s', 0):.2f} | "
                         f"{pt.get('call_s', 0):.2f} |")
    lines += ["", f"Total wall time {report['wall_s']:.0f} s. Column meanings: benchmarks/README.md."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    import components as C
    ap.add_argument("--components", default=",".join(C.COMPONENTS),
                    help=f"comma-separated, from: {', '.join(C.COMPONENTS)} (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke check: 1 timed run, no warm-up, peak RSS at batch 1 only")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per side (default 3; --quick: 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs per side first (default 1; --quick: 0)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (NumPy: its BLAS default)")
    ap.add_argument("--float64", choices=("none", "small", "all"), default="small",
                    help="where to time float64 as well: small = text encoder and decoders (default), all = also "
                         "the UNets and the pipeline (float64 doubles the memory: the SD-2.1 UNet needs ~14 GB)")
    ap.add_argument("--rss-batches", default=None,
                    help="batches for the peak-RSS children of the pipeline and the SD-2.1 UNet (default 1,4; "
                         "--quick: 1); the other components are measured at batch 1")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS children")
    ap.add_argument("--kernels", default="default,avx2",
                    help="comma list: default (the kernels the libraries pick on this machine), avx2 (forced AVX2 "
                         "kernels on both sides, AVX2_ENV; default: both)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: wall time (default); cpu: the thread's CPU time with one thread on both sides "
                         "(robust on a shared machine; implies --threads 1)")
    ap.add_argument("--json", help="write the full report (every timing) as JSON")
    ap.add_argument("--markdown", help="write the Markdown tables to this file as well")
    # child modes (used by the orchestrator)
    ap.add_argument("--child", choices=("time", "rss"), help=argparse.SUPPRESS)
    ap.add_argument("--component", help=argparse.SUPPRESS)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.runs = a.runs if a.runs is not None else (1 if a.quick else 3)
    a.warmup = a.warmup if a.warmup is not None else (0 if a.quick else 1)

    if a.child:
        res = child_time(a) if a.child == "time" else child_rss(a)
        Path(a.out).write_text(json.dumps(res))
        return 0

    names = [n.strip() for n in a.components.split(",") if n.strip()]
    unknown = [n for n in names if n not in C.COMPONENTS]
    if unknown:
        ap.error(f"unknown components {unknown}; known: {', '.join(C.COMPONENTS)}")
    kernels = [k.strip() for k in a.kernels.split(",") if k.strip()]
    if not kernels or set(kernels) - {"default", "avx2"}:
        ap.error(f"--kernels: a comma list of default, avx2; found {a.kernels!r}")
    if a.clock == "cpu":
        a.threads = 1
    rss_batches = [int(b) for b in (a.rss_batches or ("1" if a.quick else "1,4")).split(",")]
    common = ["--runs", str(a.runs), "--warmup", str(a.warmup), "--threads", str(a.threads),
              "--float64", a.float64, "--clock", a.clock]
    from importlib.metadata import version       # no torch import here: the children's ru_maxrss stays theirs
    report = {"args": vars(a), "speed": [], "rss": [], "machine": {
        "cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": version("numpy"),
        "torch": version("torch"), "torch_threads": a.threads, "kernels": {}}}
    t_start = time.perf_counter()
    for name in names:
        comp = C.COMPONENTS[name]()
        for kernel in kernels:
            print(f"== {name} ({kernel} kernels): {comp['label']} vs {comp['torch_label']}", file=sys.stderr,
                  flush=True)
            r = _spawn(["--child", "time", "--component", name, *common], kernel_env(kernel, a.clock))
            if r is None:
                continue
            r.update(label=comp["label"], torch_label=comp["torch_label"], kernel=kernel)
            report["machine"]["kernels"].setdefault(kernel, {"env": r["env"], "blas": r["blas"],
                                                             "torch_capability": r["torch_capability"]})
            report["machine"]["torch_threads"] = r["torch_threads"]
            report["speed"].append(r)
        if not a.no_rss:
            for b in (rss_batches if name in ("pipeline", "sd21-unet") else [1]):
                row = {"component": name, "label": comp["label"], "batch": b}
                for side in ("mdref", "torch"):
                    print(f"   peak RSS: {side}, batch {b}", file=sys.stderr, flush=True)
                    row[side] = _spawn(["--child", "rss", "--component", name, "--side", side, "--batch", str(b),
                                        "--threads", str(a.threads)], kernel_env("default", "wall"))
                report["rss"].append(row)
    mms = [r["matmul_gflops"] for r in report["speed"]]
    report["matmul_gflops"] = {k: max(m.get(k, 0) for m in mms) for k in ("numpy", "torch")} if mms else {}
    report["wall_s"] = time.perf_counter() - t_start
    write_report(report, markdown(report), a.markdown, a.json)
    return 0


def write_report(report, md, markdown_path=None, json_path=None):
    """Print the Markdown tables; write them and the full report (JSON) where asked."""
    print(md)
    if markdown_path:
        Path(markdown_path).write_text(md)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
