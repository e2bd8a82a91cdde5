"""Where weights come from (file, sharded folder, Hugging Face repo), reading and writing them one
tensor at a time, atomic writes, and the user's text and JSON files (checked, or a clear error).
safetensors (https://github.com/huggingface/safetensors): an 8-byte header length, a JSON header,
the raw bytes; read with plain file I/O, not mmap (mapped pages stay resident until closed).
"""

import ctypes
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


@dataclass
class TensorFile:
    """The tensors of one safetensors file or of a sharded folder, read one at a time."""

    files: dict[str, Path]  # tensor name -> file holding it
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    metadata: dict[str, str]
    source: Path
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # byte range in its file
    scales: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # scale, shape

    def get(self, key: str) -> Tensor:
        """One tensor read into memory; a scaled fp8 weight comes back dequantized, in float32."""
        t = self._read(key).reshape(self.shapes[key])
        if scale := self.scales.get(key):  # as ComfyUI multiplies: broadcast (a scalar, a row)
            t = t.float() * self._read(scale[0]).float().reshape(scale[1])
        return t

    __getitem__ = get  # a mapping of names to tensors, each read when asked for

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def _read(self, key: str) -> Tensor:
        """The tensor's bytes in its dtype, flat."""
        start, end = self.spans[key]
        data = torch.empty(end - start, dtype=torch.uint8)
        with open(self.files[key], "rb") as f:
            f.seek(start)
            if f.readinto(data.numpy()) != end - start:
                raise ValueError(f"{self.files[key]} ended early at {short(key)}: download again")
        return data.view(self.dtypes[key])

    def where(self, key: str) -> str:
        """The file a tensor lives in, for error messages."""
        return str(self.files.get(key, self.source))


# Limits of the safetensors format (its header is at most 100 MB) and of what we accept in one file.
MAX_HEADER, MAX_TENSORS, MAX_DIM = 100_000_000, 100_000, 2**40
MAX_TEXT = 100_000_000  # a text file we read (prompts, rows): far more than any real one
# A regular expression's length, a module name's (FLUX's: at most 43), re's ways to match a name
MAX_REGEX, NAME, PATHS = 1000, 64, 10**6
sre = getattr(re, "_parser", None) or __import__("sre_parse")  # CPython's parser of re (3.10: sre_)


def _read_file(path: Path, into: TensorFile | None = None) -> TensorFile:
    """A safetensors header parsed (into `into`: shards), every entry checked before allocating."""
    size = path.stat().st_size
    bad = f"{path} is not a readable safetensors file"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
            if n > MAX_HEADER:  # over the format's limit (a .png, .json, text): read no more
                why = "its first 8 bytes are no header length"
                raise ValueError(
                    f"{path}: not a safetensors file ({why}): give a .safetensors or its folder"
                )
            if n > size - 8:
                raise ValueError(f"{bad}: it may be truncated or corrupt, download it again")
            header = parse_json(f.read(n), f"{bad}: its header")
    except OSError as e:  # a read's error (EIO) names no file
        e.filename = e.filename or str(path)
        raise
    header = check_json(header, {"__metadata__": STR_MAP}, f"{path}: header")
    tfile = into or TensorFile({}, {}, {}, {}, path)
    if (count := len(header) + len(tfile.files)) > MAX_TENSORS:  # a folder's: all its shards'
        raise ValueError(f"{tfile.source}: {count} tensors, more than the {MAX_TENSORS} we read")
    metadata = header.pop("__metadata__", None) or {}
    tfile.metadata = tfile.metadata or metadata  # a folder's: its first shard's
    data = size - 8 - n
    for key, info in header.items():
        check_json(info, TENSOR, f"{path}: tensor {short(key)}", required=tuple(TENSOR))
        (start, end), dtype, shape = info["data_offsets"], ST_DTYPES[info["dtype"]], info["shape"]
        if not start <= end <= data or end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(
                f"{bad}: {short(key)} lies outside the file: truncated? download again"
            )
        if key in tfile.files:  # two shards (or links to one file): which is right is unknown
            raise ValueError(f"{path}: {short(key)} is also in {tfile.files[key]}: download again")
        tfile.files[key], tfile.shapes[key], tfile.dtypes[key] = path, tuple(shape), dtype
        tfile.spans[key] = (8 + n + start, 8 + n + end)
    # no byte in two tensors (the format's rule): the tensors, so the model, fit in the file
    spans = sorted((*info["data_offsets"], key) for key, info in header.items())
    if clash := next((b for a, b in pairwise(spans) if a[1] > b[0]), None):
        raise ValueError(f"{bad}: {short(clash[2])} overlaps another tensor: download again")
    return tfile


