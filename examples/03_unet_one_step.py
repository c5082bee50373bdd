"""Step 3 of the pipeline: pure noise at t = 999 -> one UNet call -> the clean latent x0.

MobileDiffusion samples in one step (DiffusionGAN / UFOGen): x_T is standard Gaussian noise at the last
training timestep, the UNet is called once and x0 is read off its output (mdref.sampler.predict_x0, by the
model's prediction type). Shows the shapes through the UNet's stages and checks the hand-written step against
mdref.sampler.sample. Writes OUT/mdref_x0.npy (OUT: first argument, default /tmp).

    python examples/03_unet_one_step.py [OUT]
"""
import sys
from pathlib import Path

import numpy as np

import mdref
from mdref import sampler

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp")
out.mkdir(parents=True, exist_ok=True)
pipe = mdref.Pipeline.from_pretrained()                        # the embedded default model
cfg = pipe.scheduler                                           # schedule, prediction type, sampler
context = pipe.text_encoder(pipe.tokenizer(["a large red circle on the left, blue background"]))  # [1, 77, D]

shape = pipe.latent_shape(1)                                   # (1, C, h, w)
noise = sampler.initial_noise(shape, seed=0)                   # PCG64(0).standard_normal, float64 -> float32
t = int(sampler.trailing_timesteps(cfg.num_train_timesteps, 1)[0])  # 999
abar = sampler.alphas_cumprod(cfg)[t]                          # signal fraction left at t
print(f"noise {noise.shape} at t = {t}, alpha_bar = {abar:.3g}, prediction type {cfg.prediction_type!r}")

with mdref.trace(["unet.time_embedding", "unet.conv_in", "unet.down_blocks.?", "unet.mid_block",
                  "unet.up_blocks.?", "unet.out"]) as tr:
    # sampler "x0" (MobileDiffusion) feeds the noise as is; "euler" (diffusers' Euler) feeds sqrt(1 - abar) noise
    x_in = noise if cfg.sampler == "x0" else noise * np.sqrt(1 - abar).astype(noise.dtype)
    output = pipe.unet(x_in, t, context)                       # [1, C, h, w]
for name in tr.names():
    print(f"  {name:<22} {str(tr[name].shape):>16}")

x0 = sampler.predict_x0(output, x_in, abar, cfg.prediction_type)   # [1, C, h, w]
reference = sampler.sample(lambda x, step: pipe.unet(x, step, context), cfg, shape, seed=0)
print(f"x0 {x0.shape} {x0.dtype}, mean {x0.mean():.3f}, std {x0.std():.3f}")
print(f"max |x0 - sampler.sample(...)| = {np.abs(x0 - reference).max():.2e}")

np.save(out / "mdref_x0.npy", x0)
print(f"wrote {out / 'mdref_x0.npy'}")
