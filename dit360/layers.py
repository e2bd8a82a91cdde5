"""FLUX building blocks: embedders, QK-RMSNorm, adaLN modulation, double/single stream blocks.

Parameter names follow black-forest-labs/flux (`src/flux/modules/layers.py`) so the original
checkpoint loads with strict names. Shapes: B batch, L tokens, D hidden, H heads, d head dim.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .rope import apply_rope

# f(q, k, v) -> (q, k, v) on the joint [txt | img] heads (B, H, L, d), image tokens last, called
# right before attention; set from outside (dit360.editing's token replacement), never by the model.
QKVHook = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Joint attention with RoPE: q, k, v (B, H, L, d) -> (B, L, H*d)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return rearrange(x, "b h l d -> b l (h d)")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000, factor: float = 1000):
    """Sinusoidal embedding (B, dim) of times t (B,) in [0, 1], [cos | sin] halves."""
    # FLUX was trained with t in [0, 1000]: the factor maps our sigma in [0, 1] onto that range.
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = (factor * t).float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t.dtype) if t.is_floating_point() else emb


class MLPEmbedder(nn.Module):
    """Linear - SiLU - Linear, used for time, guidance and the pooled text vector."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm in float32 with a learned `scale`."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return xf.to(x.dtype) * self.scale


class QKNorm(nn.Module):
    """RMS-normalise queries and keys per head."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Fused qkv projection, QK norm and output projection of one stream."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project x (B, L, D) to normalised q, k and v, each (B, H, L, d)."""
        qkv = rearrange(self.qkv(x), "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        q, k = self.norm(qkv[0], qkv[1], qkv[2])
        return q, k, qkv[2]


class Modulation(nn.Module):
    """adaLN: vec (B, D) -> chunks of (shift, scale, gate), each (B, 1, D); two sets if double."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return [out[i : i + 3] for i in range(0, self.multiplier, 3)]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Parameter-free LayerNorm then adaLN scale and shift."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift


def fp16_clip(x: Tensor) -> Tensor:
    """Clamp float16 activations to the finite range: FLUX's text stream and single blocks
    overflow float16 (the reference runs in float16; diffusers clips at the same two places)."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def mlp(dim: int, hidden: int) -> nn.Sequential:
    """The FLUX feed-forward: Linear - GELU(tanh) - Linear (indices 0 and 2 hold weights)."""
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
    )


class DoubleStreamBlock(nn.Module):
    """Separate image and text weights, one joint attention over [txt | img] tokens."""

    qkv_hook: QKVHook | None = None  # see QKVHook; None costs nothing

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool):
        super().__init__()
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(dim, double=True))
            setattr(self, f"{s}_attn", SelfAttention(dim, num_heads, qkv_bias))
            setattr(self, f"{s}_mlp", mlp(dim, mlp_hidden))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        (img_shift1, img_scale1, img_gate1), img_mod2 = self.img_mod(vec)
        (txt_shift1, txt_scale1, txt_gate1), txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, txt_shift1, txt_scale1))
        # Joint attention over [txt | img] along L; pe holds the ids in the same order.
        q, k, v = (torch.cat(p, dim=2) for p in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        if self.qkv_hook is not None:
            q, k, v = self.qkv_hook(q, k, v)
        attn = attention(q, k, v, pe)  # (B, L_txt + L_img, D)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_mod2[2] * self.img_mlp(modulate(img, img_mod2[0], img_mod2[1]))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2[2] * self.txt_mlp(modulate(txt, txt_mod2[0], txt_mod2[1]))
        return img, fp16_clip(txt)


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence: fused `linear1` in, fused `linear2` out."""

    qkv_hook: QKVHook | None = None  # see QKVHook; the MLP half of linear1 never sees it

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.num_heads, self.dim = num_heads, dim
        self.linear1 = nn.Linear(dim, dim * 3 + mlp_hidden)  # rows: q | k | v | mlp
        self.linear2 = nn.Linear(dim + mlp_hidden, dim)  # cols: attention | mlp
        self.norm = QKNorm(dim // num_heads)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        ((shift, scale, gate),) = self.modulation(vec)
        qkv, hidden = self.linear1(modulate(x, shift, scale)).split(
            [3 * self.dim, self.linear1.out_features - 3 * self.dim], dim=-1
        )
        q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        if self.qkv_hook is not None:
            q, k, v = self.qkv_hook(q, k, v)
        attn = attention(q, k, v, pe)  # (B, L, D)
        out = self.linear2(torch.cat((attn, F.gelu(hidden, approximate="tanh")), dim=2))
        return fp16_clip(x + gate * out)


class LastLayer(nn.Module):
    """Final adaLN (stored as [shift; scale]) and projection to the output channels."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(modulate(x, shift[:, None], scale[:, None]))
