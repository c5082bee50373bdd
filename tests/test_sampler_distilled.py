"""The samplers of the one-step SDXL family against the installed diffusers, fed identical model outputs and noise:

* SDXL-Turbo: EulerAncestralDiscreteScheduler, trailing, epsilon (init noise sigma = the largest sigma, the model
  input scaled by 1 / sqrt(sigma^2 + 1), ancestral noise = draw k+1 of mdref's noise stream at step k);
* SDXL-Lightning 1-step: EulerDiscreteScheduler, trailing, prediction_type "sample" (its model card's settings);
* DMD2 1-step: LCMScheduler at timesteps=[399] (LCMScheduler's own one-step timestep is 999), and 4-step at
  [999, 749, 499, 249]; Hyper-SDXL's 1-step UNet: LCMScheduler at [800] (Hyper-SD's model card);
* Hyper-SD's unified LoRA: TCDScheduler (eta as the pipeline passes it), its own timesteps or custom ones.

Each oracle loop is the one StableDiffusionXLPipeline runs: retrieve_timesteps, set_begin_index(0), latents = noise
* init_noise_sigma, scale_model_input, the model, scheduler.step(..., **extra_step_kwargs). The model is an affine
function both frameworks evaluate identically; the schedulers' noise (randn_tensor) is patched to return mdref's
draws. Every result is compared with the oracle run in float64, relative to its max |x| (so no assertion depends
on which float32 kernels torch picks on this machine; mdref float32 against diffusers float32 is printed too):
  float64: <= 1e-10, the oracle patched where diffusers stays in float32 (mdref's float64 is float64 end to end
           from the float32 abar table, the model's constant):
           - Euler / EulerAncestral cast the latent to float32 in step (`sample = sample.to(torch.float32)`): that
             one line is removed (`float64_step`);
           - their sigma table is float32: it is recomputed in float64 from the widened table after set_timesteps;
           - LCM / TCD read sqrt(abar) off a float32 tensor: alphas_cumprod is widened to float64; LCM's boundary
             scalings come from the long timestep times a float: they are evaluated on the timestep as float64.
           TCD's intermediate timestep s = floor((1 - eta) t_next) stays float32 in both: it picks a timestep.
  float32: <= min(1e-5, 8 * steps * u32 * M / R), u32 = 2^-24, R = max |result|, M = the largest magnitude a
           step works at (the initial latent, each step's x0, the result): each step rounds about 8 times (input
           scaling, x0, derivative or boundary condition, step, noise) at magnitudes <= M, and these absolute
           errors add over the steps. The scalar coefficients themselves are checked against diffusers' below
           (equal, or <= 2 ulp where torch's float32 sqrt rounds the other way).
"""

import inspect
import json
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps  # noqa: E402

import mdref  # noqa: E402
from mdref import sampler as S  # noqa: E402
from mdref.io import ConfigError  # noqa: E402
from mdref.io import scheduler_config as SC  # noqa: E402
from oracles import U32, rel_err, within  # noqa: E402

pytestmark = pytest.mark.numerics          # also run under other BLAS / oneDNN kernels (.ci/run)

SHAPE = (2, 4, 6, 5)

# The scheduler configs as SDXL base and SDXL-Turbo ship them (scheduler/scheduler_config.json).
SDXL_BASE = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
SDXL_TURBO = {"_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.24.0.dev0",
              "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
              "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
              "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
              "timestep_spacing": "trailing", "trained_betas": None}


def converted(cls_name, base=SDXL_BASE, **overrides):
    """The config a folder holds after `pipe.scheduler = Class.from_config(pipe.scheduler.config, **overrides)`
    and save_pretrained (what the model cards do): diffusers' own to_json_string, read back."""
    sched = getattr(diffusers, cls_name).from_config({k: v for k, v in base.items() if k != "_class_name"},
                                                     **overrides)
    return json.loads(sched.to_json_string())


