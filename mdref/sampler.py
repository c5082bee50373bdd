"""Noise schedule and one-step / few-step sampling, as pure functions of arrays.

The sampler knows nothing of the UNet: it takes a callable ``model(x, t) -> output`` (x [B, C, h, w], t an int
timestep) and returns the clean latent, ready for ``latents / scaling_factor + shift_factor`` and the decoder.

Legend: B batch, C latent channels, h w latent size, T num_train_timesteps. `cfg` is a `mdref.specs.SamplerSpec`;
its `sampler` field picks one of five samplers:

``"x0"`` -- MobileDiffusion's one-step sampling (DiffusionGAN / UFOGen, paper Sec. 3.3): start from pure Gaussian
  noise ``x_T = n_0`` at ``t = T - 1`` (T = num_train_timesteps, "trailing"), call the model once and read the
  clean latent off its output (`predict_x0`). With more steps (2-4; UFOGen / consistency-model multistep
  sampling) the predicted x0 is re-noised to the next lower trailing timestep with fresh noise,
  ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n_k``, and the model is called again; the last x0 is returned.
``"euler"`` -- exactly what diffusers' ``EulerDiscreteScheduler(timestep_spacing="trailing")`` does inside
  ``StableDiffusionPipeline`` (SD-Turbo, SDXL-Lightning): latents ``x = n_0 * max(sigma)``, the model sees
  ``x / sqrt(sigma^2 + 1)``, ``x0 = x - sigma * eps`` and an Euler step ``x + (x - x0) / sigma * (sigma_next -
  sigma)``. Since ``sigma^2 = (1 - abar) / abar``, one step equals the "x0" sampler fed ``sqrt(1 - abar_T) n_0``
  instead of ``n_0`` (a 0.23% smaller input for SD's schedule). More Euler steps are deterministic (no re-noise).
``"euler_ancestral"`` (SDXL-Turbo), ``"lcm"`` (LCM, DMD2 at ``timesteps=[399]``, Hyper-SDXL's 1-step UNet at
  [800]), ``"tcd"`` (Hyper-SD's unified LoRA): diffusers' EulerAncestralDiscreteScheduler, LCMScheduler and
  TCDScheduler as StableDiffusionXLPipeline drives them (`sample_euler_ancestral`, `sample_lcm`, `sample_tcd`).
Timesteps: "trailing", LCM's skipping-step rule for lcm / tcd (`lcm_timesteps`), or the caller's (`schedule`).

Schedule (`alphas_cumprod`): betas ``linspace(beta_start, beta_end, T)`` ("linear") or
``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` ("scaled_linear"), ``abar = cumprod(1 - betas)``.
Precision: diffusers builds this table in float32 with PyTorch kernels; mdref reproduces those float32 values bit
for bit (see `betas`, `alphas_cumprod`). The table is a constant of the model, so the float64 mode does not
recompute it in float64: it widens the same float32 values exactly and runs all arithmetic in float64, the
scalars derived from the table included (sigmas, sqrt(abar), c_skip, c_out), which diffusers keeps in float32.
A float32 and a float64 run therefore differ by arithmetic rounding only, and the float64 run is what diffusers
computes with its float32 schedule in double precision. (A schedule recomputed in float64 differs from the
float32 table by up to ~4e-7 relative; `alphas_cumprod(..., exact=True)` gives it for whoever wants it.)

Noise and seeds (so that any runtime can reproduce it): all noise comes from one
``numpy.random.Generator(numpy.random.PCG64(seed)).standard_normal`` stream, drawn in float64 and then cast to the
compute dtype. Draw k (k = 0 .. steps-1) has the latent's shape and is drawn k-th, i.e. it is
``standard_normal((steps, *shape))[k]``: draw 0 is the initial noise, draw k >= 1 the noise of step k-1 (the
re-noise of "x0", "lcm" and "tcd" with eta > 0; the ancestral noise of "euler_ancestral", where diffusers' last
draw is multiplied by sigma_up = 0 and mdref draws nothing); "euler" uses draw 0 only. A ``noise`` array overrides
the seed: shape ``shape`` replaces draw 0 (later draws still come from the seed's stream), shape ``(steps, *shape)``
replaces all draws.
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


def lcm_timesteps(num_train_timesteps, original_inference_steps, steps):
    """LCMScheduler's and TCDScheduler's own timesteps (LCM, Luo et al. 2023, sec. 4.2 "skipping-step"): of k-1,
    2k-1, ..., T-1 (k = T // original_inference_steps), newest first, those at floor(linspace(0, n, steps,
    endpoint=False)). T=1000, 50: 1 -> [999], 4 -> [999, 759, 499, 259] (DMD2 passes [999, 749, 499, 249])."""
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= original_inference_steps:
        raise ValueError(f"steps must be an integer in [1, {original_inference_steps}] (original_inference_steps), "
                         f"found {steps!r}")
    k = num_train_timesteps // original_inference_steps
    origin = (np.arange(1, original_inference_steps + 1) * k - 1)[::-1]                # [n]
    return origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]


def schedule(cfg, steps=1, timesteps=None):
    """The timesteps the configured sampler calls the model at: the caller's `timesteps` (strictly decreasing ints
    in [0, T); `steps` must then be 1 or their number), or the sampler's rule for `steps`."""
    if timesteps is None:
        if cfg.sampler in ("lcm", "tcd"):
            return lcm_timesteps(cfg.num_train_timesteps, cfg.original_inference_steps, steps)
        return trailing_timesteps(cfg.num_train_timesteps, steps)
    ts, T = list(timesteps) if isinstance(timesteps, (list, tuple, np.ndarray)) else [], cfg.num_train_timesteps
    if cfg.sampler == "euler_ancestral":
        raise ValueError("timesteps are not accepted by EulerAncestralDiscreteScheduler (diffusers refuses them "
                         "too); use steps")
    if not ts or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and 0 <= t < T for t in ts) \
            or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be a non-empty, strictly decreasing list of ints in [0, {T}), found "
                         f"{timesteps!r:.80}")
    if steps not in (1, len(ts)):
        raise ValueError(f"timesteps ({len(ts)} of them) disagree with steps={steps!r}: pass steps=1 or {len(ts)}")
    return np.array(ts, dtype=np.int64)                                                # [steps]


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


