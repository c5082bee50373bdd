"""The `mdref` command: a thin shell over the pipeline and the trace tools.

Bad input (unknown preset, missing path, bad size, unreadable noise file, ...) prints one `mdref: error: ...`
line and exits with status 2; `compare` exits 1 when the traces diverge, whatever happens to its output (a closed
pipe never turns a divergence into 0). SIGTERM and Ctrl-C stop a command as an error does: whatever it was writing
is removed (exit 143 / 130). Text is printed with backslash escapes where the terminal's encoding lacks a character,
and command-line text (the prompt) is read as the UTF-8 bytes it was typed in, whatever the locale.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import __version__

COMPUTE_NAMES = ("float32", "float64", "float16", "bfloat16")       # --dtype: mdref.precision.compute parses them


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown option, `--seed abc`) take the one path too: `mdref: error: ...`, exit 2."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


# Pipeline.run's argument names -> what the command line calls them (mdref.pipeline.InputError.argument)
OPTIONS = {"prompt": "the prompt", "negative_prompt": "--negative-prompt", "seed": "--seed", "steps": "--steps",
           "height": "--height", "width": "--width", "guidance_scale": "--guidance", "max_memory": "--max-memory",
           "MDREF_MAX_MEMORY": "MDREF_MAX_MEMORY", "image size": "--height/--width: image size",
           "text_embeddings": "--text-embeddings", "text_mask": "--text-embeddings"}


# ---- shared argument groups -------------------------------------------------------------------------------------
def _add_source_args(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", metavar="PATH", help="diffusers-style pipeline folder (default: the embedded model)")
    g.add_argument("--preset", metavar="NAME", help="seeded weights for a named architecture: mobilediffusion, tiny")
    p.add_argument("--weights-seed", type=int, default=None, help="with --preset: seed of its weights (default 0)")


def _add_model_args(p):
    _add_source_args(p)
    from .precision import DEFAULT_PROFILE, PROFILES

    p.add_argument("--dtype", choices=COMPUTE_NAMES, default="float32", help="compute dtype (default float32; "
                   "float16 / bfloat16 are emulated, see docs/precision.md)")
    p.add_argument("--profile", choices=list(PROFILES), help="with float16 / bfloat16: how the runtime to emulate "
                   f"computes (default {DEFAULT_PROFILE}): " + "; ".join(f"{k}: {v.about}" for k, v in PROFILES.items()))
    p.add_argument("--upcast", metavar="CLASSES", help="with float16 / bfloat16: compute these in float32, "
                   "comma-separated: attention, norm, text_encoder, unet, sampler, decoder")
    p.add_argument("--downcast", metavar="CLASSES", help="with float16 / bfloat16: norm = the norm's sums in "
                   "the low dtype too")


def _add_sample_args(p, *, optional_prompt=False):
    p.add_argument("prompt", help="the text prompt" + (" (not with --golden)" if optional_prompt else ""),
                   nargs="?" if optional_prompt else None)
    p.add_argument("--seed", type=int, default=0, help="noise seed: PCG64(seed).standard_normal in float64, cast")
    p.add_argument("--noise", metavar="FILE.npy", help="initial noise [B, C, h, w] as .npy (overrides --seed)")
    p.add_argument("--steps", type=int, default=None, help="UNet evaluations (default 1; DreamLite: 4)")
    p.add_argument("--text-embeddings", metavar="FILE.npy", help="DreamLite: the text features [B, L, 2048] as "
                   ".npy, given instead of running the text encoder (all L positions are read)")
    p.add_argument("--height", type=int, help="image height in pixels")
    p.add_argument("--width", type=int, help="image width in pixels")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale in [0, 50]; "
                   "guidance runs when it is > 1 (default off)")
    p.add_argument("--negative-prompt", default=None, help="with --guidance > 1: the negative prompt (default \"\")")
    p.add_argument("--max-memory", metavar="SIZE", help="refuse a run estimated to need more (8G, 512M; default: "
                   "$MDREF_MAX_MEMORY, else the machine's physical memory)")
    p.add_argument("--allow-nonfinite", action="store_true", help="keep going when a stage's output holds NaN or "
                   "Inf (default: stop and name the first non-finite point)")


def parse_compute(args, name=None, *, overrides=True):
    """The compute dtype the options name (mdref.precision.compute, parsed once): --dtype (or `name`) with
    --upcast / --downcast / --profile when `overrides`; an override given with float32 / float64 is refused."""
    from . import precision

    name = name or args.dtype
    given = {k: getattr(args, k, None) for k in ("upcast", "downcast", "profile")} if overrides else {}
    for option, value, known in (("--upcast", given.get("upcast"), precision.UPCASTS),
                                 ("--downcast", given.get("downcast"), precision.DOWNCASTS)):
        if value is not None:
            with _usage_errors(option):
                precision.parse_classes(value, known, option)
    wrong = next((k for k, v in given.items() if v is not None), None) if name not in precision.LOW_DTYPES else None
    if wrong:
        raise UsageError(f"--{wrong} {given[wrong]}: applies to --dtype float16 or bfloat16, not {name}")
    with _usage_errors():
        return precision.compute(name, **given)


def load_pipeline(args, name=None, *, overrides=True):
    """The pipeline the model arguments name, computing in --dtype (or `name`) with its overrides (when
    `overrides`; parse_compute)."""
    from .io.presets import PIPELINE_PRESETS as PRESETS
    from .pipeline import Pipeline

    dtype = parse_compute(args, name, overrides=overrides)
    if args.weights_seed is not None and args.preset is None:
        raise UsageError(f"--weights-seed {args.weights_seed}: applies only with --preset (a model folder's weights "
                         f"are read, not drawn)")
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise UsageError(f"unknown preset {args.preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        seed = 0 if args.weights_seed is None else args.weights_seed
        if not 0 <= seed < 2 ** 64:
            raise UsageError(f"--weights-seed must be an integer with 0 <= seed < 2**64, found {seed}")
        return Pipeline.from_preset(args.preset, seed=seed, dtype=dtype)
    if args.model is not None and not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model}: no such folder")
    return Pipeline.from_pretrained(args.model, dtype=dtype)


def _read_noise(path, shape, steps):
    """The --noise .npy file, checked before its data is read: the header (numpy.lib.format) must describe a real
    floating-point array of the latent's shape [B, C, h, w] (or [steps, B, C, h, w]) that the file holds in full;
    no pickle is ever loaded."""
    import zipfile

    fmt = np.lib.format
    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"--noise {path}: no such file")
    what = f"--noise {path}"
    if zipfile.is_zipfile(path):
        raise UsageError(f"{what}: an .npz archive; expected one .npy array (numpy.save)")
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                header = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                header = fmt.read_array_header_2_0(f)
            else:
                raise UsageError(f"{what}: .npy format version {version[0]}.{version[1]} is not read (1.0 or 2.0)")
            offset = f.tell()
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{what}: not a readable .npy array ({e})") from None
    file_shape, _, dtype = header
    if dtype.kind != "f":
        raise UsageError(f"{what}: expected a real floating-point array, found dtype {dtype}")
    from .sampler import describe_noise_shapes, noise_shapes

    if file_shape not in noise_shapes(shape, steps):
        raise UsageError(f"{what}: has shape {file_shape}, expected {describe_noise_shapes(shape, steps)}")
    data = math.prod(file_shape) * dtype.itemsize
    size = Path(path).stat().st_size
    if size < offset + data:
        raise UsageError(f"{what}: truncated: the header describes {data} bytes of data, the file holds "
                         f"{max(0, size - offset)}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{what}: not a readable .npy array ({e})") from None


def _read_array(path, what):
    """A floating-point .npy array (never a pickle), or a UsageError naming the option."""
    if not Path(path).is_file():
        raise UsageError(f"{what} {path}: no such file")
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UsageError(f"{what} {path}: not a readable .npy array ({e})") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        raise UsageError(f"{what} {path}: expected one real floating-point .npy array")
    return a


def _input_message(e, args):
    """mdref.pipeline.InputError, the argument called by its command-line name."""
    from .pipeline import MemoryLimitError

    option = (f"--noise {args.noise}:" if e.argument == "noise" and getattr(args, "noise", None)
              else OPTIONS.get(e.argument, e.argument))
    hint = " (--max-memory SIZE or MDREF_MAX_MEMORY sets the limit)" if isinstance(e, MemoryLimitError) else ""
    return f"{option} {e.problem.replace('(max_memory)', '(--max-memory)')}{hint}"


def check_sample_args(args):
    """What argparse cannot see: an option that cannot apply (--negative-prompt without guidance) and the prompt's
    bytes (read as UTF-8 whatever the locale decoded them as)."""
    from .guards import uses_guidance

    if args.negative_prompt is not None and not uses_guidance(args.guidance):
        raise UsageError(f"--negative-prompt applies only with classifier-free guidance (--guidance > 1), found "
                         f"--guidance {args.guidance}")
    args.prompt = command_line_text(args.prompt, "the prompt")
    if args.negative_prompt is not None:          # left out: None (SDXL's force_zeros_for_empty_prompt reads it)
        args.negative_prompt = command_line_text(args.negative_prompt, "--negative-prompt")


def command_line_text(value, what):
    """A command-line argument as the text its bytes spell in UTF-8. Python decodes argv with the locale's
    encoding (undecodable bytes become lone surrogates); os.fsencode gives the bytes back, so a valid UTF-8 prompt
    is read correctly under a Latin-1 or ASCII locale too, and bytes that are not UTF-8 are named."""
    try:
        raw = os.fsencode(value)
    except UnicodeEncodeError:        # text that did not come from bytes (a str passed to main() in Python)
        return value
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} is not valid UTF-8 text: the byte 0x{raw[e.start]:02x} at byte {e.start}") from None


def _run(pipe, args, allow_nonfinite=None):
    """Check every argument (before anything is computed or read), then the --noise file against the latent's shape
    the request settled, then run the checked request."""
    if args.steps is None:
        args.steps = getattr(pipe, "default_steps", 1)
    extra = {}
    if getattr(args, "text_embeddings", None) is not None:
        if not hasattr(pipe, "text_features"):
            raise UsageError(f"--text-embeddings applies to DreamLite pipelines, not {pipe.source}")
        extra["text_embeddings"] = _read_array(args.text_embeddings, "--text-embeddings")
    arguments = dict(extra, seed=args.seed, steps=args.steps, height=args.height, width=args.width,
                     guidance_scale=args.guidance, negative_prompt=args.negative_prompt, max_memory=args.max_memory,
                     allow_nonfinite=args.allow_nonfinite if allow_nonfinite is None else allow_nonfinite)
    request = pipe.check(args.prompt, **arguments)
    if args.noise is not None:
        noise = _read_noise(args.noise, request.shape, len(request.timesteps))
        request = pipe.check(args.prompt, noise=noise, **arguments)
    return pipe.execute(request)


def _manifest(pipe, args, result):
    return {
        "mdref_version": __version__, "numpy_version": np.__version__, "model": pipe.source,
        "untrained": pipe.untrained, "weights_sha256": pipe.weights_sha256(), "prompt": args.prompt,
        "token_ids": None if result.token_ids is None else result.token_ids.tolist(),
        "seed": None if args.noise else args.seed,
        "noise_source": args.noise or f"PCG64({args.seed}).standard_normal float64 -> {args.dtype}",
        "timesteps": [float(t) for t in result.timesteps], "steps": args.steps, "dtype": args.dtype,
        "precision": pipe.compute.name,            # what mdref compare judges the points by (docs: the manifest)
        "emulation": None if pipe.precision is None else pipe.precision.describe(),
        "guidance_scale": args.guidance, "negative_prompt": args.negative_prompt,
    }


# -o's extension -> the Pillow format and how the run's metadata goes in: PNG text chunks, a JPEG comment (JSON),
# WebP lossless with the JSON in XMP.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_format(path):
    """The image format -o's extension names, or UsageError (before anything runs)."""
    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UsageError(f"-o {path}: unknown image extension {Path(path).suffix or '(none)'!r}; mdref writes "
                         f"{', '.join(IMAGE_FORMATS)}")
    return fmt


