"""mdref_torch: the PyTorch forms of mdref's components, shipped beside mdref in the same distribution.

mdref itself never imports torch (``import mdref`` needs numpy, safetensors, tokenizers and pillow only); this
package is for what needs a PyTorch module: exporting a model mdref loads to ONNX (`mdref export onnx`, extra
``export``), running it in PyTorch-based runtimes (ExecuTorch, LiteRT), and the parity tests.

    twin.py     the PyTorch twin of the MobileDiffusion UNet (diffusers has no class for it): plain nn.Modules whose
                state_dict keys are mdref's checkpoint keys
    build.py    a PyTorch module from an mdref component's config and parameters: transformers CLIPTextModel, the
                twin UNet, diffusers AutoencoderKL / AutoencoderTiny's decoder half (`build.torch_module`)
    points.py   the rules from PyTorch module paths to mdref point names, and a forward that returns every
                point mdref records as an extra output (`points.PointOutputs`)
    export.py   `mdref export onnx`: text_encoder.onnx, unet.onnx, decoder.onnx and points.json

    pip install "mdref[export]"     # torch (pinned), transformers, diffusers, onnx, onnxscript, onnxruntime
"""

try:
    import torch  # noqa: F401
except ImportError as e:                                    # the one message mdref's CLI repeats
    raise ImportError('mdref_torch needs PyTorch: pip install "mdref[export]" (or "mdref[torch]")') from e

__all__ = ["twin", "build", "points"]