def model_fn(x, t, flip):
    """A model both frameworks evaluate identically in float32 / float64: affine in x, depends on t."""
    return 0.3 * x - 0.001 * (t / 1000.0) + 0.05 * flip(x)


def ours_model(x, t):
    return model_fn(x, float(t), lambda y: np.flip(y, 3))


def float64_step(cls):
    """`cls` with its step's `sample = sample.to(torch.float32)` removed: diffusers' float64 path without the
    upcast-to-float32 that would cap a float64 comparison at float32 precision. Fails if the line is not there."""
    line = "sample = sample.to(torch.float32)"
    src = textwrap.dedent(inspect.getsource(cls.step))
    assert src.count(line) == 1, f"{cls.__name__}.step no longer holds {line!r}: revisit the float64 oracle"
    namespace = dict(vars(sys.modules[cls.__module__]))
    exec(src.replace(line, "pass  # float64 oracle"), namespace)
    return type(f"{cls.__name__}Float64", (cls,), {"step": namespace["step"]})


def oracle(cls_name, config, draws, dtype, monkeypatch, steps=None, timesteps=None, eta=None):
    """StableDiffusionXLPipeline's denoising loop on `draws[0]`, the scheduler's noise calls answered by draws[1:]
    in order (and by a tensor of 7s once they run out: the last step's noise must not matter)."""
    cls = getattr(diffusers, cls_name)
    module = sys.modules[cls.__module__]
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    queue = [torch.from_numpy(d.astype(dtype)) for d in draws[1:]]
    calls = []

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        calls.append(len(calls))
        return queue.pop(0) if queue else torch.full(shape, 7.0, dtype=torch_dtype)

    monkeypatch.setattr(module, "randn_tensor", randn_tensor)       # before float64_step copies the module's names
    euler = cls_name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
    if dtype == np.float64 and euler:
        cls = float64_step(cls)
    sched = cls.from_config({k: v for k, v in config.items() if k != "_class_name"})
    ts, _ = retrieve_timesteps(sched, steps, "cpu", timesteps)
    if dtype == np.float64:                                      # the float64 patches of the module doc
        abar = sched.alphas_cumprod.double()
        if euler:
            sigmas = ((1 - abar) / abar) ** 0.5
            sched.sigmas = torch.cat([sigmas[sched.timesteps.long()], torch.zeros(1, dtype=torch.float64)])
        else:
            sched.alphas_cumprod = abar
        if cls_name == "LCMScheduler":
            scalings = sched.get_scalings_for_boundary_condition_discrete
            sched.get_scalings_for_boundary_condition_discrete = lambda t: scalings(t.double())
    sched.set_begin_index(0)
    latents = torch.from_numpy(draws[0].astype(dtype)) * sched.init_noise_sigma
    extra = {} if eta is None else {"eta": eta}
    seen = []
    with torch.no_grad():
        for t in ts:
            inp = sched.scale_model_input(latents, t)
            seen.append(int(t))
            out = model_fn(inp, float(t), lambda x: torch.flip(x, (3,)))
            latents = sched.step(out, t, latents, **extra, return_dict=False)[0]
    assert latents.dtype == torch_dtype
    return latents.numpy(), seen, len(calls)


def compare(ours, x0s, draws, dtype, what, monkeypatch, cls_name, config, **kwargs):
    """mdref's result (and its per-step x0s, for the float32 scale M) against the float64 oracle (see the module doc
    for the bounds); returns the timesteps the oracle called the model at and its number of noise draws."""
    ref, seen, calls = oracle(cls_name, config, draws, np.float64, monkeypatch, **kwargs)
    assert ours.dtype == dtype and ours.shape == ref.shape
    R = np.abs(ref).max()
    err = rel_err(ours, ref)
    if dtype == np.float64:
        bound = 1e-10
    else:
        sched = getattr(diffusers, cls_name).from_config(config)
        if cls_name.startswith("Euler"):
            retrieve_timesteps(sched, kwargs.get("steps"), "cpu", kwargs.get("timesteps"))
        M = max(np.abs(draws[0]).max() * float(sched.init_noise_sigma), max(np.abs(x).max() for x in x0s), R)
        bound = min(1e-5, 8 * len(seen) * U32 * M / R)
        ref32, *_ = oracle(cls_name, config, draws, np.float32, monkeypatch, **kwargs)
        what += f" (diffusers float32 vs float64: {rel_err(ref32, ref):.2e}, mdref float32 vs diffusers float32: " \
                f"{rel_err(ours, ref32):.2e})"
    within(f"[sampler] {what} {np.dtype(dtype).name}: max |mdref - diffusers float64| / max", err, bound)
    return seen, calls


