"""Key tables between our (BFL) parameter names and other layouts, and the engine that applies them
while streaming tensors. A rule is `(op, ours, theirs)`: module paths (".weight"/".bias" carried
over) or full keys, `{i}` a block index. Ops: identity (renamed); concat (ours = cat(theirs, dim 0):
fused qkv, linear1); swap (the halves exchanged along dim 0: BFL's final adaLN is [shift; scale],
diffusers' [scale; shift]); squeeze (ours a 1x1 conv (O, I, 1, 1), theirs a linear (O, I)).
"""

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core import autoencoder as ae
from ..core.model import Flux
from . import config as cfg
from .files import TensorFile
from .sources import TRANSFORMER_PREFIXES, Part, config_beside, find_part

Rule = tuple[str, str, str | tuple[str, ...]]

# safetensors metadata keys under which we store our FluxParams / AutoEncoderParams as JSON, and
# the LoRA a converted transformer has merged in ({"lora": source, "scale": weight})
FLUX_CONFIG_KEY, AE_CONFIG_KEY, MERGED_KEY = "dit360_config", "dit360_ae_config", "dit360_merged"

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

PREFIXES = (*TRANSFORMER_PREFIXES, "base_model.model.")  # and peft's, before diffusers names


def strip_prefix(name: str) -> str:
    """A key without the first of PREFIXES it starts with."""
    return next((name[len(p) :] for p in PREFIXES if name.startswith(p)), name)


def swap_halves(t: Tensor) -> Tensor:
    """Exchange the two halves along dim 0 ([shift; scale] <-> [scale; shift]); its own inverse."""
    return torch.cat(t.chunk(2, dim=0)[::-1], dim=0)


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
class KeyPlan:
    """How to build each of our tensors from a checkpoint: op and source keys in order."""

    sources: dict[str, tuple[str, tuple[str, ...]]]
    shapes: dict[str, tuple[int, ...]]


def plan_from(tfile: TensorFile, table: list[Rule] | None) -> KeyPlan:
    """Every checkpoint tensor mapped onto our names (table None: ours, maybe behind a prefix)."""
    sources = {strip_prefix(k): ("identity", (k,)) for k in tfile.shapes}
    if table is not None:
        hits = {k: locate(k, table) for k in tfile.shapes}
        if unknown := [k for k, hit in hits.items() if hit is None]:
            raise ValueError(f"{len(unknown)} unexpected tensors in {tfile.source}: {unknown[:8]}")
        groups: dict[str, tuple[str, list[str | None]]] = {}
        for k, (op, ours, j, n) in hits.items():
            groups.setdefault(ours, (op, [None] * n))[1][j] = k
        sources = {}
        for ours, (op, parts) in groups.items():
            if None in parts:
                found = [p for p in parts if p]
                raise ValueError(
                    f"{tfile.source}: {ours} needs {len(parts)} tensors, found only {found}"
                )
            sources[ours] = (op, tuple(parts))
    shapes = {}
    for ours, (op, keys) in sources.items():
        parts = [torch.empty(tfile.shapes[k], device="meta") for k in keys]
        try:  # shapes that do not combine (a fused part's width, a scalar): the file's fault
            shapes[ours] = tuple(combine(op, parts).shape)
        except (RuntimeError, IndexError):
            got = [tfile.shapes[k] for k in keys]
            raise ValueError(f"{tfile.source}: {ours} cannot be made of {keys} {got}") from None
    return KeyPlan(sources, shapes)


def combine(op: str, parts: list[Tensor]) -> Tensor:
    """One of our tensors from its source tensors in their layout (meta tensors: its shape)."""
    if op == "concat":
        return torch.cat(parts, dim=0)
    if op == "swap":
        return swap_halves(parts[0])
    return parts[0][:, :, None, None] if op == "squeeze" else parts[0]


def split(op: str, t: Tensor, n: int, hidden: int) -> list[Tensor]:
    """The inverse of `combine`: their `n` tensors from one of ours (`hidden` rows per part)."""
    if op == "concat":
        return list(t.split(split_sizes(op, t.shape[0], n, hidden), dim=0))
    return [t[:, :, 0, 0]] if op == "squeeze" else [combine(op, [t])]  # swap: its own inverse


def split_sizes(op: str, rows: int, n: int, hidden: int) -> list[int]:
    """Row counts of the parts of a fused tensor: `hidden` each, the last one takes the rest."""
    return [hidden] * (n - 1) + [rows - hidden * (n - 1)] if op == "concat" else [rows]


def build(tfile: TensorFile, op: str, keys: tuple[str, ...]) -> Tensor:
    """Read the source tensors of one of our tensors and combine them."""
    return combine(op, [tfile.get(k) for k in keys])


