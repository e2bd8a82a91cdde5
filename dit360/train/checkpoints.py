"""A training run's folder (the rules of --out, --overwrite and --resume: train.py's docstring) and
its checkpoints, `checkpoints/step-N/`: state.safetensors (the LoRA, its AdamW moments and step as
full tensors, counters and arguments as JSON metadata: nothing unpickled) and the LoRA in lora/.
"""

import argparse
import contextlib
import json
import os
import re
import socket
import stat
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..app.options import fail
from ..load.files import (
    MAX_TEXT,
    atomic_path,
    check_json,
    clean_temps,
    open_tensors,
    own_temp,
    parse_json,
    remove,
    stale,
    unwritable,
    whole,
    write_safetensors,
)
from ..load.lora_formats import MARKER, STEP_DIR, export_peft, steps
from .distributed import print0, warn0

try:
    import fcntl
except ImportError:  # Windows: train.py refuses to start
    fcntl = None

STATE = "state.safetensors"  # a checkpoint's LoRA, AdamW state, counters and arguments
COUNTERS = ("step", "epoch", "batch", "world", "batch_size")  # where a checkpoint resumes
COUNTED = {k: whole(int(k in ("step", "world", "batch_size")), 2**53) for k in COUNTERS}
# A run marks --out as its own (MARKER) once its checks passed; --resume and --overwrite act only
# on a marked folder. --overwrite removes only OUTPUTS (paths in --out) and FOLDERS: a user's files
# stay (cache/ too: its entries are keyed by what made them, so a new run reuses them).
PEFT = r"lora/adapter_(config\.json|model\.safetensors)"
OUTPUTS = re.compile(
    rf"args\.json|log\.jsonl|loss\.png|{PEFT}|checkpoints/step-\d+/({re.escape(STATE)}|{PEFT})"
    r"|samples/step-\d+/\d+\.png|tensorboard/events\.out\.tfevents\.[^/]+"
)
FOLDERS = re.compile(r"lora|checkpoints(/step-\d+(/lora)?)?|samples(/step-\d+)?|tensorboard")
# Where a run writes (check_out): a checkpoint or lora/, replaced whole, holds only their files.
LAYOUT = re.compile(rf"{OUTPUTS.pattern}|{FOLDERS.pattern}|(lora|checkpoints/step-\d+)/.+")
OWN_FOLDERS = ("lora", "checkpoints", "samples", "tensorboard")
IDLE = {MARKER, "args.json", "log.jsonl", "cache"}  # a run stopped before its first step
# A resume must keep them: the counters index the data order and every random draw, and these fix
# the LoRA's shape and what its state means.
MUST_MATCH = ("lora_rank", "alpha", "targets", "dropout", "resolution", "wrap_pad")
MUST_MATCH += ("supervise_pad", "circular_encoder", "pano", "persp", "seed")
HELD: dict[Path, int] = {}  # our locks, open: a flock lasts while its file is open (not a SIGKILL)


def check_out(out: Path, args: argparse.Namespace) -> None:
    """--out: writable, and empty or a marked run to --resume, --overwrite or that never stepped."""
    if parent := unwritable(out):
        fail(f"--out {out}: {parent} is not a folder this user can write; choose another --out")
    skip = {".lock", *(p.name for p in stale(out))}  # a killed run's temporaries: start_run's
    names = sorted(p.name for p in out.iterdir() if p.name not in skip) if out.is_dir() else []
    if names and not (out / MARKER).is_file():
        fail(
            f"--out {out} holds files that no training run wrote ({', '.join(names[:4])}): "
            f"choose a new or empty --out (--resume and --overwrite act only on a run's folder)"
        )
    tops = (*OWN_FOLDERS, "args.json", "log.jsonl", "loss.png")
    ours = [p for name in tops for p in (out / name, *(out / name).rglob("*"))]
    if linked := [p for p in ours if p.is_symlink() and p.is_dir()]:  # we write through no link
        fail(f"--out {out}: {linked[0]} is a link to a folder; a run writes only inside --out")
    for p in ours:  # where a run writes: what it writes, of its kind (a file, a folder; no link)
        rel = p.relative_to(out).as_posix()
        own = FOLDERS.fullmatch(rel) if p.is_dir() else p.is_file() and OUTPUTS.fullmatch(rel)
        if LAYOUT.fullmatch(rel) and os.path.lexists(p) and (p.is_symlink() or not own):
            fail(f"--out {out}: {p} is not what a run writes there: move it out of --out")
    log = out / "log.jsonl"
    logged = log.stat().st_size if log.is_file() else 0
    if logged > MAX_TEXT:  # open_log reads it whole
        fail(f"--out {out}: {log} is over {MAX_TEXT:,} bytes, no run's log: move it out of --out")
    idle = set(names) <= IDLE and not logged
    if not (idle or args.resume or args.overwrite):
        run = [n for n in names if n != MARKER]
        fail(
            f"--out {out} holds a run ({', '.join(run[:4])}): continue it with --resume, "
            "delete it with --overwrite, or choose another --out"
        )


