"""Text to panorama, end to end: encode the prompt, free the text encoders, denoise with the
transformer (+ LoRA) on the wrapped token grid, free it, decode with the VAE.

Only one of T5/CLIP, the transformer and the VAE is on the device at any time.
"""

import gc
import resource
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .image import to_pil
from .panorama import pack, unpack, wrap_crop, wrap_pad
from .sampling import Conditioning, Grid, denoise, noise, schedule

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
DIT360_LORA = "Insta360-Research/DiT360-Panorama-Image-Generation"
TRAINED_SIZE = (1024, 2048)


@dataclass
class Options:
    """Everything `generate` needs besides the prompt; defaults are the reference's."""

    base: str | Path = FLUX_DEV
    lora: str | Path | None = DIT360_LORA
    lora_scale: float = 1.0
    merge_lora: bool = True  # fold the LoRA into the weights: no LoRA cost per step
    height: int = 1024
    width: int = 2048
    steps: int = 28
    guidance: float = 2.8
    seed: int = 0
    wrap_pad: int = 1  # packed columns copied around the seam; 0 = plain FLUX
    # Re-copy the pad columns before every step (reference: never). A pad token and the column
    # it copies have the same value and id, so they move alike: this only removes round-off drift.
    resync: bool = False
    seamless_vae: bool = False  # circular padding along the width in the VAE decoder
    vae_tile: int | None = None  # decode in latent tiles of this size to bound memory
    reference_noise: bool = False  # draw noise on `device` in `dtype`, as DiT360's inference.py
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: torch.dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32


@dataclass
class Report:
    """Seconds per stage and peak memory (GB) of one run."""

    seconds: dict[str, float] = field(default_factory=dict)
    peak_gpu_gb: float = 0.0
    peak_rss_gb: float = 0.0

    def __str__(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        gpu = f", peak GPU {self.peak_gpu_gb:.2f} GB" if self.peak_gpu_gb else ""
        total = sum(self.seconds.values())
        return f"{stages}; total {total:.1f}s{gpu}, peak RSS {self.peak_rss_gb:.2f} GB"


@contextmanager
def _stage(report: Report, name: str, log: Callable[[str], None]):
    log(f"{name}...")
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    report.seconds[name] = time.perf_counter() - start


def _free(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def check_size(height: int, width: int) -> None:
    """Multiples of 16 or an error; anything but 1024x2048 runs with a warning."""
    Grid.for_image(height, width)
    if (height, width) != TRAINED_SIZE:
        warnings.warn(
            f"{height}x{width}: DiT360 was trained at 1024x2048 only; expect weaker panoramas",
            stacklevel=2,
        )


def sample_latents(model, cond: Conditioning, opts: Options) -> torch.Tensor:
    """Denoise seeded noise on the wrapped token grid; latents (B, C, H/8, W/8) without the pad."""
    grid = Grid.for_image(opts.height, opts.width, opts.wrap_pad)
    dev, dtype, channels = opts.device, opts.dtype, model.params.in_channels // 4
    if opts.reference_noise:
        z = noise(opts.seed, 1, opts.height, opts.width, channels, dev, dtype)
    else:
        z = noise(opts.seed, 1, opts.height, opts.width, channels)
    # Pad once and never re-sync (unless asked): the reference's behaviour.
    x = wrap_pad(pack(z).to(dev, dtype), grid.h, grid.w, grid.pad)
    sigmas = schedule(opts.steps, grid.tokens)  # shift from the padded length, as DiT360
    guidance = opts.guidance if model.params.guidance_embed else None
    with torch.no_grad():
        x = denoise(model, x, grid, cond, sigmas, guidance, opts.resync)
    return unpack(wrap_crop(x, grid.h, grid.w, grid.pad), grid.h, grid.w)


def generate(
    prompt: str, opts: Options, log: Callable[[str], None] = print
) -> tuple[Image.Image, Report]:
    """One equirectangular panorama for `prompt`."""
    check_size(opts.height, opts.width)  # before the slow imports: fail fast
    from .text import encode
    from .weights import load_autoencoder, load_flux

    report, dev, dtype = Report(), opts.device, opts.dtype
    if str(dev).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    with _stage(report, "text encoders", log):
        cond = Conditioning(*encode(opts.base, [prompt], dev, dtype))
    with _stage(report, "load transformer", log):
        model = load_flux(opts.base, dev, dtype)
        if opts.lora:
            from .lora import load_lora

            load_lora(model, opts.lora, scale=opts.lora_scale, merge=opts.merge_lora)
    with _stage(report, "denoise", log):
        latents = sample_latents(model, cond, opts)
    del model, cond
    _free(dev)
    with _stage(report, "decode", log):
        vae = load_autoencoder(opts.base, dev, dtype)  # the reference decodes in the model dtype
        vae.set_circular(decoder=opts.seamless_vae)
        with torch.no_grad():
            image = vae.decode(latents.to(dtype), tile=opts.vae_tile)
    del vae
    _free(dev)
    if str(dev).startswith("cuda"):
        report.peak_gpu_gb = torch.cuda.max_memory_allocated() / 2**30
    report.peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return to_pil(image[0]), report
