"""Writing converted checkpoints: the transformer in our (BFL) or the diffusers layout, with a
LoRA folded in, and LoRAs in the peft/diffusers format. Every path streams one tensor at a time
and writes atomically, so a 24 GB model never sits in memory and a failure leaves no file."""

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from . import config as cfg
from .files import atomic_path, write_safetensors
from .lora import fold_
from .lora_formats import read_lora, write_peft
from .weights import (
    FLUX_DIFFUSERS,
    meta_flux,
    read_flux,
    split_sizes,
    stream_tensors,
    swap_halves,
    their_keys,
)


def split_shapes(op: str, shape: tuple[int, ...], n: int, hidden: int) -> list[tuple[int, ...]]:
    """Their shapes for one of our tensors (inverse of `weights.plan_from`'s shapes)."""
    if op == "squeeze":
        return [shape[:2]]
    return [(r, *shape[1:]) for r in split_sizes(op, shape[0], n, hidden)]


def split_tensor(op: str, t: Tensor, n: int, hidden: int) -> list[Tensor]:
    """Their tensors for one of ours (inverse of `weights.build`)."""
    if op == "concat":
        return list(t.split(split_sizes(op, t.shape[0], n, hidden), dim=0))
    if op == "swap":
        return [swap_halves(t)]
    if op == "squeeze":
        return [t[:, :, 0, 0]]
    return [t]


def convert_flux(
    src: str | Path,
    out: str | Path,
    dtype: torch.dtype | None = None,
    to: str = "bfl",
    axes_dim: tuple[int, ...] | None = None,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
) -> Path:
    """Write the transformer of `src` (with `lora` folded in) in our layout as one file, or
    with `to="diffusers"` as `out/config.json` + `out/diffusion_pytorch_model.safetensors`."""
    if to not in ("bfl", "diffusers"):
        raise ValueError(f"unknown layout {to!r}: use 'bfl' or 'diffusers'")
    tfile, plan, model = read_flux(src, axes_dim)
    params, shapes = model.params, {k: tuple(v.shape) for k, v in model.state_dict().items()}
    parts = read_lora(lora, model) if lora else {}

    def dtype_of(name: str) -> torch.dtype:
        return dtype or tfile.dtypes[plan.sources[name][1][0]]

    def ours() -> Iterator[tuple[str, Tensor]]:
        for name, t in stream_tensors(tfile, plan, list(shapes), None):
            if (layer := name.removesuffix(".weight")) in parts and name.endswith(".weight"):
                t = fold_(t.float(), parts[layer], lora_scale)  # scale * B @ A into its rows
            yield name, t.to(dtype_of(name))

    if to == "bfl":
        specs = {k: (dtype_of(k), s) for k, s in shapes.items()}
        write_safetensors(out, specs, ours(), {"dit360_config": params.to_json()})
        return Path(out)
    out, hidden = Path(out), params.hidden_size
    layout = [(name, *their_keys(name, FLUX_DIFFUSERS)) for name in shapes]
    specs = {
        k: (dtype_of(name), shape)
        for name, op, theirs in layout
        for k, shape in zip(
            theirs, split_shapes(op, shapes[name], len(theirs), hidden), strict=True
        )
    }

    def theirs() -> Iterator[tuple[str, Tensor]]:
        for (_, op, keys), (_, t) in zip(layout, ours(), strict=True):
            yield from zip(keys, split_tensor(op, t, len(keys), hidden), strict=True)

    write_safetensors(out / "diffusion_pytorch_model.safetensors", specs, theirs())
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(cfg.to_diffusers_config(params), indent=2))
    return out


def convert_lora(
    src: str | Path,
    out_dir: str | Path,
    base: str | Path | None = None,
    scale: float = 1.0,
    axes_dim: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Rewrite a LoRA in the peft/diffusers format, `scale` folded into alpha; layer sizes from
    `base` (headers only), else from the flux-dev preset."""
    model = read_flux(base, axes_dim)[2] if base else meta_flux(cfg.PRESETS["flux-dev"])
    plan = read_lora(src, model)
    plan = {k: [replace(p, scale=p.scale * scale) for p in ps] for k, ps in plan.items()}
    return write_peft(plan, model, out_dir, dtype=dtype)