def open_tensors(path: str | Path, prefix: str = "", scaled: bool = True) -> TensorFile:
    """A .safetensors file or a folder (one, or shards); `prefix`: only its tensors, unprefixed;
    `scaled`: ComfyUI's scaled fp8 read as such (a model's), else its keys kept as they are."""
    tfile = _open(Path(path))
    if prefix:
        keys = {k: k[len(prefix) :] for k in tfile.shapes if k.startswith(prefix)}
        view = TensorFile({}, {}, {}, tfile.metadata, tfile.source)
        for table in ("files", "shapes", "dtypes", "spans"):
            getattr(view, table).update({new: getattr(tfile, table)[k] for k, new in keys.items()})
        tfile = view
    # ComfyUI's "scaled fp8": float8 `X.weight` * float32 `X.scale_weight` (biases unscaled),
    # `X.scale_input` (for fp8 matmuls, unused: we dequantize) and a `scaled_fp8` marker
    if scaled and "scaled_fp8" in tfile.shapes:
        for key in [k for k in tfile.shapes if k.endswith((".scale_weight", ".scale_input"))]:
            weight, shape = key.rsplit(".", 1)[0] + ".weight", tfile.shapes.pop(key)
            if key.endswith(".scale_weight") and (full := tfile.shapes.get(weight)) is not None:
                ends = zip(shape, full[len(full) - len(shape) :], strict=True)  # broadcast to it
                if len(shape) > len(full) or any(s not in (1, w) for s, w in ends):
                    raise ValueError(
                        f"{tfile.where(key)}: {short(key)} {shape} does not scale {full}"
                    )
                tfile.scales[weight] = (key, shape)  # still readable; no longer in `shapes`
        del tfile.shapes["scaled_fp8"]
    return tfile


def _open(path: Path) -> TensorFile:
    """open_tensors without the prefix and the scales."""
    if path.is_file():
        return _read_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())  # no FIFO: no wait
    if len(indexes) == 1:
        index = check_json(read_json(indexes[0]), INDEX, str(indexes[0]), required=("weight_map",))
        weight_map = index["weight_map"]
        shards = [path / name for name in sorted(set(weight_map.values()))]
        if missing := [str(p) for p in shards if not p.is_file()]:
            raise FileNotFoundError(f"{indexes[0]} lists shards that are missing: {missing[:5]}")
        tfile = TensorFile({}, {}, {}, {}, path)
        for shard in shards:
            _read_file(shard, into=tfile)
        if absent := sorted(set(weight_map) - set(tfile.shapes)):
            raise ValueError(f"{indexes[0]} names tensors no shard holds: {absent[:5]}")
        return tfile
    if len(indexes) == 0 and len(files) == 1:
        return _read_file(files[0])
    found = sorted(p.name for p in path.iterdir())[:8]
    raise FileNotFoundError(
        f"{path} must hold one .safetensors file or one *.safetensors.index.json with its shards; "
        f"found {found}"
    )