def sample_x0(model, draws, cfg, dtype=np.float32, timesteps=None):
    """One call per timestep (trailing unless given): x = draws[0]; for each t: x0 = predict_x0(model(x, t));
    re-noise x0 to the next timestep with draws[k]. draws [steps, B, C, h, w] (`sampling_noise`). Returns the
    last x0."""
    steps = draws.shape[0]
    abar = alphas_cumprod(cfg, dtype)
    ts = trailing_timesteps(cfg.num_train_timesteps, steps) if timesteps is None else timesteps
    x = draws[0].astype(dtype)                                      # x_{T-1}: pure noise
    for k, t in enumerate(ts):
        x0 = record("sampler.x0", predict_x0(model(x, int(t)), x, abar[t], cfg.prediction_type))
        if k + 1 < steps:
            x = add_noise(x0, draws[k + 1].astype(dtype), abar[ts[k + 1]])
    return x0


# ---- the euler samplers (diffusers EulerDiscreteScheduler / EulerAncestralDiscreteScheduler, trailing) ----------
def euler_sigmas(cfg, timesteps, dtype=np.float32):
    """sigma_t = sqrt((1 - abar_t) / abar_t) at the given timesteps, then a final 0, computed in `dtype` from the
    float32 table (float32: diffusers' sigmas; torch's float32 sqrt may round 1 ulp the other way)."""
    abar = alphas_cumprod(cfg, dtype)[np.asarray(timesteps)]
    return np.concatenate([np.sqrt((1 - abar) / abar), np.zeros(1, dtype)])   # [steps + 1]


def euler_x0(out, x, sigma, prediction_type):
    """x0 from the model output at x = x0 + sigma eps (Karras et al. 2022)."""
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":
        return out * (-sigma / np.sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1)
    return out                                                      # "sample"


def sample_euler(model, noise, cfg, steps=1, dtype=np.float32, timesteps=None):
    """StableDiffusionPipeline's loop with EulerDiscreteScheduler(trailing), s_churn 0: noise [B, C, h, w] ->
    the final latents. The scalar coefficients are computed in `dtype` like diffusers' (float32) ones."""
    ts = trailing_timesteps(cfg.num_train_timesteps, steps) if timesteps is None else timesteps
    sigmas = euler_sigmas(cfg, ts, dtype)
    x = np.asarray(noise, dtype) * sigmas.max()                    # init_noise_sigma: the largest sigma (trailing)
    for k, t in enumerate(ts):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        out = model(x / np.sqrt(sigma * sigma + 1), int(t))        # scale_model_input
        x0 = record("sampler.x0", euler_x0(out, x, sigma, cfg.prediction_type))
        x = x + (x - x0) / sigma * (sigma_next - sigma)            # one Euler step of the probability-flow ODE
    return x


