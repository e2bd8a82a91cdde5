"""LoRA for the FLUX transformer: our own layer; DiT360's and the common formats; merge; export.

A LoRA adds scale * B @ A to a linear weight (A: (r, in), B: (out, r), scale = alpha / r).
Our layers are BFL's and some are fused: a double block's `img_attn.qkv` is diffusers'
[to_q; to_k; to_v], a single block's `linear1` is [to_q; to_k; to_v; proj_mlp]. So an adapter
acts on a row range of its layer, and DiT360's q/k/v LoRAs are three row-slice parts of one qkv.
`LoRALinear` stacks the A of all of one LoRA's parts on a layer, (sum r, in), so the
down-projection is one matmul; each part's B then maps its slice of that product onto its rows
of the output (a block-diagonal B, never built). B @ A is formed only to merge.

Read: peft/diffusers (`transformer.<diffusers module>.lora_A.weight`, DiT360's format, alpha from
`adapter_config.json`), kohya (`lora_unet_<BFL module, _ for .>.lora_down.weight` + `.alpha`),
BFL/ComfyUI (`diffusion_model.<BFL module>.lora_A.weight`, or lora_down/lora_up + `.alpha`).
Written: peft/diffusers, which diffusers' `load_lora_weights` reads.
Reference: Hu et al. 2021, https://arxiv.org/abs/2106.09685; peft `src/peft/tuners/lora`.
"""

import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import atomic_path, open_checkpoint, resolve, write_safetensors
from .weights import FLUX_DIFFUSERS, locate, split_sizes, their_keys

DIT360_REPO = "Insta360-Research/DiT360-Panorama-Image-Generation"
DIT360_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")  # diffusers names
LORA_FILES = ["*.safetensors", "*.json"]
# File key endings -> which tensor: peft, diffusers-old and kohya/ComfyUI spellings.
KINDS = dict.fromkeys([".lora_A.weight", ".lora.down.weight", ".lora_down.weight"], "A")
KINDS |= dict.fromkeys([".lora_B.weight", ".lora.up.weight", ".lora_up.weight"], "B")
KINDS[".alpha"] = "alpha"
PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.")


@dataclass
class Part:
    """One adapter on rows [start, end) of one of our linear layers: delta = scale * B @ A."""

    start: int
    end: int
    A: Tensor  # (r, in)
    B: Tensor  # (end - start, r), in our row order
    scale: float
    keys: tuple[str, ...] = ()  # the file's tensors it came from


Plan = dict[str, list[Part]]  # our module name -> its parts
Span = tuple[int, int, int, float]  # an adapter part's start row, end row, rank, scale
Split = tuple[str, list[str], list[int]]  # op, diffusers modules, their row bounds


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
        cols = self.A.split(self.ranks)
        z = zip(self.rows, cols, self.B, self.scales, strict=True)
        return [Part(s, e, a, b, scale) for (s, e), a, b, scale in z]


class LoRALinear(nn.Linear):
    """nn.Linear (same `weight` and `bias`) plus named LoRAs, each adding to output row ranges."""

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)  # adopt base's parameters as they are: no new allocation
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora = nn.ModuleDict()

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)  # (..., out)
        for ad in self.lora.values():
            if ad.merged or not ad.multiplier:
                continue
            h = F.linear(ad.dropout(x), ad.A.to(x.dtype))  # (..., sum r): all parts in one matmul
            z = zip(ad.rows, h.split(ad.ranks, -1), ad.B, ad.scales, strict=True)
            for (s, e), h_i, b, scale in z:  # B block-diagonal: part i's B on its rows only
                out[..., s:e] += F.linear(h_i, b.to(x.dtype)) * (scale * ad.multiplier)
        return out


def _layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer (plain or LoRA) by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _split(layer: str, layers: dict[str, nn.Linear], hidden: int) -> Split | None:
    """(op, diffusers module names, row bounds [0, ..., out]) of one of our layers, or None."""
    if (hit := their_keys(layer + ".weight", FLUX_DIFFUSERS)) is None:
        return None
    op, theirs = hit
    sizes = split_sizes(op, layers[layer].out_features, len(theirs), hidden)
    return op, [k.removesuffix(".weight") for k in theirs], [0, *accumulate(sizes)]


def _wrap(model: nn.Module, name: str) -> LoRALinear:
    """The layer `name` as a LoRALinear, swapping it in (same parameters) on first use."""
    layer = model.get_submodule(name)
    if not isinstance(layer, LoRALinear):
        parent, _, child = name.rpartition(".")
        layer = LoRALinear(layer)
        setattr(model.get_submodule(parent), child, layer)
    return layer