def run_ours(cfg, dtype, seed=5, steps=1, timesteps=None, eta=0.0, x0s=None):
    """mdref.sampler.sample with the affine model: (result, the noise draws in float64, the timesteps called);
    each step's x0 is appended to `x0s` if given."""
    ts = S.schedule(cfg, steps, timesteps)
    draws = S.sampling_noise(SHAPE, len(ts), seed, np.float64)
    seen = []
    with mdref.trace() as t:
        x = S.sample(lambda x, t: (seen.append(t), ours_model(x, t))[1], cfg, SHAPE, steps=steps, seed=seed,
                     dtype=dtype, timesteps=timesteps, eta=eta)
    if x0s is not None:
        x0s += [t[n] for n in t.names() if n.startswith("sampler.x0")]
    return x, draws, seen


# ---- the scheduler configs ------------------------------------------------------------------------------------------
def test_model_card_configs_choose_the_sampler():
    turbo = SC.scheduler_config_from_diffusers(SDXL_TURBO)
    assert (turbo.sampler, turbo.timestep_spacing, turbo.prediction_type) == ("euler_ancestral", "trailing", "epsilon")
    lightning = SC.scheduler_config_from_diffusers(converted("EulerDiscreteScheduler", timestep_spacing="trailing",
                                                             prediction_type="sample"))
    assert (lightning.sampler, lightning.prediction_type) == ("euler", "sample")
    dmd2 = SC.scheduler_config_from_diffusers(converted("LCMScheduler"))
    assert (dmd2.sampler, dmd2.timestep_spacing, dmd2.original_inference_steps, dmd2.timestep_scaling) == \
        ("lcm", "lcm", 50, 10.0)
    tcd = SC.scheduler_config_from_diffusers(converted("TCDScheduler"))
    assert (tcd.sampler, tcd.beta_schedule, tcd.beta_start, tcd.beta_end) == ("tcd", "scaled_linear", 0.00085, 0.012)
    with pytest.raises(ConfigError, match="timestep_spacing"):                  # SDXL base samples 'leading'
        SC.scheduler_config_from_diffusers(SDXL_BASE)


@pytest.mark.parametrize("cfg", [SC.SchedulerConfig(sampler="euler_ancestral"),
                                 SC.SchedulerConfig(sampler="lcm", timestep_spacing="lcm", timestep_scaling=8.0),
                                 SC.SchedulerConfig(sampler="tcd", timestep_spacing="lcm", original_inference_steps=25,
                                                    prediction_type="v_prediction")], ids=lambda c: c.sampler)
def test_scheduler_config_round_trip_through_diffusers(cfg):
    """mdref's scheduler_config.json is the diffusers class of the sampler; diffusers reads it with the same values
    and writes back a config mdref reads as the same SchedulerConfig."""
    d = SC.scheduler_config_to_dict(cfg)
    theirs = getattr(diffusers, d["_class_name"]).from_config(d)
    for key, value in d.items():
        if not key.startswith("_"):
            assert theirs.config[key] == value, key
    assert SC.scheduler_config_from_diffusers(json.loads(theirs.to_json_string())) == cfg
    assert SC.scheduler_config_from_diffusers(json.loads(json.dumps(d))) == cfg