def resolve(src: str | Path, allow_patterns: list[str] | None = None, expected: str = "") -> Path:
    """A local path, or a Hugging Face repo id fetched (`allow_patterns`) to the cache (HF_HOME)."""
    hint = f"; expected {expected}" if expected else ""
    path = Path(src).expanduser()
    if path.exists():
        return path
    parts = str(src).split("/")  # a repo id is 'owner/name', with no path syntax
    if len(parts) != 2 or not all(parts) or str(src).startswith((".", "~")):
        raise FileNotFoundError(f"{src}: no such file or folder (nor a Hugging Face repo id){hint}")
    from huggingface_hub import constants, errors, snapshot_download

    try:
        return Path(snapshot_download(str(src), allow_patterns=allow_patterns))
    except errors.GatedRepoError:
        raise PermissionError(
            f"{src} is gated: accept its license on https://huggingface.co/{src} while logged in, "
            "then log in with `hf auth login` or set HF_TOKEN"
        ) from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(
            f"Hugging Face repo {src} not found (or private: log in with `hf auth login`){hint}"
        ) from None
    except errors.LocalEntryNotFoundError:  # what to fetch, as the Hub's command line does it
        get = f"hf download {src}" + "".join(f" --include '{p}'" for p in allow_patterns or ())
        raise FileNotFoundError(
            f"{src} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and cannot be "
            f"downloaded now (HF_HUB_OFFLINE=1 or no network): download it once with `{get}`, "
            f"or pass a local folder{hint}"
        ) from None


def read_text(path: str | Path) -> str:
    """A text file read as UTF-8 (a leading BOM dropped); ValueError naming the file if it is not,
    is not a regular file (a FIFO or /dev/zero: no wait, no read without end) or is over 100 MB."""
    # O_NONBLOCK (POSIX): a FIFO opens without waiting for a writer; O_BINARY (Windows): no CRLF
    # translation, no Ctrl-Z as the end (an fd os.open gives is in text mode there)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG((info := os.fstat(fd)).st_mode):  # /dev/zero, a FIFO, a folder
            raise ValueError(f"{path}: not a regular file: give a text file")
        with open(fd, "rb", closefd=False) as f:  # its size, and on: /proc's files say 0
            parts = [f.read(info.st_size + 1)] if info.st_size <= MAX_TEXT else []
            while parts and sum(map(len, parts)) <= MAX_TEXT and (more := f.read(1 << 20)):
                parts.append(more)
    except OSError as e:  # /proc/self/mem's, whose line would not name the file
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    finally:
        os.close(fd)
    if info.st_size > MAX_TEXT or len(data := b"".join(parts)) > MAX_TEXT:
        raise ValueError(f"{path}: over {MAX_TEXT:,} bytes, more than a text file we read")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}): save it as UTF-8") from None


# The one checker of the JSON we read (configs, headers, adapter configs): a key's rule is
# (types, test, what the value must be); an int is no bool and a bool no int.
Rule = tuple[type | tuple[type, ...], Callable[[Any], bool], str]


def short(value: object) -> str:
    """A value (a key, a name) for a one-line message: its repr, cut to 200 characters (FLUX's
    longest LoRA key is 66; a file's key may be a megabyte)."""
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def parse_json(text: str | bytes, where: str) -> Any:
    """JSON text parsed; ValueError naming `where` if it is not UTF-8 JSON."""
    try:
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg}, line {e.lineno}): fix it") from None
    except (ValueError, RecursionError) as e:  # a 5,000-digit number, [[[...]]] nested 10^5 deep
        raise ValueError(f"{where} is not JSON we read ({short(str(e))}): fix it") from None


def read_json(path: str | Path) -> Any:
    """A JSON file parsed; ValueError naming the file if it is not UTF-8 JSON."""
    return parse_json(read_text(path), str(path))


def follows(value: object, rule: Rule) -> bool:
    """Whether `value` has one of the rule's types (an int is no bool) and passes its test."""
    types = rule[0] if isinstance(rule[0], tuple) else (rule[0],)
    typed = isinstance(value, types) and isinstance(value, bool) == (bool in types)
    return typed and rule[1](value)


