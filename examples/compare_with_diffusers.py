"""The runtime author's workflow: trace a PyTorch (diffusers) pipeline with forward hooks, save the trace in mdref's
format, trace mdref on the same checkpoint and the same noise, and let `mdref compare` name the first layer that
differs. Swap the diffusers side for your own runtime: record the same point names, write them with
mdref.save_trace (or any safetensors writer; one tensor per point), and compare.

    python examples/compare_with_diffusers.py                        # a random tiny SD pipeline, built offline
    python examples/compare_with_diffusers.py --dtype float64        # both sides in float64 (tolerance 1e-9)
    python examples/compare_with_diffusers.py --perturb              # change one torch bias: compare names it
    python examples/compare_with_diffusers.py --model PATH           # a local diffusers StableDiffusion folder

Point names are mdref's (checkpoint key prefixes; `mdref trace` lists them): "text_encoder.<path without
text_model.>", "unet.<module path>", "decoder.<path under vae.decoder>" (+ "decoder.post_quant_conv"), the
module outputs "unet.out" (conv_out) and "decoder.out" (the decoder's conv_out), and the pipeline points tokens,
text_embeddings, noise, sampler.noise, sampler.x0, latents.x0 and image (float [0, 1] NCHW, before 8 bits).

float64: diffusers computes three things in float32 whatever the model dtype -- the timestep sinusoid (Timesteps),
the sigma table and the Euler step (EulerDiscreteScheduler.step casts the latents to float32) -- while mdref's
float64 mode is float64 throughout. With --dtype float64 this script recomputes them in float64 on the torch side,
so that the comparison measures arithmetic rounding only. The alphas_cumprod table itself is float32 on both sides
(a constant of the model); the sigmas are derived from it in float64. Exit status: that of `mdref compare` (0 all agree, 1 a point diverges, 2 bad input).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

import mdref
from mdref import cli, sampler
from mdref.trace import Trace, save_trace

PROMPT = "a large red circle on the left, blue background"
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
NP_DTYPES = {"float32": np.float32, "float64": np.float64}

# ---- point names: torch module path -> mdref point name ----------------------------------------------------------
BLOCK = r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)"
UNET_POINT = re.compile(rf"time_embedding|conv_in|{BLOCK}|(down|up)_blocks\.\d+\.(down|up)samplers\.0|"
                        rf"{BLOCK}\.(resnets|attentions)\.\d+(\.transformer_blocks\.\d+(\.(attn1|attn2|ff))?)?")
TEXT_POINT = re.compile(r"embeddings|encoder\.layers\.\d+(\.(self_attn|mlp))?|final_layer_norm")
DECODER_POINT = re.compile(r"conv_in|mid_block|up_blocks\.\d+")
# Where --perturb adds 1e-3 (the first that exists): (mdref point that changes first, parameter of that module).
# A bias entry shifts one output channel by exactly 1e-3 everywhere, which float32's tolerance (1e-4 of max|x|)
# sees on a model with O(1) activations; a weight-matrix entry's effect scales with its input and may not be.
PERTURB = [("unet.mid_block.attentions.0.transformer_blocks.0.attn2", "attn2.to_out.0.bias"),
           ("unet.mid_block.resnets.0", "conv2.bias")]


def point_names(pipe):
    """{torch module: mdref point name} for every module whose output mdref records."""
    names = {}
    for path, m in pipe.text_encoder.named_modules():
        path = path.removeprefix("text_model.")
        if TEXT_POINT.fullmatch(path):
            names[m] = f"text_encoder.{path}"
    for path, m in pipe.unet.named_modules():
        if UNET_POINT.fullmatch(path):
            names[m] = f"unet.{path}"
    names[pipe.unet.conv_out] = "unet.out"
    if pipe.vae.post_quant_conv is not None:
        names[pipe.vae.post_quant_conv] = "decoder.post_quant_conv"
    for path, m in pipe.vae.decoder.named_modules():
        if DECODER_POINT.fullmatch(path):
            names[m] = f"decoder.{path}"
    names[pipe.vae.decoder.conv_out] = "decoder.out"
    return names


def first_tensor(out):
    """The array mdref records for a module output: the tensor itself, or the first of a tuple (attention
    weights, skip lists, return_dict=False outputs)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "sample", out)