def _write_image(image, path, meta):
    """Write the image in the format its extension names, with the run's metadata, through
    mdref.outputs.atomic_write: nothing is left behind if the write fails."""
    from PIL.PngImagePlugin import PngInfo

    from .outputs import atomic_write

    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    fmt = image_format(path)
    if fmt == "PNG":
        info = PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
        options = dict(pnginfo=info)
    elif fmt == "JPEG":
        options = dict(quality=95, comment=json.dumps(text).encode("utf-8"))
    else:
        xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               '<rdf:Description xmlns:mdref="https://mdref/ns/1.0/" mdref:run="'
               + json.dumps(text).replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
               + '"/></rdf:RDF></x:xmpmeta>')
        options = dict(lossless=True, xmp=xmp.encode("utf-8"))
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **options), "-o")


@contextmanager
def _usage_errors(option=None):
    """A point pattern or precision override named by the option that gave it (other named errors reach main)."""
    from .precision import PrecisionError
    from .trace import PatternError

    try:
        yield
    except (PatternError, PrecisionError) as e:
        raise UsageError(f"{option}: {e}" if option and option not in str(e) else str(e)) from None


def _check_output(path):
    """Refuse a bad -o before any model is loaded or run (see mdref.outputs)."""
    from .outputs import check_output_path

    check_output_path(path, "-o")


