"""The benchmarked components: how each side (mdref / torch) is built, fed and called.

Every entry of COMPONENTS gives
    inputs(batch)            -> a tuple of NumPy arrays (float32 / int64), the same for both sides
    mdref(dtype)             -> the mdref object with seeded full-size weights (mdref's own init_params)
    call_mdref(obj, inputs)  -> NumPy output
    torch_from(obj)          -> the torch module holding the same weights as `obj` (for timing and parity)
    torch_alone()            -> the torch module with torch's own init (for the torch side's peak RSS: no mdref
                                weights in that process)
    call_torch(mod, inputs)  -> torch output (tensors in, tensor out)
    small                    -> True: float64 is measured by default (see README, "float64")
Nothing here is timed; run.py times call_mdref / call_torch only.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

PROMPT = "a large red circle on the left, blue background"

# SD-2.1 / SD-Turbo UNet (866M): diffusers UNet2DConditionModel keys, at SD-Turbo's 64x64 latent.
SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5)


def _rng(seed=0):
    return np.random.Generator(np.random.PCG64(seed))


def _ids(batch):
    import mdref
    return mdref.Tokenizer.from_pretrained(None)([PROMPT] * batch).astype(np.int64)       # [B, 77]


def _kwargs_for(cls, cfg):
    """The keys of a config dict that cls.__init__ accepts (drops _class_name and mdref-only keys)."""
    names = set(inspect.signature(cls.__init__).parameters)
    return {k: v for k, v in cfg.items() if k in names}


def _state(obj):
    """mdref params -> the flat torch state dict with the checkpoint's key names (float32 copies)."""
    import torch

    from mdref.formats.safetensors import flatten
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
            for k, v in obj.checkpoint_keys(flatten(obj.params)).items()}


def _load(module, obj, allow_missing=""):
    state, own = _state(obj), module.state_dict()
    if not any(k.startswith("text_model.") for k in own):          # transformers >= 5: CLIPTextModel has no prefix
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    bad = [k for k in missing if not (allow_missing and k.startswith(allow_missing))]
    if unexpected or bad:
        raise ValueError(f"{type(module).__name__}: unexpected {unexpected[:5]}, missing {bad[:5]}")
    return module.eval()


def cast(obj, dtype):
    """The same mdref component (or Pipeline) with its weights cast to dtype."""
    import mdref
    if isinstance(obj, mdref.Pipeline):
        return mdref.Pipeline(obj.tokenizer, cast(obj.text_encoder, dtype), cast(obj.unet, dtype),
                              cast(obj.decoder, dtype), obj.scheduler, source=obj.source, untrained=True)

    def tree(p):
        return {k: tree(v) for k, v in p.items()} if isinstance(p, dict) else p.astype(dtype)
    return type(obj)(obj.config, tree(obj.params), dtype)


def weight_bytes(obj, dtype=np.float32):
    import mdref
    if isinstance(obj, mdref.Pipeline):
        n = obj.num_parameters()["total"]
    else:
        n = obj.num_parameters()
    return n * np.dtype(dtype).itemsize


# ---- text encoder -------------------------------------------------------------------------------------------
def _clip_torch(cfg):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval()


def _clip():
    import mdref
    te = lambda dtype: mdref.TextEncoder.from_preset("clip-vit-l-14", seed=0, dtype=dtype)   # noqa: E731

    def alone():
        conf = mdref.TextEncoder.config_class.from_dict(dict(mdref.io.presets.TEXT_ENCODER_PRESETS["clip-vit-l-14"]),
                                                        where="preset").to_dict()
        return _clip_torch(conf)
    return dict(
        label="CLIP ViT-L/14 text encoder, 77 tokens", torch_label="transformers CLIPTextModel", small=True,
        inputs=lambda b: (_ids(b),), mdref=te, call_mdref=lambda m, x: m(x[0]),
        torch_from=lambda m: _load(_clip_torch(m.config.to_dict()), m), torch_alone=alone,
        call_torch=lambda t, x: t(x[0]).last_hidden_state)


# ---- UNets --------------------------------------------------------------------------------------------------
def _unet_inputs(c_in, ctx_dim):
    def inputs(b):
        r = _rng(0)
        return (r.standard_normal((b, c_in, 64, 64)).astype(np.float32), np.full((b,), 999.0, np.float32),
                r.standard_normal((b, 77, ctx_dim)).astype(np.float32))
    return inputs


def _md_unet():
    import mdref
    from mdref.io.presets import UNET_PRESETS

    def twin(cfg):
        from mdref_torch.twin import TwinUNet
        return TwinUNet(cfg).eval()
    return dict(
        label="MobileDiffusion UNet 386M, 64x64 latent", torch_label="mdref_torch/twin.py TwinUNet", small=False,
        inputs=_unet_inputs(8, 768), mdref=lambda dtype: mdref.UNet.from_preset("mobilediffusion", 1, dtype),
        call_mdref=lambda m, x: m(*x), torch_from=lambda m: _load(twin(m.config.to_dict()), m),
        torch_alone=lambda: twin(dict(UNET_PRESETS["mobilediffusion"])), call_torch=lambda t, x: t(*x))


def _sd21_unet():
    import mdref

    def diffusers_unet():
        from diffusers import UNet2DConditionModel
        return UNet2DConditionModel(**SD21_UNET).eval()
    return dict(
        label="SD-2.1 / SD-Turbo UNet 866M, 64x64 latent", torch_label="diffusers UNet2DConditionModel",
        small=False, inputs=_unet_inputs(4, 1024), mdref=lambda dtype: mdref.UNet.from_config(SD21_UNET, 1, dtype),
        call_mdref=lambda m, x: m(*x), torch_from=lambda m: _load(diffusers_unet(), m), torch_alone=diffusers_unet,
        call_torch=lambda t, x: t(*x).sample)


