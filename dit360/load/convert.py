"""Writing converted checkpoints: the transformer in our (BFL) or the diffusers layout, a LoRA
folded in, and LoRAs in the peft/diffusers format; streamed one tensor at a time, written
atomically, so a 24 GB model never sits in memory and a failure leaves no file."""

import json
import os
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.lora import fold_
from . import config as cfg
from .files import atomic_path, unwritable, write_safetensors
from .lora_formats import PEFT_FILES, LoraPlan, paired_loras, read_lora, write_peft
from .weights import (
    FLUX_CONFIG_KEY,
    FLUX_DIFFUSERS,
    MERGED_KEY,
    float_dtype,
    meta_flux,
    read_flux,
    split,
    stream_tensors,
    their_keys,
)

Source = str | Path | None
# What a folder output may already hold (a previous output, and temporary files of a killed one):
# files of these names, no folder or link.
FOLDER_FILES = {
    "diffusers": r"config\.json|diffusion_pytorch_model.*\.safetensors(\.index\.json)?",
    "peft": PEFT_FILES,
}


def check_out(out: str | Path, kind: str, inputs: dict[str, Source | tuple[Source, ...]]) -> None:
    """ValueError on an --out we cannot write or must not replace (link, input, foreign files)."""
    out, at = Path(out), f"--out {out}"
    for flag, srcs in inputs.items():
        for src in [srcs] if isinstance(srcs, str | os.PathLike) else srcs or ():
            o, i = Path(os.path.realpath(out)), Path(os.path.realpath(src))  # a loop: no raise
            what = {o == i: "is", o in i.parents: "holds", i in o.parents: "lies inside"}.get(True)
            if what and Path(src).exists():
                raise ValueError(f"{at} {what} {flag} {src}: choose an --out apart from the inputs")
    if out.is_symlink():  # replacing it would replace the link (or, through it, a cache's blob)
        raise ValueError(
            f"{at} is a symbolic link (to {os.readlink(out)}): name what it points to, or "
            "another --out"
        )
    if kind in FOLDER_FILES:
        if out.suffix == ".safetensors" or out.is_file():
            raise ValueError(f"{at}: the {kind} output is a folder (not a file, nor *.safetensors)")
        ours = re.compile(rf"\.?({FOLDER_FILES[kind]})(\.tmp[1-9][0-9]*\..+)?")
        foreign = lambda p: not ours.fullmatch(p.name) or p.is_symlink() or not p.is_file()  # noqa: E731
        if other := sorted(p.name for p in (out.iterdir() if out.is_dir() else ()) if foreign(p)):
            raise ValueError(
                f"{at} holds other files ({', '.join(other[:3])}): give a new or empty folder, "
                f"or a previous {kind} output"
            )
    elif out.suffix != ".safetensors" or out.is_dir():
        raise ValueError(f"{at}: name a .safetensors file (a folder only with --to diffusers)")
    if unwritable(out.absolute().parent) or out.is_dir() and unwritable(out):  # its files go
        raise ValueError(f"{at}: cannot write there (check the folder exists and is writable)")


def convert_flux(
    src: str | Path,
    out: str | Path,
    dtype: torch.dtype | None = None,
    to: str = "bfl",
    axes_dim: tuple[int, ...] | None = None,
    lora: str | Path | tuple[str | Path, ...] | None = None,
    lora_scale: float | tuple[float, ...] = 1.0,
) -> Path:
    """`src`'s transformer, LoRAs `lora` folded in, as our layout's file or a diffusers folder."""
    if to not in ("bfl", "diffusers"):
        raise ValueError(f"unknown layout {to!r}: use 'bfl' or 'diffusers'")
    float_dtype(dtype)  # we read no integer transformer
    check_out(out, to, {"--base": src, "--lora": lora})  # never over an input
    tfile, plan, model = read_flux(src, axes_dim)
    params, state, out = model.params, model.state_dict(), Path(out)  # state: names and shapes
    config = cfg.to_diffusers_config(params) if to == "diffusers" else None  # fails before writing
    loras, scales = paired_loras(lora, lora_scale)
    pairs = list(zip(loras or (), scales, strict=True))
    plans = [(read_lora(src, model), scale) for src, scale in pairs]
    merged = ", ".join(f"{src} at scale {scale:g}" for src, scale in pairs)
    first = {k: plan.sources[k][1][0] for k in state}  # scaled fp8 reads dequantized: bf16
    stored = {k: torch.bfloat16 if f in tfile.scales else tfile.dtypes[f] for k, f in first.items()}
    dtypes = {k: dtype or stored[k] for k in state}
    layout = {k: their_keys(k, FLUX_DIFFUSERS) if config else ("identity", (k,)) for k in state}

    def pieces(name: str, t: Tensor) -> Iterator[tuple[str, Tensor]]:
        op, keys = layout[name]
        return zip(keys, split(op, t, len(keys), params.hidden_size), strict=True)

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for name, t in stream_tensors(tfile, plan, list(state), None):
            layer, weight = name.removesuffix(".weight"), name.endswith(".weight")
            if folds := [(p[layer], s) for p, s in plans if weight and layer in p]:
                t = t.float()
                for parts, scale in folds:  # summed in float32, rounded once
                    fold_(t, parts, scale)  # + scale * B @ A
                if not t.isfinite().all():
                    raise ValueError(
                        f"{name} is not finite after merging {merged}: a LoRA holds NaN or inf "
                        "(a diverged training run?) or a scale is too large"
                    )
            yield from pieces(name, t.to(dtypes[name]))

    specs = {k: (dtypes[n], tuple(p.shape)) for n, t in state.items() for k, p in pieces(n, t)}
    metadata = {} if config else {FLUX_CONFIG_KEY: cfg.to_json(params)}
    if pairs:  # so that sample.py does not apply the default LoRA a second time
        metadata[MERGED_KEY] = json.dumps([{"lora": str(s), "scale": x} for s, x in pairs])
    if config is None:
        write_safetensors(out, specs, tensors(), metadata)
        return out
    with atomic_path(out, FOLDER_FILES[to]) as tmp:  # the folder appears whole, or not at all
        write_safetensors(tmp / "diffusion_pytorch_model.safetensors", specs, tensors(), metadata)
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def convert_lora(
    src: str | Path,
    out_dir: str | Path,
    base: str | Path | None = None,
    scale: float = 1.0,
    axes_dim: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """A LoRA as a peft/diffusers folder, `scale` in alpha; sizes from `base`, else flux-dev's."""
    check_out(out_dir, "peft", {"--base": base, "--lora": src})  # never over an input
    return write_peft(*peft_plan(src, base, scale, axes_dim), out_dir, dtype=dtype)  # whole or none


def peft_plan(
    src: str | Path, base: str | Path | None, scale: float, axes_dim: tuple[int, ...] | None
) -> tuple[LoraPlan, nn.Module]:
    """convert_lora's checks: the LoRA read, fitted to `base` (else flux-dev) and scaled."""
    model = read_flux(base, axes_dim)[2] if base else meta_flux(cfg.PRESETS["flux-dev"])
    try:
        plan = read_lora(src, model)
    except ValueError as e:  # without --base, sizes that are not FLUX.1-dev's: say the fix
        if base or "does not fit the model" not in str(e):
            raise
        raise ValueError(
            f"--lora {src} does not fit full-size FLUX.1-dev, whose layer sizes --lora alone "
            "assumes: give the model it was trained on with --base"
        ) from None
    return {k: [replace(p, scale=p.scale * scale) for p in ps] for k, ps in plan.items()}, model
