"""What sample.py and edit.py write beside a panorama on request, and the seam score they print:
--viewer (NAME.html, `dit360.view`), --cubemap (six faces NAME-px ... NAME-nz in three.js / Unity
order, `panorama.FACES`, and the horizontal cross NAME-cross), --cubemap-size (default H/2),
--captions (NAME.txt, the prompt, which prepare.py reads as the caption)."""

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .evaluate import seam_report
from .files import atomic_path
from .image import FORMATS
from .options import SIDE, bounded
from .panorama import FACES, cube_to_layout, equirect_to_cube
from .view import write_viewer


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """--viewer, --cubemap, --cubemap-size, --captions and --overwrite."""
    g = parser.add_argument_group("outputs beside the panorama")
    g.add_argument(
        "--captions",
        action="store_true",
        help="also write NAME.txt, the prompt (prepare.py reads it as the caption)",
    )
    g.add_argument("--viewer", action="store_true", help="also write NAME.html, a 360 viewer")
    g.add_argument(
        "--cubemap",
        action="store_true",
        help="also write the cube faces NAME-px, -nx, -py, -ny, -pz, -nz and NAME-cross",
    )
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


def to_image(x: Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB."""
    return Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def save_image(img: Image.Image, path: Path) -> Path:
    """Write a PNG or JPEG (by the extension; JPEG quality 95) atomically, without metadata."""
    with atomic_path(path) as tmp:
        img.save(tmp, format=FORMATS[path.suffix.lower()], quality=95)  # PNG ignores quality
    return path


def write_cubemap(image: Image.Image, path: Path, size: int | None = None) -> list[Path]:
    """Write the cube map of the panorama `image` beside `path` (same format): the faces
    PATH-px ... PATH-nz, size x size (default height / 2), then PATH-cross (3 x 4 faces, black
    where no face is)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)
    faces = equirect_to_cube(x.permute(2, 0, 1)[None], size or image.height // 2)  # (1, 6, 3, F, F)
    names = [*(f"-{face}" for face in FACES), "-cross"]
    images = [*faces[0], cube_to_layout(faces, "cross")[0]]
    return [
        save_image(to_image(img), path.with_name(path.stem + name + path.suffix))
        for name, img in zip(names, images, strict=True)
    ]


def extras_missing(path: Path, args: argparse.Namespace) -> bool:
    """Whether --viewer or --cubemap ask for a file beside the panorama at `path` that is not there
    (a resumed batch makes them for the images it skips)."""
    names = (
        [".html"] * args.viewer
        + [".txt"] * args.captions
        + [f"-{f}{path.suffix}" for f in (*FACES, "cross")] * args.cubemap
    )
    return any(not path.with_name(path.stem + name).exists() for name in names)


def write_caption(text: str, path: Path) -> Path:
    """Write `text` (and a newline) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return path


def write_extras(image: Image.Image, path: Path, args: argparse.Namespace, prompt: str) -> str:
    """Write what --captions, --viewer and --cubemap ask for beside the panorama (made from
    `prompt`) just written at `path`; returns the seam score and what was written, for the
    script's line."""
    wrote = [write_caption(prompt, path.with_suffix(".txt"))] if args.captions else []
    if (args.viewer or args.cubemap) and image.width != 2 * image.height:
        warnings.warn(f"{path} is not 2:1: no viewer page or cube map", stacklevel=2)
    else:
        wrote += [write_viewer(path)] if args.viewer else []
        wrote += write_cubemap(image, path, args.cubemap_size) if args.cubemap else []
    also = f"; also wrote {', '.join(p.name for p in wrote)}" if wrote else ""
    return seam_report(image) + also
