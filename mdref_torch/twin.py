"""PyTorch twin of the MobileDiffusion UNet as docs/mobilediffusion_unet.md lays it out.

Plain nn.Modules whose state_dict keys are exactly the spec's weight keys (diffusers names, plus the mdref
extensions `to_kv` and `conv{1,2}.{depthwise,pointwise}`), built from the same config dict that mdref's
UNetConfig reads (diffusers UNet2DConditionModel keys + mdref extensions). Used to train the embedded default
model (recipe/train.py), as the oracle for MobileDiffusion-only layers (diffusers has no shared K/V, SwiGLU,
separable convs, cross-only blocks or ReLU attention), and as the UNet `mdref export` exports (mdref_torch.build).

    unet = TwinUNet(config_dict)
    out = unet(sample [B, Cin, H, W], timestep (scalar or [B]), context [B, T, cross_attention_dim])
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding

__all__ = ["TwinUNet", "resolve_config", "DEFAULTS"]

# diffusers UNet2DConditionModel defaults for the keys the spec uses, plus the mdref extensions' defaults.
DEFAULTS = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    # mdref extensions
    "transformer_kind": None,
    "mid_transformer_layers": None,
    "shared_kv": False,
    "attention_weighting": "softmax",
    "ff_activation": "geglu",
    "ff_mult": 4,
    "separable_conv": None,
    "prediction_type": "epsilon",
}

TRANSFORMER_NORM_EPS = 1e-6  # Transformer2DModel input GroupNorm
LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock LayerNorms


def _per_level(value, n, name):
    """Broadcast an int/bool config value to one entry per level."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"config {name}: expected {n} entries, found {len(value)}")
        return list(value)
    return [value] * n


def resolve_config(config):
    """Fill defaults and broadcast per-level values; returns a new dict (unknown keys starting '_' ignored)."""
    cfg = dict(DEFAULTS)
    for k, v in config.items():
        if k.startswith("_"):
            continue
        cfg[k] = v
    n = len(cfg["block_out_channels"])
    cfg["layers_per_block"] = _per_level(cfg["layers_per_block"], n, "layers_per_block")
    cfg["transformer_layers_per_block"] = _per_level(cfg["transformer_layers_per_block"], n,
                                                     "transformer_layers_per_block")
    cfg["attention_head_dim"] = _per_level(cfg["attention_head_dim"], n, "attention_head_dim")
    if any(_per_level(cfg["only_cross_attention"], n, "only_cross_attention")):
        raise ValueError("config only_cross_attention: use transformer_kind 'cross' instead")
    if cfg["transformer_kind"] is None:
        cfg["transformer_kind"] = ["full" if t.startswith("CrossAttn") else "none" for t in cfg["down_block_types"]]
    cfg["transformer_kind"] = _per_level(cfg["transformer_kind"], n, "transformer_kind")
    if cfg["separable_conv"] is None:
        cfg["separable_conv"] = False
    cfg["separable_conv"] = _per_level(cfg["separable_conv"], n, "separable_conv")
    if cfg["mid_transformer_layers"] is None:
        cfg["mid_transformer_layers"] = cfg["transformer_layers_per_block"][-1]
    if cfg["act_fn"] != "silu" or cfg["resnet_time_scale_shift"] != "default" or cfg["mid_block_scale_factor"] != 1:
        raise ValueError("config: only act_fn silu, resnet_time_scale_shift default, mid_block_scale_factor 1")
    return cfg


