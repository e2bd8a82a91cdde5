"""Outpaint or inpaint a 360-degree panorama with FLUX.1-dev and the DiT360 LoRA (RF-Inversion +
Personalize-Anything token replacement, as DiT360's editing.py).

The mask is a PNG of any size: white = keep the source, black = generate (outpainting);
--invert regenerates the white region instead (inpainting).

python edit.py --image pano.png --mask mask.png --prompt "This is a panorama image. A village..."
"""

import argparse
import sys

from dit360.editing import edit_image, read_panorama
from dit360.image import check_output_path, open_image, save_panorama
from dit360.options import EditOptions, HelpFormatter, add_flags, from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--image", required=True, help="the source panorama (2:1)")
    p.add_argument("--mask", required=True, help="PNG, white = keep (any size: nearest resize)")
    p.add_argument("--prompt", required=True, help="the target prompt")
    p.add_argument("--height", type=int, default=1024, help="work at height x 2 height")
    p.add_argument("--resize", action="store_true", help="stretch an image that is not 2:1")
    p.add_argument("--out", default="edited.png", help=".png or .jpg, with 360 metadata")
    add_flags(p, EditOptions)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        out = check_output_path(args.out)
        image = read_panorama(args.image, args.height, args.resize)
        mask = open_image(args.mask)
        opts = from_args(EditOptions, args)
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
        result, report = edit_image(image, mask, args.prompt, opts, log=log)
        save_panorama(result, out)
    except (ValueError, OSError) as e:  # OSError: missing or unreadable files, unwritable output
        sys.exit(f"error: {e}")
    print(f"wrote {out} ({result.width}x{result.height}): {report}")


if __name__ == "__main__":
    main()
