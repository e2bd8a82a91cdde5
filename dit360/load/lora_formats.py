"""LoRA files: read the common formats onto our layers (a `LoraPlan`), load, write peft/diffusers.
Read: peft/diffusers (`transformer.<diffusers module>.lora_A.weight`, DiT360's; alpha from its
adapter_config.json), kohya (`lora_unet_<BFL module, _ for .>.lora_down.weight` + `.alpha`),
BFL/ComfyUI (`diffusion_model.<BFL module>.lora_A.weight`, or lora_down/lora_up + `.alpha`).
Reference: peft `src/peft/tuners/lora`; diffusers `loaders/lora_conversion_utils.py`."""

import json
import math
import os
import re
from itertools import accumulate, pairwise
from pathlib import Path
from statistics import mode

import torch
from torch import Tensor, nn

from ..core.lora import Adapter, Part, adapters, add_adapter, linears, merge_lora, sync_hook
from .files import (
    FLAG,
    MAX_REGEX,
    PATHS,
    Rule,
    TensorFile,
    atomic_path,
    check_json,
    follows,
    number,
    open_tensors,
    parse_json,
    read_json,
    regex_paths,
    resolve,
    short,
    whole,
    write_safetensors,
)
from .weights import FLUX_DIFFUSERS, split_sizes, strip_prefix, swap_halves, their_keys

# A train.py run marks its --out with MARKER (dit360.train.checkpoints); checkpoints: step-N/.
MARKER = ".dit360-run"
# A checkpoint (written as a hidden temporary, then renamed), named as f"step-{N:08d}" names it:
# one name a step (not step-5 beside step-00000005, nor other scripts' digits).
STEP_DIR = re.compile(r"step-(\d{8}|[1-9]\d{8,})", re.ASCII)
PEFT_FILES = r"adapter_config\.json|adapter_model\.safetensors"  # a LoRA folder's
# File key endings -> which tensor: peft, diffusers-old and kohya/ComfyUI spellings.
KEY_KINDS = dict.fromkeys([".lora_A.weight", ".lora.down.weight", ".lora_down.weight"], "A")
KEY_KINDS |= dict.fromkeys([".lora_B.weight", ".lora.up.weight", ".lora_up.weight"], "B")
KEY_KINDS[".alpha"] = "alpha"
LoraPlan = dict[str, list[Part]]  # our layer name -> its parts, a LoRA read from a file


DIT360_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")  # diffusers names


def diffusers_modules(model: nn.Module) -> dict[str, tuple[str, str, int, int]]:
    """Each diffusers module name of the model -> (op, our layer, its rows [start, end))."""
    table, hidden = {}, model.params.hidden_size
    for layer, linear in linears(model).items():
        if hit := their_keys(layer + ".weight", FLUX_DIFFUSERS):
            op, keys = hit
            sizes = split_sizes(op, linear.out_features, len(keys), hidden)
            for key, (start, end) in zip(keys, pairwise([0, *accumulate(sizes)]), strict=True):
                table[key.removesuffix(".weight")] = (op, layer, start, end)
    return table


def targeted(module: str, targets: list[str] | tuple[str, ...] | set[str]) -> bool:
    """Whether peft's target_modules name a module: its whole name or its end."""
    return any(module == t or module.endswith("." + t) for t in targets)


def target_rows(
    model: nn.Module, targets: tuple[str, ...] = DIT360_TARGETS
) -> dict[str, list[tuple[int, int]]]:
    """Our layers' rows [start, end) that diffusers-named targets name (as peft: the name's end)."""
    theirs, found = diffusers_modules(model), {}
    if missing := [t for t in targets if not any(targeted(n, [t]) for n in theirs)]:
        kinds = sorted({re.sub(r"^\w+\.\d+\.", "", n) for n in theirs})  # without the block
        raise ValueError(
            f"no layer matches the LoRA targets {', '.join(missing)} (diffusers module names, "
            f"matched as peft does: the name or its end); choose among {', '.join(kinds)}"
        )
    for module, (_, layer, start, end) in theirs.items():
        if targeted(module, targets):
            found.setdefault(layer, []).append((start, end))
    return found


PATTERNS = {"lora_alpha": "alpha_pattern", "r": "rank_pattern"}  # peft's per-module overrides
RANK, ALPHA = whole(1, 2**16), number(-1e6, 1e6)
BOUND = (  # re backtracks: a bound on its ways to match keeps a hostile file from hanging us
    f"(a regular expression: at most {MAX_REGEX} characters and {PATHS:,} ways to match a name, "
    "so no repeat of a repeat or of an alternation)"
)