# ---- commands ------------------------------------------------------------------------------------------------
def cmd_generate(args):
    _check_output(args.output)
    image_format(args.output)
    check_sample_args(args)
    t0 = time.perf_counter()
    pipe = load_pipeline(args)
    load_s = time.perf_counter() - t0
    if pipe.untrained:
        print(f"note: {pipe.source} has UNTRAINED seeded weights; the picture is noise", file=sys.stderr)
    trained = pipe.trained_size()
    if trained is not None:
        asked = (args.height or trained[0], args.width or trained[1])
        if asked != trained:
            print(f"warning: {pipe.source} was trained at {trained[0]}x{trained[1]}; at {asked[0]}x{asked[1]} it "
                  f"may not draw what the prompt says", file=sys.stderr)
    result = _run(pipe, args)
    print(f"load          {load_s * 1000:9.1f} ms", file=sys.stderr)
    for stage, s in result.timings.items():
        print(f"{stage:<13} {s * 1000:9.1f} ms", file=sys.stderr)
    meta = _manifest(pipe, args, result)
    meta.pop("token_ids")
    _write_image(result.pil()[0], args.output, meta)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def cmd_info(args):
    from .formats.safetensors import flatten

    pipe = load_pipeline(args)
    d = pipe.describe()
    levels = {}
    for key, v in flatten(pipe.unet.params).items():
        parts = key.split(".")
        group = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
        levels[group] = levels.get(group, 0) + int(np.size(v))
    d["unet_parameters_by_block"] = levels
    print(json.dumps(d, indent=2, default=str))
    return 0


