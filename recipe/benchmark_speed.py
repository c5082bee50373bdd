"""Wall time of one image, end to end, through mdref's NumPy pipeline and through PyTorch in the same run (issue 5).

    python recipe/benchmark_speed.py [--model weights/default] [--runs 7] [--threads 2]

PyTorch path: transformers CLIPTextModel + the recipe's TwinUNet + diffusers AutoencoderKL decoder, float32, on the
same safetensors, same tokens and same noise; one UNet call at t = 999 (the one-step sampler). Prints the median of
--runs timed runs after one warm-up run, per stage and in total, and the max difference of the two images.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


PROMPT = "a large red circle on the left, blue background"


def median_ms(xs):
    return 1e3 * statistics.median(xs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline folder (default: the embedded default model)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (NumPy uses its BLAS defaults)")
    a = ap.parse_args(argv)
    import reference
    import torch

    import mdref

    torch.set_num_threads(a.threads)
    pipe = mdref.Pipeline.from_pretrained(a.model)
    folder = Path(pipe.path)

    # ---- NumPy (mdref)
    stages = {"text_encoder": [], "unet": [], "decoder": [], "total": []}
    for i in range(a.runs + 1):
        t0 = time.perf_counter()
        res = pipe.run([PROMPT], seed=0)
        total = time.perf_counter() - t0
        if i:  # the first run is a warm-up
            for k in ("text_encoder", "unet", "decoder"):
                stages[k].append(res.timings[k])
            stages["total"].append(total)

    # ---- PyTorch
    text, unet, vae = (reference.text_encoder(folder / "text_encoder"), reference.unet(folder / "unet"),
                       reference.autoencoder(folder / "vae"))
    ids = torch.from_numpy(mdref.Tokenizer.from_pretrained(None)([PROMPT]).astype(np.int64))
    noise = torch.from_numpy(np.asarray(res.noise, dtype=np.float32))  # the NumPy run's noise [1, C, h, w]
    sf = vae.config.scaling_factor
    pt = {"text_encoder": [], "unet": [], "decoder": [], "total": []}
    with torch.inference_mode():
        for i in range(a.runs + 1):
            t0 = time.perf_counter()
            ctx = text(ids).last_hidden_state
            t1 = time.perf_counter()
            x0 = unet(noise, 999, ctx)
            t2 = time.perf_counter()
            img = vae.decode(x0 / sf).sample
            t3 = time.perf_counter()
            if i:
                for k, v in zip(("text_encoder", "unet", "decoder", "total"), (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                    pt[k].append(v)

    print(f"one image, {PROMPT!r}, median of {a.runs} runs (after one warm-up), torch threads {a.threads}:")
    print(f"  {'':14s} {'NumPy (mdref)':>14s} {'PyTorch':>10s}")
    for k in ("text_encoder", "unet", "decoder", "total"):
        print(f"  {k:14s} {median_ms(stages[k]):11.1f} ms {median_ms(pt[k]):7.1f} ms")
    print("  (NumPy total includes tokenizing, noise and the uint8 conversion; PyTorch total is the three models)")
    diff = float(np.abs(np.asarray(res.image, np.float64) - img.numpy()).max())
    print(f"  max |NumPy image - PyTorch image| (decoder output, range [-1, 1]): {diff:.2e}")


if __name__ == "__main__":
    main()