class SeparableConv(nn.Module):
    """Depthwise 3x3 + pointwise 1x1 (MobileDiffusion's separable ResNet conv)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin)
        self.pointwise = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


def _conv3(cin, cout, separable):
    return SeparableConv(cin, cout) if separable else nn.Conv2d(cin, cout, 3, padding=1)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D (time_embedding_norm 'default', output_scale_factor 1)."""

    def __init__(self, cin, cout, temb, groups, eps, separable):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = _conv3(cin, cout, separable)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = _conv3(cout, cout, separable)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Multi-head attention with diffusers names; shared_kv: one to_kv gives K = V."""

    def __init__(self, dim, kv_dim, heads, shared_kv, weighting):
        super().__init__()
        self.heads, self.weighting, self.shared_kv = heads, weighting, shared_kv
        self.to_q = nn.Linear(dim, dim, bias=False)
        if shared_kv:
            self.to_kv = nn.Linear(kv_dim, dim, bias=False)
        else:
            self.to_k = nn.Linear(kv_dim, dim, bias=False)
            self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x, context=None):
        context = x if context is None else context
        B, N, C = x.shape
        h = self.heads
        q = self.to_q(x)
        if self.shared_kv:
            k = v = self.to_kv(context)
        else:
            k, v = self.to_k(context), self.to_v(context)
        q = q.view(B, N, h, C // h).transpose(1, 2)  # [B, h, N, d]
        k = k.view(B, -1, h, C // h).transpose(1, 2)  # [B, h, M, d]
        v = v.view(B, -1, h, C // h).transpose(1, 2)  # [B, h, M, d]
        s = q @ k.transpose(-1, -2) / math.sqrt(C // h)  # [B, h, N, M]
        if self.weighting == "softmax":
            w = s.softmax(-1)
        else:
            w = F.relu(s) / s.shape[-1]
        o = (w @ v).transpose(1, 2).reshape(B, N, C)  # [B, N, C]
        return self.to_out[0](o)


class GatedProj(nn.Module):
    """ff.net.0: fused projection C -> 2*inner, split (h, gate), h * act(gate)."""

    def __init__(self, dim, inner, activation):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)
        self.activation = activation

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * (F.silu(gate) if self.activation == "swiglu" else F.gelu(gate))


class FeedForward(nn.Module):
    def __init__(self, dim, mult, activation):
        super().__init__()
        self.net = nn.ModuleList([GatedProj(dim, mult * dim, activation), nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Full block: self-attn, cross-attn, FFN. Cross-only block: no norm1/attn1."""

    def __init__(self, dim, ctx_dim, heads, kind, cfg):
        super().__init__()
        self.kind = kind
        if kind == "full":
            self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
            self.attn1 = Attention(dim, dim, heads, cfg["shared_kv"], cfg["attention_weighting"])
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn2 = Attention(dim, ctx_dim, heads, cfg["shared_kv"], cfg["attention_weighting"])
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = FeedForward(dim, cfg["ff_mult"], cfg["ff_activation"])

    def forward(self, x, context):
        if self.kind == "full":
            x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """diffusers Transformer2DModel (continuous input): GN -> proj_in -> blocks -> proj_out -> + residual."""

    def __init__(self, dim, ctx_dim, heads, layers, kind, cfg):
        super().__init__()
        self.linear = cfg["use_linear_projection"]
        self.norm = nn.GroupNorm(cfg["norm_num_groups"], dim, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Linear(dim, dim) if self.linear else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(dim, ctx_dim, heads, kind, cfg) for _ in range(layers)])
        self.proj_out = nn.Linear(dim, dim) if self.linear else nn.Conv2d(dim, dim, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # [B, HW, C]
        if self.linear:
            h = self.proj_in(h)
        for blk in self.transformer_blocks:
            h = blk(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # [B, C, H, W]
        if not self.linear:
            h = self.proj_out(h)
        return h + x


class Downsample2D(nn.Module):
    def __init__(self, c, padding):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """DownBlock2D / CrossAttnDownBlock2D: (resnet [, transformer]) x layers, then optional downsampler."""

    def __init__(self, cin, cout, temb, level, add_down, cfg):
        super().__init__()
        kind, n = cfg["transformer_kind"][level], cfg["layers_per_block"][level]
        sep, g, eps = cfg["separable_conv"][level], cfg["norm_num_groups"], cfg["norm_eps"]
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if j == 0 else cout, cout, temb, g, eps, sep) for j in range(n)])
        if kind != "none":
            self.attentions = nn.ModuleList([
                Transformer2DModel(cout, cfg["cross_attention_dim"], cfg["attention_head_dim"][level],
                                   cfg["transformer_layers_per_block"][level], kind, cfg) for _ in range(n)])
        else:
            self.attentions = None
        self.downsamplers = nn.ModuleList([Downsample2D(cout, cfg["downsample_padding"])]) if add_down else None

    def forward(self, x, temb, context):
        skips = []
        for j, res in enumerate(self.resnets):
            x = res(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """UpBlock2D / CrossAttnUpBlock2D: (concat skip, resnet [, transformer]) x (layers+1), optional upsampler."""

    def __init__(self, prev_c, cout, in_c, temb, level, add_up, cfg):
        super().__init__()
        kind, n = cfg["transformer_kind"][level], cfg["layers_per_block"][level] + 1
        sep, g, eps = cfg["separable_conv"][level], cfg["norm_num_groups"], cfg["norm_eps"]
        res = []
        for j in range(n):
            skip_c = in_c if j == n - 1 else cout
            res_in = prev_c if j == 0 else cout
            res.append(ResnetBlock2D(res_in + skip_c, cout, temb, g, eps, sep))
        self.resnets = nn.ModuleList(res)
        if kind != "none":
            self.attentions = nn.ModuleList([
                Transformer2DModel(cout, cfg["cross_attention_dim"], cfg["attention_head_dim"][level],
                                   cfg["transformer_layers_per_block"][level], kind, cfg) for _ in range(n)])
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if add_up else None

    def forward(self, x, skips, temb, context):
        for j, res in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # [B, C + Cskip, H, W]
            x = res(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, Transformer2DModel (full blocks), resnet."""

    def __init__(self, c, temb, cfg):
        super().__init__()
        sep, g, eps = cfg["separable_conv"][-1], cfg["norm_num_groups"], cfg["norm_eps"]
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, temb, g, eps, sep) for _ in range(2)])
        self.attentions = nn.ModuleList([
            Transformer2DModel(c, cfg["cross_attention_dim"], cfg["attention_head_dim"][-1],
                               cfg["mid_transformer_layers"], "full", cfg)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class TimestepEmbedding(nn.Module):
    def __init__(self, c0, temb):
        super().__init__()
        self.linear_1 = nn.Linear(c0, temb)
        self.linear_2 = nn.Linear(temb, temb)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TwinUNet(nn.Module):
    """MobileDiffusion UNet (diffusers UNet2DConditionModel forward + mdref extensions)."""

    def __init__(self, config):
        super().__init__()
        cfg = resolve_config(config)
        self.config = dict(config)
        self.cfg = cfg
        ch = cfg["block_out_channels"]
        n = len(ch)
        temb = 4 * ch[0]
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList()
        cout = ch[0]
        for i in range(n):
            cin, cout = cout, ch[i]
            self.down_blocks.append(DownBlock(cin, cout, temb, i, i < n - 1, cfg))
        self.mid_block = MidBlock(ch[-1], temb, cfg) if cfg["mid_block_type"] else None
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(ch))
        cout = rev[0]
        for i in range(n):
            prev, cout = cout, rev[i]
            in_c = rev[min(i + 1, n - 1)]
            self.up_blocks.append(UpBlock(prev, cout, in_c, temb, n - 1 - i, i < n - 1, cfg))
        self.conv_norm_out = nn.GroupNorm(cfg["norm_num_groups"], ch[0], eps=cfg["norm_eps"])
        self.conv_out = nn.Conv2d(ch[0], cfg["out_channels"], 3, padding=1)

    def forward(self, sample, timestep, context):
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)
        t_emb = get_timestep_embedding(t, self.cfg["block_out_channels"][0], flip_sin_to_cos=self.cfg["flip_sin_to_cos"],
                                       downscale_freq_shift=self.cfg["freq_shift"]).to(sample.dtype)
        emb = self.time_embedding(t_emb)  # [B, 4*C0]
        x = self.conv_in(sample)  # [B, C0, H, W]
        skips = [x]
        for blk in self.down_blocks:
            x, s = blk(x, emb, context)
            skips.extend(s)
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context)
        for blk in self.up_blocks:
            n = len(blk.resnets)
            x = blk(x, skips[-n:], emb, context)
            del skips[-n:]
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # [B, Cout, H, W]


def tiny_md_config(**over):
    """A small MobileDiffusion-style config (used by the self-check and tests)."""
    cfg = {
        "sample_size": 8, "in_channels": 8, "out_channels": 8,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [16, 32, 32], "layers_per_block": 1, "transformer_layers_per_block": [0, 1, 1],
        "norm_num_groups": 8, "cross_attention_dim": 24, "attention_head_dim": [1, 2, 2],
        "use_linear_projection": True,
        "transformer_kind": ["none", "cross", "full"], "mid_transformer_layers": 1, "shared_kv": True,
        "attention_weighting": "softmax", "ff_activation": "swiglu", "ff_mult": 3,
        "separable_conv": [False, True, True], "prediction_type": "sample",
    }
    cfg.update(over)
    return cfg


if __name__ == "__main__":
    torch.manual_seed(0)
    net = TwinUNet(tiny_md_config())
    out = net(torch.randn(2, 8, 8, 8), 999, torch.randn(2, 5, 24))
    print(out.shape, sum(p.numel() for p in net.parameters()))
    for k, v in net.state_dict().items():
        print(k, tuple(v.shape))
