"""Average the weights of several recipe checkpoints (a uniform "model soup", Wortsman et al. 2022).

Fine-tunes that start from one checkpoint and move little stay in one basin; each one alone carries its own noise
(a few points of shape accuracy up or down between neighbouring checkpoints), and their mean is often better than
most of its members. Used for earlier default models (the adversarial fine-tunes, weights/README.md); onestep
checkpoints carry their own text encoder, and a soup of them averages both the UNets and the text encoders.

    python recipe/average.py runs/soup.pt runs/v9/adv.pt runs/e1/adv.pt runs/e2/adv.pt ...
"""

from __future__ import annotations

import argparse

import torch


def _mean(sds, paths, key):
    """Uniform mean of state dicts (same keys and shapes, else ValueError naming the checkpoint)."""
    for p, sd in zip(paths[1:], sds[1:]):
        if sd.keys() != sds[0].keys() or any(sd[k].shape != sds[0][k].shape for k in sd):
            raise ValueError(f"{p}: {key} keys or shapes differ from {paths[0]}")
    return {k: sum(sd[k].double() for sd in sds).div(len(sds)).to(sds[0][k].dtype) for k in sds[0]}


def average(paths, key="unet"):
    """Uniform mean of the `key` state dicts ("unet", or "text" of onestep checkpoints) in the checkpoints at
    `paths`."""
    return _mean([torch.load(p, weights_only=True, map_location="cpu")[key] for p in paths], paths, key)


def soup(paths):
    """{"unet": the mean UNet, "text": the mean text encoder when every checkpoint carries one (onestep.pt)}."""
    cks = [torch.load(p, weights_only=True, map_location="cpu") for p in paths]
    return {key: _mean([ck[key] for ck in cks], paths, key) for key in ("unet", "text") if all(key in ck for ck in cks)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="checkpoint to write ({'unet': state dict, 'text': state dict, 'members': [...]})")
    ap.add_argument("members", nargs="+", help="checkpoints with a 'unet' state dict (onestep.pt, adv.pt, unet.pt)")
    a = ap.parse_args(argv)
    torch.save({**soup(a.members), "members": list(a.members)}, a.out)
    print(f"wrote {a.out}: mean of {len(a.members)} checkpoints")


if __name__ == "__main__":
    main()