def patterns(rule: Rule) -> Rule:
    """peft's {module regex: value} (`_configured` matches the regex as a name's suffix)."""
    bounded = lambda v: sum(regex_paths(rf"(.*\.)?({p})$") for p in v) <= PATHS  # noqa: E731
    test = lambda v: bounded(v) and all(follows(x, rule) for x in v.values())  # noqa: E731
    return dict, test, f"an object {{regular expression: {rule[2]}}} {BOUND}"


TARGETS: Rule = (
    (str, list),
    lambda v: regex_paths(v) <= PATHS if isinstance(v, str) else all(isinstance(t, str) for t in v),
    f"a regular expression or a list of module names {BOUND}",
)
OFF: Rule = (bool, lambda v: not v, "null or false: dit360 applies plain LoRA only")
ADAPTER_RULES = {  # what we read of peft's adapter_config.json
    "r": RANK, "lora_alpha": ALPHA, "target_modules": TARGETS, "use_rslora": FLAG,
    "rank_pattern": patterns(RANK), "alpha_pattern": patterns(ALPHA),
    "peft_type": (str, lambda v: v == "LORA", '"LORA" (dit360 reads no LoKr, LoHa, IA3...)'),
} | dict.fromkeys(  # peft options that change what its tensors do (DoRA, aLoRA...): not read
    ["use_dora", "use_qalora", "alora_invocation_tokens", "layers_to_transform", "exclude_modules",
     "layer_replication", "target_parameters", "kasa_config", "arrow_config", "use_bdlora"], OFF
)  # fmt: skip


def _configured(config: dict, key: str, name: str, default: float) -> float:
    """peft's `lora_alpha` or `r` for module `name`: its pattern's first (suffix-regex) match."""
    pattern = (config.get(PATTERNS[key]) or {}).items()
    value = next((v for p, v in pattern if re.match(rf"(.*\.)?({p})$", name)), None)
    return config.get(key, default) if value is None else value


def _scale(name: str, r: int, alpha: Tensor | None, config: dict | None) -> float:
    """alpha / r from the file's `.alpha`, else peft's config; 1 without either (diffusers)."""
    if alpha is not None:
        return float(alpha) / r
    if not config:
        return 1.0  # diffusers' convention without alphas: W + B @ A
    a = _configured(config, "lora_alpha", name, r)
    return a / (math.sqrt(r) if config.get("use_rslora") else r)


def _disagrees(name: str, r: int, config: dict | None) -> str | None:
    """How module `name` with rank `r` contradicts peft's config (peft refuses such a file)."""
    if not config:
        return None
    if (want := _configured(config, "r", name, r)) != r:
        return f"rank {r}, but the config says r {want}"
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear" and not re.fullmatch(targets, name):
        return f"not matched by the config's target_modules {targets!r}"
    if isinstance(targets, list) and not targeted(name, targets):
        return f"not in the config's target_modules {targets}"
    return None


