"""Where each model's weights are (transformer, T5-XXL, CLIP-L, VAE, the two tokenizers), found in
the layouts users hold (FLUX.1-dev's diffusers folders, ComfyUI files by name and content, one
bundled .safetensors) and resolved before anything loads: README "The weights you have".
"""

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import TypeVar

from .config import FLUX_DEV
from .files import TensorFile, check_json, open_tensors, read_json, resolve

T = TypeVar("T")
PARTS = ("transformer", "t5", "clip", "vae")
TOKENIZERS = ("clip_tokenizer", "t5_tokenizer")
FOLDERS = {  # FLUX.1-dev's (diffusers) folders
    "transformer": "transformer", "t5": "text_encoder_2", "clip": "text_encoder", "vae": "vae",
    "clip_tokenizer": "tokenizer", "t5_tokenizer": "tokenizer_2",
}  # fmt: skip
BUNDLE = {  # the key prefix of each model in a ComfyUI checkpoint
    "transformer": "model.diffusion_model.", "t5": "text_encoders.t5xxl.transformer.",
    "clip": "text_encoders.clip_l.transformer.", "vae": "vae.",
}  # fmt: skip
MARKERS = {  # a key every layout of the model has (our/BFL, diffusers, transformers 4 and 5)
    "transformer": ("img_in.weight", "x_embedder.weight"),
    "t5": ("encoder.final_layer_norm.weight",),
    "clip": ("text_model.final_layer_norm.weight", "final_layer_norm.weight"),
    "vae": ("decoder.conv_in.weight",),
}
NAMES = {  # ComfyUI's file names, as its model folders hold them
    "transformer": ("flux*.safetensors",), "t5": ("t5xxl*.safetensors",),
    "clip": ("clip_l*.safetensors",), "vae": ("ae.safetensors", "*vae*.safetensors"),
}  # fmt: skip
WHAT = {"transformer": "FLUX transformer", "t5": "T5-XXL", "clip": "CLIP-L", "vae": "VAE"}
EXAMPLE = {
    "transformer": "flux1-dev.safetensors", "t5": "t5xxl_fp16.safetensors",
    "clip": "clip_l.safetensors", "vae": "ae.safetensors",
}  # fmt: skip
TOKENIZER_REPOS = {  # ungated; FLUX.1-dev's tokenizer/ and tokenizer_2/ are copies of these
    "clip_tokenizer": ("openai/clip-vit-large-patch14", ["vocab.json", "merges.txt", "*.json"]),
    "t5_tokenizer": ("google/t5-v1_1-xxl", ["spiece.model", "tokenizer*.json", "special*.json"]),
}
# Prefixes tools put before a transformer's keys: ComfyUI and merged files (BFL names), diffusers
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
LAYOUT = (
    "a FLUX.1-dev folder or repo id, a folder of ComfyUI model files, or a .safetensors file "
    "(then name the parts it lacks with --transformer, --t5, --clip, --vae)"
)


@dataclass(frozen=True)
class Part:
    """One model's weights: a .safetensors file or folder, and its key prefix in a bundle."""

    path: Path
    prefix: str = ""
    axes_dim: tuple[int, ...] | None = None  # RoPE axes for a file that lacks them (--base's)

    def open(self) -> TensorFile:
        """Its tensors (headers only until read), named without the prefix."""
        return open_tensors(self.path, self.prefix)

    def __str__(self) -> str:
        return f"{self.path} ({self.prefix}*)" if self.prefix else str(self.path)


@dataclass(frozen=True)
class Sources:
    """Every model's weights and both tokenizer folders."""

    clip_tokenizer: Path
    t5_tokenizer: Path
    transformer: Part | None = None  # None: not asked for
    t5: Part | None = None
    clip: Part | None = None
    vae: Part | None = None
    # where each came from, to lead its errors: the flag given, or the repo id of a cached one
    origin: dict[str, str] = field(default_factory=dict, compare=False)


def config_beside(path: Path, **match: str) -> tuple[dict, Path] | None:
    """The config.json (and its path) in a part's folder or beside its file, if it has `match`."""
    file = (path if path.is_dir() else path.parent) / "config.json"
    config = check_json(read_json(file), {}, str(file)) if file.is_file() else {}
    return (config, file) if all(config.get(k) == v for k, v in match.items()) else None


def in_file(tfile: TensorFile, part: str) -> str | None:
    """The prefix under which `tfile` holds `part` ("" if unprefixed), or None if it does not."""
    prefixes = [BUNDLE[part], *(TRANSFORMER_PREFIXES if part == "transformer" else ()), ""]
    keys = tfile.shapes.keys()
    found = {p for p in prefixes if any(p + m in keys for m in MARKERS[part])}
    if len(found) > 1:  # which copy is meant is unknown
        raise ValueError(f"{tfile.source} holds a {WHAT[part]} twice, as {sorted(found)}: keep one")
    return next(iter(found), None)


def in_folder(folder: Path, part: str) -> Part | None:
    """`part` in a folder: its FLUX.1-dev subfolder, own weights, or one ComfyUI file; or None."""
    if (folder / FOLDERS[part]).is_dir():
        return Part(folder / FOLDERS[part])
    if any(folder.glob("*.safetensors")):
        try:
            tfile = open_tensors(folder)
        except FileNotFoundError:  # several files: not one model's folder (with an index: is)
            if any(folder.glob("*.safetensors.index.json")):
                raise
            tfile = None
        if tfile is not None and (prefix := in_file(tfile, part)) is not None:
            return Part(folder, prefix)
    files = sorted(f for pattern in NAMES[part] for f in folder.rglob(pattern) if f.is_file())
    named = {(f.stat().st_dev, f.stat().st_ino): f for f in reversed(files)}  # links: one file
    prefixes = {f: in_file(open_tensors(f), part) for f in sorted(named.values())}
    found = [Part(f, p) for f, p in prefixes.items() if p is not None]
    if len(found) > 1:
        names = ", ".join(str(p.path.relative_to(folder)) for p in found)
        raise ValueError(
            f"{folder}: several files hold a {WHAT[part]} ({names}); pick one: --{part}"
        )
    return found[0] if found else None


