"""Panorama inpainting and outpainting: RF-Inversion (arXiv:2410.10792, Algorithms 1, 2) with
Personalize Anything's token replacement (arXiv:2503.12590), as DiT360's `editing.py`, `pa_src/`
(docs/METHOD.md section 4). Time as in sampling.py; masks: True = keep."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .grid import Grid
from .model import Flux
from .sampling import (
    Ahead,
    Conditioning,
    Progress,
    guided,
    per_step,
    predict,
    quiet,
    step,
    timestep,
)


@dataclass(frozen=True)
class RFInversion:
    """RF-Inversion's parameters: gamma; eta over the steps [start, stop) (fractions: DiT360's
    start_timestep, stop_timestep); token replacement while t > tau; blending while t >= blend_until
    (its t_l); guidances (inversion_guidance: its source_guidance_scale); the target's true CFG."""

    gamma: float
    eta: float
    start: float
    stop: float
    tau: float
    blend_until: float
    guidance: float
    inversion_guidance: float
    true_cfg: float = 1.0


@contextmanager
def replacing_tokens(model: Flux, keep: Tensor | None) -> Iterator[None]:
    """On a batch [source, target(, negative)] the later rows' image tokens at `keep` (L_img,) take
    the source's q, k, v in every block (None: none do): the reference's hidden-state swap."""

    def hook(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        txt = keep.new_zeros(q.shape[2] - keep.numel())
        rows = torch.cat([txt, keep.to(q.device)])  # (L,) [txt | img]
        later = torch.arange(q.shape[0], device=q.device)[:, None] > 0  # not the source row
        sel = (later & rows)[:, None, :, None]  # (B, 1, L, 1)
        return tuple(torch.where(sel, x[:1], x) for x in (q, k, v))

    blocks = [*model.double_blocks, *model.single_blocks]
    for b in blocks:  # no hook: the class's None (one compiled graph for both ways of none)
        b.__dict__.pop("qkv_hook", None) if keep is None else setattr(b, "qkv_hook", hook)
    try:
        yield
    finally:
        for b in blocks:
            b.__dict__.pop("qkv_hook", None)


def rows(cond: Conditioning, sl: slice) -> Conditioning:
    """The conditioning of some batch rows."""
    return Conditioning(cond.txt[sl], cond.txt_ids[sl], cond.vec[sl])


def cat_rows(a: Conditioning, b: Conditioning) -> Conditioning:
    """A batch of a's rows then b's."""
    cat = lambda x, y: torch.cat([x, y])  # noqa: E731
    return Conditioning(cat(a.txt, b.txt), cat(a.txt_ids, b.txt_ids), cat(a.vec, b.vec))


def invert(
    model: Flux,
    x0: Tensor,
    y1: Tensor,
    grid: Grid,
    cond: Conditioning,
    sigmas: Tensor,
    p: RFInversion,
    ahead: Ahead = per_step,
    progress: Progress = quiet,
) -> Tensor:
    """Algorithm 1: Y_t from x0 to noise y1 (1, L, C), field u(Y_t) + gamma (u(Y_t|y1) - u(Y_t));
    as the reference, at t_i = i / len(sigmas) (latent dtype), steps sigmas[i] - sigmas[i + 1]."""
    g = p.inversion_guidance if model.params.guidance_embed else None
    n, x, sigmas = len(sigmas), x0, sigmas.to(x0.device)
    times = [float(torch.tensor(i / n, dtype=x.dtype)) for i in range(n - 1)]  # parity: rounded
    if p.gamma != 1:
        cond = ahead(cond, times, g)
    for i in progress(range(n - 1), "invert"):
        t = times[i]
        u = (y1.float() - x.float()) / (1 - t)  # the conditional field: straight to y1
        if p.gamma != 1:  # at gamma = 1 the model's field has weight 0: skip the call
            u_model = predict(model, x, grid, cond, t, g).float()
            u = u_model + p.gamma * (u - u_model)
        x = step(x, u, sigmas[i] - sigmas[i + 1])
    return x


def kept(keep: Tensor, z: Tensor) -> Tensor:
    """`keep`, one bool per token of z (B, L, C), on z's device (never broadcast: ValueError)."""
    if keep.dtype != torch.bool or keep.shape != z.shape[1:2]:
        raise ValueError(f"keep must be bool ({z.shape[1]},), got {keep.dtype} {[*keep.shape]}")
    return keep.to(z.device)


def controlled(v: Tensor | None, v_cond: Tensor, eta: float) -> Tensor:
    """The source's controlled field v + eta (v_cond - v), Algorithm 2; v_cond itself at eta 1."""
    return v_cond if eta == 1 else v + eta * (v_cond - v)


def edit(
    model: Flux,
    inverted: Tensor,
    x0: Tensor,
    z: Tensor,
    keep: Tensor,
    grid: Grid,
    cond: Conditioning,
    sigmas: Tensor,
    p: RFInversion,
    progress: Progress = quiet,
    negative: Conditioning | None = None,
) -> tuple[Tensor, Tensor]:
    """Algorithm 2 + token replacement + blending on [source, target(, negative)], keep (L,) padded:
    the target's latents (1, L, C) from noise z and the source's."""
    steps, sigmas, keep = len(sigmas) - 1, sigmas.to(z.device), kept(keep, z)
    cond, n = (cond, 1) if negative is None else (cat_rows(cond, negative), 2)
    lo, hi = int(p.start * steps), min(int(p.stop * steps), steps)
    g = p.guidance if model.params.guidance_embed else None
    src, tgt = inverted, z
    for i in progress(range(steps), "edit"):
        t, dt = float(timestep(sigmas[i], z.dtype)) / 1000, sigmas[i + 1] - sigmas[i]
        with replacing_tokens(model, keep if t > p.tau else None):
            v = predict(model, torch.cat([src, *[tgt] * n]), grid, cond, sigmas[i], g).float()
        v_cond = (src.float() - x0.float()) / sigmas[i]  # straight back to x0
        src = step(src, controlled(v[:1], v_cond, p.eta if lo <= i < hi else 0.0), dt)
        tgt = step(tgt, v[1:] if n == 1 else guided(v[1:2], v[2:], p.true_cfg), dt)
        if t >= p.blend_until:
            tgt = torch.where(keep[None, :, None], src, tgt)
    return tgt, src


def edit_planned(
    model: Flux,
    inverted: Tensor,
    x0: Tensor,
    z: Tensor,
    keep: Tensor,
    grid: Grid,
    cond: Conditioning,
    sigmas: Tensor,
    p: RFInversion,
    keep_source: bool = False,
    ahead: Ahead = per_step,
    progress: Progress = quiet,
    negative: Conditioning | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`edit` without the model calls nobody reads: the source row runs only while its tokens or
    its velocity (eta < 1) are read; the source is returned with `keep_source`."""
    steps, sigmas, keep = len(sigmas) - 1, sigmas.to(z.device), kept(keep, z)
    cond, n = (cond, 1) if negative is None else (cat_rows(cond, negative), 2)  # target rows
    times = [float(timestep(s, z.dtype)) / 1000 for s in sigmas[:-1]]  # parity: the model's t
    lo, hi = int(p.start * steps), min(int(p.stop * steps), steps)
    eta = [p.eta if lo <= i < hi else 0.0 for i in range(steps)]
    swap, blend = [t > p.tau for t in times], [t >= p.blend_until for t in times]
    # The source is read while swapping, after a blend, at the end if asked; tracked no further.
    reads = [i for i in range(steps) if swap[i]] + [i + 1 for i in range(steps) if blend[i]]
    last = max(reads + [steps if keep_source else 0])
    g = p.guidance if model.params.guidance_embed else None
    # Both rows run while the source's tokens or velocity are needed, else the target alone;
    # the modulations of each batch are computed ahead in that batch's shape.
    both = [swap[i] or (i < last and eta[i] != 1) for i in range(steps)]
    pick = lambda b: [s for s, x in zip(sigmas[:-1], both, strict=True) if x == b]  # noqa: E731
    pair, target = ahead(cond, pick(True), g), ahead(rows(cond, slice(1, None)), pick(False), g)
    src, tgt = inverted, z
    for i in progress(range(steps), "edit"):
        dt = sigmas[i + 1] - sigmas[i]
        if both[i]:
            with replacing_tokens(model, keep if swap[i] else None):
                v = predict(model, torch.cat([src, *[tgt] * n]), grid, pair, sigmas[i], g).float()
            v_src, v_tgt = v[:1], v[1:]
        else:  # nothing of the source is read at this step (eta is 1 if it moves)
            x = torch.cat([tgt] * n)
            v_src, v_tgt = None, predict(model, x, grid, target, sigmas[i], g).float()
        v_tgt = v_tgt if n == 1 else guided(v_tgt[:1], v_tgt[1:], p.true_cfg)
        if i < last:
            v_cond = (src.float() - x0.float()) / sigmas[i]  # straight back to x0
            src = step(src, controlled(v_src, v_cond, eta[i]), dt)
        tgt = step(tgt, v_tgt, dt)
        if blend[i]:
            tgt = torch.where(keep[None, :, None], src, tgt)
    return tgt, (src if keep_source else None)


def feather(keep: Tensor, radius: int) -> Tensor:
    """Alpha (H, W): 1 on kept pixels, 0 beyond about `radius` pixels; the blur wraps the seam."""
    a = keep.float()[None, None]  # (1, 1, H, W)
    if radius <= 0:
        return a[0, 0]
    if radius >= keep.shape[1]:
        raise ValueError(f"feather {radius} px must be narrower than the image ({keep.shape[1]})")
    k = 2 * radius + 1
    b = F.pad(a, (radius, radius, 0, 0), mode="circular")  # columns wrap
    b = F.pad(b, (0, 0, radius, radius), mode="replicate")  # rows do not
    b = F.avg_pool2d(F.avg_pool2d(b, (1, k), stride=1), (k, 1), stride=1)  # separable box blur
    return torch.maximum(a, (2 * b).clamp(max=1))[0, 0]  # 2x: about 1 at the edge, 0 at radius


def paste_back(edited: Tensor, source: Tensor, keep: Tensor, radius: int) -> Tensor:
    """Images (3, H, W): the source where keep (H, W), the edit beyond the feather."""
    if edited.shape != source.shape or keep.shape != edited.shape[-2:]:  # never broadcast
        shapes = [[*t.shape] for t in (edited, source, keep)]
        raise ValueError(f"paste_back needs images of one shape and a mask of theirs: {shapes}")
    alpha = feather(keep, radius).to(edited)
    return alpha * source + (1 - alpha) * edited