def to_numpy(x):
    return x.detach().cpu().numpy()


# ---- float64: what diffusers keeps in float32 ---------------------------------------------------------------------
def timestep_embedding_f64(module, args, out):
    """Forward hook replacing diffusers' Timesteps output (a float32 sinusoid) by the same formula in float64
    (diffusers.models.embeddings.get_timestep_embedding)."""
    t, dim, half = args[0], module.num_channels, module.num_channels // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - module.downscale_freq_shift)
    emb = module.scale * t[:, None].double() * torch.exp(exponent)[None, :]     # [B, half]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)                    # [B, dim]
    if module.flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class TracedEuler(diffusers.EulerDiscreteScheduler):
    """EulerDiscreteScheduler that records sampler.x0 and latents.x0 into `self.trace`, and with `float64` derives
    its sigmas from the float32 alphas_cumprod in float64 and steps float64 latents in float64 (diffusers' sigmas are
    float32 and its step casts the latents to float32)."""
    trace = None
    float64 = False

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        if self.float64:
            a = self.alphas_cumprod.double()
            sigmas = ((1 - a) / a).sqrt()[self.timesteps.long()]
            self.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])

    def step(self, model_output, timestep, sample, *args, return_dict=True, **kwargs):
        if sample.dtype == torch.float64:
            prev, x0 = self.step_float64(model_output, timestep, sample)
        else:
            prev, x0 = super().step(model_output, timestep, sample, *args, return_dict=False, **kwargs)
        self.trace.add("sampler.x0", to_numpy(x0))
        if self.step_index == len(self.timesteps):              # the last step: the latents the VAE decodes
            self.trace.add("latents.x0", to_numpy(prev))
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)

    def step_float64(self, model_output, timestep, sample):
        """diffusers' deterministic Euler step (s_churn = 0) without the cast of the latents to float32."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        if self.config.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        elif self.config.prediction_type == "v_prediction":
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        else:                                                      # "sample"
            x0 = model_output
        self._step_index += 1
        return sample + (sample - x0) / sigma * (sigma_next - sigma), x0


# ---- the two traces -----------------------------------------------------------------------------------------------
def diffusers_trace(pipe, prompt, noise, dtype_name):
    """Run the diffusers pipeline (one step, no guidance) on `noise` with hooks on every point."""
    t = Trace()
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: t.add(n, to_numpy(first_tensor(out))))
             for m, n in point_names(pipe).items()]
    hooks.append(pipe.text_encoder.register_forward_pre_hook(
        lambda m, a, kw: t.add("tokens", to_numpy(a[0] if a else kw["input_ids"])), with_kwargs=True))
    hooks.append(pipe.text_encoder.register_forward_hook(lambda m, a, out: t.add("text_embeddings", to_numpy(out[0]))))
    if dtype_name == "float64":   # replaces the float32 sinusoid that time_embedding reads
        hooks.append(pipe.unet.time_proj.register_forward_hook(timestep_embedding_f64))
    pipe.scheduler.trace = t
    pipe.scheduler.float64 = dtype_name == "float64"
    t.add("noise", noise)         # the pipeline's first latents (it multiplies them by init_noise_sigma)
    t.add("sampler.noise", noise)
    h, w = noise.shape[2] * pipe.vae_scale_factor, noise.shape[3] * pipe.vae_scale_factor
    try:
        with torch.no_grad():
            image = pipe(prompt, num_inference_steps=1, guidance_scale=0.0, height=h, width=w,
                         latents=torch.from_numpy(noise), output_type="pt").images   # [B, 3, H, W] in [0, 1]
    finally:
        for hook in hooks:
            hook.remove()
    t.add("image", to_numpy(image))
    return t


def mdref_trace(pipe, prompt, noise):
    with mdref.trace() as t:
        pipe.run(prompt, noise=noise)
    return t


# ---- models -------------------------------------------------------------------------------------------------------
def randomize(module, seed):
    """Random weights with O(1) activations: weights N(0, 1/fan_in), biases N(0, 0.1^2), norm scales 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.ndim == 1:
                p.copy_(noise * 0.1 + (1 if "norm" in name and name.endswith("weight") else 0))
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


