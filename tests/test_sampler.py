"""Sampler tests: the schedule against diffusers' own tables, the x0 formulas against the forward process, the
"euler" form against diffusers' EulerDiscreteScheduler driven exactly as StableDiffusionPipeline drives it, and
the noise contract (seed stream, order, overrides, shape errors)."""

import json

import numpy as np
import pytest

from mdref import sampler as S
from mdref.io import ConfigError
from mdref.io import scheduler_config as SC

pytestmark = pytest.mark.numerics          # also run under other BLAS / oneDNN kernels (.ci/run)

SCHEDULES = [("scaled_linear", 0.00085, 0.012), ("linear", 0.0001, 0.02), ("linear", 0.00085, 0.012),
             ("scaled_linear", 0.0001, 0.02)]


def ulps(a, b):
    """Distance in float32 units in the last place (both arrays positive)."""
    return np.abs(a.astype(np.float32).view(np.int32).astype(np.int64) - b.astype(np.float32).view(np.int32))


# ---- schedule -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule,start,end", SCHEDULES)
def test_alphas_cumprod_equal_diffusers(schedule, start, end):
    """diffusers computes betas with torch.linspace and abar with torch.cumprod in float32. mdref reproduces both
    kernels' rounding (see sampler._torch_linspace_f32 and alphas_cumprod), so the tables are expected to be
    bit-identical; the assertion allows 1 ulp because PyTorch's CPU kernels may round differently on another
    instruction set (e.g. without FMA). The number of differing entries is printed for the report."""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_start=start, beta_end=end, beta_schedule=schedule)
    cfg = SC.SchedulerConfig(beta_schedule=schedule, beta_start=start, beta_end=end)
    b, abar = S.betas(cfg), S.alphas_cumprod(cfg)
    assert b.dtype == abar.dtype == np.float32 and abar.shape == (1000,)
    nb, na = int(np.sum(b != ref.betas.numpy())), int(np.sum(abar != ref.alphas_cumprod.numpy()))
    worst = int(ulps(abar, ref.alphas_cumprod.numpy()).max())
    print(f"{schedule} {start}-{end}: betas differing {nb}/1000, alphas_cumprod differing {na}/1000, max {worst} ulp")
    assert worst <= 1 and int(ulps(b, ref.betas.numpy()).max()) <= 1
    euler = diffusers.EulerDiscreteScheduler(beta_start=start, beta_end=end, beta_schedule=schedule)
    np.testing.assert_array_equal(euler.alphas_cumprod.numpy(), ref.alphas_cumprod.numpy())


def test_float64_schedule_is_the_float32_table_widened():
    cfg = SC.SchedulerConfig()
    a32, a64 = S.alphas_cumprod(cfg), S.alphas_cumprod(cfg, np.float64)
    assert a64.dtype == np.float64 and np.array_equal(a64, a32.astype(np.float64))
    exact = S.alphas_cumprod(cfg, np.float64, exact=True)
    rel = float(np.max(np.abs(exact - a64) / exact))
    print(f"float64-evaluated schedule vs float32 table: max relative difference {rel:.2e}")
    assert 0 < rel < 1e-5


def test_trailing_timesteps():
    assert S.trailing_timesteps(1000, 1).tolist() == [999]
    assert S.trailing_timesteps(1000, 2).tolist() == [999, 499]
    assert S.trailing_timesteps(1000, 3).tolist() == [999, 666, 332]
    assert S.trailing_timesteps(1000, 4).tolist() == [999, 749, 499, 249]
    for bad in (0, 1001, 2.0):
        with pytest.raises(ValueError, match="steps must be an integer"):
            S.trailing_timesteps(1000, bad)


def test_trailing_timesteps_equal_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EulerDiscreteScheduler(timestep_spacing="trailing")
    for steps in (1, 2, 3, 4, 7):
        sched.set_timesteps(steps)
        assert S.trailing_timesteps(1000, steps).tolist() == sched.timesteps.numpy().astype(int).tolist()


# ---- x0 from the model output -------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t", [999, 500, 0])
def test_predict_x0_inverts_the_forward_process(prediction_type, t):
    """Noise a known x0 with the forward process, hand the true target (eps, v or x0) as the model output:
    predict_x0 must give back x0, up to float64 rounding amplified by 1/sqrt(abar) (<= 15 at t = 999)."""
    rng = np.random.default_rng(t)
    x0, eps = rng.standard_normal((2, 4, 3, 5)), rng.standard_normal((2, 4, 3, 5))
    a = S.alphas_cumprod(SC.SchedulerConfig(), np.float64)[t]
    x_t = S.add_noise(x0, eps, a)
    target = {"epsilon": eps, "v_prediction": np.sqrt(a) * eps - np.sqrt(1 - a) * x0, "sample": x0}[prediction_type]
    err = np.max(np.abs(S.predict_x0(target, x_t, a, prediction_type) - x0))
    print(f"predict_x0 {prediction_type} t={t}: max|err| {err:.2e}")
    assert err <= 1e-13


