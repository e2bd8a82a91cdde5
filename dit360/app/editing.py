"""Editing as the runtime runs it: `invert` and `edit` from `EditOptions` (the method, RF-Inversion
with token replacement, is `dit360.core.editing`), `edit_many` (`generate.run_jobs`), `edit_image`.
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from torch import Tensor

from ..core import editing as core
from ..core.editing import RFInversion, cat_rows, paste_back
from ..core.model import Flux
from ..core.sampling import Conditioning, noise, schedule
from ..load.image import from_pil, open_image, read_mask, read_rgb
from ..memory.ahead import ahead, bar
from ..memory.offload import lent, park
from ..memory.tiling import encode
from .generate import (
    Chunk,
    Finish,
    Job,
    check_finite,
    check_jobs,
    check_opts,
    initial_noise,
    job_options,
    lend,
    placed,
    run_jobs,
)
from .options import EditOptions, check_size
from .panorama import Grid
from .report import Report


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


def rf_params(o: EditOptions) -> RFInversion:
    """The method's parameters among the options."""
    return RFInversion(**{f.name: getattr(o, f.name) for f in fields(RFInversion)})


def invert(
    model: Flux,
    x0: Tensor,
    y1: Tensor,
    grid: Grid,
    cond: Conditioning,
    sigmas: Tensor,
    opts: EditOptions,
) -> Tensor:
    """`core.editing.invert` with the modulations computed ahead and a progress bar."""
    p, a = rf_params(opts), partial(ahead, model)
    return core.invert(model, x0, y1, grid, cond, sigmas, p, a, bar)


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
    negative: Conditioning | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`core.editing.edit_planned`, modulations ahead, a progress bar; true CFG with `negative`."""
    p, a = rf_params(opts), partial(ahead, model)
    return core.edit_planned(
        model, inverted, x0, z, keep, grid, cond, sigmas, p, keep_source, a, bar, negative
    )


@dataclass(kw_only=True)
class EditJob(Job):
    """One edit: source and mask (images or files; the source at `size` (w, h) if given)."""

    image: Image.Image | Path
    mask: Image.Image | Path
    size: tuple[int, int] | None = None
    invert: bool | None = None
    source_prompt: str | None = None

    SETS: ClassVar = ("steps", "guidance", "negative_prompt", "invert", "source_prompt")


def source_prompt(o: EditOptions, job: EditJob) -> str:
    """The source branch's prompt: --source-prompt, else the target's."""
    return o.source_prompt if o.source_prompt is not None else job.prompt


def read_source(job: EditJob) -> Image.Image:
    """The job's source image as RGB, at its size."""
    if job.size is None:
        return open_image(job.image).convert("RGB")
    return read_rgb(job.image, *job.size)


def token_mask(job: EditJob, o: EditOptions, width: int, height: int) -> tuple[Grid, Tensor]:
    """The token grid of a width x height source, the job's mask on it (h, w), True = keep."""
    grid = Grid.for_image(height, width, o.wrap_pad)
    keep = read_mask(job.mask, grid.w, grid.h) ^ o.invert  # (h, w) on the token grid
    check_mask(keep)
    return grid, keep


def check_job(opts: EditOptions, job: EditJob) -> tuple[int, int]:
    """A job checked before a model loads (options, source, mask, feather): the source's (w, h)."""
    o = job_options(opts, job)
    own = open_image(job.image).size  # it opens and decodes
    width, height = job.size or own
    if o.paste_back and o.feather is not None and o.feather >= width:
        raise ValueError(f"--feather {o.feather} must be under the image's width ({width} px)")
    token_mask(job, o, width, height)
    check_size(height, width, o.wrap_pad)  # the pad's range; warns last, once all is good
    return own


def edit_step(c: Chunk, job: EditJob, o: EditOptions, first: bool) -> tuple[Tensor, Finish]:
    """A job's latents: its source encoded, inverted, edited; the paste-back, if asked."""
    dev, dtype = c.opts.device, c.opts.dtype
    image = read_source(job)
    width, height = image.size
    grid, keep = token_mask(job, o, width, height)
    with c.report.stage("encode image"), torch.no_grad():
        vae = c.vae()
        pixels = from_pil(image)[None]  # (1, 3, H, W) float32, kept for the paste-back
        ch = vae.params.z_channels
        # target noise, inversion noise, the posterior's eps: one seeded draw (CPU float32)
        z, y1, eps = noise(o.seed, 3, height, width, ch)
        with lent(vae, dev):  # a posterior sample, as the reference's (unseeded) one
            x0 = grid.pack(encode(vae, pixels.to(dev, dtype), eps[None]))
        park(vae)  # in CPU memory until the decode: one model on the device at a time
    if o.reference_noise:
        z = initial_noise(o, 1, height, width, ch)[0]
    z, y1 = (grid.pack(n[None]).to(dev, dtype) for n in (z, y1))
    sigmas = schedule(o.steps, grid.h * grid.w)  # the reference shifts by the unpadded count
    model = c.model()
    with torch.no_grad(), placed(model, c.opts, c.mode):
        with c.report.stage("invert"):
            inverted = invert(model, x0, y1, grid, c.cond(""), sigmas, o)
        with c.report.stage("edit"):
            keep = grid.wrap_mask(keep.flatten(), o.mask_pad)  # (L,): on the padded tokens
            both = lend(cat_rows(c.conds[source_prompt(o, job)], c.conds[job.prompt]), dev)
            neg = c.cond(o.negative())
            latents, _ = edit(model, inverted, x0, z, keep, grid, both, sigmas, o, False, neg)
            check_finite(latents)
    if not o.paste_back:
        return grid.unpack(latents), lambda out: out
    radius = height // 32 if o.feather is None else o.feather
    mask = read_mask(job.mask, width, height) ^ o.invert  # (H, W), True = keep
    return grid.unpack(latents), lambda out: paste_back(out, pixels[0], mask, radius)


def edit_many(
    jobs: Iterable[EditJob],
    opts: EditOptions,
    log: Callable[[str], None] = print,
    report: Report | None = None,
    checked: bool = False,
) -> Iterator[tuple[EditJob, Image.Image, float]]:
    """(job, edited panorama, seconds) for each job as it is decoded (`run_jobs`); the jobs are
    checked at the call (but their sources if `checked`: edit.py's rows), before any model loads."""
    each = job_options if checked else check_job
    jobs = check_jobs(jobs, check_opts(opts, EditOptions), EditJob, each)
    cfg = f"true CFG at scale {opts.true_cfg} on the target: its rows run twice a step"
    prompts = lambda job, o: ["", source_prompt(o, job), job.prompt, o.negative()]  # noqa: E731
    return run_jobs(jobs, opts, log, report, prompts, edit_step, cfg)


def edit_image(
    image: Image.Image,
    mask: Image.Image,
    prompt: str,
    opts: EditOptions,
    log: Callable[[str], None] = print,
) -> tuple[Image.Image, Report]:
    """Outpaint `image` where `mask` is black (with `invert`: where white), guided by `prompt`."""
    report = Report(check_opts(opts, EditOptions).device, log=log)
    job = EditJob(prompt, opts.seed, Path(), image=image, mask=mask)
    [(_, result, _)] = edit_many([job], opts, log, report)
    return result, report