def cmd_trace(args):
    from .trace import point_matcher, save_trace, trace

    _check_output(args.output)
    check_sample_args(args)
    with _usage_errors("--points"):
        point_matcher(args.points)
    pipe = load_pipeline(args)
    with trace(args.points) as t:
        result = _run(pipe, args)
    if not t.arrays:
        raise UsageError(f"--points {' '.join(args.points or [])}: no traced point matches (nothing written)")
    save_trace(args.output, t, _manifest(pipe, args, result), what="-o")
    print(f"wrote {len(t.arrays)} points to {args.output}", file=sys.stderr)
    return 0


def _tolerance_arg(value, option):
    if value is not None and not value >= 0:          # also refuses nan
        raise UsageError(f"{option} must be a number >= 0, got {value}")


def cmd_compare(args):
    from .comparison import compare, format_report
    from .trace import point_matcher

    _tolerance_arg(args.rtol, "--rtol")
    _tolerance_arg(args.atol, "--atol")
    with _usage_errors("--points"):
        point_matcher(args.points)
    traces = [_read_trace(path) for path in (args.a, args.b)]   # arrays and manifest (--local reads the run)
    chosen = [o for o, v in (("--model", args.model), ("--preset", args.preset), ("--upcast", args.upcast),
                             ("--downcast", args.downcast), ("--profile", args.profile)) if v is not None]
    if chosen and not args.local:
        raise UsageError(f"{chosen[0]}: names the model of a teacher-forced re-run; it applies only with --local")
    pipe = load_pipeline(args) if args.local else None
    try:
        report = compare(traces[0], traces[1], rtol=args.rtol, atol=args.atol, points=args.points,
                         require_all=args.require_all, local=pipe)
    except ValueError as e:                           # a complex point in a dict passed in Python, say
        raise UsageError(str(e)) from None
    if not report.points:
        raise UsageError(f"{args.a} and {args.b} have no points in common"
                         + (f" matching {args.points!r}" if args.points else ""))
    args.status = 0 if report.ok else 1               # decided before anything is printed (see main: broken pipe)
    if args.json:
        print(report.to_json(indent=1))
    else:
        print(format_report(report, all_points=not args.only_failures))
    return args.status


