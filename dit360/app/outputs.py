"""What sample.py and edit.py write beside a panorama on request (--captions NAME.txt, --viewer
NAME.html, --cubemap NAME-px ... NAME-nz and NAME-cross) and the seam score they print; the same
for any file: `python -m dit360.app.view` (`view_main`) and `python -m dit360.app.evaluate`."""

import argparse
import base64
import html
import os
import re
import warnings
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..load.files import atomic_path, short
from ..load.image import FORMATS, from_pil, loaded, open_image, save_image, to_pil
from .cli import one_line
from .options import SIDE, Parser, bounded, fail
from .panorama import FACES, cube_to_cross, discontinuity_score, equirect_to_cube

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # what `python -m dit360.app.evaluate DIR` reads
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")
MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# The viewer page: viewer.html with @title@, @mime@ and @data@ (the file's bytes) filled in. Its
# WebGL2 shader looks each pixel's direction up with the maths of `equirect_to_perspective` (same
# yaw and pitch signs, horizontal fov): a screenshot equals our render (tested in Chromium).
FIELD = re.compile(r"@(title|mime|data)@")
SWITCHES = {  # the flags of what is written beside the panorama, and their help
    "--captions": "also write NAME.txt, the prompt (prepare.py reads it as the caption)",
    "--viewer": "also write NAME.html, a 360 viewer",
    "--cubemap": "also write the cube faces NAME-px, -nx, -py, -ny, -pz, -nz and NAME-cross",
}


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """--viewer, --cubemap, --cubemap-size, --captions and --overwrite."""
    g = parser.add_argument_group("outputs beside the panorama")
    for flag, help in SWITCHES.items():
        g.add_argument(flag, action="store_true", help=help)
    g.add_argument(
        "--cubemap-size",
        type=bounded(int, 1, SIDE),
        metavar="N",
        help="face size, height / 2 if not given",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="a batch makes again the outputs that record other settings (without it, it stops "
        "at the first); those with the job's settings are skipped either way",
    )


def write_cubemap(image: Image.Image, path: str | Path, size: int | None = None) -> list[Path]:
    """Write the faces PATH-px ... PATH-nz (size x size, default height / 2; three.js and Unity's
    order) of the 2:1 panorama `image`, and PATH-cross (3 x 4), as PATH is; else ValueError."""
    path, size = Path(path), image.height // 2 if size is None else size
    if image.width != 2 * image.height or path.suffix.lower() not in FORMATS:
        raise ValueError(f"{path}: cube faces are made of a 2:1 image to .png or .jpg files")
    if not (type(size) is int and 1 <= size <= SIDE):  # 6 faces of size^2 pixels are allocated
        raise ValueError(f"--cubemap-size (size) must be a whole number 1 to {SIDE}, got {size!r}")
    faces = equirect_to_cube(from_pil(image, unit=True)[None], size)
    wrote = [path.with_name(f"{path.stem}-{name}{path.suffix}") for name in (*FACES, "cross")]
    for out, face in zip(wrote, [*faces[0], cube_to_cross(faces)[0]], strict=True):
        fmt = FORMATS[path.suffix.lower()]  # faces: (1, 6, 3, F, F); PNG ignores the quality
        save_image(to_pil(face, unit=True), out, format=fmt, quality=95)
    return wrote


EXTRAS = {"captions": bool, "viewer": bool, "cubemap": bool, "cubemap_size": int | None}
Extras = argparse.Namespace | Mapping[str, object]  # the scripts' flags, or {"viewer": True, ...}


def extras(args: Extras) -> argparse.Namespace:
    """The EXTRAS of `args` (a mapping, or an object with them as attributes); else TypeError."""
    got = args if isinstance(args, Mapping) else getattr(args, "__dict__", {})
    if bad := [k for k, t in EXTRAS.items() if not isinstance(got.get(k), t)]:
        what = "captions, viewer, cubemap (True or False), cubemap_size (an int or None)"
        raise TypeError(f"args must hold {what}: {bad[0]} is {short(got.get(bad[0]))}")
    return argparse.Namespace(**{k: got.get(k) for k in EXTRAS})


def beside(path: str | Path, args: Extras) -> list[Path]:
    """The files the flags ask for beside the panorama `path`."""
    path, args = Path(path), extras(args)
    cube = [f"-{f}{path.suffix}" for f in (*FACES, "cross")] * args.cubemap
    names = [".html"] * args.viewer + [".txt"] * args.captions + cube
    return [path.with_name(path.stem + name) for name in names]


def extras_missing(path: Path, args: Extras) -> bool:
    """Whether a file `beside` the panorama `path` is not there, or its cube faces are not of the
    size asked (a resumed batch makes them for the images it skips)."""
    args = extras(args)
    files = beside(path, args)
    if not all(p.exists() for p in files):
        return True
    if not args.cubemap:
        return False
    try:  # the headers only: the cross is 4 x 3 faces
        with Image.open(path) as pano, Image.open(files[-1]) as cross:
            side = args.cubemap_size or pano.height // 2
            return cross.size != (4 * side, 3 * side)
    except Exception:  # noqa: BLE001 - PIL fails in many ways: made again
        return True


