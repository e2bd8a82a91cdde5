"""Text to a 360-degree equirectangular panorama with FLUX.1-dev and the DiT360 LoRA.

python sample.py --prompt "This is a panorama. A medieval castle on a hilltop at sunset."
"""

import argparse
import sys

from dit360.generate import generate
from dit360.image import check_output_path, save_panorama
from dit360.options import HelpFormatter, SampleOptions, add_flags, from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", default="panorama.png", help=".png or .jpg, with 360 metadata")
    add_flags(p, SampleOptions)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        out = check_output_path(args.out)
        opts = from_args(SampleOptions, args)
        image, report = generate(args.prompt, opts, log=lambda m: print(m, file=sys.stderr))
        save_panorama(image, out)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out} ({image.width}x{image.height}): {report}")


if __name__ == "__main__":
    main()