def _add(
    model: nn.Module,
    layer: str,
    name: str,
    parts: list[Span],
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
) -> Adapter:
    """A new (uninitialised) adapter `name` on `layer`, on the weight's device."""
    lin = _wrap(model, layer)
    w = lin.weight
    lin.lora[name] = Adapter(
        lin.in_features, parts, dropout, device=w.device, dtype=dtype or w.dtype
    )
    return lin.lora[name]


def _names(model: nn.Module) -> set[str]:
    """The names of the LoRAs applied to the model."""
    return {n for m in model.modules() if isinstance(m, LoRALinear) for n in m.lora}


def _adapters(model: nn.Module, name: str | None = None) -> Iterator[tuple[LoRALinear, Adapter]]:
    """(layer, adapter) for every LoRA, or for the one named."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            yield from ((m, ad) for n, ad in m.lora.items() if name in (None, n))


# --- Training --------------------------------------------------------------------------------


def inject(
    model: nn.Module,
    rank: int = 64,
    alpha: float = 64,
    targets: tuple[str, ...] = DIT360_TARGETS,
    dropout: float = 0.05,
    name: str = "default",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Add a new trainable LoRA on diffusers-named targets (peft's suffix match); freeze the rest.

    Defaults are DiT360's. Works on the meta device; call `reset_lora` after `to_empty`.
    """
    layers, hidden, found = _layers(model), model.params.hidden_size, {}
    for layer in layers:
        op, modules, bounds = _split(layer, layers, hidden) or (None, [], [])
        for j, module in enumerate(modules):
            if any(module == t or module.endswith("." + t) for t in targets):
                found.setdefault(layer, []).append((bounds[j], bounds[j + 1], rank, alpha / rank))
    if not found or name in _names(model):
        raise ValueError(f"LoRA {name!r} exists already, or no layer matches targets {targets}")
    model.requires_grad_(False)
    for layer, parts in found.items():
        _add(model, layer, name, parts, dropout, dtype)
    return reset_lora(model, name)


def reset_lora(model: nn.Module, name: str | None = None) -> nn.Module:
    """(Re)initialise LoRA weights as peft's "gaussian" init does."""
    for _, ad in _adapters(model, name):
        ad.reset_parameters()
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The LoRA parameters only (what training saves), under their names in the model."""
    return {k: v for k, v in model.state_dict().items() if ".lora." in k}


# --- Reading ---------------------------------------------------------------------------------


def _target(
    name: str, layers: dict[str, nn.Linear], hidden: int
) -> tuple[str, int, int, bool] | None:
    """(our layer, start row, end row, B halves swapped) for a BFL or diffusers module name."""
    if name in layers:
        return name, 0, layers[name].out_features, False
    if (hit := locate(name + ".weight", FLUX_DIFFUSERS)) and (ours := hit[1][:-7]) in layers:
        bounds, j = _split(ours, layers, hidden)[2], hit[2]
        return ours, bounds[j], bounds[j + 1], hit[0] == "swap"
    return None


def plan_lora(
    tensors: dict[str, Tensor], model: nn.Module, config: dict | None = None, source: str = "LoRA"
) -> Plan:
    """Map a LoRA state dict (any supported format) onto `model`'s layers; every key must fit."""
    layers, hidden = _layers(model), model.params.hidden_size
    kohya = {"lora_unet_" + n.replace(".", "_"): n for n in layers}
    groups: dict[str, dict[str, str]] = {}
    unknown, bad, plan, seen = [], [], {}, set()
    for key in tensors:
        end = next((e for e in KINDS if key.endswith(e)), None)
        if end is None:
            unknown.append(key)
            continue
        groups.setdefault(key[: -len(end)], {})[KINDS[end]] = key
    for module, keys in groups.items():
        name = kohya.get(module) or next(
            (module[len(p) :] for p in PREFIXES if module.startswith(p)), module
        )
        hit = _target(name, layers, hidden)
        if hit is None:
            unknown.extend(keys.values())
            continue
        ours, start, end, swap = hit
        if "A" not in keys or "B" not in keys:
            bad.append(f"{module}: has {sorted(keys)}, needs A and B")
            continue
        A, B = tensors[keys["A"]], tensors[keys["B"]]
        r, fits = A.shape[0], A.ndim == B.ndim == 2
        if not fits or A.shape[1] != layers[ours].in_features or B.shape != (end - start, r):
            bad.append(
                f"{module}: A {tuple(A.shape)}, B {tuple(B.shape)}; {ours} rows [{start}:{end}] "
                f"needs A (r, {layers[ours].in_features}), B ({end - start}, r)"
            )
            continue
        if (ours, start, end) in seen:
            bad.append(f"{module}: a second LoRA for {ours} rows [{start}:{end}]")
            continue
        seen.add((ours, start, end))
        if "alpha" in keys:
            scale = float(tensors[keys["alpha"]]) / r
        elif config:  # peft: lora_alpha, or alpha_pattern's first (suffix-regex) match
            pattern = (config.get("alpha_pattern") or {}).items()
            alpha = next((a for p, a in pattern if re.match(rf"(.*\.)?({p})$", name)), None)
            alpha = config.get("lora_alpha", r) if alpha is None else alpha
            scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        else:
            scale = 1.0  # diffusers' convention without alphas: W + B @ A
        if swap:  # BFL's final adaLN stores [shift; scale], diffusers [scale; shift]
            B = torch.cat(B.chunk(2)[::-1])
        plan.setdefault(ours, []).append(Part(start, end, A, B, scale, tuple(keys.values())))
    if unknown or bad:
        what = [f"{len(unknown)} keys that match no layer: {unknown[:8]}"] if unknown else []
        what += [f"{len(bad)} bad: {bad[:8]}"] if bad else []
        raise ValueError(f"{source} does not fit the model: " + "; ".join(what))
    if not plan:
        raise ValueError(f"{source} holds no LoRA tensors")
    return plan


