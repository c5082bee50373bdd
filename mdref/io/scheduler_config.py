"""diffusers ``scheduler_config.json`` -> `SchedulerConfig`, the sampler's spec (mdref/sampler.py computes from it).

Two classes are read: diffusers' ``EulerDiscreteScheduler`` (sampler "euler": SD-Turbo and similar one-step
checkpoints ship it; only trailing timesteps and the keys that change nothing else are accepted) and mdref's own
``MDRefScheduler`` (sampler "x0": MobileDiffusion's one-step / UFOGen re-noise sampling).
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass
from pathlib import Path

from .config import MAX_TIMESTEPS, ConfigError, check_choice, check_float, check_int, from_dict, read_json, to_dict

__all__ = ["SchedulerConfig", "scheduler_config_from_diffusers", "scheduler_config_to_dict", "load_scheduler_config"]

SAMPLERS = ("x0", "euler")
BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class SchedulerConfig:
    """Noise schedule + sampler choice. Defaults: MobileDiffusion / SD (1000 steps, scaled-linear 0.00085-0.012)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"      # "scaled_linear" | "linear"
    prediction_type: str = "epsilon"          # "epsilon" | "v_prediction" | "sample"
    timestep_spacing: str = "trailing"        # the only spacing whose first step is t = T - 1 for any step count
    sampler: str = "x0"                       # "x0" (UFOGen / re-noise) | "euler" (diffusers EulerDiscreteScheduler)

    where: InitVar[str | None] = None         # the config file, for error messages (not a config key)

    def __post_init__(self, where):
        """Every string field one of its values; num_train_timesteps an int in [2, MAX_TIMESTEPS]; 0 < beta_start <= beta_end < 1
        (diffusers computes any betas it is given; outside this range sqrt(beta) or 1 - beta is no noise schedule)."""
        where = where or type(self).__name__
        for name, allowed in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                              ("timestep_spacing", ("trailing",)), ("sampler", SAMPLERS)):
            check_choice(where, name, getattr(self, name), allowed)
        check_int(where, "num_train_timesteps", self.num_train_timesteps, 2, MAX_TIMESTEPS)
        self.beta_start = check_float(where, "beta_start", self.beta_start, 0, 1)
        self.beta_end = check_float(where, "beta_end", self.beta_end, 0, 1)
        if self.beta_start > self.beta_end:
            raise ConfigError(f"{where}: beta_start {self.beta_start!r} must be <= beta_end {self.beta_end!r}")


# EulerDiscreteScheduler: diffusers' defaults for keys a config leaves out; values mdref requires (other values
# change the sigmas or timesteps); keys without effect on trailing Euler sampling (steps_offset only shifts
# "leading" timesteps, sigma_min/max only feed karras/exponential/beta sigmas) or left in the file by other
# scheduler classes, which EulerDiscreteScheduler ignores too.
_EULER_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                       prediction_type="epsilon", timestep_spacing="linspace")
_EULER_REQUIRED = dict(trained_betas=None, interpolation_type="linear", use_karras_sigmas=False,
                       use_exponential_sigmas=False, use_beta_sigmas=False, timestep_type="discrete",
                       rescale_betas_zero_snr=False, final_sigmas_type="zero")
_EULER_IGNORED = ("steps_offset", "sigma_min", "sigma_max", "clip_sample", "clip_sample_range",
                  "set_alpha_to_one", "skip_prk_steps", "sample_max_value", "thresholding",
                  "dynamic_thresholding_ratio", "variance_type")
MDREF_CLASS = "MDRefScheduler"
# mdref's own class has no upstream defaults to fall back on: a file must state the keys that change the math
# (an empty or partial file would silently sample with other values, e.g. epsilon instead of the UNet's sample).
# sampler ("x0", what the class is) and timestep_spacing (only "trailing") may be left out.
MDREF_REQUIRED = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


def scheduler_config_from_diffusers(d, where="scheduler_config.json"):
    """SchedulerConfig from a diffusers EulerDiscreteScheduler config (-> sampler "euler") or mdref's own
    (``_class_name`` "MDRefScheduler" or absent; it must state `MDREF_REQUIRED`). Other scheduler classes raise
    ConfigError."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object, found {type(d).__name__}")
    d = dict(d)
    cls = d.get("_class_name", MDREF_CLASS)
    if cls == MDREF_CLASS:
        missing = [k for k in MDREF_REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"{where}: {MDREF_CLASS} config lacks {missing} (required: {list(MDREF_REQUIRED)}; "
                              f"mdref does not guess the keys that change the noise schedule or the prediction)")
        return from_dict(SchedulerConfig, d, where=where)
    if cls != "EulerDiscreteScheduler":
        raise ConfigError(f"{where}: scheduler class {cls!r} is not supported (mdref samples like "
                          f"'EulerDiscreteScheduler' with trailing timesteps, or its own '{MDREF_CLASS}')")
    for key, want in _EULER_REQUIRED.items():
        found = d.pop(key, want)
        if found != want and not (want is False and found is None):
            raise ConfigError(f"{where}: {key} = {found!r} is not supported (mdref requires {want!r})")
    if "sampler" in d:
        raise ConfigError(f"{where}: 'sampler' is an mdref key; an EulerDiscreteScheduler config samples 'euler'")
    return from_dict(SchedulerConfig, {**_EULER_DEFAULTS, **d, "sampler": "euler"}, ignore=_EULER_IGNORED,
                     where=where)


def scheduler_config_to_dict(cfg):
    """The scheduler_config.json for cfg: a diffusers EulerDiscreteScheduler config for sampler "euler" (diffusers
    loads it and samples the same), mdref's own class otherwise."""
    d = to_dict(cfg)
    if cfg.sampler == "euler":
        del d["sampler"]
        return {"_class_name": "EulerDiscreteScheduler", **d, **_EULER_REQUIRED}
    return {"_class_name": MDREF_CLASS, **d}


def load_scheduler_config(path):
    """Read scheduler_config.json (a file, or a folder holding it)."""
    path = Path(path)
    path = path / "scheduler_config.json" if path.is_dir() else path
    return scheduler_config_from_diffusers(read_json(path), where=str(path))
