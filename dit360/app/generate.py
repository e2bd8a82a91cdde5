"""Text to panorama, and the batch pipeline edits share (`run_jobs`): encode the prompts, free the
encoders, denoise (+ LoRA) on the wrapped token grid, decode. One model on the device at a time,
never the modulations (`ahead.ahead`); the offload mode (`offload`) says where the rest is."""

import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import ClassVar, TypeVar

import torch
from PIL import Image
from torch import Tensor, nn

from ..core.autoencoder import AutoEncoder
from ..core.model import Flux
from ..core.sampling import Conditioning, noise, schedule
from ..load.config import DIT360_LORA
from ..load.image import to_pil
from ..load.sources import flagged
from ..memory.ahead import denoise, embedders, modulation_layers
from ..memory.fp8 import quantize_fp8
from ..memory.offload import choose, lent, move, park, stream
from ..memory.tiling import decode
from ..speed.compiling import compile_blocks, first_step_timed
from ..speed.kernels import attention_backend
from .cli import JOBS, check_prompt
from .options import Options, SampleOptions, check_types, warnings_last
from .panorama import Grid
from .report import Report

Opts = TypeVar("Opts", bound=Options)
J = TypeVar("J")
LoraUse = tuple[str, Path, float]  # a LoRA as --lora gives it, its file, its scale

# GPU memory (GiB, as torch.cuda.mem_get_info's free bytes / 2**30 that `offload.choose` compares
# them with) each mode needs for flux-dev at 1024x2048 in bf16, estimated from the parts' sizes
# (T5-XXL 8.9, the transformer without its modulation 16.1, activations ~1.9; one at a time):
# `offload.choose` takes the first that fits. For one image `model` saves nothing over `none`.
# With --fp8 the transformer is 8.1 (its block linears float8), T5 about as large.
NEEDS_GIB = {"none": 18.5, "model": 18.5, "blocks": 7.5}
NEEDS_FP8_GIB = {"none": 10.5, "model": 10.5, "blocks": 7.5}


def offload_needs(opts: Options) -> dict[str, float]:
    """The GPU memory (GiB) each offload mode needs with these options (see NEEDS_GIB)."""
    scale = torch.finfo(opts.dtype).bits / 16  # fp32 weights and activations take twice bf16's
    return {k: v * scale for k, v in (NEEDS_FP8_GIB if opts.fp8 else NEEDS_GIB).items()}


def offload_mode(opts: Options, log: Callable[[str], None] = print) -> str:
    """--offload, or the mode the free GPU memory allows; said through `log`."""
    if opts.offload is not None:
        log(f"offload {opts.offload} (--offload)")
        return opts.offload
    return choose(opts.device, offload_needs(opts), log)


def computed_ahead(model: Flux) -> list[nn.Module]:
    """The modules `ahead.ahead` runs before denoising: they wait in CPU memory."""
    return [*modulation_layers(model), *embedders(model)]


def lora_file(src: str) -> Path:
    """--lora's file (find_lora); its errors say what to give instead (a run's checkpoint, none)."""
    from ..load.lora_formats import find_lora, unfinished_run

    try:
        return flagged("--lora", find_lora, src)
    except FileNotFoundError as e:
        if why := unfinished_run(Path(src)):
            raise FileNotFoundError(f"--lora {why}") from None
        if src != DIT360_LORA:
            raise
        raise FileNotFoundError(f"{e}; or run without it: --lora none (plain FLUX.1-dev)") from None


def lora_sources(opts: Options, log: Callable[[str], None] | None = None) -> list[LoraUse]:
    """(--lora as given, its file, scale) of each LoRA; auto: DiT360's, unless one is merged in."""
    from ..load.weights import MERGED_KEY

    merged = None
    if "auto" in (opts.lora or ()):
        part = opts.sources().transformer
        if (merged := part.open().metadata.get(MERGED_KEY)) and log:
            log(f"LoRA: none added for auto; {part} has one merged in ({merged})")
    pairs = zip(opts.lora or (), opts.lora_scale, strict=True)
    named = [(DIT360_LORA if x == "auto" else x, s) for x, s in pairs if not merged or x != "auto"]
    return [(src, lora_file(src), s) for src, s in named]


