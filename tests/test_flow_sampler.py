"""The flow-matching sampler (sampler.flow_shift_mu / flow_sigmas / sample_flow) against diffusers'
FlowMatchEulerDiscreteScheduler driven as DreamLite's pipelines drive it: retrieve_timesteps(scheduler, n,
sigmas=linspace(1, 1/n, n), mu=calculate_shift(h * w // 4, ...)), then scheduler.step per timestep.

Sigmas and timesteps must be bit-identical (float32 both sides, the same roundings). The loops get the same model
(a NumPy function of x and t, called by both) and are compared whole:
  float32: diffusers' step is two float32 roundings (dt * v, then + x), mdref's the same two, so the loops agree
    to 2 u per step, carried through the model (|dv/dx| <= 1 by construction, |dt| <= 1: growth <= 2 per step):
    bound 2 u (2^steps - 1) * max|x| with u = 2^-24;
  float64: diffusers' step casts the sample to float32 whatever its dtype ('upcast'), so its float64 loop is not
    float64; the oracle's step is patched to keep the dtype (FLOAT64_STEP), then <= 1e-10.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.dreamlite import pipeline_dreamlite, pipeline_dreamlite_mobile  # noqa: E402

from mdref import sampler as S  # noqa: E402
from mdref.io import ConfigError  # noqa: E402
from mdref.io.scheduler_config import (FlowMatchSchedulerConfig, scheduler_config_from_diffusers,  # noqa: E402
                                       scheduler_config_to_dict)

U32 = 2.0 ** -24
# DreamLite's scheduler as a third party reports the checkpoint's scheduler_config.json (not read here: no hub).
DREAMLITE = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)
CONFIGS = {
    "dreamlite": DREAMLITE,
    "dynamic-linear": dict(DREAMLITE, time_shift_type="linear"),
    "static-shift-3": dict(num_train_timesteps=1000, shift=3.0),
    "terminal": dict(DREAMLITE, shift_terminal=0.02),
    "stochastic": dict(DREAMLITE, stochastic_sampling=True),
}


def pipeline_sigmas(name, steps, seq_len, sigmas=None):
    """The scheduler's sigmas and timesteps after the pipelines' retrieve_timesteps call."""
    sched = FlowMatchEulerDiscreteScheduler(**CONFIGS[name])
    mu = pipeline_dreamlite.calculate_shift(seq_len, sched.config.get("base_image_seq_len", 256),
                                            sched.config.get("max_image_seq_len", 4096),
                                            sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.16))
    sigmas = np.linspace(1.0, 1 / steps, steps) if sigmas is None else sigmas
    timesteps, _ = pipeline_dreamlite.retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
    return sched, mu, timesteps


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 30])
@pytest.mark.parametrize("seq_len", [16, 256, 1000, 4096, 16384])
def test_sigmas_and_timesteps_equal_diffusers(name, steps, seq_len):
    cfg = FlowMatchSchedulerConfig(**CONFIGS[name])
    with np.errstate(invalid="ignore"):
        sched, mu, timesteps = pipeline_sigmas(name, steps, seq_len)
    assert S.flow_shift_mu(seq_len, cfg) == mu
    if name == "terminal" and steps == 1:       # one sigma, 1.0: diffusers stretches 0 / 0 into a NaN schedule
        assert np.isnan(sched.sigmas.numpy()[0])
        with pytest.raises(ValueError, match="shift_terminal"):
            S.flow_sigmas(cfg, steps, mu)
        return
    sigmas = S.flow_sigmas(cfg, steps, mu)
    assert sigmas.dtype == np.float32 and np.array_equal(sigmas, sched.sigmas.numpy())
    assert np.array_equal(sigmas[:-1] * np.float32(cfg.num_train_timesteps), timesteps.numpy())


def test_custom_sigmas_and_the_mobile_pipelines_mu():
    """A sigmas list passed by the caller; the mobile pipeline's calculate_shift is the base one."""
    cfg = FlowMatchSchedulerConfig(**DREAMLITE)
    custom = [1.0, 0.8, 0.37, 0.1]
    sched, mu, _ = pipeline_sigmas("dreamlite", 4, 1024, sigmas=custom)
    assert np.array_equal(S.flow_sigmas(cfg, 4, mu, sigmas=custom), sched.sigmas.numpy())
    for n in (16, 4096, 9000):
        assert pipeline_dreamlite_mobile.calculate_shift(n, 256, 4096, 0.5, 1.15) == S.flow_shift_mu(n, cfg)


def test_a_loaded_scheduler_never_uses_the_mobile_fallback_1_16():
    """DreamLiteMobilePipeline reads scheduler.config.get('max_shift', 1.16), but a scheduler's config holds every
    __init__ argument: a scheduler_config.json without max_shift gives the class default 1.15, as mdref's config."""
    sched = FlowMatchEulerDiscreteScheduler.from_config({"use_dynamic_shifting": True, "shift": 3.0})
    assert sched.config.get("max_shift", 1.16) == 1.15
    cfg = scheduler_config_from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                           "use_dynamic_shifting": True, "shift": 3.0})
    assert cfg.max_shift == 1.15


