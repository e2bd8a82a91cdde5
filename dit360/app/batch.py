"""Many images per load, for sample.py and edit.py: a .jsonl (or .txt) file's rows checked with
`file:line` errors before any model loads, this process's share under torchrun, outputs that
exist with the job's settings skipped (a rerun resumes), each written with its settings."""

import argparse
import json
import os
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image

from ..load.files import read_text
from ..load.image import check_output_path, open_image, save_panorama
from .cli import JOBS, LATE, REFUSED, check_prompt, torchrun
from .generate import Job, check_inputs
from .info import difference, read_record, stamp
from .options import Options, fail, from_args, warnings_last
from .outputs import beside

J = TypeVar("J", bound=Job)
# How long a batch's process waits for the others' totals at its end (gloo's default): ranks may
# finish far apart (one whose outputs all exist, at once)
CLOSING = timedelta(minutes=30)
Types = type | tuple[type, ...]


def checked(
    cls: type, args: argparse.Namespace, batch: bool = False
) -> tuple[Options, Path | None]:
    """The options (`cls`) and --out with the files beside it (not in a `batch`: its jobs' are)
    checked before anything slow."""
    with warnings_last():
        try:
            opts = from_args(cls, args)
            if getattr(args, "prompt", None):
                check_prompt(args.prompt, "--prompt")
            out = None if batch else check_output_path(args.out, "--out", beside(args.out, args))
            check_inputs(opts)  # every weight file found and its headers checked
        except REFUSED as e:
            fail(e)
    return opts, out


def checked_batch(
    cls: type, args: argparse.Namespace, make_jobs: Callable, record_for: Callable
) -> tuple[Options, list]:
    """A batch's options and jobs (`make_jobs`), their `existing` outputs checked (`record_for`)."""
    with warnings_last():
        opts = checked(cls, args, batch=True)[0]
        try:
            jobs = make_jobs(args, opts)
            existing(share(jobs), record_for(opts), args.overwrite)
            return opts, jobs
        except REFUSED as e:
            fail(e)


def out_dir(args: argparse.Namespace, default: Path) -> Path:
    """--out-dir, else `default`; one line and exit 2 if it is a file."""
    folder = args.out_dir or default
    try:  # a name too long, a symbolic link loop
        if folder.exists() and not folder.is_dir():
            fail(f"--out-dir {folder} is a file: choose a folder")
        made = folder.resolve()  # the folder, or the nearest one above it, where it would be made
        while not made.exists():
            made = made.parent
    except REFUSED as e:
        fail(f"--out-dir {folder}: {e}")
    if not os.access(made, os.W_OK | os.X_OK):
        fail(f"--out-dir {folder}: cannot write in {made}: make it writable or choose another")
    return folder


