"""Training recipe for mdref's embedded default model (issue 5).

Stages (each writes runs/<name>/<stage>.pt and is skipped when that checkpoint exists, so a run resumes):
  ae      autoencoder: pixel-unshuffle encoder (not shipped) + diffusers AutoencoderKL decoder layout
  aeft    decoder-only fine-tune (edge-weighted loss), encoder frozen so the latent space is kept
  onestep one-step generator (text encoder + UNet from scratch) on noise-coupled targets: the shipped model's UNet
  decproj decoder fine-tune: the final generator's one-step samples drawn as the clean scene they show (shipped)
  export  weights folder (diffusers-style pipeline layout, float16 safetensors)
and the stages of earlier models (weights/README.md):
  unet    CLIP text encoder + MobileDiffusion UNet twin, x0 prediction, DDPM linear betas, 30% of batch at t=999
  adv     UFOGen-style one-step adversarial fine-tune of the UNet
  decft   (optional) decoder fine-tune on the generator's own latents
  distill one-step student onto two one-step teachers (complete / open prompts)
  project (optional, tried, not shipped) one-step generator pulled onto renders of the clean scene it draws

  the shipped model, CPU, 119.9 minutes of stage time (weights/README.md): the generator, then a continuation on a
  data mix that leans on the noises where an open colour must avoid the other colour
    python recipe/train.py --out runs/r21 --stages ae,aeft,onestep \
        --steps aeft=600,onestep=8400 --budget onestep=5100 --bf16 aeft,onestep --onestep-shape-weight 4
    mkdir runs/r22f && ln runs/r21/ae.pt runs/r21/aeft.pt runs/r22f/
    python recipe/train.py --out runs/r22f --stages onestep,decproj \
        --steps onestep=2000,decproj=200 --budget onestep=820,decproj=125 --bf16 onestep,decproj \
        --onestep-init runs/r21/onestep.pt --onestep-lr 3e-4 --onestep-p-complete 0.1 --onestep-shape-weight 1 \
        --onestep-p-exclusion 0.3 --onestep-ema 0.995 --onestep-check 0 --export weights/default
  a CI smoke run
    python recipe/train.py --tiny --steps 3 --out /tmp/x --export /tmp/x/model
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402
from evaluate import ATTRS, evaluate  # noqa: E402
from mdref_torch.twin import TwinUNet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_MAX_LEN = 77
NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02
LATENT_CHANNELS = 8
DEV = torch.device("cpu")  # set by --device
BF16: set[str] = set()  # stages whose forward passes run under bfloat16 autocast (set by --bf16)
BF16_STAGES = ("ae", "aeft", "adv", "distill", "decproj", "onestep")  # the stages that honour --bf16


def randn(shape, g):
    """Seeded normal noise (CPU generator, so runs agree across devices), moved to the training device."""
    return torch.randn(shape, generator=g).to(DEV)


def render(cs, g, jitter=True):
    return data.render(cs, g, jitter=jitter, device=DEV)


def amp(stage):
    """bfloat16 autocast for a stage's forward passes (--bf16 STAGES), a no-op for the other stages. Weights,
    gradients, optimiser state, EMAs and losses stay float32; backward passes run outside it."""
    return torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=stage in BF16)


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
FULL = {
    "vae": dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=8),
    "encoder_width": 64,
    "text": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
    "unet": dict(block_out_channels=[64, 96, 128], layers_per_block=1, transformer_layers_per_block=[0, 1, 1],
                 mid_transformer_layers=1, attention_head_dim=[1, 2, 2], norm_num_groups=16),
    "steps": dict(ae=2400, aeft=900, unet=3000, adv=900, decft=600, project=300, decproj=300, distill=900,
                  onestep=7200),
    "batch": dict(ae=32, aeft=32, unet=256, adv=128, project=128, decproj=64, onestep=256),
    "budget": {},  # optional wall-clock cap per stage in seconds (--budget)
}
# the same model on one GPU (how the shipped weights were made): bigger batches, more steps, time-capped stages
GPU = dict(FULL, steps=dict(ae=6000, aeft=3000, unet=12000, adv=3000, decft=1500, project=600, decproj=600,
                            distill=3000, onestep=12000),
           batch=dict(ae=64, aeft=64, unet=512, adv=256, project=256, decproj=128, onestep=512),
           budget=dict(ae=90, aeft=50, unet=220, adv=120))
TINY = {
    "vae": dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4),
    "encoder_width": 16,
    "text": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
    "unet": dict(block_out_channels=[16, 16, 32], layers_per_block=1, transformer_layers_per_block=[0, 1, 1],
                 mid_transformer_layers=1, attention_head_dim=[1, 2, 2], norm_num_groups=4),
    "steps": dict(ae=3, aeft=3, unet=3, adv=3, decft=3, project=3, decproj=3, distill=3, onestep=3),
    "batch": dict(ae=4, aeft=4, unet=8, adv=4, project=8, decproj=8, onestep=8),
    "budget": {},
}


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


def alphas_cumprod():
    betas = torch.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


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


class Discriminator(nn.Module):
    """UFOGen-style discriminator: text encoder + UNet down path and mid block (copied from the trained model)
    + a small head giving one logit per image. With own_text=False there is no text encoder: it reads a given text
    context (--disc-frozen-text)."""

    def __init__(self, text, unet, own_text=True):
        super().__init__()
        self.text = copy.deepcopy(text) if own_text else None
        u = copy.deepcopy(unet)
        self.conv_in, self.time_embedding, self.down_blocks, self.mid_block = \
            u.conv_in, u.time_embedding, u.down_blocks, u.mid_block
        self.c0, self.cfg = u.cfg["block_out_channels"][0], u.cfg
        c = u.cfg["block_out_channels"][-1]
        self.head = nn.Sequential(nn.GroupNorm(u.cfg["norm_num_groups"], c), nn.SiLU(), nn.Conv2d(c, c, 1), nn.SiLU(),
                                  nn.Conv2d(c, 1, 1))

    def forward(self, x, t, ids=None, ctx=None):
        """One logit per image [B] for x [B, 8, 8, 8] at t [B], conditioned on token ids [B, 77] through the
        discriminator's own text encoder, or on a given text context ctx [B, 77, D] (--disc-frozen-text)."""
        from diffusers.models.embeddings import get_timestep_embedding
        ctx = self.text(ids).last_hidden_state if ctx is None else ctx
        emb = self.time_embedding(get_timestep_embedding(t, self.c0, flip_sin_to_cos=True, downscale_freq_shift=0))
        h = self.conv_in(x)
        for blk in self.down_blocks:
            h, _ = blk(h, emb, ctx)
        h = self.mid_block(h, emb, ctx)
        return self.head(h).float().mean(dim=(1, 2, 3))  # [B], float32 also under --bf16 autocast


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


def recon_loss(y, x, edge):
    return recon_error(y, x, edge).mean()


class Log:
    def __init__(self, path):
        self.f = open(path, "a")

    def __call__(self, *a):
        s = " ".join(str(x) for x in a)
        print(s, flush=True)
        self.f.write(s + "\n")
        self.f.flush()