def cmd_golden(args):
    from .golden import write_golden
    from .outputs import check_output_dir

    check_output_dir(args.directory, "DIR")          # before the model is loaded or run
    pipe = load_pipeline(args)
    manifest = write_golden(pipe, args.directory, dtype_name=args.dtype)
    print(f"wrote {len(manifest['cases'])} cases to {args.directory}", file=sys.stderr)
    return 0


# --component: what each component reads from a golden bundle's case folder (mdref.golden), in call order
GOLDEN_INPUTS = {"text_encoder": ("token_ids",), "unet": ("noise", "timesteps", "text_embeddings"),
                 "decoder": ("decoder_input",)}


def _golden_inputs(case, component):
    """The arrays `component` reads from the golden case folder `case` (GOLDEN_INPUTS), each a .npy read without
    pickles; a missing or unreadable file is a UsageError naming it."""
    if not Path(case).is_dir():
        raise UsageError(f"--golden {case}: no such folder (a golden bundle's case folder, e.g. DIR/case0)")
    arrays = []
    for name in GOLDEN_INPUTS[component]:
        f = Path(case) / f"{name}.npy"
        if not f.is_file():
            raise UsageError(f"--golden {case}: no {name}.npy (the --component {component} input; bundles written "
                             f"by `mdref golden` hold it in each case folder)")
        try:
            arrays.append(np.load(f, allow_pickle=False))
        except (ValueError, OSError, EOFError) as e:
            raise UsageError(f"--golden {f}: not a readable .npy array ({e})") from None
    return arrays


def _run_component(pipe, component, inputs):
    """One component of `pipe` on a golden case's inputs: the UNet at the case's first timestep (the only one of a
    one-step model; later steps' inputs are not in a bundle). Under an emulated dtype the float inputs are first
    rounded to it, as a device's graph inputs are."""
    from . import precision

    with precision.using(pipe.precision):
        inputs = [precision.rounded(a.astype(pipe.dtype)) if a.dtype.kind == "f" else a for a in inputs]
    if component == "unet":
        noise, timesteps, context = inputs
        return pipe.unet(noise, np.asarray(timesteps).reshape(-1)[0], context)
    return getattr(pipe, component)(*inputs)


def cmd_precision(args):
    from .precision_report import format_precision, precision_report, to_json
    from .trace import point_matcher, trace

    if (args.component is None) != (args.golden is None):
        raise UsageError("--component and --golden go together: --component unet|decoder|text_encoder "
                         "--golden CASE_DIR runs one component on a golden case's inputs")
    if args.golden is not None and args.prompt is not None:
        raise UsageError(f"the prompt {args.prompt!r}: not used with --golden (the case folder holds the inputs)")
    if args.golden is not None and args.noise is not None:
        raise UsageError(f"--noise {args.noise}: not used with --golden (the case folder holds the noise)")
    if args.golden is None and args.prompt is None:
        raise UsageError("the prompt is required (or --component NAME --golden CASE_DIR)")
    if args.golden is None:
        check_sample_args(args)
    with _usage_errors("--points"):
        point_matcher(args.points)
    if args.dtype == "float64":
        raise UsageError("--dtype float64 is the reference: choose float32, float16 or bfloat16")
    inputs = None if args.golden is None else _golden_inputs(args.golden, args.component)
    results = {}
    for name in ("float64", args.dtype):
        pipe = load_pipeline(args, name, overrides=name != "float64")
        with trace(args.points, on_request=["unet.*.qk", "unet.*.scores", "*.sum_sq"] if args.scores else None) as t:
            if inputs is None:
                _run(pipe, args, allow_nonfinite=True)     # the command for studying NaN / Inf: never stops on them
            else:
                with np.errstate(all="ignore"):
                    try:
                        _run_component(pipe, args.component, inputs)
                    except ValueError as e:                # a case of another model: shapes that do not fit
                        raise UsageError(f"--golden {args.golden}: {e}") from None
        if not t.arrays:                               # known after the first run: no need for the second
            raise UsageError(f"--points {' '.join(args.points or [])}: no traced point matches")
        results[name] = t
    report = precision_report(results["float64"], results[args.dtype], args.dtype, points=args.points)
    what = pipe.precision.describe() if pipe.precision is not None else args.dtype
    if inputs is None:
        source = {"prompt": args.prompt, "seed": None if args.noise else args.seed, "noise": args.noise}
        heading = f"prompt {args.prompt!r}, " + (f"noise {args.noise}" if args.noise else f"seed {args.seed}")
    else:
        source = {"component": args.component, "golden": str(args.golden)}
        heading = f"{args.component} on the inputs of {args.golden}"
    report = {"model": pipe.source, **source, "precision": what, **report}
    if args.json:
        print(to_json(report))
    else:
        print(f"{what} vs float64 ground truth, {pipe.source}, {heading}")
        print(format_precision(report))
    return 0


