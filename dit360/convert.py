"""Writing converted checkpoints: the transformer in our (BFL) or the diffusers layout, a LoRA
folded in, and LoRAs in the peft/diffusers format; streamed one tensor at a time, written
atomically, so a 24 GB model never sits in memory and a failure leaves no file."""

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
    FLUX_CONFIG_KEY,
    FLUX_DIFFUSERS,
    meta_flux,
    read_flux,
    split,
    stream_tensors,
    their_keys,
)


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
    params, state = model.params, model.state_dict()  # meta tensors: names and shapes
    parts = read_lora(lora, model) if lora else {}

    def dtype_of(name: str) -> torch.dtype:
        return dtype or tfile.dtypes[plan.sources[name][1][0]]

    def ours() -> Iterator[tuple[str, Tensor]]:
        for name, t in stream_tensors(tfile, plan, list(state), None):
            if (layer := name.removesuffix(".weight")) in parts and name.endswith(".weight"):
                t = fold_(t.float(), parts[layer], lora_scale)  # scale * B @ A into its rows
            yield name, t.to(dtype_of(name))

    if to == "bfl":
        specs = {k: (dtype_of(k), tuple(t.shape)) for k, t in state.items()}
        write_safetensors(out, specs, ours(), {FLUX_CONFIG_KEY: params.to_json()})
        return Path(out)
    out, hidden = Path(out), params.hidden_size
    layout = [(name, *their_keys(name, FLUX_DIFFUSERS)) for name in state]
    specs = {
        k: (dtype_of(name), tuple(t.shape))
        for name, op, keys in layout
        for k, t in zip(keys, split(op, state[name], len(keys), hidden), strict=True)
    }

    def theirs() -> Iterator[tuple[str, Tensor]]:
        for (_, op, keys), (_, t) in zip(layout, ours(), strict=True):
            yield from zip(keys, split(op, t, len(keys), hidden), strict=True)

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