# ---------------------------------------------------------------- stages
def _combos(a):
    return data.ALL_COMBOS if a.ae_all else data.TRAIN_COMBOS


def _step(opt, loss, params):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _cpu(sd):
    return {k: v.detach().cpu() for k, v in sd.items()}


def stage_ae(a, cfg, out, log):
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(101)
    enc, vae = Encoder(cfg["encoder_width"]).to(DEV), make_vae(cfg["vae"]).to(DEV)
    params = list(enc.parameters()) + list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    sch, bs, i = Schedule(cfg["steps"]["ae"], cfg["budget"].get("ae")), cfg["batch"]["ae"], 0
    while not sch.done(i):
        set_lr(opt, lr_at(sch.progress(i), 2e-3))
        x = render(data.sample_combos(bs, g, _combos(a)), g)
        with amp("ae"):
            z = enc(x).float()
            zn = z + 0.1 * z.detach().std() * randn(z.shape, g)  # decoder sees slightly noised latents
            y = decode(vae, zn)
        loss = recon_loss(y, x, edge=False) + 1e-4 * (z ** 2).mean()
        _step(opt, loss, params)
        if i % 100 == 0:
            log(f"ae step {i} loss {loss.item():.5f} t {sch.elapsed():.0f}s")
        i += 1
    with torch.no_grad():  # latent statistics: per-channel mean, one global std
        zs = torch.cat([enc(render(data.sample_combos(256, g), g)) for _ in range(2 if a.tiny else 8)])
        mean = zs.mean(dim=(0, 2, 3))
        std = (zs - mean[None, :, None, None]).std()
    ck = {"enc": _cpu(enc.state_dict()), "vae": _cpu(vae.state_dict()), "mean": mean.cpu(), "std": std.cpu(),
          "final_loss": loss.item(), "wall_s": sch.elapsed(), "steps": i}
    torch.save(ck, out / "ae.pt")
    log(f"ae done: {i} steps, loss {loss.item():.5f}, latent std {std.item():.4f}, wall {sch.elapsed():.0f}s")


def load_ae(cfg, out, name):
    ck = torch.load(out / name, weights_only=True, map_location="cpu")
    enc, vae = Encoder(cfg["encoder_width"]), make_vae(cfg["vae"])
    enc.load_state_dict(ck["enc"])
    vae.load_state_dict(ck["vae"])
    return enc.eval().to(DEV), vae.eval().to(DEV), ck


def stage_aeft(a, cfg, out, log):
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(202)
    enc, vae, ck = load_ae(cfg, out, "ae.pt")
    enc.requires_grad_(False)
    vae.train()
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    sch, bs, i = Schedule(cfg["steps"]["aeft"], cfg["budget"].get("aeft")), cfg["batch"]["aeft"], 0
    while not sch.done(i):
        set_lr(opt, lr_at(sch.progress(i), 5e-4))
        x = render(data.sample_combos(bs, g, _combos(a)), g)
        with torch.no_grad(), amp("aeft"):
            z = enc(x).float()
            z = z + 0.05 * ck["std"].to(DEV) * randn(z.shape, g)
        with amp("aeft"):
            y = decode(vae, z)
        loss = recon_loss(y, x, edge=True)
        _step(opt, loss, params)
        if i % 100 == 0:
            log(f"aeft step {i} loss {loss.item():.5f} t {sch.elapsed():.0f}s")
        i += 1
    ck = dict(ck, vae=_cpu(vae.state_dict()), final_loss_ft=loss.item(), wall_s_ft=sch.elapsed(), steps_ft=i)
    torch.save(ck, out / "aeft.pt")
    log(f"aeft done: {i} steps, loss {loss.item():.5f}, wall {sch.elapsed():.0f}s")


def normalised_latents(enc, cs, g, mean, std, jitter=True):
    """Render the combinations and encode them: latents with the per-channel mean removed and unit std [B, 8, 8, 8]."""
    with torch.no_grad():
        return (enc(render(cs, g, jitter)).float() - mean.to(DEV)[None, :, None, None]) / std.to(DEV)


def draw_prompts(cs, tokens, g, p_complete):
    """Prompts for the combinations with attributes dropped (data.sample_prompt_attributes): the drawn
    (attributes, word order) pairs, token ids [B, 77] and whether each prompt gives all five attributes [B]."""
    drawn = data.sample_prompt_attributes(cs, g, p_complete=p_complete)
    ids = tokens([data.prompt(*attrs, order=order) for attrs, order in drawn]).to(DEV)
    complete = torch.tensor([None not in attrs for attrs, _ in drawn], device=DEV)
    return drawn, ids, complete


def latents_and_prompts(enc, mean, std, tokens, bs, g, combos=data.TRAIN_COMBOS, p_complete=0.5):
    """Normalised latents [B, 8, 8, 8], token ids [B, 77] and whether each prompt gives all five attributes [B]."""
    cs = data.sample_combos(bs, g, combos)
    z = normalised_latents(enc, cs, g, mean, std)
    _, ids, complete = draw_prompts(cs, tokens, g, p_complete)
    return z, ids, complete


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


def coupled_batch(enc, mean, std, tokens, bs, g, ab, p_complete, p_last):
    """Adversarial-stage batch in which the t = 999 samples with open prompts get a target image whose open
    attributes are a fixed function of their noise (couple_open), instead of an independent random image: the MSE
    term then asks for one definite scene per noise rather than the mean of every scene the prompt allows.
    Returns latents, token ids, complete [B], coupled [B], t [B] and the noisy input x_t."""
    cs = data.sample_combos(bs, g, data.TRAIN_COMBOS)
    drawn, ids, complete = draw_prompts(cs, tokens, g, p_complete)
    t = sample_t(bs, g, p_last=p_last)
    noise = torch.randn((bs, LATENT_CHANNELS, 8, 8), generator=g)  # x_T for the t = 999 rows, [B, 8, 8, 8]
    coupled = [False] * bs
    for i, (attrs, _) in enumerate(drawn):
        if t[i] == NUM_TRAIN_TIMESTEPS - 1 and None in attrs:
            c = couple_open(attrs, noise[i])
            if c is not None:
                cs[i], coupled[i] = c, True
    z = normalised_latents(enc, cs, g, mean, std)
    return z, ids, complete, torch.tensor(coupled, device=DEV), t, q_sample(z, t, ab, g, noise=noise.to(DEV))


def diffusion_batch(enc, mean, std, tokens, bs, g, ab, p_complete, p_last, couple):
    """A training batch for the unet and adv stages: normalised latents z, token ids, complete [B], coupled [B], t [B]
    and x_t. A share p_last of the rows sits at t = 999 (the one-step sampler's timestep), the rest at uniform t; with
    `couple`, t = 999 rows with open prompts take their target scene from their noise (coupled_batch)."""
    if couple:
        return coupled_batch(enc, mean, std, tokens, bs, g, ab, p_complete=p_complete, p_last=p_last)
    z, ids, complete = latents_and_prompts(enc, mean, std, tokens, bs, g, p_complete=p_complete)
    t = sample_t(bs, g, p_last)
    return z, ids, complete, torch.zeros_like(complete), t, q_sample(z, t, ab, g)


