"""Validation of one-step UNet checkpoints with the PyTorch twin, for choosing among training runs (not the benchmark).

The benchmark (benchmark_adherence.py) uses held-out attribute combinations and fixed seeds; choosing a model by
its score there would fit the test set. This script draws from the TRAINING combinations at other seeds instead:
  - complete prompts: `--n` training-combination prompts, both word orders, one noise each;
  - open prompts: benchmark_adherence.OPEN_PROMPTS and one prompt per pattern of given attributes (other values than
    the benchmark's), 16 noises each, at `--seed-sets` other seed sets; open_kept is the share of samples showing one
    clean shape that keeps every attribute the prompt names, open_too_few_values the number of (prompt, seed set,
    open attribute with >= 3 possible values) that take fewer than 3 values over the 16 noises.
It samples exactly as mdref does (pure noise at t = 999, one UNet call, decode) and judges with evaluate.py.

    python recipe/validate.py --run runs/r22f --decoder decproj.pt runs/r22f/onestep.pt runs/r22c/onestep.pt \
        --soup avg=runs/r22f/onestep.pt,runs/r22c/onestep.pt --regions rgb
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

import data
import train
from average import soup
from benchmark_adherence import OPEN_PROMPTS, judge_open, keeps_given, pattern_prompts
from evaluate import ATTRS, evaluate


class Sampler:
    """The decoder of a run folder (aeft.pt or another decoder checkpoint); one-step samples of any generator
    checkpoint (onestep.pt: a UNet and its text encoder), on `device`."""

    def __init__(self, run, preset=train.FULL, decoder="aeft.pt", device=torch.device("cpu")):
        _, self.vae, ck = train.load_ae(preset, Path(run) / decoder, device)
        self.mean, self.std = ck["mean"].to(device)[None, :, None, None], ck["std"].to(device)
        self.preset, self.device = preset, device
        self.unet = train.TwinUNet(train.unet_config(preset.unet, preset.text["hidden_size"])).eval().to(device)
        self.tokens = train.TokenCache()

    def load(self, ck):
        """A generator checkpoint's UNet and text encoder."""
        if "text" not in ck:
            raise ValueError("the checkpoint carries no text encoder (validate.py reads onestep checkpoints; the "
                             "runs of earlier recipes kept theirs in unet_text.pt: git show ffa37bf:recipe/validate.py)")
        self.unet.load_state_dict(ck["unet"])
        self.text = train.text_from_state(self.preset, ck["text"], self.device)

    @torch.no_grad()
    def __call__(self, prompts, seed, batch=256, with_noise=False):
        """uint8 images [N, 64, 64, 3] for `prompts`, noise from torch.Generator().manual_seed(seed) (and the noises
        [N, 8, 8, 8] with with_noise)."""
        g = torch.Generator().manual_seed(seed)
        out, noises = [], []
        for b in range(0, len(prompts), batch):
            ids = self.tokens(prompts[b:b + batch]).to(self.device)
            noise = train.randn((len(ids), train.LATENT_CHANNELS, 8, 8), g, self.device)  # x_T, [B, 8, 8, 8]
            t = torch.full((len(ids),), train.LAST_T, device=self.device)
            z = self.unet(noise, t, self.text(ids).last_hidden_state)  # predicted clean latent (normalised)
            x = train.decode(self.vae, z * self.std + self.mean)
            out.append(data.to_uint8(x.cpu()))
            noises.append(noise.cpu())
        return (np.concatenate(out), torch.cat(noises)) if with_noise else np.concatenate(out)


