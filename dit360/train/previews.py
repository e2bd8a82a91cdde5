"""Training previews (`train.py --sample-every N --sample-prompts FILE`): the current LoRA through
sample.py's sampler on rank 0, in the run's memory mode, to out/samples/step-N/00.png, ... (each
prompt from the same seed at every step): `sample.py --lora` on the step's exported LoRA with
--no-merge-lora and the same --seed, --steps, --wrap-pad (and --fp8 for a float8 base)."""

import warnings
from pathlib import Path

import torch
from torch import nn

from ..app.batch import read_rows
from ..app.generate import check_finite, generate_latents, load_vae
from ..app.options import SampleOptions
from ..core.sampling import Conditioning
from ..load.image import save_image, to_pil
from ..memory.tiling import decode
from .distributed import unsharded


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a .txt (one a line, # comments) or .jsonl file, as sample.py --prompts."""
    rows = read_rows(Path(path), "--sample-prompts", {"prompt": str}, ("prompt",), text=True)
    return [row["prompt"] for _, row in rows]


def preview_options(
    weights: dict[str, str | None],
    height: int,
    wrap_pad: int,
    steps: int,
    seed: int,
    device: torch.device,
) -> SampleOptions:
    """sample.py's options for a preview (`weights`: base, transformer, t5, clip, vae): 2:1."""
    with warnings.catch_warnings():  # "not 1024x2048": the training resolution is the user's
        warnings.simplefilter("ignore")
        return SampleOptions(
            **weights, lora=None, steps=steps, seed=seed, wrap_pad=wrap_pad, height=height,
            width=2 * height, device=str(device), offload="none",
        )  # fmt: skip


def render(
    model: nn.Module, conds: list[Conditioning], opts: SampleOptions, folder: Path, main: bool
) -> list[Path]:
    """All ranks call it (gathering is collective); rank 0 (`main`) writes `folder`/NN.png."""
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
                        image = to_pil(decode(vae, latents.to(opts.dtype), tile=opts.vae_tile)[0])
                    except FloatingPointError as e:
                        warnings.warn(f"preview {folder.name}/{i:02d}: {e}", stacklevel=2)
                        continue
                    save_image(image, folder / f"{i:02d}.png", format="PNG")
                    written.append(folder / f"{i:02d}.png")
            torch.distributed.barrier()
    finally:
        model.train(was)
    return written