def sample_t(bs, g, p_last):
    t = torch.randint(NUM_TRAIN_TIMESTEPS, (bs,), generator=g)
    return torch.where(torch.rand(bs, generator=g) < p_last, torch.full_like(t, NUM_TRAIN_TIMESTEPS - 1), t).to(DEV)


def q_sample(z, t, ab, g, noise=None):
    """DDPM forward process: sqrt(ab_t) z + sqrt(1 - ab_t) noise (fresh noise from g unless given)."""
    a = ab.to(DEV)[t][:, None, None, None]
    return a.sqrt() * z + (1 - a).sqrt() * (randn(z.shape, g) if noise is None else noise)


def stage_unet(a, cfg, out, log):
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(303)
    enc, _, ck = load_ae(cfg, out, "aeft.pt")
    tokens = TokenCache()
    text = make_text(cfg["text"]).to(DEV)
    unet = TwinUNet(unet_config(cfg["unet"], cfg["text"]["hidden_size"])).to(DEV)
    ema_t, ema_u = copy.deepcopy(text).eval(), copy.deepcopy(unet).eval()
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    ab = alphas_cumprod()
    sch, bs, i = Schedule(cfg["steps"]["unet"], cfg["budget"].get("unet")), cfg["batch"]["unet"], 0
    while not sch.done(i):
        set_lr(opt, lr_at(sch.progress(i), 1e-3))
        z, ids, _, _, t, x_t = diffusion_batch(enc, ck["mean"], ck["std"], tokens, bs, g, ab, p_complete=0.5,
                                               p_last=0.3, couple=a.unet_couple_open)
        pred = unet(x_t, t, text(ids).last_hidden_state)
        loss = F.mse_loss(pred, z)
        _step(opt, loss, params)
        decay = min(0.999, (1 + i) / (10 + i))
        ema_update(ema_t, text, decay)
        ema_update(ema_u, unet, decay)
        if i % 100 == 0:
            log(f"unet step {i} loss {loss.item():.5f} t {sch.elapsed():.0f}s")
        i += 1
    torch.save({"unet": _cpu(ema_u.state_dict()), "final_loss": loss.item(), "wall_s": sch.elapsed(), "steps": i},
               out / "unet.pt")
    torch.save({"text": _cpu(ema_t.state_dict())}, out / "unet_text.pt")
    log(f"unet done: {i} steps, loss {loss.item():.5f}, wall {sch.elapsed():.0f}s")


def coupled_scenes(drawn, g, tries=64, colour="bucket", p_exclusion=0.0, p_bg_edge=0.0):
    """Noises x_T [B, 8, 8, 8] and the scene each row must draw (the onestep stage's targets): a complete prompt's own
    combination, or for a prompt that leaves attributes open the given ones plus the open ones read off the noise
    (couple_quantiles). A row whose reading is a held-out combination draws a fresh noise until it is not, so no
    held-out scene is ever a target (the noise is then not exactly N(0, I) on those ~10% of open rows).
    With p_exclusion > 0, each open row that has an open colour with a colour to avoid is, with that probability,
    also redrawn until its reading falls where the colour is moved (in_exclusion; about 1 in 8 noises otherwise).
    With p_bg_edge > 0, each open row whose background is open is, with that probability (drawn after and apart
    from the rows above), redrawn until its background reading is near an edge (near_background_edge; about 1 in 5
    noises otherwise). A row still outside its region after half the tries is left as it falls."""
    noise = torch.randn((len(drawn), LATENT_CHANNELS, 8, 8), generator=g)
    combos = [tuple(attrs) if None not in attrs else None for attrs, _ in drawn]
    todo = [i for i, c in enumerate(combos) if c is None]
    want = {}  # row -> the region (a test of attrs, q, combo, colour) it is to be drawn in
    if p_exclusion:
        eligible = [i for i in todo if drawn[i][0][1] is None or drawn[i][0][2] is None]
        want = {i: in_exclusion for i, r in zip(eligible, torch.rand(len(eligible), generator=g).tolist())
                if r < p_exclusion}
    if p_bg_edge:
        eligible = [i for i in todo if drawn[i][0][2] is None and i not in want]
        want.update({i: near_background_edge for i, r in zip(eligible, torch.rand(len(eligible), generator=g).tolist())
                     if r < p_bg_edge})
    for n in range(tries):
        if not todo:
            break
        if n == tries // 2:
            want.clear()  # the second half of the tries only avoids held-out scenes
        for i, q in zip(todo, noise_quantiles_batch(noise[todo])):
            combos[i] = couple_quantiles(drawn[i][0], q, colour)
            if i in want and combos[i] is not None and want[i](drawn[i][0], q, combos[i], colour):
                del want[i]
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


def onestep_check(text, unet, vae, ck, tokens, n=96, seed=9):
    """A quick look while training (fixed prompts from training combinations, fixed noises; not the benchmark):
    the share of one-step samples that show one clean shape keeping every attribute the prompt gives, for complete
    prompts and for prompts that leave attributes open."""
    g = torch.Generator().manual_seed(seed)
    cs = data.sample_combos(2 * n, g, data.TRAIN_COMBOS)
    drawn = [(list(c), 0) for c in cs[:n]] + data.sample_prompt_patterns(cs[n:], g, p_complete=0.0)
    ids = tokens([data.prompt(*attrs, order=o) for attrs, o in drawn]).to(DEV)
    noise = randn((2 * n, LATENT_CHANNELS, 8, 8), g)
    t = torch.full((2 * n,), NUM_TRAIN_TIMESTEPS - 1, device=DEV)
    with torch.no_grad():
        seen = read_scenes(vae, unet(noise, t, text(ids).last_hidden_state).float(), ck["mean"], ck["std"])
    ok = [sc["clean"] and all(sc[k] == v for k, v in zip(ATTRS, attrs) if v is not None)
          for sc, (attrs, _) in zip(seen, drawn)]
    # variety of an open colour: distinct shape colours and backgrounds read on 32 noises of two fixed prompts
    ids = tokens(["a circle, white background"] * 32 + ["a square on the left"] * 32).to(DEV)
    with torch.no_grad():
        seen_open = read_scenes(vae, unet(randn((64, LATENT_CHANNELS, 8, 8), g), t[:64],
                                          text(ids).last_hidden_state).float(), ck["mean"], ck["std"])
    colours = len({sc["colour"] for sc in seen_open[:32]} - {None})
    backgrounds = len({sc["background"] for sc in seen_open[32:]} - {None})
    return sum(ok[:n]) / n, sum(ok[n:]) / n, colours, backgrounds


