"""Sampling: noise, the shifted schedule, `predict` (the one caller of the model, wrap included),
the Euler `step` and `denoise`, as diffusers' FluxPipeline and DiT360's `src/pipeline.py`.

Time convention, everywhere in dit360: t = 1 is noise, t = 0 is data,
x_t = (1 - t) * x0 + t * noise, and the model predicts the velocity v = noise - x0."""

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .grid import Grid
from .model import Flux

# The loops' seams for the runtime: `progress(steps, name)` yields the steps (a progress bar);
# `ahead(cond, times, guidance)` returns cond with the modulations at those times.
Progress = Callable[[range, str], Iterable[int]]
Ahead = Callable[["Conditioning", Sequence[float | Tensor], float | None], "Conditioning"]


def quiet(steps: range, name: str) -> range:
    """No progress report."""
    return steps


def per_step(cond: "Conditioning", times: Sequence, guidance: float | None) -> "Conditioning":
    """No modulation computed ahead: the model computes them at every step."""
    return cond


# The shift grows linearly with the token count through (256, 0.5) and (4096, 1.15) (FLUX.1).
BASE_SEQ, BASE_SHIFT, MAX_SEQ, MAX_SHIFT = 256, 0.5, 4096, 1.15


def noise(
    seed: int,
    batch: int,
    height: int,
    width: int,
    channels: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Seeded latent noise (B, C, 2*(H//16), 2*(W//16)) from a generator on `device`."""
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
    # parity: in numpy float32, as the reference scheduler computes it, so the values agree bit
    # for bit (torch rounds the scalar division differently: the first sigma would be 1 - 6e-8).
    t = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    return torch.cat([torch.from_numpy(time_shift(shift_mu(seq_len), t)), torch.zeros(1)])


@dataclass
class Conditioning:
    """T5 tokens (B, L, 4096), ids (B, L, 3), CLIP (B, 768); seam: `mods` by (time, guidance)."""

    txt: Tensor
    txt_ids: Tensor
    vec: Tensor
    mods: dict[tuple[float, float | None], list[Tensor]] | None = None


def model_time(t: float | Tensor, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The time (B,) the model is given at time t: `timestep` rounding, back in [0, 1]."""
    return timestep(torch.as_tensor(t, device=device).expand(batch), dtype) / 1000


def add_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t noise in float32, for t (B,) and latents (B, ...)."""
    t = t.float().view(-1, *[1] * (x0.ndim - 1)).to(x0.device)
    return (1 - t) * x0.float() + t * noise.float()


def step(x: Tensor, v: Tensor, dt: float | Tensor) -> Tensor:
    """One Euler step x + dt * v in float32, stored in x's dtype; sampling, inversion, editing."""
    return (x.float() + dt * v.float()).to(x.dtype)  # parity: the scheduler's dtypes


def timestep(t: float | Tensor, dtype: torch.dtype) -> Tensor:
    """The reference's timestep t * 1000 in the model dtype (the model sees it / 1000, rounded)."""
    return (torch.as_tensor(t, dtype=torch.float32) * 1000).to(dtype)  # parity: its rounding


def predict(
    model: Flux,
    x: Tensor,
    grid: Grid,
    cond: Conditioning,
    t: float | Tensor,
    guidance: float | None,
) -> Tensor:
    """Velocity (B, grid.tokens, C) of wrap-padded tokens x at time t (1 = noise), with grid.ids."""
    b, dtype = x.shape[0], x.dtype
    ids = grid.ids(b, x.device).to(dtype)
    t = model_time(t, b, dtype, x.device)
    txt, txt_ids = cond.txt.to(x.device, dtype), cond.txt_ids.to(x.device, dtype)
    if cond.mods is not None:  # computed ahead
        key = (float(t[0]), guidance)
        if key not in cond.mods:
            raise KeyError(f"no modulation computed ahead for (t, guidance) = {key}")
        return model(x, ids, txt, txt_ids, None, None, mods=cond.mods[key])
    g = None if guidance is None else torch.full((b,), guidance, device=x.device)
    return model(x, ids, txt, txt_ids, t, cond.vec.to(x.device, dtype), g)


def guided(v: Tensor, v_neg: Tensor, scale: float) -> Tensor:
    """True CFG, v_neg + scale (v - v_neg) in the model dtype (FluxPipeline's `true_cfg_scale`)."""
    return v_neg + scale * (v - v_neg)


def denoise(
    model: Flux,
    x: Tensor,
    grid: Grid,
    cond: Conditioning,
    sigmas: Tensor,
    guidance: float | None,
    ahead: Ahead = per_step,
    progress: Progress = quiet,
    negative: Conditioning | None = None,
    true_cfg: float = 1.0,
) -> Tensor:
    """Euler steps of padded tokens x from sigmas[0] to sigmas[-1]; true CFG with a `negative`."""
    sigmas = sigmas.to(x.device)
    cond, negative = (c if c is None or c.mods is not None else ahead(c, sigmas[:-1], guidance)
                      for c in (cond, negative))  # fmt: skip
    for i in progress(range(len(sigmas) - 1), "denoise"):
        v = predict(model, x, grid, cond, sigmas[i], guidance)
        if negative is not None:  # true CFG's second call
            v = guided(v, predict(model, x, grid, negative, sigmas[i], guidance), true_cfg)
        x = step(x, v, sigmas[i + 1] - sigmas[i])
    return x
