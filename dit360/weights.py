"""Key tables between our (BFL) parameter names and other layouts, and the engine that applies
them while streaming tensors: load a FLUX transformer from any layout, or convert between layouts.

A table is a list of rules `(op, ours, theirs)`. Names are module paths (".weight"/".bias" are
carried over) or full keys; `{i}` stands for a block index. Ops:
- identity: one tensor, renamed;
- concat:   ours = cat(theirs..., dim 0), e.g. BFL's fused qkv and single-block linear1;
- swap:     ours = theirs with its two halves exchanged along dim 0 (the final adaLN: BFL stores
            [shift; scale], diffusers [scale; shift]);
- squeeze:  ours is a 1x1 conv weight (O, I, 1, 1), theirs the same as a linear (O, I).
"""

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from . import config as cfg
from .checkpoint import Checkpoint, atomic_path, open_checkpoint, resolve, write_safetensors
from .model import Flux

Rule = tuple[str, str, str | tuple[str, ...]]

_DOUBLE = "double_blocks.{i}."
_D = "transformer_blocks.{i}."
_SINGLE = "single_blocks.{i}."
_S = "single_transformer_blocks.{i}."

FLUX_DIFFUSERS: list[Rule] = [
    ("identity", "img_in", "x_embedder"),
    ("identity", "txt_in", "context_embedder"),
    ("identity", "time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("identity", "time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("identity", "vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("identity", "vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("identity", "guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("identity", "guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("identity", _DOUBLE + "img_mod.lin", _D + "norm1.linear"),
    ("identity", _DOUBLE + "txt_mod.lin", _D + "norm1_context.linear"),
    ("concat", _DOUBLE + "img_attn.qkv", tuple(_D + f"attn.to_{c}" for c in "qkv")),
    ("concat", _DOUBLE + "txt_attn.qkv", tuple(_D + f"attn.add_{c}_proj" for c in "qkv")),
    ("identity", _DOUBLE + "img_attn.norm.query_norm.scale", _D + "attn.norm_q.weight"),
    ("identity", _DOUBLE + "img_attn.norm.key_norm.scale", _D + "attn.norm_k.weight"),
    ("identity", _DOUBLE + "txt_attn.norm.query_norm.scale", _D + "attn.norm_added_q.weight"),
    ("identity", _DOUBLE + "txt_attn.norm.key_norm.scale", _D + "attn.norm_added_k.weight"),
    ("identity", _DOUBLE + "img_attn.proj", _D + "attn.to_out.0"),
    ("identity", _DOUBLE + "txt_attn.proj", _D + "attn.to_add_out"),
    ("identity", _DOUBLE + "img_mlp.0", _D + "ff.net.0.proj"),
    ("identity", _DOUBLE + "img_mlp.2", _D + "ff.net.2"),
    ("identity", _DOUBLE + "txt_mlp.0", _D + "ff_context.net.0.proj"),
    ("identity", _DOUBLE + "txt_mlp.2", _D + "ff_context.net.2"),
    ("identity", _SINGLE + "modulation.lin", _S + "norm.linear"),
    ("concat", _SINGLE + "linear1", (*(_S + f"attn.to_{c}" for c in "qkv"), _S + "proj_mlp")),
    ("identity", _SINGLE + "norm.query_norm.scale", _S + "attn.norm_q.weight"),
    ("identity", _SINGLE + "norm.key_norm.scale", _S + "attn.norm_k.weight"),
    ("identity", _SINGLE + "linear2", _S + "proj_out"),
    ("swap", "final_layer.adaLN_modulation.1", "norm_out.linear"),
    ("identity", "final_layer.linear", "proj_out"),
]

# Prefixes other tools put in front of BFL names (ComfyUI, some merged single files).
STRIP_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@cache
def _regex(pattern: str) -> re.Pattern:
    body = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(body + r"(?P<sfx>\.weight|\.bias)?$")


def _fill(pattern: str, m: re.Match) -> str:
    return pattern.replace("{i}", m.groupdict().get("i") or "") + (m["sfx"] or "")


def _theirs(rule: Rule) -> tuple[str, ...]:
    return rule[2] if isinstance(rule[2], tuple) else (rule[2],)


def locate(key: str, table: list[Rule]) -> tuple[str, str, int, int] | None:
    """For a key in their layout: (op, our key, part index, number of parts), or None."""
    for rule in table:
        parts = _theirs(rule)
        for j, pattern in enumerate(parts):
            if m := _regex(pattern).match(key):
                return rule[0], _fill(rule[1], m), j, len(parts)
    return None


def their_keys(key: str, table: list[Rule]) -> tuple[str, tuple[str, ...]] | None:
    """For one of our keys: (op, their keys in order), or None."""
    for rule in table:
        if m := _regex(rule[1]).match(key):
            return rule[0], tuple(_fill(p, m) for p in _theirs(rule))
    return None


@dataclass
class Plan:
    """How to build each of our tensors from a checkpoint: op and source keys in order."""

    sources: dict[str, tuple[str, tuple[str, ...]]]
    shapes: dict[str, tuple[int, ...]]


def plan_from(ckpt: Checkpoint, table: list[Rule] | None) -> Plan:
    """Map every checkpoint tensor onto our names; unknown keys and missing parts are errors."""
    if table is None:  # already our layout (possibly behind a ComfyUI-style prefix)
        sources = {}
        for k in ckpt.shapes:
            ours = next((k[len(p) :] for p in STRIP_PREFIXES if k.startswith(p)), k)
            sources[ours] = ("identity", (k,))
    else:
        groups: dict[str, tuple[str, list[str | None]]] = {}
        unknown = []
        for k in ckpt.shapes:
            if (hit := locate(k, table)) is None:
                unknown.append(k)
                continue
            op, ours, j, n = hit
            groups.setdefault(ours, (op, [None] * n))[1][j] = k
        if unknown:
            raise ValueError(f"{len(unknown)} unexpected tensors in {ckpt.source}: {unknown[:8]}")
        sources = {}
        for ours, (op, parts) in groups.items():
            if None in parts:
                raise ValueError(
                    f"{ckpt.source}: {ours} needs {len(parts)} tensors, "
                    f"found only {[p for p in parts if p]}"
                )
            sources[ours] = (op, tuple(parts))
    shapes = {}
    for ours, (op, keys) in sources.items():
        first = ckpt.shapes[keys[0]]
        if op == "concat":
            shapes[ours] = (sum(ckpt.shapes[k][0] for k in keys), *first[1:])
        elif op == "squeeze":
            shapes[ours] = (*first, 1, 1)
        else:
            shapes[ours] = first
    return Plan(sources, shapes)


def build(ckpt: Checkpoint, op: str, keys: tuple[str, ...]) -> Tensor:
    """Read the source tensors of one of our tensors and combine them."""
    if op == "concat":
        return torch.cat([ckpt.get(k) for k in keys], dim=0)
    t = ckpt.get(keys[0])
    if op == "swap":
        return torch.cat(t.chunk(2, dim=0)[::-1], dim=0)
    if op == "squeeze":
        return t[:, :, None, None]
    return t


def check_plan(plan: Plan, expected: dict[str, tuple[int, ...]], ckpt: Checkpoint) -> None:
    """Compare planned tensors with the model's: name every missing, unexpected, misshapen one."""

    def files(k: str) -> str:
        return " + ".join(sorted({ckpt.where(s) for s in plan.sources[k][1]}))

    missing = [k for k in expected if k not in plan.shapes]
    unexpected = [f"{k} ({files(k)})" for k in plan.shapes if k not in expected]
    wrong = [
        f"{k}: {plan.shapes[k]} in {files(k)}, model expects {expected[k]}"
        for k in expected
        if k in plan.shapes and plan.shapes[k] != expected[k]
    ]
    problems = [
        f"{what} ({len(keys)}): {keys[:8]}"
        for what, keys in [("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)]
        if keys
    ]
    if problems:
        raise ValueError(f"{ckpt.source} does not fit the model: " + "; ".join(problems))


# --- FLUX transformer -------------------------------------------------------------------------

TRANSFORMER_FILES = ["transformer/*.safetensors", "transformer/*.json"]


def open_flux(src: str | Path) -> tuple[Checkpoint, list[Rule] | None, Path]:
    """Open a FLUX transformer from a file, a folder (FLUX.1-dev layout or `transformer/`) or a
    repo id; return the checkpoint, the key table to apply (None: BFL names) and its folder."""
    path = resolve(src, TRANSFORMER_FILES, "a FLUX transformer .safetensors file or folder")
    if path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    ckpt = open_checkpoint(path)
    names = {k for k in ckpt.shapes}
    if "x_embedder.weight" in names:
        return ckpt, FLUX_DIFFUSERS, path if path.is_dir() else path.parent
    if any(k.endswith("img_in.weight") for k in names):
        return ckpt, None, path if path.is_dir() else path.parent
    raise ValueError(f"{ckpt.source} holds no FLUX transformer (no img_in or x_embedder weights)")


def flux_params(
    ckpt: Checkpoint, plan: Plan, folder: Path, axes_dim: tuple[int, ...] | None = None
) -> cfg.FluxParams:
    """Config from (in order) a diffusers config.json, our safetensors metadata, the shapes."""
    if (folder / "config.json").is_file() and ckpt.source.is_dir():
        return cfg.from_diffusers_config(folder / "config.json")
    if "dit360_config" in ckpt.metadata:
        return cfg.from_json(ckpt.metadata["dit360_config"])
    return cfg.from_shapes(plan.shapes, axes_dim)


def meta_flux(params: cfg.FluxParams) -> Flux:
    """The model on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return Flux(params)


def flux_tensors(
    ckpt: Checkpoint, plan: Plan, names: list[str], dtype: torch.dtype | None
) -> Iterator[tuple[str, Tensor]]:
    """Yield our tensors one by one, converted and cast."""
    for name in names:
        t = build(ckpt, *plan.sources[name])
        yield name, t if dtype is None else t.to(dtype)


def load_flux(
    src: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
    axes_dim: tuple[int, ...] | None = None,
) -> Flux:
    """Load a FLUX transformer from any supported layout, filling it tensor by tensor."""
    ckpt, table, folder = open_flux(src)
    plan = plan_from(ckpt, table)
    params = flux_params(ckpt, plan, folder, axes_dim)
    model = meta_flux(params)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_plan(plan, expected, ckpt)
    if dtype is None:
        dtype = ckpt.dtypes[next(iter(plan.sources.values()))[1][0]]
    model = model.to(dtype).to_empty(device=device)
    state = model.state_dict()
    with torch.no_grad():
        for name, t in flux_tensors(ckpt, plan, list(expected), dtype):
            state[name].copy_(t)
    return model.eval().requires_grad_(False)


def convert_flux(
    src: str | Path,
    out: str | Path,
    dtype: torch.dtype | None = None,
    to: str = "bfl",
    axes_dim: tuple[int, ...] | None = None,
) -> Path:
    """Write the transformer of `src` as one safetensors file in our (BFL) or diffusers layout.

    `to="diffusers"` writes `out/config.json` + `out/diffusion_pytorch_model.safetensors`.
    """
    ckpt, table, folder = open_flux(src)
    plan = plan_from(ckpt, table)
    params = flux_params(ckpt, plan, folder, axes_dim)
    expected = {k: tuple(v.shape) for k, v in meta_flux(params).state_dict().items()}
    check_plan(plan, expected, ckpt)
    names = list(expected)

    def dtype_of(name: str) -> torch.dtype:
        return dtype or ckpt.dtypes[plan.sources[name][1][0]]

    if to == "bfl":
        specs = {k: (dtype_of(k), expected[k]) for k in names}
        tensors = flux_tensors(ckpt, plan, names, dtype)
        write_safetensors(out, specs, tensors, {"dit360_config": params.to_json()})
        return Path(out)
    if to != "diffusers":
        raise ValueError(f"unknown layout {to!r}: use 'bfl' or 'diffusers'")
    out = Path(out)
    layout = [(name, *their_keys(name, FLUX_DIFFUSERS)) for name in names]
    specs = {
        k: (dtype_of(name), shape)
        for name, op, theirs in layout
        for k, shape in zip(
            theirs, split_shapes(op, expected[name], len(theirs), params), strict=True
        )
    }

    def diffusers_tensors() -> Iterator[tuple[str, Tensor]]:
        ours = flux_tensors(ckpt, plan, names, dtype)
        for (_, op, theirs), (_, t) in zip(layout, ours, strict=True):
            yield from zip(
                theirs, split_tensor(op, t, len(theirs), params.hidden_size), strict=True
            )

    write_safetensors(out / "diffusion_pytorch_model.safetensors", specs, diffusers_tensors())
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(cfg.to_diffusers_config(params), indent=2))
    return out


def split_sizes(op: str, rows: int, n: int, hidden: int) -> list[int]:
    """Row counts of the parts of a fused tensor: `hidden` each, the last one takes the rest."""
    return [hidden] * (n - 1) + [rows - hidden * (n - 1)] if op == "concat" else [rows]


def split_shapes(op, shape, n, params) -> list[tuple[int, ...]]:
    """Their shapes for one of our tensors (inverse of `plan_from`'s shapes)."""
    if op == "squeeze":
        return [shape[:2]]
    return [(r, *shape[1:]) for r in split_sizes(op, shape[0], n, params.hidden_size)]


def split_tensor(op: str, t: Tensor, n: int, hidden: int) -> list[Tensor]:
    """Their tensors for one of ours (inverse of `build`)."""
    if op == "concat":
        return list(t.split(split_sizes(op, t.shape[0], n, hidden), dim=0))
    if op == "swap":
        return [torch.cat(t.chunk(2, dim=0)[::-1], dim=0)]
    if op == "squeeze":
        return [t[:, :, 0, 0]]
    return [t]
