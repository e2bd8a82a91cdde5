"""LoRA (Hu et al. 2021, arXiv:2106.09685): scale * B @ A added to a linear layer's weight, by a
forward hook (`inject`) or merged. A fused layer (`qkv` = [to_q; to_k; to_v]) takes DiT360's q/k/v
LoRAs as row ranges of one adapter: A stacked, each B on its rows. Files: load/lora_formats.py."""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Part:
    """One adapter on rows [start, end) of one of our linear layers: delta = scale * B @ A."""

    start: int
    end: int
    A: Tensor  # (r, in)
    B: Tensor  # (end - start, r), in our row order
    scale: float
    keys: tuple[str, ...] = ()  # the file's tensors it came from


Span = tuple[int, int, int, float]  # an adapter part's start row, end row, rank, scale


class Adapter(nn.Module):
    """One LoRA on one layer: the A of every part stacked, (sum r, in), and one B per part."""

    def __init__(self, in_features: int, parts: list[Span], dropout: float = 0.0, **kw) -> None:
        super().__init__()  # kw: device, dtype
        self.rows = [(s, e) for s, e, _, _ in parts]
        self.ranks, self.scales = [r for *_, r, _ in parts], [c for *_, c in parts]
        self.A = nn.Parameter(torch.empty(sum(self.ranks), in_features, **kw))
        self.B = nn.ParameterList(nn.Parameter(torch.empty(e - s, r, **kw)) for s, e, r, _ in parts)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.multiplier, self.merged = 1.0, False

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """peft's init_lora_weights="gaussian": A ~ N(0, (1/r)^2), B = 0 (starts as a no-op)."""
        for a, r in zip(self.A.split(self.ranks), self.ranks, strict=True):
            nn.init.normal_(a, std=1 / r)
        for b in self.B:
            nn.init.zeros_(b)

    def parts(self) -> list[Part]:
        """The parts as plain tensors (scale = alpha / r, without the multiplier)."""
        z = zip(self.rows, self.A.split(self.ranks), self.B, self.scales, strict=True)
        return [Part(s, e, a, b, scale) for (s, e), a, b, scale in z]

    def add_(self, x: Tensor, out: Tensor) -> None:
        """out[..., rows] += multiplier * scale * B @ A x, part by part, in place."""
        h = F.linear(self.dropout(x), self.A.to(x.dtype))  # (..., sum r): all parts, one matmul
        z = zip(self.rows, h.split(self.ranks, -1), self.B, self.scales, strict=True)
        for (s, e), h_i, b, scale in z:  # B block-diagonal: part i's B on its rows only
            out[..., s:e] += F.linear(h_i, b.to(x.dtype)) * (scale * self.multiplier)  # (..., e-s)


def _hook(layer: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
    """Forward hook: the base output plus every unmerged, active adapter's."""
    for ad in layer.lora.values():
        if not ad.merged and ad.multiplier:
            ad.add_(inputs[0], out)
    return out


def sync_hook(layer: nn.Module) -> None:
    """Hook the layer while one of its adapters is unmerged and active; otherwise unhook it."""
    live = any(not ad.merged and ad.multiplier for ad in layer.lora.values())
    hooks = layer._forward_hooks  # torch's registry, not a handle: it survives deepcopy
    ids = [k for k, f in hooks.items() if f is _hook]
    if live and not ids:
        layer.register_forward_hook(_hook)
    for k in ids if not live else ():
        del hooks[k]


def add_adapter(layer: nn.Module, name: str, parts: list[Span], dropout: float = 0.0) -> Adapter:
    """A new (uninitialised) adapter `name` on `layer`, like its weight; hooks the layer."""
    if "lora" not in layer._modules:
        layer.lora = nn.ModuleDict()
    w = layer.weight
    if w.element_size() == 1:
        raise ValueError("a LoRA on float8 weights must be added before --fp8 (quantize_fp8)")
    layer.lora[name] = Adapter(layer.in_features, parts, dropout, device=w.device, dtype=w.dtype)
    sync_hook(layer)
    return layer.lora[name]


def linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer by name: any module with `in_features`, `out_features` and `weight`."""
    attrs = ("in_features", "out_features", "weight")
    return {n: m for n, m in model.named_modules() if all(hasattr(m, a) for a in attrs)}


def adapters(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, nn.Module, Adapter]]:
    """(layer name, layer, adapter) for every LoRA, or for the one named."""
    for n, m in model.named_modules():
        if isinstance(lora := getattr(m, "lora", None), nn.ModuleDict):
            yield from ((n, m, ad) for k, ad in lora.items() if name in (None, k))


def inject(
    model: nn.Module,
    rows: dict[str, list[tuple[int, int]]],
    rank: int = 64,
    alpha: float = 64,
    dropout: float = 0.05,
) -> nn.Module:
    """Add a trainable float32 LoRA "default" (DiT360's defaults) on layer name -> [start, end) row
    ranges, freeze the rest. On meta: Adapter.reset_parameters after `to_empty`."""
    if next(adapters(model, "default"), None):
        raise ValueError("the model holds a LoRA named 'default' already")
    model.requires_grad_(False)
    for layer, ranges in rows.items():
        parts = [(start, end, rank, alpha / rank) for start, end in ranges]
        adapter = add_adapter(model.get_submodule(layer), "default", parts, dropout)
        adapter.float().reset_parameters()
    return model


@torch.no_grad()
def fold_(w: Tensor, parts: list[Part], factor: float) -> Tensor:
    """Add factor * scale * B @ A to each part's rows of w, in place (summed in float32)."""
    if w.element_size() == 1:  # float8 rows carry a scale of their own: adding here is wrong
        raise ValueError("cannot merge a LoRA into float8 weights: load it before --fp8")
    for p in parts:
        delta = p.B.to(w.device, torch.float32) @ p.A.to(w.device, torch.float32)
        w[p.start : p.end] = w[p.start : p.end].float() + delta * (factor * p.scale)
    return w


def merge_lora(model: nn.Module, name: str | None = None, undo: bool = False) -> nn.Module:
    """Fold unmerged LoRAs (all, or the one named) into the weights; `undo`: take them out."""
    for _, layer, ad in adapters(model, name):
        if ad.merged == undo:
            fold_(layer.weight, ad.parts(), -ad.multiplier if undo else ad.multiplier)
            ad.merged = not undo
            sync_hook(layer)
    return model


def unmerge_lora(model: nn.Module, name: str | None = None) -> nn.Module:
    """Take merged LoRAs back out of the weights."""
    return merge_lora(model, name, undo=True)
