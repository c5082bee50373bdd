"""The training recipe (recipe/) and the shipped default model (weights/default).

(a) the recipe runs every stage on a tiny config and its export loads in mdref;
(b) parity on the SHIPPED weights: the PyTorch twin UNet, transformers CLIPTextModel and diffusers' AutoencoderKL
    decoder against mdref (float32, max abs error <= 1e-5 * max|reference|);
(c) prompt adherence of the shipped model through mdref, well above chance;
(d) the evaluator on freshly rendered ground truth.
"""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipe"
DEFAULT = ROOT / "weights" / "default"

import data  # noqa: E402  recipe/ is on pytest's pythonpath (pyproject.toml)
from evaluate import score  # noqa: E402

needs_default = pytest.mark.skipif(not (DEFAULT / "unet" / "config.json").is_file(),
                                   reason="weights/default not present")


from oracles import U32, U64, rel_err, within  # noqa: E402


# ---------------------------------------------------------------- (d) evaluator
def test_evaluator_on_ground_truth():
    g = torch.Generator().manual_seed(123)
    cs = data.sample_combos(300, g, data.ALL_COMBOS)
    acc, wrong = score(data.to_uint8(data.render(cs, g)), cs)
    print("evaluator on 300 renders:", acc)
    assert min(acc.values()) >= 0.99, wrong[:5]


def test_heldout_list_matches_seed():
    saved = json.loads((RECIPE / "heldout.json").read_text())
    assert saved["count"] == 168 == len(data.HELDOUT)
    assert [tuple(c[k] for k in saved["attributes"]) for c in saved["combinations"]] == [tuple(c) for c in data.HELDOUT]
    assert not set(data.HELDOUT) & set(data.TRAIN_COMBOS)