def test_x0_sampler_one_and_few_steps():
    """One step: one call at t=999 on the pure noise. Few steps: each next call sees x0 re-noised with the next
    draw to the next trailing timestep."""
    cfg = SC.SchedulerConfig()
    abar = S.alphas_cumprod(cfg, np.float64)
    calls = []

    def model(x, t):
        calls.append((t, x.copy()))
        return 0.5 * x                                              # a fake epsilon prediction

    shape = (2, 4, 3, 5)
    draws = S.sampling_noise(shape, 4, seed=7, dtype=np.float64)
    x0 = S.sample(model, cfg, shape, steps=4, seed=7, dtype=np.float64)
    assert [t for t, _ in calls] == [999, 749, 499, 249]
    np.testing.assert_array_equal(calls[0][1], draws[0])
    prev = S.predict_x0(0.5 * draws[0], draws[0], abar[999], "epsilon")
    for k, t in enumerate([749, 499, 249], start=1):
        expected_in = np.sqrt(abar[t]) * prev + np.sqrt(1 - abar[t]) * draws[k]
        np.testing.assert_allclose(calls[k][1], expected_in, rtol=0, atol=1e-12)
        prev = S.predict_x0(0.5 * expected_in, expected_in, abar[t], "epsilon")
    np.testing.assert_allclose(x0, prev, rtol=0, atol=1e-12)
    calls.clear()
    one = S.sample(model, cfg, shape, seed=7, dtype=np.float64)
    assert [t for t, _ in calls] == [999]
    np.testing.assert_array_equal(one, S.predict_x0(0.5 * draws[0], draws[0], abar[999], "epsilon"))