def check_json(
    obj: object, rules: dict[str, Rule], where: str, required: tuple[str, ...] = (), only=False
) -> dict:
    """`obj` as a JSON object whose keys follow `rules`, or ValueError naming `where` and the key.
    A key absent or null is not checked unless `required`; with `only`, no other key and no null."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object {{...}}, got {short(obj)}")
    if missing := [k for k in required if obj.get(k) is None]:
        raise ValueError(f"{where}: {missing[0]!r} is missing: add it")
    if only and (extra := [k for k in obj if k not in rules]):
        raise ValueError(f"{where}: unknown key {short(extra[0])}; the keys are {list(rules)}")
    for key, rule in rules.items():  # null: absent in diffusers' configs, wrong in ours (`only`)
        if (obj.get(key) is not None or only and key in obj) and not follows(obj[key], rule):
            raise ValueError(f"{where}: {key!r} must be {rule[2]}, got {short(obj[key])}")
    return obj


def whole(low: int, high: int) -> Rule:
    """An integer in [low, high]."""
    return int, lambda v: low <= v <= high, f"an integer in [{low}, {high}]"


def number(low: float, high: float) -> Rule:
    """A finite number in [low, high]."""
    return (int, float), lambda v: low <= v <= high, f"a finite number in [{low:g}, {high:g}]"


def listed(rule: Rule, lengths: range = range(1 << 20)) -> Rule:
    """A list of `lengths` values, each following `rule`."""
    size = f"{lengths.start} " if len(lengths) == 1 else ""
    what = f"a list of {size}values, each {rule[2]}"
    test = lambda v: len(v) in lengths and all(follows(x, rule) for x in v)  # noqa: E731
    return (list, tuple), test, what


def mapping(rule: Rule) -> Rule:
    """An object {str: value following `rule`}."""
    what = f"an object whose values are each {rule[2]}"
    return dict, lambda v: all(follows(x, rule) for x in v.values()), what


def paths(items: sre.SubPattern) -> int:
    """At most how many ways re's backtracking tries `items` on a NAME-long name (<= PATHS + 1)."""
    ways = 1  # a choice (an alternative, a repeat's count) multiplies them; a repeated choice nests
    for op, av in items:
        if str(op).endswith("_REPEAT"):  # MAX_, MIN_, POSSESSIVE_ (3.11+); failed counts too
            way = sum(paths(av[2]) ** k for k in range(min(av[1], NAME) + 1))
        elif op is sre.BRANCH:
            way = sum(map(paths, av[1]))
        else:  # a group, lookaround, atomic group, condition (yes x no): its parts; else one way
            parts = av if type(av) is tuple else (av,)
            way = math.prod(paths(a) for a in parts if type(a) is sre.SubPattern)
        ways = min(ways * way, PATHS + 1)
    return ways


def regex_paths(text: str) -> int:
    """paths() of `text`, or PATHS + 1 if it is no regular expression of at most MAX_REGEX chars."""
    try:
        return paths(sre.parse(text)) if len(text) <= MAX_REGEX and re.compile(text) else PATHS + 1
    except (re.error, RecursionError, OverflowError):
        return PATHS + 1


FLAG: Rule = (bool, lambda v: True, "true or false")
STR_MAP: Rule = mapping((str, lambda v: True, "a string"))
TENSOR = {  # one entry of a safetensors header
    "dtype": (str, lambda v: v in ST_DTYPES, f"one of {', '.join(ST_DTYPES)}"),
    "shape": listed(whole(0, MAX_DIM), range(65)),
    "data_offsets": listed(whole(0, 2**63), range(2, 3)),
}
SHARD: Rule = (
    str,
    lambda v: Path(v).name == v and v.endswith(".safetensors"),
    "a .safetensors file name",
)
INDEX = {"weight_map": mapping(SHARD)}


def temp_path(path: Path, owner: str = "") -> Path:
    """The hidden temporary name `.NAME.tmp<owner>` next to `path` (a long NAME shortened)."""
    name = os.fsencode(path.name)
    # over 150 bytes: cut (maybe inside a character) + a hash, so that the temporary name of any
    # legal NAME (255 bytes) stays a legal name
    if len(name) > 150:
        name = name[:100] + b"~" + hashlib.sha256(name).hexdigest()[:16].encode()
    return path.with_name(f".{os.fsdecode(name)}.tmp{owner}")


