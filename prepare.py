"""Build the hybrid-training jsonl files (DESIGN.md section 4) from folders of images + captions.

python prepare.py --out data --pano panoramas/ --persp photos/ --height 1024

Panoramas (2:1) are used in place, with an all-white mask; photos are projected into a height x
2 height canvas at a given or sampled field of view and sampled yaw / pitch / roll, with a mask of
the covered area (255 = supervised). Arguments are checked before any work. Everything is
written into a hidden folder inside --out and moved into place at the end, so a failed or
interrupted run leaves nothing behind; a bad row fails the run unless --skip-bad. An earlier
run's pano.jsonl / persp.jsonl in --out is replaced only with --overwrite; --out may not be (inside)
an input folder.
"""

from dit360.cli import check_prompt, handle_signals, run_main

if __name__ == "__main__":  # before torch loads: Ctrl-C or SIGTERM while importing is one line
    handle_signals()


import argparse
import json
import os
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from dit360.data import READ_ERRORS
from dit360.files import own_temp, read_text, remove
from dit360.image import open_image, project_photo
from dit360.options import Parser, check_height, fail
from dit360.panorama import VIEW_RANGES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
Row = dict[str, str]
Bad = list[tuple[str, str]]  # (file, reason)


def find_images(folder: Path) -> list[Path]:
    """Image files under folder (recursively), sorted."""
    files = (p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(p for p in files if p.is_file())


def read_caption(image: Path) -> str:
    """The caption of an image: the text of the .txt file with the same stem next to it."""
    path = image.with_suffix(".txt")
    if not path.is_file():
        raise ValueError(f"missing caption {path.name}")
    caption = check_prompt(read_text(path).strip(), f"caption {path.name}")
    if not caption:
        raise ValueError(f"empty caption {path.name}")
    return caption


def save_png(img: Image.Image, path: Path) -> None:
    """Save a PNG (into the private staging folder: no temporary name needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def row(image: Path, caption: str, mask: Path, out: Path, absolute: bool = False) -> Row:
    """One jsonl row for a jsonl file in folder out: paths relative to out, or absolute."""
    image, mask = image.resolve(), mask.resolve()
    if not absolute:
        image, mask = (Path(os.path.relpath(p, out.resolve())) for p in (image, mask))
    return {"image": image.as_posix(), "caption": caption, "mask": mask.as_posix()}


def collect_panoramas(
    folder: Path, out: Path, stage: Path, absolute: bool = False
) -> tuple[list[Row], Bad]:
    """Rows for the 2:1 panoramas under folder, their all-white masks staged for out/masks."""
    rows, bad = [], []
    for image in tqdm(find_images(folder), desc="panoramas", unit="img"):
        try:
            caption = read_caption(image)
            w, h = open_image(image).size  # decoded in full: corrupt files fail here
            if abs(w / h - 2) > 0.02:
                raise ValueError(f"not 2:1 ({w}x{h})")
        except READ_ERRORS as e:  # a bad row, reported with the others at the end
            bad.append((str(image), str(e) or type(e).__name__))
            continue
        mask = Path("masks") / f"pano_{w}x{h}.png"
        if not (stage / mask).exists():
            save_png(Image.new("L", (w, h), 255), stage / mask)
        rows.append(row(image, caption, out / mask, out, absolute))
    return rows, bad


def collect_perspectives(
    folder: Path,
    out: Path,
    stage: Path,
    height: int = 1024,
    fov: float | None = None,
    fov_range: tuple[float, float] = (60.0, 90.0),
    yaw_range: tuple[float, float] = (-180.0, 180.0),
    pitch_range: tuple[float, float] = (0.0, 0.0),
    roll_range: tuple[float, float] = (0.0, 0.0),
    seed: int = 0,
    absolute: bool = False,
) -> tuple[list[Row], Bad]:
    """Rows for the photos under folder, projected with their masks, staged for out/persp."""
    rng = random.Random(seed)
    rows, bad, seen = [], [], {}
    for image in tqdm(find_images(folder), desc="perspective", unit="img"):
        # Drawn for every file, so one bad file does not change the others' views.
        view_fov = fov if fov is not None else rng.uniform(*fov_range)
        angles = [rng.uniform(*r) for r in (yaw_range, pitch_range, roll_range)]
        name = "__".join(image.relative_to(folder).with_suffix("").parts)  # a/b.png -> a__b
        try:
            if name in seen:
                raise ValueError(f"same name as {seen[name].name}")
            seen[name] = image
            caption = read_caption(image)
            img = ImageOps.exif_transpose(open_image(image)).convert("RGB")
            canvas, mask = project_photo(img, view_fov, *angles, height)
        except READ_ERRORS as e:  # a bad row, reported with the others at the end
            bad.append((str(image), str(e) or type(e).__name__))
            continue
        paths = Path("persp") / f"{name}.png", Path("persp") / f"{name}_mask.png"
        save_png(canvas, stage / paths[0])
        save_png(mask, stage / paths[1])
        rows.append(row(out / paths[0], caption, out / paths[1], out, absolute))
    return rows, bad


def check_args(
    out: Path,
    pano: Path | None = None,
    persp: Path | None = None,
    height: int = 1024,
    fov: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    **ranges: tuple[float, float],
) -> None:
    """Raise a ValueError naming the flag for the first bad argument (before any work)."""
    if pano is None and persp is None:
        raise ValueError("give --pano and/or --persp (folders of images)")
    for flag, folder in (("--pano", pano), ("--persp", persp)):
        if folder is not None and not Path(folder).is_dir():
            what = "not a folder" if Path(folder).exists() else "no such folder"
            raise ValueError(f"{flag} {folder}: {what}")
        if folder is not None and not find_images(Path(folder)):
            kinds = ", ".join(sorted(IMAGE_SUFFIXES))
            raise ValueError(f"{flag} {folder}: no images in it (looked for {kinds})")
    check_height("--height", height)
    lo, hi = VIEW_RANGES["fov"]
    if fov is not None and not lo <= fov <= hi:
        raise ValueError(f"--fov must be {lo} to {hi} degrees, got {fov}")
    for key, (a, b) in ranges.items():
        lo, hi = VIEW_RANGES[key.removesuffix("_range")]
        if not lo <= a <= b <= hi:  # NaN fails too
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag} {a} {b}: need {lo} <= LO <= HI <= {hi} (degrees)")
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"--seed must be an integer >= 0, got {seed}")
    target = Path(out).resolve()
    for flag, folder in (("--pano", pano), ("--persp", persp)):
        if folder is not None and Path(folder).resolve() in (target, *target.parents):
            where = "is" if Path(folder).resolve() == target else "is inside"
            raise ValueError(  # the next run would find its masks and projections as images
                f"--out {out} {where} {flag} {folder}: choose an --out outside the input folders"
            )
    given = [kind for kind, folder in (("pano", pano), ("persp", persp)) if folder is not None]
    old = [f"{kind}.jsonl" for kind in given if (Path(out) / f"{kind}.jsonl").exists()]
    if old and not overwrite:
        raise ValueError(
            f"--out {out} holds {' and '.join(old)} from an earlier run: replace "
            f"{'them' if len(old) > 1 else 'it'} with --overwrite, or choose another --out"
        )
    out = Path(out).absolute()
    near = next(p for p in (out, *out.parents) if p.exists())  # the folder that gets written
    if not near.is_dir() or not os.access(near, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {near} is not a writable folder; choose another --out")


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden folder inside out to write into. On success its files move into out (images and
    masks before the jsonl files that name them); on failure out is left as it was."""
    out = Path(out).absolute()
    made = next((p for p in reversed((out, *out.parents)) if not p.exists()), None)
    stage = own_temp(out / "prepare")  # removes stages that killed runs left
    stage.mkdir(parents=True)
    try:
        yield stage
        files = sorted(p for p in stage.rglob("*") if p.is_file())
        for f in sorted(files, key=lambda p: p.suffix == ".jsonl"):
            (out / f.relative_to(stage)).parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, out / f.relative_to(stage))
    except BaseException:
        if made is not None:  # the folders this run created, out among them
            remove(made)
        raise
    finally:
        remove(stage)


