"""Training recipe of mdref's embedded default model (weights/default; issue 5, the recipe of issue 20).

Stages, in this order (each writes <out>/<stage>.pt and is skipped when that file exists, so a run resumes):
  ae       autoencoder: pixel-unshuffle encoder (not shipped) + diffusers AutoencoderKL decoder layout
  aeft     decoder-only fine-tune (edge-weighted loss), encoder frozen so the latent space is kept
  onestep  one-step generator (text encoder + UNet from scratch) on noise-coupled targets: the shipped UNet
  decproj  decoder fine-tune on the generator's one-step samples drawn as the clean scene they show (shipped)
then --export writes the weights folder (diffusers-style pipeline layout, float16 safetensors).

  the shipped model, CPU, 119.9 minutes of stage time (weights/README.md): the generator, then a continuation on a
  data mix that leans on the noises where an open colour must avoid the other colour
    python recipe/train.py --out runs/r21 --stages ae,aeft,onestep \\
        --steps aeft=600,onestep=8400 --budget onestep=5100 --bf16 aeft,onestep --onestep-shape-weight 4
    mkdir runs/r22f && ln runs/r21/ae.pt runs/r21/aeft.pt runs/r22f/
    python recipe/train.py --out runs/r22f --stages onestep,decproj \\
        --steps onestep=2000,decproj=200 --budget onestep=820,decproj=125 --bf16 onestep,decproj \\
        --onestep-init runs/r21/onestep.pt --onestep-lr 3e-4 --onestep-p-complete 0.1 --onestep-shape-weight 1 \\
        --onestep-p-exclusion 0.3 --onestep-ema 0.995 --onestep-check 0 --export weights/default
  a CI smoke run
    python recipe/train.py --tiny --steps 3 --out /tmp/x --export /tmp/x/model

The defaults are the first command's values plus the second command's decproj (200 steps, 125 s, bfloat16), so
`python recipe/train.py --out runs/x` runs the first command and a decproj on its generator.

The stages of the earlier default models (unet: diffusion UNet; adv: UFOGen-style adversarial fine-tune; decft;
distill: two-teacher distillation; project; weights/README.md tells their story), the GPU schedule and the options
only they read were removed after commit ffa37bf: `git show ffa37bf:recipe/train.py` holds them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from evaluate import ATTRS, evaluate
from mdref_torch.twin import TwinUNet

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_MAX_LEN = 77
NUM_TRAIN_TIMESTEPS = 1000
LAST_T = NUM_TRAIN_TIMESTEPS - 1  # the one-step sampler's timestep: every generator row is pure noise there
BETA_START, BETA_END = 1e-4, 0.02
LATENT_CHANNELS = 8


# ---------------------------------------------------------------- the run: fixed before the first stage starts
@dataclass(frozen=True)
class Plan:
    """One stage's schedule: at most `steps` steps of `batch` rows, stopped early after `budget` seconds of wall clock
    (None: no cap); forward passes under bfloat16 autocast when `bf16` (weights, gradients, optimiser state, EMAs and
    losses stay float32; backward passes run outside it)."""
    steps: int
    batch: int
    budget: float | None = None
    bf16: bool = False


@dataclass(frozen=True)
class Preset:
    """Model widths and default stage plans: FULL (the shipped model) or TINY (CI). stat_batches: batches of 256
    renders the ae stage encodes for the latent statistics."""
    vae: dict
    encoder_width: int
    text: dict
    unet: dict
    plans: Mapping[str, Plan]
    stat_batches: int


FULL = Preset(
    vae=dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=8),
    encoder_width=64,
    text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
    unet=dict(block_out_channels=[64, 96, 128], layers_per_block=1, transformer_layers_per_block=[0, 1, 1],
              mid_transformer_layers=1, attention_head_dim=[1, 2, 2], norm_num_groups=16),
    plans=MappingProxyType({"ae": Plan(2400, 32), "aeft": Plan(600, 32, bf16=True),
                            "onestep": Plan(8400, 256, budget=5100, bf16=True),
                            "decproj": Plan(200, 64, budget=125, bf16=True)}),
    stat_batches=8)
TINY = Preset(
    vae=dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4),
    encoder_width=16,
    text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
    unet=dict(block_out_channels=[16, 16, 32], layers_per_block=1, transformer_layers_per_block=[0, 1, 1],
              mid_transformer_layers=1, attention_head_dim=[1, 2, 2], norm_num_groups=4),
    plans=MappingProxyType({"ae": Plan(3, 4), "aeft": Plan(3, 4, bf16=True), "onestep": Plan(3, 8, bf16=True),
                            "decproj": Plan(3, 8, bf16=True)}),
    stat_batches=2)


@dataclass(frozen=True)
class Onestep:
    """The onestep stage's options (--onestep-*; the defaults are the shipped model's first command): AdamW peak lr,
    share of complete prompts, extra MSE weight on the shape's latent pixels, share of open rows drawn where a colour
    is moved (coupled_scenes), EMA decay, a quick check every `check` steps (0: never), a checkpoint to start from."""
    lr: float = 1e-3
    p_complete: float = 0.4
    shape_weight: float = 4.0
    p_exclusion: float = 0.0
    ema: float = 0.999
    check: int = 500
    init: str | None = None


@dataclass(frozen=True)
class Run:
    """Everything the stages read, built once from the options (main) and passed down: the run folder, the model
    widths, each stage's plan, the onestep options and the torch device."""
    out: Path
    preset: Preset
    plans: Mapping[str, Plan]
    onestep: Onestep
    device: torch.device

    def amp(self, stage):
        """bfloat16 autocast for the stage's forward passes when its plan asks for it, else a no-op."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.plans[stage].bf16)


def randn(shape, g, device):
    """Seeded normal noise (CPU generator, so runs agree across devices), moved to the training device."""
    return torch.randn(shape, generator=g).to(device)


class Schedule:
    """Step loop bounded by a step count and (optionally) a wall-clock budget; progress drives the lr."""

    def __init__(self, steps, budget_s=None):
        self.steps, self.budget, self.t0 = steps, budget_s, time.time()

    def progress(self, i):
        p = i / self.steps
        if self.budget:
            p = max(p, (time.time() - self.t0) / self.budget)
        return min(p, 1.0)

    def done(self, i):
        return i >= self.steps or (self.budget is not None and time.time() - self.t0 >= self.budget)

    def elapsed(self):
        return time.time() - self.t0


# ---------------------------------------------------------------- configs
def vae_config(spec, scaling_factor=1.0):
    """diffusers AutoencoderKL config (the encoder half of it is not shipped)."""
    n = len(spec["block_out_channels"])
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(spec["block_out_channels"]), "layers_per_block": spec["layers_per_block"],
            "act_fn": "silu", "latent_channels": LATENT_CHANNELS, "norm_num_groups": spec["norm_num_groups"],
            "sample_size": data.IMAGE_SIZE, "scaling_factor": scaling_factor, "shift_factor": None,
            "force_upcast": False, "use_quant_conv": False, "use_post_quant_conv": True,
            "mid_block_add_attention": True}


def text_config(spec):
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
            "max_position_embeddings": TOKENIZER_MAX_LEN, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407, "projection_dim": spec["hidden_size"],
            "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0, **spec}


def unet_config(spec, cross_dim):
    n = len(spec["block_out_channels"])
    kinds = ["none", "cross"] + ["full"] * (n - 2)
    return {"_class_name": "UNet2DConditionModel", "sample_size": data.IMAGE_SIZE // 8,
            "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS, "flip_sin_to_cos": True, "freq_shift": 0,
            "down_block_types": ["DownBlock2D" if k == "none" else "CrossAttnDownBlock2D" for k in kinds],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": ["UpBlock2D" if k == "none" else "CrossAttnUpBlock2D" for k in reversed(kinds)],
            "only_cross_attention": False, "block_out_channels": spec["block_out_channels"],
            "layers_per_block": spec["layers_per_block"],
            "transformer_layers_per_block": spec["transformer_layers_per_block"], "downsample_padding": 1,
            "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": spec["norm_num_groups"],
            "norm_eps": 1e-5, "cross_attention_dim": cross_dim, "attention_head_dim": spec["attention_head_dim"],
            "use_linear_projection": True, "upcast_attention": False, "resnet_time_scale_shift": "default",
            "transformer_kind": kinds, "mid_transformer_layers": spec["mid_transformer_layers"], "shared_kv": True,
            "attention_weighting": "softmax", "ff_activation": "swiglu", "ff_mult": 3,
            "separable_conv": [k != "none" for k in kinds], "prediction_type": "sample"}


def scheduler_config():
    """mdref's own scheduler class: DDPM linear betas, x0 prediction, one step from t = 999 (trailing)."""
    return {"_class_name": "MDRefScheduler", "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_schedule": "linear",
            "beta_start": BETA_START, "beta_end": BETA_END, "prediction_type": "sample",
            "timestep_spacing": "trailing", "sampler": "x0"}


