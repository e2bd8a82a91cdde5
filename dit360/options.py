"""Options of generation and editing, defined once: each dataclass field carries its default and
its help, and the command-line flags of sample.py and edit.py are derived from the fields
(`add_flags`, `from_args`), so an option is written in one place. Defaults are the reference's.
"""

import argparse
import sys
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

import torch

from .config import DIT360_LORA, FLUX_DEV
from .panorama import Grid

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAINED_SIZE = (1024, 2048)
MASK_PADS = ("reference", "wrap")  # how Grid.wrap_mask fills the pad columns of an edit mask


def opt(default: Any, help: str, **flag: Any) -> Any:
    """A field whose default and help also make its command-line flag (`flag`: argparse extras)."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class Options:
    """What generation and editing share: the weights, the sampler, the VAE, the device."""

    base: str = opt(FLUX_DEV, "FLUX.1-dev repo id, or a folder in its layout")
    lora: str | None = opt(DIT360_LORA, "LoRA repo id, folder or .safetensors file; 'none'")
    lora_scale: float = opt(1.0, "weight of the LoRA")
    merge_lora: bool = opt(True, "fold the LoRA into the weights (no cost per step)")
    steps: int = opt(28, "sampling steps")
    guidance: float = opt(2.8, "guidance input of the distilled FLUX.1-dev")
    seed: int = opt(0, "noise seed")
    wrap_pad: int = opt(1, "packed columns copied around the seam a side (0: plain FLUX)")
    seamless_vae: bool = opt(False, "circular VAE padding: no seam at the wrap")
    vae_tile: int | None = opt(None, "decode in latent tiles of this size (less memory)", type=int)
    reference_noise: bool = opt(
        False, "draw the noise on --device in --dtype, as DiT360's inference.py (else CPU fp32)"
    )
    device: str | None = opt(None, "cuda, cuda:1, cpu; default: cuda if available, else cpu")
    dtype: torch.dtype | str | None = opt(
        None, "default: bf16 on a GPU, fp32 on the CPU", choices=list(DTYPES)
    )

    def __post_init__(self) -> None:
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.lora is not None and str(self.lora).lower() == "none":
            self.lora = None
        if self.dtype is None:
            self.dtype = "bf16" if str(self.device).startswith("cuda") else "fp32"
        if isinstance(self.dtype, str):
            self.dtype = DTYPES[self.dtype]


@dataclass
class SampleOptions(Options):
    """Options of text-to-panorama generation."""

    height: int = opt(1024, "image height (a multiple of 16)")
    width: int = opt(2048, "image width (a multiple of 16; 2 x height for a full panorama)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_size(self.height, self.width)


@dataclass
class EditOptions(Options):
    """Options of an edit (the size is the source image's); defaults are DiT360's editing.py."""

    steps: int = opt(50, "sampling (and inversion) steps")
    invert: bool = opt(False, "inpaint: regenerate the white region of the mask")
    source_prompt: str | None = opt(None, "the source branch's prompt (default: --prompt)")
    gamma: float = opt(1.0, "inversion controller (1: straight to the noise, no model calls)")
    eta: float = opt(1.0, "source controller (1: straight back to the source)")
    start: float = opt(0.0, "eta acts from this fraction of the steps")
    stop: float = opt(0.99, "eta acts up to this fraction of the steps")
    tau: float = opt(0.5, "token replacement while t > tau")
    blend_until: float = opt(0.5, "latent blending of the kept region while t >= this")
    inversion_guidance: float = opt(0.0, "guidance input of the inversion")
    mask_pad: str = opt(
        "reference",
        "pad columns of the mask: DiT360's [first|mask|last], or wrapped like the latents",
        choices=MASK_PADS,
    )
    paste_back: bool = opt(False, "put the kept source pixels back, feathered")
    feather: int | None = opt(None, "paste-back feather in pixels (default: H/32)", type=int)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.start <= self.stop <= 1:
            raise ValueError(f"need 0 <= start <= stop <= 1, got {self.start}, {self.stop}")
        if self.mask_pad not in MASK_PADS:
            raise ValueError(f"mask_pad must be one of {MASK_PADS}, got {self.mask_pad!r}")


def check_size(height: int, width: int) -> None:
    """Multiples of 16 or an error; anything but 1024x2048 runs with a warning."""
    Grid.for_image(height, width)
    if (height, width) != TRAINED_SIZE:
        warnings.warn(
            f"{height}x{width}: DiT360 was trained at 1024x2048 only; expect weaker panoramas",
            stacklevel=4,  # the caller of the options dataclass
        )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default and keeps the description's line breaks."""


class Parser(argparse.ArgumentParser):
    """The scripts' parser: --help with defaults; a bad flag is one line `error: ...`, exit 2."""

    def __init__(self, description: str | None = None, **kw: Any) -> None:
        super().__init__(description=description, formatter_class=HelpFormatter, **kw)

    def error(self, message: str) -> NoReturn:
        fail(message)


def fail(message: object, code: int = 2) -> NoReturn:
    """Stop a command with one line `error: ...` on stderr; code 2: bad usage, 1: a failure."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(code)


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the options dataclass `cls`: --field-name, its default and help."""
    for f in fields(cls):
        name, meta = "--" + f.name.replace("_", "-"), dict(f.metadata)
        if "help" not in meta:
            continue
        if isinstance(f.default, bool):
            parser.add_argument(
                name, action=argparse.BooleanOptionalAction, default=f.default, **meta
            )
        else:
            meta.setdefault("type", type(f.default) if f.default is not None else str)
            parser.add_argument(name, default=f.default, **meta)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """The options dataclass `cls` from parsed flags (those of `add_flags`)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