# ---------------------------------------------------------------- (a) recipe smoke run
def _train(*args):
    """recipe/train.py as the shipped model's commands run it (a subprocess: its own threads and seeds)."""
    r = subprocess.run([sys.executable, str(RECIPE / "train.py"), "--tiny", *map(str, args)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def test_recipe_tiny_runs_the_shipped_recipe(tmp_path, capsys):
    """The two commands that made weights/default (weights/README.md) at the tiny size, their export loading in
    mdref, the option errors, and the scripts around the recipe: validate.py (with --regions and a soup),
    check_float16.py on a float32 export, average.py."""
    import train
    import validate
    from average import average
    import check_float16

    t0 = time.time()
    first, second = tmp_path / "first", tmp_path / "second"
    out = _train("--out", first, "--stages", "ae,aeft,onestep", "--steps", "ae=2,aeft=2,onestep=3",
                 "--bf16", "aeft,onestep", "--onestep-shape-weight", "4", "--onestep-check", "2")
    assert "onestep step 2 loss" in out and " check complete " in out, out[-2000:]
    # --steps ae=2,aeft=2,onestep=3 set those stages' step counts
    assert [torch.load(first / f"{s}.pt", weights_only=True)[k] for s, k in
            [("ae", "steps"), ("aeft", "steps_ft"), ("onestep", "steps")]] == [2, 2, 3]
    second.mkdir()
    for name in ["ae.pt", "aeft.pt"]:
        (second / name).hardlink_to(first / name)
    out = _train("--out", second, "--stages", "onestep,decproj", "--steps", "onestep=2,decproj=2",
                 "--bf16", "onestep,decproj", "--onestep-init", first / "onestep.pt", "--onestep-lr", "3e-4",
                 "--onestep-p-complete", "0.1", "--onestep-shape-weight", "1", "--onestep-p-exclusion", "0.3",
                 "--onestep-ema", "0.995", "--onestep-check", "0", "--export", second / "model")
    assert "exported onestep.pt (UNet) and decproj.pt (decoder)" in out
    assert torch.load(second / "onestep.pt", weights_only=True)["steps"] == 2
    assert torch.load(second / "decproj.pt", weights_only=True)["steps_decproj"] == 2
    mdref = pytest.importorskip("mdref")
    px = mdref.Pipeline.from_pretrained(second / "model").run(["a red circle"], seed=0).pixels
    assert px.shape == (1, 64, 64, 3) and px.dtype == np.uint8
    print(f"tiny recipe wall {time.time() - t0:.1f}s")
    # option errors name the option and what was wrong; the stages of earlier models are gone
    for args, message in [(["--steps", "onestpe=2"], "--steps: unknown stage onestpe"),
                          (["--budget", "onestep=2,aeft"], "--budget: expected STAGE=VALUE pairs"),
                          (["--steps", "abc"], "--steps: expected an integer, got 'abc'"),
                          (["--steps", "onestep=x"], "--steps onestep: expected an integer, got 'x'"),
                          (["--bf16", "aeft,unet"], "--bf16: unknown stage unet"),
                          (["--stages", "ae,adv"], "--stages: unknown stage adv")]:
        with pytest.raises(SystemExit, match=message):
            train.main(["--tiny", "--out", str(tmp_path / "never"), *args])
    assert not (tmp_path / "never").exists()
    # validate.py: every open sample in one region (--regions), the failures adding up to 1 - open_kept
    validate.main(["--tiny", "--run", str(second), "--n", "4", "--decoder", "decproj.pt", "--recon", "6",
                   "--seed-sets", "1", "--json", str(tmp_path / "val.jsonl"), str(second / "onestep.pt"),
                   "--regions", "rgb", "--soup", f"s={first / 'onestep.pt'},{second / 'onestep.pt'}",
                   "--threads", str(torch.get_num_threads())])
    assert "reconstruction (decproj.pt, 6 renders): shape" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert [row["name"] for row in rows] == [str(second / "onestep.pt"), "s"]
    assert all(0 <= row["shape"] <= 1 and 0 <= row["open_clean"] <= 1 for row in rows)
    for row in rows:
        counts = np.array(list(row["regions"].values()))  # [regions, (samples, failures)]
        assert list(row["regions"]) == train.NOISE_REGIONS and (counts[:, 1] <= counts[:, 0]).all()
        n_open = counts[:, 0].sum()
        assert n_open > 0 and n_open % 16 == 0
        assert counts[:, 1].sum() == round((1 - row["open_kept"]) * n_open)
    # a float32 export of the same run rounds to the float16 export exactly; check_float16.py compares the two
    train.export(train.make_run(train.options().parse_args(["--tiny", "--out", str(second)])), print,
                 second / "f32", torch.float32)
    from safetensors.numpy import load_file
    for f in ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
              "vae/diffusion_pytorch_model.safetensors"]:
        w16, w32 = load_file(second / "model" / f), load_file(second / "f32" / f)
        assert w16.keys() == w32.keys()
        assert all(w32[k].dtype == np.float32 and w16[k].dtype == np.float16 for k in w16)
        assert all(np.array_equal(w32[k].astype(np.float16), w16[k]) for k in w16), f
    check_float16.main(["--float16", str(second / "model"), "--float32", str(second / "f32"), "--n", "4"])
    assert "samples read differently" in capsys.readouterr().out
    # recipe/average.py: the uniform weight mean of checkpoints, refusing checkpoints of different models
    a = torch.load(first / "onestep.pt", weights_only=True)["unet"]
    gen = torch.Generator().manual_seed(0)
    b = {k: v + torch.randn(v.shape, generator=gen) for k, v in a.items()}
    torch.save({"unet": b}, tmp_path / "moved.pt")
    m = average([first / "onestep.pt", tmp_path / "moved.pt"])
    assert m.keys() == a.keys()
    assert max(float((m[k] - (a[k] + b[k]) / 2).abs().max()) for k in m) < 1e-6
    torch.save({"unet": {k: v for k, v in a.items() if k != "conv_in.weight"}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt"):
        average([first / "onestep.pt", tmp_path / "other.pt"])


def test_couple_open_reads_open_attributes_off_the_noise():
    """recipe/train.py couple_open: given attributes kept, open ones a function of the noise, every allowed value
    reachable with roughly equal frequency, background != shape colour, never a held-out combination."""
    import collections

    import train
    g = torch.Generator().manual_seed(5)
    counts = collections.Counter()
    n_none = 0
    for i in range(3000):
        noise = torch.randn(8, 8, 8, generator=g)
        attrs = [None, None, None, None, None] if i % 2 else ["square", None, "blue", None, "large"]
        c = train.couple_open(attrs, noise)
        assert c == train.couple_open(attrs, noise.clone())  # deterministic
        if c is None:
            n_none += 1
            continue
        assert c not in data.HELDOUT_SET and c[1] != c[2]
        assert all(a is None or a == v for a, v in zip(attrs, c))
        if i % 2:
            counts[c[2]] += 1
    assert 0 < n_none < 450  # about 10% of combinations are held out
    assert set(counts) == set(data.COLOURS)
    assert max(counts.values()) < 1.6 * min(counts.values()), counts
    # the background is read off noise channel 2: raising that channel's mean moves it to a later colour
    noise = torch.zeros(8, 8, 8)
    picks = []
    for m in [-2.0, -0.5, 0.5, 2.0]:
        noise[2] = m
        picks.append(data.COLOURS.index(train.couple_open(["circle", "red", None, "left", "small"], noise)[2]))
    assert picks == sorted(picks) and picks[0] < picks[-1]


def test_sample_prompt_patterns_draws_every_open_pattern_evenly():
    """data.sample_prompt_patterns: complete with the asked probability; otherwise 0..4 attributes given, each count
    about equally often, every one of the 31 subsets reached; the given values are the combination's own."""
    import collections

    g = torch.Generator().manual_seed(11)
    combos = data.sample_combos(6000, g)
    drawn = data.sample_prompt_patterns(combos, g, p_complete=0.25)
    complete = sum(None not in attrs for attrs, _ in drawn)
    assert abs(complete / len(drawn) - 0.25) < 0.03
    counts = collections.Counter(sum(a is not None for a in attrs) for attrs, _ in drawn if None in attrs)
    assert set(counts) == {0, 1, 2, 3, 4}
    assert max(counts.values()) < 1.25 * min(counts.values()), counts
    subsets = {tuple(a is not None for a in attrs) for attrs, _ in drawn if None in attrs}
    assert len(subsets) == 31
    assert all(a is None or a == v for (attrs, _), c in zip(drawn, combos) for a, v in zip(attrs, c))
    assert {o for _, o in drawn} == {0, 1}


def test_rgb_colour_reading_is_the_nearest_allowed_palette_colour():
    """recipe/train.py couple_open(colour='rgb'), the onestep stage's rule: the background is the palette colour
    nearest to the RGB point (q2, q7, q8) of noise_quantiles, the shape colour the one nearest to (q1, q5, q6) among
    the colours other than the background (or than a given one); naive distances in the test; every colour reached as
    either; the nine readings are uniform and uncorrelated."""
    import collections

    import train
    palette = np.array([data.PALETTE[c] for c in data.COLOURS], dtype=np.float64) / 255  # [8, 3]

    def nearest(point, allowed):
        d = ((palette - np.array(point)) ** 2).sum(1)
        return min((c for c in data.COLOURS if c in allowed), key=lambda c: d[data.COLOURS.index(c)])

    g = torch.Generator().manual_seed(21)
    colours, backgrounds, qs = collections.Counter(), collections.Counter(), []
    for i in range(3000):
        noise = torch.randn(8, 8, 8, generator=g)
        attrs = [None] * 5 if i % 3 else ["circle", "red", None, None, "small"]
        c = train.couple_open(attrs, noise, colour="rgb")
        q = train.noise_quantiles(noise)
        qs.append(q)
        if c is None:
            continue
        assert c[2] == nearest((q[2], q[7], q[8]), [k for k in data.COLOURS if k != attrs[1]])
        assert c[1] == (attrs[1] or nearest((q[1], q[5], q[6]), [k for k in data.COLOURS if k != c[2]]))
        assert all(a is None or a == v for a, v in zip(attrs, c)) and c not in data.HELDOUT_SET
        if i % 3:
            colours[c[1]] += 1
            backgrounds[c[2]] += 1
    n = sum(colours.values())
    assert set(colours) == set(backgrounds) == set(data.COLOURS)
    assert min(colours.values()) > 0.03 * n and min(backgrounds.values()) > 0.03 * n, (colours, backgrounds)
    q = np.array(qs)  # [3000, 9]
    assert np.abs(q.mean(0) - 0.5).max() < 0.03
    assert np.abs(np.corrcoef(q.T) - np.eye(9)).max() < 0.08
    # the corners of the RGB cube: strong channel means give red, white and black shapes on a fixed background
    for m, want in [((2, -2, -2), "red"), ((2, 2, 2), "white"), ((-2, -2, -2), "black")]:
        noise = torch.zeros(8, 8, 8)
        noise[1], noise[5], noise[6] = m
        assert train.couple_open(["circle", None, "green", "left", "small"], noise, colour="rgb")[1] == want


@pytest.mark.parametrize("colour", ["bucket", "rgb"])
def test_coupled_scenes_give_one_training_scene_per_noise(colour):
    """recipe/train.py coupled_scenes (the onestep stage's targets): complete prompts keep their combination; open
    prompts keep what they give and read the rest off the returned noise exactly as couple_open does; no target is a
    held-out combination; every open value is reached."""
    import collections

    import train
    g = torch.Generator().manual_seed(12)
    drawn = data.sample_prompt_patterns(data.sample_combos(2000, g), g, p_complete=0.3)
    noise, combos = train.coupled_scenes(drawn, g, colour=colour)
    assert noise.shape == (2000, 8, 8, 8)
    seen = collections.defaultdict(set)
    for (attrs, _), c, nz in zip(drawn, combos, noise):
        assert c not in data.HELDOUT_SET and c[1] != c[2]
        assert all(a is None or a == v for a, v in zip(attrs, c))
        if None in attrs:
            assert train.couple_open(attrs, nz, colour) == c
            for k, (a, v) in enumerate(zip(attrs, c)):
                if a is None:
                    seen[k].add(v)
        else:
            assert c == tuple(attrs)
    assert [len(seen[k]) for k in range(5)] == [3, 8, 8, 5, 2]
    # the latent table holds one latent per training combination and looks them up by combination
    enc = train.Encoder(8)
    table = train.SceneLatents(enc, torch.zeros(8), torch.tensor(1.0), g, combos=data.TRAIN_COMBOS[:10])
    got = table([data.TRAIN_COMBOS[3], data.TRAIN_COMBOS[0]])
    with torch.no_grad():
        want = enc(data.render([data.TRAIN_COMBOS[3], data.TRAIN_COMBOS[0]], jitter=False))
    assert got.shape == (2, 8, 8, 8) and torch.allclose(got, want, atol=1e-6)


def test_coupled_scenes_oversample_the_rows_where_a_colour_is_moved():
    """recipe/train.py coupled_scenes(p_exclusion=...), in_exclusion, near_background_edge and noise_region: the
    targets still follow couple_open on the returned noise and are never held out; both tests agree with
    nearest-palette distances computed here; the share of eligible open rows whose reading falls on the colour to
    avoid (about 1 in 7) rises with the share asked for; about 1 in 6 open backgrounds is read near an edge."""
    import train
    palette = np.array([data.PALETTE[c] for c in data.COLOURS]) / 255  # [8, 3]

    def nearest(point):
        return data.COLOURS[int(np.argmin(((palette - np.array(point)) ** 2).sum(1)))]

    def edge(point, avoid):  # distance to the second-nearest allowed colour minus distance to the nearest
        d = np.sort(np.sqrt(((palette - np.array(point)) ** 2).sum(1))[[c != avoid for c in data.COLOURS]])
        return d[1] - d[0]

    shares = {}
    for p in (0.0, 0.5):
        g = torch.Generator().manual_seed(21)
        drawn = data.sample_prompt_patterns(data.sample_combos(3000, g), g, p_complete=0.2)
        noise, combos = train.coupled_scenes(drawn, g, colour="rgb", p_exclusion=p)
        moved = eligible = near = bg_open = 0
        for (attrs, _), c, nz in zip(drawn, combos, noise):
            assert c not in data.HELDOUT_SET and c[1] != c[2]
            if None not in attrs:
                assert c == tuple(attrs)
                continue
            assert train.couple_open(attrs, nz, "rgb") == c
            q = train.noise_quantiles(nz)
            is_near = False
            if attrs[2] is None:
                is_near = edge([q[2], q[7], q[8]], attrs[1]) < 0.05
                assert train.near_background_edge(attrs, q, c, "rgb", width=0.05) == is_near
                bg_open += 1
                near += is_near
            if attrs[1] is not None and attrs[2] is None:  # open background, given shape colour
                want = nearest([q[2], q[7], q[8]]) == attrs[1]
            elif attrs[1] is None:  # open shape colour: the background it must avoid is given or read
                want = nearest([q[1], q[5], q[6]]) == c[2]
            else:
                assert train.noise_region(attrs, q, "rgb") == ("background edge" if is_near else "elsewhere")
                continue
            assert train.in_exclusion(attrs, q, c, "rgb") == want
            region = ("shape colour moved" if attrs[1] is None else "background moved") if want else (
                "background edge" if is_near else "elsewhere")
            assert train.noise_region(attrs, q, "rgb") == region  # validate.py --regions
            eligible += 1
            moved += want
        shares[p] = moved / eligible, near / bg_open
    assert 0.10 < shares[0.0][0] < 0.20 and shares[0.5][0] > 0.5, shares
    assert 0.10 < shares[0.0][1] < 0.25, shares


def test_project_combo_keeps_the_prompt_and_the_drawn_scene():
    """recipe/train.py project_combo: given attributes kept; open ones as read off the sample when they are allowed,
    else the noise's bucket (as couple_open reads it); background != shape colour; never a held-out combination."""
    import train
    g = torch.Generator().manual_seed(6)
    rng = np.random.default_rng(6)
    n_none = 0
    for i in range(2000):
        noise = torch.randn(8, 8, 8, generator=g)
        truth = data.ALL_COMBOS[rng.integers(len(data.ALL_COMBOS))]
        seen = dict(zip(["shape", "colour", "background", "position", "size"], truth))
        if i % 5 == 0:
            seen.update(shape=None, colour=None, position=None, size=None)  # a sample with nothing far from its bg
        attrs = [v if rng.random() < 0.5 else None for v in data.sample_combos(1, g)[0]]
        c = train.project_combo(attrs, seen, noise)
        assert c == train.project_combo(attrs, seen, noise.clone())  # deterministic
        if c is None:
            n_none += 1
            continue
        assert c not in data.HELDOUT_SET and c[1] != c[2]
        assert all(a is None or a == v for a, v in zip(attrs, c))
        bg_ok = attrs[2] is None and seen["background"] != attrs[1]
        if bg_ok:
            assert c[2] == seen["background"]
        q = train.noise_quantiles(noise)
        for k, key, options in [(0, "shape", data.SHAPES), (3, "position", data.POSITIONS), (4, "size", data.SIZES)]:
            if attrs[k] is None:
                assert c[k] == (seen[key] if seen[key] is not None else options[int(q[k] * len(options))])
        if attrs[1] is None and bg_ok and seen["colour"] is not None and seen["colour"] != c[2]:
            assert c[1] == seen["colour"]
    assert 0 < n_none < 400
    # a sample showing the prompt's own colour as background: the background comes from the noise instead
    noise = torch.zeros(8, 8, 8)
    picks = set()
    for m in [-0.15, -0.08, -0.03, 0.03, 0.08, 0.15]:  # channel mean m: u = 8 m
        noise[2] = m
        c = train.project_combo(["circle", "red", None, "left", "small"],
                                dict(shape=None, colour=None, background="red", position=None, size=None), noise)
        if c is not None:  # None: that background makes a held-out combination
            assert c[2] != "red"
            picks.add(c[2])
    assert len(picks) >= 3


# ---------------------------------------------------------------- (b) parity on the shipped weights
@needs_default
@pytest.mark.numerics
def test_shipped_text_encoder_parity():
    mdref = pytest.importorskip("mdref")
    import reference

    ref = reference.text_encoder(DEFAULT / "text_encoder")
    te = mdref.TextEncoder.from_pretrained(DEFAULT / "text_encoder", dtype=np.float32)
    ids = mdref.Tokenizer.from_pretrained(None)(["a large red circle on the left, blue background", "a shape"])
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    within("shipped text encoder f32 vs transformers f32", rel_err(te(ids), want), 1e-5)


@needs_default
@pytest.mark.numerics
def test_shipped_unet_parity():
    mdref = pytest.importorskip("mdref")
    import reference

    twin = reference.unet(DEFAULT / "unet")                   # strict: every key of the shipped file
    cfg = twin.cfg
    un = mdref.UNet.from_pretrained(DEFAULT / "unet", dtype=np.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, cfg["cross_attention_dim"])).astype(np.float32)
    for t in (999, 250):
        with torch.no_grad():
            want = twin(torch.from_numpy(x), t, torch.from_numpy(ctx)).numpy()
        within(f"shipped unet t={t} f32 vs twin f32", rel_err(un(x, t, ctx), want), 1e-5)


@needs_default
@pytest.mark.numerics
def test_shipped_decoder_parity():
    mdref = pytest.importorskip("mdref")
    import reference

    vae = reference.autoencoder(DEFAULT / "vae")              # raises unless only encoder.* keys are missing
    dec = mdref.Decoder.from_pretrained(DEFAULT / "vae", dtype=np.float32)
    z = np.random.default_rng(1).standard_normal((2, 8, 8, 8)).astype(np.float32)
    # The float32 oracle runs PyTorch's native convolution. oneDNN's multi-threaded float32 convolution is itself
    # 1.6e-5 from the float64 result on these weights (8.3e-6 natively), so against it the figure measures oneDNN's
    # rounding, not mdref; it is printed below beside the bounded ones.
    with torch.no_grad():
        with torch.backends.mkldnn.flags(enabled=False):
            want32 = vae.decode(torch.from_numpy(z)).sample.numpy()
        want32_onednn = vae.decode(torch.from_numpy(z)).sample.numpy()
        want64 = vae.double().decode(torch.from_numpy(z).double()).sample.numpy()
    got32 = dec(z)
    got64 = mdref.Decoder.from_pretrained(DEFAULT / "vae", dtype=np.float64)(z.astype(np.float64))
    # mdref's float32 against float64 ground truth, a fact about mdref on any kernel: the decoder's longest path has
    # L = 30 layers (convs, norms, the attention), each a sum of at most K = 9 * 64 = 576 products; a float32 sum
    # of K terms errs by about sqrt(K) u relative to its scale (rounding errors as a random walk, u = 2^-24), and
    # the layers' errors add in quadrature: sqrt(L K) u = 7.9e-6. The bound is twice that (1.6e-5); measured
    # 3.0-4.5e-6 under the five kernel configurations of benchmarks/kernel-spread.md.
    bound32 = 2 * math.sqrt(30 * 576) * U32
    print(f"torch f32 vs f64 {rel_err(want32, want64):.2e} native, {rel_err(want32_onednn, want64):.2e} oneDNN; "
          f"mdref f32 vs oneDNN {rel_err(got32, want32_onednn):.2e}")
    within("shipped decoder f64 vs torch f64", rel_err(got64, want64), 1e-12)
    within("shipped decoder f32 vs f64", rel_err(got32, want64), bound32)
    # PyTorch's float32 is held to the same bound against float64 (its rounding is as good as mdref's), so the two
    # float32 results are within twice it of each other (measured: up to 1.1e-5, with ATen's default capability).
    within("shipped decoder f32 vs torch native f32", rel_err(got32, want32), 2 * bound32)


# ---------------------------------------------------------------- (c) adherence of the shipped model
# Measured on 400 held-out samples (weights/README.md): 100% on every attribute; on these 48 samples 100% too.
# Chance is 1/8, 1/7, 1/5, 1/2, 1/3. The thresholds sit at the targets less the spread of 48 samples.
ADHERENCE_MIN = {"background": 0.95, "colour": 0.95, "position": 0.95, "size": 0.95, "shape": 0.9}


@needs_default
def test_shipped_model_adherence():
    mdref = pytest.importorskip("mdref")
    from benchmark_adherence import complete_prompts

    pipe = mdref.Pipeline.from_pretrained(DEFAULT)
    combos, prompts = complete_prompts(48, seed=5)
    px = pipe.run(prompts, seed=3).pixels
    acc, wrong = score(px, combos)
    print("adherence on 48 held-out prompts:", acc)
    for k, lo in ADHERENCE_MIN.items():
        assert acc[k] >= lo, (k, acc[k], wrong[:5])


# Open prompts (issue 20). Measured on exactly these 78 samples: clean 0.949, clean and keeping every named attribute
# 0.949 (the benchmark, weights/README.md: 0.961 and 0.9375 over 1,168). OPEN_KEPT_MIN is 3 binomial standard
# deviations (0.027 at 78 samples) below 0.949: a model that loses the open-prompt gain (runs/c1e, two models back: 0.70
# on the benchmark) fails.
OPEN_KEPT_MIN = 0.87


@needs_default
def test_shipped_model_keeps_named_attributes_on_open_prompts():
    """Prompts that leave attributes open, one per pattern of given attributes (31) at two seeds plus the four a
    new user types first at four seeds: the share of samples showing one clean shape that keeps every attribute the
    prompt names; and "a shape" over 16 seeds takes >= 3 values of every attribute that has >= 3."""
    mdref = pytest.importorskip("mdref")
    from benchmark_adherence import FIRST_PROMPTS, pattern_prompts
    from evaluate import ATTRS, evaluate

    pipe = mdref.Pipeline.from_pretrained(DEFAULT)
    specs = [s for s in pattern_prompts(per_pattern=1, seed=77) for _ in range(2)] + \
        [s for s in FIRST_PROMPTS for _ in range(4)]
    px = pipe.run([data.prompt(*s) for s in specs], seed=21).pixels
    rs = [evaluate(img) for img in px]
    kept = [r["clean"] and all(r[k] == v for k, v in zip(ATTRS, s) if v is not None) for r, s in zip(rs, specs)]
    print(f"open prompts: clean {np.mean([r['clean'] for r in rs]):.3f}, clean and keeps every named attribute "
          f"{np.mean(kept):.3f} over {len(specs)} samples")
    assert np.mean(kept) >= OPEN_KEPT_MIN, [(data.prompt(*s), {k: r[k] for k in ATTRS})
                                            for s, r, k in zip(specs, rs, kept) if not k][:6]
    distinct = _open_values("a shape", seed=22)
    print("'a shape' over 16 seeds, distinct values:", distinct)
    assert all(distinct[k] >= 3 for k in ["shape", "background", "position"]), distinct


def _open_values(prompt, seed):
    """How many distinct values each attribute takes over 16 seeds of the shipped model, among clean samples."""
    import mdref
    from evaluate import ATTRS, evaluate

    rs = [evaluate(img) for img in mdref.Pipeline.from_pretrained(DEFAULT).run([prompt] * 16, seed=seed).pixels]
    return {k: len({r[k] for r in rs if r["clean"]}) for k in ATTRS}


@needs_default
def test_shipped_model_varies_an_open_shape_colour():
    """Issue 20: an open shape colour varies with the noise (the previous model, runs/r20, drew red or purple
    whatever the noise: 1-2 colours here); with the background given as well as open."""
    for prompt in ["a shape", "a circle, white background", "a small square on the left"]:
        distinct = _open_values(prompt, seed=22)
        print(f"{prompt!r} over 16 seeds, distinct values:", distinct)
        assert distinct["colour"] >= 3, (prompt, distinct)
