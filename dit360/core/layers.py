"""FLUX building blocks with BFL's parameter names (black-forest-labs/flux `modules/layers.py`).
Shapes: B batch, L tokens, D hidden, H heads, d head dim."""

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .rope import apply_rope

# f(q, k, v) -> new (q, k, v) (B, H, L, d) [txt | img] before attention (editing's token
# replacement); new tensors, as a single block writes over v after attention.
QKVHook = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """PyTorch's attention (B, H, L, d) -> (B, L, H, d), a view: its kernels lay it out so."""
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


attend = sdpa  # what `attention` calls; the runtime sets it (dit360.speed.kernels), never the model


def attention(qkv: list[Tensor], pe: Tensor, out: Tensor | None = None) -> Tensor:
    """RoPE attention, [q, k, v] (B, H, L, d) -> (B, L, H*d) into `out`; empties the list."""
    q, k, v = qkv
    qkv.clear()
    q = apply_rope(q, pe)
    k = apply_rope(k, pe)
    x = attend(q, k, v)  # (B, L, H, d)
    del q, k, v
    # Flattening the heads is a view (see `sdpa`); writing into `out` the only copy.
    return x.flatten(2) if out is None else out.unflatten(-1, x.shape[-2:]).copy_(x).flatten(2)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000, factor: float = 1000):
    """Sinusoidal embedding (B, dim) of times t (B,) in [0, 1], [cos | sin] halves."""
    # FLUX was trained with t in [0, 1000]: the factor maps our sigma in [0, 1] onto that range.
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = (factor * t).float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t.dtype) if t.is_floating_point() else emb


def embedder(in_dim: int, hidden: int) -> nn.Sequential:
    """Linear - SiLU - Linear, used for time, guidance and the pooled text vector."""
    layers = OrderedDict(in_layer=nn.Linear(in_dim, hidden), silu=nn.SiLU())
    layers["out_layer"] = nn.Linear(hidden, hidden)
    return nn.Sequential(layers)


class RMSNorm(nn.Module):
    """RMS norm (computed in float32) with a learned `scale`."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # One fused float32 pass, bit-identical to the reference's x.float() * rsqrt(...) (tested)
        return F.rms_norm(x, x.shape[-1:], eps=1e-6) * self.scale


def qk_norm(dim: int) -> nn.ModuleDict:
    """RMS norms of the queries and the keys per head."""
    return nn.ModuleDict(dict(query_norm=RMSNorm(dim), key_norm=RMSNorm(dim)))


class SelfAttention(nn.Module):
    """Fused qkv projection, QK norm and output projection of one stream."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = qk_norm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


def heads(qkv: Tensor, num_heads: int, norm: nn.ModuleDict) -> list[Tensor]:
    """Fused q | k | v (B, L, 3D) -> normalised q, k and v (B, H, L, d), v a view."""
    q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=num_heads)
    return [norm["query_norm"](q).to(v), norm["key_norm"](k).to(v), v]


def hooked(block: nn.Module, qkv: list[Tensor]) -> list[Tensor]:
    """q, k, v through the block's `qkv_hook`, if it has one."""
    return qkv if block.qkv_hook is None else list(block.qkv_hook(*qkv))


def modulation(dim: int, double: bool) -> nn.Sequential:
    """adaLN: vec (B, D) -> the raw modulation (B, 6D) if double, else (B, 3D); see `chunks`."""
    lin = nn.Linear(dim, (6 if double else 3) * dim)
    return nn.Sequential(OrderedDict(silu=nn.SiLU(), lin=lin))


