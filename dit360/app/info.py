"""python -m dit360.app.info panorama.png: the settings sample.py and edit.py write into every image
(by `image.save_panorama`), and the command that makes it again. Two forms: `parameters`, the text
A1111, Forge and Civitai show, and `dit360`, our JSON {"version", "script", "flags" (each that sets
a pixel), "loras" ([name, scale, sha256[:12]])}, which batches compare to skip only equal ones."""

import functools
import hashlib
import json
import os
import shlex
from dataclasses import fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from PIL import Image

from ..load.config import FLUX_DEV
from ..load.image import pil_quiet
from .cli import printable, run_main
from .options import DTYPES, EditOptions, Parser, SampleOptions, fail, flag

KEY = "dit360"  # our JSON's key; `parameters` is the web UIs'
RUNTIME = ("device", "offload", "compile", "attention")  # how it runs, not what it makes
HASHES: dict[tuple[str, int, int], str] = {}  # a file's hash by (path, size, mtime): once a run
LORAS: dict[tuple, list[tuple[str, Path, float]]] = {}  # lora_sources by its flags: once a run


@functools.cache
def dit360_version() -> str:
    """The installed package's version (0+unknown when run from a plain checkout)."""
    try:
        return version("dit360")
    except PackageNotFoundError:
        return "0+unknown"


def file_hash(path: Path) -> str:
    """The first 12 hex digits of the file's sha256 (A1111's short LoRA hashes are 10 of them)."""
    st = Path(path).stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        HASHES[key] = h.hexdigest()[:12]
    return HASHES[key]


def record(script: str, opts: SampleOptions | EditOptions, **flags: Any) -> dict:
    """An image's settings: the `script`'s `flags` (but None, False), then `opts` (but RUNTIME)."""
    from .generate import lora_sources

    given = {k: v for k, v in flags.items() if v is not None and v is not False}
    values = {f.name: getattr(opts, f.name) for f in fields(opts) if f.name not in RUNTIME}
    values["dtype"] = next(k for k, v in DTYPES.items() if v == opts.dtype)
    key = (opts.lora, opts.lora_scale, opts.base, opts.transformer)  # what lora_sources reads
    if key not in LORAS:  # a batch's jobs share them: found once, not once an image
        LORAS[key] = lora_sources(opts)
    loras = [[src, scale, file_hash(path)] for src, path, scale in LORAS[key]]
    rec = {"version": dit360_version(), "script": script, "flags": {**given, **values}}
    return json.loads(json.dumps({**rec, "loras": loras}))  # as it reads back: lists, not tuples


def parameters(rec: dict) -> str:
    """The A1111/Forge `parameters` text of a record."""
    f = rec["flags"]
    width = f.get("width", 2 * f["height"])
    fields_ = {
        "Steps": f["steps"], "Sampler": "Euler", "CFG scale": f["true_cfg"],
        "Distilled CFG Scale": f["guidance"], "Seed": f["seed"], "Size": f"{width}x{f['height']}",
        "Model": f.get("base") or FLUX_DEV, "Wrap pad": f["wrap_pad"],
        "Source": f.get("image") or f.get("photo"), "Mask": f.get("mask"),
    }  # fmt: skip
    if rec["loras"]:
        hashes = ", ".join(f"{Path(name).stem}: {h}" for name, _, h in rec["loras"])
        fields_["Lora hashes"] = f'"{hashes}"'
    fields_["Version"] = f"dit360 {rec['version']}"
    neg = f.get("negative_prompt")
    lines = [f["prompt"], *([f"Negative prompt: {neg}"] if neg is not None else [])]
    return "\n".join([*lines, ", ".join(f"{k}: {v}" for k, v in fields_.items() if v is not None)])


def stamp(rec: dict) -> dict[str, str]:
    """The text entries to write into the image: `parameters` and our JSON."""
    return {"parameters": parameters(rec), KEY: json.dumps(rec, ensure_ascii=False)}


def read_record(path: str | Path) -> dict | None:
    """The record written into the image at `path`; None if it has none (or is unreadable)."""
    try:
        with pil_quiet("ignore"), Image.open(path) as f:  # large or corrupt: pixels not read
            text = f.info.get(KEY) or f.info.get("comment")
        rec = json.loads(text.decode() if isinstance(text, bytes) else text)
    except Exception:  # noqa: BLE001 - PIL and json (deep nesting: RecursionError) fail in many ways
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("flags"), dict) else None


def difference(old: dict | None, new: dict) -> str | None:
    """The first setting in which the record `old` differs from `new`; None if none does."""
    if old is None:
        return "it records no settings"
    for k in {**new["flags"], **old["flags"]}:  # a flag either gives, in order
        if (was := old["flags"].get(k)) != (now := new["flags"].get(k)):
            return f"{flag(k, api=False)} is {was!r} there, {now!r} now"
    if old.get("loras") != new["loras"]:
        return f"the LoRAs are {old.get('loras')} there, {new['loras']} now"
    return None


def escaped(c: str) -> str:
    """A character as bash's $'...' (and Python) escape it: \\r, \\x1b, \\', \\U0000202e..."""
    if c > "\x7f":  # \xe9 would be a byte to bash
        return f"\\U{ord(c):08x}"
    return "\\'" if c == "'" else c.encode("unicode_escape").decode()


def quote(arg: str) -> str:
    """A shell word for `arg` on one line: bash's $'...' where it holds \\n, \\r, ESC... (they
    could show another command than the one pasted), else shlex's."""
    if arg.isprintable():
        return shlex.quote(arg)
    return (
        "$'" + "".join(c if c.isprintable() and c not in "'\\" else escaped(c) for c in arg) + "'"
    )


def command(rec: dict, out: str | Path) -> list[str]:
    """The command line that makes the recorded image again, into `out`."""
    defaults = {f.name: f.default for cls in (SampleOptions, EditOptions) for f in fields(cls)}
    argv = ["python", rec["script"]]
    for k, v in rec["flags"].items():
        name = flag(k, api=False)
        if k == "lora" and v is None:
            argv += ["--lora", "none"]
        elif isinstance(v, bool):
            if v != defaults.get(k, False):  # a switch at its default is left out
                argv += [name] if v else [f"--no-{name[2:]}"]
        else:  # a value like an option (--lora -x.safetensors) joined by "=", as argparse needs
            for item in v if isinstance(v, list) else [] if v is None else [v]:
                argv += [f"{name}={item}"] if str(item).startswith("-") else [name, str(item)]
    return [*argv, "--out", str(out)]


def main(argv: list[str] | None = None) -> None:
    """Print an image's recorded settings and the command that makes it again."""
    p = Parser(description=__doc__)
    p.add_argument("image", type=Path)
    p.add_argument("--out", help="the remade image's name in the command (default: NAME-again)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.image):  # False, not OSError, on a name too long
        fail(f"{args.image}: no such file")
    rec = read_record(args.image)
    if rec is None:
        fail(f"{args.image}: records no dit360 settings (made by another tool, or an older dit360)")
    out = args.out or args.image.with_name(f"{args.image.stem}-again{args.image.suffix}")
    try:  # all of it made before a line is printed: a malformed record is one error
        lines = [
            printable(parameters(rec)),
            printable(json.dumps(rec, indent=1, ensure_ascii=False)),
        ]
        lines.append(" ".join(map(quote, command(rec, out))))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        fail(f"{args.image}: its dit360 settings are malformed ({e!r:.80})")
    print(*lines, sep="\n")


if __name__ == "__main__":
    run_main(main)