# ---------------------------------------------------------------- models
class Encoder(nn.Module):
    """Pixel-unshuffle encoder: 64x64x3 -> 8x8x8 (training only; not shipped)."""

    def __init__(self, width):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.PixelUnshuffle(4), nn.Conv2d(48, w, 3, padding=1), nn.SiLU(),  # [B, w, 16, 16]
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.PixelUnshuffle(2), nn.Conv2d(4 * w, 2 * w, 3, padding=1), nn.SiLU(),  # [B, 2w, 8, 8]
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, LATENT_CHANNELS, 1))

    def forward(self, x):
        return self.net(x)


def make_vae(spec):
    from diffusers import AutoencoderKL
    cfg = {k: v for k, v in vae_config(spec).items() if not k.startswith("_")}
    vae = AutoencoderKL(**cfg)
    vae.encoder = None  # the shipped decoder half only; our own encoder is trained beside it
    return vae


def decode(vae, z):
    """raw latent -> image [-1, 1] range (no clamp), float32 (also under --bf16 autocast)."""
    return vae.decoder(vae.post_quant_conv(z)).float()


def make_text(spec):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(**text_config(spec)))


def make_tokenizer():
    """transformers CLIPTokenizer on the real CLIP BPE vocabulary (weights/clip/ or a local extraction)."""
    from transformers import CLIPTokenizer
    import os
    dirs = [os.environ.get("CLIP_VOCAB_DIR"), ROOT / "weights" / "clip", "/tmp/cliptok"]
    for d in [Path(d) for d in dirs if d]:
        if (d / "vocab.json").exists() and (d / "merges.txt").exists():
            return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token="<|endoftext|>")
    raise FileNotFoundError("CLIP vocabulary (vocab.json + merges.txt) not found in weights/clip or /tmp/cliptok")


class TokenCache:
    """prompt -> CLIP token ids [77] (pad 49407), cached. mdref.Tokenizer (the pipeline's own) when importable,
    else transformers' CLIPTokenizer on the same vocabulary (they agree on every training prompt)."""

    def __init__(self):
        try:
            import mdref
            tok = mdref.Tokenizer.from_pretrained(None)
            self.encode = lambda ps: [list(r) for r in tok(ps)]
        except Exception:  # mdref or its vocabulary not available (e.g. on a bare GPU machine)
            tok = make_tokenizer()
            self.encode = lambda ps: tok(ps, padding="max_length", max_length=TOKENIZER_MAX_LEN,
                                         truncation=True).input_ids
        self.cache = {}

    def __call__(self, prompts):
        missing = sorted(p for p in set(prompts) if p not in self.cache)
        if missing:
            self.cache.update({p: torch.tensor(i, dtype=torch.int64) for p, i in zip(missing, self.encode(missing))})
        return torch.stack([self.cache[p] for p in prompts])  # [B, 77]