def stage_onestep(a, cfg, out, log):
    """One-step generator trained directly on noise-coupled targets (mdref's own recipe, issue 20; replaces the
    unet + adv + distill stages of the previous model). Text encoder and UNet start from scratch and see only pure
    noise at t = 999, exactly as mdref samples. Each row's target is the normalised latent of a no-jitter render
    (SceneLatents): for a complete prompt its own scene, for a prompt that leaves attributes open the given
    attributes plus the open ones read off its noise (coupled_scenes: shape, position and size from the mean of one
    noise channel each; shape colour and background as RGB points of three noise statistics each, --onestep-colour).
    So the map (prompt, noise) -> scene is a function, and plain MSE learns it instead of the mean of every scene
    the prompt allows. Prompts: sample_prompt_patterns (--onestep-p-complete; every open pattern equally likely).
    The MSE is weighted 1 + --onestep-shape-weight on the latent pixels the shape touches and their neighbours
    (SceneLatents.shape_mask: 33 of the 64 on average), so that the shape, whose colour only a few latent pixels
    carry, is not outweighed by the background (at weight 4 the mask holds 84% of the loss weight). AdamW
    (--onestep-lr, 1e-3), warm-up + cosine, EMA (--onestep-ema, 0.999). --onestep-init continues from a onestep
    checkpoint (the shipped model's second command; weights/README.md). The data mix can lean on the rows a one-step
    model gets wrong most (coupled_scenes): --onestep-p-exclusion draws a share of the open rows where an open
    colour's reading falls on the colour it must avoid (the target there depends on the prompt's other colour),
    --onestep-p-bg-edge a share of those with an open background where its reading is near the edge between two
    colours; --onestep-open-bg-weight weighs rows that leave the background open more in the MSE."""
    torch.manual_seed(10)
    g = torch.Generator().manual_seed(1010)
    enc, vae, ck = load_ae(cfg, out, "aeft.pt")
    scenes = SceneLatents(enc, ck["mean"], ck["std"], g)
    tokens = TokenCache()
    text = make_text(cfg["text"]).to(DEV)
    unet = TwinUNet(unet_config(cfg["unet"], cfg["text"]["hidden_size"])).to(DEV)
    if a.onestep_init:  # continue from an earlier onestep checkpoint (its EMA weights)
        init = torch.load(a.onestep_init, weights_only=True, map_location="cpu")
        text.load_state_dict(init["text"])
        unet.load_state_dict(init["unet"])
    ema_t, ema_u = copy.deepcopy(text).eval(), copy.deepcopy(unet).eval()
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=a.onestep_lr, weight_decay=0.01)
    sch, bs, i = Schedule(cfg["steps"]["onestep"], cfg["budget"].get("onestep")), cfg["batch"]["onestep"], 0
    t = torch.full((bs,), NUM_TRAIN_TIMESTEPS - 1, device=DEV)
    while not sch.done(i):
        set_lr(opt, lr_at(sch.progress(i), a.onestep_lr))
        drawn = data.sample_prompt_patterns(data.sample_combos(bs, g, data.TRAIN_COMBOS), g, a.onestep_p_complete)
        noise, combos = coupled_scenes(drawn, g, colour=a.onestep_colour, p_exclusion=a.onestep_p_exclusion,
                                       p_bg_edge=a.onestep_p_bg_edge)
        ids = tokens([data.prompt(*attrs, order=o) for attrs, o in drawn]).to(DEV)
        z = scenes(combos).to(DEV)  # [B, 8, 8, 8]
        with amp("onestep"):
            pred = unet(noise.to(DEV), t, text(ids).last_hidden_state).float()
        if a.onestep_shape_weight or a.onestep_open_bg_weight:
            w = 1 + a.onestep_shape_weight * scenes.shape_mask(combos).to(DEV)  # [B, 1, 8, 8]
            bg_open = torch.tensor([attrs[2] is None for attrs, _ in drawn], dtype=torch.float32, device=DEV)
            w = w * (1 + a.onestep_open_bg_weight * bg_open)[:, None, None, None]  # rows leaving the background open
            loss = (w * (pred - z) ** 2).mean() / w.mean()
        else:
            loss = F.mse_loss(pred, z)
        _step(opt, loss, params)
        decay = min(a.onestep_ema, (1 + i) / (10 + i))
        ema_update(ema_t, text, decay)
        ema_update(ema_u, unet, decay)
        check = a.onestep_check and i and i % a.onestep_check == 0
        if i % 100 == 0 or check:
            msg = f"onestep step {i} loss {loss.item():.5f} t {sch.elapsed():.0f}s"
            if check:
                msg += " check complete {:.3f} open {:.3f} open colours {} backgrounds {}".format(
                    *onestep_check(ema_t, ema_u, vae, ck, tokens))
            log(msg)
        i += 1
    torch.save({"unet": _cpu(ema_u.state_dict()), "text": _cpu(ema_t.state_dict()), "final_loss": loss.item(),
                "wall_s": sch.elapsed(), "steps": i}, out / "onestep.pt")
    log(f"onestep done: {i} steps, loss {loss.item():.5f}, wall {sch.elapsed():.0f}s")


def load_text(cfg, out):
    """The trained text encoder of a run folder (unet_text.pt), eval mode, on DEV."""
    return text_from_state(cfg, torch.load(out / "unet_text.pt", weights_only=True, map_location="cpu")["text"])


def text_from_state(cfg, state):
    """A text encoder holding a saved state dict, eval mode, on DEV."""
    text = make_text(cfg["text"])
    text.load_state_dict(state)
    return text.eval().to(DEV)


def load_text_unet(cfg, out, name):
    ck = torch.load(out / name, weights_only=True, map_location="cpu")
    if "text" in ck:  # the onestep stage trains its own text encoder and saves it beside the UNet
        text = text_from_state(cfg, ck["text"])
    else:
        text = load_text(cfg, out)  # built before the UNet: both draw their (overwritten) init from the global RNG
    unet = TwinUNet(unet_config(cfg["unet"], cfg["text"]["hidden_size"]))
    unet.load_state_dict(ck["unet"])
    return text, unet.eval().to(DEV), ck