def check_plan(plan: KeyPlan, expected: dict[str, tuple[int, ...]], tfile: TensorFile) -> None:
    """Compare planned tensors with the model's: name every missing, unexpected, misshapen one."""

    def files(k: str) -> str:
        return " + ".join(sorted({tfile.where(s) for s in plan.sources[k][1]}))

    missing = [k for k in expected if k not in plan.shapes]
    unexpected = [f"{k} ({files(k)})" for k in plan.shapes if k not in expected]
    wrong = [
        f"{k}: {plan.shapes[k]} in {files(k)}, model expects {expected[k]}"
        for k in expected
        if k in plan.shapes and plan.shapes[k] != expected[k]
    ]
    stored = [(k, tfile.dtypes[s]) for k, (_, keys) in plan.sources.items() for s in keys]
    integer = [f"{k}: {dtype} in {files(k)}" for k, dtype in stored if not dtype.is_floating_point]
    named = {"missing": missing, "unexpected": unexpected, "wrong shape": wrong}
    named["not floating point"] = integer
    problems = [f"{what} ({len(keys)}): {keys[:8]}" for what, keys in named.items() if keys]
    if problems:
        raise ValueError(f"{tfile.source} does not fit the model: " + "; ".join(problems))


def stream_tensors(
    tfile: TensorFile, plan: KeyPlan, names: list[str], dtype: torch.dtype | None
) -> Iterator[tuple[str, Tensor]]:
    """Yield our tensors one by one, converted and cast, with a progress bar on a terminal."""
    bar = tqdm(names, desc=f"reading {tfile.source.name}", unit="tensor", leave=False, disable=None)
    for name in bar:
        yield name, build(tfile, *plan.sources[name]).to(dtype)  # dtype None: as stored