def sample_euler_ancestral(model, draws, cfg, timesteps, dtype=np.float32):
    """EulerAncestralDiscreteScheduler in StableDiffusion(XL)Pipeline (Karras et al. 2022's ancestral Euler): as
    sample_euler, but each step lands on sigma_down = sqrt(sigma_next^2 - sigma_up^2) and adds sigma_up draws[k+1],
    sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)."""
    sigmas = euler_sigmas(cfg, timesteps, dtype)
    x = draws[0].astype(dtype) * sigmas.max()                      # init_noise_sigma: the largest sigma (trailing)
    for k, t in enumerate(timesteps):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        out = model(x / np.sqrt(sigma * sigma + 1), int(t))
        x0 = record("sampler.x0", euler_x0(out, x, sigma, cfg.prediction_type))
        sigma_up = np.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
        sigma_down = np.sqrt(sigma_next ** 2 - sigma_up ** 2)
        x = x + (x - x0) / sigma * (sigma_down - sigma)
        if k + 1 < len(timesteps):                                  # the last step has sigma_up = 0
            x = x + draws[k + 1].astype(dtype) * sigma_up
    return x


# ---- the consistency samplers (diffusers LCMScheduler, TCDScheduler) -----------------------------------------------
def x0_and_eps(out, x, abar_t, prediction_type):
    """(x0, eps) from the model output at x = sqrt(abar) x0 + sqrt(1 - abar) eps (as predict_x0, plus eps)."""
    a = np.asarray(abar_t, dtype=x.dtype)
    if prediction_type == "sample":
        return out, (x - np.sqrt(a) * out) / np.sqrt(1 - a)
    if prediction_type == "v_prediction":
        return predict_x0(out, x, a, prediction_type), np.sqrt(a) * out + np.sqrt(1 - a) * x
    return predict_x0(out, x, a, prediction_type), out


def lcm_boundary(t, timestep_scaling, dtype=np.float32, sigma_data=0.5):
    """LCM's boundary condition (consistency models, Song et al. 2023, sec. 3): (c_skip, c_out) = (sd^2 / (u^2 +
    sd^2), u / sqrt(u^2 + sd^2)), u = timestep_scaling t; float32 at t=399: c_out = 1 exactly, c_skip 1.6e-8."""
    u = np.asarray(t, dtype) * np.asarray(timestep_scaling, dtype)
    d = u * u + np.asarray(sigma_data ** 2, dtype)
    return np.asarray(sigma_data ** 2, dtype) / d, u / np.sqrt(d)


def sample_lcm(model, draws, cfg, timesteps, dtype=np.float32):
    """LCMScheduler in StableDiffusion(XL)Pipeline: x = draws[0] (init_noise_sigma 1, no input scaling); per t:
    denoised = c_out x0 + c_skip x; between steps x = sqrt(abar_next) denoised + sqrt(1 - abar_next) draws[k+1].
    Returns the last denoised."""
    abar, x = alphas_cumprod(cfg, dtype), draws[0].astype(dtype)
    for k, t in enumerate(timesteps):
        x0 = record("sampler.x0", x0_and_eps(model(x, int(t)), x, abar[t], cfg.prediction_type)[0])
        c_skip, c_out = lcm_boundary(t, cfg.timestep_scaling, dtype)
        denoised = c_out * x0 + c_skip * x
        if k + 1 == len(timesteps):
            return denoised
        x = add_noise(denoised, draws[k + 1].astype(dtype), abar[timesteps[k + 1]])


def sample_tcd(model, draws, cfg, timesteps, eta=0.0, dtype=np.float32):
    """TCDScheduler (Zheng et al. 2024, "Trajectory Consistency Distillation") in StableDiffusion(XL)Pipeline
    (whose eta defaults to 0): per t, with t_next the next timestep (0 after the last) and s = floor((1 - eta)
    t_next) (float32, as diffusers picks it): x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps; between steps, for
    eta > 0, x = sqrt(abar_next / abar_s) x_s + sqrt(1 - abar_next / abar_s) draws[k+1]. Returns the last x_s."""
    abar, x = alphas_cumprod(cfg, dtype), draws[0].astype(dtype)
    for k, t in enumerate(timesteps):
        x0, eps = x0_and_eps(model(x, int(t)), x, abar[t], cfg.prediction_type)
        x0 = record("sampler.x0", x0)
        t_next = int(timesteps[k + 1]) if k + 1 < len(timesteps) else 0
        a_s = abar[int(np.floor(np.float32(1 - eta) * np.float32(t_next)))]
        x = add_noise(x0, eps, a_s)                                 # x_s
        if k + 1 < len(timesteps) and eta > 0:
            x = add_noise(x, draws[k + 1].astype(dtype), abar[t_next] / a_s)
    return x