def take_lock(out: Path) -> Path:
    """Hold out/.lock (`pid host`) with an exclusive flock while this process lives: one run a
    folder; a lock that no process holds (its run is gone, even SIGKILLed) is taken over."""
    lock, me = out / ".lock", f"{os.getpid()} {socket.gethostname()}"
    out.mkdir(parents=True, exist_ok=True)
    while True:  # an existing lock: hold it unless a live run does; none: create it, held
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            if (fd := create_new(lock, me)) is not None:
                break
            continue  # another run created it first
        except OSError as e:  # a folder, a link, another user's: not a lock we can take
            fail(f"--out {out}: cannot open its lock {lock} ({e.strerror}): delete it if unused")
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a device: no file to read or write
            os.close(fd)
            fail(f"--out {out}: its lock {lock} is not a file: delete it if no run is using --out")
        free, stays = flock(fd, lock), held(fd, lock)  # stays: its run did not just remove it
        pid, _, host = (holder := os.pread(fd, 200, 0).decode(errors="replace")).partition(" ")
        if free and stays and pid.isdigit() and host:
            warn0(f"process {pid}, which held {lock}, is gone: taking the lock over")
            written(fd, me, lock)  # then cut: never empty for a reader
            os.ftruncate(fd, len(me.encode()))
            break
        os.close(fd)
        if stays and not free:
            fail(f"--out {out} is in use by process {pid} on {host}: wait for it, or stop it")
        if stays:
            fail(
                f"--out {out}: its lock {lock} names no run ({holder[:40]!r}, not `pid host`): "
                "delete it if no run is using --out"
            )
    HELD[lock] = fd
    return lock


def flock(fd: int, lock: Path) -> bool:
    """Take an exclusive flock on `fd` unless another process holds one (False)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:  # a file system without locks (NFS mounted nolock, some FUSE)
        warn0(f"{lock}: this file system cannot lock files ({e.strerror}): runs are not kept out")
    return True


def held(fd: int, path: Path) -> bool:
    """Whether `path` is still the file open as `fd` (its run did not remove it)."""
    with contextlib.suppress(FileNotFoundError):
        return os.path.samestat(os.fstat(fd), os.stat(path))
    return False


def create_new(path: Path, text: str) -> int | None:
    """Create `path` holding `text`, flocked (`fd` open), unless it exists (None): a flocked
    temporary hard-linked there, so that it never stands unlocked."""
    tmp = own_temp(path)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        flock(fd, path)
        written(fd, text, path)  # or exit 1: the temporary removed below
        os.link(tmp, path)
    except FileExistsError:
        os.close(fd)
        return None
    except OSError:  # no hard links here
        os.close(fd)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return None
        flock(fd, path)
        written(fd, text, path, made=True)
    finally:
        remove(tmp)
    return fd


def written(fd: int, text: str, lock: Path, made: bool = False) -> None:
    """`text` whole at the start of the lock `fd` (a write may be short: a full disk, ulimit -f),
    else one line naming `lock` and exit 1 (the lock removed if this process `made` it)."""
    data, done = text.encode(), 0
    try:
        while done < len(data):  # after a short write the next one says why
            done += os.pwrite(fd, data[done:], done)
    except OSError as e:
        if made:
            remove(lock)
        fail(f"cannot write the lock {lock} ({e.strerror})", code=1)


def claim(out: Path, args: argparse.Namespace, made: bool) -> Path:
    """Rank 0, before the slow checks: lock --out (`made`: it did not exist), then check it."""
    lock = take_lock(out)
    try:
        check_out(out, args)
    except BaseException:
        release(lock, made)
        raise
    return lock


def start_run(out: Path, args: argparse.Namespace, start: int = 0) -> None:
    """Rank 0, every check passed: --overwrite's removal, the previews of steps past `start` (a
    killed run's, as the log's lines), dead processes' temporaries, MARKER."""
    if args.overwrite:
        remove_outputs(out)
    for step, folder in steps(out / "samples").items():
        if step > start:
            remove_outputs(out, folder)
    for folder in (out, out / "checkpoints", *(out / "samples").glob("step-*")):
        clean_temps(folder)  # only our names, of processes now gone, only where we write them
    with atomic_path(out / MARKER) as tmp:  # never written through a link a user put there
        tmp.write_bytes(b"a dit360 training run: train.py --resume or --overwrite use it\n")


