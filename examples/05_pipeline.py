"""The whole pipeline in five lines: prompt -> PNG.

tokenize -> text encoder -> one UNet step from pure noise at t = 999 -> decoder -> 8-bit image.
Writes OUT/mdref_pipeline.png (OUT: first argument, default /tmp).

    python examples/05_pipeline.py [OUT]
"""
import sys
from pathlib import Path

import mdref

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp")
out.mkdir(parents=True, exist_ok=True)
pipe = mdref.Pipeline.from_pretrained()                                   # the embedded default model
image = pipe("a large red circle on the left, blue background", seed=0)  # PIL.Image
image.save(out / "mdref_pipeline.png")
print(pipe, image.size, {k: f"{v * 1000:.0f} ms" for k, v in pipe.last_timings.items()})
print(f"wrote {out / 'mdref_pipeline.png'}")