def check_inputs(opts: Options) -> None:
    """Every weight file's headers checked, the LoRAs first (before --base downloads); once each."""
    from ..load.lora_formats import read_lora

    key = tuple(str(getattr(opts, k)) for k in ("base", "transformer", "t5", "clip", "vae", "lora"))
    if key in CHECKED:
        return
    for src in opts.lora or ():
        if src != "auto":
            lora_file(src)
    from ..load.weights import read_autoencoder, read_flux
    from .text import load_tokenizers  # transformers: seconds to import

    src = opts.sources()
    model = flagged(src.origin["transformer"], read_flux, src.transformer)[2]
    if not model.params.guidance_embed:  # FLUX.1-schnell: guidance is no input of it
        why = "--guidance does nothing, and DiT360's LoRA was trained on FLUX.1-dev"
        warnings.warn(
            f"{src.transformer} has no guidance input (FLUX.1-schnell?): {why}", stacklevel=2
        )
    load_tokenizers(src)  # each against its encoder, checked first
    flagged(src.origin["vae"], read_autoencoder, src.vae)
    for _, path, _ in lora_sources(opts):
        flagged("--lora", read_lora, path, model)
    CHECKED.add(key)


CHECKED: set[tuple[str, ...]] = set()  # the inputs check_inputs passed in this process


def load_model(opts: Options, offload: str = "none", log: Callable[[str], None] = print) -> Flux:
    """The transformer with the LoRAs, parked in CPU memory but (offload none) what denoises."""
    from ..load.lora_formats import load_lora
    from ..load.weights import load_flux

    on_cpu = computed_ahead if offload == "none" else (lambda m: [m])
    # fp8: read into CPU memory, each block quantized on the device (fast there), where the
    # transformer in bf16 (17 GB) would not fit the cards fp8 is for
    read_to = (lambda m: [m]) if opts.fp8 else on_cpu
    model = load_flux(opts.sources().transformer, opts.device, opts.dtype, on_cpu=read_to)
    how = "merged into the weights" if opts.merge_lora else "as adapters"
    for src, path, scale in lora_sources(opts, log):  # merged: each folded in, in order
        log(f"LoRA {src} at scale {scale}, {how}")
        load_lora(model, path, scale=scale, merge=opts.merge_lora)
    if opts.fp8:  # after the merge: a LoRA folds into the full-precision weights
        quantize_fp8(model, opts.device)
        if offload == "none":
            move(model, opts.device, skip=computed_ahead(model))
    park(nn.ModuleList(on_cpu(model)))  # pinned CPU memory on a CUDA machine
    if opts.compile:  # lazily: the first denoising step compiles
        compile_blocks(model)
    return model


@contextmanager
def placed(model: Flux, opts: Options, offload: str) -> Iterator[Flux]:
    """The transformer on the device (lent or streamed) but what is computed ahead; --attention."""
    home, blocks = computed_ahead(model), [*model.double_blocks, *model.single_blocks]
    stop = stream(blocks, opts.device, ahead=1, skip=home) if offload == "blocks" else None
    try:
        with lent(model, opts.device, skip=home), attention_backend(opts.attention):
            yield model
    finally:
        if stop is not None:
            stop()


def initial_noise(opts: Options, batch: int, height: int, width: int, channels: int) -> Tensor:
    """Seeded noise: CPU float32, or on the device in the model dtype (`reference_noise`)."""
    on = (opts.device, opts.dtype) if opts.reference_noise else ()
    return noise(opts.seed, batch, height, width, channels, *on)