def remove_outputs(out: Path, folder: Path | None = None) -> None:
    """Delete OUTPUTS in `folder` (None: all of out), then FOLDERS left empty; no link followed."""
    if folder:  # a checkpoint goes whole: hidden first (a killed run's: a dead one's temporary)
        os.replace(folder, hidden := own_temp(folder.with_suffix(".old")))  # not a new one's
    tops = [hidden] if folder else [out / name for name in OWN_FOLDERS]
    paths = [] if folder else [*out.iterdir()]
    for top in tops:
        for root, dirs, files in os.walk(top):  # enters a linked top, no linked folder below
            paths += [Path(root, name) for name in dirs + files]
    real = out.resolve()
    for path in sorted([*tops, *paths], key=lambda p: len(p.parts), reverse=True):  # files first
        rel = path.relative_to(out).as_posix()
        if path.resolve() != real / rel or not path.exists():  # a link, or below one: not ours
            continue
        rel = rel.replace(hidden.name, folder.name, 1) if folder else rel  # as the run named it
        if path.is_file() and OUTPUTS.fullmatch(rel):
            path.unlink()
        elif path.is_dir() and FOLDERS.fullmatch(rel) and not any(path.iterdir()):
            path.rmdir()
    if folder and os.path.lexists(hidden):  # what stays is not ours: back where it was
        os.replace(hidden, folder)


def release(lock: Path, made: bool) -> None:
    """Delete our lock, then unlock it, and --out if this run made it and wrote nothing in it."""
    if (fd := HELD.pop(lock, None)) is not None:
        if held(fd, lock):  # removed while held: a waiting run then finds it gone (`held`)
            lock.unlink()
        os.close(fd)
    if made and lock.parent.is_dir() and not any(lock.parent.iterdir()):
        lock.parent.rmdir()


class Checkpoint(NamedTuple):
    """A checkpoint read for a resume: where it is, its counters and its full state."""

    path: Path
    counters: dict[str, int]
    state: dict[str, Tensor]


def nonfinite(state: dict[str, Tensor]) -> list[str]:
    """The names of the tensors holding a NaN or an infinity."""
    return [k for k, t in state.items() if t.is_floating_point() and not t.isfinite().all()]


def same(a: object, b: object) -> bool:
    """Equal arguments; names (--targets) as sets: their order and repeats change nothing."""
    if isinstance(a, list) and isinstance(b, list) and all(isinstance(x, str) for x in a + b):
        return set(a) == set(b)
    return a == b


