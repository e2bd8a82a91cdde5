"""Options of generation and editing, defined once: each dataclass field carries its default and
help, and sample.py's and edit.py's flags are derived from the fields (`add_flags`, `from_args`);
defaults are the reference's. Also the scripts' parser, flag types and input checks."""

import argparse
import dataclasses
import importlib.util
import inspect
import math
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn, get_origin

import torch

from ..load.config import DIT360_LORA, FLUX_DEV
from ..load.files import short
from ..load.lora_formats import paired_loras
from ..load.sources import Sources, resolve_sources
from ..memory.offload import MODES as OFFLOADS
from ..speed.kernels import BACKENDS
from .cli import GUIDANCE, PROMPT_CHARS, SIDE, STATE, STEPS, SURROGATE, fail  # noqa: F401 (scripts)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPES_16 = (torch.bfloat16, torch.float16)  # what FA3 runs in
MASK_PADS = ("reference", "wrap")  # how Grid.wrap_mask fills the pad columns of an edit mask
ATTENTION = ("auto", *BACKENDS, "fa3")  # SDPA's kernels and FA3: layers.attention_backend
FINITE, UNIT = (math.isfinite, "a finite number"), (lambda v: 0 <= v <= 1, "in [0, 1]")
GUIDE = (lambda v: abs(v) <= GUIDANCE, f"a finite number from -{GUIDANCE} to {GUIDANCE}")
PROMPT = (
    lambda v: v is None or len(v) <= PROMPT_CHARS and not SURROGATE.search(v),
    f"at most {PROMPT_CHARS:,} characters of UTF-8 text (T5 reads 512 tokens, about 2,500)",
)
CHECKS = {  # field: (test of its value, what it must be); NaN fails every comparison
    "lora_scale": (lambda v: all(map(math.isfinite, v if isinstance(v, tuple | list) else [v])),
                   "a finite number (each)"),
    "guidance": GUIDE, "inversion_guidance": GUIDE, "tau": FINITE,
    "blend_until": FINITE, "gamma": UNIT, "eta": UNIT, "start": UNIT, "stop": UNIT,
    "steps": (lambda v: 1 <= v <= STEPS, f"an integer from 1 to {STEPS}"),
    "seed": (lambda v: 0 <= v < 2**64, "an integer from 0 to 2**64 - 1"),
    "source_prompt": PROMPT, "negative_prompt": PROMPT,
    "true_cfg": (lambda v: math.isfinite(v) and v >= 1, "a finite number >= 1 (1: off)"),
    "wrap_pad": (lambda v: v in range(5), "0 to 4 (packed columns a side)"),
    "vae_tile": (lambda v: v is None or v >= 1, "at least 1 (latent pixels)"),
    "feather": (lambda v: v is None or v >= 0, "at least 0 (pixels)"),
    "mask_pad": (lambda v: v in MASK_PADS, f"one of {', '.join(MASK_PADS)}"),
    "offload": (lambda v: v is None or v in OFFLOADS, f"one of {', '.join(OFFLOADS)}"),
    "attention": (lambda v: v in ATTENTION, f"one of {', '.join(ATTENTION)}"),
    "dtype": (lambda v: v is None or v in DTYPES or v in DTYPES.values(), "fp32, bf16 or fp16"),
}  # fmt: skip