def prepare(
    out: Path,
    pano: Path | None = None,
    persp: Path | None = None,
    skip_bad: bool = False,
    absolute: bool = False,
    overwrite: bool = False,
    **views,
) -> dict[str, Path]:
    """Write out/pano.jsonl and/or out/persp.jsonl with their masks and projected photos, all or
    nothing (replacing those of an earlier run only with `overwrite`); raise one ValueError
    listing all bad rows.

    views: the keyword arguments of collect_perspectives (height, fov, fov_range, ..., seed).
    """
    check_args(out, pano, persp, overwrite=overwrite, **views)
    out, found = Path(out), {}
    with staging(out) as stage:
        if pano is not None:
            found["pano"] = collect_panoramas(Path(pano), out, stage, absolute)
        if persp is not None:
            kw = dict(absolute=absolute, **views)
            found["persp"] = collect_perspectives(Path(persp), out, stage, **kw)
        bad = [b for _, bad_rows in found.values() for b in bad_rows]
        listing = "\n".join(f"  {file}: {reason}" for file, reason in bad)
        if bad and not skip_bad:
            raise ValueError(f"{len(bad)} bad rows, nothing written:\n{listing}")
        if empty := [kind for kind, (rows, _) in found.items() if not rows]:
            raise ValueError(f"no usable {' or '.join(empty)} images, nothing written:\n{listing}")
        if bad:
            print(f"skipped {len(bad)} bad rows:\n{listing}", file=sys.stderr)
        for kind, (rows, _) in found.items():
            lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            (stage / f"{kind}.jsonl").write_text("".join(lines), encoding="utf-8")
    return {kind: out / f"{kind}.jsonl" for kind in found}


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    p = Parser(
        description="Build pano.jsonl / persp.jsonl for DiT360 hybrid training from image folders.",
        epilog="Captions: each image needs a UTF-8 .txt file with the same stem next to it "
        "(photo.jpg -> photo.txt). Image folders are searched recursively. jsonl paths are "
        "relative to the jsonl file's folder unless --absolute.",
        argument_default=argparse.SUPPRESS,  # a flag not given takes prepare's default
    )
    p.add_argument("--out", type=Path, required=True, help="output folder for jsonl, images, masks")
    p.add_argument("--pano", type=Path, help="folder of 2:1 equirectangular panoramas")
    p.add_argument("--persp", type=Path, help="folder of perspective photos to project")
    p.add_argument(
        "--height", type=int, help="canvas height for photos (width 2x), a multiple of 16"
    )
    p.add_argument("--fov", type=float, help="horizontal fov of every photo, degrees")
    for angle in VIEW_RANGES:
        p.add_argument(f"--{angle}-range", type=float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--seed", type=int, help="seed of the sampled views")
    p.add_argument("--absolute", action="store_true", help="write absolute paths")
    p.add_argument("--skip-bad", action="store_true", help="report bad rows and write the rest")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the pano.jsonl / persp.jsonl (and the masks and projected photos) of an "
        "earlier run in --out; without it an existing one is refused",
    )
    args = vars(p.parse_args(argv))  # named as prepare's arguments
    views = {k: v for k, v in args.items() if k not in ("skip_bad", "absolute")}
    try:
        check_args(**views)
    except ValueError as e:
        fail(e)
    try:
        written = prepare(**args)
    except (ValueError, OSError) as e:  # bad rows (listed), or a failed write
        fail(e, code=1)
    for path in written.values():
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
