"""Rotary position embedding over (B, L, 3) position ids, as in FLUX (one RoPE per id axis)."""

import torch
from torch import Tensor


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices (..., L, dim/2, 2, 2) for positions (..., L) on one axis."""
    # float64 on CPU/CUDA: positions up to ~128 times frequencies need the precision.
    dtype = torch.float32 if pos.device.type == "mps" else torch.float64
    omega = theta ** -(torch.arange(0, dim, 2, dtype=dtype, device=pos.device) / dim)
    angles = pos.to(dtype)[..., None] * omega  # (..., L, dim/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)).float()


def embed_ids(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """RoPE for ids (B, L, n_axes): (B, 1, L, head_dim/2, 2, 2), broadcast over heads."""
    return torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3)[:, None]


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate consecutive channel pairs of x (B, H, L, D) by pe (B, 1, L, D/2, 2, 2)."""
    pairs = x.float().unflatten(-1, (-1, 1, 2))  # (B, H, L, D/2, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]  # (B, H, L, D/2, 2)
    return out.flatten(-2).type_as(x)
