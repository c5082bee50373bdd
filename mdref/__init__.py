"""mdref: a readable NumPy golden reference for one-step text-to-image diffusion (MobileDiffusion family).

    import mdref
    pipe = mdref.Pipeline.from_pretrained()          # the embedded default model (weights/default)
    image = pipe("a large red circle on the left, blue background", seed=0)
"""

__version__ = "0.1.0"

from . import ops, sampler  # noqa: E402
from .comparison import compare  # noqa: E402
from .io import (ConfigError, Decoder, DecoderConfig, SchedulerConfig, TextEncoder, TextEncoderConfig,  # noqa: E402
                 TextEncoderWithProjection, UNet, UNetConfig, WeightsError)
from .pipeline import Pipeline  # noqa: E402
from . import dreamlite  # noqa: E402,F401  (registers DreamLitePipeline with Pipeline.from_pretrained)
from .tokenizer import Tokenizer  # noqa: E402
from .trace import active as trace_active  # noqa: E402
from .trace import load_trace, record, save_trace, trace  # noqa: E402

__all__ = ["__version__", "ops", "sampler", "compare", "ConfigError", "WeightsError", "Decoder", "DecoderConfig",
           "Pipeline", "SchedulerConfig", "TextEncoder", "TextEncoderConfig", "TextEncoderWithProjection", "Tokenizer",
           "UNet", "UNetConfig",
           "trace", "trace_active", "record", "save_trace", "load_trace", "explain"]


def __getattr__(name):
    """mdref.explain (cross_attention_maps, the page of `mdref explain`) is imported on first use."""
    if name == "explain":
        import importlib
        return importlib.import_module(".explain", __name__)
    raise AttributeError(f"module 'mdref' has no attribute {name!r}")