def validate(sampler, ck, n=300, seed_sets=4, regions=None):
    """Complete- and open-prompt figures of one checkpoint (module docstring). With regions = a colour reading
    (train.COLOUR_READINGS), also the open samples and their failures (not kept) per train.noise_region of their
    noise: res["regions"][region] = [samples, failures]."""
    sampler.load(ck)
    rng = random.Random(12345)
    combos = [rng.choice(data.TRAIN_COMBOS) for _ in range(n)]
    prompts = [data.prompt(*c, order=i % 2) for i, c in enumerate(combos)]
    rs = [evaluate(img) for img in sampler(prompts, seed=777)]
    res = {k: float(np.mean([r[k] == c[j] for r, c in zip(rs, combos)])) for j, k in enumerate(ATTRS)}
    res["all"] = float(np.mean([all(r[k] == c[j] for j, k in enumerate(ATTRS)) for r, c in zip(rs, combos)]))
    specs = OPEN_PROMPTS + [s for s in pattern_prompts(per_pattern=1, seed=31) if s not in OPEN_PROMPTS]
    texts = [data.prompt(*spec) for spec in specs]
    clean, obey, kept, distinct, per_prompt, few = [], [], [], [], np.zeros(len(texts)), 0
    by_region = {r: [0, 0] for r in train.NOISE_REGIONS}
    for s in range(seed_sets):
        imgs, noise = sampler([t for t in texts for _ in range(16)], seed=9000 + s, with_noise=True)
        qs = train.noise_quantiles_batch(noise) if regions else None
        for p, spec in enumerate(specs):
            rs = [evaluate(img) for img in imgs[16 * p:16 * (p + 1)]]
            row = judge_open(spec, rs)
            if regions:
                for j, r in enumerate(rs):
                    region = by_region[train.noise_region(spec, qs[16 * p + j], regions)]
                    region[0] += 1
                    region[1] += not (r["clean"] and keeps_given(spec, r))
            clean.append(row["clean"])
            per_prompt[p] += row["clean"] / seed_sets
            obey.append(row["given_obeyed"])
            kept.append(row["kept"])
            distinct.append(row["distinct_open_tuples"])
            few += len(row["too_few_values"])
    res.update(open_clean=float(np.mean(clean)), open_obeyed=float(np.mean(obey)), open_kept=float(np.mean(kept)),
               open_min_distinct=min(distinct), open_too_few_values=few,
               open_clean_per_prompt=[round(float(v), 3) for v in per_prompt])
    if regions:
        res["regions"] = by_region
    return res


@torch.no_grad()
def reconstruction(run, preset, decoder, n, device, seed=4321):
    """The autoencoder alone: n renders of training combinations through the encoder and the decoder checkpoint,
    judged by evaluate.py against the rendered combination; per-attribute and all-five accuracy."""
    enc, vae, _ = train.load_ae(preset, Path(run) / decoder, device)
    g = torch.Generator().manual_seed(seed)
    combos = data.sample_combos(n, g, data.TRAIN_COMBOS)
    rs = []
    for b in range(0, n, 250):
        x = data.render(combos[b:b + 250], g, device=device)  # [B, 3, 64, 64]
        rs += [evaluate(img) for img in data.to_uint8(train.decode(vae, enc(x)).cpu())]
    res = {k: float(np.mean([r[k] == c[j] for r, c in zip(rs, combos)])) for j, k in enumerate(ATTRS)}
    res["all"] = float(np.mean([all(r[k] == c[j] for j, k in enumerate(ATTRS)) for r, c in zip(rs, combos)]))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", help="onestep checkpoints (a unet and a text state dict)")
    ap.add_argument("--run", required=True, help="run folder with aeft.pt (or the --decoder checkpoint)")
    ap.add_argument("--soup", action="append", default=[], help="NAME=a.pt,b.pt,...: also validate their mean")
    ap.add_argument("--decoder", default="aeft.pt", help="decoder checkpoint in the run folder (e.g. decproj.pt)")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed-sets", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="the run used train.py --tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="append one JSON line per checkpoint to this file")
    ap.add_argument("--regions", choices=sorted(train.COLOUR_READINGS), default=None,
                    help="also count open samples and failures per region of the noise (train.noise_region) for "
                         "this colour reading (the onestep stage reads 'rgb'; 'bucket' is the rule of runs/r20)")
    ap.add_argument("--recon", type=int, default=0,
                    help="also judge N autoencoder reconstructions (encoder + --decoder)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device, preset = torch.device(a.device), train.TINY if a.tiny else train.FULL
    if a.recon:
        res = reconstruction(a.run, preset, a.decoder, a.recon, device)
        print(f"reconstruction ({a.decoder}, {a.recon} renders): " + " ".join(f"{k} {v:.3f}" for k, v in res.items()),
              flush=True)
    sampler = Sampler(a.run, preset, a.decoder, device)
    todo = [(p, lambda p=p: torch.load(p, weights_only=True, map_location="cpu")) for p in a.checkpoints]
    for spec in a.soup:
        name, members = spec.split("=", 1)
        todo.append((name, lambda m=members: soup(m.split(","))))
    for name, load in todo:
        res = dict(name=name, **validate(sampler, load(), a.n, a.seed_sets, a.regions))
        print(f"{name}: shape {res['shape']:.3f} all {res['all']:.3f} open clean {res['open_clean']:.3f} "
              f"obeyed {res['open_obeyed']:.3f} kept {res['open_kept']:.3f} min distinct {res['open_min_distinct']} "
              f"open attributes with too few values {res['open_too_few_values']} "
              f"per prompt {res['open_clean_per_prompt']}", flush=True)
        for region, (n_region, failed) in res.get("regions", {}).items():
            print(f"  {region}: {failed} of {n_region} open samples not kept", flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
