"""Outpaint or inpaint a 360-degree panorama with FLUX.1-dev and the DiT360 LoRA (RF-Inversion +
Personalize-Anything token replacement, as DiT360's editing.py).

The mask is a PNG of any size: white = keep the source, black = generate (outpainting);
--invert regenerates the white region instead (inpainting).

python edit.py --image pano.png --mask mask.png --prompt "This is a panorama image. A village..."
python edit.py --edits edits.jsonl --out-dir edited   # many edits, each model loaded once
python edit.py --photo room.jpg --fov 90 --prompt "This is a panorama image. A living room..."

--photo: a perspective photo placed in the panorama (horizontal --fov, looking at --yaw/--pitch/
--roll degrees) and the rest outpainted; --paste-back keeps its pixels exactly. The prompt
describes the whole scene.

--edits: a .jsonl of rows {"image": ..., "mask": ..., "prompt": ..., and optionally "out"
(relative to --out-dir, inside it), "seed", "invert", "source_prompt", "steps", "guidance",
"negative_prompt"}; image and mask paths are relative to the file's folder. Outputs are
{index:04d}-seed{seed}.png in --out-dir; those already there with the same settings are skipped
(resume), one made with other settings stops the batch (--overwrite: made again). Under
torchrun, rank r of w makes rows[r::w] on GPU LOCAL_RANK (no process group is needed).
"""

from dit360.app.cli import LATE, REFUSED, handle_signals, run_main, starting

if __name__ == "__main__":  # before torch loads: Ctrl-C or SIGTERM while importing is one line
    handle_signals()
    starting("edit.py")


import argparse
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

from dit360.app.batch import (
    batch_out,
    checked,
    checked_batch,
    checked_jobs,
    local_device,
    out_dir,
    read_rows,
    run_batch,
)
from dit360.app.editing import EditJob, check_job, edit_many
from dit360.app.generate import job_options
from dit360.app.info import record, stamp
from dit360.app.options import SIDE, EditOptions, Parser, add_flags, bounded, check_height, fail
from dit360.app.outputs import add_output_flags, extras_missing, write_extras
from dit360.app.panorama import VIEW_RANGES, project_photo
from dit360.app.report import Report
from dit360.load.image import open_image, read_rgb, save_panorama

