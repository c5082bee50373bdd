"""Noise schedule and one-step / few-step sampling, as pure functions of arrays.

The sampler knows nothing of the UNet: it takes a callable ``model(x, t) -> output`` (x [B, C, h, w], t an int
timestep) and returns the clean latent, ready for ``latents / scaling_factor + shift_factor`` and the decoder.

Legend: B batch, C latent channels, h w latent size, T num_train_timesteps. `cfg` is a `mdref.io.SchedulerConfig`;
its `sampler` field picks one of two samplers:

``"x0"`` -- MobileDiffusion's one-step sampling (DiffusionGAN / UFOGen, paper Sec. 3.3): start from pure Gaussian
  noise ``x_T = n_0`` at ``t = T - 1`` (T = num_train_timesteps, "trailing"), call the model once and read the
  clean latent off its output (`predict_x0`). With more steps (2-4; UFOGen / consistency-model multistep
  sampling) the predicted x0 is re-noised to the next lower trailing timestep with fresh noise,
  ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n_k``, and the model is called again; the last x0 is returned.
``"euler"`` -- exactly what diffusers' ``EulerDiscreteScheduler(timestep_spacing="trailing")`` does inside
  ``StableDiffusionPipeline`` (SD-Turbo and similar one-step checkpoints ship it): latents ``x = n_0 * max(sigma)``,
  the model sees ``x / sqrt(sigma^2 + 1)``, ``x0 = x - sigma * eps`` and an Euler step ``x + (x - x0) / sigma *
  (sigma_next - sigma)``. Since ``sigma^2 = (1 - abar) / abar``, the model input is ``sqrt(1 - abar_T) n_0``
  and one Euler step lands on x0: the one-step result equals the "x0" sampler fed ``sqrt(1 - abar_T) n_0``
  instead of ``n_0`` (a 0.23% smaller input for SD's schedule). More Euler steps are deterministic (no re-noise).

Schedule (`alphas_cumprod`): betas ``linspace(beta_start, beta_end, T)`` ("linear") or
``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` ("scaled_linear"), ``abar = cumprod(1 - betas)``.
Precision: diffusers builds this table in float32 with PyTorch kernels; mdref reproduces those float32 values bit
for bit (see `betas`, `alphas_cumprod`). The table is a constant of the model, so the float64 mode does not
recompute it in float64: it widens the same float32 values exactly and runs all arithmetic on arrays in float64.
A float32 and a float64 run therefore differ by arithmetic rounding only, and the float64 run is what diffusers
computes with its float32 schedule in double precision. (A schedule recomputed in float64 differs from the
float32 table by up to ~4e-7 relative; `alphas_cumprod(..., exact=True)` gives it for whoever wants it.)

Noise and seeds (so that any runtime can reproduce it): all noise comes from one
``numpy.random.Generator(numpy.random.PCG64(seed)).standard_normal`` stream, drawn in float64 and then cast to the
compute dtype. Draw k (k = 0 .. steps-1) has the latent's shape and is drawn k-th, i.e. it is
``standard_normal((steps, *shape))[k]``: draw 0 is the initial noise at ``t = T - 1``, draw k >= 1 re-noises the
x0 of step k-1 to the k-th trailing timestep ("x0" sampler; "euler" uses draw 0 only). A ``noise`` array passed by
the caller overrides the seed: shape ``shape`` replaces draw 0 (later draws still come from the seed's stream),
shape ``(steps, *shape)`` replaces all draws.
"""

from __future__ import annotations

import math

import numpy as np

from .trace import record

