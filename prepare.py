"""Build the hybrid-training jsonl files (docs/METHOD.md section 5) from folders of images and
captions.

python prepare.py --out data --pano panoramas/ --persp photos/ --height 1024

Panoramas (2:1) are used in place, with an all-white mask; photos are projected into a height x
2 height canvas at a given or sampled field of view and sampled yaw / pitch / roll, with a mask of
the covered area (255 = supervised). Arguments are checked before any work. Everything is
written into a hidden folder inside --out and moved into place at the end, so a failed or
interrupted run leaves nothing behind; a bad row fails the run unless --skip-bad. An earlier
run's pano.jsonl / persp.jsonl in --out is replaced only with --overwrite; --out may not be (inside)
an input folder.

--hf-dataset writes a Hugging Face dataset's panoramas and captions into OUT/panoramas/ first
(dit360.load.hub_data); --refine-poles regenerates the panoramas' poles into OUT/refined/
(dit360.app.refine). Both resume where a killed run stopped; pano.jsonl lists the last of them.

--out receives KIND.jsonl and the folder KIND-files-N of the masks and projections its rows name
(KIND: pano, persp; N new for each run). A KIND.jsonl switches to its new rows in one rename, once
its folder is complete, so at any moment it names only files of one run; then the other
KIND-files-N folders (an earlier run's, or a killed run's) are removed. Nothing else in --out is.
"""

from dit360.app.cli import REFUSED, check_prompt, handle_signals, one_line, run_main

if __name__ == "__main__":  # before torch loads: Ctrl-C or SIGTERM while importing is one line
    handle_signals()


import argparse
import inspect
import json
import os
import random
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from dit360.app import refine
from dit360.app.options import Parser, check_height, fail
from dit360.app.panorama import VIEW_RANGES, project_photo
from dit360.load import hub_data
from dit360.load.files import named, own_temp, read_text, remove, unwritable
from dit360.load.image import open_image
from dit360.train.data import READ_ERRORS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
Row = dict[str, str]
Bad = list[tuple[str, str]]  # (file, reason)


def find_images(folder: Path) -> list[Path]:
    """Image files under folder (recursively), sorted."""
    files = (p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(p for p in files if p.is_file())


def read_caption(image: Path) -> str:
    """The caption of an image: the text of the .txt file with the same stem next to it."""
    check_prompt(str(image), "its name")  # it goes into a jsonl as text: no undecodable byte
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
    image, mask, out = image.resolve(), mask.resolve(), out.resolve()
    if not absolute and image.drive == out.drive:  # on another Windows drive: absolute
        image, mask = (Path(os.path.relpath(p, out)) for p in (image, mask))
    return {"image": image.as_posix(), "caption": caption, "mask": mask.as_posix()}


def check_panorama(image: Path) -> tuple[str, tuple[int, int]]:
    """A panorama's caption and size; ValueError if it has no caption, is not 2:1 or does not
    decode."""
    caption = read_caption(image)
    w, h = open_image(image).size  # decoded in full: corrupt files fail here
    if abs(w / h - 2) > 0.02:
        raise ValueError(f"not 2:1 ({w}x{h})")
    return caption, (w, h)


def collect_panoramas(
    folder: Path, out: Path, stage: Path, absolute: bool = False, files: str = "masks"
) -> tuple[list[Row], Bad]:
    """Rows for the 2:1 panoramas under folder, their all-white masks staged for out/files."""
    rows, bad = [], []
    for image in tqdm(find_images(folder), desc="panoramas", unit="img", disable=None):
        try:
            caption, (w, h) = check_panorama(image)
        except READ_ERRORS as e:  # a bad row, reported with the others at the end
            bad.append((str(image), str(e) or type(e).__name__))
            continue
        mask = Path(files) / f"pano_{w}x{h}.png"
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
    files: str = "persp",
) -> tuple[list[Row], Bad]:
    """Rows for the photos under folder, projected with their masks, staged for out/files."""
    rng = random.Random(seed)
    rows, bad, seen = [], [], {}
    for image in tqdm(find_images(folder), desc="perspective", unit="img", disable=None):
        # Drawn for every file, so one bad file does not change the others' views.
        view_fov = fov if fov is not None else rng.uniform(*fov_range)
        angles = [rng.uniform(*r) for r in (yaw_range, pitch_range, roll_range)]
        name = "__".join(image.relative_to(folder).with_suffix("").parts)  # a/b.png -> a__b
        try:
            if name in seen:
                raise ValueError(f"same name as {seen[name].name}")
            seen[name] = image
            caption = read_caption(image)
            img = open_image(image).convert("RGB")  # turned as its EXIF says
            canvas, mask = project_photo(img, view_fov, *angles, height)
        except READ_ERRORS as e:  # a bad row, reported with the others at the end
            bad.append((str(image), str(e) or type(e).__name__))
            continue
        paths = Path(files) / f"{name}.png", Path(files) / f"{name}_mask.png"
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
    hf_dataset: str | None = None,
    **ranges: tuple[float, float],
) -> None:
    """Raise a ValueError naming the flag for the first bad argument (before any work)."""
    if pano is None and persp is None and hf_dataset is None:
        raise ValueError("give --pano and/or --persp (folders of images), or --hf-dataset")
    if pano is not None and hf_dataset is not None:
        raise ValueError("give --pano or --hf-dataset, not both")
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
        src = Path(folder or target).resolve()  # (relpath: an error across Windows drives)
        top = src.relative_to(target).parts[0] if target in src.parents else ""
        if FILES.fullmatch(top):  # a run removes the files folders: the images with them
            raise ValueError(
                f"{flag} {folder} is inside {top} of --out {out}, which prepare.py replaces: "
                "move the images out of it"
            )
    given = [kind for kind, src in (("pano", pano or hf_dataset), ("persp", persp)) if src]
    old = [f"{kind}.jsonl" for kind in given if (Path(out) / f"{kind}.jsonl").exists()]
    if old and not overwrite:
        raise ValueError(
            f"--out {out} holds {' and '.join(old)} from an earlier run: replace "
            f"{'them' if len(old) > 1 else 'it'} with --overwrite, or choose another --out"
        )
    if near := unwritable(out := Path(out).absolute()):
        raise ValueError(f"--out {out}: {near} is not a writable folder; choose another --out")