def cmd_explain(args):
    from .explain import explain_page
    from .outputs import atomic_write

    _check_output(args.output)
    pipe = load_pipeline(args)
    if pipe.untrained:
        print(f"note: {pipe.source} has UNTRAINED seeded weights; the page explains noise", file=sys.stderr)
    t0 = time.perf_counter()
    args.prompt = command_line_text(args.prompt, "the prompt")
    request = pipe.check(args.prompt, seed=args.seed, steps=args.steps)
    noise = _read_noise(args.noise, request.shape, len(request.timesteps))
    page = explain_page(pipe, args.prompt, seed=args.seed, noise=noise, steps=args.steps).encode("utf-8")
    build_s = time.perf_counter() - t0
    atomic_write(args.output, lambda tmp: Path(tmp).write_bytes(page), "-o")
    print(f"wrote {args.output} ({len(page):,} bytes, built in {build_s:.2f} s)", file=sys.stderr)
    return 0


def cmd_live(args):
    import os

    from .live import LiveModel, ServeError, make_server, serve, set_blas_threads

    if args.blas_threads is not None and args.blas_threads < 0:
        raise UsageError(f"--blas-threads {args.blas_threads}: expected 0 (the BLAS library's own) or a count")
    try:
        server = make_server(args.host or "127.0.0.1", args.port)      # before the model: a busy port fails fast
    except ServeError as e:
        raise UsageError(str(e)) from None
    try:
        pipe = load_pipeline(args)
        if pipe.untrained:
            print(f"note: {pipe.source} has UNTRAINED seeded weights; the pictures are noise", file=sys.stderr)
        threads = args.blas_threads if args.blas_threads is not None else \
            (0 if "OPENBLAS_NUM_THREADS" in os.environ else 1)
        if threads and set_blas_threads(threads) is None and args.blas_threads is not None:
            print("note: no OpenBLAS found in this process; --blas-threads has no effect", file=sys.stderr)
        server.model = LiveModel(pipe)
        server.model.warm_up()
    except BaseException:
        server.server_close()
        raise
    return serve(server, open_browser=args.open)
EXPORT_NEEDS = ("torch", "transformers", "diffusers", "onnx", "onnxscript")


