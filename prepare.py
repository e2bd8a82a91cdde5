"""Build the hybrid-training jsonl files (DESIGN.md section 4) from folders of images + captions.

python prepare.py --out data --pano panoramas/ --persp photos/ --height 1024

Panoramas (2:1) are used in place, with an all-white mask; photos are projected into a height x
2 height canvas at a given or sampled field of view and sampled yaw / pitch / roll, with a mask of
the covered area (255 = supervised). All files are written atomically, and no jsonl at all if a
row is bad, unless --skip-bad.
"""

import argparse
import json
import os
import random
import sys
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from dit360.data import READ_ERRORS
from dit360.files import atomic_path
from dit360.image import open_image, project_photo

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
    caption = path.read_text(encoding="utf-8").strip()
    if not caption:
        raise ValueError(f"empty caption {path.name}")
    return caption


def save_atomic(img: Image.Image, path: Path) -> None:
    """Save a PNG, atomically."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def row(image: Path, caption: str, mask: Path, out: Path, absolute: bool = False) -> Row:
    """One jsonl row for a jsonl file in folder out: paths relative to out, or absolute."""
    image, mask = image.resolve(), mask.resolve()
    if not absolute:
        image, mask = (Path(os.path.relpath(p, out.resolve())) for p in (image, mask))
    return {"image": image.as_posix(), "caption": caption, "mask": mask.as_posix()}


def collect_panoramas(folder: Path, out: Path, absolute: bool = False) -> tuple[list[Row], Bad]:
    """Rows for the 2:1 panoramas under folder, writing their all-white masks under out/masks."""
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
        mask = out / "masks" / f"pano_{w}x{h}.png"
        if not mask.exists():
            save_atomic(Image.new("L", (w, h), 255), mask)
        rows.append(row(image, caption, mask, out, absolute))
    return rows, bad


def collect_perspectives(
    folder: Path,
    out: Path,
    height: int = 1024,
    fov: float | None = None,
    fov_range: tuple[float, float] = (60.0, 90.0),
    yaw_range: tuple[float, float] = (-180.0, 180.0),
    pitch_range: tuple[float, float] = (0.0, 0.0),
    roll_range: tuple[float, float] = (0.0, 0.0),
    seed: int = 0,
    absolute: bool = False,
) -> tuple[list[Row], Bad]:
    """Rows for the photos under folder, projected with their masks into out/persp."""
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
            with Image.open(image) as img:
                img = ImageOps.exif_transpose(img).convert("RGB")
            canvas, mask = project_photo(img, view_fov, *angles, height)
        except READ_ERRORS as e:  # a bad row, reported with the others at the end
            bad.append((str(image), str(e) or type(e).__name__))
            continue
        paths = out / "persp" / f"{name}.png", out / "persp" / f"{name}_mask.png"
        save_atomic(canvas, paths[0])
        save_atomic(mask, paths[1])
        rows.append(row(paths[0], caption, paths[1], out, absolute))
    return rows, bad


def prepare(
    out: Path,
    pano: Path | None = None,
    persp: Path | None = None,
    skip_bad: bool = False,
    absolute: bool = False,
    **views,
) -> dict[str, Path]:
    """Write out/pano.jsonl and/or out/persp.jsonl; raise one ValueError listing all bad rows.

    views: the keyword arguments of collect_perspectives (height, fov, fov_range, ..., seed).
    """
    out, found = Path(out), {}
    if pano is not None:
        found["pano"] = collect_panoramas(Path(pano), out, absolute)
    if persp is not None:
        found["persp"] = collect_perspectives(Path(persp), out, absolute=absolute, **views)
    bad = [b for _, bad_rows in found.values() for b in bad_rows]
    if bad:
        listing = "\n".join(f"  {file}: {reason}" for file, reason in bad)
        if not skip_bad:
            raise ValueError(f"{len(bad)} bad rows, no jsonl written:\n{listing}")
        print(f"skipped {len(bad)} bad rows:\n{listing}", file=sys.stderr)
    written = {}
    for kind, (rows, _) in found.items():
        written[kind] = out / f"{kind}.jsonl"
        with atomic_path(written[kind]) as tmp:
            lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            tmp.write_text("".join(lines), encoding="utf-8")
    return written


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    p = argparse.ArgumentParser(
        description="Build pano.jsonl / persp.jsonl for DiT360 hybrid training from image folders.",
        epilog="Captions: each image needs a UTF-8 .txt file with the same stem next to it "
        "(photo.jpg -> photo.txt). Image folders are searched recursively. jsonl paths are "
        "relative to the jsonl file's folder unless --absolute.",
        argument_default=argparse.SUPPRESS,  # a flag not given takes prepare's default
    )
    p.add_argument("--out", type=Path, required=True, help="output folder for jsonl, images, masks")
    p.add_argument("--pano", type=Path, help="folder of 2:1 equirectangular panoramas")
    p.add_argument("--persp", type=Path, help="folder of perspective photos to project")
    p.add_argument("--height", type=int, help="canvas height for photos (width 2x)")
    p.add_argument("--fov", type=float, help="horizontal fov of every photo, degrees")
    for angle in ("fov", "yaw", "pitch", "roll"):
        p.add_argument(f"--{angle}-range", type=float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--seed", type=int, help="seed of the sampled views")
    p.add_argument("--absolute", action="store_true", help="write absolute paths")
    p.add_argument("--skip-bad", action="store_true", help="report bad rows and write the rest")
    args = vars(p.parse_args(argv))  # named as prepare's arguments
    if "pano" not in args and "persp" not in args:
        p.error("give --pano and/or --persp")
    try:
        written = prepare(**args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    for path in written.values():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
