"""Text to a 360-degree equirectangular panorama with FLUX.1-dev and the DiT360 LoRA.

python sample.py --prompt "This is a panorama. A medieval castle on a hilltop at sunset."
"""

import argparse
import sys

from dit360.generate import Options, add_model_args, generate, options_from_args
from dit360.image import check_output_path, save_panorama


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Options()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompt", required=True)
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument(
        "--wrap-pad", type=int, default=d.wrap_pad, help="packed columns per side (0: plain FLUX)"
    )
    p.add_argument("--resync", action="store_true", help="re-copy pad columns before every step")
    p.add_argument(
        "--reference-noise",
        action="store_true",
        help="draw the noise on --device in --dtype, as DiT360's inference.py (default: CPU fp32)",
    )
    add_model_args(p, steps=d.steps, out="panorama.png")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        out = check_output_path(args.out)
        opts = options_from_args(
            args,
            height=args.height,
            width=args.width,
            wrap_pad=args.wrap_pad,
            resync=args.resync,
            reference_noise=args.reference_noise,
        )
        image, report = generate(args.prompt, opts, log=lambda m: print(m, file=sys.stderr))
        save_panorama(image, out)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out} ({image.width}x{image.height}): {report}")


if __name__ == "__main__":
    main()
