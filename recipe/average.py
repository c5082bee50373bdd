"""Average the UNet weights of several recipe checkpoints (a uniform "model soup", Wortsman et al. 2022).

The adversarial fine-tunes start from one checkpoint and move little (lr 5e-5), so their weights stay in one basin;
each one alone carries its own GAN noise (a few points of shape accuracy up or down between neighbouring
checkpoints), and their mean is better than most of its members. Used for the shipped model (weights/README.md).

    python recipe/average.py runs/v9/adv.pt runs/e1/adv.pt runs/e2/adv.pt ...
"""

from __future__ import annotations

import argparse

import torch


def average(paths):
    """Uniform mean of the "unet" state dicts in the checkpoints at `paths` (same keys and shapes, else ValueError)."""
    sds = [torch.load(p, weights_only=True, map_location="cpu")["unet"] for p in paths]
    for p, sd in zip(paths[1:], sds[1:]):
        if sd.keys() != sds[0].keys() or any(sd[k].shape != sds[0][k].shape for k in sd):
            raise ValueError(f"{p}: UNet keys or shapes differ from {paths[0]}")
    return {k: sum(sd[k].double() for sd in sds).div(len(sds)).to(sds[0][k].dtype) for k in sds[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="checkpoint to write ({'unet': state dict, 'members': [...]})")
    ap.add_argument("members", nargs="+", help="checkpoints with a 'unet' state dict (adv.pt, adv_mid.pt, unet.pt)")
    a = ap.parse_args(argv)
    torch.save({"unet": average(a.members), "members": list(a.members)}, a.out)
    print(f"wrote {a.out}: mean of {len(a.members)} checkpoints")


if __name__ == "__main__":
    main()