# ---- decoders -----------------------------------------------------------------------------------------------
def _decoder(preset, label, torch_label, channels, size=64, small=True):
    import mdref
    from mdref.io.presets import DECODER_PRESETS

    def module(cfg):
        import diffusers
        cls = getattr(diffusers, cfg["_class_name"])
        return cls(**_kwargs_for(cls, cfg)).eval()

    def alone():
        conf = mdref.Decoder.config_class.from_dict(dict(DECODER_PRESETS[preset]), where="preset").to_dict()
        return module(conf)
    return dict(
        label=label, torch_label=torch_label, small=small,
        inputs=lambda b: (_rng(0).standard_normal((b, channels, size, size)).astype(np.float32),),
        mdref=lambda dtype: mdref.Decoder.from_preset(preset, 2, dtype), call_mdref=lambda m, x: m(x[0]),
        torch_from=lambda m: _load(module(m.config.to_dict()), m, allow_missing=("encoder.", "quant_conv.")), torch_alone=alone,
        call_torch=lambda t, x: t.decode(x[0]).sample)


# ---- the pipeline -------------------------------------------------------------------------------------------
def _torch_pipeline(text, unet, vae, abar, prediction_type, scaling, shift):
    import torch

    class OneStep(torch.nn.Module):
        """transformers CLIP -> TwinUNet at t = 999 -> x0 (mdref.sampler.predict_x0's formula) -> AutoencoderKL."""

        def __init__(self):
            super().__init__()
            self.text, self.unet, self.vae = text, unet, vae

        def forward(self, ids, noise):
            ctx = self.text(ids).last_hidden_state
            out = self.unet(noise, 999, ctx)
            a = torch.tensor(abar, dtype=noise.dtype)
            if prediction_type == "epsilon":
                x0 = (noise - (1 - a).sqrt() * out) / a.sqrt()
            elif prediction_type == "v_prediction":
                x0 = a.sqrt() * noise - (1 - a).sqrt() * out
            else:
                x0 = out
            return self.vae.decode(x0 / scaling + shift).sample
    return OneStep().eval()


def _pipeline():
    import mdref
    from mdref import sampler

    def inputs(b):
        shape = (b, 8, 64, 64)
        return _ids(b), sampler.sampling_noise(shape, 1, 0, np.float32)[0]   # what Pipeline.run(seed=0) draws

    def call_mdref(p, x):
        return p.run([PROMPT] * x[0].shape[0], noise=x[1]).image

    def build(p, text, unet, vae):
        abar = float(sampler.alphas_cumprod(p.scheduler)[999])
        return _torch_pipeline(text, unet, vae, abar, p.scheduler.prediction_type, p.decoder.scaling_factor,
                               p.decoder.shift_factor)

    parts = {k: v() for k, v in (("text", _clip), ("unet", _md_unet))}

    def torch_from(p):
        dec = _decoder("mobilediffusion-lite", "", "", 8)
        return build(p, parts["text"]["torch_from"](p.text_encoder), parts["unet"]["torch_from"](p.unet),
                     dec["torch_from"](p.decoder))

    def torch_alone():
        dec = _decoder("mobilediffusion-lite", "", "", 8)
        p = mdref.Pipeline.__new__(mdref.Pipeline)        # only the scheduler and decoder facts, no weights
        from mdref.io.presets import PIPELINE_PRESETS
        p.scheduler = mdref.SchedulerConfig(**PIPELINE_PRESETS["mobilediffusion"]["scheduler"],
                                            prediction_type="epsilon")
        p.decoder = type("D", (), {"scaling_factor": 1.0, "shift_factor": 0.0})()
        return build(p, parts["text"]["torch_alone"](), parts["unet"]["torch_alone"](), dec["torch_alone"]())
    return dict(
        label='Pipeline.from_preset("mobilediffusion") 512x512', torch_label="CLIP + TwinUNet + AutoencoderKL",
        small=False, inputs=inputs, mdref=lambda dtype: mdref.Pipeline.from_preset("mobilediffusion", 0, dtype),
        call_mdref=call_mdref, torch_from=torch_from, torch_alone=torch_alone, call_torch=lambda t, x: t(*x))


COMPONENTS = {
    "clip": _clip,
    "md-unet": _md_unet,
    "sd21-unet": _sd21_unet,
    "taesd": lambda: _decoder("taesd", "TAESD decoder, 512x512 (64x64x4)", "diffusers AutoencoderTiny", 4),
    "md-lite": lambda: _decoder("mobilediffusion-lite", "MobileDiffusion lite decoder 9.7M, 512x512 (64x64x8)",
                                "diffusers AutoencoderKL", 8),
    "sd-vae": lambda: _decoder("sd-vae", "SD VAE decoder 49.5M, 512x512 (64x64x4)", "diffusers AutoencoderKL", 4),
    # The SDXL VAE decoder has the SD VAE's layout (block_out_channels (128, 256, 512, 512)); SDXL decodes 1024x1024.
    "sd-vae-1024": lambda: _decoder("sd-vae", "SD / SDXL VAE decoder 49.5M, 1024x1024 (128x128x4)",
                                    "diffusers AutoencoderKL", 4, size=128, small=False),
    "pipeline": _pipeline,
}