def read_checkpoint(path: Path, args: argparse.Namespace, model: nn.Module) -> Checkpoint:
    """A checkpoint of this model with our MUST_MATCH arguments; OSError, ValueError or KeyError."""
    tfile = open_tensors(path / STATE)  # safetensors: a JSON header, raw tensors
    where = f"{STATE} metadata"
    counters = parse_json(tfile.metadata["counters"], f"{where} counters")
    recorded = check_json(parse_json(tfile.metadata["args"], f"{where} args"), {}, f"{where} args")
    check_json(counters, COUNTED, f"{where} counters", required=COUNTERS)
    named = STEP_DIR.fullmatch(path.name)  # written at step N; a step ends no epoch before its own
    if named and int(named[1]) != counters["step"] or counters["epoch"] > counters["step"]:
        at = f"step {counters['step']}, epoch {counters['epoch']}"  # (not its other keys: any size)
        raise ValueError(f"its counters ({at}) are not those of a run's {path.name}")
    now = vars(args)
    if diff := [k for k in MUST_MATCH if not same(recorded.get(k), now[k])]:
        flag = {"resolution": "height"}  # train.py's --height stores "resolution" (its alias)
        diff = [  # its values as JSON gives them (4 is not "4"), of any size: cut
            f"--{flag.get(k, k).replace('_', '-')} {recorded.get(k)!r:.200} (now {now[k]})"
            for k in diff
        ]
        fail(
            f"--resume {path} was trained with other settings: {'; '.join(diff)}; resume "
            "with those, or start a new run (another --out, or --overwrite)"
        )
    shapes = {}  # the LoRA, its AdamW moments and step
    for n, p in model.named_parameters():
        if p.requires_grad:
            shapes |= {f"model/{n}": (shape := tuple(p.shape)), f"optim/{n}/step": ()}
            shapes |= {f"optim/{n}/exp_avg": shape, f"optim/{n}/exp_avg_sq": shape}
    if tfile.shapes != shapes or set(tfile.dtypes.values()) != {torch.float32}:
        raise ValueError("it holds other tensors than this LoRA and its AdamW state (float32)")
    state = {k: tfile.get(k) for k in tfile.shapes}
    if bad := nonfinite(state):
        raise ValueError(f"{len(bad)} tensors hold non-finite values ({bad[0]}, ...)")
    # AdamW's: one whole step count, at most the run's (a non-finite step skipped it), and v >= 0
    adam = {t.item() for k, t in state.items() if k.endswith("/step")}
    if len(adam) != 1 or not (n := adam.pop()).is_integer() or not 0 <= n <= counters["step"]:
        raise ValueError(f"its AdamW step counts are not one whole number 0-{counters['step']}")
    if neg := [k for k, t in state.items() if k.endswith("/exp_avg_sq") and (t < 0).any()]:
        raise ValueError(f"{len(neg)} AdamW second moments hold negative values ({neg[0]}, ...)")
    return Checkpoint(path, counters, state)


def find_checkpoint(out: Path, args: argparse.Namespace, model: nn.Module) -> Checkpoint | None:
    """--resume's checkpoint: the one named, or the latest readable in --out; None: from scratch."""
    if not args.resume:
        return None
    named = args.resume != "latest"
    found = steps(out / "checkpoints")
    paths = [Path(args.resume)] if named else [found[s] for s in sorted(found, reverse=True)]
    for path in paths:
        try:
            return read_checkpoint(path, args, model)
        except (OSError, ValueError, KeyError) as e:
            if named:
                fail(f"--resume {path}: not a readable checkpoint ({e})")
            warn0(f"skipping checkpoint {path}: {e}")
    if paths:
        fail(f"no readable checkpoint in {out / 'checkpoints'}: --overwrite starts again", 1)
    print0(f"no checkpoint in {out / 'checkpoints'}: starting from scratch")
    return None


def save_checkpoint(
    folder: Path,
    state: dict[str, Tensor],
    counters: dict,
    args: argparse.Namespace,
    shell: nn.Module,
) -> Path | None:
    """Rank 0: write `folder/step-N` whole (if finite); remove later steps and all but --keep."""
    step = counters["step"]
    if bad := nonfinite(state):
        warn0(f"step {step}: no checkpoint, {len(bad)} tensors are not finite ({bad[0]}, ...)")
        return None
    final = folder / f"step-{step:08d}"
    meta = dict(counters=json.dumps(counters), args=json.dumps(vars(args)))
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in state.items()}
    with atomic_path(final) as tmp:  # the checkpoint exists complete, or not at all
        tmp.mkdir()
        write_safetensors(tmp / STATE, specs, state.items(), meta)
        export_lora(state, shell, tmp / "lora")
        for s, path in steps(folder).items():
            if s >= step:
                remove_outputs(folder.parent, path)
        if os.path.lexists(final):  # what remains is not ours: it stays, and no checkpoint
            raise FileExistsError(f"{final} holds files no run wrote: move them, then --resume")
    prune(folder, args.keep, step)
    clean_temps(folder)
    return final


def prune(folder: Path, keep: int, step: int) -> None:
    """Remove all but the `keep` (0: all) latest checkpoints up to `step` (later ones: unread)."""
    done = sorted((s, path) for s, path in steps(folder).items() if s <= step)
    for _, old in done[:-keep] if keep else []:
        remove_outputs(folder.parent, old)


def export_lora(state: dict[str, Tensor], shell: nn.Module, folder: Path) -> None:
    """Rank 0: write the LoRA of a gathered state in the peft format."""
    lora = {k.removeprefix("model/"): v for k, v in state.items() if k.startswith("model/")}
    shell.load_state_dict(lora, strict=False, assign=True)  # the meta base stays meta
    export_peft(shell, folder)
