"""The interop layer: everything that knows about diffusers / transformers checkpoints, once for all components.

    config.py              the strict dict -> dataclass rule, the value checkers and bounds (files are read
                           through mdref.formats: safetensors, JSON, the shipped resources)
    text_encoder_config.py transformers CLIPTextConfig keys -> TextEncoderConfig (WithProjection) -> TextEncoderSpec
    qwen_text_config.py    transformers Qwen3VL(Text)Config keys -> QwenTextConfig -> specs.QwenTextSpec
    unet_config.py         diffusers UNet2DConditionModel keys -> UNetConfig -> specs.UNetSpec (the stage plan)
    decoder_config.py      diffusers AutoencoderKL / AutoencoderTiny keys -> DecoderConfig -> the decoder spec
    scheduler_config.py    diffusers EulerDiscreteScheduler / mdref's scheduler_config.json -> SchedulerConfig
    presets.py             named architectures (component and pipeline presets)
    schema.py              {checkpoint key: shape} of each component, one set of helpers
    keymaps.py             text_model. prefix, encoder-side and deprecated VAE keys, raw TAESD files
    components.py          the one component shell: TextEncoder, TextEncoderWithProjection, UNet, Decoder
    pipeline_folder.py     diffusers pipeline folders and pipeline presets -> the parts of a Pipeline
The model files (text_encoder.py, unet.py, decoder.py, sampler.py) import nothing from here.
"""

from .components import Decoder, QwenTextEncoder, TextEncoder, TextEncoderWithProjection, UNet  # noqa: F401
from .config import ConfigError  # noqa: F401
from .decoder_config import DecoderConfig  # noqa: F401
from ..formats.safetensors import WeightsError  # noqa: F401
from .scheduler_config import SchedulerConfig  # noqa: F401
from .qwen_text_config import QwenTextConfig  # noqa: F401
from .text_encoder_config import TextEncoderConfig, TextEncoderWithProjectionConfig  # noqa: F401
from .unet_config import UNetConfig  # noqa: F401
