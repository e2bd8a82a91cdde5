"""Rotary position embedding over (B, L, 3) position ids, as in FLUX (one RoPE per id axis): a
channel pair rotated as the complex product (x0 + i x1) e^(ia), bit-identical to the reference's."""

import torch
from torch import Tensor


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """[cos, sin] (..., L, dim/2, 2) float32 of the angles of positions (..., L) on one axis."""
    # float64 on CPU/CUDA: positions up to ~128 times frequencies need the precision.
    dtype = torch.float32 if pos.device.type == "mps" else torch.float64
    omega = theta ** -(torch.arange(0, dim, 2, dtype=dtype, device=pos.device) / dim)
    angles = pos.to(dtype)[..., None] * omega  # (..., L, dim/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def embed_ids(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """RoPE for ids (B, L, n_axes): [cos, sin] (B, 1, L, head_dim/2, 2), broadcast over heads."""
    return torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-2)[:, None]


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate consecutive channel pairs of x (B, H, L, D) by pe (B, 1, L, D/2, 2), in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, L, D/2, 2)
    if torch.compiler.is_compiling():
        # Inductor has no complex kernels; real arithmetic fuses into one pass there.
        (x0, x1), (cos, sin) = pairs.unbind(-1), pe.unbind(-1)
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        # Eager: one complex multiply, 3.5x faster on CPU; pairs adjacent, at even offsets.
        strides = (*pairs.stride()[:-1], pairs.storage_offset())
        even = pairs.stride(-1) == 1 and all(s % 2 == 0 for s in strides)
        pairs = pairs if even else pairs.clone(memory_format=torch.contiguous_format)
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(pe))
    return out.flatten(-2).type_as(x)
