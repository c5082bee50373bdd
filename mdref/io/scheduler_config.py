"""diffusers ``scheduler_config.json`` -> `SchedulerConfig`, the sampler's spec (mdref/sampler.py computes from it).

The classes read, each key of each implemented, accepted only at diffusers' default, or ignored (with the reason):
diffusers' ``EulerDiscreteScheduler`` (sampler "euler": SD-Turbo, SDXL-Lightning; trailing timesteps only),
``EulerAncestralDiscreteScheduler`` ("euler_ancestral": SDXL-Turbo; trailing only), ``LCMScheduler`` ("lcm": LCM,
DMD2, Hyper-SDXL's 1-step UNet), ``TCDScheduler`` ("tcd": Hyper-SD's unified LoRA), and mdref's own
``MDRefScheduler`` (sampler "x0": MobileDiffusion's one-step / UFOGen re-noise sampling). Keys that only other
scheduler classes define (a folder's config often carries them over) are ignored, as diffusers ignores them.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, fields
from pathlib import Path

from ..specs import SamplerSpec
from .config import MAX_TIMESTEPS, ConfigError, check_choice, check_float, check_int, from_dict, read_json, to_dict

__all__ = ["SchedulerConfig", "FlowMatchSchedulerConfig", "scheduler_config_from_diffusers", "scheduler_config_to_dict",
           "load_scheduler_config"]

SAMPLERS = ("x0", "euler", "euler_ancestral", "lcm", "tcd")
SPACINGS = {"x0": "trailing", "euler": "trailing", "euler_ancestral": "trailing", "lcm": "lcm", "tcd": "lcm"}
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
    timestep_spacing: str = "trailing"        # the only spacing whose first step is t = T - 1 for any step count;
                                              # "lcm" for lcm / tcd: LCM's skipping-step rule (sampler.lcm_timesteps)
    sampler: str = "x0"                       # "x0" (UFOGen / re-noise) | "euler" | "euler_ancestral" | "lcm" | "tcd"
    original_inference_steps: int = 50        # lcm / tcd: the distillation schedule their default timesteps come from
    timestep_scaling: float = 10.0            # lcm: u = timestep_scaling * t in the boundary condition c_skip, c_out

    where: InitVar[str | None] = None         # the config file, for error messages (not a config key)

    def __post_init__(self, where):
        """Every string field one of its values; num_train_timesteps an int in [2, MAX_TIMESTEPS]; 0 < beta_start <= beta_end < 1
        (diffusers computes any betas it is given; outside this range sqrt(beta) or 1 - beta is no noise schedule)."""
        where = where or type(self).__name__
        for name, allowed in (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                              ("sampler", SAMPLERS)):
            check_choice(where, name, getattr(self, name), allowed)
        check_choice(where, "timestep_spacing", self.timestep_spacing, (SPACINGS[self.sampler],))
        if self.sampler == "euler_ancestral" and self.prediction_type == "sample":
            raise ConfigError(f"{where}: prediction_type 'sample' is not supported by EulerAncestralDiscreteScheduler "
                              f"(diffusers raises NotImplementedError in its step)")
        check_int(where, "num_train_timesteps", self.num_train_timesteps, 2, MAX_TIMESTEPS)
        check_int(where, "original_inference_steps", self.original_inference_steps, 1, self.num_train_timesteps)
        self.timestep_scaling = check_float(where, "timestep_scaling", self.timestep_scaling, 0)
        self.beta_start = check_float(where, "beta_start", self.beta_start, 0, 1)
        self.beta_end = check_float(where, "beta_end", self.beta_end, 0, 1)
        if self.beta_start > self.beta_end:
            raise ConfigError(f"{where}: beta_start {self.beta_start!r} must be <= beta_end {self.beta_end!r}")


def sampler_spec(cfg):
    """The frozen SamplerSpec of a (validated) SchedulerConfig: what mdref.sampler computes from."""
    return SamplerSpec(**{f.name: getattr(cfg, f.name) for f in fields(SamplerSpec)})


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
# Keys only other diffusers scheduler classes define: the class read ignores them, as diffusers does (a pipeline's
# config is often converted with SomeScheduler.from_config(other.config), which keeps them in the file).
_OTHER_CLASSES_KEYS = ("clip_sample", "clip_sample_range", "set_alpha_to_one", "skip_prk_steps", "sample_max_value",
                       "thresholding", "dynamic_thresholding_ratio", "variance_type", "interpolation_type",
                       "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "sigma_min", "sigma_max",
                       "timestep_type", "final_sigmas_type", "original_inference_steps", "timestep_scaling",
                       "steps_offset", "timestep_spacing", "trained_betas", "rescale_betas_zero_snr")
# Per class: (defaults for keys a config leaves out, values required, keys ignored with the reason, sampler).
_CLASSES = {
    "EulerAncestralDiscreteScheduler": (
        dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
             prediction_type="epsilon", timestep_spacing="linspace"),
        dict(trained_betas=None, rescale_betas_zero_snr=False),
        {"steps_offset": "shifts only 'leading' timesteps"}, "euler_ancestral"),
    "LCMScheduler": (
        dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             prediction_type="epsilon", original_inference_steps=50, timestep_scaling=10.0),
        dict(trained_betas=None, rescale_betas_zero_snr=False, clip_sample=False, thresholding=False),
        {"timestep_spacing": "LCMScheduler does not read it", "steps_offset": "LCMScheduler does not read it",
         "set_alpha_to_one": "final_alpha_cumprod is read only for a negative previous timestep, which never occurs",
         "clip_sample_range": "read only with clip_sample", "dynamic_thresholding_ratio": "read only with thresholding",
         "sample_max_value": "read only with thresholding"}, "lcm"),
    "TCDScheduler": (
        dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             prediction_type="epsilon", original_inference_steps=50),
        dict(trained_betas=None, rescale_betas_zero_snr=False),
        {"timestep_spacing": "TCDScheduler does not read it", "steps_offset": "TCDScheduler does not read it",
         "set_alpha_to_one": "final_alpha_cumprod is read only for a negative previous timestep, which never occurs",
         "timestep_scaling": "TCDScheduler's step has no boundary condition",
         "clip_sample": "TCDScheduler's step never clips", "clip_sample_range": "TCDScheduler's step never clips",
         "thresholding": "TCDScheduler's step never thresholds", "dynamic_thresholding_ratio": "never thresholds",
         "sample_max_value": "TCDScheduler's step never thresholds"}, "tcd"),
}
MDREF_CLASS = "MDRefScheduler"
# mdref's own class has no upstream defaults to fall back on: a file must state the keys that change the math
# (an empty or partial file would silently sample with other values, e.g. epsilon instead of the UNet's sample).
# sampler ("x0", what the class is) and timestep_spacing (only "trailing") may be left out.
MDREF_REQUIRED = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


# ---- flow matching: diffusers FlowMatchEulerDiscreteScheduler (DreamLite, SD3, Flux) --------------------------
FLOW_MATCH_CLASS = "FlowMatchEulerDiscreteScheduler"
# Values mdref requires (the others convert or invert the sigmas); keys without effect on DreamLite's sampling.
_FLOW_REQUIRED = dict(invert_sigmas=False, use_karras_sigmas=False, use_exponential_sigmas=False,
                      use_beta_sigmas=False)


@dataclass
class FlowMatchSchedulerConfig:
    """diffusers FlowMatchEulerDiscreteScheduler, the keys that change its sigmas, timesteps or step (defaults:
    the class's; mdref/sampler.py's flow_* functions compute from it). base_shift / max_shift /
    base_image_seq_len / max_image_seq_len are what the DreamLite pipelines read for mu (calculate_shift); the
    mobile pipeline's fallback max_shift 1.16 never applies to a loaded scheduler, whose config always holds the
    class default 1.15 for a key its file leaves out."""
    num_train_timesteps: int = 1000
    shift: float = 1.0                        # the static shift (used when use_dynamic_shifting is false)
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"      # "exponential" | "linear"
    shift_terminal: float | None = None
    stochastic_sampling: bool = False         # x0 re-noised to the next sigma with fresh noise (not an ODE step)

    where: InitVar[str | None] = None

    def __post_init__(self, where):
        where = where or type(self).__name__
        check_int(where, "num_train_timesteps", self.num_train_timesteps, 1, MAX_TIMESTEPS)
        check_int(where, "base_image_seq_len", self.base_image_seq_len, 0, 1 << 30)
        check_int(where, "max_image_seq_len", self.max_image_seq_len, self.base_image_seq_len + 1, 1 << 30)
        self.shift = check_float(where, "shift", self.shift, 0)
        self.base_shift = check_float(where, "base_shift", self.base_shift)
        self.max_shift = check_float(where, "max_shift", self.max_shift)
        self.shift_terminal = check_float(where, "shift_terminal", self.shift_terminal, None, 1, none=True)
        check_choice(where, "time_shift_type", self.time_shift_type, ["exponential", "linear"])
        for key in ("use_dynamic_shifting", "stochastic_sampling"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{where}: {key} must be true or false, found {getattr(self, key)!r}")

    @classmethod
    def from_diffusers(cls, d, where="scheduler_config.json"):
        """From a diffusers scheduler_config.json dict of class FlowMatchEulerDiscreteScheduler."""
        d = {k: v for k, v in d.items() if k != "_class_name"}
        for key, want in _FLOW_REQUIRED.items():
            found = d.pop(key, want)
            if found != want:
                raise ConfigError(f"{where}: {key} = {found!r} is not supported (mdref requires {want!r})")
        return from_dict(cls, d, where=where)

    def to_dict(self):
        return {"_class_name": FLOW_MATCH_CLASS, **to_dict(self), **_FLOW_REQUIRED}


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
    if cls == FLOW_MATCH_CLASS:
        return FlowMatchSchedulerConfig.from_diffusers(d, where)
    if "sampler" in d:
        raise ConfigError(f"{where}: 'sampler' is an mdref key; a {cls} config samples as that class does")
    if cls in _CLASSES:
        return _read_class(cls, d, where)
    if cls != "EulerDiscreteScheduler":
        raise ConfigError(f"{where}: scheduler class {cls!r} is not supported (mdref samples like "
                          f"{', '.join(['EulerDiscreteScheduler', *_CLASSES])} or its own '{MDREF_CLASS}')")
    for key, want in _EULER_REQUIRED.items():
        found = d.pop(key, want)
        if found != want and not (want is False and found is None):
            raise ConfigError(f"{where}: {key} = {found!r} is not supported (mdref requires {want!r})")
    for key in ("original_inference_steps", "timestep_scaling"):     # LCM / TCD keys: EulerDiscreteScheduler
        d.pop(key, None)                                             # does not read them
    return from_dict(SchedulerConfig, {**_EULER_DEFAULTS, **d, "sampler": "euler"}, ignore=_EULER_IGNORED,
                     where=where)


def _read_class(cls, d, where):
    """EulerAncestralDiscreteScheduler / LCMScheduler / TCDScheduler config -> SchedulerConfig (see _CLASSES)."""
    defaults, required, ignored, sampler = _CLASSES[cls]
    for key, want in required.items():
        found = d.pop(key, want)
        if found != want:
            raise ConfigError(f"{where}: {key} = {found!r} is not supported by mdref's {cls} (it requires {want!r})")
    for key in set(ignored) | (set(_OTHER_CLASSES_KEYS) - set(defaults)):
        d.pop(key, None)
    if sampler in ("lcm", "tcd"):                       # their timesteps come from LCM's rule, whatever the file says
        d["timestep_spacing"] = "lcm"
    return from_dict(SchedulerConfig, {**defaults, **d, "sampler": sampler}, where=where)


def scheduler_config_to_dict(cfg):
    """The scheduler_config.json for cfg: the diffusers class of its sampler (diffusers loads it and samples the
    same), mdref's own class for "x0". Each holds the keys that class reads."""
    if isinstance(cfg, FlowMatchSchedulerConfig):
        return cfg.to_dict()
    d = to_dict(cfg)
    if cfg.sampler in ("x0", "euler"):                  # keys only the consistency samplers read
        del d["original_inference_steps"], d["timestep_scaling"]
    if cfg.sampler == "x0":
        return {"_class_name": MDREF_CLASS, **d}
    del d["sampler"]
    if cfg.sampler == "euler":
        return {"_class_name": "EulerDiscreteScheduler", **d, **_EULER_REQUIRED}
    cls = next(c for c, entry in _CLASSES.items() if entry[3] == cfg.sampler)
    defaults, required = _CLASSES[cls][:2]
    return {"_class_name": cls, **{k: v for k, v in d.items() if k in defaults}, **required}


def load_scheduler_config(path):
    """Read scheduler_config.json (a file, or a folder holding it)."""
    path = Path(path)
    path = path / "scheduler_config.json" if path.is_dir() else path
    return scheduler_config_from_diffusers(read_json(path), where=str(path))