# ---------------------------------------------------------------- helpers
def lr_at(p, base, warmup=0.04):
    """Linear warm-up over the first `warmup` of progress p in [0, 1], then cosine decay to 5%."""
    if p < warmup:
        return base * max(p, 0.002) / warmup
    q = (p - warmup) / (1 - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * q)))


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


@torch.no_grad()
def ema_update(ema, model, decay):
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def edge_weight(x):
    """1 + 8 * (pixels next to an edge of the target image), [B, 1, H, W]."""
    gx = (x[..., :, 1:] - x[..., :, :-1]).abs().sum(1, keepdim=True)
    gy = (x[..., 1:, :] - x[..., :-1, :]).abs().sum(1, keepdim=True)
    e = F.pad(gx, (0, 1, 0, 0)) + F.pad(gx, (1, 0, 0, 0)) + F.pad(gy, (0, 0, 0, 1)) + F.pad(gy, (0, 0, 1, 0))
    e = F.max_pool2d(e, 3, 1, 1)
    return 1 + 8 * (e > 0.05).float()


def recon_error(y, x, edge):
    """Per-pixel reconstruction error (squared + absolute), edge-weighted if asked, [B, 3, H, W]."""
    w = edge_weight(x) if edge else 1.0
    return w * ((y - x) ** 2 + (y - x).abs())


class Log:
    def __init__(self, path):
        self.f = open(path, "a")

    def __call__(self, *a):
        s = " ".join(str(x) for x in a)
        print(s, flush=True)
        self.f.write(s + "\n")
        self.f.flush()


# ---------------------------------------------------------------- targets: scenes read off the noise
def normalised_latents(enc, cs, g, mean, std, jitter=True):
    """Render the combinations and encode them: latents with the per-channel mean removed and unit std [B, 8, 8, 8]
    (on the encoder's device)."""
    device = next(enc.parameters()).device
    with torch.no_grad():
        x = data.render(cs, g, jitter=jitter, device=device)
        return (enc(x).float() - mean.to(device)[None, :, None, None]) / std.to(device)


def noise_quantiles(noise):
    """Nine numbers in (0, 1) read off a noise x_T [8, 8, 8], each uniform over noises and independent of the
    others: q_k = Phi(u_k), u_k = 8 x the mean of channel k ~ N(0, 1) for k = 0..7, and q_8 = Phi(v), v = 4 x (mean of
    the top half - mean of the bottom half of channel 7) ~ N(0, 1). couple_quantiles turns them into open
    attributes."""
    return noise_quantiles_batch(noise[None])[0]


def noise_quantiles_batch(noise):
    """noise_quantiles for a batch of noises [B, 8, 8, 8]: a list of B lists of nine numbers."""
    u = noise.mean(dim=(2, 3)) * 8.0  # [B, 8], each ~ N(0, 1)
    v = (noise[:, 7, :4].mean(dim=(1, 2)) - noise[:, 7, 4:].mean(dim=(1, 2))) * 4.0  # [B], ~ N(0, 1)
    u = torch.cat([u, v[:, None]], 1).double().cpu()  # [B, 9]
    return (0.5 * (1 + torch.erf(u / math.sqrt(2)))).tolist()


def bucket(q, options):
    return options[min(int(q * len(options)), len(options) - 1)]


def colour_sq_distance(rgb, c):
    """Squared distance of the point rgb in [0, 1]^3 to colour c's palette RGB / 255."""
    return sum((x - p / 255) ** 2 for x, p in zip(rgb, data.PALETTE[c]))


def nearest_colour(rgb, options):
    """The colour of `options` whose palette RGB / 255 is nearest to the point rgb in [0, 1]^3."""
    return min(options, key=lambda c: colour_sq_distance(rgb, c))


# which of noise_quantiles an open colour reads: 'bucket' (the previous models), one quantile each, bucketed over
# the colour list; 'rgb' (the onestep stage's default), three quantiles as an RGB point, nearest palette colour.
# An RGB reading makes the target colour a near-linear function of three noise statistics (a bucket over an
# unordered list is not), and a sample between two readings lies between two similar colours.
COLOUR_READINGS = {"bucket": {1: (1,), 2: (2,)}, "rgb": {1: (1, 5, 6), 2: (2, 7, 8)}}


def couple_open(attrs, noise, colour="bucket"):
    """A combination for a prompt that leaves attributes open, with the open ones read off the noise x_T [8, 8, 8]
    (noise_quantiles); the background is chosen before the shape colour and neither may equal the other. None if
    the result is a held-out combination."""
    return couple_quantiles(attrs, noise_quantiles(noise), colour)


def read_colour(q, k, options, colour="bucket"):
    """The shape colour (k = 1) or background (k = 2) that the quantiles q read, among `options`."""
    read = [q[j] for j in COLOUR_READINGS[colour][k]]
    return bucket(read[0], options) if colour == "bucket" else nearest_colour(read, options)


def in_exclusion(attrs, q, combo, colour="bucket"):
    """Whether an open colour's reading fell on the colour it must not take, so that couple_quantiles moved it to
    another one: an open background read as the given shape colour, or an open shape colour read as the background
    (given or read). These rows are where the target depends on the prompt's other colour; combo is the coupled
    combination (couple_quantiles)."""
    if attrs[1] is not None and attrs[2] is None:
        return read_colour(q, 2, data.COLOURS, colour) == attrs[1]
    return attrs[1] is None and read_colour(q, 1, data.COLOURS, colour) == combo[2]