class Several(argparse.Action):
    """A flag that may be given several times: the tuple of its values (else the default)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        given = getattr(namespace, self.dest)
        setattr(namespace, self.dest, (*(() if given is self.default else given), values))


def opt(default: Any, help: str, **flag: Any) -> Any:
    """A field whose default and help also make its command-line flag (`flag`: argparse extras)."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class Options:
    """What generation and editing share: the weights, the sampler, the VAE, the device."""

    base: str | None = opt(
        None,
        "FLUX.1-dev repo id or folder, a folder of ComfyUI model files, or one .safetensors file "
        f"(a transformer, or a checkpoint bundling all parts); None: {FLUX_DEV} for the parts "
        "no flag below gives",
    )
    transformer: str | None = opt(
        None,
        "the transformer's own file or folder (BFL, diffusers, ComfyUI, fp8); None: --base's",
    )
    t5: str | None = opt(
        None, "T5-XXL's own file or folder, e.g. t5xxl_fp16.safetensors; None: --base's"
    )
    clip: str | None = opt(
        None, "CLIP-L's own file or folder, e.g. clip_l.safetensors; None: --base's"
    )
    vae: str | None = opt(None, "the VAE's own file or folder, e.g. ae.safetensors; None: --base's")
    lora: str | tuple[str, ...] | None = opt(
        "auto",
        "LoRA repo id, folder or .safetensors file, or a train.py run (--out) or checkpoint "
        "folder; give it several times to apply several; none; auto: DiT360's published LoRA "
        f"({DIT360_LORA}) unless the transformer has a LoRA merged in (convert_weights --merge)",
        action=Several,
    )
    lora_scale: float | tuple[float, ...] = opt(
        1.0, "weight of the LoRA: once for all, or once per --lora in order", action=Several
    )
    merge_lora: bool = opt(True, "fold the LoRAs into the weights (no cost per step)")
    steps: int = opt(28, "sampling steps")
    guidance: float = opt(2.8, "guidance input of the distilled FLUX.1-dev")
    seed: int = opt(0, "noise seed")
    negative_prompt: str | None = opt(
        None, "true CFG's negative prompt ('' for an empty one); used only with --true-cfg > 1"
    )
    true_cfg: float = opt(
        1.0,
        "true classifier-free guidance scale, with --negative-prompt (diffusers' true_cfg_scale): "
        "two model calls a step; 1: off",
    )
    wrap_pad: int = opt(1, "packed columns copied around the seam a side (0: plain FLUX)")
    seamless_vae: bool = opt(False, "circular VAE padding: no seam at the wrap")
    vae_tile: int | None = opt(None, "decode in latent tiles of this size (less memory)", type=int)
    reference_noise: bool = opt(
        False, "draw the noise on --device in --dtype, as DiT360's inference.py (else CPU fp32)"
    )
    device: str | torch.device | None = opt(
        None, "cuda, cuda:1, cpu; default: cuda if available, else cpu"
    )
    offload: str | None = opt(
        None,
        "none: all on the GPU; model: each model on it for its stage only, parked in CPU memory; "
        "blocks: also stream the blocks (least GPU memory); default: by the free GPU memory",
        choices=list(OFFLOADS),
    )
    dtype: torch.dtype | str | None = opt(
        None, "default: bf16 on a GPU, fp32 on the CPU", choices=list(DTYPES)
    )
    compile: bool = opt(
        False, "compile the transformer blocks (torch.compile): faster after a one-time compile"
    )
    fp8: bool = opt(
        False,
        "transformer linear weights in float8 (e4m3) with per-channel scales: half the memory",
    )
    t5_fp8: bool = opt(
        False,
        "T5's linear weights (but the feed-forward output) in float8, weight-only: "
        "9.5 GB -> 5.9 GB",
    )
    attention: str = opt(
        "auto",
        "attention kernel: auto (PyTorch's SDPA picks), SDPA's flash, cudnn, efficient, math, "
        "or fa3 (FlashAttention-3, if installed: Hopper, bf16/fp16)",
        choices=list(ATTENTION),
    )

    def __post_init__(self) -> None:
        check_types(self, flag)  # before anything slow, so scripts fail fast
        for name, (test, what) in CHECKS.items():
            if hasattr(self, name) and not test(value := getattr(self, name)):
                raise ValueError(f"{flag(name)} must be {what}, got {short(value)}")
        if self.device is None:  # the first GPU there is: CUDA's, Apple Silicon's, else the CPU
            mps = torch.backends.mps.is_available()
            self.device = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
            if self.device == "cpu":
                warnings.warn(no_gpu("running", "hours (fp32: about 50 GB of memory)"),
                              stacklevel=caller())  # fmt: skip
        try:
            dev = torch.device(self.device)
        except RuntimeError as e:  # torch's line naming the device types
            raise ValueError(f"--device {self.device}: {e}") from None
        mps = torch.backends.mps.is_available()
        if dev.type not in ("cpu", "cuda") and not (dev.type == "mps" and mps):
            runs = "cpu, cuda, cuda:N or mps" if mps else "cpu, cuda or cuda:N"
            raise ValueError(f"--device {self.device}: cannot run there; use {runs}")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {self.device}: no such CUDA GPU here; use --device cpu")
        if dev.type == "mps" and (fp8 := [f for f in ("fp8", "t5_fp8") if getattr(self, f)]):
            raise ValueError(  # pytorch/pytorch#132624: no float8 dtype on MPS
                f"{flag(fp8[0])} needs float8 tensors, which MPS lacks: drop it (MPS runs bf16), "
                "or use --device cpu"
            )
        if dev.type != "cuda" and self.attention in ("cudnn", "efficient"):
            raise ValueError(f"--attention {self.attention} needs a CUDA GPU; use auto or flash")
        self.lora, self.lora_scale = paired_loras(self.lora, self.lora_scale)
        if self.negative_prompt is not None and self.true_cfg == 1:  # diffusers: ignored
            warnings.warn("--negative-prompt is ignored at --true-cfg 1: give --true-cfg > 1 "
                          "(e.g. 4) to use it", stacklevel=caller())  # fmt: skip
        if self.negative_prompt is None and self.true_cfg > 1:  # diffusers: off
            warnings.warn(f"--true-cfg {self.true_cfg} is off where no negative prompt is given: "
                          "give --negative-prompt ('' for an empty one)",
                          stacklevel=caller())  # fmt: skip
        dtype = self.dtype or ("fp32" if dev.type == "cpu" else "bf16")  # a GPU's: CUDA's, MPS's
        self.dtype = DTYPES.get(dtype, dtype)
        if self.attention == "fa3" and importlib.util.find_spec("flash_attn_interface") is None:
            raise ValueError(
                "--attention fa3 needs FlashAttention-3 (module flash_attn_interface), built from "
                "flash-attention's hopper/ folder (cd hopper && python setup.py install); without "
                "it use --attention auto"
            )
        if self.compile and dev.type == "cuda" and importlib.util.find_spec("triton") is None:
            raise ValueError(  # Linux's torch wheels bring triton, Windows' do not
                "--compile on a CUDA GPU needs triton (on Windows: pip install triton-windows): "
                "install it, or drop --compile"
            )
        if self.attention == "fa3" and (dev.type != "cuda" or self.dtype not in DTYPES_16):
            raise ValueError(
                f"--attention fa3 runs on a CUDA GPU in bf16 or fp16, not {dev.type} {self.dtype}; "
                "use --attention auto"
            )

    def negative(self) -> str | None:
        """The negative prompt if true CFG is on (diffusers: a negative prompt and a scale > 1)."""
        return self.negative_prompt if self.true_cfg > 1 else None

    def sources(self) -> Sources:
        """Where every model's weights are (resolved once; repo ids fetch only what is needed)."""
        paths = (self.base, self.transformer, self.t5, self.clip, self.vae)
        return resolve_sources(*(None if p is None else str(p) for p in paths))