def cmd_export(args):
    """`mdref export onnx DIR`: the model as three ONNX graphs named by mdref's points (mdref_torch/export.py)."""
    import importlib.util

    from .outputs import check_output_dir

    missing = [m for m in EXPORT_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"mdref export needs {', '.join(missing)}, not installed here: pip install \"mdref[export]\"")
    if args.batch < 1:
        raise UsageError(f"--batch must be an integer >= 1, got {args.batch}")
    with _usage_errors():
        check_output_dir(args.directory, "DIR")      # before the model is loaded or exported
    pipe = load_pipeline(args, "float32", overrides=False)
    pipe.latent_shape(args.batch, args.height, args.width)    # InputError naming --height / --width
    from mdref_torch.export import export_onnx      # PyTorch and ONNX: imported only by this command

    t0 = time.perf_counter()
    with _usage_errors():
        try:
            export_onnx(pipe, args.directory, points=args.points, dtype=args.dtype, batch=args.batch,
                        height=args.height, width=args.width)
        except ValueError as e:
            raise UsageError(str(e)) from None
    print(f"wrote {args.directory}: text_encoder.onnx, unet.onnx, decoder.onnx, points.json "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def cmd_match(args):
    """`mdref match REF CANDIDATE -o OUT`: a candidate's tensors, named anyhow, mapped onto mdref's points."""
    from .matching import format_match, match
    from .trace import save_trace

    _check_output(args.output)
    traces = [_read_trace(path) for path in (args.reference, args.candidate)]
    for option in ("agree", "margin", "max_error"):
        _tolerance_arg(getattr(args, option), f"--{option.replace('_', '-')}")
    report = match(traces[0], traces[1], agree=args.agree, margin=args.margin, max_error=args.max_error)
    with _usage_errors():
        save_trace(args.output, report.trace(), {"reference": str(args.reference),
                                                 "candidate": str(args.candidate)}, what="-o")
    print(report.to_json() if args.json else format_match(report, all_points=not args.only_doubtful))
    print(f"wrote {len(report.mapped)} points to {args.output}", file=sys.stderr)
    return 0 if report.ok else 1


def _read_trace(path):
    """A trace file as a Trace (its arrays in order, its manifest as meta), or UsageError naming the file."""
    from .formats.safetensors import WeightsError
    from .trace import Trace, TraceError, load_trace

    if not Path(path).exists():
        raise UsageError(f"{path}: no such trace file")
    if not Path(path).is_file():
        raise UsageError(f"{path}: not a regular file (expected a trace .safetensors file)")
    try:
        return Trace.of(*load_trace(path))
    except (WeightsError, TraceError) as e:
        why = str(e).removeprefix(f"{path}: ")
        raise UsageError(f"{path}: not a readable trace file ({why})") from None


def build_parser():
    parser = _Parser(prog="mdref", description="mdref: a NumPy golden reference for one-step "
                                     "text-to-image diffusion in the MobileDiffusion family.")
    parser.add_argument("--version", action="version", version=f"mdref {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_model_commands(sub)
    _add_tool_commands(sub)
    return parser


def _add_model_commands(sub):
    """The commands that run the model: generate, info, trace, compare, golden, precision."""
    p = sub.add_parser("generate", help="draw an image from a prompt")
    _add_sample_args(p)
    p.add_argument("-o", "--output", required=True, help="output PNG path")
    _add_model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="parameter counts, latent shape, schedule, prediction type")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("trace", help="record named activations of one run into a safetensors file")
    _add_sample_args(p)
    p.add_argument("-o", "--output", required=True, help="output trace .safetensors")
    p.add_argument("--points", action="append", help="glob (or re:REGEX) of point names to keep; repeatable")
    _add_model_args(p)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("compare", help="compare two traces and name the first point that diverges")
    p.add_argument("a", help="reference trace")
    p.add_argument("b", help="candidate trace")
    p.add_argument("--rtol", type=float, default=None, help="tolerance relative to max|a| for every float point "
                   "(default: per point, by the precision each trace declares for it, else its stored dtype)")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default 1e-30)")
    p.add_argument("--points", action="append", help="glob (or re:REGEX) of points to compare; repeatable")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--only-failures", action="store_true", help="print only points that exceed the tolerance")
    p.add_argument("--require-all", action="store_true", help="exit 1 when a point is missing on either side")
    p.add_argument("--local", action="store_true", help="also the local error of each point: mdref re-run with B's "
                   "values forced at every recorded point (the model: --model / --preset, default the embedded one)")
    _add_model_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("golden", help="write a self-describing golden bundle for fixed prompts and seeds")
    p.add_argument("directory", help="output folder")
    _add_model_args(p)
    p.set_defaults(func=cmd_golden)

    p = sub.add_parser("precision", help="a dtype (float32, float16, bfloat16) against float64, point by point: "
                       "errors, headroom, the first non-finite point")
    _add_sample_args(p, optional_prompt=True)
    p.add_argument("--points", action="append", help="glob (or re:REGEX) of points to report; repeatable")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--scores", action="store_true", help="also report every UNet attention's q k^T before and "
                   "after the 1/sqrt(d) scale (points <attention>.qk, <attention>.scores) and every RMSNorm's sum "
                   "of squares (<norm>.sum_sq: Qwen, DreamLite), and their least headroom")
    p.add_argument("--component", choices=list(GOLDEN_INPUTS), help="with --golden: run only this component on "
                   "the case's inputs (text_encoder: token_ids.npy; unet: noise.npy at the first of timesteps.npy "
                   "with text_embeddings.npy; decoder: decoder_input.npy)")
    p.add_argument("--golden", metavar="CASE_DIR", help="with --component: a golden bundle's case folder "
                   "(`mdref golden DIR` writes DIR/case0, ...) whose inputs the component reads")
    _add_model_args(p)
    p.set_defaults(func=cmd_precision)


