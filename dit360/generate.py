"""Text to panorama, end to end: encode the prompt, free the text encoders, denoise with the
transformer (+ LoRA) on the wrapped token grid, free it, decode with the VAE.

Only one of T5/CLIP, the transformer and the VAE is on the device at any time.
"""

import argparse
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
from .model import Flux
from .panorama import pack, unpack, wrap_crop, wrap_pad
from .sampling import Conditioning, Grid, denoise, noise, schedule

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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


def start_report(device: str) -> Report:
    """An empty report; on CUDA the peak-memory counter starts here."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return Report()


def finish_report(report: Report, device: str) -> Report:
    """Fill in the peak GPU memory and the peak resident memory of the process."""
    if str(device).startswith("cuda"):
        report.peak_gpu_gb = torch.cuda.max_memory_allocated() / 2**30
    report.peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return report


def load_model(opts: Options) -> Flux:
    """The transformer on the device, with the LoRA (merged unless asked otherwise)."""
    from .weights import load_flux

    model = load_flux(opts.base, opts.device, opts.dtype)
    if opts.lora:
        from .lora import load_lora

        load_lora(model, opts.lora, scale=opts.lora_scale, merge=opts.merge_lora)
    return model


def add_model_args(p: argparse.ArgumentParser, steps: int, out: str) -> None:
    """The flags sample.py and edit.py share: weights, LoRA, steps, seed, VAE, device, output."""
    d = Options()
    p.add_argument("--base", default=FLUX_DEV, help="FLUX.1-dev repo id or a folder in its layout")
    p.add_argument(
        "--lora", default=DIT360_LORA, help="LoRA repo id, folder or .safetensors file; 'none'"
    )
    p.add_argument("--lora-scale", type=float, default=d.lora_scale)
    p.add_argument(
        "--no-merge-lora",
        action="store_true",
        help="keep the LoRA as adapters (default: fold it into the weights, faster per step)",
    )
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--seamless-vae", action="store_true", help="circular VAE padding: no seam at the wrap"
    )
    p.add_argument("--vae-tile", type=int, help="decode in latent tiles of this size (less memory)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--out", default=out, help=".png or .jpg, with 360 metadata")


def options_from_args(args: argparse.Namespace, **extra) -> Options:
    """Options from the shared flags of `add_model_args`, plus script-specific fields."""
    cuda = str(args.device).startswith("cuda")
    return Options(
        base=args.base,
        lora=None if str(args.lora).lower() == "none" else args.lora,
        lora_scale=args.lora_scale,
        merge_lora=not args.no_merge_lora,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        seamless_vae=args.seamless_vae,
        vae_tile=args.vae_tile,
        device=args.device,
        dtype=DTYPES[args.dtype or ("bf16" if cuda else "fp32")],
        **extra,
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
    from .weights import load_autoencoder

    report, dev, dtype = start_report(opts.device), opts.device, opts.dtype

    with _stage(report, "text encoders", log):
        cond = Conditioning(*encode(opts.base, [prompt], dev, dtype))
    with _stage(report, "load transformer", log):
        model = load_model(opts)
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
    return to_pil(image[0]), finish_report(report, dev)