def batch_out(folder: Path, name: str, where: str) -> Path:
    """`folder` / `name` (a row's "out"); ValueError naming `where` if it leads outside `folder`."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(
            f'{where}: "out" {name} is outside --out-dir: give a path relative to it, no ".."'
        )
    if not (folder / name).resolve().is_relative_to(folder.resolve()):  # where it really goes
        raise ValueError(
            f'{where}: "out" {name} leads outside --out-dir through a symbolic link (to '
            f"{(folder / name).resolve()}): name a path inside --out-dir"
        )
    return folder / name


def read_rows(
    path: Path, flag: str, keys: dict[str, Types], required: tuple[str, ...], text: bool = False
) -> list[tuple[int, dict]]:
    """(line number, row) of a .jsonl file (with `text`, also a .txt: a prompt a line, # comments):
    objects with the `required` strings, keys and types in `keys`; ValueError naming file:line."""
    suffixes = (".txt", ".jsonl") if text else (".jsonl",)
    if path.suffix not in suffixes:
        raise ValueError(f"{flag} {path}: use a {' or '.join(suffixes)} file")
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    names = ", ".join(f'"{k}"' for k in required)
    names = f"{names} strings" if len(required) > 1 else f"a {names} string"
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        line, where = line.strip(), f"{path}:{n}"
        if not line or (path.suffix == ".txt" and line.startswith("#")):
            continue
        try:
            row = json.loads(line) if path.suffix == ".jsonl" else {"prompt": line}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in required):
            raise ValueError(f"{where}: need an object with {names}")
        for k, v in row.items():
            if isinstance(v, str):  # a prompt, or a path: none is that long
                check_prompt(v, f"{where}: {k!r}")
            want = keys.get(k, ())  # (): no type, an unknown key
            if not isinstance(v, want) or isinstance(v, bool) != (want is bool):
                raise ValueError(f"{where}: bad {k!r}: {v!r} (keys: {', '.join(keys)})")
        rows.append((n, row))
        if len(rows) > JOBS:
            raise ValueError(
                f"{where}: more than {JOBS:,} rows: a batch makes at most {JOBS:,} "
                "images; split the file"
            )
    if not rows:
        raise ValueError(f"{flag} {path}: no {flag.lstrip('-')} in it")
    return rows


def checked_jobs(
    src: str | Path,
    lines: Iterable[tuple[int, J]],
    check: Callable[[J], object],
    args: argparse.Namespace,
) -> list[J]:
    """The jobs, each passing `check` with its own valid outputs (those that exist are replaced
    only by --overwrite: `existing`); else ValueError at `src`:line."""
    jobs, seen = [], {}
    for n, job in lines:
        where = f"{src}:{n}"
        if len(jobs) == JOBS:
            raise ValueError(
                f"{where}: more than {JOBS:,} images: a batch makes at most {JOBS:,}; split it"
            )
        try:
            check(job)
            check_output_path(job.out, beside=beside(job.out, args), replace=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"{where}: {e}") from None
        key = str(job.out.resolve()).casefold()  # Windows and macOS: one file, whatever the case
        if key in seen:
            m, other = seen[key]
            case = "" if other == job.out else f" ({other.name}: Windows and macOS ignore case)"
            raise ValueError(f"{where}: writes {job.out}, as line {m} does{case}")
        jobs.append(job)
        seen[key] = n, job.out
    return jobs


def local_device(device: str | None) -> str | None:
    """`device`; under torchrun on GPUs with none given, this process's own: cuda:LOCAL_RANK."""
    _, world, local = torchrun()  # checked before anything
    return f"cuda:{local}" if device is None and world > 1 and torch.cuda.is_available() else device


def share(jobs: list[J]) -> list[J]:
    """This process's jobs: under torchrun rank r of w makes jobs[r::w]."""
    rank, world, _ = torchrun()
    return jobs[rank::world]


def existing(
    jobs: list[J], record: Callable[[J], dict], overwrite: bool = False
) -> tuple[list[J], dict]:
    """(jobs to make, each output's record); ValueError if one exists with other settings."""
    todo, stamps = [], {}
    for job in jobs:
        stamps[job.out] = rec = record(job)
        if not job.out.exists():
            todo.append(job)
        elif why := difference(read_record(job.out), rec):
            if not overwrite:
                raise ValueError(
                    f"{job.out} exists, made with other settings ({why}): --overwrite replaces "
                    "it, or choose another --out-dir"
                )
            check_output_path(job.out)  # replaced: not if read-only
            todo.append(job)
    return todo, stamps


def run_batch(
    jobs: list[J],
    make: Callable[[list[J]], Iterable[tuple[J, Image.Image, float]]],
    record: Callable[[J], dict],
    extras: Callable[[J, Image.Image], str] = lambda job, image: "",
    missing: Callable[[J], bool] = lambda job: False,
    overwrite: bool = False,
) -> None:
    """Write this process's jobs not `existing` with `record` and `extras` (a skipped one `missing`
    them too), then a total. Outputs with other settings: exit 2; a failure once they load: 1."""
    rank, world, _ = torchrun()
    jobs = share(jobs)  # under torchrun: this process's share
    try:  # checked before anything loads (and by the scripts before their warnings show)
        todo, stamps = existing(jobs, record, overwrite)
    except (ValueError, OSError) as e:
        fail(e)
    made = {job.out for job in todo}
    for job in jobs:  # once every output is known to be the job's or to be made
        if job.out not in made:
            note = extras(job, reread(job.out)) if missing(job) else ""
            print(f"skip {job.out}: it exists" + (f"; {note}" if note else ""))
    start = time.perf_counter()
    print(f"{len(todo)} images to make, {len(jobs) - len(todo)} exist", flush=True)
    try:  # every input was checked: a weight file that fails to read, NaN latents (that image is
        # not written), a failed write (naming the file: files.atomic_path) are late failures
        for k, (job, image, seconds) in enumerate(make(todo), start=1):
            save_panorama(image, job.out, stamp(stamps[job.out]))
            note = extras(job, image)
            note = f"; {note}" if note else ""
            size, of = f"{image.width}x{image.height}", f"{k} of {len(todo)}"
            print(f"wrote {job.out} ({size}) in {seconds:.1f}s, {of}{note}", flush=True)
    except LATE as e:
        fail(e, code=1)
    minutes = (time.perf_counter() - start) / 60
    who = f"rank {rank} of {world}: " if world > 1 else ""
    summary(who, len(todo), len(jobs) - len(todo), minutes)
    if world > 1:  # the whole batch, on rank 0: the one exchange between the processes
        (written, skipped), (minutes,) = across_ranks([len(todo), len(jobs) - len(todo)], [minutes])
        if rank == 0:
            summary(f"all {world} processes: ", int(written), int(skipped), minutes)


def reread(path: Path) -> Image.Image:
    """An output a batch skips, read for the extras it lacks; unreadable: one line, exit 2."""
    try:
        return open_image(path)
    except REFUSED as e:  # its record was read, but its pixels are cut or corrupt
        fail(f"{e}: remove it to make it again")


def summary(who: str, written: int, skipped: int, minutes: float) -> None:
    """The closing line: images written and skipped, and the rate."""
    rate = f", {written / minutes:.1f} images/minute" if written else ""
    print(f"{who}{written} images written, {skipped} skipped (they exist){rate}")


def across_ranks(sums: list[float], maxima: list[float]) -> tuple[list[float], list[float]]:
    """`sums` summed and `maxima` maximised over torchrun's processes (a gloo group made for it);
    others that never report within CLOSING: one line, exit 1 (was a hang, then a traceback)."""
    dist = torch.distributed
    made = not dist.is_initialized()
    try:
        if made:
            dist.init_process_group("gloo", timeout=CLOSING)
        s, m = (torch.tensor(v, dtype=torch.float64) for v in (sums, maxima))
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        return s.tolist(), m.tolist()
    except dist.DistError as e:
        missing = "the images of the processes that never came are not made: run the batch again"
        fail(f"the other processes did not report within {CLOSING} ({e}); {missing}", 1)
    finally:
        if made and dist.is_initialized():
            dist.destroy_process_group()
