"""Text to panorama, end to end: encode the prompt, free the text encoders, denoise with the
transformer (+ LoRA) on the wrapped token grid, free it, decode with the VAE.

Only one of T5/CLIP, the transformer and the VAE is on the device at any time.
"""

from collections.abc import Callable

import torch
from PIL import Image

from .image import to_pil
from .model import Flux
from .options import Options, SampleOptions
from .panorama import Grid
from .report import Report
from .sampling import Conditioning, denoise, noise, schedule


def load_model(opts: Options) -> Flux:
    """The transformer on the device, with the LoRA (merged unless asked otherwise)."""
    from .weights import load_flux

    model = load_flux(opts.base, opts.device, opts.dtype)
    if opts.lora:
        from .lora_formats import load_lora

        load_lora(model, opts.lora, scale=opts.lora_scale, merge=opts.merge_lora)
    return model


def initial_noise(
    opts: Options, batch: int, height: int, width: int, channels: int
) -> torch.Tensor:
    """Seeded noise: CPU float32, or on the device in the model dtype (`reference_noise`)."""
    on = (opts.device, opts.dtype) if opts.reference_noise else ()
    return noise(opts.seed, batch, height, width, channels, *on)


def generate_latents(model: Flux, cond: Conditioning, opts: SampleOptions) -> torch.Tensor:
    """Denoise seeded noise on the wrapped token grid; latents (B, C, H/8, W/8) without the pad."""
    grid = Grid.for_image(opts.height, opts.width, opts.wrap_pad)
    z = initial_noise(opts, 1, opts.height, opts.width, model.params.in_channels // 4)
    # Pad once and never re-sync: the reference's behaviour (a pad token and the column it copies
    # have the same value and id, so they move alike up to round-off).
    x = grid.pack(z).to(opts.device, opts.dtype)
    sigmas = schedule(opts.steps, grid.tokens)  # shift from the padded length, as DiT360
    guidance = opts.guidance if model.params.guidance_embed else None
    with torch.no_grad():
        x = denoise(model, x, grid, cond, sigmas, guidance)
    return grid.unpack(x)


def check_finite(latents: torch.Tensor) -> torch.Tensor:
    """The latents, or FloatingPointError if any is NaN/inf (decoded: a black image)."""
    if latents.isfinite().all():
        return latents
    raise FloatingPointError(
        "the latents are NaN/inf, so nothing is decoded: check the LoRA (non-finite weights), "
        "--guidance and --lora-scale, or fp16 overflow (use --dtype bf16 or fp32)"
    )


def generate(
    prompt: str, opts: SampleOptions, log: Callable[[str], None] = print
) -> tuple[Image.Image, Report]:
    """One equirectangular panorama for `prompt`."""
    from .text import encode
    from .weights import load_autoencoder

    report, dev, dtype = Report(opts.device, log=log), opts.device, opts.dtype
    with report.stage("text encoders"):
        cond = Conditioning(*encode(opts.base, [prompt], dev, dtype))
    with report.stage("load transformer"):
        model = load_model(opts)
    with report.stage("denoise"):
        latents = check_finite(generate_latents(model, cond, opts))
        del model, cond
    with report.stage("decode"), torch.no_grad():
        vae = load_autoencoder(opts.base, dev, dtype)  # the reference decodes in the model dtype
        vae.set_circular(decoder=opts.seamless_vae)
        image = vae.decode(latents.to(dtype), tile=opts.vae_tile)
        del vae
    return to_pil(image[0]), report