def near_background_edge(attrs, q, combo, colour="bucket", width=0.05):
    """Whether an open background's reading lies within `width` of the edge between two of the colours it may take:
    for 'rgb' the distances of (q_2, q_7, q_8) to the nearest and the second-nearest allowed palette colour differ by
    less than width; for 'bucket' q_2 is within width / 2 of a bucket edge. There a sample falls between two
    backgrounds (a blotch) more often than elsewhere."""
    if attrs[2] is not None:
        return False
    options = [c for c in data.COLOURS if c != attrs[1]]
    if colour == "bucket":
        x = q[2] * len(options)
        return abs(x - round(x)) < width / 2 * len(options) and 0 < round(x) < len(options)
    rgb = [q[j] for j in COLOUR_READINGS[colour][2]]
    d = sorted(colour_sq_distance(rgb, c) ** 0.5 for c in options)
    return d[1] - d[0] < width


NOISE_REGIONS = ["held-out reading", "background moved", "shape colour moved", "background edge", "elsewhere"]


def noise_region(attrs, q, colour="bucket"):
    """Where a noise with quantiles q falls for an open prompt, the first of NOISE_REGIONS that applies: its reading
    is a held-out combination (no training target), an open colour is moved off the colour it must avoid
    (in_exclusion: background, then shape colour), an open background is read near an edge (near_background_edge),
    or none of these (validate.py --regions counts failures per region)."""
    combo = couple_quantiles(attrs, q, colour)
    if combo is None:
        return NOISE_REGIONS[0]
    if in_exclusion(attrs, q, combo, colour):
        return NOISE_REGIONS[1] if attrs[1] is not None else NOISE_REGIONS[2]
    return NOISE_REGIONS[3] if near_background_edge(attrs, q, combo, colour) else NOISE_REGIONS[4]


def couple_quantiles(attrs, q, colour="bucket"):
    """couple_open on the quantiles q of a noise (noise_quantiles). Shape, position and size: bucket(q_k) for
    attribute k (combination order). Shape colour (k = 1) and background (k = 2) as `colour` says
    (COLOUR_READINGS)."""
    def pick(k, options):
        if attrs[k] is not None:
            return attrs[k]
        return read_colour(q, k, options, colour) if k in (1, 2) else bucket(q[k], options)

    bg = pick(2, [c for c in data.COLOURS if c != attrs[1]])
    combo = (pick(0, data.SHAPES), pick(1, [c for c in data.COLOURS if c != bg]), bg, pick(3, data.POSITIONS),
             pick(4, data.SIZES))
    return None if combo in data.HELDOUT_SET else combo


def coupled_scenes(drawn, g, tries=64, colour="bucket", p_exclusion=0.0):
    """Noises x_T [B, 8, 8, 8] and the scene each row must draw (the onestep stage's targets): a complete prompt's own
    combination, or for a prompt that leaves attributes open the given ones plus the open ones read off the noise
    (couple_quantiles). A row whose reading is a held-out combination draws a fresh noise until it is not, so no
    held-out scene is ever a target (the noise is then not exactly N(0, I) on those ~10% of open rows).
    With p_exclusion > 0, each open row that has an open colour with a colour to avoid is, with that probability,
    also redrawn until its reading falls where the colour is moved (in_exclusion; about 1 in 8 noises otherwise).
    A row still outside that region after half the tries is left as it falls."""
    noise = torch.randn((len(drawn), LATENT_CHANNELS, 8, 8), generator=g)
    combos = [tuple(attrs) if None not in attrs else None for attrs, _ in drawn]
    todo = [i for i, c in enumerate(combos) if c is None]
    want = set()  # rows to be drawn where in_exclusion holds
    if p_exclusion:
        eligible = [i for i in todo if drawn[i][0][1] is None or drawn[i][0][2] is None]
        want = {i for i, r in zip(eligible, torch.rand(len(eligible), generator=g).tolist()) if r < p_exclusion}
    for n in range(tries):
        if not todo:
            break
        if n == tries // 2:
            want.clear()  # the second half of the tries only avoids held-out scenes
        for i, q in zip(todo, noise_quantiles_batch(noise[todo])):
            combos[i] = couple_quantiles(drawn[i][0], q, colour)
            if i in want and combos[i] is not None and in_exclusion(drawn[i][0], q, combos[i], colour):
                want.discard(i)
        todo = [i for i in todo if combos[i] is None or i in want]
        if todo:
            noise[todo] = torch.randn((len(todo), LATENT_CHANNELS, 8, 8), generator=g)
    if todo:
        raise RuntimeError(f"coupled_scenes: {len(todo)} rows read as held-out scenes after {tries} noises")
    return noise, combos


class SceneLatents:
    """Normalised latents [8, 8, 8] of the no-jitter render of every training combination, encoded once."""

    def __init__(self, enc, mean, std, g, combos=data.TRAIN_COMBOS):
        self.index = {c: i for i, c in enumerate(combos)}
        self.z = torch.cat([normalised_latents(enc, combos[b:b + 256], g, mean, std, jitter=False)
                            for b in range(0, len(combos), 256)])  # [N, 8, 8, 8]
        x = data.render(combos, jitter=False)  # [N, 3, 64, 64]
        bg = torch.tensor([data.PALETTE[c[2]] for c in combos], dtype=torch.float32)[:, :, None, None] / 127.5 - 1
        shape = ((x - bg).abs().sum(1, keepdim=True) > 0.01).float()  # [N, 1, 64, 64] the shape's pixels
        # latent pixels the shape touches, and their neighbours: [N, 1, 8, 8] in {0, 1}
        self.shape = F.max_pool2d((F.avg_pool2d(shape, 8) > 0).float(), 3, 1, 1)

    def __call__(self, combos):
        return self.z[[self.index[c] for c in combos]]

    def shape_mask(self, combos):
        """[B, 1, 8, 8]: 1 on the latent pixels of the shape and their neighbours, 0 elsewhere."""
        return self.shape[[self.index[c] for c in combos]]


def read_scenes(vae, zn, mean, std):
    """What one-step samples show: decode normalised latents [B, 8, 8, 8] and read each picture with evaluate.py."""
    with torch.no_grad():
        x = decode(vae, zn * std.to(zn.device) + mean.to(zn.device)[None, :, None, None])  # [B, 3, 64, 64]
    return [evaluate(img) for img in data.to_uint8(x.cpu())]