def stage_adv(a, cfg, out, log):
    torch.manual_seed(a.adv_seed)
    g = torch.Generator().manual_seed(100 * a.adv_seed + 4)  # 404 for the default seed 4
    enc, _, ck_ae = load_ae(cfg, out, "aeft.pt")
    text, unet, _ = load_text_unet(cfg, out, "unet.pt")
    tokens = TokenCache()
    text.requires_grad_(False)
    disc = Discriminator(text, unet, own_text=not a.disc_frozen_text).to(DEV)
    if disc.text is not None:
        disc.text.requires_grad_(True)  # its own copy of the (frozen) generator's text encoder trains
    d_params = [p for p in disc.parameters() if p.requires_grad]
    unet.train()
    ema_u = copy.deepcopy(unet).eval()
    opt_g = torch.optim.Adam(unet.parameters(), lr=a.g_lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d_params, lr=a.d_lr, betas=(0.5, 0.999))
    ab = alphas_cumprod()
    sch, bs, i = Schedule(cfg["steps"]["adv"], cfg["budget"].get("adv")), cfg["batch"]["adv"], 0
    saved_mid, snaps = False, 1
    while not sch.done(i):
        with amp("adv"):  # forward passes only (--bf16 adv); the backward passes run outside it
            z, ids, complete, coupled, t, x_t = diffusion_batch(enc, ck_ae["mean"], ck_ae["std"], tokens, bs, g, ab,
                                                                a.adv_p_complete, a.adv_p_last, a.couple_open)
            with torch.no_grad():
                ctx = text(ids).last_hidden_state
            pred = unet(x_t, t, ctx).float()
            tp = torch.randint(a.adv_tmax, (bs,), generator=g).to(DEV)  # re-noise real and predicted x0: t' < adv_tmax
            real_n, fake_n = q_sample(z, tp, ab, g), q_sample(pred, tp, ab, g)
            # discriminator: real (matched prompt) vs fake, plus real with a shuffled prompt as fake (weight 0.5)
            perm = torch.randperm(bs, generator=g).to(DEV)
            differ = (ids[perm] != ids).any(1).float()
            if a.disc_frozen_text:  # the same three terms from one batched call on the frozen text context
                d_real, d_fake, d_shuf = disc(torch.cat([real_n, fake_n.detach(), real_n]), tp.repeat(3),
                                              ctx=torch.cat([ctx, ctx, ctx[perm]])).split(bs)
            else:
                d_real, d_fake = disc(real_n, tp, ids), disc(fake_n.detach(), tp, ids)
                d_shuf = disc(real_n, tp, ids[perm])
            loss_d = (F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
                      + 0.5 * (F.softplus(d_shuf) * differ).mean())
        _step(opt_d, loss_d, d_params)
        # generator: MSE to the clean latent + adv_weight (--adv-weight) x non-saturating adversarial loss
        disc.requires_grad_(False)
        # at t = 999 the noisy input says nothing about z, so MSE there pulls towards the mean of all images the
        # prompt allows (blurred corners, averaged colours); --mse-last-weight / --mse-last-open-weight scale it
        per = ((pred - z) ** 2).mean(dim=(1, 2, 3))
        w_last = torch.where(coupled, a.mse_coupled_weight,
                             torch.where(complete, a.mse_last_weight, a.mse_last_open_weight))
        mse = (per * torch.where(t == NUM_TRAIN_TIMESTEPS - 1, w_last, torch.ones_like(w_last))).mean()
        with amp("adv"):
            adv = F.softplus(-(disc(fake_n, tp, ctx=ctx) if a.disc_frozen_text else disc(fake_n, tp, ids))).mean()
        _step(opt_g, mse + a.adv_weight * adv, list(unet.parameters()))
        for q in d_params:
            q.requires_grad_(True)
        ema_update(ema_u, unet, min(a.adv_ema, (1 + i) / (10 + i)))
        if not saved_mid and sch.progress(i) >= 0.5:
            torch.save({"unet": _cpu(ema_u.state_dict()), "steps": i}, out / "adv_mid.pt")
            saved_mid = True
        if a.adv_snapshots and snaps < a.adv_snapshots and sch.progress(i) >= snaps / a.adv_snapshots:
            torch.save({"unet": _cpu(ema_u.state_dict()), "steps": i}, out / f"adv_snap{snaps}.pt")
            snaps += 1
        if i % 50 == 0:
            log(f"adv step {i} mse {mse.item():.5f} adv {adv.item():.4f} loss_d {loss_d.item():.4f} "
                f"t {sch.elapsed():.0f}s")
        i += 1
    torch.save({"unet": _cpu(ema_u.state_dict()), "final_mse": mse.item(), "final_adv": adv.item(),
                "final_loss_d": loss_d.item(), "wall_s": sch.elapsed(), "steps": i}, out / "adv.pt")
    log(f"adv done: {i} steps, mse {mse.item():.5f} adv {adv.item():.4f} loss_d {loss_d.item():.4f}, "
        f"wall {sch.elapsed():.0f}s")


def generator_checkpoint(out):
    """The run's final one-step generator: onestep.pt, else distill.pt, else adv.pt."""
    return next((n for n in ["onestep.pt", "distill.pt"] if (out / n).exists()), "adv.pt")


def decoder_stage_setup(cfg, out, lr):
    """What a decoder-only stage after adv needs: the autoencoder of aeft.pt (decoder in training mode), the frozen
    text encoder and the run's one-step generator (distill.pt when the run has one, else adv.pt), a token cache, and
    AdamW over the decoder's parameters."""
    enc, vae, ck = load_ae(cfg, out, "aeft.pt")
    text, unet, _ = load_text_unet(cfg, out, generator_checkpoint(out))
    enc.requires_grad_(False), text.requires_grad_(False), unet.requires_grad_(False)
    params = list(vae.parameters())
    return enc, vae.train(), ck, text, unet, TokenCache(), params, torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def stage_decft(a, cfg, out, log):
    """Decoder-only fine-tune on the one-step generator's own predicted latents: the generator sees a real latent
    re-noised to t in [T_LO, T_HI) (so its prediction is aligned with the rendered image) and the decoder learns to
    draw the crisp render from that imperfect latent; half of each batch is real latents (keeps reconstruction)."""
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(505)
    enc, vae, ck, text, unet, tokens, params, opt = decoder_stage_setup(cfg, out, 2e-4)
    ab = alphas_cumprod()
    mean, std = ck["mean"].to(DEV)[None, :, None, None], ck["std"].to(DEV)
    sch, bs, i = Schedule(cfg["steps"]["decft"], cfg["budget"].get("decft")), cfg["batch"]["aeft"], 0
    while not sch.done(i):
        set_lr(opt, lr_at(sch.progress(i), 2e-4))
        cs = data.sample_combos(bs, g, data.TRAIN_COMBOS)
        x = render(cs, g)
        with torch.no_grad():
            z = (enc(x) - mean) / std
            h = bs // 2
            t = torch.randint(200, 700, (h,), generator=g).to(DEV)
            ids = tokens([data.prompt(*c) for c in cs[:h]]).to(DEV)
            pred = unet(q_sample(z[:h], t, ab, g), t, text(ids).last_hidden_state)
            zin = torch.cat([pred, z[h:] + 0.05 * randn(z[h:].shape, g)]) * std + mean
        loss = recon_loss(decode(vae, zin), x, edge=True)
        _step(opt, loss, params)
        if i % 50 == 0:
            log(f"decft step {i} loss {loss.item():.5f} t {sch.elapsed():.0f}s")
        i += 1
    ck = dict(ck, vae=_cpu(vae.state_dict()), final_loss_decft=loss.item(), wall_s_decft=sch.elapsed(), steps_decft=i)
    torch.save(ck, out / "decft.pt")
    log(f"decft done: {i} steps, loss {loss.item():.5f}, wall {sch.elapsed():.0f}s")



