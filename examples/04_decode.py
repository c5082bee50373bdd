"""Step 4 of the pipeline: clean latent x0 -> image -> 8-bit PNG.

The decoder sees x0 / scaling_factor + shift_factor and returns an image in [-1, 1]; pixels are
round(clip((image + 1) / 2, 0, 1) * 255). Reads OUT/mdref_x0.npy written by 03_unet_one_step.py when it is
there (else makes one), writes OUT/mdref_decoded.png (OUT: first argument, default /tmp).

    python examples/04_decode.py [OUT]
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import mdref
from mdref.pipeline import to_pixels

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp")
out.mkdir(parents=True, exist_ok=True)
pipe = mdref.Pipeline.from_pretrained()                        # the embedded default model
dec = pipe.decoder
print(dec.config.kind, "decoder,", f"{dec.num_parameters():,} parameters, x{dec.upsampling_factor} upsampling,",
      f"scaling_factor {dec.scaling_factor}, shift_factor {dec.shift_factor}")

x0_file = out / "mdref_x0.npy"
x0 = np.load(x0_file) if x0_file.is_file() else pipe.run("a large red circle on the left, blue background").x0
print(f"x0 {x0.shape}" + (f" from {x0_file}" if x0_file.is_file() else " (fresh)"))

with mdref.trace("decoder.*") as t:
    image = pipe.decode(x0)                                    # [1, 3, H, W] in [-1, 1]
for name in t.names():
    print(f"  {name:<26} {str(t[name].shape):>18}")

pixels = to_pixels(image)                                      # uint8 [1, H, W, 3]
print(f"image {image.shape} in [{image.min():.2f}, {image.max():.2f}] -> pixels {pixels.shape} {pixels.dtype}")
Image.fromarray(pixels[0]).save(out / "mdref_decoded.png")
print(f"wrote {out / 'mdref_decoded.png'}")