def chunks(mod: Tensor, n: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """A raw modulation (B, 3nD) as n (shift, scale, gate) triples, each (B, 1, D)."""
    out = mod[:, None, :].chunk(3 * n, dim=-1)
    return [out[i : i + 3] for i in range(0, 3 * n, 3)]


def fma(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """x + a * b: in bf16 and fp16 one fused pass, rounded once (the reference: twice)."""
    # parity: float32 in the reference's two passes, bit for bit (addcmul's would differ)
    return x + a * b if x.dtype == torch.float32 else torch.addcmul(x, a, b)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Parameter-free LayerNorm then adaLN scale and shift."""
    return fma(shift, 1 + scale, F.layer_norm(x, x.shape[-1:], eps=1e-6))


def fp16_clip(x: Tensor) -> Tensor:
    """Clamp float16 activations to the finite range (where diffusers clips: FLUX overflows)."""
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
            setattr(self, f"{s}_mod", modulation(dim, double=True))
            setattr(self, f"{s}_attn", SelfAttention(dim, num_heads, qkv_bias))
            setattr(self, f"{s}_mlp", mlp(dim, mlp_hidden))

    def joint_qkv(self, img: Tensor, txt: Tensor, img_mod: tuple, txt_mod: tuple) -> list[Tensor]:
        """q, k, v (B, H, L_txt + L_img, d) of both streams, [txt | img] along L."""
        a, b = self.img_attn, self.txt_attn
        img_qkv = heads(a.qkv(modulate(img, *img_mod[:2])), a.num_heads, a.norm)
        txt_qkv = heads(b.qkv(modulate(txt, *txt_mod[:2])), b.num_heads, b.norm)
        return hooked(self, [torch.cat(p, dim=2) for p in zip(txt_qkv, img_qkv, strict=True)])

    def forward(
        self, img: Tensor, txt: Tensor, vec: Tensor | None, pe: Tensor, mods: Sequence = (None,) * 2
    ) -> tuple[Tensor, Tensor]:
        """vec (B, D), or its img and txt modulations (B, 6D) computed ahead: mods."""
        # Computed here, not by the caller: FSDP gathers a block's weights for its forward only.
        pairs = zip(mods, (self.img_mod, self.txt_mod), strict=True)
        mods = [m if m is not None else f(vec) for m, f in pairs]
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = chunks(mods[0], 2), chunks(mods[1], 2)
        attn = attention(self.joint_qkv(img, txt, img_mod1, txt_mod1), pe)  # (B, L, D)
        img = fma(img, img_mod1[2], self.img_attn.proj(attn[:, txt.shape[1] :]))
        txt = fma(txt, txt_mod1[2], self.txt_attn.proj(attn[:, : txt.shape[1]]))
        del attn
        img = fma(img, img_mod2[2], self.img_mlp(modulate(img, *img_mod2[:2])))
        txt = fma(txt, txt_mod2[2], self.txt_mlp(modulate(txt, *txt_mod2[:2])))
        return img, fp16_clip(txt)


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence: fused `linear1` in, fused `linear2` out."""

    qkv_hook: QKVHook | None = None  # see QKVHook; the MLP half of linear1 never sees it

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.num_heads, self.dim = num_heads, dim
        self.linear1 = nn.Linear(dim, dim * 3 + mlp_hidden)  # rows: q | k | v | mlp
        self.linear2 = nn.Linear(dim + mlp_hidden, dim)  # cols: attention | mlp
        self.norm = qk_norm(dim // num_heads)
        self.modulation = modulation(dim, double=False)

    def qkv_mlp(self, x: Tensor, shift: Tensor, scale: Tensor) -> tuple[list[Tensor], Tensor]:
        """Normalised q, k, v (B, H, L, d) and the `linear1` output (B, L, 3D + mlp_hidden)."""
        h = self.linear1(modulate(x, shift, scale))
        return hooked(self, heads(h[..., : 3 * self.dim], self.num_heads, self.norm)), h

    def forward(
        self, x: Tensor, vec: Tensor | None, pe: Tensor, mod: Tensor | None = None
    ) -> Tensor:
        """vec (B, D), or its modulation (B, 3D) computed ahead: mod."""
        ((shift, scale, gate),) = chunks(self.modulation(vec) if mod is None else mod, 1)
        qkv, h = self.qkv_mlp(x, shift, scale)
        d = self.dim
        if torch.is_grad_enabled():  # autograd needs h unchanged: concatenate
            mlp_out = F.gelu(h[..., 3 * d :], approximate="tanh")
            out = torch.cat((attention(qkv, pe), mlp_out), dim=2)  # (B, L, D + mlp_hidden)
            del mlp_out
        else:  # in place: v's columns of h take attention's output, the MLP's its activation
            out = h[..., 2 * d :]  # (B, L, D + mlp_hidden), v until attention has read it
            torch.ops.aten.gelu_(out[..., d:], approximate="tanh")
            attention(qkv, pe, out=out[..., :d])
        del h
        return fp16_clip(fma(x, gate, self.linear2(out)))


class LastLayer(nn.Module):
    """Final adaLN (stored as [shift; scale]) and projection to the output channels."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor | None, mod: Tensor | None = None) -> Tensor:
        mod = self.adaLN_modulation(vec) if mod is None else mod
        shift, scale = mod[:, None].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))