@dataclass
class SampleOptions(Options):
    """Options of text-to-panorama generation."""

    height: int = opt(1024, "image height (a multiple of 16)")
    width: int | None = opt(None, "image width, a multiple of 16; None: 2 x --height", type=int)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.width = 2 * self.height if self.width is None else self.width  # --height alone: 2:1
        check_size(self.height, self.width, self.wrap_pad)


@dataclass
class EditOptions(Options):
    """Options of an edit (the size is the source image's); defaults are DiT360's editing.py."""

    steps: int = opt(50, "sampling (and inversion) steps")
    guidance: float = opt(
        3.5, "guidance input: 3.5 is what DiT360's editing.py runs (it sets 2.8, never passes it)"
    )
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
        if self.start > self.stop:
            raise ValueError(f"need --eta-start <= --eta-stop, got {self.start} > {self.stop}")


RENAMED = {"start": "--eta-start", "stop": "--eta-stop"}  # torchrun takes --start as its own


def flag(name: str, api: bool = True) -> str:
    """A field's flag, and its API name if other: --seed, --lora-scale (lora_scale)."""
    said = RENAMED.get(name, f"--{name.replace('_', '-')}")
    return said + (f" ({name})" if api and said != f"--{name}" else "")


def typed(value: Any, kind: Any) -> bool:
    """Whether `value` is of the annotation `kind`: an arm of a union, tuple[X, ...] (a list too),
    an int for a float, a path for a str or Path; a bool is no number."""
    if isinstance(kind, types.UnionType):
        return any(typed(value, k) for k in kind.__args__)
    if get_origin(kind) is tuple:
        return isinstance(value, tuple | list) and all(typed(v, kind.__args__[0]) for v in value)
    kind = {float: int | float, Path: str | os.PathLike, str: str | os.PathLike}.get(kind, kind)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def check_types(obj: Any, name: Callable[[str], str] = str) -> None:
    """Each field of the dataclass `obj` of its type (`typed`), else TypeError named by `name`."""
    for f in fields(obj):
        value, arms = getattr(obj, f.name), getattr(f.type, "__args__", (f.type,))
        if isinstance(value, os.PathLike) and Path not in arms:  # base=Path(...): as its text
            setattr(obj, f.name, value := os.fspath(value))
        if not typed(value, f.type):
            kind, said = getattr(f.type, "__name__", f.type), " ".join(repr(value)[:100].split())
            raise TypeError(f"{name(f.name)} must be {kind}, got {type(value).__name__} {said}")


# Frames a warning is not about: this package's, and those dataclasses make (__init__, replace).
INSIDE = (os.path.dirname(__file__), "<", dataclasses.__file__)


def no_gpu(doing: str, takes: str) -> str:
    """The warning of a command that found no GPU where no --device was given: why, and the fix."""
    cpu_build = torch.version.cuda is None and torch.version.hip is None  # hip: ROCm's build
    why = "this torch is a CPU build" if cpu_build else "none is seen"
    return (
        f"no GPU ({why}): {doing} on the CPU, which at 1024x2048 takes {takes}; install a "
        "CUDA build of torch (https://pytorch.org/get-started/locally/), or give --device cpu to "
        "run here"
    )