def read_lora(src: str | Path, model: nn.Module) -> Plan:
    """Read a LoRA from a repo id, folder or .safetensors file and map it onto `model`."""
    path = resolve(src, LORA_FILES, "a LoRA .safetensors file or a folder holding one")
    if path.is_dir():
        usual = [
            path / n for n in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
        ]
        files = [f for f in usual if f.is_file()][:1] or sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(
                f"{path} must hold adapter_model.safetensors or exactly one .safetensors file, "
                f"found {[f.name for f in files]}"
            )
        path = files[0]
    ckpt = open_checkpoint(path)
    config = None
    if (config_file := path.parent / "adapter_config.json").is_file():
        config = json.loads(config_file.read_text())
    elif meta := ckpt.metadata.get("lora_adapter_metadata"):  # diffusers' save_lora_weights
        meta = json.loads(meta).items()
        config = {k[12:]: v for k, v in meta if k.startswith("transformer.")}
    return plan_lora({k: ckpt.get(k) for k in ckpt.shapes}, model, config, str(path))


# --- Applying and merging --------------------------------------------------------------------


def attach(model: nn.Module, plan: Plan, name: str, multiplier: float = 1.0) -> nn.Module:
    """Add a read LoRA to the model, unmerged, in the dtype of the weights."""
    if name in _names(model):
        raise ValueError(f"a LoRA named {name!r} is already applied")
    for layer, parts in plan.items():
        parts = sorted(parts, key=lambda p: p.start)
        ad = _add(model, layer, name, [(p.start, p.end, p.A.shape[0], p.scale) for p in parts])
        with torch.no_grad():
            ad.A.copy_(torch.cat([p.A for p in parts]))
            for b, p in zip(ad.B, parts, strict=True):
                b.copy_(p.B)
        ad.multiplier = multiplier
    return model


def load_lora(
    model: nn.Module,
    src: str | Path = DIT360_REPO,
    scale: float = 1.0,
    merge: bool = False,
    name: str | None = None,
) -> nn.Module:
    """Apply a LoRA (repo id, folder or file; any supported format) with weight `scale`.

    Unmerged, it can be switched off (`scale` 0 via `set_scale`) or stacked with other LoRAs;
    `merge=True` folds it into the weights (no cost at inference; `unmerge_lora` undoes it).
    """
    plan, names = read_lora(src, model), _names(model)
    name = name or next(f"lora{i}" for i in range(len(names) + 1) if f"lora{i}" not in names)
    attach(model, plan, name, scale)
    return merge_lora(model, name) if merge else model


def set_scale(model: nn.Module, scale: float, name: str | None = None) -> nn.Module:
    """Change the weight of unmerged LoRAs (all, or the one named)."""
    for _, ad in _adapters(model, name):
        if ad.merged:
            raise ValueError("unmerge the LoRA before changing its scale")
        ad.multiplier = scale
    return model


@torch.no_grad()
def fold_(w: Tensor, parts: list[Part], factor: float) -> Tensor:
    """Add factor * scale * B @ A to each part's rows of w, in place (summed in float32)."""
    for p in parts:
        delta = p.B.to(w.device, torch.float32) @ p.A.to(w.device, torch.float32)
        rows = w[p.start : p.end]
        rows.copy_(rows.float() + delta * (factor * p.scale))
    return w