def plan_lora(
    tensors: dict[str, Tensor] | TensorFile,
    model: nn.Module,
    config: dict | None = None,
    source: str = "LoRA",
) -> LoraPlan:
    """Map a LoRA state dict (any supported format) onto `model`'s layers; every key must fit."""
    layers, theirs = linears(model), diffusers_modules(model)
    kohya = {"lora_unet_" + n.replace(".", "_"): n for n in layers}
    groups, unknown, bad, plan = {}, [], [], {}  # groups: module -> {"A" | "B" | "alpha": key}
    for key in tensors:
        if end := next((e for e in KEY_KINDS if key.endswith(e)), None):
            kinds, kind = groups.setdefault(key[: -len(end)], {}), KEY_KINDS[end]
            if kind in kinds:  # two spellings of one tensor (lora_A and lora.down): which one?
                bad.append(f"{key}: a second {kind} beside {kinds[kind]}")
            kinds[kind] = key
        else:
            unknown.append(key)
    for module, keys in groups.items():
        name = kohya.get(module) or strip_prefix(module)
        if name in layers:  # a BFL module: the whole layer
            op, ours, start, end = "", name, 0, layers[name].out_features
        elif name in theirs:  # a diffusers module: its rows of our layer (swap: B's halves)
            op, ours, start, end = theirs[name]
        else:
            unknown.extend(keys.values())
            continue
        if "A" not in keys or "B" not in keys:
            bad.append(f"{module}: has {sorted(keys)}, needs A and B")
            continue
        A, B, n_in = tensors[keys["A"]], tensors[keys["B"]], layers[ours].in_features
        A, B = (t.float() if t.is_floating_point() and t.itemsize == 1 else t for t in (A, B))
        alpha = tensors[keys["alpha"]] if "alpha" in keys else None
        r, rows = A.shape[0] if A.ndim == 2 else 0, f"{ours} rows [{start}:{end}]"
        floats = A.is_floating_point() and B.is_floating_point()
        if r < 1 or not floats or A.shape[1] != n_in or B.shape != (end - start, r):
            shapes = f"A {tuple(A.shape)}, B {tuple(B.shape)}"
            need = f"A (r, {n_in}), B ({end - start}, r) of floats, r >= 1"
            bad.append(f"{module}: {shapes}; {rows} needs {need}")
        elif alpha is not None and (alpha.numel() != 1 or not alpha.float().isfinite().all()):
            got = f"shape {tuple(alpha.shape)}" if alpha.numel() != 1 else alpha.item()
            bad.append(f"{module}: its .alpha must be one finite number, got {got}")
        elif any(p.start < end and start < p.end for p in plan.get(ours, [])):  # kohya + peft
            bad.append(f"{module}: a second LoRA for {rows}")
        elif problem := _disagrees(name, r, config):
            bad.append(f"{module}: {problem}")
        else:
            scale = _scale(name, r, alpha, config)
            B = swap_halves(B) if op == "swap" else B  # diffusers' row order -> ours
            plan.setdefault(ours, []).append(Part(start, end, A, B, scale, tuple(keys.values())))
    if unknown or bad:
        listed = lambda xs: f"[{', '.join(map(short, xs[:8]))}]"  # noqa: E731  # a key may be 1 MB
        what = [f"{len(unknown)} keys that match no layer: {listed(unknown)}"] if unknown else []
        what += [f"{len(bad)} bad: {listed(bad)}"] if bad else []
        raise ValueError(f"{source} does not fit the model: " + "; ".join(what))
    if not plan:
        raise ValueError(f"{source} holds no LoRA tensors")
    return plan


def steps(folder: Path) -> dict[int, Path]:
    """The checkpoint folders `step-N` by step (complete: a checkpoint is written, then renamed)."""
    found = ((STEP_DIR.fullmatch(p.name), p) for p in folder.glob("step-*"))
    return {int(m[1]): p for m, p in found if m and p.is_dir()}


def unfinished_run(folder: Path) -> str:
    """Why a train.py run (--out) without its final lora/ is no LoRA, and what to give; or ""."""
    if not (folder / MARKER).exists():
        return ""
    last = max(steps(folder / "checkpoints").items(), default=None)
    instead = f"give its latest checkpoint, {last[1]}" if last else "it has no checkpoint yet"
    return f"{folder} is a training run that has not written its final lora/ yet: {instead}"


def find_lora(src: str | Path) -> Path:
    """The LoRA .safetensors of a repo id (fetched), folder or file; a run/step-N/: its lora/."""
    path = resolve(src, ["*.safetensors", "*.json"], "a LoRA .safetensors file or a folder of one")
    if path.is_dir():
        usual = ["adapter_model.safetensors", "pytorch_lora_weights.safetensors"]
        usual = [path / n for n in usual] + [path / "lora" / usual[0]]  # a run's, a checkpoint's
        files = [f for f in usual if f.is_file()] or sorted(path.glob("*.safetensors"))
        if len(files) != 1:  # peft's and diffusers' names both: each reads its own, we neither
            names = [str(f.relative_to(path)) for f in files]
            found = f"{path} must hold one LoRA .safetensors file, found {names}"
            looked = ", ".join(str(f.relative_to(path)) for f in usual)
            none = f"{path} holds no LoRA: looked for {looked} or one *.safetensors in it: give "
            none += "a LoRA's .safetensors or its folder (a train.py run's lora/)"
            raise FileNotFoundError(found if files else none)
        path = files[0]
    return path