def remove(path: Path) -> None:
    """Delete a file or a folder, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# Whether os.kill(pid, 0) only asks if a process exists (POSIX); on Windows it terminates it,
# so there every pid counts as alive: temporaries of killed runs stay, never a process is touched.
KILL_ASKS = os.name == "posix"


def dead(pid: str) -> bool:
    """Whether `pid` is a process id of this machine that no longer runs (never, without
    KILL_ASKS)."""
    if not KILL_ASKS:
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (ValueError, OverflowError, PermissionError):  # not a pid, or another user's process
        pass
    return False


def unwritable(folder: str | Path) -> Path | None:
    """The nearest existing of `folder` and its parents if we cannot write in it; None if we can."""
    near = next(p for p in (Path(folder), *Path(folder).absolute().parents) if os.path.lexists(p))
    return None if near.is_dir() and os.access(near, os.W_OK | os.X_OK) else near


def stale(folder: Path, of: Path | None = None) -> list[Path]:
    """Exactly our `.NAME.tmp<pid>.<host>` in `folder` (of `of` only) that dead pids left."""
    stem = re.escape(temp_path(of).name) if of else r"\..+\.tmp"
    ours = re.compile(rf"{stem}([1-9][0-9]*)\.{re.escape(socket.gethostname())}", re.S)
    found = [(p, ours.fullmatch(p.name)) for p in (folder.iterdir() if folder.is_dir() else ())]
    return [p for p, m in found if m and int(m[1]) != os.getpid() and dead(m[1])]


def clean_temps(folder: Path, of: Path | None = None) -> None:
    """Remove the temporaries of `folder` (of `of` only) that dead pids left (`stale`)."""
    for old in stale(folder, of):
        remove(old)


def own_temp(path: Path) -> Path:
    """Our temp name `.NAME.tmp<pid>.<host>` for `path`; those that dead pids left are removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, f"{os.getpid()}.{socket.gethostname()}")
    clean_temps(path.parent, path)
    remove(tmp)  # ours, from an earlier call that failed
    return tmp


def named(e: OSError, tmp: Path, path: Path) -> None:
    """Make `e` name the output `path` where it names our temporary `tmp` or no file (disk full)."""
    if e.errno is not None:  # the system's (ours say all in their message)
        e.filename = str(e.filename or tmp).replace(str(tmp), str(path), 1)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        call = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc 2.28+
    except (TypeError, OSError):  # Windows: no process-wide symbol table to look it up in
        return False
    return call is not None and call(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0  # cwd


@contextmanager
def atomic_path(path: str | Path, holds: str = ".+") -> Iterator[Path]:
    """Yield a temp name for `path` (a file or folder), moved into place only on success; a
    previous folder is replaced whole if it holds only files named `holds` (or dead temps)."""
    tmp, path, ours = own_temp(Path(path)), Path(path), re.compile(holds, re.S)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink() and tmp.is_dir():  # a previous output:
            olds, dead = list(path.iterdir()), stale(path)  # its files go (a link: itself)
            odd = [p for p in olds if not (ours.fullmatch(p.name) or p in dead)]
            odd += [p for p in olds if p.is_dir() and not p.is_symlink()]  # never a folder
            if odd:
                raise FileExistsError(f"{odd[0]} is in {path}, which holds only an output: move it")
            if exchange(tmp, path):  # in one step; `tmp` now holds the old files, removed below
                return
            for old in olds:
                old.unlink()
            path.rmdir()  # Windows replaces no folder, even an empty one
        os.replace(tmp, path)
    except OSError as e:
        named(e, tmp, path)
        raise
    finally:
        remove(tmp)


def write_safetensors(
    path: str | Path,
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Stream tensors (in the order of `specs`) into a safetensors file, written atomically."""
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for name, (dtype, shape) in specs.items():
        end = offset + torch.Size(shape).numel() * dtype.itemsize
        header[name] = dict(dtype=ST_NAMES[dtype], shape=shape, data_offsets=[offset, end])
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        names = iter(specs)
        for name, t in tensors:
            if name != next(names, None) or (t.dtype, tuple(t.shape)) != specs[name]:
                raise ValueError(f"tensor {name} {t.dtype} {tuple(t.shape)} off spec or order")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        if (left := next(names, None)) is not None:
            raise ValueError(f"tensor {left} was never written")
