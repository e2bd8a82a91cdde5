"""A training run's folder and its checkpoints; the rules for --out, --overwrite and --resume
are stated once, in train.py's docstring (its --help).

A checkpoint is `checkpoints/step-N/`: state.safetensors (the LoRA with its AdamW moments and step
as full tensors, the counters and arguments as JSON metadata: nothing is ever unpickled) and its
LoRA in lora/ (peft format). Rank 0 writes it under a temporary name, then renames it; on resume
every rank reads it and keeps its shards. A state holding a non-finite value is never written.
MUST_MATCH are the arguments a resume must keep: the counters index the data order and every
random draw, and the rest fix the LoRA's shape and what its state means.
"""

import argparse
import json
import os
import re
import socket
from pathlib import Path
from typing import NamedTuple

from safetensors.torch import save_file
from torch import Tensor, nn

from .distributed import print0, warn0
from .files import commit, dead, open_tensors, remove, temp_path
from .lora_formats import export_peft
from .options import fail

STATE = "state.safetensors"  # a checkpoint's LoRA, AdamW state, counters and arguments
STEP_DIR = re.compile(r"step-(\d+)")  # a checkpoint; ".step-N.tmp" is one being written
COUNTERS = ("step", "epoch", "batch", "world", "batch_size")  # where a checkpoint resumes
OUTPUTS = ("checkpoints", "lora", "args.json", "log.jsonl", "loss.png", "samples", "tensorboard")
# What a checkpoint's state means, so a resume must keep them (the docstring says why).
MUST_MATCH = ("lora_rank", "alpha", "targets", "dropout", "resolution", "wrap_pad")
MUST_MATCH += ("supervise_pad", "circular_encoder", "pano", "persp", "seed")


def check_out(out: Path, args: argparse.Namespace) -> None:
    """--out: a folder we may write, and empty unless --resume or --overwrite."""
    parent = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        fail(f"--out {out}: {parent} is not a folder this user can write; choose another --out")
    run = sorted(p.name for p in out.iterdir() if p.name != ".lock") if out.is_dir() else []
    if run and not (args.resume or args.overwrite):
        fail(
            f"--out {out} holds a run ({', '.join(run[:4])}): continue it with --resume, "
            "delete it with --overwrite, or choose another --out"
        )


def take_lock(out: Path) -> Path:
    """Create out/.lock holding `pid host` (O_EXCL: one run a folder); a lock left by a dead
    process of this host is taken over, with a warning."""
    lock, me = out / ".lock", f"{os.getpid()} {socket.gethostname()}"
    out.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid, _, host = lock.read_text().partition(" ")
            if host != socket.gethostname() or not dead(pid):
                fail(
                    f"--out {out} is in use by process {pid} on {host or '?'}: wait for it, "
                    f"or delete {lock} if that run is gone"
                )
            warn0(f"process {pid}, which held {lock}, is gone: taking the lock over")
            lock.unlink(missing_ok=True)
            continue
        os.write(fd, me.encode())
        os.close(fd)
        return lock


def claim(out: Path, args: argparse.Namespace) -> Path:
    """Rank 0: lock --out, then delete the old run (--overwrite) and a killed run's temp files."""
    lock = take_lock(out)
    for old in [*(out / n for n in OUTPUTS if args.overwrite), *out.rglob(".*.tmp*")]:
        remove(old)
    return lock


def release(lock: Path, made: bool) -> None:
    """Delete our lock, and --out if this run made it and wrote nothing in it."""
    if lock.exists() and lock.read_text() == f"{os.getpid()} {socket.gethostname()}":
        lock.unlink()
    if made and lock.parent.is_dir() and not any(lock.parent.iterdir()):
        lock.parent.rmdir()


class Checkpoint(NamedTuple):
    """A checkpoint read for a resume: where it is, its counters and its full state."""

    path: Path
    counters: dict[str, int]
    state: dict[str, Tensor]