def caller() -> int:
    """warnings.warn's stacklevel for the first frame outside this package (the API user's call)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def check_size(height: int, width: int, wrap_pad: int = 0) -> None:
    """Multiples of 16 up to SIDE, a pad to half the width, or ValueError; not 1024x2048 warns."""
    if min(height, width) <= 0 or height % 16 or width % 16:
        raise ValueError(
            f"--height and --width must be positive multiples of 16, got {height}x{width}"
        )
    if max(height, width) > SIDE:
        raise ValueError(
            f"--height and --width must be at most {SIDE} pixels each, got {height}x{width}: "
            f"{SIDE // 2}x{SIDE} is the largest 2:1 panorama"
        )
    if 2 * wrap_pad > width // 16:  # the packed token columns
        raise ValueError(f"--wrap-pad {wrap_pad} must be <= half the {width // 16} columns")
    if (height, width) != (1024, 2048):
        warnings.warn(
            f"{height}x{width} (height x width): DiT360 was trained at 1024x2048 only; expect "
            "weaker panoramas",
            stacklevel=caller(),
        )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default (but None) and keeps the description's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """The scripts' parser: --help with defaults; a bad flag is one line `error: ...`, exit 2."""

    def __init__(self, description: str | None = None, **kw: Any) -> None:
        description = description and inspect.cleandoc(description)  # a docstring's indentation
        super().__init__(description=description, formatter_class=HelpFormatter, **kw)

    def error(self, message: str) -> NoReturn:
        if os.environ.get("RANK", "0") != "0" and "TORCHELASTIC_RUN_ID" in os.environ:
            raise SystemExit(2)  # torchrun gives every rank the same arguments: rank 0 says it
        fail(message)

    def parse_known_args(self, *args: Any, **kw: Any) -> tuple[argparse.Namespace, list[str]]:
        STATE["flags"] = tuple(self._option_string_actions)  # what running out's fix may name
        return super().parse_known_args(*args, **kw)


def require_torch(floor: tuple[int, int], command: str, why: str) -> None:
    """Refuse a torch older than `floor`: one line `error: ...` (exit 2), before anything slow."""
    have = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if have < floor:
        need = ".".join(map(str, floor))
        fail(f"{command} needs torch >= {need} ({why}), this is {torch.__version__}: "
             f"pip install 'torch>={need}'")  # fmt: skip


@contextmanager
def warnings_last() -> Iterator[None]:
    """Warnings raised inside are shown as it ends, each once (a batch's rows share the size's), and
    only if it ends without an error (a bad flag or row is the one line `error: ...`); under
    torchrun by rank 0 only (they are about the inputs, the same on every rank)."""
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        yield
    shown = {(str(w.message), w.category): w for w in warned}.values()
    for w in shown if os.environ.get("RANK", "0") == "0" else ():
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def check_height(flag: str, height: int) -> None:
    """A panorama's height: a multiple of 16 up to SIDE / 2, or ValueError naming `flag`."""
    if not (0 < height <= SIDE // 2 and height % 16 == 0):
        raise ValueError(
            f"{flag} must be a positive multiple of 16, got {height}: at most {SIDE // 2} (the "
            f"width is twice it, at most {SIDE})"
        )


def bounded(kind: type, low: float, high: float = math.inf, above: bool = False):
    """An argparse type: a finite `kind` (int or float) >= low (> low if `above`) and <= high."""
    name = "a whole number" if kind is int else "a finite number"
    limits = f" {'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")

    def parse(text: str) -> float:
        try:
            x = kind(text)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and (x > low if above else x >= low) and x <= high):
            raise argparse.ArgumentTypeError(f"needs {name}{limits}, got {text!r}")
        return x

    return parse


# The flag types of train.py, outputs' --cubemap-size and convert_weights.py.
COUNT, NATURAL, NONNEG = bounded(int, 1), bounded(int, 0), bounded(float, 0)
POSITIVE, FRACTION = bounded(float, 0, above=True), bounded(float, 0, 1)


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the options dataclass `cls`: --field-name, its default and help."""
    for f in fields(cls):
        name, meta = flag(f.name, api=False), dict(f.metadata)
        if isinstance(f.default, bool):
            meta["action"] = argparse.BooleanOptionalAction
        else:
            meta.setdefault("type", type(f.default) if f.default is not None else str)
        parser.add_argument(name, dest=f.name, default=f.default, **meta)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """The options dataclass `cls` from parsed flags (those of `add_flags`)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