def merge_lora(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold unmerged LoRAs (all, or the one named) into their layers' weights."""
    for layer, ad in _adapters(model, name):
        if not ad.merged:
            fold_(layer.weight, ad.parts(), ad.multiplier)
            ad.merged = True
    return model


def unmerge_lora(model: nn.Module, name: str | None = None) -> nn.Module:
    """Take merged LoRAs back out of the weights (exact in float32, rounded in 16-bit)."""
    for layer, ad in _adapters(model, name):
        if ad.merged:
            fold_(layer.weight, ad.parts(), -ad.multiplier)
            ad.merged = False
    return model


# --- Writing ---------------------------------------------------------------------------------


def to_diffusers(plan: Plan, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, tuple]]:
    """peft tensors of a plan (a part spanning several diffusers modules gives each a copy of A
    and its rows of B), and (rank, alpha) per diffusers module."""
    layers, hidden = _layers(model), model.params.hidden_size
    tensors, ranks = {}, {}
    for layer, parts in plan.items():
        op, modules, bounds = _split(layer, layers, hidden)
        for p in parts:
            inside = [
                j for j, m in enumerate(modules) if p.start <= bounds[j] < bounds[j + 1] <= p.end
            ]
            if sum(bounds[j + 1] - bounds[j] for j in inside) != p.end - p.start:
                raise ValueError(
                    f"{layer} rows [{p.start}:{p.end}] split diffusers modules {bounds}"
                )
            for j in inside:
                if modules[j] in ranks:
                    raise ValueError(f"two LoRA parts act on {modules[j]}: peft holds only one")
                B = p.B[bounds[j] - p.start : bounds[j + 1] - p.start]
                if op == "swap":
                    B = torch.cat(B.chunk(2)[::-1])
                tensors[f"transformer.{modules[j]}.lora_A.weight"] = p.A
                tensors[f"transformer.{modules[j]}.lora_B.weight"] = B
                alpha = p.scale * p.A.shape[0]
                ranks[modules[j]] = (p.A.shape[0], int(alpha) if alpha == int(alpha) else alpha)
    return tensors, ranks


def _target_modules(modules: set[str], model: nn.Module) -> list[str]:
    """peft target_modules: short names (attn.to_q, ...) if they select exactly `modules`."""
    short = {re.sub(r"^(single_)?transformer_blocks\.\d+\.", "", m) for m in modules}
    layers, hidden = _layers(model), model.params.hidden_size
    every = {m for n in layers for m in (_split(n, layers, hidden) or ("", []))[1]}
    chosen = {m for m in every if any(m == s or m.endswith("." + s) for s in short)}
    return sorted(short if chosen == modules else modules)


def write_peft(
    plan: Plan,
    model: nn.Module,
    out_dir: str | Path,
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` (peft/diffusers), atomically."""
    tensors, ranks = to_diffusers(plan, model)
    r = Counter(v[0] for v in ranks.values()).most_common(1)[0][0]
    alpha = Counter(v[1] for v in ranks.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _target_modules(set(ranks), model),
        "rank_pattern": {m: v[0] for m, v in ranks.items() if v[0] != r},
        "alpha_pattern": {m: v[1] for m, v in ranks.items() if v[1] != alpha},
        "lora_dropout": dropout,
        "init_lora_weights": "gaussian",
    }
    out = Path(out_dir)
    # diffusers ignores adapter_config.json and reads alpha from this metadata entry instead.
    meta = {"transformer." + k: v for k, v in config.items()}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}
    specs = {k: (dtype or t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    stream = ((k, t.detach().to(dtype or t.dtype)) for k, t in tensors.items())
    write_safetensors(out / "adapter_model.safetensors", specs, stream, meta)
    with atomic_path(out / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return out


def export_peft(
    model: nn.Module, out_dir: str | Path, name: str | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write a LoRA of the model (the only one, or the one named) in the peft/diffusers format."""
    names = _names(model)
    if name is None and len(names) != 1:
        raise ValueError(f"the model holds LoRAs {sorted(names)}: name the one to export")
    name = name or names.pop()
    plan, dropout = {}, 0.0
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear) and name in m.lora:
            plan[n] = m.lora[name].parts()
            dropout = getattr(m.lora[name].dropout, "p", 0.0)
    if not plan:
        raise ValueError(f"no LoRA named {name!r} in the model")
    return write_peft(plan, model, out_dir, dropout, dtype)