def test_scheduler_config_refusals():
    for change, msg in [(dict(prediction_type="sample"), "NotImplementedError"),
                        (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
                        (dict(timestep_spacing="leading"), "timestep_spacing"), (dict(sigma_data=0.5), "unsupported"),
                        (dict(sampler="lcm"), "mdref key")]:
        with pytest.raises(ConfigError, match=msg):
            SC.scheduler_config_from_diffusers({**SDXL_TURBO, **change})
    lcm = converted("LCMScheduler")
    for change, msg in [(dict(clip_sample=True), "clip_sample"), (dict(thresholding=True), "thresholding"),
                        (dict(original_inference_steps=2000), "original_inference_steps"),
                        (dict(trained_betas=[0.1] * 1000), "trained_betas")]:
        with pytest.raises(ConfigError, match=msg):
            SC.scheduler_config_from_diffusers({**lcm, **change})
    tcd = SC.scheduler_config_from_diffusers({**converted("TCDScheduler"), "clip_sample": True, "thresholding": True})
    assert tcd.sampler == "tcd"                                     # TCDScheduler's step never clips or thresholds
    with pytest.raises(ConfigError, match="timestep_spacing must be one of \\['lcm'\\]"):
        SC.SchedulerConfig(sampler="lcm")
    with pytest.raises(ConfigError, match="EulerAncestralDiscreteScheduler"):
        SC.SchedulerConfig(sampler="euler_ancestral", prediction_type="sample")


# ---- timesteps and coefficients, bit for bit -----------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["LCMScheduler", "TCDScheduler"])
@pytest.mark.parametrize("original", [50, 25, 8])
def test_lcm_timesteps_equal_diffusers(cls, original):
    sched = getattr(diffusers, cls)(original_inference_steps=original)
    for steps in range(1, min(original, 9) + 1):
        sched.set_timesteps(steps)
        assert S.lcm_timesteps(1000, original, steps).tolist() == sched.timesteps.tolist(), steps
    assert S.lcm_timesteps(1000, 50, 1).tolist() == [999]              # not DMD2's 399: it passes timesteps=[399]
    assert S.lcm_timesteps(1000, 50, 4).tolist() == [999, 759, 499, 259]
    with pytest.raises(ValueError, match="original_inference_steps"):
        S.lcm_timesteps(1000, original, original + 1)


def ulps(a, b):
    """Distance in units in the last place of a's float type (both arrays of one sign)."""
    i = {4: np.int32, 8: np.int64}[a.dtype.itemsize]
    return np.abs(a.view(i).astype(np.int64) - b.astype(a.dtype).view(i).astype(np.int64))


def test_lcm_boundary_equals_diffusers():
    """c_skip and c_out at every timestep, as LCMScheduler computes them from the long timestep tensor the pipeline
    passes (float32), and from the timestep as float64. c_skip is equal bit for bit. c_out divides by a square root
    that mdref rounds as IEEE sqrt does, while torch 2.13's float32 sqrt rounds 38 of these 1000 arguments 1 ulp
    the other way (under every ATen CPU capability: AVX-512, AVX2, default); c_out then differs by <= 2 ulps
    (1.2e-7). At t=399, c_out is 1 exactly in float32 and c_skip 1.57e-8."""
    sched = diffusers.LCMScheduler()
    t = np.arange(1000)
    for dtype, torch_t in ((np.float32, torch.tensor), (np.float64, lambda v: torch.tensor(v).double())):
        c_skip, c_out = S.lcm_boundary(t, 10.0, dtype)
        ref = [sched.get_scalings_for_boundary_condition_discrete(torch_t(v)) for v in t.tolist()]
        ref_skip, ref_out = (np.array([r[k].item() for r in ref], dtype) for k in (0, 1))
        assert c_skip.dtype == c_out.dtype == dtype
        assert ulps(c_skip[1:], ref_skip[1:]).max() == 0 and c_skip[0] == ref_skip[0] == 1
        assert ulps(c_out, ref_out).max() <= 2
        print(f"\n[sampler] lcm_boundary {np.dtype(dtype).name}: c_out differs from diffusers' in "
              f"{int((c_out != ref_out).sum())} of 1000 timesteps, max {int(ulps(c_out, ref_out).max())} ulp")
    u = np.arange(1000, dtype=np.float32) * np.float32(10)
    d = u * u + np.float32(0.25)
    ieee = np.sqrt(d.astype(np.float64)).astype(np.float32)           # correctly rounded float32 square roots
    np.testing.assert_array_equal(S.lcm_boundary(t, 10.0)[1], u / ieee)
    assert int((torch.sqrt(torch.from_numpy(d)).numpy() != ieee).sum()) <= 60      # 38 with torch 2.13
    c_skip, c_out = S.lcm_boundary(399, 10.0)
    assert c_out == np.float32(1) and 1.5e-8 < c_skip < 1.6e-8


def test_tcd_intermediate_timestep_is_float32_like_diffusers():
    """s = floor((1 - eta) t_next) is computed on a float32 tensor in diffusers: eta = 0.3, t_next = 90 gives 63 in
    float32 (62 in float64). mdref's float32 expression gives torch's value for every t_next and these etas."""
    t_next = np.arange(1000)
    for eta in (0.0, 0.1, 0.3, 0.35, 0.5, 0.7, 0.8, 0.9, 1.0):
        ref = torch.floor((1 - eta) * torch.from_numpy(t_next)).to(torch.long).numpy()
        ours = np.floor(np.float32(1 - eta) * t_next.astype(np.float32)).astype(np.int64)
        np.testing.assert_array_equal(ours, ref)
    assert int(np.floor(np.float32(1 - 0.3) * np.float32(90))) == 63 and int(np.floor((1 - 0.3) * 90)) == 62


def test_euler_ancestral_sigmas_and_init_noise_sigma_equal_diffusers():
    sched = diffusers.EulerAncestralDiscreteScheduler.from_config(SDXL_TURBO)
    for steps in (1, 2, 4):
        sched.set_timesteps(steps)
        ts = S.trailing_timesteps(1000, steps)
        assert ts.tolist() == sched.timesteps.numpy().astype(int).tolist()
        ours = S.euler_sigmas(SC.SchedulerConfig(), ts)
        assert ulps(ours[:-1], sched.sigmas.numpy()[:-1]).max() <= 1 and ours[-1] == 0       # torch's sqrt: <= 1 ulp
        assert ulps(ours[:1], np.float32(sched.init_noise_sigma)[None]).max() <= 1
    assert float(sched.init_noise_sigma) == pytest.approx(14.6146, rel=1e-4)   # sigma at t = 999 (trailing)


# ---- the sampling loops against diffusers ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_ancestral_matches_diffusers(monkeypatch, dtype, steps, prediction_type):
    """SDXL-Turbo's sampler. One step: no noise reaches the result (sigma_up = 0). More: draw k+1 is step k's
    ancestral noise; diffusers draws one more at the last step and multiplies it by 0 (the oracle's 7s)."""
    config = {**SDXL_TURBO, "prediction_type": prediction_type}
    cfg = SC.scheduler_config_from_diffusers(config)
    x0s = []
    ours, draws, seen = run_ours(cfg, dtype, steps=steps, x0s=x0s)
    ref_seen, noise_calls = compare(ours, x0s, draws, dtype, f"euler_ancestral {prediction_type} {steps} step(s)",
                                    monkeypatch, "EulerAncestralDiscreteScheduler", config, steps=steps)
    assert seen == ref_seen == S.trailing_timesteps(1000, steps).tolist() and noise_calls == steps


def test_euler_ancestral_one_step_is_euler_one_step():
    turbo = SC.scheduler_config_from_diffusers(SDXL_TURBO)
    euler = SC.SchedulerConfig(beta_schedule="scaled_linear", sampler="euler")
    a, *_ = run_ours(turbo, np.float64)
    b, *_ = run_ours(euler, np.float64)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("steps,timesteps", [(1, None), (2, None), (1, [999, 499, 250])])
def test_lightning_euler_sample_prediction_matches_diffusers(monkeypatch, dtype, steps, timesteps):
    """SDXL-Lightning's 1-step UNet: EulerDiscreteScheduler.from_config(base, timestep_spacing="trailing",
    prediction_type="sample") (its model card); also with custom timesteps, which EulerDiscreteScheduler takes."""
    config = converted("EulerDiscreteScheduler", timestep_spacing="trailing", prediction_type="sample")
    cfg = SC.scheduler_config_from_diffusers(config)
    x0s = []
    ours, draws, seen = run_ours(cfg, dtype, steps=steps, timesteps=timesteps, x0s=x0s)
    ref_seen, _ = compare(ours, x0s, draws, dtype, f"euler sample timesteps={seen}", monkeypatch,
                          "EulerDiscreteScheduler", config, steps=None if timesteps else steps, timesteps=timesteps)
    assert seen == ref_seen


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("timesteps,steps", [([399], None), ([800], None), ([999, 749, 499, 249], None), (None, 1),
                                             (None, 4)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_lcm_matches_diffusers(monkeypatch, dtype, timesteps, steps, prediction_type):
    """DMD2 (timesteps=[399], 4-step [999, 749, 499, 249]), Hyper-SDXL's 1-step UNet ([800]), LCMScheduler's own
    timesteps; the re-noise between steps uses draw k+1."""
    config = converted("LCMScheduler", prediction_type=prediction_type)
    cfg = SC.scheduler_config_from_diffusers(config)
    x0s = []
    ours, draws, seen = run_ours(cfg, dtype, steps=steps or 1, timesteps=timesteps, x0s=x0s)
    ref_seen, noise_calls = compare(ours, x0s, draws, dtype, f"lcm {prediction_type} timesteps={seen}", monkeypatch,
                                    "LCMScheduler", config, steps=steps, timesteps=timesteps)
    assert seen == ref_seen and noise_calls == len(seen) - 1


def test_lcm_one_step_at_399_is_the_boundary_condition():
    """DMD2's one step: c_out x0 + c_skip x with c_out = 1, c_skip = 1.57e-8 in float32 (the noise is kept at a
    weight of 1.6e-8; x0 itself is recorded as sampler.x0)."""
    cfg = SC.scheduler_config_from_diffusers(converted("LCMScheduler"))
    x0s = []
    ours, draws, _ = run_ours(cfg, np.float32, timesteps=[399], x0s=x0s)
    c_skip, c_out = S.lcm_boundary(399, 10.0)
    np.testing.assert_array_equal(ours, x0s[0] + c_skip * draws[0].astype(np.float32))
    assert 0 < np.abs(ours - x0s[0]).max() < 1e-7


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("timesteps,steps,eta", [([800], None, 1.0), (None, 1, 0.3), (None, 4, 0.3), (None, 4, 0.0),
                                                 ([999, 666, 250], None, 1.0), ([999, 499], None, 0.5)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_tcd_matches_diffusers(monkeypatch, dtype, timesteps, steps, eta, prediction_type):
    """TCDScheduler with the eta StableDiffusionXLPipeline passes to its step; noise only between steps and only
    for eta > 0 (draw k+1)."""
    config = converted("TCDScheduler", prediction_type=prediction_type)
    cfg = SC.scheduler_config_from_diffusers(config)
    x0s = []
    ours, draws, seen = run_ours(cfg, dtype, steps=steps or 1, timesteps=timesteps, eta=eta, x0s=x0s)
    ref_seen, noise_calls = compare(ours, x0s, draws, dtype, f"tcd {prediction_type} eta={eta} timesteps={seen}",
                                    monkeypatch, "TCDScheduler", config, steps=steps, timesteps=timesteps, eta=eta)
    assert seen == ref_seen and noise_calls == (len(seen) - 1 if eta > 0 else 0)


def test_tcd_one_step_is_not_x0():
    """One TCD step returns sqrt(abar_0) x0 + sqrt(1 - abar_0) eps (s = 0), whatever eta: 2.9% of the predicted
    noise stays in the latent."""
    cfg = SC.scheduler_config_from_diffusers(converted("TCDScheduler"))
    x0s = []
    ours, draws, _ = run_ours(cfg, np.float64, timesteps=[800], eta=0.7, x0s=x0s)
    a0 = np.float64(S.alphas_cumprod(cfg)[0])
    eps = ours_model(draws[0], 800)
    np.testing.assert_allclose(ours, np.sqrt(a0) * x0s[0] + np.sqrt(1 - a0) * eps, rtol=0, atol=1e-14)
    assert float(np.sqrt(1 - a0)) == pytest.approx(0.0292, abs=1e-4)


# ---- the interface -----------------------------------------------------------------------------------------------
def test_schedule_checks_custom_timesteps():
    lcm = SC.SchedulerConfig(sampler="lcm", timestep_spacing="lcm")
    assert S.schedule(lcm, 1, [399]).tolist() == [399] and S.schedule(lcm, 4).tolist() == [999, 759, 499, 259]
    assert S.schedule(lcm, 2, [999, 499]).tolist() == [999, 499]
    for bad in ([], [399, 399], [100, 200], [1000], [-1], [2.0], [True], 399, "399", {399}):
        with pytest.raises(ValueError, match="timesteps must be a non-empty, strictly decreasing list of ints"):
            S.schedule(lcm, 1, bad)
    with pytest.raises(ValueError, match=r"timesteps \(2 of them\) disagree with steps=3"):
        S.schedule(lcm, 3, [999, 499])
    with pytest.raises(ValueError, match="timesteps are not accepted by EulerAncestralDiscreteScheduler"):
        S.schedule(SC.SchedulerConfig(sampler="euler_ancestral"), 1, [999])
    with pytest.raises(ValueError, match="eta must lie in"):
        S.sample(lambda x, t: x, lcm, SHAPE, eta=1.5)


def test_pipeline_takes_timesteps(monkeypatch):
    """Pipeline.run(timesteps=[...]) as diffusers' argument: the UNet is called at them, Result.timesteps holds them,
    the noise has one draw per timestep; bad values are InputErrors naming the argument."""
    pipe = mdref.Pipeline.from_preset("tiny", seed=0)
    pipe.scheduler = SC.SchedulerConfig(sampler="lcm", timestep_spacing="lcm", prediction_type="sample",
                                        beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    called = []
    unet = pipe.unet.__call__
    monkeypatch.setattr(type(pipe.unet), "__call__", lambda self, x, t, c: (called.append(int(t)), unet(x, t, c))[1])
    r = pipe.run("a red circle", seed=1, timesteps=[399])
    assert called == [399] and r.timesteps == [399]
    called.clear()
    r4 = pipe.run("a red circle", seed=1, steps=4)
    assert called == r4.timesteps == [999, 759, 499, 259]
    ref = S.sample_lcm(lambda x, t: unet(x, t, r.text_embeddings), S.sampling_noise(r.noise.shape, 1, 1)[None, 0],
                       pipe.scheduler, [399])
    np.testing.assert_array_equal(r.x0, ref)
    for kwargs, msg in [(dict(timesteps=[100, 399]), "timesteps must be a non-empty"),
                        (dict(timesteps=[999, 499], steps=3), "timesteps .2 of them. disagree"),
                        (dict(steps=51), "steps must be an integer in .1, 50. .original_inference_steps.")]:
        with pytest.raises(mdref.pipeline.InputError, match=msg):
            pipe.run("x", **kwargs)
    pipe.scheduler = SC.SchedulerConfig(sampler="euler_ancestral", beta_schedule="linear", beta_start=1e-4,
                                        beta_end=0.02)
    with pytest.raises(mdref.pipeline.InputError, match="^timesteps are not accepted"):
        pipe.run("x", timesteps=[999])