def project_combo(attrs, seen, noise):
    """The clean scene nearest to a sample for a prompt that leaves attributes open: the prompt's attributes where
    it gives them, the ones read off the sample (read_scenes) where it does not; where the sample shows none or one
    that clashes (shape colour = background), the value read off its noise as couple_open does. A fixed function of
    (prompt, sample, noise). None if that is a held-out combination."""
    q = noise_quantiles(noise)

    def choose(k, read, options):
        if attrs[k] is not None:
            return attrs[k]
        return read if read in options else bucket(q[k], options)

    bg = choose(2, seen["background"], [c for c in data.COLOURS if c != attrs[1]])
    combo = (choose(0, seen["shape"], data.SHAPES), choose(1, seen["colour"], [c for c in data.COLOURS if c != bg]),
             bg, choose(3, seen["position"], data.POSITIONS), choose(4, seen["size"], data.SIZES))
    return None if combo in data.HELDOUT_SET else combo


def onestep_check(text, unet, vae, ck, tokens, device, n=96, seed=9):
    """A quick look while training (fixed prompts from training combinations, fixed noises; not the benchmark):
    the share of one-step samples that show one clean shape keeping every attribute the prompt gives, for complete
    prompts and for prompts that leave attributes open."""
    g = torch.Generator().manual_seed(seed)
    cs = data.sample_combos(2 * n, g, data.TRAIN_COMBOS)
    drawn = [(list(c), 0) for c in cs[:n]] + data.sample_prompt_patterns(cs[n:], g, p_complete=0.0)
    ids = tokens([data.prompt(*attrs, order=o) for attrs, o in drawn]).to(device)
    noise = randn((2 * n, LATENT_CHANNELS, 8, 8), g, device)
    t = torch.full((2 * n,), LAST_T, device=device)
    with torch.no_grad():
        seen = read_scenes(vae, unet(noise, t, text(ids).last_hidden_state).float(), ck["mean"], ck["std"])
    ok = [sc["clean"] and all(sc[k] == v for k, v in zip(ATTRS, attrs) if v is not None)
          for sc, (attrs, _) in zip(seen, drawn)]
    # variety of an open colour: distinct shape colours and backgrounds read on 32 noises of two fixed prompts
    ids = tokens(["a circle, white background"] * 32 + ["a square on the left"] * 32).to(device)
    with torch.no_grad():
        seen_open = read_scenes(vae, unet(randn((64, LATENT_CHANNELS, 8, 8), g, device), t[:64],
                                          text(ids).last_hidden_state).float(), ck["mean"], ck["std"])
    colours = len({sc["colour"] for sc in seen_open[:32]} - {None})
    backgrounds = len({sc["background"] for sc in seen_open[32:]} - {None})
    return sum(ok[:n]) / n, sum(ok[n:]) / n, colours, backgrounds


# ---------------------------------------------------------------- the training loop and the stages
def fit(run, stage, log, opt, lr, step, emas=(), ema_max=None, note=None, every=100):
    """The training loop of every stage, for its Plan: set the lr (lr_at of the progress), loss = step(i) (draws batch
    i and runs the forward passes), one optimiser step on the loss with the gradient norm clipped to 1, each
    (ema, model) of `emas` moved towards its model at decay min(ema_max, (1 + i) / (10 + i)), a log line every
    `every` steps and wherever note(i) has something to add. Returns the checkpoint's final_loss, wall_s, steps."""
    plan, params = run.plans[stage], [p for group in opt.param_groups for p in group["params"]]
    sch, i = Schedule(plan.steps, plan.budget), 0
    while not sch.done(i):
        set_lr(opt, lr_at(sch.progress(i), lr))
        loss = step(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for ema, model in emas:
            ema_update(ema, model, min(ema_max, (1 + i) / (10 + i)))
        extra = note(i) if note else ""
        if i % every == 0 or extra:
            log(f"{stage} step {i} loss {loss.item():.5f} t {sch.elapsed():.0f}s{extra}")
        i += 1
    log(f"{stage} done: {i} steps, loss {loss.item():.5f}, wall {sch.elapsed():.0f}s")
    return {"final_loss": loss.item(), "wall_s": sch.elapsed(), "steps": i}


def _cpu(sd):
    return {k: v.detach().cpu() for k, v in sd.items()}


def load_ae(preset, path, device):
    """Encoder and autoencoder of an ae-stage checkpoint (ae.pt, aeft.pt, decproj.pt), eval mode, on device."""
    ck = torch.load(path, weights_only=True, map_location="cpu")
    enc, vae = Encoder(preset.encoder_width), make_vae(preset.vae)
    enc.load_state_dict(ck["enc"])
    vae.load_state_dict(ck["vae"])
    return enc.eval().to(device), vae.eval().to(device), ck


def text_from_state(preset, state, device):
    """A text encoder holding a saved state dict, eval mode, on device."""
    text = make_text(preset.text)
    text.load_state_dict(state)
    return text.eval().to(device)


def load_generator(preset, path, device):
    """Text encoder and UNet of a onestep checkpoint (its EMA weights), eval mode, on device."""
    ck = torch.load(path, weights_only=True, map_location="cpu")
    text = text_from_state(preset, ck["text"], device)
    unet = TwinUNet(unet_config(preset.unet, preset.text["hidden_size"]))
    unet.load_state_dict(ck["unet"])
    return text, unet.eval().to(device), ck


def stage_ae(run, log):
    """Pixel-unshuffle encoder + KL decoder from scratch: MSE + L1 reconstruction + 1e-4 latent L2, the decoder on
    slightly noised latents; then the latent statistics (per-channel mean, one global std) the later stages use."""
    dev, bs = run.device, run.plans["ae"].batch
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(101)
    enc, vae = Encoder(run.preset.encoder_width).to(dev), make_vae(run.preset.vae).to(dev)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(vae.parameters()), lr=2e-3, weight_decay=0.0)

    def step(i):
        x = data.render(data.sample_combos(bs, g), g, device=dev)
        with run.amp("ae"):
            z = enc(x).float()
            zn = z + 0.1 * z.detach().std() * randn(z.shape, g, dev)  # decoder sees slightly noised latents
            y = decode(vae, zn)
        return recon_error(y, x, edge=False).mean() + 1e-4 * (z ** 2).mean()

    res = fit(run, "ae", log, opt, 2e-3, step)
    with torch.no_grad():  # latent statistics: per-channel mean, one global std
        zs = torch.cat([enc(data.render(data.sample_combos(256, g), g, device=dev))
                        for _ in range(run.preset.stat_batches)])
        mean = zs.mean(dim=(0, 2, 3))
        std = (zs - mean[None, :, None, None]).std()
    log(f"ae latent std {std.item():.4f}")
    return {"enc": _cpu(enc.state_dict()), "vae": _cpu(vae.state_dict()), "mean": mean.cpu(), "std": std.cpu(), **res}