def stage_decproj(a, cfg, out, log):
    """Decoder projection (mdref's own addition, not in the paper; the shipped model's last stage): a decoder-only
    fine-tune on the one-step generator's own samples (distill.pt, else adv.pt, at pure noise; prompts drawn as in
    training), each paired with a render of the clean scene read off a drawing of it (--project-read frozen: the
    decoder before this stage; self: the decoder in training), with no jitter, so a latent that lies between two
    scenes is drawn as the nearer one instead of as blotches. The decoder does not see the prompt, so nothing of the
    prompt is imposed: every attribute is read off the drawing (project_combo with nothing given). A quarter of each
    batch is real latents with their own renders (keeps reconstruction); samples that read as a held-out combination
    get weight 0."""
    torch.manual_seed(8)
    g = torch.Generator().manual_seed(808)
    enc, vae, ck, text, unet, tokens, params, opt = decoder_stage_setup(cfg, out, a.decproj_lr)
    frozen = copy.deepcopy(vae).eval().requires_grad_(False)
    mean, std = ck["mean"].to(DEV)[None, :, None, None], ck["std"].to(DEV)
    sch, bs, i = Schedule(cfg["steps"]["decproj"], cfg["budget"].get("decproj")), cfg["batch"]["decproj"], 0
    n_real = bs // 4
    t = torch.full((bs - n_real,), NUM_TRAIN_TIMESTEPS - 1, device=DEV)
    while not sch.done(i):
        set_lr(opt, lr_at(sch.progress(i), a.decproj_lr))
        cs = data.sample_combos(bs, g, data.TRAIN_COMBOS)
        _, ids, _ = draw_prompts(cs[n_real:], tokens, g, a.project_p_complete)
        x_real = render(cs[:n_real], g)  # [R, 3, 64, 64]
        noise = randn((bs - n_real, LATENT_CHANNELS, 8, 8), g)  # x_T, [B - R, 8, 8, 8]
        with torch.no_grad(), amp("decproj"):
            zn_gen = unet(noise, t, text(ids).last_hidden_state).float()  # one-step samples, normalised latents
            z_real = enc(x_real).float() + 0.05 * std * randn((n_real, LATENT_CHANNELS, 8, 8), g)
            seen = read_scenes(frozen if a.project_read == "frozen" else vae, zn_gen, ck["mean"], ck["std"])
        combos = [project_combo([None] * 5, sc, nz) for sc, nz in zip(seen, noise)]
        weight = torch.tensor([1.0] * n_real + [0.0 if c is None else 1.0 for c in combos], device=DEV)
        x_gen = render([c if c is not None else cs[0] for c in combos], g, jitter=False)  # cs[0]: weight-0 filler
        x = torch.cat([x_real, x_gen])
        with amp("decproj"):
            y = decode(vae, torch.cat([z_real, zn_gen * std + mean]))  # [B, 3, 64, 64]
        loss = (recon_error(y, x, edge=True).mean(dim=(1, 2, 3)) * weight).sum() / weight.sum()
        _step(opt, loss, params)
        if i % 25 == 0:
            log(f"decproj step {i} loss {loss.item():.5f} t {sch.elapsed():.0f}s")
        i += 1
    ck = dict(ck, vae=_cpu(vae.state_dict()), final_loss_decproj=loss.item(), wall_s_decproj=sch.elapsed(),
              steps_decproj=i)
    torch.save(ck, out / "decproj.pt")
    log(f"decproj done: {i} steps, loss {loss.item():.5f}, wall {sch.elapsed():.0f}s")


def stage_distill(a, cfg, out, log):
    """One-step distillation onto two one-step teachers (checkpoints --teacher-complete / --teacher-open), sampled as
    mdref samples (pure noise at t = 999, one call): prompts giving all five attributes follow the first, prompts that
    leave attributes open the second. The student starts from --distill-init (default unet.pt) of the run folder; no
    images are rendered. Batch size is the adv stage's (--batch adv=N); steps --steps distill=N, wall cap
    --budget distill=S."""
    torch.manual_seed(6)
    g = torch.Generator().manual_seed(606)
    text, unet, _ = load_text_unet(cfg, out, a.distill_init)
    tokens = TokenCache()
    teachers = []
    for path in (a.teacher_complete, a.teacher_open):
        m = copy.deepcopy(unet)
        m.load_state_dict(torch.load(path, weights_only=True, map_location="cpu")["unet"])  # float16 copies cast too
        teachers.append(m.eval().requires_grad_(False))
    unet.train()
    ema_u = copy.deepcopy(unet).eval()
    opt = torch.optim.Adam(unet.parameters(), lr=a.distill_lr, betas=(0.9, 0.999))
    sch, bs, i = Schedule(cfg["steps"]["distill"], cfg["budget"].get("distill")), cfg["batch"]["adv"], 0
    while not sch.done(i):
        _, ids, complete = draw_prompts(data.sample_combos(bs, g, data.TRAIN_COMBOS), tokens, g, a.adv_p_complete)
        x_t = randn((bs, LATENT_CHANNELS, 8, 8), g)  # pure noise, [B, 8, 8, 8]
        t = torch.full((bs,), NUM_TRAIN_TIMESTEPS - 1, device=DEV)
        with torch.no_grad(), amp("distill"):
            ctx = text(ids).last_hidden_state
            target = torch.where(complete[:, None, None, None], teachers[0](x_t, t, ctx), teachers[1](x_t, t, ctx))
        with amp("distill"):
            pred = unet(x_t, t, ctx).float()
        loss = F.mse_loss(pred, target.float())
        _step(opt, loss, list(unet.parameters()))
        ema_update(ema_u, unet, min(a.adv_ema, (1 + i) / (10 + i)))
        if i % 50 == 0:
            log(f"distill step {i} loss {loss.item():.5f} t {sch.elapsed():.0f}s")
        i += 1
    torch.save({"unet": _cpu(ema_u.state_dict()), "final_loss": loss.item(), "wall_s": sch.elapsed(), "steps": i,
                "teachers": [a.teacher_complete, a.teacher_open]}, out / "distill.pt")
    log(f"distill done: {i} steps, loss {loss.item():.5f}, wall {sch.elapsed():.0f}s")


def read_scenes(vae, zn, mean, std):
    """What one-step samples show: decode normalised latents [B, 8, 8, 8] and read each picture with evaluate.py."""
    with torch.no_grad():
        x = decode(vae, zn * std.to(DEV) + mean.to(DEV)[None, :, None, None])  # [B, 3, 64, 64]
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