def read_lora(src: str | Path, model: nn.Module) -> LoraPlan:
    """Read a LoRA from a repo id, folder or .safetensors file and map it onto `model`."""
    path = find_lora(src)
    tfile, config = open_tensors(path, scaled=False), None
    if "scaled_fp8" in tfile.shapes:  # ComfyUI writes it in models only: read as one, it is not
        raise ValueError(f"{path} holds scaled_fp8, a marker of ComfyUI's fp8 models: no LoRA")
    if (config_file := path.parent / "adapter_config.json").is_file():
        config = check_json(read_json(config_file), ADAPTER_RULES, str(config_file))
    elif meta := tfile.metadata.get("lora_adapter_metadata"):  # diffusers' save_lora_weights
        where = f"{path} metadata lora_adapter_metadata"
        meta = check_json(parse_json(meta, where), {}, where)
        config = {k[12:]: v for k, v in meta.items() if k.startswith("transformer.")}
        check_json(config, ADAPTER_RULES, f"{where} (transformer.*)")
    return plan_lora(tfile, model, config, str(path))  # read lazily: a full checkpoint is refused


def lora_names(model: nn.Module) -> set[str]:
    """The names of the LoRAs applied to the model."""
    return {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, Adapter)}


def attach(model: nn.Module, plan: LoraPlan, name: str, multiplier: float = 1.0) -> nn.Module:
    """Add a read LoRA to the model, unmerged, in the dtype of the weights."""
    finite(multiplier)  # before a layer changes
    if name in lora_names(model):
        raise ValueError(f"a LoRA named {name!r} is already applied")
    for layer, parts in plan.items():
        parts, lin = sorted(parts, key=lambda p: p.start), model.get_submodule(layer)
        ad = add_adapter(lin, name, [(p.start, p.end, p.A.shape[0], p.scale) for p in parts])
        with torch.no_grad():
            ad.A.copy_(torch.cat([p.A for p in parts]))
            for b, p in zip(ad.B, parts, strict=True):
                b.copy_(p.B)
    return set_scale(model, multiplier, name)


def finite(scale: float) -> bool:
    """True, or ValueError if `scale` is not a finite number (NaN weights, or a str kept)."""
    if not (isinstance(scale, int | float) and math.isfinite(scale)):
        raise ValueError(f"a LoRA's scale must be a finite number, got {scale!r}")
    return True


def set_scale(model: nn.Module, scale: float, name: str | None = None) -> nn.Module:
    """Change the weight of unmerged LoRAs (all, or the one named); ValueError if none so named."""
    if finite(scale) and name is not None and name not in (names := lora_names(model)):
        raise ValueError(f"no LoRA named {name!r} is applied; those applied: {sorted(names)}")
    for _, layer, ad in adapters(model, name):
        if ad.merged:
            raise ValueError("unmerge the LoRA before changing its scale")
        ad.multiplier = scale
        sync_hook(layer)
    return model


def load_lora(
    model: nn.Module, src: str | Path, scale: float = 1.0, merge: bool = False
) -> nn.Module:
    """Apply a LoRA (repo id, folder or file; any format) at `scale`, unmerged or `merge`d."""
    plan, names = read_lora(src, model), lora_names(model)
    name = next(f"lora{i}" for i in range(len(names) + 1) if f"lora{i}" not in names)
    attach(model, plan, name, scale)
    return merge_lora(model, name) if merge else model


def to_diffusers(plan: LoraPlan, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, tuple]]:
    """peft tensors of a plan (each diffusers module: A and its rows of B), (rank, alpha) each."""
    tensors, ranks, theirs = {}, {}, diffusers_modules(model)
    for layer, parts in plan.items():
        modules = {m: v for m, v in theirs.items() if v[1] == layer}  # in row order
        for p in parts:
            inside = {m: v for m, v in modules.items() if p.start <= v[2] < v[3] <= p.end}
            if sum(v[3] - v[2] for v in inside.values()) != p.end - p.start:
                bounds = [0, *(v[3] for v in modules.values())]
                raise ValueError(f"{layer}[{p.start}:{p.end}] splits diffusers modules {bounds}")
            r, alpha = p.A.shape[0], p.scale * p.A.shape[0]
            for module, (op, _, start, end) in inside.items():
                if module in ranks:
                    raise ValueError(f"two LoRA parts act on {module}: peft holds only one")
                B = p.B[start - p.start : end - p.start]
                B = swap_halves(B) if op == "swap" else B  # our row order -> diffusers'
                tensors[f"transformer.{module}.lora_A.weight"] = p.A
                tensors[f"transformer.{module}.lora_B.weight"] = B
                exact = float(alpha).is_integer() and abs(alpha) < 2**53  # an int as peft writes
                ranks[module] = (r, int(alpha) if exact else alpha)
    return tensors, ranks