def stage_aeft(run, log):
    """Decoder-only fine-tune, edge-weighted MSE + L1, the encoder frozen (so the latent space is kept)."""
    dev, bs = run.device, run.plans["aeft"].batch
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(202)
    enc, vae, ck = load_ae(run.preset, run.out / "ae.pt", dev)
    enc.requires_grad_(False)
    vae.train()
    opt = torch.optim.AdamW(list(vae.parameters()), lr=5e-4, weight_decay=0.0)

    def step(i):
        x = data.render(data.sample_combos(bs, g), g, device=dev)
        with torch.no_grad(), run.amp("aeft"):
            z = enc(x).float()
            z = z + 0.05 * ck["std"].to(dev) * randn(z.shape, g, dev)
        with run.amp("aeft"):
            y = decode(vae, z)
        return recon_error(y, x, edge=True).mean()

    res = fit(run, "aeft", log, opt, 5e-4, step)
    return dict(ck, vae=_cpu(vae.state_dict()), **{f"{k}_ft": v for k, v in res.items()})


def stage_onestep(run, log):
    """One-step generator trained directly on noise-coupled targets (mdref's own recipe, issue 20). Text encoder and
    UNet start from scratch (or from --onestep-init, the shipped model's second command) and see only pure noise at
    t = 999, exactly as mdref samples. Each row's target is the normalised latent of a no-jitter render
    (SceneLatents): for a complete prompt its own scene, for a prompt that leaves attributes open the given
    attributes plus the open ones read off its noise (coupled_scenes: shape, position and size from the mean of one
    noise channel each; shape colour and background as RGB points of three noise statistics each). So the map
    (prompt, noise) -> scene is a function, and MSE learns it instead of the mean of every scene the prompt allows.
    Prompts: sample_prompt_patterns (--onestep-p-complete; every open pattern equally likely); --onestep-p-exclusion
    leans the mix on the open rows where an open colour's reading falls on the colour it must avoid. The MSE is
    weighted 1 + --onestep-shape-weight on the latent pixels the shape touches and their neighbours
    (SceneLatents.shape_mask: 33 of the 64 on average; at weight 4 they hold 84% of the loss weight), so that the
    shape, whose colour only a few latent pixels carry, is not outweighed by the background. AdamW, warm-up +
    cosine, EMA of both models (the checkpoint holds the EMA)."""
    o, dev, bs = run.onestep, run.device, run.plans["onestep"].batch
    torch.manual_seed(10)
    g = torch.Generator().manual_seed(1010)
    enc, vae, ck = load_ae(run.preset, run.out / "aeft.pt", dev)
    scenes = SceneLatents(enc, ck["mean"], ck["std"], g)
    tokens = TokenCache()
    text = make_text(run.preset.text).to(dev)
    unet = TwinUNet(unet_config(run.preset.unet, run.preset.text["hidden_size"])).to(dev)
    if o.init:  # continue from an earlier onestep checkpoint (its EMA weights)
        init = torch.load(o.init, weights_only=True, map_location="cpu")
        text.load_state_dict(init["text"])
        unet.load_state_dict(init["unet"])
    ema_t, ema_u = copy.deepcopy(text).eval(), copy.deepcopy(unet).eval()
    opt = torch.optim.AdamW(list(text.parameters()) + list(unet.parameters()), lr=o.lr, weight_decay=0.01)
    t = torch.full((bs,), LAST_T, device=dev)

    def step(i):
        drawn = data.sample_prompt_patterns(data.sample_combos(bs, g), g, o.p_complete)
        noise, combos = coupled_scenes(drawn, g, colour="rgb", p_exclusion=o.p_exclusion)
        ids = tokens([data.prompt(*attrs, order=order) for attrs, order in drawn]).to(dev)
        z = scenes(combos).to(dev)  # [B, 8, 8, 8]
        with run.amp("onestep"):
            pred = unet(noise.to(dev), t, text(ids).last_hidden_state).float()
        w = 1 + o.shape_weight * scenes.shape_mask(combos).to(dev)  # [B, 1, 8, 8]
        return (w * (pred - z) ** 2).mean() / w.mean()

    def note(i):
        if not (o.check and i and i % o.check == 0):
            return ""
        return " check complete {:.3f} open {:.3f} open colours {} backgrounds {}".format(
            *onestep_check(ema_t, ema_u, vae, ck, tokens, dev))

    res = fit(run, "onestep", log, opt, o.lr, step, emas=[(ema_t, text), (ema_u, unet)], ema_max=o.ema, note=note)
    return {"unet": _cpu(ema_u.state_dict()), "text": _cpu(ema_t.state_dict()), **res}