def generate_latents(
    model: Flux,
    cond: Conditioning,
    opts: SampleOptions,
    offload: str = "none",
    negative: Conditioning | None = None,
) -> Tensor:
    """Seeded noise denoised on the wrapped grid (true CFG with `negative`): (B, C, H/8, W/8)."""
    grid = Grid.for_image(opts.height, opts.width, opts.wrap_pad)
    z = initial_noise(opts, 1, opts.height, opts.width, model.params.in_channels // 4)
    # Pad once and never re-sync: the reference's behaviour (a pad token and the column it copies
    # have the same value and id, so they move alike up to round-off).
    x = grid.pack(z).to(opts.device, opts.dtype)
    sigmas = schedule(opts.steps, grid.tokens)  # shift from the padded length, as DiT360
    guidance = opts.guidance if model.params.guidance_embed else None
    with torch.no_grad(), placed(model, opts, offload):
        x = denoise(model, x, grid, cond, sigmas, guidance, negative, opts.true_cfg)
    return grid.unpack(x)


def check_finite(latents: Tensor) -> Tensor:
    """The latents, or FloatingPointError if any is NaN/inf (decoded: a black image)."""
    if latents.isfinite().all():
        return latents
    raise FloatingPointError(
        "the latents are NaN/inf, so nothing is decoded: check the LoRA and text encoders (NaN "
        "weights), --guidance and --lora-scale, or fp16 overflow (use --dtype bf16 or fp32)"
    )


@dataclass
class Job:
    """One image of a batch: prompt, seed, output file; steps, guidance, negative if not opts'."""

    prompt: str
    seed: int
    out: Path
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None

    SETS: ClassVar = ("steps", "guidance", "negative_prompt")  # set where not None

    def __post_init__(self) -> None:
        check_types(self)


def job_options(opts: Opts, job: Job) -> Opts:
    """`opts` with the job's seed and the options it sets; ValueError if one is bad."""
    given = {k: v for k in job.SETS if (v := getattr(job, k)) is not None}
    with warnings.catch_warnings():  # the size warning was given once already
        warnings.simplefilter("ignore")
        return replace(opts, seed=job.seed, **given)


def check_opts(opts: Opts, kind: type[Opts]) -> Opts:
    """`opts` if a `kind` (SampleOptions, EditOptions), else TypeError (before a field is read)."""
    if not isinstance(opts, kind):
        raise TypeError(f"opts must be {kind.__name__}(...), got {type(opts).__name__}")
    return opts


def check_jobs(
    jobs: Iterable[J], opts: Opts, kind: type[J], each: Callable[[Opts, J], object] = job_options
) -> list[J]:
    """The jobs (any iterable, at most JOBS), each a `kind` passing the CLI's checks (`each`), and
    the weights checked, before anything loads; TypeError, ValueError or OSError naming the flag."""
    if len(jobs := list(islice(jobs, JOBS + 1))) > JOBS:  # a generator too, never endless
        raise ValueError(f"more than {JOBS:,} jobs: a batch makes at most {JOBS:,}; split it")
    with warnings_last():  # fail fast; the size's warning once a batch
        for job in jobs:
            if not isinstance(job, kind):
                raise TypeError(f"jobs must be {kind.__name__}s, got {type(job).__name__}")
            check_prompt(job.prompt, "--prompt (prompt)")
            each(opts, job)
        check_inputs(opts)
    return jobs


def encode_prompts(
    opts: Options, prompts: list[str | None], offload: str
) -> dict[str, Conditioning]:
    """Each distinct prompt (None: none) encoded alone, as one image encodes it: in CPU memory."""
    from .text import encode_prompt, load_text_encoders

    enc = load_text_encoders(opts.sources(), opts.device, opts.dtype, offload, opts.t5_fp8)
    named = dict.fromkeys(p for p in prompts if p is not None)
    return {p: lend(Conditioning(*encode_prompt(enc, [p])), "cpu") for p in named}


def lend(cond: Conditioning, device: torch.device | str) -> Conditioning:
    """The text conditioning on `device` (a copy; 4 MiB at full size, mostly T5's tokens)."""
    return Conditioning(cond.txt.to(device), cond.txt_ids.to(device), cond.vec.to(device))


# Jobs of a batch made at a time: their conditionings wait in CPU memory (4 MiB a prompt at full
# size: 1 GiB), so a batch of any size runs in bounded host and GPU memory. The models load again
# for each chunk: seconds, beside 256 images' tens of minutes.
CHUNK = 256


Finish = Callable[[Tensor], Tensor]  # a decoded image (3, H, W) -> the image written


@dataclass
class Chunk:
    """What a chunk's jobs share: conditionings, the transformer and VAE (loaded at first use)."""

    opts: Options
    mode: str  # the offload mode
    log: Callable[[str], None]
    report: Report
    conds: dict[str, Conditioning]
    models: dict[str, nn.Module] = field(default_factory=dict)

    def model(self) -> Flux:
        """The transformer, loaded at the first call."""
        if "model" not in self.models:
            with self.report.stage("load transformer"):
                self.models["model"] = load_model(self.opts, self.mode, self.log)
        return self.models["model"]

    def vae(self) -> AutoEncoder:
        """The VAE, loaded at the first call."""
        if "vae" not in self.models:
            self.models["vae"] = load_vae(self.opts, self.mode)
        return self.models["vae"]

    def cond(self, prompt: str | None) -> Conditioning | None:
        """A prompt's conditioning lent to the device; None for None."""
        return None if prompt is None else lend(self.conds[prompt], self.opts.device)


def run_jobs(
    jobs: list[J],
    opts: Opts,
    log: Callable[[str], None],
    report: Report | None,
    prompts: Callable[[J, Opts], list[str | None]],
    step: Callable[[Chunk, J, Opts, bool], tuple[Tensor, Finish]],
    cfg: str,
    stage: str | None = None,
) -> Iterator[tuple[J, Image.Image, float]]:
    """(job, image, seconds) for each job as decoded, CHUNK at a time: `prompts` encoded, then per
    job `step` (told if first), the decode, its finish; a `stage`: the transformer loads first."""
    report = report or Report(opts.device, log=log)
    mode = offload_mode(opts, log) if jobs else "none"
    if any(job_options(opts, job).negative() is not None for job in jobs):
        log(cfg)
    for i in range(0, len(jobs), CHUNK):
        if len(jobs) > CHUNK:
            log(f"images {i + 1} to {min(i + CHUNK, len(jobs))} of {len(jobs)}: encoding prompts")
        part = jobs[i : i + CHUNK]
        options = [job_options(opts, job) for job in part]
        named = [p for job, o in zip(part, options, strict=True) for p in prompts(job, o)]
        with report.stage("text encoders"):
            c = Chunk(opts, mode, log, report, encode_prompts(opts, named, mode))
        if stage is not None:  # the step encodes nothing first: the transformer loads now
            c.model()
        for n, (job, o) in enumerate(zip(part, options, strict=True)):
            start, last = time.perf_counter(), n == len(part) - 1
            with report.stage(stage) if stage else nullcontext():
                latents, finish = step(c, job, o, n == 0)
                if last:  # the transformer and the prompts freed before the last decode
                    c.models.pop("model")
                    c.conds.clear()
            with report.stage("decode"), torch.no_grad():
                with lent(c.vae(), opts.device) as vae:
                    image = decode(vae, latents.to(opts.dtype), tile=opts.vae_tile)[0]
                if last:
                    del vae
                    c.models.clear()
            yield job, to_pil(finish(image.float().cpu())), time.perf_counter() - start


def generate_step(c: Chunk, job: Job, o: SampleOptions, first: bool) -> tuple[Tensor, Finish]:
    """A job's latents, denoised with the chunk's transformer; its image as decoded."""
    model = c.model()
    # With --compile the first step also compiles: its extra time is logged as compile time.
    with first_step_timed(model, c.log) if o.compile and first else nullcontext():
        latents = generate_latents(model, c.cond(job.prompt), o, c.mode, c.cond(o.negative()))
    return check_finite(latents), lambda image: image


def generate_many(
    jobs: Iterable[Job],
    opts: SampleOptions,
    log: Callable[[str], None] = print,
    report: Report | None = None,
) -> Iterator[tuple[Job, Image.Image, float]]:
    """(job, panorama, seconds) for each job as it is decoded (`run_jobs`); the jobs checked now."""
    jobs = check_jobs(jobs, check_opts(opts, SampleOptions), Job)
    cfg = f"true CFG at scale {opts.true_cfg}: two transformer calls a step (twice the time)"
    prompts = lambda job, o: [job.prompt, o.negative()]  # noqa: E731
    return run_jobs(jobs, opts, log, report, prompts, generate_step, cfg, stage="denoise")


def generate(
    prompt: str, opts: SampleOptions, log: Callable[[str], None] = print
) -> tuple[Image.Image, Report]:
    """One equirectangular panorama for `prompt`."""
    report = Report(check_opts(opts, SampleOptions).device, log=log)
    job = Job(prompt, opts.seed, Path())
    [(_, image, _)] = generate_many([job], opts, log, report)
    return image, report


def load_vae(opts: Options, offload: str = "none") -> AutoEncoder:
    """The VAE in the model dtype (as the reference), seamless if asked; parked unless none."""
    from ..load.weights import load_autoencoder

    home = opts.device if offload == "none" else "cpu"
    vae = load_autoencoder(opts.sources().vae, home, opts.dtype)
    vae.set_circular(decoder=opts.seamless_vae, encoder=opts.seamless_vae)
    return vae if offload == "none" else park(vae)