FILES = re.compile(r"(pano|persp)-files-(\d+)")  # ours in --out: the files a KIND.jsonl names


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden folder inside out to write into: KIND.jsonl and KIND-files-N. On success each
    folder moves into out (a new name), then its jsonl replaces the old one (one rename), then
    the other KIND-files-N folders are removed; on failure out is left as it was."""
    out = Path(out).absolute()
    made = next((p for p in reversed((out, *out.parents)) if not p.exists()), None)
    stage = own_temp(out / "prepare")  # removes stages that killed runs left
    stage.mkdir(parents=True)
    try:
        yield stage
        for files in sorted(p.name for p in stage.iterdir() if FILES.fullmatch(p.name)):
            kind = FILES.fullmatch(files)[1]
            replaced = (out / f"{kind}.jsonl").exists()  # else a KIND-files-N here is no run's
            os.replace(stage / files, out / files)
            os.replace(stage / f"{kind}.jsonl", out / f"{kind}.jsonl")  # the switch
            for old in out.iterdir() if replaced else ():  # the files of earlier (or killed) runs
                if (m := FILES.fullmatch(old.name)) and m[1] == kind and old.name != files:
                    remove(old)
    except BaseException as e:
        remove(stage)  # then the folders this run made, if empty (another run may write there)
        for folder in [out, *out.parents][: len(out.relative_to(made).parts) + 1] if made else []:
            with suppress(OSError):
                folder.rmdir()
        if isinstance(e, OSError):
            named(e, stage, out)
        raise
    finally:
        remove(stage)


def files_folder(out: Path, kind: str) -> str:
    """KIND-files-N, N above every N in out: a name no earlier run used."""
    found = [int(m[2]) for p in out.iterdir() if (m := FILES.fullmatch(p.name))]
    return f"{kind}-files-{max(found, default=0) + 1}"


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
            files = files_folder(stage.parent, "pano")
            found["pano"] = collect_panoramas(Path(pano), out, stage, absolute, files)
        if persp is not None:
            kw = dict(absolute=absolute, files=files_folder(stage.parent, "persp"), **views)
            found["persp"] = collect_perspectives(Path(persp), out, stage, **kw)
        bad = [b for _, bad_rows in found.values() for b in bad_rows]
        listing = "\n".join(f"  {f}: {why.removeprefix(f'{f}: ')}" for f, why in bad)  # named once
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


def refined(pano: Path, out: Path, poles: refine.Refine, skip_bad: bool = False) -> Path:
    """The panoramas under pano with their poles refined into out/refined (resuming); the bad
    ones listed as prepare lists them."""
    images = find_images(Path(pano))
    check = lambda image: check_panorama(image)[0]  # noqa: E731
    items, bad = refine.plan(Path(pano), images, Path(out) / "refined", check)
    listing = "\n".join(f"  {file}: {reason}" for file, reason in bad)
    if bad and not skip_bad or not items:
        raise ValueError(f"{len(bad)} bad rows, nothing refined:\n{listing}")
    if bad:
        print(f"skipped {len(bad)} bad rows:\n{listing}", file=sys.stderr)
    refine.refine_poles(items, poles, log=lambda m: print(m, file=sys.stderr))
    return Path(out) / "refined"


# What --help says of the flags that default to collect_perspectives' own defaults.
DEFAULTS = {k: v.default for k, v in inspect.signature(collect_perspectives).parameters.items()}
RANGE_HELP = {
    "fov": "horizontal fov (without --fov)", "yaw": "yaw, + = right",
    "pitch": "pitch, + = up", "roll": "roll, + = clockwise",
}  # fmt: skip


def flat(value: object) -> tuple:
    """A default as --help writes it: a range's two numbers, or the one value."""
    return value if isinstance(value, tuple) else (value,)


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
    said = lambda key: f" (default: {' '.join(map(str, flat(DEFAULTS[key])))})"  # noqa: E731
    height = "canvas height for photos (width 2x), a multiple of 16"
    p.add_argument("--height", type=int, help=height + said("height"))
    p.add_argument("--fov", type=float, help="horizontal fov of every photo, degrees (default: "
                   "drawn from --fov-range)")  # fmt: skip
    for angle, (lo, hi) in VIEW_RANGES.items():
        help = (
            f"each photo's {RANGE_HELP[angle]}, drawn uniformly in [LO, HI] degrees ({lo} to {hi})"
        )
        p.add_argument(f"--{angle}-range", type=float, nargs=2, metavar=("LO", "HI"),
                       help=help + said(f"{angle}_range"))  # fmt: skip
    p.add_argument("--seed", type=int, help="seed of the sampled views" + said("seed"))
    p.add_argument("--absolute", action="store_true", help="write absolute paths")
    p.add_argument("--skip-bad", action="store_true", help="report bad rows and write the rest")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the pano.jsonl / persp.jsonl (and the masks and projected photos) of an "
        "earlier run in --out; without it an existing one is refused",
    )
    hub_data.add_flags(p)
    refine.add_flags(p)
    args = vars(p.parse_args(argv))  # named as prepare's arguments (once hub's and refine's go)
    hub, poles = {}, None
    try:
        hub, poles = hub_data.from_flags(args), refine.from_flags(args)
        views = {k: v for k, v in args.items() if k not in ("skip_bad", "absolute")}
        placing = [
            f"--{k.replace('_', '-')}" for k in views if k not in ("out", "pano", "overwrite")
        ]
        if placing and "persp" not in args:  # they place photos only: a panorama run drops them
            raise ValueError(f"{', '.join(placing)} without --persp: add it, or drop them")
        if "fov" in args and "fov_range" in args:
            raise ValueError("--fov gives every photo its fov, --fov-range draws it: give one")
        check_args(**views, hf_dataset=hub.get("name"))
        source = hub_data.open_source(**hub) if hub else None  # fetched or found in the cache
        if poles and "pano" not in args and not hub:
            raise ValueError("--refine-poles refines panoramas: give --pano or --hf-dataset")
        if poles:
            refine.check_weights(poles)  # found and checked before any work
    except REFUSED as e:
        fail(e)
    try:
        if source is not None:
            args["pano"] = hub_data.extract(source, Path(args["out"]) / "panoramas")
        if poles and "pano" in args:
            args["pano"] = refined(args["pano"], args["out"], poles, args.get("skip_bad", False))
        written = prepare(**args)
    except (ValueError, OSError) as e:  # bad rows (listed), or a failed write
        fail(e, code=1)
    for path in written.values():
        print(f"wrote {one_line(path)}")


if __name__ == "__main__":
    run_main(main)
