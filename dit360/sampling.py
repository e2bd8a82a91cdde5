"""Sampling: seeded noise, the shifted schedule, `predict()` (the one owner of the panoramic
wrap) and the Euler `denoise` loop.

Time convention, everywhere in dit360: t = 1 is noise, t = 0 is data,
x_t = (1 - t) * x0 + t * noise, and the model predicts the velocity v = noise - x0.
Reference conventions (diffusers FluxPipeline, DiT360 `src/pipeline.py`): sigmas
linspace(1, 1/N, N) time-shifted with mu from the (padded) token count, a final 0 appended;
Euler updates in float32, latents stored in the model dtype between steps.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .model import Flux
from .panorama import image_ids, wrap_crop, wrap_pad

# The shift grows linearly with the token count through (256, 0.5) and (4096, 1.15) (FLUX.1).
BASE_SEQ, BASE_SHIFT, MAX_SEQ, MAX_SHIFT = 256, 0.5, 4096, 1.15


@dataclass(frozen=True)
class Grid:
    """A packed token grid of h x w tokens with `pad` wrapped columns on each side."""

    h: int
    w: int
    pad: int = 1

    @property
    def tokens(self) -> int:
        return self.h * (self.w + 2 * self.pad)

    @classmethod
    def for_image(cls, height: int, width: int, pad: int = 1) -> "Grid":
        """The grid of a height x width image: VAE x8, then 2x2 packing."""
        if height % 16 or width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")
        return cls(height // 16, width // 16, pad)


def noise(
    seed: int,
    batch: int,
    height: int,
    width: int,
    channels: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Seeded latent noise (B, C, 2*(H//16), 2*(W//16)) drawn by a generator on `device`.

    The default (CPU, float32) is the same on every machine; DiT360's inference.py draws on its
    GPU in the model dtype, which `device`/`dtype` reproduce.
    """
    gen = torch.Generator(device).manual_seed(seed)
    shape = (batch, channels, 2 * (height // 16), 2 * (width // 16))
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def shift_mu(seq_len: int) -> float:
    """The schedule shift mu for a sequence of `seq_len` image tokens (extrapolated past 4096)."""
    m = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ - BASE_SEQ)
    return seq_len * m + (BASE_SHIFT - m * BASE_SEQ)


def time_shift(mu: float, t: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """Shift times toward noise: e^mu / (e^mu + (1/t - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def schedule(steps: int, seq_len: int) -> Tensor:
    """Sigmas (steps + 1,) float32 from 1 toward 0, shifted for `seq_len` tokens, ending at 0."""
    # In numpy float32, as the reference scheduler computes it, so the values agree bit for bit
    # (torch rounds the scalar division differently: the first sigma would be 1 - 6e-8).
    t = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    return torch.cat([torch.from_numpy(time_shift(shift_mu(seq_len), t)), torch.zeros(1)])


@dataclass
class Conditioning:
    """Text conditioning: T5 tokens (B, L, 4096), their ids (B, L, 3), CLIP pooled (B, 768)."""

    txt: Tensor
    txt_ids: Tensor
    vec: Tensor


def predict(
    model: Flux,
    x: Tensor,
    grid: Grid,
    cond: Conditioning,
    t: float | Tensor,
    guidance: float | None,
    resync: bool = False,
) -> Tensor:
    """Velocity (B, grid.tokens, C) for tokens x (B, grid.tokens, C) that carry the wrap padding.

    Image ids follow the padding: a pad column has the id of the column it copies. With `resync`
    the pad columns are first copied again from the opposite edge.
    """
    b, dtype = x.shape[0], x.dtype
    if resync and grid.pad:
        x = wrap_pad(wrap_crop(x, grid.h, grid.w, grid.pad), grid.h, grid.w, grid.pad)
    ids = image_ids(grid.h, grid.w, grid.pad, batch=b, device=x.device).to(dtype)
    # The reference feeds t*1000 rounded to the model dtype, divided back: keep that rounding.
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(b)
    t = (t * 1000).to(dtype) / 1000
    g = None if guidance is None else torch.full((b,), guidance, device=x.device)
    txt = cond.txt.to(x.device, dtype)
    return model(x, ids, txt, cond.txt_ids.to(x.device, dtype), t, cond.vec.to(x.device, dtype), g)


def denoise(
    model: Flux,
    x: Tensor,
    grid: Grid,
    cond: Conditioning,
    sigmas: Tensor,
    guidance: float | None,
    resync: bool = False,
    progress: bool = True,
) -> Tensor:
    """Integrate the flow from sigmas[0] to sigmas[-1] with Euler steps; x is padded tokens."""
    sigmas = sigmas.to(x.device)
    for i in tqdm(range(len(sigmas) - 1), desc="denoise", disable=not progress):
        v = predict(model, x, grid, cond, sigmas[i], guidance, resync)
        # Update in float32, store in the model dtype (as the reference scheduler does).
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v).to(x.dtype)
    return x