def find_part(src: str | Path, part: str) -> Part:
    """`part` in a file, a folder or a repo id (only its folder for `part` is fetched)."""
    expected = f"a {WHAT[part]} .safetensors file or folder, e.g. {EXAMPLE[part]}"
    path = resolve(src, [f"{FOLDERS[part]}/*", "*.json"], expected)
    if (found := find_in(path, part)) is None:
        raise ValueError(f"{path} holds no {WHAT[part]}; expected {expected}")
    return found


def find_in(path: Path, part: str) -> Part | None:
    """`part` in a folder (`in_folder`) or one .safetensors file (alone or bundled), or None."""
    if path.is_dir():
        return in_folder(path, part)
    prefix = in_file(open_tensors(path), part)
    return None if prefix is None else Part(path, prefix)


def tokenizer(root: Path | None, name: str, home: str) -> tuple[Path, str]:
    """A tokenizer folder and its origin: --base's (`home`) if it has one, else the hub repo's."""
    folder = root / FOLDERS[name] if root is not None and root.is_dir() else None
    if folder is not None and (folder.exists() or folder.is_symlink()):  # a loop: its error
        return folder, home
    repo, files = TOKENIZER_REPOS[name]
    expected = f"the tokenizer of {repo} (or --base with {FOLDERS[name]}/)"
    return flagged(repo, resolve, repo, files, expected), repo


def base_axes(root: Path) -> tuple[int, ...] | None:
    """The RoPE axes in --base's diffusers config (a --transformer not 128 wide lacks them)."""
    folder = root / FOLDERS["transformer"] if (root / FOLDERS["transformer"]).is_dir() else root
    found = config_beside(folder, _class_name="FluxTransformer2DModel")
    axes = found and found[0].get("axes_dims_rope")
    return tuple(axes) if isinstance(axes, list) else None  # its values: checked with the model


def fetch_base(base: str | None, wanted: list[str]) -> Path:
    """--base (default FLUX.1-dev) found or fetched; for the gated FLUX.1-dev, how to get it."""
    if (base or FLUX_DEV) != FLUX_DEV:
        return flagged("--base", resolve, base, wanted, LAYOUT)
    try:
        return flagged("--base", resolve, FLUX_DEV, wanted)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e}. It is gated: accept its license on https://huggingface.co/{FLUX_DEV} while "
            "logged in, and log in here with `hf auth login` (or set HF_TOKEN) before downloading"
        ) from None


@cache
def resolve_sources(
    base: str | None = None,
    transformer: str | None = None,
    t5: str | None = None,
    clip: str | None = None,
    vae: str | None = None,
    parts: tuple[str, ...] = PARTS,
) -> Sources:
    """Every part of `parts` from its flag, else `base` (default FLUX.1-dev); tokenizers too."""
    flags = dict(transformer=transformer, t5=t5, clip=clip, vae=vae)
    flags = {p: src for p, src in flags.items() if p in parts}
    found = {p: flagged(f"--{p}", find_part, src, p) for p, src in flags.items() if src is not None}
    missing, root = [p for p in parts if p not in found], None
    home = "--base" if base is not None else FLUX_DEV  # the parts no flag gives: from the cache
    origin = {p: f"--{p}" for p in found} | dict.fromkeys(missing, home)
    if missing or base is not None:
        wanted = [f"{FOLDERS[p]}/*" for p in (*missing, *TOKENIZERS)] + ["model_index.json"]
        root = fetch_base(base, [*wanted, "transformer/config.json"])
        if "transformer" in found and (axes := flagged(home, base_axes, root)):
            found["transformer"] = replace(found["transformer"], axes_dim=axes)
        from_base = {p: flagged(home, find_in, root, p) for p in missing}
        if absent := [p for p, part in from_base.items() if part is None]:
            has = [WHAT[p] for p, part in from_base.items() if part is not None]
            holds = f"holds the {' and '.join(has)} but" if has else "holds"
            give = ", ".join(f"--{p} (e.g. {EXAMPLE[p]})" for p in absent)
            alone = has == [WHAT["transformer"]] and root.is_file()
            instead = f"pass it as --transformer (the rest from {FLUX_DEV})" if alone else ""
            raise ValueError(
                f"--base {root} {holds} no {', '.join(WHAT[p] for p in absent)}: give {give}, "
                f"or {instead or '--base a FLUX.1-dev folder or repo id'}"
            )
        found |= from_base
    for name in TOKENIZERS:
        found[name], origin[name] = tokenizer(root, name, home)
    return Sources(**found, origin=origin)


# The kinds of error callers tell apart; a flagged error is raised again as the first it is (an
# exception's own class may need more than a message: JSONDecodeError, UnicodeDecodeError).
KINDS = (FileNotFoundError, PermissionError, OSError, ValueError)


def flagged(flag: str, find: Callable[..., T], *args: object) -> T:
    """find(*args), an error's message led by `flag` (or repo id) unless led by a flag or by it."""
    try:
        return find(*args)
    except KINDS as e:
        message = str(e) if str(e).startswith(("--", flag)) else f"{flag}: {e}"
        raise next(k for k in KINDS if isinstance(e, k))(message) from None