def float_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """`dtype` if None or a float dtype, else TypeError (a str: a device; an int dtype casts)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise TypeError(f"dtype must be a float torch.dtype, e.g. torch.bfloat16, got {dtype!r}")


def fill(
    model: nn.Module,
    tfile: TensorFile,
    plan: KeyPlan,
    device: str | torch.device,
    dtype: torch.dtype | None,
    on_cpu: Callable[[nn.Module], list[nn.Module]] | None = None,
) -> nn.Module:
    """Fill a meta model tensor by tensor (dtype None: the file's); `on_cpu(model)`'s on CPU."""
    dtype, stored = float_dtype(dtype), tfile.dtypes[plan.sources[next(iter(plan.sources))][1][0]]
    # but bfloat16 for float8 (norms cannot run in float8; scaled fp8 weights read dequantized)
    dtype = dtype or (torch.bfloat16 if stored.itemsize == 1 else stored)
    model = model.to(dtype)
    cpu = {id(m) for top in (on_cpu(model) if on_cpu else []) for m in top.modules()}
    for m in model.modules():
        m.to_empty(device="cpu" if id(m) in cpu else device, recurse=False)
    state = model.state_dict()
    with torch.no_grad():
        for name, t in stream_tensors(tfile, plan, list(state), dtype):
            state[name].copy_(t)
    return model.eval().requires_grad_(False)


def meta_flux(params: cfg.FluxParams) -> Flux:
    """The model on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return Flux(params)


def read_flux(
    src: str | Path | Part, axes_dim: tuple[int, ...] | None = None
) -> tuple[TensorFile, KeyPlan, Flux]:
    """A FLUX transformer checked against its meta model; config: config.json, metadata, shapes."""
    part = src if isinstance(src, Part) else find_part(src, "transformer")
    tfile = part.open()
    diffusers = any(strip_prefix(k) == "x_embedder.weight" for k in tfile.shapes)
    plan = plan_from(tfile, FLUX_DIFFUSERS if diffusers else None)
    if config := diffusers and config_beside(part.path, _class_name="FluxTransformer2DModel"):
        params = cfg.from_diffusers_config(*config)
    elif FLUX_CONFIG_KEY in tfile.metadata:
        where = f"{tfile.source} metadata {FLUX_CONFIG_KEY}"
        params = cfg.from_json(cfg.FluxParams, tfile.metadata[FLUX_CONFIG_KEY], where)
    else:
        params = cfg.from_shapes(plan.shapes, axes_dim or part.axes_dim, str(tfile.source))
    check_plan(plan, flux_shapes(params), tfile)  # before building: a config is no cost
    return tfile, plan, meta_flux(params)


def flux_shapes(params: cfg.FluxParams) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, from a model of one block of each kind (cheap)."""
    depths = {"double_blocks": params.depth, "single_blocks": params.depth_single_blocks}
    ones = {k: min(getattr(params, k), 1) for k in ("depth", "depth_single_blocks")}
    one = meta_flux(replace(params, **ones))
    shapes = {}
    for key, t in one.state_dict().items():
        kind, _, rest = key.partition(".0.")
        keys = [f"{kind}.{i}.{rest}" for i in range(depths[kind])] if kind in depths else [key]
        shapes |= dict.fromkeys(keys, tuple(t.shape))
    return shapes


def load_flux(
    src: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
    axes_dim: tuple[int, ...] | None = None,
    on_cpu: Callable[[Flux], list[nn.Module]] | None = None,
) -> Flux:
    """A FLUX transformer of any layout filled tensor by tensor; `on_cpu(model)`'s in CPU memory."""
    tfile, plan, model = read_flux(src, axes_dim)
    return fill(model, tfile, plan, device, dtype, on_cpu)


def _ae_resnet(ours: str, theirs: str) -> list[Rule]:
    """The layers of one resnet block; BFL's `nin_shortcut` is diffusers' `conv_shortcut`."""
    layers = [("norm1",) * 2, ("conv1",) * 2, ("norm2",) * 2, ("conv2",) * 2]
    layers.append(("nin_shortcut", "conv_shortcut"))
    return [("identity", f"{ours}.{a}", f"{theirs}.{b}") for a, b in layers]


def _ae_attention(ours: str, theirs: str) -> list[Rule]:
    """The mid-block attention: BFL's 1x1 convs are diffusers' linears (weights squeezed)."""
    rules: list[Rule] = [("identity", f"{ours}.norm", f"{theirs}.group_norm")]
    for a, b in [("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]:
        rules.append(("squeeze", f"{ours}.{a}.weight", f"{theirs}.{b}.weight"))
        rules.append(("identity", f"{ours}.{a}.bias", f"{theirs}.{b}.bias"))
    return rules


def ae_diffusers(levels: int = 4) -> list[Rule]:
    """The key table of a diffusers AutoencoderKL with `levels` levels (`{i}`: resnet). Decoder
    levels: diffusers' coarsest first, BFL's finest (`up.{l}` is `up_blocks.{levels - 1 - l}`)."""
    rules: list[Rule] = []
    for part in ("encoder", "decoder"):
        rules += [
            ("identity", f"{part}.conv_in", f"{part}.conv_in"),
            ("identity", f"{part}.norm_out", f"{part}.conv_norm_out"),
            ("identity", f"{part}.conv_out", f"{part}.conv_out"),
            *_ae_resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0"),
            *_ae_attention(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0"),
            *_ae_resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1"),
        ]
    for l in range(levels):
        down, up = f"encoder.down.{l}", f"decoder.up.{l}"
        their_down, their_up = f"encoder.down_blocks.{l}", f"decoder.up_blocks.{levels - 1 - l}"
        rules += _ae_resnet(f"{down}.block.{{i}}", f"{their_down}.resnets.{{i}}")
        rules += _ae_resnet(f"{up}.block.{{i}}", f"{their_up}.resnets.{{i}}")
        if l < levels - 1:
            rules += [("identity", f"{down}.downsample.conv", f"{their_down}.downsamplers.0.conv")]
        if l > 0:
            rules.append(("identity", f"{up}.upsample.conv", f"{their_up}.upsamplers.0.conv"))
    return rules


AE_DIFFUSERS: list[Rule] = ae_diffusers(4)  # FLUX.1's VAE


def read_autoencoder(src: str | Path | Part) -> tuple[TensorFile, KeyPlan, ae.AutoEncoder]:
    """The FLUX VAE's headers checked against its meta model (config as for `read_flux`)."""
    part = src if isinstance(src, Part) else find_part(src, "vae")
    tfile = part.open()
    diffusers = any(k.startswith("encoder.down_blocks.") for k in tfile.shapes)
    if not diffusers and not any(k.startswith("encoder.down.") for k in tfile.shapes):
        raise ValueError(f"{part} holds no FLUX autoencoder (no encoder.down weights)")
    levels = len({k.split(".")[2] for k in tfile.shapes if k.startswith("decoder.up_blocks.")})
    if levels > 8:  # ch_mult's bound (AE_RULES); each level's rules are matched against each key
        raise ValueError(f"{part}: {levels} decoder.up_blocks, more than the 8 levels a VAE has")
    plan = plan_from(tfile, ae_diffusers(levels) if diffusers else None)
    if config := diffusers and config_beside(part.path, _class_name="AutoencoderKL"):
        params = cfg.ae_from_diffusers_config(*config)
    elif AE_CONFIG_KEY in tfile.metadata:
        where = f"{tfile.source} metadata {AE_CONFIG_KEY}"
        params = cfg.from_json(cfg.AutoEncoderParams, tfile.metadata[AE_CONFIG_KEY], where)
    else:
        params = cfg.ae_from_shapes(plan.shapes, where=str(tfile.source))
    with torch.device("meta"):
        model = ae.AutoEncoder(params)
    check_plan(plan, {k: tuple(v.shape) for k, v in model.state_dict().items()}, tfile)
    return tfile, plan, model


def load_autoencoder(
    src: str | Path | Part,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> ae.AutoEncoder:
    """The FLUX VAE filled tensor by tensor; float32 by default, as diffusers upcasts it."""
    tfile, plan, model = read_autoencoder(src)
    return fill(model, tfile, plan, device, dtype)