def stage_decproj(run, log):
    """Decoder projection (mdref's own addition, not in the paper; the shipped model's last stage): a decoder-only
    fine-tune on the one-step generator's own samples (onestep.pt, at pure noise; prompts drawn as in training, a
    quarter complete), each paired with a render of the clean scene read off the frozen decoder's drawing of it,
    with no jitter, so a latent that lies between two scenes is drawn as the nearer one instead of as blotches. The
    decoder does not see the prompt, so nothing of the prompt is imposed: every attribute is read off the drawing
    (project_combo with nothing given). A quarter of each batch is real latents with their own renders (keeps
    reconstruction); samples that read as a held-out combination get weight 0. AdamW 2e-4, warm-up + cosine."""
    dev, bs = run.device, run.plans["decproj"].batch
    torch.manual_seed(8)
    g = torch.Generator().manual_seed(808)
    enc, vae, ck = load_ae(run.preset, run.out / "aeft.pt", dev)
    text, unet, _ = load_generator(run.preset, run.out / "onestep.pt", dev)
    enc.requires_grad_(False), text.requires_grad_(False), unet.requires_grad_(False)
    opt = torch.optim.AdamW(list(vae.parameters()), lr=2e-4, weight_decay=0.0)
    vae.train()
    frozen = copy.deepcopy(vae).eval().requires_grad_(False)  # reads the scenes: the decoder before this stage
    tokens, mean, std = TokenCache(), ck["mean"].to(dev)[None, :, None, None], ck["std"].to(dev)
    n_real = bs // 4
    t = torch.full((bs - n_real,), LAST_T, device=dev)

    def step(i):
        cs = data.sample_combos(bs, g)
        drawn = data.sample_prompt_attributes(cs[n_real:], g, p_complete=0.25)
        ids = tokens([data.prompt(*attrs, order=order) for attrs, order in drawn]).to(dev)
        x_real = data.render(cs[:n_real], g, device=dev)  # [R, 3, 64, 64]
        noise = randn((bs - n_real, LATENT_CHANNELS, 8, 8), g, dev)  # x_T, [B - R, 8, 8, 8]
        with torch.no_grad(), run.amp("decproj"):
            zn_gen = unet(noise, t, text(ids).last_hidden_state).float()  # one-step samples, normalised latents
            z_real = enc(x_real).float() + 0.05 * std * randn((n_real, LATENT_CHANNELS, 8, 8), g, dev)
            seen = read_scenes(frozen, zn_gen, ck["mean"], ck["std"])
        combos = [project_combo([None] * 5, sc, nz) for sc, nz in zip(seen, noise)]
        weight = torch.tensor([1.0] * n_real + [0.0 if c is None else 1.0 for c in combos], device=dev)
        x_gen = data.render([c if c is not None else cs[0] for c in combos], g, jitter=False,
                            device=dev)  # cs[0]: weight-0 filler
        with run.amp("decproj"):
            y = decode(vae, torch.cat([z_real, zn_gen * std + mean]))  # [B, 3, 64, 64]
        return (recon_error(y, torch.cat([x_real, x_gen]), edge=True).mean(dim=(1, 2, 3)) * weight).sum() / weight.sum()

    res = fit(run, "decproj", log, opt, 2e-4, step, every=25)
    return dict(ck, vae=_cpu(vae.state_dict()), **{f"{k}_decproj": v for k, v in res.items()})


STAGES = {"ae": stage_ae, "aeft": stage_aeft, "onestep": stage_onestep, "decproj": stage_decproj}


# ---------------------------------------------------------------- export
def save_weights(sd, path, dtype=torch.float16):
    from safetensors.torch import save_file
    save_file({k: v.detach().to(dtype).contiguous() for k, v in sd.items()}, str(path))


def export(run, log, dest, dtype):
    """The pipeline folder mdref loads: the run's generator (onestep.pt) and its last decoder (decproj.pt, else
    aeft.pt), weights in `dtype`, the per-channel latent mean folded into post_quant_conv's bias."""
    cpu = torch.device("cpu")
    if not (run.out / "onestep.pt").exists():
        sys.exit(f"--export: {run.out / 'onestep.pt'} not found (run the onestep stage first)")
    dec = "decproj.pt" if (run.out / "decproj.pt").exists() else "aeft.pt"
    _, vae, ck_ae = load_ae(run.preset, run.out / dec, cpu)
    text, unet, _ = load_generator(run.preset, run.out / "onestep.pt", cpu)
    # fold the per-channel latent mean into post_quant_conv's bias: decode(zn / sf) == decoder(pqc(zn*std + mean))
    mean, std = ck_ae["mean"], ck_ae["std"]
    with torch.no_grad():
        w = vae.post_quant_conv.weight[:, :, 0, 0]  # [8, 8]
        vae.post_quant_conv.bias += w @ mean
    for sub in ["text_encoder", "unet", "vae", "scheduler"]:
        (dest / sub).mkdir(parents=True, exist_ok=True)
    tc = text_config(run.preset.text)
    (dest / "text_encoder" / "config.json").write_text(json.dumps(tc, indent=2) + "\n")
    save_weights({"text_model." + k.removeprefix("text_model."): v for k, v in text.state_dict().items()},
                 dest / "text_encoder" / "model.safetensors", dtype)
    uc = unet_config(run.preset.unet, run.preset.text["hidden_size"])
    (dest / "unet" / "config.json").write_text(json.dumps(uc, indent=2) + "\n")
    save_weights(unet.state_dict(), dest / "unet" / "diffusion_pytorch_model.safetensors", dtype)
    vc = vae_config(run.preset.vae, scaling_factor=float(1.0 / std))
    (dest / "vae" / "config.json").write_text(json.dumps(vc, indent=2) + "\n")
    save_weights({k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))},
                 dest / "vae" / "diffusion_pytorch_model.safetensors", dtype)
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(), indent=2) + "\n")
    mi = {"_class_name": "MobileDiffusionPipeline", "_mdref_note": "mdref embedded default (recipe/train.py)",
          "text_encoder": ["transformers", "CLIPTextModel"], "unet": ["mdref", "UNet"],
          "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"],
          "tokenizer": None}
    (dest / "model_index.json").write_text(json.dumps(mi, indent=2) + "\n")
    log(f"exported onestep.pt (UNet) and {dec} (decoder) to {dest}")