def build_random_tiny(folder, seed=0):
    """A random tiny StableDiffusionPipeline (CLIP text model, UNet2DConditionModel, AutoencoderKL, the CLIP
    tokenizer written from mdref's shipped vocabulary, Euler trailing), saved to folder/sd-tiny. Offline, ~1 s."""
    torch.manual_seed(seed)
    tok_dir = mdref.Tokenizer.from_pretrained(None).save_pretrained(Path(folder) / "tokenizer-src")
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=8)
    for i, m in enumerate((text_encoder, unet, vae)):
        randomize(m, seed + i)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dir),
        unet=unet, scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                             beta_end=0.012, timestep_spacing="trailing",
                                                             steps_offset=1),  # no effect on "trailing"
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(Path(folder) / "sd-tiny", safe_serialization=True)
    return Path(folder) / "sd-tiny"


def load_diffusers(folder, dtype_name):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, dtype=TORCH_DTYPES[dtype_name],
                                                             safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = TracedEuler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def perturb(pipe):
    """Add 1e-3 to one bias entry of a mid-network UNet layer; returns the mdref point that should diverge first."""
    modules = dict(pipe.unet.named_modules())
    for point, param in PERTURB:
        module = modules.get(point.removeprefix("unet."))
        if module is not None:
            with torch.no_grad():
                module.get_parameter(param.split(".", 1)[1]).view(-1)[0] += 1e-3
            return point
    raise SystemExit("--perturb: this UNet has no mid_block layer to perturb")


# ---- main ---------------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="local diffusers StableDiffusion pipeline folder (default: a random tiny one)")
    ap.add_argument("--dtype", choices=sorted(NP_DTYPES), default="float32")
    ap.add_argument("--out", help="folder for the two traces (default: a new temporary folder)")
    ap.add_argument("--perturb", action="store_true", help="add 1e-3 to one bias entry of a mid-network torch layer")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--seed", type=int, default=0, help="noise seed (PCG64, as mdref)")
    ap.add_argument("--verbose", action="store_true", help="keep diffusers' and transformers' log messages")
    args = ap.parse_args(argv)
    if not args.verbose:
        for lib in (diffusers, transformers):
            lib.utils.logging.set_verbosity_error()
            lib.utils.logging.disable_progress_bar()
    out = Path(args.out or tempfile.mkdtemp(prefix="mdref-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folder = Path(args.model) if args.model else build_random_tiny(out / "model")
    print(f"model: {folder}{'' if args.model else ' (random tiny, built offline)'}, dtype {args.dtype}")

    try:
        ours = mdref.Pipeline.from_pretrained(folder, dtype=NP_DTYPES[args.dtype])
    except (mdref.ConfigError, mdref.WeightsError) as e:                     # e.g. a scheduler mdref lacks
        print(f"mdref cannot load {folder}: {e}", file=sys.stderr)
        return 2
    noise = sampler.initial_noise(ours.latent_shape(1), args.seed, ours.dtype)   # [1, C, h, w], for both sides
    t_mdref = mdref_trace(ours, args.prompt, noise)
    pipe = load_diffusers(folder, args.dtype)
    perturbed = perturb(pipe) if args.perturb else None
    t_torch = diffusers_trace(pipe, args.prompt, noise, args.dtype)

    facts = {"prompt": args.prompt, "seed": args.seed, "dtype": args.dtype, "model": str(folder)}
    save_trace(out / "mdref.safetensors", t_mdref, dict(facts, runtime=f"mdref {mdref.__version__}"))
    save_trace(out / "diffusers.safetensors", t_torch, dict(facts, runtime=f"diffusers {diffusers.__version__}, "
               f"torch {torch.__version__}", perturbed=perturbed))
    a, b = str(out / "mdref.safetensors"), str(out / "diffusers.safetensors")
    print(f"traced {len(t_mdref.names())} mdref points, {len(t_torch.names())} diffusers points "
          f"({time.perf_counter() - t0:.1f} s)\n$ mdref compare {a} {b}")
    status = cli.main(["compare", a, b])                 # the reference (mdref) first
    if perturbed:
        print(f"\nperturbed layer: {perturbed} (+1e-3 on one bias entry of the torch model)")
    return status


if __name__ == "__main__":
    sys.exit(main())
