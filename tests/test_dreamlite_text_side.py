"""DreamLite's text side and sampler end to end against the installed diffusers pipelines, the UNet left out.

DreamLiteMobilePipeline (4 steps, no CFG) and DreamLitePipeline (negative prompt batch, guidance 3.5) run on a
random tiny Qwen3-VL text encoder, the test's Qwen tokenizer folder (tests/qwen_oracles.py), a real
FlowMatchEulerDiscreteScheduler with DreamLite's settings and a stand-in UNet: a small torch function of
everything the real UNet is given (the width-concatenated input, the timestep, the text features and their mask,
the time ids [w, h]); it mixes the two halves of the width, so the zeros of the in-context half count. mdref runs
the same chain from its own parts (QwenTokenizer.generate -> QwenTextEncoder -> qwen_text.prompt_embeddings ->
sampler.flow_shift_mu / flow_sigmas / sample_flow, apply_guidance) with a NumPy twin of the stand-in. The
pipelines take no latents=, so prepare_latents is patched to return the test's noise. Final latents compared:
float32 <= 1e-5 relative to max, float64 <= 1e-10 (oracle patched where it computes in float32 whatever the dtype:
Qwen's RMSNorm and RoPE cos / sin, and the scheduler step's float32 cast).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from qwen_oracles import float64_exact, qwen_tokenizer_folder, qwen_vl_model, rel_err  # noqa: E402
from test_flow_sampler import DREAMLITE, FLOAT64_STEP  # noqa: E402

from mdref import qwen_text  # noqa: E402
from mdref import sampler as S  # noqa: E402
from mdref.io import QwenTextEncoder  # noqa: E402
from mdref.io.scheduler_config import FlowMatchSchedulerConfig  # noqa: E402
from mdref.qwen_tokenizer import GENERATE_DROP, QwenTokenizer, generate_text  # noqa: E402

TOL = {np.float32: 1e-5, np.float64: 1e-10}
C, H, W = 4, 8, 8                   # latent channels and size: a 64 x 64 image with TAESD's factor 8
PROMPT = "a red cube on a blue table, studio light"


class StandIn(torch.nn.Module):
    """tanh(W x + P ctx + q time_ids / 1000 + a t / 1000 + 0.5 roll(x, width / 2)), ctx the masked mean of the text
    features: [B, C, h, 2w] -> [B, C, h, 2w]."""

    def __init__(self, D, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.Wc = torch.nn.Parameter(torch.randn(C, C, generator=g) * 0.3)
        self.P = torch.nn.Parameter(torch.randn(C, D, generator=g) / D ** 0.5)
        self.q = torch.nn.Parameter(torch.randn(C, 2, generator=g))
        self.a = torch.nn.Parameter(torch.randn(C, generator=g))

    @property
    def device(self):                   # what DiffusionPipeline.device asks each component
        return self.Wc.device

    @property
    def dtype(self):
        return self.Wc.dtype

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask, added_cond_kwargs,
                return_dict=False):
        m = encoder_attention_mask.to(sample.dtype)[..., None]
        ctx = (encoder_hidden_states * m).sum(1) / m.sum(1)                                        # [B, D]
        bias = ctx @ self.P.T + added_cond_kwargs["time_ids"] / 1000 @ self.q.T + (timestep / 1000)[:, None] * self.a
        h = torch.einsum("oc,bchw->bohw", self.Wc, sample) + bias[:, :, None, None]
        return (torch.tanh(h + 0.5 * torch.roll(sample, sample.shape[-1] // 2, dims=-1)),)

    def numpy(self, dtype):
        Wc, P, q, a = (p.detach().double().numpy().astype(dtype) for p in (self.Wc, self.P, self.q, self.a))

        def run(sample, t, context, mask, time_ids):
            m = mask.astype(dtype)[..., None]
            ctx = (context * m).sum(1) / m.sum(1)
            bias = ctx @ P.T + time_ids / dtype(1000) @ q.T + (t / dtype(1000))[:, None] * a
            h = np.einsum("oc,bchw->bohw", Wc, sample) + bias[:, :, None, None]
            return np.tanh(h + dtype(0.5) * np.roll(sample, sample.shape[-1] // 2, axis=-1))
        return run


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dreamlite")
    qwen_tokenizer_folder(root / "tokenizer")
    model = qwen_vl_model(seed=11)
    model.save_pretrained(root / "text_encoder")
    return root, model


def build(cls, parts, dtype):
    root, model = parts
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    vae = diffusers.AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                                    num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4, latent_channels=C)
    unet = StandIn(model.config.text_config.hidden_size)
    pipe = cls(text_encoder=model.to(torch_dtype), tokenizer=transformers.AutoTokenizer.from_pretrained(
        root / "tokenizer"), processor=None, vae=vae.to(torch_dtype), unet=unet.to(torch_dtype),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**DREAMLITE))
    return pipe, unet


def mdref_latents(parts, dtype, noise, unet, guidance=None, steps=4):
    root, _ = parts
    tok, te = QwenTokenizer.from_pretrained(root / "tokenizer"), QwenTextEncoder.from_pretrained(root / "text_encoder",
                                                                                                   dtype=dtype)
    user = [generate_text(PROMPT)] if guidance is None else ["", generate_text(PROMPT)]    # negative first, unprefixed
    ids, mask = tok.generate(user)
    context, context_mask = qwen_text.prompt_embeddings(te(ids, mask), mask, GENERATE_DROP)   # [B, L, D], [B, L]
    twin, B = unet.numpy(dtype), len(user)
    time_ids = np.tile(np.array([[W * 8, H * 8]], dtype), (B, 1))                          # [w, h] of the image

    def model(x, t):
        x_in = np.concatenate([np.repeat(x, B, 0), np.zeros((B, *x.shape[1:]), dtype)], axis=3)   # [B, C, h, 2w]
        out = twin(x_in, np.full(B, t, dtype), context, context_mask, time_ids)[..., :x.shape[-1]]
        return out if guidance is None else S.apply_guidance(out[:1], out[1:], guidance)

    cfg = FlowMatchSchedulerConfig(**DREAMLITE)
    mu = S.flow_shift_mu(H * W // 4, cfg)                           # the latent's tokens before the width concat
    return S.sample_flow(model, noise[None].astype(dtype), cfg, S.flow_sigmas(cfg, steps, mu), dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["mobile", "base"])
def test_latents_match_the_pipeline(parts, kind, dtype, monkeypatch):
    from diffusers.pipelines.dreamlite import DreamLiteMobilePipeline, DreamLitePipeline
    if dtype == np.float64:
        float64_exact(monkeypatch)
        monkeypatch.setattr(diffusers.FlowMatchEulerDiscreteScheduler, "step", FLOAT64_STEP)
    cls = DreamLiteMobilePipeline if kind == "mobile" else DreamLitePipeline
    pipe, unet = build(cls, parts, dtype)
    noise = np.random.default_rng(1).standard_normal((1, C, H, W)).astype(dtype)
    monkeypatch.setattr(pipe, "prepare_latents", lambda *a, **k: torch.from_numpy(noise.copy()))
    kwargs = dict(height=H * 8, width=W * 8, num_inference_steps=4, output_type="latent")
    if kind == "base":
        kwargs.update(guidance_scale=3.5)
    ref = pipe(PROMPT, **kwargs).images.numpy()
    ours = mdref_latents(parts, dtype, noise, unet, guidance=3.5 if kind == "base" else None)
    err = rel_err(ours, ref)
    print(f"\n[dreamlite text side] {kind} {np.dtype(dtype).name}: latents max rel err {err:.3e}")
    assert ours.dtype == dtype and ours.shape == ref.shape and err <= TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_prompt_embeds_and_mask_match_encode_prompt(parts, dtype, monkeypatch):
    """encode_prompt(mode='generate') on the base pipeline's padded batch [negative '', prompt]: the UNet's text
    features [2, L, D] and encoder_attention_mask [2, L]."""
    from diffusers.pipelines.dreamlite import DreamLitePipeline
    if dtype == np.float64:
        float64_exact(monkeypatch)
    pipe, _ = build(DreamLitePipeline, parts, dtype)
    prompts = ["", generate_text(PROMPT)]
    ref, ref_mask = pipe.encode_prompt(mode="generate", prompts=prompts, device="cpu", dtype=pipe.text_encoder.dtype,
                                       max_sequence_length=200)
    root, _ = parts
    ids, mask = QwenTokenizer.from_pretrained(root / "tokenizer").generate(prompts)
    te = QwenTextEncoder.from_pretrained(root / "text_encoder", dtype=dtype)
    ours, ours_mask = qwen_text.prompt_embeddings(te(ids, mask), mask, GENERATE_DROP)
    assert np.array_equal(ours_mask, ref_mask.numpy()) and ours_mask[0].sum() == 5        # '' -> the template tail
    assert rel_err(ours, ref.detach().numpy()) <= TOL[dtype]