# ---- the euler form against diffusers -----------------------------------------------------------------
def fake_unet(x, t, flip):
    """A model both frameworks evaluate identically in float32: affine in x, depends on t."""
    return 0.3 * x - 0.001 * (t / 1000.0) + 0.05 * flip(x)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_euler_matches_diffusers(prediction_type, steps):
    """StableDiffusionPipeline's loop: latents = noise * init_noise_sigma; per t: scale_model_input, model,
    scheduler.step(...).prev_sample. mdref.sampler.sample_euler must give the same latents (float32)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             timestep_spacing="trailing", prediction_type=prediction_type)
    sched.set_timesteps(steps)
    noise = S.initial_noise((2, 4, 6, 5), seed=3)
    latents = torch.from_numpy(noise) * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(latents, t)
        out = fake_unet(inp, float(t), lambda x: torch.flip(x, (3,)))
        latents = sched.step(out, t, latents).prev_sample
    ref = latents.numpy()
    cfg = SC.SchedulerConfig(prediction_type=prediction_type, sampler="euler")
    got = S.sample_euler(lambda x, t: fake_unet(x, float(t), lambda y: np.flip(y, 3)), noise, cfg, steps)
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    print(f"euler {prediction_type} {steps} step(s) vs diffusers: relative max|err| {err:.2e}")
    assert got.dtype == np.float32 and err <= 1e-6


def test_euler_one_step_is_x0_of_scaled_noise():
    """The identity in the module doc: one Euler step == predict_x0 on sqrt(1 - abar_T) * noise at t = T-1."""
    cfg = SC.SchedulerConfig(sampler="euler")
    noise = S.initial_noise((1, 4, 3, 3), seed=1, dtype=np.float64)
    model = lambda x, t: 0.3 * x + 0.1                              # noqa: E731
    got = S.sample(model, cfg, noise.shape, noise=noise, dtype=np.float64)
    a = S.alphas_cumprod(cfg, np.float64)[999]
    x = np.sqrt(1 - a) * noise
    np.testing.assert_allclose(got, S.predict_x0(model(x, 999), x, a, "epsilon"), rtol=1e-6, atol=1e-6)


def test_euler_sigmas_equal_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             timestep_spacing="trailing")
    for steps in (1, 2, 3, 4):
        sched.set_timesteps(steps)
        got = S.euler_sigmas(SC.SchedulerConfig(), S.trailing_timesteps(1000, steps))
        assert int(ulps(got, sched.sigmas.numpy()).max()) <= 1
        assert got.max() == np.float32(sched.init_noise_sigma)


# ---- noise ----------------------------------------------------------------------------------------------
def test_noise_is_the_documented_stream():
    shape = (1, 4, 8, 8)
    a = S.initial_noise(shape, seed=42)
    ref = np.random.Generator(np.random.PCG64(42)).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(a, ref)
    assert a.dtype == np.float32 and S.initial_noise(shape, 42, np.float64).dtype == np.float64
    rng = np.random.Generator(np.random.PCG64(42))
    sequential = np.stack([rng.standard_normal(shape) for _ in range(3)])   # draw k is drawn k-th
    np.testing.assert_array_equal(S.sampling_noise(shape, 3, 42, np.float64), sequential)
    np.testing.assert_array_equal(S.sampling_noise(shape, 3, 42)[0], a)
    assert not np.array_equal(S.initial_noise(shape, 43), a)


def test_noise_override_and_shape_errors():
    shape = (2, 4, 3, 5)
    mine = np.full(shape, 0.5)
    d = S.sampling_noise(shape, 3, seed=1, noise=mine)
    np.testing.assert_array_equal(d[0], mine)
    np.testing.assert_array_equal(d[1:], S.sampling_noise(shape, 3, seed=1)[1:])   # later draws: the seed's
    full = np.ones((3,) + shape)
    np.testing.assert_array_equal(S.sampling_noise(shape, 3, seed=1, noise=full), full)
    with pytest.raises(ValueError, match=r"noise has shape \(2, 4, 5, 3\), expected \(2, 4, 3, 5\) \(draw 0\) or "
                                         r"\(1, 2, 4, 3, 5\) \(one draw per step\)$"):
        S.sampling_noise(shape, 1, noise=np.zeros((2, 4, 5, 3)))
    np.testing.assert_array_equal(S.sampling_noise(shape, 1, noise=full[:1]), full[:1])   # [1, B, C, h, w] at 1 step
    with pytest.raises(ValueError, match=r"expected \(2, 4, 3, 5\) \(draw 0\) or \(2, 2, 4, 3, 5\)"):
        S.sample(lambda x, t: x, SC.SchedulerConfig(), shape, steps=2, noise=np.zeros((3,) + shape))


def test_guidance():
    u, c = np.array([1.0, 2.0]), np.array([3.0, 1.0])
    np.testing.assert_array_equal(S.apply_guidance(u, c, 7.5), u + 7.5 * (c - u))
    cond = lambda x, t: x + 1                                       # noqa: E731
    assert S.guided(cond) is cond and S.guided(cond, None, None) is cond   # off by default
    g = S.guided(cond, lambda x, t: x - 1, 2.0)
    np.testing.assert_array_equal(g(np.zeros(2), 999), [3.0, 3.0])
    with pytest.raises(ValueError, match="unconditional"):
        S.guided(cond, None, 2.0)


# ---- scheduler_config.json ------------------------------------------------------------------------------
SD_TURBO_LIKE = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.24.0", "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                 "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                 "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                 "timestep_spacing": "trailing", "timestep_type": "discrete", "trained_betas": None,
                 "use_karras_sigmas": False}


def test_read_diffusers_scheduler_config(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD_TURBO_LIKE))
    cfg = SC.load_scheduler_config(tmp_path)
    assert cfg == SC.SchedulerConfig(sampler="euler")
    for key, value, msg in [("timestep_spacing", "leading", "timestep_spacing"), ("use_karras_sigmas", True, "karras"),
                            ("beta_schedule", "squaredcos_cap_v2", "beta_schedule"), ("sigma_data", 1, "unsupported"),
                            ("prediction_type", "flow", "prediction_type"), ("final_sigmas_type", "sigma_min", "final")]:
        with pytest.raises(ConfigError, match=msg):
            SC.scheduler_config_from_diffusers({**SD_TURBO_LIKE, key: value})
    with pytest.raises(ConfigError, match="DDIMScheduler"):
        SC.scheduler_config_from_diffusers({**SD_TURBO_LIKE, "_class_name": "DDIMScheduler"})
    with pytest.raises(ConfigError, match="timestep_spacing"):                       # diffusers default: linspace
        SC.scheduler_config_from_diffusers({"_class_name": "EulerDiscreteScheduler"})


def test_scheduler_config_round_trip():
    diffusers = pytest.importorskip("diffusers")
    for cfg in (SC.SchedulerConfig(), SC.SchedulerConfig(sampler="euler", prediction_type="v_prediction")):
        d = SC.scheduler_config_to_dict(cfg)
        assert SC.scheduler_config_from_diffusers(json.loads(json.dumps(d))) == cfg
    d = SC.scheduler_config_to_dict(SC.SchedulerConfig(sampler="euler"))
    theirs = diffusers.EulerDiscreteScheduler.from_config(d)                       # diffusers reads it as-is
    assert theirs.config.timestep_spacing == "trailing" and theirs.config.beta_schedule == "scaled_linear"