def stage_project(a, cfg, out, log):
    """Projection of the one-step generator onto clean scenes (mdref's own experiment after UFOGen; not in the paper,
    not in the default stages), sampled as mdref samples (pure noise at t = 999, one call). A frozen copy of the
    adv-stage generator (adv.pt) draws each noise first. For a prompt that leaves attributes open, the target is a
    fresh render of the scene read off a drawing (project_combo; --project-read picks whose drawing: the frozen
    copy's, the model's own, the frozen one where it is clean and the model's where not, or none: every open
    attribute from the noise), so the MSE asks for one clean scene per noise instead of the mean of all scenes the
    prompt allows. For a complete prompt the target is the frozen drawing itself, so what the adv stage learned there
    is held. Measured (weights/README.md): read off the model itself, every noise of a prompt collapsed onto one
    scene within 300 steps; read off the frozen copy, the share of clean samples did not move."""
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(707)
    enc, vae, ck_ae = load_ae(cfg, out, "aeft.pt")
    text, unet, _ = load_text_unet(cfg, out, "adv.pt")
    tokens = TokenCache()
    text.requires_grad_(False)
    frozen = copy.deepcopy(unet).requires_grad_(False)
    unet.train()
    ema_u = copy.deepcopy(unet).eval()
    opt = torch.optim.Adam(unet.parameters(), lr=a.project_lr, betas=(0.9, 0.999))
    sch, bs, i = Schedule(cfg["steps"]["project"], cfg["budget"].get("project")), cfg["batch"]["project"], 0
    t = torch.full((bs,), NUM_TRAIN_TIMESTEPS - 1, device=DEV)
    while not sch.done(i):
        drawn, ids, _ = draw_prompts(data.sample_combos(bs, g, data.TRAIN_COMBOS), tokens, g, a.project_p_complete)
        x_t = randn((bs, LATENT_CHANNELS, 8, 8), g)  # pure noise, [B, 8, 8, 8]
        with torch.no_grad():
            ctx = text(ids).last_hidden_state
            target = frozen(x_t, t, ctx)
        pred = unet(x_t, t, ctx)
        rows = [r for r, (attrs, _) in enumerate(drawn) if None in attrs]
        weight = torch.ones(bs, device=DEV)
        if rows:
            seen = read_scenes(vae, target[rows], ck_ae["mean"], ck_ae["std"])  # what the frozen copy drew
            if a.project_read == "noise":  # every open attribute from the noise, as couple_open reads it
                seen = [dict(sc, shape=None, colour=None, background=None, position=None, size=None) for sc in seen]
            unclean = [j for j, sc in enumerate(seen) if not sc["clean"]]
            if a.project_read == "self" or (a.project_read == "hybrid" and unclean):
                redo = range(len(rows)) if a.project_read == "self" else unclean
                for j, sc in zip(redo, read_scenes(vae, pred.detach()[[rows[j] for j in redo]], ck_ae["mean"],
                                                   ck_ae["std"])):
                    seen[j] = sc
            combos = [project_combo(drawn[r][0], sc, x_t[r]) for r, sc in zip(rows, seen)]
            weight[[rows[j] for j in unclean]] = a.project_unclean_weight
            weight[[r for r, c in zip(rows, combos) if c is None]] = 0.0  # never train towards a held-out scene
            keep = [r for r, c in zip(rows, combos) if c is not None]
            if keep:
                target[keep] = normalised_latents(enc, [c for c in combos if c is not None], g, ck_ae["mean"],
                                                  ck_ae["std"], jitter=a.project_jitter)
        loss = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * weight).sum() / weight.sum()
        _step(opt, loss, list(unet.parameters()))
        ema_update(ema_u, unet, min(a.adv_ema, (1 + i) / (10 + i)))
        if i % 25 == 0:
            log(f"project step {i} loss {loss.item():.5f} open {len(rows)} t {sch.elapsed():.0f}s")
        i += 1
    torch.save({"unet": _cpu(ema_u.state_dict()), "final_loss": loss.item(), "wall_s": sch.elapsed(), "steps": i},
               out / "project.pt")
    log(f"project done: {i} steps, loss {loss.item():.5f}, wall {sch.elapsed():.0f}s")


# ---------------------------------------------------------------- export
def save_weights(sd, path, dtype=torch.float16):
    from safetensors.torch import save_file
    save_file({k: v.detach().to(dtype).contiguous() for k, v in sd.items()}, str(path))


def stage_export(a, cfg, out, log, dest):
    global DEV
    DEV = torch.device("cpu")
    dest = Path(dest)
    dtype = torch.float32 if a.export_float32 else torch.float16
    dec = next(n for n in ["decproj.pt", "decft.pt", "aeft.pt"] if (out / n).exists())
    _, vae, ck_ae = load_ae(cfg, out, dec)
    final = next(n for n in ["onestep.pt", "distill.pt", "project.pt", "adv.pt", "unet.pt"] if (out / n).exists())
    text, unet, _ = load_text_unet(cfg, out, final)
    # fold the per-channel latent mean into post_quant_conv's bias: decode(zn / sf) == decoder(pqc(zn*std + mean))
    mean, std = ck_ae["mean"], ck_ae["std"]
    with torch.no_grad():
        w = vae.post_quant_conv.weight[:, :, 0, 0]  # [8, 8]
        vae.post_quant_conv.bias += w @ mean
    for sub in ["text_encoder", "unet", "vae", "scheduler"]:
        (dest / sub).mkdir(parents=True, exist_ok=True)
    tc = text_config(cfg["text"])
    (dest / "text_encoder" / "config.json").write_text(json.dumps(tc, indent=2) + "\n")
    save_weights({"text_model." + k.removeprefix("text_model."): v for k, v in text.state_dict().items()},
                 dest / "text_encoder" / "model.safetensors", dtype)
    uc = unet_config(cfg["unet"], cfg["text"]["hidden_size"])
    (dest / "unet" / "config.json").write_text(json.dumps(uc, indent=2) + "\n")
    save_weights(unet.state_dict(), dest / "unet" / "diffusion_pytorch_model.safetensors", dtype)
    vc = vae_config(cfg["vae"], scaling_factor=float(1.0 / std))
    (dest / "vae" / "config.json").write_text(json.dumps(vc, indent=2) + "\n")
    save_weights({k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))},
                 dest / "vae" / "diffusion_pytorch_model.safetensors", dtype)
    (dest / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(), indent=2) + "\n")
    mi = {"_class_name": "MobileDiffusionPipeline", "_mdref_note": "mdref embedded default (recipe/train.py)",
          "text_encoder": ["transformers", "CLIPTextModel"], "unet": ["mdref", "UNet"],
          "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"],
          "tokenizer": None}
    (dest / "model_index.json").write_text(json.dumps(mi, indent=2) + "\n")
    log(f"exported {final} (UNet) and {dec} (decoder) to {dest}")


# ---------------------------------------------------------------- main
STAGES = ["ae", "aeft", "unet", "adv"]  # "decft" is optional (tried for the shipped model; it did not help)