def velocity_model(shape, seed):
    """v(x, t) = tanh(W x over channels + a t / 1000): the same NumPy function for both loops; |dv/dx| <= 1
    (spectral norm of W scaled to 0.9)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((shape[1], shape[1]))
    W *= 0.9 / np.linalg.norm(W, 2)
    a = rng.standard_normal(shape[1])

    def v(x, t):
        dtype = x.dtype
        h = np.einsum("oc,bchw->bohw", W.astype(dtype), x) + (a * (float(t) / 1000)).astype(dtype)[:, None, None]
        return np.tanh(h)
    return v


def FLOAT64_STEP(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                 s_noise=1.0, generator=None, per_token_timesteps=None, return_dict=True):
    """FlowMatchEulerDiscreteScheduler.step without its `sample.to(torch.float32)` (the deterministic branch)."""
    if self.step_index is None:
        self._init_step_index(timestep)
    sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
    prev = sample + (sigma_next - sigma) * model_output
    self._step_index += 1
    return (prev,)


def diffusers_loop(name, steps, seq_len, noise, model, dtype):
    sched, _, timesteps = pipeline_sigmas(name, steps, seq_len)
    latents = torch.from_numpy(noise.astype(dtype))
    for t in timesteps:
        v = torch.from_numpy(model(latents.numpy(), t.to(latents.dtype).item()))
        latents = sched.step(v, t, latents, return_dict=False)[0]
    return latents.numpy()


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_loop_float32_matches_diffusers(steps):
    cfg = FlowMatchSchedulerConfig(**DREAMLITE)
    noise = np.random.default_rng(steps).standard_normal((2, 4, 8, 6)).astype(np.float32)
    model = velocity_model(noise.shape, steps)
    ref = diffusers_loop("dreamlite", steps, 12, noise, model, np.float32)
    mu = S.flow_shift_mu(12, cfg)
    ours = S.sample_flow(lambda x, t: model(x, float(np.float32(t))), noise[None], cfg,
                         S.flow_sigmas(cfg, steps, mu))
    bound = 2 * U32 * (2 ** steps - 1) * float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    print(f"\n[flow] float32 {steps} steps: max |mdref - diffusers| = {err:.3e} (bound {bound:.2e})")
    assert ours.dtype == np.float32 and err <= bound


def test_loop_float64_matches_diffusers_without_its_float32_cast(monkeypatch):
    cfg = FlowMatchSchedulerConfig(**DREAMLITE)
    noise = np.random.default_rng(0).standard_normal((1, 4, 8, 8))
    model = velocity_model(noise.shape, 0)
    mu = S.flow_shift_mu(16, cfg)
    ours = S.sample_flow(model, noise[None], cfg, S.flow_sigmas(cfg, 4, mu), dtype=np.float64)
    unpatched = diffusers_loop("dreamlite", 4, 16, noise, model, np.float64)
    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "step", FLOAT64_STEP)
    ref = diffusers_loop("dreamlite", 4, 16, noise, model, np.float64)
    err, cast = float(np.abs(ours - ref).max() / np.abs(ref).max()), float(np.abs(unpatched - ref).max())
    print(f"\n[flow] float64: {err:.3e}; diffusers' own float64 loop (float32 cast inside step) differs by {cast:.2e}")
    assert ours.dtype == np.float64 and err <= 1e-10 and cast > 0


def test_stochastic_sampling_matches_diffusers_given_the_same_noise(monkeypatch):
    """stochastic_sampling: x0 = x - sigma v, re-noised to the next sigma. diffusers draws the noise inside step()
    (randn_tensor); it is patched to hand out mdref's draws 1, 2, ... in order."""
    from diffusers.schedulers import scheduling_flow_match_euler_discrete as F
    cfg = FlowMatchSchedulerConfig(**CONFIGS["stochastic"])
    steps, shape = 4, (1, 4, 6, 6)
    draws = S.sampling_noise(shape, steps, seed=3)
    model = velocity_model(shape, 3)
    queue = [torch.from_numpy(d) for d in draws[1:]] + [torch.zeros(shape)]
    monkeypatch.setattr(F, "randn_tensor", lambda *a, **k: queue.pop(0))
    ref = diffusers_loop("stochastic", steps, 9, draws[0], model, np.float32)
    ours = S.sample_flow(model, draws, cfg, S.flow_sigmas(cfg, steps, S.flow_shift_mu(9, cfg)))
    assert float(np.abs(ours - ref).max()) <= 2 * U32 * (2 ** steps - 1) * float(np.abs(ref).max())


def test_config_round_trip_and_refusals():
    cfg = scheduler_config_from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler", **DREAMLITE,
                                           "_diffusers_version": "0.42.1"})
    d = scheduler_config_to_dict(cfg)
    again = FlowMatchEulerDiscreteScheduler.from_config(d)
    assert all(again.config[k] == v for k, v in DREAMLITE.items())
    assert scheduler_config_from_diffusers(d) == cfg
    for bad, match in (({"use_karras_sigmas": True}, "use_karras_sigmas"), ({"invert_sigmas": True}, "invert"),
                       ({"time_shift_type": "cosine"}, "time_shift_type"), ({"shiftt": 1}, "unsupported")):
        with pytest.raises(ConfigError, match=match):
            scheduler_config_from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler", **bad})
    with pytest.raises(ValueError, match="mu"):
        S.flow_sigmas(cfg, 4)
    assert math.isclose(S.flow_shift_mu(4096, cfg), 1.15) and math.isclose(S.flow_shift_mu(256, cfg), 0.5)
