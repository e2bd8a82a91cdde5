"""Preview panoramas while training (`train.py --sample-every N --sample-prompts FILE`): the
current LoRA through the sampler of sample.py (`generate.generate_latents`, the VAE of
`generate.load_vae`), on rank 0, without gradients, in the run's memory mode (the float8 base,
the streamed blocks), written to out/samples/step-N/00.png, 01.png, ... (one per prompt, each
drawn from the same seed at every step, so the previews show what the LoRA learns).

With the LoRA's dropout off (eval mode) the preview is `sample.py --lora` on the step's exported
LoRA, unmerged (`--no-merge-lora`), with --seed, --steps and --wrap-pad as here (and `--fp8` for
a float8 base).
"""

import warnings
from pathlib import Path

import torch
from torch import nn

from .cli import check_prompt
from .distributed import unsharded
from .files import atomic_path, read_text
from .generate import check_finite, generate_latents, load_vae
from .image import to_pil
from .options import SampleOptions
from .sampling import Conditioning
from .tiling import decode


def read_prompts(path: str | Path) -> list[str]:
    """The non-empty lines of a text file; ValueError if there are none."""
    lines = enumerate(read_text(path).splitlines(), start=1)
    prompts = [check_prompt(t.strip(), f"{path}:{n}") for n, t in lines if t.strip()]
    if not prompts:
        raise ValueError(f"--sample-prompts {path}: no prompt in it (one a line)")
    return prompts


def preview_options(
    weights: dict[str, str | None],
    height: int,
    wrap_pad: int,
    steps: int,
    seed: int,
    device: torch.device,
) -> SampleOptions:
    """sample.py's options for a preview: a 2:1 panorama, no LoRA file (the model has it), the
    weights as the model holds them (offload none); `weights`: base, transformer, t5, clip, vae."""
    with warnings.catch_warnings():  # "not 1024x2048": the training resolution is the user's
        warnings.simplefilter("ignore")
        return SampleOptions(
            **weights, lora=None, steps=steps, seed=seed, wrap_pad=wrap_pad, height=height,
            width=2 * height, device=str(device), offload="none",
        )  # fmt: skip


def render(
    model: nn.Module, conds: list[Conditioning], opts: SampleOptions, folder: Path, main: bool
) -> list[Path]:
    """Every rank calls it (gathering FSDP's shards is collective); rank 0 (`main`) denoises each
    conditioning with `model` as it is now, decodes, and writes `folder`/NN.png. The model is left
    in training mode. A non-finite preview is skipped with a warning."""
    written, was = [], model.training
    model.eval()  # the LoRA's dropout off
    try:
        with torch.no_grad(), unsharded(model):
            if main:
                folder.mkdir(parents=True, exist_ok=True)
                vae = load_vae(opts)
                for i, cond in enumerate(conds):
                    try:
                        latents = check_finite(generate_latents(model, cond, opts))
                    except FloatingPointError as e:
                        warnings.warn(f"preview {folder.name}/{i:02d}: {e}", stacklevel=2)
                        continue
                    image = decode(vae, latents.to(opts.dtype), tile=opts.vae_tile)
                    with atomic_path(folder / f"{i:02d}.png") as tmp:
                        to_pil(image[0]).save(tmp, format="PNG")
                    written.append(folder / f"{i:02d}.png")
            torch.distributed.barrier()
    finally:
        model.train(was)
    return written