def write_peft(
    plan: LoraPlan,
    model: nn.Module,
    out_dir: str | Path,
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` (peft/diffusers) as one folder
    (a previous one replaced whole: FileExistsError if it holds other files)."""
    tensors, ranks = to_diffusers(plan, model)
    unfit = [k for k, t in tensors.items() if not t.isfinite().all()]
    unfit += [m for m, (_, alpha) in ranks.items() if not math.isfinite(alpha)]
    if unfit:
        raise ValueError(
            f"the LoRA holds NaN or inf (in {unfit[0]}; a diverged training run?): not written"
        )
    r, alpha = mode(v[0] for v in ranks.values()), mode(v[1] for v in ranks.values())
    # target_modules: the short names (attn.to_q, ...) if they select exactly these modules
    short = {re.sub(r"^(single_)?transformer_blocks\.\d+\.", "", m) for m in ranks}
    chosen = {m for m in diffusers_modules(model) if targeted(m, short)}
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(short if chosen == set(ranks) else ranks),
        "rank_pattern": {m: v[0] for m, v in ranks.items() if v[0] != r},
        "alpha_pattern": {m: v[1] for m, v in ranks.items() if v[1] != alpha},
        "lora_dropout": dropout,
        "init_lora_weights": "gaussian",
    }
    # diffusers ignores adapter_config.json and reads alpha from this metadata entry instead.
    meta = {"transformer." + k: v for k, v in config.items()}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}
    specs = {k: (dtype or t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    stream = ((k, t.detach().to(dtype or t.dtype)) for k, t in tensors.items())
    with atomic_path(out_dir, PEFT_FILES) as tmp:  # both files appear (over old ones) at once
        write_safetensors(tmp / "adapter_model.safetensors", specs, stream, meta)
        (tmp / "adapter_config.json").write_text(
            json.dumps(config, indent=2) + "\n", encoding="utf-8"
        )
    return Path(out_dir)


def export_peft(model: nn.Module, out_dir: str | Path, name: str | None = None) -> Path:
    """Write a LoRA of the model (the only one, or the one named) in the peft/diffusers format."""
    names = sorted(lora_names(model))
    name = names[0] if name is None and len(names) == 1 else name
    if name not in names:
        raise ValueError(f"the model holds LoRAs {names}: name the one to export")
    plan = {layer: ad.parts() for layer, _, ad in adapters(model, name)}
    dropout = next(getattr(ad.dropout, "p", 0.0) for *_, ad in adapters(model, name))
    return write_peft(plan, model, out_dir, dropout)


def paired_loras(
    lora: str | tuple[str, ...] | None, scale: float | tuple[float, ...]
) -> tuple[tuple[str, ...] | None, tuple[float, ...]]:
    """--lora (one, several, none: None) paired with --lora-scale (one for all, or one each)."""
    names = [lora] if lora is None or isinstance(lora, str | os.PathLike) else list(lora)
    names = [None if n is None or str(n).lower() == "none" else str(n) for n in names]
    scales = tuple(scale) if isinstance(scale, tuple | list) else (scale,)
    said = " ".join(f"{s:g}" for s in scales)
    if None in names and len(names) > 1:
        raise ValueError(
            f"--lora none cannot be combined with other LoRAs (got {len(names)}): give none alone, "
            "or drop it"
        )
    if names == [None]:
        if any(s != 1.0 for s in scales):  # it would scale nothing
            raise ValueError(
                f"--lora-scale {said} needs --lora, which is none: give a LoRA or drop --lora-scale"
            )
        return None, ()
    same = [os.path.realpath(n) if os.path.exists(n) else n for n in names]  # ./a/ is a
    if twice := next((n for n, s in zip(names, same, strict=True) if same.count(s) > 1), None):
        raise ValueError(f"--lora {twice} is given twice: give it once, weighted by --lora-scale")
    if len(scales) not in (1, len(names)):
        raise ValueError(
            f"--lora-scale {said}: {len(scales)} scales for {len(names)} LoRAs; give one scale "
            "for all, or one per --lora in order"
        )
    return tuple(names), scales * len(names) if len(scales) == 1 else scales
