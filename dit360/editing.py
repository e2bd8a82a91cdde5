"""Panorama inpainting and outpainting: RF-Inversion with Personalize-Anything token replacement.

References: DiT360 (github.com/Insta360-Research-Team/DiT360) `editing.py`, `pa_src/`; Rout et al.
2024, RF-Inversion (arXiv:2410.10792), Algorithms 1, 2; Feng et al., "Personalize Anything for Free
with Diffusion Transformer" (AAAI 2026). Time as in sampling.py; masks: True = keep.

`invert` moves the source latents x0 toward noise y1 (empty prompt) along the controlled field
u_model + gamma * ((y1 - Y) / (1 - t) - u_model). `edit` runs a batch [source, target]: the
source back toward x0 along v + eta * ((X - x0) / t - v), the target plain Euler from noise with
the new prompt; while t > tau the target's image tokens at the mask take the source's in
attention, while t >= blend_until its latents there take the source's after each step.

Kept from the reference on purpose: inversion model time and field at t_i = i / (steps + 1) with
the reverse schedule's step sizes; the shift from the unpadded token count; the mask's pad columns
[first | mask | last] vs the latents' [last | grid | first] (`mask_pad="wrap"` fixes it); the eta
window [int(start * steps), int(stop * steps)). Cost: gamma = 1 calls no model in the inversion;
eta = 1 zeroes the source's own velocity, so it then runs only while its tokens (t > tau) are read.

`edit_many` runs a batch of edits (`EditJob`s) with each model loaded once; `edit_image` is one.
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .generate import (
    Job,
    check_finite,
    chunks,
    encode_prompts,
    initial_noise,
    job_options,
    lend,
    load_model,
    load_vae,
    offload_mode,
    placed,
)
from .image import from_pil, open_image, read_mask, read_rgb, to_pil
from .model import Flux
from .offload import lent, park
from .options import EditOptions, check_size
from .panorama import Grid
from .report import Report
from .sampling import Conditioning, ahead, noise, predict, schedule, step, timestep


def check_mask(keep: Tensor) -> None:
    """A mask must keep something and generate something on the token grid."""
    h, w = keep.shape
    if keep.all():
        raise ValueError("the mask keeps everything (all white): nothing to generate")
    if not keep.any():
        raise ValueError(
            f"the mask keeps nothing on the {h}x{w} token grid (16x16 pixels a token): "
            "nothing to keep; use sample.py to generate from scratch"
        )


@contextmanager
def replacing_tokens(model: Flux, keep: Tensor | None) -> Iterator[None]:
    """Inside it, on a batch [source, target] the target's image tokens at `keep` (L_img,) take the
    source's q, k, v in every block (None: none do). The reference replaces the hidden states before
    the projections, which act token by token like QK norm (RoPE keeps the position): the same, and
    the MLP half of the single blocks' `linear1` reads the unreplaced input, as in diffusers."""

    def hook(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        txt = keep.new_zeros(q.shape[2] - keep.numel())
        rows = torch.cat([txt, keep.to(q.device)])  # (L,) [txt | img]
        sel = torch.stack([torch.zeros_like(rows), rows])[:, None, :, None]  # (2, 1, L, 1)
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


def invert(
    model: Flux,
    x0: Tensor,
    y1: Tensor,
    grid: Grid,
    cond: Conditioning,
    sigmas: Tensor,
    opts: EditOptions,
) -> Tensor:
    """Controlled forward ODE (Algorithm 1) from x0 toward noise y1, (1, L, C). As the reference:
    steps sigmas[i] - sigmas[i + 1], but model and field see t_i = i / len(sigmas), latent dtype."""
    g = opts.inversion_guidance if model.params.guidance_embed else None
    n, x, sigmas = len(sigmas), x0, sigmas.to(x0.device)
    times = [float(torch.tensor(i / n, dtype=x.dtype)) for i in range(n - 1)]
    if opts.gamma != 1:
        cond = ahead(model, cond, times, g)
    for i in tqdm(range(n - 1), desc="invert"):
        t = times[i]
        u = (y1.float() - x.float()) / (1 - t)  # the conditional field: straight to y1
        if opts.gamma != 1:  # at gamma = 1 the model's field has weight 0: skip the call
            u_model = predict(model, x, grid, cond, t, g).float()
            u = u_model + opts.gamma * (u - u_model)
        x = step(x, u, sigmas[i] - sigmas[i + 1])
    return x


def edit(
    model: Flux,
    inverted: Tensor,
    x0: Tensor,
    z: Tensor,
    keep: Tensor,
    grid: Grid,
    cond: Conditioning,
    sigmas: Tensor,
    opts: EditOptions,
    keep_source: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Algorithm 2 + token replacement + blending on [source, target] (cond; keep (L,) padded):
    target latents (1, L, C) from noise z, and with `keep_source` the source's last, else None."""
    steps, sigmas, keep = len(sigmas) - 1, sigmas.to(z.device), keep.to(z.device)
    times = [float(timestep(s, z.dtype)) / 1000 for s in sigmas[:-1]]  # what the model sees
    lo, hi = int(opts.start * steps), min(int(opts.stop * steps), steps)
    eta = [opts.eta if lo <= i < hi else 0.0 for i in range(steps)]
    swap, blend = [t > opts.tau for t in times], [t >= opts.blend_until for t in times]
    # The source is read as input at step i while swapping, after it when blending, at the end if
    # asked: track it up to the last read, no further.
    reads = [i for i in range(steps) if swap[i]] + [i + 1 for i in range(steps) if blend[i]]
    last = max(reads + [steps if keep_source else 0])
    g = opts.guidance if model.params.guidance_embed else None
    # Both rows run while the source's tokens or velocity are needed, else the target alone;
    # the modulations of each batch are computed ahead in that batch's shape.
    both = [swap[i] or (i < last and eta[i] != 1) for i in range(steps)]
    times = {
        b: [s for s, x in zip(sigmas[:-1], both, strict=True) if x == b] for b in (False, True)
    }
    pair = ahead(model, cond, times[True], g)
    target = ahead(model, rows(cond, slice(1, 2)), times[False], g)
    src, tgt = inverted, z
    for i in tqdm(range(steps), desc="edit"):
        dt = sigmas[i + 1] - sigmas[i]
        if both[i]:
            with replacing_tokens(model, keep if swap[i] else None):
                v = predict(model, torch.cat([src, tgt]), grid, pair, sigmas[i], g).float()
            v_src, v_tgt = v[:1], v[1:]
        else:  # nothing of the source is read at this step
            v_tgt = predict(model, tgt, grid, target, sigmas[i], g).float()
        if i < last:
            v_cond = (src.float() - x0.float()) / sigmas[i]  # straight back to x0
            v_hat = v_cond if eta[i] == 1 else v_src + eta[i] * (v_cond - v_src)
            src = step(src, v_hat, dt)
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
    alpha = feather(keep, radius).to(edited)
    return alpha * source + (1 - alpha) * edited


@dataclass(kw_only=True)
class EditJob(Job):
    """One edit of a batch: its source image and mask (images, or files read in their turn; the
    source at `size` (width, height) if given) and what it sets that is not `opts`'."""

    image: Image.Image | Path
    mask: Image.Image | Path
    size: tuple[int, int] | None = None
    invert: bool | None = None
    source_prompt: str | None = None

    SETS: ClassVar = ("steps", "guidance", "invert", "source_prompt")


def source_prompt(o: EditOptions, job: EditJob) -> str:
    """The source branch's prompt: --source-prompt, else the target's."""
    return o.source_prompt if o.source_prompt is not None else job.prompt


def read_source(job: EditJob) -> Image.Image:
    """The job's source image as RGB, at its size."""
    if job.size is None:
        return open_image(job.image).convert("RGB")
    return read_rgb(job.image, *job.size)


def token_mask(job: EditJob, o: EditOptions, width: int, height: int) -> tuple[Grid, Tensor]:
    """The token grid of a width x height source and the job's mask on it, True = keep (h, w);
    ValueError if it keeps everything or nothing."""
    grid = Grid.for_image(height, width, o.wrap_pad)
    keep = read_mask(job.mask, grid.w, grid.h) ^ o.invert  # (h, w) on the token grid
    check_mask(keep)
    return grid, keep


def check_job(job: EditJob, opts: EditOptions) -> tuple[int, int]:
    """Everything about a job that can fail before a model loads: its options, its source (it
    opens; its size), its mask on the token grid, the paste-back feather. Warns if the size is
    not 1024x2048. Returns the source file's own size (width, height)."""
    o = job_options(opts, job)
    own = open_image(job.image).size  # it opens and decodes
    width, height = job.size or own
    if o.paste_back and o.feather is not None and o.feather >= width:
        raise ValueError(f"--feather {o.feather} must be under the image's width ({width} px)")
    token_mask(job, o, width, height)
    check_size(height, width, o.wrap_pad)  # the pad's range; warns last, once all is good
    return own


def cat_rows(a: Conditioning, b: Conditioning) -> Conditioning:
    """A batch [a, b] of two one-row conditionings."""
    cat = lambda x, y: torch.cat([x, y])  # noqa: E731
    return Conditioning(cat(a.txt, b.txt), cat(a.txt_ids, b.txt_ids), cat(a.vec, b.vec))


def edit_many(
    jobs: list[EditJob],
    opts: EditOptions,
    log: Callable[[str], None] = print,
    report: Report | None = None,
) -> Iterator[tuple[EditJob, Image.Image, float]]:
    """(job, edited panorama, seconds) for each job as soon as it is decoded: every job checked
    first; then CHUNK jobs at a time (`generate.chunks`), their prompts encoded (the inversion's
    empty one, sources, targets), the text encoders freed, then the VAE and the transformer
    loaded once for the chunk. Per job: encode the source (the VAE then waits in CPU memory),
    invert, edit, decode; the transformer is freed after the chunk's last edit, before its
    decode."""
    for job in jobs:  # fail fast, before any model loads
        check_job(job, opts)
    report = report or Report(opts.device, log=log)
    mode = offload_mode(opts, log) if jobs else "none"
    for part in chunks(jobs, log):
        yield from edit_chunk(part, opts, mode, log, report)


def edit_chunk(
    jobs: list[EditJob],
    opts: EditOptions,
    mode: str,
    log: Callable[[str], None],
    report: Report,
) -> Iterator[tuple[EditJob, Image.Image, float]]:
    """edit_many's work for one chunk of checked jobs, in offload `mode`."""
    dev, dtype = opts.device, opts.dtype
    options = [job_options(opts, job) for job in jobs]
    sources = [source_prompt(o, job) for o, job in zip(options, jobs, strict=True)]
    with report.stage("text encoders"):  # the inversion's empty prompt, sources, targets
        conds = encode_prompts(opts, ["", *sources, *(job.prompt for job in jobs)], mode)
    model = vae = None
    for i, (job, o, source) in enumerate(zip(jobs, options, sources, strict=True)):
        start, last = time.perf_counter(), i == len(jobs) - 1
        image = read_source(job)
        width, height = image.size
        grid, keep = token_mask(job, o, width, height)
        with report.stage("encode image"), torch.no_grad():
            vae = load_vae(opts, mode) if vae is None else vae
            pixels = from_pil(image)[None]  # (1, 3, H, W) float32, kept for the paste-back
            with lent(vae, dev):  # the posterior mean (the reference: a sample)
                x0 = grid.pack(vae.encode(pixels.to(dev, dtype)))
            park(vae)  # in CPU memory until the decode: one model on the device at a time
        c = x0.shape[-1] // 4
        z, y1 = noise(o.seed, 2, height, width, c)  # target noise, inversion noise (CPU float32)
        if o.reference_noise:
            z = initial_noise(o, 1, height, width, c)[0]
        z, y1 = (grid.pack(n[None]).to(dev, dtype) for n in (z, y1))
        sigmas = schedule(o.steps, grid.h * grid.w)  # the reference shifts by the unpadded count
        if model is None:
            with report.stage("load transformer"):
                model = load_model(opts, mode, log)
        with torch.no_grad(), placed(model, opts, mode):
            with report.stage("invert"):
                inverted = invert(model, x0, y1, grid, lend(conds[""], dev), sigmas, o)
            with report.stage("edit"):
                keep = grid.wrap_mask(keep.flatten(), o.mask_pad)  # (L,): on the padded tokens
                both = lend(cat_rows(conds[source], conds[job.prompt]), dev)
                latents, _ = edit(model, inverted, x0, z, keep, grid, both, sigmas, o)
                check_finite(latents)
        if last:
            del model, conds
        with report.stage("decode"), torch.no_grad(), lent(vae, dev):
            out = vae.decode(grid.unpack(latents), tile=o.vae_tile)[0].float().cpu()  # (3, H, W)
        if last:
            del vae
        if o.paste_back:
            radius = height // 32 if o.feather is None else o.feather
            out = paste_back(out, pixels[0], read_mask(job.mask, width, height) ^ o.invert, radius)
        yield job, to_pil(out), time.perf_counter() - start


def edit_image(
    image: Image.Image,
    mask: Image.Image,
    prompt: str,
    opts: EditOptions,
    log: Callable[[str], None] = print,
) -> tuple[Image.Image, Report]:
    """Outpaint `image` where `mask` is black (with `invert`: where white), guided by `prompt`."""
    report = Report(opts.device, log=log)
    job = EditJob(prompt, opts.seed, Path(), image=image, mask=mask)
    [(_, result, _)] = edit_many([job], opts, log, report)
    return result, report