# ---- schedule -----------------------------------------------------------------------------------------
def _torch_linspace_f32(start, end, n):
    """torch.linspace(start, end, n, dtype=torch.float32) on CPU, bit for bit.

    PyTorch casts start/end to float32, takes step = (end - start) / (n - 1) in float32, and fills the first half
    as start + step * i and the second half as end - step * (n - 1 - i), with one rounding (the kernel is compiled
    to fused multiply-adds). Here the product is exact in float64 and the sum is rounded to float32 once more;
    this matched torch on every element of every schedule tested (tests/test_sampler.py)."""
    start, end = np.float32(start), np.float32(end)
    step = np.float64((end - start) / np.float32(n - 1))
    i = np.arange(n)
    first = np.float64(start) + step * i
    second = np.float64(end) - step * (n - 1 - i)
    return np.where(i < n // 2, first, second).astype(np.float32)   # [n]


def betas(cfg, exact=False):
    """diffusers' betas: float32 values as torch computes them, or (exact=True) the same formula in float64."""
    lo, hi, n = cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        lo, hi = math.sqrt(lo), math.sqrt(hi)
    line = np.linspace(lo, hi, n) if exact else _torch_linspace_f32(lo, hi, n)
    return line * line if cfg.beta_schedule == "scaled_linear" else line


def alphas_cumprod(cfg, dtype=np.float32, exact=False):
    """abar_t = prod_{s <= t} (1 - beta_s), t = 0 .. T-1, as diffusers' DDPM / Euler / DDIM schedulers hold it.

    Default: diffusers' float32 table bit for bit (1 - betas in float32; PyTorch's CPU cumprod accumulates a
    float32 tensor in float64 and rounds each prefix product to float32), returned in `dtype` (float64 widens it
    exactly). exact=True: the schedule evaluated in float64 throughout instead."""
    b = betas(cfg, exact)
    if exact:
        return np.cumprod(1 - b).astype(dtype)
    a = np.float32(1) - b                                           # float32
    return np.cumprod(a.astype(np.float64)).astype(np.float32).astype(dtype)


def trailing_timesteps(num_train_timesteps, steps):
    """diffusers' "trailing" spacing: round(arange(T, 0, -T/steps)) - 1, e.g. T=1000: 1 -> [999],
    2 -> [999, 499], 3 -> [999, 666, 332], 4 -> [999, 749, 499, 249]."""
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be an integer in [1, {num_train_timesteps}], found {steps!r}")
    ts = np.arange(num_train_timesteps, 0, -num_train_timesteps / steps).round().astype(np.int64) - 1
    return ts[:steps]                                               # [steps]


# ---- noise --------------------------------------------------------------------------------------------
def initial_noise(shape, seed, dtype=np.float32):
    """Generator(PCG64(seed)).standard_normal(shape) in float64, then cast: draw 0 of every sampler."""
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(tuple(shape)).astype(dtype)


def noise_shapes(shape, steps):
    """The shapes of a caller's noise: draw 0 alone [B, C, h, w], or every draw [steps, B, C, h, w]."""
    return tuple(shape), (steps,) + tuple(shape)


def describe_noise_shapes(shape, steps):
    first, every = noise_shapes(shape, steps)
    return f"{first} (draw 0) or {every} (one draw per step)"


def sampling_noise(shape, steps, seed=0, dtype=np.float32, noise=None):
    """All noise a sampling run uses, [steps, *shape]: draw k = standard_normal((steps, *shape))[k] of the seed's
    stream. `noise` overrides: shape `shape` replaces draw 0, shape (steps, *shape) replaces every draw."""
    shape = tuple(shape)
    draws = None
    if noise is None or np.shape(noise) == shape:
        draws = np.random.Generator(np.random.PCG64(seed)).standard_normal((steps,) + shape)  # [steps, *shape]
    if noise is None:
        return draws.astype(dtype)
    noise = np.asarray(noise)
    if noise.shape == shape:
        draws[0] = noise
        return draws.astype(dtype)
    if noise.shape == (steps,) + shape:
        return noise.astype(dtype)
    raise ValueError(f"noise has shape {noise.shape}, expected {describe_noise_shapes(shape, steps)}")


# ---- the x0 sampler -----------------------------------------------------------------------------------
def predict_x0(model_output, x, abar_t, prediction_type):
    """Clean latent from the model output at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (DDPM, Ho et al. 2020 Eq. 4):
    epsilon: (x - sqrt(1-abar) eps) / sqrt(abar); v_prediction (Salimans & Ho 2022, v = sqrt(abar) eps -
    sqrt(1-abar) x0): sqrt(abar) x - sqrt(1-abar) v; sample: the output itself."""
    a = np.asarray(abar_t, dtype=x.dtype)
    if prediction_type == "epsilon":
        return (x - np.sqrt(1 - a) * model_output) / np.sqrt(a)
    if prediction_type == "v_prediction":
        return np.sqrt(a) * x - np.sqrt(1 - a) * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', found {prediction_type!r}")


def add_noise(x0, noise, abar_t):
    """The forward process q(x_t | x0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (diffusers' add_noise)."""
    a = np.asarray(abar_t, dtype=x0.dtype)
    return np.sqrt(a) * x0 + np.sqrt(1 - a) * noise


def sample_x0(model, draws, cfg, dtype=np.float32):
    """One call per trailing timestep: x = draws[0]; for each t: x0 = predict_x0(model(x, t)); re-noise x0 to the
    next timestep with draws[k]. draws [steps, B, C, h, w] (`sampling_noise`). Returns the last x0."""
    steps = draws.shape[0]
    abar = alphas_cumprod(cfg, dtype)
    ts = trailing_timesteps(cfg.num_train_timesteps, steps)
    x = draws[0].astype(dtype)                                      # x_{T-1}: pure noise
    for k, t in enumerate(ts):
        x0 = predict_x0(model(x, int(t)), x, abar[t], cfg.prediction_type)
        record("sampler.x0", x0)
        if k + 1 < steps:
            x = add_noise(x0, draws[k + 1].astype(dtype), abar[ts[k + 1]])
    return x0


# ---- the euler sampler (diffusers EulerDiscreteScheduler, trailing) -----------------------------------
def euler_sigmas(cfg, timesteps):
    """sigma_t = sqrt((1 - abar_t) / abar_t) at the given timesteps, then a final 0: float32 like diffusers."""
    abar = alphas_cumprod(cfg, np.float32)[np.asarray(timesteps)]
    sigma = np.sqrt((np.float32(1) - abar) / abar)                  # float32
    return np.concatenate([sigma, np.zeros(1, np.float32)])        # [steps + 1]


def sample_euler(model, noise, cfg, steps=1, dtype=np.float32):
    """StableDiffusionPipeline's loop with EulerDiscreteScheduler(trailing), s_churn 0: noise [B, C, h, w] ->
    the final latents. The scalar coefficients are float32 as diffusers computes them; arrays run in `dtype`."""
    ts = trailing_timesteps(cfg.num_train_timesteps, steps)
    sigmas = euler_sigmas(cfg, ts)
    x = np.asarray(noise, dtype) * sigmas.max()                    # init_noise_sigma: the largest sigma (trailing)
    for k, t in enumerate(ts):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        in_scale = np.sqrt(sigma * sigma + np.float32(1))          # float32, scale_model_input
        out = model(x / in_scale.astype(dtype), int(t))
        if cfg.prediction_type == "epsilon":
            x0 = x - sigma.astype(dtype) * out
        elif cfg.prediction_type == "v_prediction":
            x0 = out * (-sigma / in_scale).astype(dtype) + x / (sigma * sigma + np.float32(1)).astype(dtype)
        else:
            x0 = out
        record("sampler.x0", x0)
        derivative = (x - x0) / sigma.astype(dtype)
        x = x + derivative * (sigma_next - sigma).astype(dtype)    # one Euler step of the probability-flow ODE
    return x


# ---- entry point and guidance -------------------------------------------------------------------------
def sample(model, cfg, shape, *, steps=1, seed=0, noise=None, dtype=np.float32):
    """Run the configured sampler: the clean latent [B, C, h, w] for ``model(x, t)``. Noise: see the module doc."""
    draws = sampling_noise(shape, steps, seed, dtype, noise)       # [steps, B, C, h, w]
    record("sampler.noise", draws[0])
    if cfg.sampler == "euler":
        return sample_euler(model, draws[0], cfg, steps, dtype)
    return sample_x0(model, draws, cfg, dtype)


def apply_guidance(uncond, cond, scale):
    """Classifier-free guidance (Ho & Salimans 2022), as diffusers: uncond + scale * (cond - uncond)."""
    return uncond + np.asarray(scale, dtype=cond.dtype) * (cond - uncond)


def guided(model_cond, model_uncond=None, scale=None):
    """model(x, t) with classifier-free guidance; scale None (the default for one-step models) = model_cond."""
    if scale is None:
        return model_cond
    if model_uncond is None:
        raise ValueError("guided: a guidance scale needs an unconditional model (negative prompt)")
    return lambda x, t: apply_guidance(model_uncond(x, t), model_cond(x, t), scale)
