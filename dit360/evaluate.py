"""Seam quality of panoramas: the Discontinuity Score (`panorama.discontinuity_score`, Christensen
et al. 2024, "Geometry Fidelity for Spherical Images", arXiv 2407.18207) across the wrap, next to
the same score across the middle column, where nothing was ever cut: a seam stands out when the
first is clearly higher than the second. Lower is better.

python -m dit360.evaluate DIR [DIR or IMAGE ...]
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .image import open_image
from .options import Parser, fail
from .panorama import discontinuity_score

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")


def gray(img: Image.Image) -> torch.Tensor:
    """An image's luma (H, W) float64 in [0, 1]."""
    rgb = np.asarray(open_image(img).convert("RGB"), dtype=np.float64) / 255  # 16-bit grey too
    return torch.from_numpy(rgb @ np.array(LUMA))


def seam_scores(img: Image.Image) -> tuple[float, float]:
    """The Discontinuity Score across the wrap and across the middle column of a panorama."""
    g = gray(img)
    return discontinuity_score(g, 0).item(), discontinuity_score(g, g.shape[-1] // 2).item()


def seam_report(img: Image.Image) -> str:
    """The seam scores as the scripts print them."""
    wrap, middle = seam_scores(img)
    return f"seam score {wrap:.3f} (middle {middle:.3f}; lower is better)"


def panoramas(paths: list[Path]) -> list[Path]:
    """The image files given, and those in (and below) the folders given, sorted; ValueError if
    a path does not exist or nothing is found."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"{path}: no such file or folder")
    if not found:
        raise ValueError(f"no images ({', '.join(SUFFIXES)}) in {', '.join(map(str, paths))}")
    return found


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("paths", nargs="+", type=Path, help="folders of panoramas, or image files")
    args = p.parse_args(argv)
    try:
        files = panoramas(args.paths)
    except ValueError as e:
        fail(e)
    scores = []
    for path in files:
        try:
            img = open_image(path)  # a ValueError or OSError that names the file
        except (OSError, ValueError) as e:
            fail(e)
        if img.width != 2 * img.height:  # e.g. the cube faces --cubemap writes beside a panorama
            print(f"{path}: skipped, {img.width}x{img.height} is not 2:1")
            continue
        scores.append(seam_scores(img))
        print(f"{path}: seam {scores[-1][0]:.3f}, middle {scores[-1][1]:.3f}")
    if not scores:
        fail("no 2:1 panoramas among the images")
    wrap, middle = np.mean(scores, axis=0)
    print(
        f"mean of {len(scores)} panoramas: seam {wrap:.3f}, middle {middle:.3f} "
        "(Discontinuity Score, lower is better; a seam stands out when seam > middle)"
    )


if __name__ == "__main__":
    main()