def write_extras(image: Image.Image, path: str | Path, args: Extras, prompt: str) -> str:
    """Write what the flags ask for beside the panorama `path` (made from `prompt`); returns the
    seam score and what was written, for the script's line."""
    wrote, args, path = [], extras(args), Path(path)
    if args.captions:
        wrote.append(path.with_suffix(".txt"))
        with atomic_path(wrote[-1]) as tmp:
            tmp.write_text(prompt + "\n", encoding="utf-8")
    if (args.viewer or args.cubemap) and image.width != 2 * image.height:
        warnings.warn(
            f"{image.width}x{image.height} is not 2:1: no viewer page or cube map", stacklevel=2
        )
    else:
        wrote += [write_viewer(path)] if args.viewer else []
        wrote += write_cubemap(image, path, args.cubemap_size) if args.cubemap else []
    also = f"; also wrote {', '.join(p.name for p in wrote)}" if wrote else ""
    return seam_report(image) + also


def write_viewer(image: str | Path, out: str | Path | None = None) -> Path:
    """Write the viewer page of the 2:1 panorama file `image` (its bytes embedded as they are) to
    `out` (default: beside it, .html), atomically; ValueError if not readable or not 2:1."""
    image = Path(image)
    out = Path(out) if out else image.with_suffix(".html")
    if out.suffix.lower() not in (".html", ".htm"):  # not the image, nor another of the user's
        raise ValueError(f"--out {out}: use a .html file name")
    try:
        with loaded(image) as img:
            fmt, (w, h) = img.format, img.size
    except OSError as e:
        raise ValueError(f"{image}: not a readable image ({e})") from None
    if fmt not in MIME:
        raise ValueError(f"{image}: {fmt} images are not embedded; use PNG, JPEG or WebP")
    if w != 2 * h:
        raise ValueError(f"{image}: {w}x{h} is not 2:1 (equirectangular)")
    data = base64.b64encode(image.read_bytes()).decode("ascii")
    fields = dict(title=html.escape(image.stem), mime=MIME[fmt], data=data)
    page = resources.files(__package__).joinpath("viewer.html").read_text(encoding="utf-8")
    with atomic_path(out) as tmp:
        tmp.write_text(FIELD.sub(lambda m: fields[m[1]], page), encoding="utf-8")
    return out


def view_main(argv: list[str] | None = None) -> None:
    """python -m dit360.app.view pano.png [--out pano.html]: a 360-degree viewer page, one HTML file
    (the image embedded, no network). Drag to look around, the wheel zooms; the URL fragment
    holds the view (#yaw=90&pitch=10&fov=75, degrees), so a view can be shared."""
    p = Parser(description=view_main.__doc__)
    p.add_argument("image", type=Path, help="an equirectangular panorama (2:1 PNG, JPEG or WebP)")
    p.add_argument("--out", type=Path, help="the page to write (default: IMAGE with .html)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.image):  # False, not OSError, on a name too long
        fail(f"{args.image}: no such file")
    try:
        out = write_viewer(args.image, args.out)
    except ValueError as e:
        fail(e)
    except OSError as e:
        fail(f"cannot write {args.out or args.image.with_suffix('.html')}: {e}")
    print(f"wrote {one_line(out)}: open it in a browser (drag to look around, the wheel zooms)")


def seam_scores(img: Image.Image) -> tuple[float, float]:
    """The Discontinuity Score of a panorama across the wrap and across the middle column."""
    rgb = np.asarray(open_image(img).convert("RGB"), dtype=np.float64) / 255  # 16-bit grey too
    g = torch.from_numpy(rgb @ np.array(LUMA))  # (H, W) luma in [0, 1]
    return discontinuity_score(g, 0).item(), discontinuity_score(g, g.shape[-1] // 2).item()


def seam_report(img: Image.Image) -> str:
    """The seam scores as the scripts print them."""
    wrap, middle = seam_scores(img)
    return f"seam score {wrap:.3f} (middle {middle:.3f}; lower is better)"


def evaluate_main(argv: list[str] | None = None) -> None:
    """python -m dit360.app.evaluate DIR [DIR or IMAGE ...]: the Discontinuity Score (Christensen et
    al. 2024, arXiv 2407.18207) of each 2:1 image across the wrap, and across the middle column,
    where nothing was cut: a seam stands out when the first is clearly higher. Lower is better."""
    p = Parser(description=evaluate_main.__doc__)
    p.add_argument("paths", nargs="+", type=Path, help="folders of panoramas, or image files")
    args = p.parse_args(argv)
    files = []
    for path in args.paths:
        if os.path.isdir(path):  # False, not OSError, on a name too long
            found = (p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES)
            files += sorted(p for p in found if p.is_file())  # not a folder x.png, nor a FIFO
        elif os.path.isfile(path):
            files.append(path)
        else:
            fail(f"{path}: no such file or folder")
    if not files:
        fail(f"no images ({', '.join(SUFFIXES)}) in {', '.join(map(str, args.paths))}")
    scores = []
    for path in files:
        try:
            img = open_image(path)  # a ValueError or OSError that names the file
        except (OSError, ValueError) as e:
            fail(e)
        if img.width != 2 * img.height or img.height < 3:  # e.g. the cube faces --cubemap writes
            print(f"{one_line(path)}: skipped, {img.width}x{img.height} is not 2:1 (or under 6x3)")
            continue
        scores.append(seam_scores(img))
        print(f"{one_line(path)}: seam {scores[-1][0]:.3f}, middle {scores[-1][1]:.3f}")
    if not scores:
        fail("no 2:1 panoramas among the images")
    wrap, middle = np.mean(scores, axis=0)
    print(
        f"mean of {len(scores)} panoramas: seam {wrap:.3f}, middle {middle:.3f} "
        "(Discontinuity Score, lower is better; a seam stands out when seam > middle)"
    )