def _add_tool_commands(sub):
    """The commands around it: explain, live, export, match."""
    p = sub.add_parser("explain", help="one self-contained HTML page: what every layer did to the prompt")
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("-o", "--output", required=True, help="output HTML path")
    p.add_argument("--seed", type=int, default=0, help="noise seed (as generate)")
    p.add_argument("--noise", metavar="FILE.npy", help="initial noise [B, C, h, w] as .npy (overrides --seed)")
    p.add_argument("--steps", type=int, default=1, help="UNet evaluations (default 1)")
    _add_model_args(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("live", help="a local web page: the picture redraws as you type, two prompts side by side")
    _add_model_args(p)
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0: any free port)")
    p.add_argument("--host", metavar="ADDRESS", help="listen on this IP address instead of 127.0.0.1 (this "
                   "machine only); 0.0.0.0 lets anyone who reaches this machine use the page and its CPU")
    p.add_argument("--open", action="store_true", help="open the page in the default web browser")
    p.add_argument("--blas-threads", type=int, metavar="N", help="OpenBLAS threads (default 1, faster for small "
                   "models, unless OPENBLAS_NUM_THREADS is set; 0: leave the library's own count)")
    p.set_defaults(func=cmd_live)
    p = sub.add_parser("export", help="the model as ONNX graphs whose values are named by mdref's points "
                       "(needs the extra: pip install \"mdref[export]\")")
    p.add_argument("format", choices=["onnx"], help="onnx: text_encoder.onnx, unet.onnx, decoder.onnx, points.json")
    p.add_argument("directory", help="output folder (new or empty)")
    _add_source_args(p)
    p.add_argument("--points", action="store_true", help="every point is also a graph output named by its point")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="weights and activations "
                   "(float16 keeps the timestep sinusoid in float32; points.json lists what stays float32)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the graphs (default 1)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("match", help="map a runtime's tensors, named anyhow, onto mdref's points by shape and value")
    p.add_argument("reference", help="mdref's trace (mdref trace, or a golden bundle's trace.safetensors)")
    p.add_argument("candidate", help="safetensors file of the runtime's tensors, any names")
    p.add_argument("-o", "--output", required=True, help="the mapped trace (.safetensors) for mdref compare")
    p.add_argument("--agree", type=float, default=2e-2, help="err (max|d| / max|ref|) of a confident match "
                   "(default 2e-2)")
    p.add_argument("--margin", type=float, default=10.0, help="how much further the runner-up must be (default 10)")
    p.add_argument("--max-error", type=float, default=0.5, help="above this err a point stays unmatched "
                   "(default 0.5; zeros score 1)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--only-doubtful", action="store_true", help="print only points not matched exactly or "
                   "with high confidence")
    p.set_defaults(func=cmd_match)


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so that what it was writing is cleaned up as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _one_line(message):
    """An error message on one line: a multi-line detail (a schema's list of problems) joined with '; '."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def main(argv=None):
    """Run one command; returns the exit status: 0 ok, 1 compare diverged, 2 bad input (one `mdref: error:` line),
    130 Ctrl-C, 143 SIGTERM. Nothing a failed or interrupted command was writing is left behind."""
    from .guards import InputError, NonFiniteError
    from .io import ConfigError, WeightsError
    from .outputs import OutputError
    from .precision import PrecisionError
    from .trace import PatternError, TraceError

    for stream in (sys.stdout, sys.stderr):        # PYTHONIOENCODING=ascii: escape, never UnicodeEncodeError
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"mdref: error: {e}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 0
    args.status = 0
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        return args.func(args)
    except NonFiniteError as e:
        return _error(str(e).replace("allow_nonfinite=True", "--allow-nonfinite"))
    except InputError as e:
        return _error(_input_message(e, args))
    except (UsageError, ConfigError, WeightsError, OutputError, TraceError, PatternError, PrecisionError) as e:
        return _error(e)
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 143
    except BrokenPipeError:           # `mdref info | head`, `mdref compare a b | head`: the status stands
        _silence_stdout()
        return args.status
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _error(e):
    print(f"mdref: error: {_one_line(e)}", file=sys.stderr)
    return 2


def _main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


def _silence_stdout():
    """After a closed pipe, point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