# ---- entry point and guidance -------------------------------------------------------------------------
def sample(model, cfg, shape, *, steps=1, seed=0, noise=None, dtype=np.float32, timesteps=None, eta=0.0):
    """Run the configured sampler: the clean latent [B, C, h, w] for ``model(x, t)``. Noise: see the module doc.
    timesteps: custom timesteps (`schedule`); eta: TCD's stochasticity (StableDiffusionXLPipeline's default 0)."""
    ts = schedule(cfg, steps, timesteps)
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1], found {eta!r}")
    draws = sampling_noise(shape, len(ts), seed, dtype, noise)     # [steps, B, C, h, w]
    draws[0] = record("sampler.noise", draws[0])
    if cfg.sampler == "euler":
        return sample_euler(model, draws[0], cfg, dtype=dtype, timesteps=ts)
    if cfg.sampler == "euler_ancestral":
        return sample_euler_ancestral(model, draws, cfg, ts, dtype)
    if cfg.sampler == "lcm":
        return sample_lcm(model, draws, cfg, ts, dtype)
    if cfg.sampler == "tcd":
        return sample_tcd(model, draws, cfg, ts, eta, dtype)
    return sample_x0(model, draws, cfg, dtype, timesteps=ts)


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


# ---- flow matching (diffusers FlowMatchEulerDiscreteScheduler, as DreamLite's pipelines drive it) --------------
# The model predicts a velocity v = noise - x0 at x_sigma = (1 - sigma) x0 + sigma noise, timestep 1000 sigma.
# Sigmas and timesteps are float32 as diffusers computes them (numpy float32 arrays, then torch); arrays run in
# `dtype`. `cfg` is a `mdref.io.scheduler_config.FlowMatchSchedulerConfig`.
def flow_shift_mu(image_seq_len, cfg):
    """The pipelines' calculate_shift: mu linear in the latent token count, base_shift at base_image_seq_len and
    max_shift at max_image_seq_len. DreamLite counts h * w // 4 tokens of the latent *before* its in-context
    width concatenation (a 1024x1024 image: 128 * 128 // 4 = 4096 -> mu = max_shift)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return image_seq_len * m + (cfg.base_shift - m * cfg.base_image_seq_len)


def flow_sigmas(cfg, steps, mu=None, sigmas=None):
    """set_timesteps(sigmas=..., mu=...) as DreamLite calls it -> float32 [steps + 1]: sigmas (default the
    pipelines' linspace(1, 1/steps, steps), in float64) rounded to float32, shifted (dynamic: exp(mu) / (exp(mu)
    + 1/s - 1), or mu / (mu + 1/s - 1) for time_shift_type "linear"; static: shift s / (1 + (shift - 1) s)),
    stretched to end at shift_terminal if set, then a final 0."""
    s = (np.linspace(1.0, 1 / steps, steps) if sigmas is None else np.asarray(sigmas, np.float64)).astype(np.float32)
    f32 = np.float32
    if cfg.use_dynamic_shifting:
        if mu is None:
            raise ValueError("flow_sigmas: use_dynamic_shifting needs mu (flow_shift_mu)")
        e = f32(math.exp(mu)) if cfg.time_shift_type == "exponential" else f32(mu)
        s = e / (e + (f32(1) / s - f32(1)))
    else:
        s = f32(cfg.shift) * s / (f32(1) + f32(cfg.shift - 1) * s)
    if cfg.shift_terminal:
        one_minus = f32(1) - s
        if not one_minus[-1] > 0:       # diffusers divides by zero here and returns NaN sigmas
            raise ValueError(f"flow_sigmas: shift_terminal needs a last sigma below 1, found {s[-1]} "
                             f"({steps} step(s))")
        s = f32(1) - one_minus / (one_minus[-1] / f32(1 - cfg.shift_terminal))
    return np.concatenate([s, np.zeros(1, np.float32)])              # [steps + 1]


def sample_flow(model, draws, cfg, sigmas, dtype=np.float32):
    """The pipelines' loop: x = draws[0] (pure noise at sigma 1); at step k the model gets x and the float32
    timestep t_k = 1000 sigma_k and returns v; the Euler step x + (sigma_{k+1} - sigma_k) v (the difference taken
    in float32), or with stochastic_sampling x0 = x - sigma_k v re-noised to sigma_{k+1} with draws[k + 1]
    (zeros once sigma_{k+1} = 0). draws [steps, B, C, h, w]. Returns the latent at sigma = 0."""
    ts = sigmas[:-1] * np.float32(cfg.num_train_timesteps)         # float32 [steps]
    x = draws[0].astype(dtype)
    for k, t in enumerate(ts):
        v = model(x, t)
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        x0 = record("sampler.x0", x - sigma.astype(dtype) * v)
        if cfg.stochastic_sampling:
            noise = draws[k + 1].astype(dtype) if k + 1 < len(draws) else np.zeros_like(x)
            x = (np.float32(1) - sigma_next).astype(dtype) * x0 + sigma_next.astype(dtype) * noise
        else:
            x = x + (sigma_next - sigma).astype(dtype) * v              # one Euler step of the flow ODE
    return x