# ---------------------------------------------------------------- main
def per_stage(spec, cast, known, flag):
    """'ae=1800,onestep=2800' -> {'ae': 1800, 'onestep': 2800}; a stage the recipe does not have is an error."""
    items = [kv.split("=", 1) for kv in spec.split(",")]
    if any(len(kv) != 2 for kv in items):
        sys.exit(f"{flag}: expected STAGE=VALUE pairs separated by commas (e.g. aeft=600,onestep=8400), got {spec!r}")
    pairs = dict(items)
    per_stage_names(",".join(pairs), known, flag)
    return {k: number(v, cast, f"{flag} {k}") for k, v in pairs.items()}


def number(text, cast, what):
    """cast(text), or exit with a message naming the option when text is not a number of that kind."""
    try:
        return cast(text)
    except ValueError:
        sys.exit(f"{what}: expected {'an integer' if cast is int else 'a number'}, got {text!r}")


def per_stage_names(spec, known, flag):
    """'aeft,onestep' -> ['aeft', 'onestep']; an unknown stage is an error."""
    names = [n for n in spec.split(",") if n]
    unknown = sorted(set(names) - set(known))
    if unknown:
        sys.exit(f"{flag}: unknown stage {', '.join(unknown)} (expected some of {', '.join(known)})")
    return names


def options():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "default"), help="run folder (checkpoints and log.txt)")
    ap.add_argument("--stages", default=",".join(STAGES), help="stages to run, in order (default: all)")
    ap.add_argument("--export", default=None, help="folder to export the pipeline to (after the last stage)")
    ap.add_argument("--export-float32", action="store_true",
                    help="export float32 safetensors (the shipped folder is float16; this is for checking that)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and 3 steps per stage (CI)")
    ap.add_argument("--steps", default=None,
                    help="every stage's step count (N) or some of them (e.g. aeft=600,onestep=8400)")
    ap.add_argument("--batch", default=None, help="per-stage batch sizes, e.g. onestep=128")
    ap.add_argument("--budget", default=None,
                    help="per-stage wall caps in seconds, e.g. onestep=5100 (a stage stops at its cap or its steps)")
    ap.add_argument("--bf16", default=None, help="stages whose forward passes run under bfloat16 autocast (default "
                    "aeft,onestep,decproj; '' for none); weights, optimiser state and losses stay float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--onestep-lr", type=float, default=Onestep.lr, help="onestep stage: peak learning rate (AdamW)")
    ap.add_argument("--onestep-p-complete", type=float, default=Onestep.p_complete,
                    help="onestep stage: share of complete prompts (the rest: every open pattern equally likely)")
    ap.add_argument("--onestep-shape-weight", type=float, default=Onestep.shape_weight,
                    help="onestep stage: extra MSE weight on the latent pixels of the shape (and their neighbours): "
                         "the shape colour is read off a few latent pixels, the background off all of them")
    ap.add_argument("--onestep-p-exclusion", type=float, default=Onestep.p_exclusion,
                    help="onestep stage: share of the open rows with a colour to avoid that are drawn where the "
                         "reading must avoid it (coupled_scenes)")
    ap.add_argument("--onestep-ema", type=float, default=Onestep.ema, help="onestep stage: EMA decay")
    ap.add_argument("--onestep-check", type=int, default=Onestep.check,
                    help="onestep stage: log a quick clean-and-obeyed check of the EMA every N steps (0: never)")
    ap.add_argument("--onestep-init", default=Onestep.init,
                    help="onestep stage: start from this onestep checkpoint instead of from scratch")
    return ap


def make_run(a):
    """The frozen Run of parsed options: the preset's plans with --steps, --batch, --budget and --bf16 applied."""
    preset = TINY if a.tiny else FULL
    steps = {}
    if a.steps is not None and "=" in a.steps:
        steps = per_stage(a.steps, int, STAGES, "--steps")
    elif a.steps is not None:
        steps = dict.fromkeys(STAGES, number(a.steps, int, "--steps"))
    batch = per_stage(a.batch, int, STAGES, "--batch") if a.batch else {}
    budget = per_stage(a.budget, float, STAGES, "--budget") if a.budget else {}
    bf16 = None if a.bf16 is None else set(per_stage_names(a.bf16, STAGES, "--bf16"))
    plans = {s: replace(p, steps=steps.get(s, p.steps), batch=batch.get(s, p.batch), budget=budget.get(s, p.budget),
                        bf16=p.bf16 if bf16 is None else s in bf16) for s, p in preset.plans.items()}
    onestep = Onestep(lr=a.onestep_lr, p_complete=a.onestep_p_complete, shape_weight=a.onestep_shape_weight,
                      p_exclusion=a.onestep_p_exclusion, ema=a.onestep_ema, check=a.onestep_check, init=a.onestep_init)
    return Run(out=Path(a.out), preset=preset, plans=MappingProxyType(plans), onestep=onestep,
               device=torch.device(a.device))


def main(argv=None):
    a = options().parse_args(argv)
    run = make_run(a)
    stages = per_stage_names(a.stages, STAGES, "--stages")
    torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    run.out.mkdir(parents=True, exist_ok=True)
    log = Log(run.out / "log.txt")
    log(f"train.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    for s in stages:
        if (run.out / f"{s}.pt").exists():
            log(f"{s}: checkpoint exists, skipped")
            continue
        torch.save(STAGES[s](run, log), run.out / f"{s}.pt")
    if a.export:
        export(run, log, Path(a.export), torch.float32 if a.export_float32 else torch.float16)


if __name__ == "__main__":
    main()
