"""Outpaint or inpaint a 360-degree panorama with FLUX.1-dev and the DiT360 LoRA (RF-Inversion +
Personalize-Anything token replacement, as DiT360's editing.py).

The mask is a PNG of any size: white = keep the source, black = generate (outpainting);
--invert regenerates the white region instead (inpainting).

python edit.py --image pano.png --mask mask.png --prompt "This is a panorama image. A village..."
"""

import argparse
import sys
from pathlib import Path

from PIL import Image

from dit360.editing import edit_image
from dit360.files import exit_on_sigterm
from dit360.image import open_image, read_rgb, save_panorama
from dit360.options import EditOptions, Parser, add_flags, fail
from dit360.outputs import add_output_flags, write_extras
from sample import checked


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--image", required=True, help="the source panorama (2:1)")
    p.add_argument("--mask", required=True, help="PNG, white = keep (any size: nearest resize)")
    p.add_argument("--prompt", required=True, help="the target prompt")
    p.add_argument("--height", type=int, default=1024, help="work at height x 2 height")
    p.add_argument("--resize", action="store_true", help="stretch an image that is not 2:1")
    p.add_argument("--out", default="edited.png", help=".png or .jpg, with 360 metadata")
    add_flags(p, EditOptions)
    add_output_flags(p)
    return p.parse_args(argv)


def read_panorama(path: str | Path, height: int = 1024, resize: bool = False) -> Image.Image:
    """The source panorama as RGB at height x 2 height; not 2:1 is an error unless `resize`."""
    img = open_image(path)
    w, h = img.size
    if w != 2 * h and not resize:
        raise ValueError(f"{path}: {w}x{h} is not 2:1; pass --resize to stretch it to 2:1")
    return read_rgb(img, 2 * height, height)


def main(argv: list[str] | None = None) -> None:
    exit_on_sigterm()
    args = parse_args(argv)
    if args.height <= 0 or args.height % 16:
        fail(f"--height must be a positive multiple of 16, got {args.height}")
    opts, out = checked(EditOptions, args)  # every flag, before anything slow (exit 2)
    try:  # edit_image checks the size and the mask before it loads any model
        image = read_panorama(args.image, args.height, args.resize)
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
        result, report = edit_image(image, open_image(args.mask), args.prompt, opts, log=log)
    except (ValueError, OSError) as e:  # also missing or bad weights (--base, --lora)
        fail(e)
    except FloatingPointError as e:  # NaN/inf latents: nothing is written
        fail(e, code=1)
    try:
        save_panorama(result, out)
        extras = write_extras(result, out, args)
    except OSError as e:
        fail(f"cannot write {out}: {e}", code=1)
    print(f"wrote {out} ({result.width}x{result.height}): {report}; {extras}")


if __name__ == "__main__":
    main()