def steps(folder: Path) -> dict[int, Path]:
    """The checkpoint folders `step-N` by step (complete: a checkpoint is written, then renamed)."""
    found = ((STEP_DIR.fullmatch(p.name), p) for p in folder.glob("step-*"))
    return {int(m[1]): p for m, p in found if m and p.is_dir()}


def state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensors of a checkpoint of `model`: the LoRA, its AdamW moments and step."""
    shapes = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            shape = tuple(p.shape)
            shapes |= {f"model/{n}": shape, f"optim/{n}/step": ()}
            shapes |= {f"optim/{n}/exp_avg": shape, f"optim/{n}/exp_avg_sq": shape}
    return shapes


def nonfinite(state: dict[str, Tensor]) -> list[str]:
    """The names of the tensors holding a NaN or an infinity."""
    return [k for k, t in state.items() if t.is_floating_point() and not t.isfinite().all()]


def read_checkpoint(path: Path, args: argparse.Namespace, model: nn.Module) -> Checkpoint:
    """A checkpoint of this model trained with our MUST_MATCH arguments (else one error listing
    every difference); OSError, ValueError or KeyError if it is unreadable, torn or not finite."""
    tfile = open_tensors(path / STATE)  # safetensors: a JSON header, raw tensors
    counters, recorded = (json.loads(tfile.metadata[k]) for k in ("counters", "args"))
    dicts = isinstance(recorded, dict) and isinstance(counters, dict)
    if not dicts or not all(type(counters.get(k)) is int for k in COUNTERS):
        raise ValueError("its counters or arguments are incomplete")
    now = vars(args)
    if diff := [k for k in MUST_MATCH if recorded.get(k) != now[k]]:
        diff = [f"--{k.replace('_', '-')} {recorded.get(k)} (now {now[k]})" for k in diff]
        fail(
            f"--resume {path} was trained with other settings: {'; '.join(diff)}; resume "
            "with those, or start a new run (another --out, or --overwrite)"
        )
    if tfile.shapes != state_shapes(model):
        raise ValueError("it holds other tensors than this LoRA and its AdamW state")
    state = {k: tfile.get(k) for k in tfile.shapes}
    if bad := nonfinite(state):
        raise ValueError(f"{len(bad)} tensors hold non-finite values ({bad[0]}, ...)")
    return Checkpoint(path, counters, state)


def find_checkpoint(out: Path, args: argparse.Namespace, model: nn.Module) -> Checkpoint | None:
    """With --resume: the checkpoint it names, or the latest readable one in --out (an earlier
    one stands in for an unreadable one, with a warning); None: start from scratch."""
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
    """Rank 0: write `folder/step-N` (the state, its LoRA in lora/) under a temporary name, then
    rename it; remove later steps' checkpoints (the branch a resume left) and all but the newest
    --keep. A state holding a non-finite value is not written (a warning)."""
    step = counters["step"]
    if bad := nonfinite(state):
        warn0(f"step {step}: no checkpoint, {len(bad)} tensors are not finite ({bad[0]}, ...)")
        return None
    final = folder / f"step-{step:08d}"
    tmp = temp_path(final)
    remove(tmp)  # left by a run killed while writing it
    tmp.mkdir(parents=True)
    meta = dict(counters=json.dumps(counters), args=json.dumps(vars(args)))
    save_file(state, tmp / STATE, metadata=meta)
    export_lora(state, shell, tmp / "lora")
    for s, path in steps(folder).items():
        if s >= step:
            remove(path)
    commit(tmp, final)  # atomic: the checkpoint exists complete, or not at all
    done = sorted(steps(folder).items())
    for _, old in done[: -args.keep] if args.keep else []:
        remove(old)
    for stale in folder.glob(".step-*.tmp*"):
        remove(stale)
    return final


def export_lora(state: dict[str, Tensor], shell: nn.Module, folder: Path) -> None:
    """Rank 0: write the LoRA of a gathered state in the peft format."""
    lora = {k.removeprefix("model/"): v for k, v in state.items() if k.startswith("model/")}
    shell.load_state_dict(lora, strict=False, assign=True)  # the meta base stays meta
    export_peft(shell, folder)