def per_stage(spec, cast, known, flag):
    """'unet=1800,adv=2800' -> {'unet': 1800, 'adv': 2800}; a stage the config has no entry for is an error."""
    items = [kv.split("=", 1) for kv in spec.split(",")]
    if any(len(kv) != 2 for kv in items):
        sys.exit(f"{flag}: expected STAGE=VALUE pairs separated by commas (e.g. unet=1800,adv=2800), got {spec!r}")
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
    """'aeft,adv' -> ['aeft', 'adv']; an unknown stage is an error."""
    names = [n for n in spec.split(",") if n]
    unknown = sorted(set(names) - set(known))
    if unknown:
        sys.exit(f"{flag}: unknown stage {', '.join(unknown)} (expected some of {', '.join(known)})")
    return names


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "default"))
    ap.add_argument("--export", default=None, help="folder to export the pipeline to (after the last stage)")
    ap.add_argument("--export-float32", action="store_true",
                    help="export float32 safetensors (the shipped folder is float16; this is for checking that)")
    ap.add_argument("--tiny", action="store_true", help="tiny config (CI)")
    ap.add_argument("--steps", default=None,
                    help="override every stage's step count (N) or some of them (e.g. unet=1800,adv=2800)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--adv-weight", type=float, default=0.1, help="weight of the adversarial generator loss")
    ap.add_argument("--mse-last-weight", type=float, default=1.0,
                    help="adv stage: weight of the MSE term on samples at t = 999 with complete prompts (1 = plain "
                         "UFOGen reconstruction)")
    ap.add_argument("--mse-last-open-weight", type=float, default=1.0,
                    help="adv stage: the same for prompts that leave attributes out")
    ap.add_argument("--adv-p-complete", type=float, default=0.5,
                    help="adv stage: fraction of prompts kept complete (the rest drop each attribute with p 0.35)")
    ap.add_argument("--g-lr", type=float, default=5e-5, help="adv stage: the generator's learning rate")
    ap.add_argument("--adv-seed", type=int, default=4, help="adv stage: torch seed (the data generator gets 100x + 4)")
    ap.add_argument("--adv-p-last", type=float, default=0.7,
                    help="adv stage: share of rows at t = 999 (the rest at uniform t, as a denoiser)")
    ap.add_argument("--d-lr", type=float, default=1e-4, help="adv stage: the discriminator's learning rate")
    ap.add_argument("--disc-frozen-text", action="store_true",
                    help="adv stage: the discriminator reads the generator's frozen text context instead of training "
                         "its own text encoder (one text pass per step instead of five; ~1.5x faster steps)")
    ap.add_argument("--adv-ema", type=float, default=0.99, help="adv stage: EMA decay of the generator weights")
    ap.add_argument("--adv-tmax", type=int, default=400, help="adv stage: the discriminator sees x0 re-noised to t' < this")
    ap.add_argument("--couple-open", action="store_true",
                    help="adv stage: t = 999 samples with open prompts get targets whose open attributes are read off "
                         "their noise (couple_open)")
    ap.add_argument("--unet-couple-open", action="store_true",
                    help="unet stage: t = 999 samples with open prompts get a target whose open attributes are read "
                         "off their noise (couple_open), so x0 at t = 999 is one scene per noise, not the mean")
    ap.add_argument("--mse-coupled-weight", type=float, default=1.0,
                    help="adv stage: MSE weight of the coupled samples (with --couple-open)")
    ap.add_argument("--teacher-complete", default=None, help="distill stage: teacher for complete prompts")
    ap.add_argument("--teacher-open", default=None, help="distill stage: teacher for prompts with attributes left out")
    ap.add_argument("--distill-lr", type=float, default=5e-5)
    ap.add_argument("--distill-init", default="unet.pt", help="distill stage: the student's starting checkpoint in "
                    "the run folder (e.g. adv.pt)")
    ap.add_argument("--project-lr", type=float, default=5e-5, help="project stage: the generator's learning rate")
    ap.add_argument("--project-read", choices=["frozen", "self", "hybrid", "noise"], default="frozen",
                    help="project stage: read the scene off the frozen adv-stage generator, the model in training, "
                         "the frozen one where its sample is clean and the model in training where it is not, or "
                         "take every open attribute from the noise (couple_open's rule)")
    ap.add_argument("--project-unclean-weight", type=float, default=1.0,
                    help="project stage: loss weight of open-prompt samples the frozen generator drew unclean")
    ap.add_argument("--decproj-lr", type=float, default=2e-4, help="decproj stage: the decoder's peak learning rate")
    ap.add_argument("--project-jitter", type=int, default=1, help="project stage: 0 renders targets without jitter")
    ap.add_argument("--project-p-complete", type=float, default=0.25,
                    help="project stage: fraction of prompts kept complete (the rest drop each attribute with p 0.35)")
    ap.add_argument("--adv-snapshots", type=int, default=0,
                    help="adv stage: also save the EMA at 1/N, 2/N, ... (N-1)/N of the run as adv_snap{k}.pt")
    ap.add_argument("--gpu", action="store_true", help="the GPU schedule (bigger batches, time-capped stages)")
    ap.add_argument("--budget", default=None, help="per-stage wall caps, e.g. ae=90,unet=200 (seconds)")
    ap.add_argument("--batch", default=None, help="per-stage batch sizes, e.g. adv=64")
    ap.add_argument("--bf16", default="", help="stages whose forward passes run under bfloat16 autocast (some of "
                    f"{','.join(BF16_STAGES)}; weights, optimiser state and losses stay float32; ~2.7x faster "
                    "decoder training, ~1.2x faster adv steps on a CPU with AVX512-BF16)")
    ap.add_argument("--onestep-lr", type=float, default=1e-3, help="onestep stage: peak learning rate (AdamW)")
    ap.add_argument("--onestep-p-complete", type=float, default=0.4,
                    help="onestep stage: share of complete prompts (the rest: every open pattern equally likely)")
    ap.add_argument("--onestep-init", default=None,
                    help="onestep stage: start from this onestep checkpoint instead of from scratch")
    ap.add_argument("--onestep-shape-weight", type=float, default=0.0,
                    help="onestep stage: extra MSE weight on the latent pixels of the shape (and their neighbours): "
                         "the shape colour is read off a few latent pixels, the background off all of them")
    ap.add_argument("--onestep-open-bg-weight", type=float, default=0.0,
                    help="onestep stage: rows whose prompt leaves the background open weigh 1 + this in the MSE")
    ap.add_argument("--onestep-p-exclusion", type=float, default=0.0,
                    help="onestep stage: share of the open rows with a colour to avoid that are drawn where the "
                         "reading must avoid it (coupled_scenes)")
    ap.add_argument("--onestep-p-bg-edge", type=float, default=0.0,
                    help="onestep stage: share of the rows with an open background drawn where its reading is near "
                         "the edge between two colours (coupled_scenes)")
    ap.add_argument("--onestep-colour", choices=sorted(COLOUR_READINGS), default="rgb",
                    help="onestep stage: how an open shape colour or background is read off the noise "
                         "(COLOUR_READINGS; 'bucket' is the rule of runs/r20)")
    ap.add_argument("--onestep-ema", type=float, default=0.999, help="onestep stage: EMA decay")
    ap.add_argument("--onestep-check", type=int, default=500,
                    help="onestep stage: log a quick clean-and-obeyed check of the EMA every N steps (0: never)")
    ap.add_argument("--ae-all", action="store_true", help="train the autoencoder on all combinations")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    global DEV
    DEV = torch.device(a.device)
    BF16.clear()
    BF16.update(per_stage_names(a.bf16, BF16_STAGES, "--bf16"))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    cfg = copy.deepcopy(TINY if a.tiny else GPU if a.gpu else FULL)
    if a.batch:
        cfg["batch"].update(per_stage(a.batch, int, cfg["batch"], "--batch"))
    if a.budget:
        cfg["budget"].update(per_stage(a.budget, float, cfg["steps"], "--budget"))
    if a.steps is not None and "=" in a.steps:
        cfg["steps"].update(per_stage(a.steps, int, cfg["steps"], "--steps"))
    elif a.steps is not None:
        cfg["steps"] = {k: number(a.steps, int, "--steps") for k in cfg["steps"]}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "log.txt")
    log(f"train.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    fns = {"ae": stage_ae, "aeft": stage_aeft, "unet": stage_unet, "adv": stage_adv, "decft": stage_decft,
           "distill": stage_distill, "project": stage_project, "decproj": stage_decproj, "onestep": stage_onestep}
    for s in a.stages.split(","):
        if (out / f"{s}.pt").exists():
            log(f"{s}: checkpoint exists, skipped")
            continue
        fns[s](a, cfg, out, log)
    if a.export:
        stage_export(a, cfg, out, log, a.export)


if __name__ == "__main__":
    main()
