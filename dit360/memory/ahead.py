"""The modulations computed ahead (`ahead`), one layer at a time, so the weights they need wait in
CPU memory; `denoise`: the method's (`dit360.core.sampling`) with them and a progress bar."""

from collections.abc import Iterable
from functools import partial

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core import sampling
from ..core.model import Flux
from ..core.sampling import Conditioning, Grid, model_time
from .offload import lent


def modulation_layers(model: Flux) -> list[nn.Module]:
    """The adaLN layers vec (B, D) -> raw modulation, in the order `Flux.forward` reads them."""
    double = [m for b in model.double_blocks for m in (b.img_mod, b.txt_mod)]
    single = [b.modulation for b in model.single_blocks]
    return [*double, *single, model.final_layer.adaLN_modulation]


def embedders(model: Flux) -> list[nn.Module]:
    """The layers of vec: with `modulation_layers`, all that depends only on (t, y, guidance)."""
    return [m for m in (model.time_in, model.guidance_in, model.vector_in) if m is not None]


def bar(steps: range, name: str) -> Iterable[int]:
    """A progress bar over the steps (core's `Progress` seam)."""
    return tqdm(steps, desc=name, disable=None)  # None: on a terminal only (no log gets \r)


@torch.no_grad()
def ahead(
    model: Flux, cond: Conditioning, times: Iterable[float | Tensor], guidance: float | None
) -> Conditioning:
    """`cond` with the modulations at every time, one layer at a time (each `lent` to the device),
    so `predict` needs no modulation weights (27 % of FLUX.1-dev). Same values as per step."""
    dev, dtype, b = model.img_in.weight.device, model.img_in.weight.dtype, cond.vec.shape[0]
    y = cond.vec.to(dev, dtype)
    g = None if guidance is None else torch.full((b,), guidance, device=dev)
    keys = {float(model_time(t, b, dtype, dev)[0]): t for t in times}  # predict's lookup key
    with lent(nn.ModuleList(embedders(model)), dev):
        vecs = [model.conditioning_vector(model_time(t, b, dtype, dev), y, g, dtype)
                for t in keys.values()]  # fmt: skip
    mods: list[list[Tensor]] = [[] for _ in vecs]
    for layer in modulation_layers(model):
        with lent(layer, dev):
            for out, vec in zip(mods, vecs, strict=True):
                out.append(layer(vec))
    table = {(k, guidance): m for k, m in zip(keys, mods, strict=True)}
    return Conditioning(cond.txt, cond.txt_ids, cond.vec, table)


def denoise(
    model: Flux,
    x: Tensor,
    grid: Grid,
    cond: Conditioning,
    sigmas: Tensor,
    guidance: float | None,
    negative: Conditioning | None = None,
    true_cfg: float = 1.0,
) -> Tensor:
    """`core.sampling.denoise` with the modulations computed ahead and a progress bar."""
    a = partial(ahead, model)
    return sampling.denoise(model, x, grid, cond, sigmas, guidance, a, bar, negative, true_cfg)