SINGLE = ("image", "mask", "prompt")  # the flags of one edit, which --edits replaces
PHOTO_VIEW = [  # flag, help, default
    ("fov", "--photo's horizontal field of view", 90.0),
    ("yaw", "--photo's view, + = right", 0.0),
    ("pitch", "--photo's view, + = up", 0.0),
    ("roll", "--photo's view, + = clockwise", 0.0),
]
SOURCES = ("image", "mask", "photo")  # input files, which --out must not overwrite
KEYS = {
    "image": str, "mask": str, "prompt": str, "out": str, "seed": int, "invert": bool,
    "source_prompt": str, "steps": int, "guidance": (int, float), "negative_prompt": str,
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--image", help="the source panorama (2:1)")
    p.add_argument("--mask", help="PNG, white = keep (any size: nearest resize)")
    p.add_argument("--prompt", help="the target prompt")
    p.add_argument(
        "--edits", type=Path, help="a .jsonl of edits, instead of --image/--mask/--prompt"
    )
    p.add_argument(
        "--photo", help="a perspective photo to extend to a panorama (no --image/--mask)"
    )
    for angle, what, default in PHOTO_VIEW:
        lo, hi = VIEW_RANGES[angle]  # as prepare.py's
        p.add_argument(
            f"--{angle}", type=bounded(float, lo, hi), default=default,
            help=f"{what}, {lo} to {hi} degrees",
        )  # fmt: skip
    p.add_argument("--height", type=int, default=1024, help="work at height x 2 height")
    p.add_argument("--resize", action="store_true", help="stretch an image that is not 2:1")
    p.add_argument("--out", help=".png or .jpg, with 360 metadata (default: edited.png)")
    p.add_argument("--out-dir", type=Path, help="--edits outputs (default: edited)")
    add_flags(p, EditOptions)
    add_output_flags(p)
    args = p.parse_args(argv)
    given = [f"--{k.replace('_', '-')}" for k in (*SINGLE, "out") if getattr(args, k) is not None]
    if args.edits and (given or args.photo):
        p.error(f"argument --edits: not allowed with argument {(given or ['--photo'])[0]}")
    if args.photo and (args.image or args.mask or args.invert):  # --invert: redo the photo only
        p.error("argument --photo: not allowed with --image, --mask (it makes both) or --invert")
    single = ("prompt",) if args.photo else SINGLE
    missing = [f"--{k}" for k in single if getattr(args, k) is None]
    if not args.edits and missing:
        p.error(f"the following arguments are required: {', '.join(missing)} (or --edits)")
    if not args.edits and args.out_dir:
        p.error("argument --out-dir: only with --edits (one edit: --out)")
    return args


def check_not_source(out: str | Path, flag: str, sources: dict[str, str | Path | None]) -> None:
    """ValueError if the output `out` (given by `flag`) is one of the `sources` ({what: path}):
    the edit would overwrite its own input."""
    for what, src in sources.items():
        if src is not None and os.path.realpath(src) == os.path.realpath(out):  # a loop: no raise
            raise ValueError(
                f"{flag} {out} is {what}, which the edit would overwrite: choose another {flag}"
            )


def check_ratio(path: str | Path, size: tuple[int, int], resize: bool) -> None:
    """ValueError if the image at `path`, of `size`, is not 2:1, unless it is to be `resize`d."""
    w, h = size
    if w != 2 * h and not resize:
        raise ValueError(f"{path}: {w}x{h} is not 2:1; pass --resize to stretch it to 2:1")


def read_panorama(
    path: str | Path, height: int = 1024, resize: bool = False, log: Callable = print
) -> Image.Image:
    """The source panorama as RGB at height x 2 height (logged if resized); not 2:1 is an error
    unless `resize`."""
    img = open_image(path)
    check_ratio(path, img.size, resize)
    if img.size != (2 * height, height):  # e.g. 1024, the reference's, on a small source: say so
        near = min(SIDE // 2, max(16, round(img.height / 16) * 16))  # a height --height takes
        why = "the reference's default" if height == 1024 else "given"
        about = "" if near == img.height else " about"
        log(f"{path}: {img.width}x{img.height}, edited at {2 * height}x{height} (--height "
            f"{height}, {why}; --height {near} keeps{about} the source's height)")  # fmt: skip
    return read_rgb(img, 2 * height, height)


def read_photo(args: argparse.Namespace) -> tuple[Image.Image, Image.Image]:
    """--photo projected into a black H x 2H canvas at --fov/--yaw/--pitch/--roll, and its
    footprint as the mask (white = keep the photo)."""
    photo = open_image(args.photo).convert("RGB")
    return project_photo(photo, args.fov, args.yaw, args.pitch, args.roll, args.height)


def edit_jobs(args: argparse.Namespace, opts: EditOptions) -> list[EditJob]:
    """The jobs of --edits, each checked (the source opens and is 2:1 unless --resize, the mask
    keeps something and generates something, the output is new to the batch); ValueError if bad."""
    rows = read_rows(args.edits, "--edits", KEYS, SINGLE)
    folder, size = args.edits.parent, (2 * args.height, args.height)
    inputs = {  # every row's sources, resolved (realpath: a link loop does not raise)
        os.path.realpath(folder / r[k]): f'line {n}\'s "{k}"'
        for n, r in rows
        for k in ("image", "mask")
    }

    def lines() -> Iterator[tuple[int, EditJob]]:
        for index, (n, row) in enumerate(rows):
            seed, where = row.get("seed", opts.seed), f"{args.edits}:{n}"
            out = batch_out(args.out_dir, row.get("out", f"{index:04d}-seed{seed}.png"), where)
            yield n, EditJob(
                row["prompt"], seed, out, row.get("steps"), row.get("guidance"),
                image=folder / row["image"], mask=folder / row["mask"], size=size,
                invert=row.get("invert"), source_prompt=row.get("source_prompt"),
                negative_prompt=row.get("negative_prompt"),
            )  # fmt: skip

    def check(job: EditJob) -> None:
        check_ratio(job.image, check_job(opts, job), args.resize)  # the size's warning: once
        check_not_source(job.out, '"out"', {'its "image"': job.image, 'its "mask"': job.mask})
        if other := inputs.get(os.path.realpath(job.out)):  # another edit's source
            raise ValueError(f'"out" {job.out} is {other}, which the batch reads: choose another')

    return checked_jobs(args.edits, lines(), check, args)


def run_edits(args: argparse.Namespace) -> None:
    """--edits: the rows checked, then the missing outputs made with each model loaded once."""
    args.device = local_device(args.device)  # torchrun: a GPU per process
    args.out_dir = out_dir(args, Path("edited"))

    def record_for(opts: EditOptions) -> Callable:
        return lambda job: made(
            args, job_options(opts, job), job.prompt, image=job.image, mask=job.mask
        )

    opts, jobs = checked_batch(EditOptions, args, edit_jobs, record_for)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    run_batch(
        jobs,
        lambda todo: edit_many(todo, opts, log, checked=True),  # edit_jobs checked them
        record_for(opts),
        lambda job, image: write_extras(image, job.out, args, job.prompt),
        lambda job: extras_missing(job.out, args),
        args.overwrite,
    )


def made(args: argparse.Namespace, opts: EditOptions, prompt: str, **sources: object) -> dict:
    """The record (`info.record`) of an edit: its `sources` (the image and mask, or the photo
    and its view), prompt, size and options."""
    named = {k: str(v) if isinstance(v, Path) else v for k, v in sources.items()}
    return record("edit.py", opts, **named, prompt=prompt, height=args.height, resize=args.resize)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        check_height("--height", args.height)
    except ValueError as e:
        fail(e)
    if args.edits:
        return run_edits(args)
    args.out = args.out or "edited.png"
    try:
        check_not_source(args.out, "--out", {f"--{k}": getattr(args, k) for k in SOURCES})
    except REFUSED as e:
        fail(e)
    opts, out = checked(EditOptions, args)  # every flag, before anything slow (exit 2)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    report = Report(opts.device, log=log)
    try:  # the source, the mask and the size, before any model loads
        if args.photo:
            image, mask = read_photo(args)
        else:
            image = read_panorama(args.image, args.height, args.resize, log)
            mask = open_image(args.mask)
        job = EditJob(args.prompt, opts.seed, Path(), image=image, mask=mask)
        edits = edit_many([job], opts, log, report)  # checked now, made as it is read
    except REFUSED as e:  # --photo's mask is its footprint: too small a --fov keeps no token
        said = str(e)
        if args.photo:
            said = said.replace("the mask", f"--photo's footprint (--fov {args.fov})")
            said = said.replace("use sample.py", "use a wider --fov, or sample.py")
        fail(said)
    view = {k: getattr(args, k) for k, _, _ in PHOTO_VIEW} if args.photo else {}
    sources = (
        {"photo": args.photo, **view} if args.photo else {"image": args.image, "mask": args.mask}
    )
    try:  # every input was checked: a weight file that fails to read, NaN latents
        rec = made(args, opts, args.prompt, **sources)  # its LoRAs hashed before loading
        [(_, result, _)] = edits
    except LATE as e:
        fail(e, code=1)
    # a failed write is one line naming its file, exit 1 (cli.on_uncaught)
    save_panorama(result, out, stamp(rec))
    extras = write_extras(result, out, args, args.prompt)
    print(f"wrote {out} ({result.width}x{result.height}): {report}; {extras}")


if __name__ == "__main__":
    run_main(main)
