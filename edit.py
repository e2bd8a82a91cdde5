"""Outpaint or inpaint a 360-degree panorama with FLUX.1-dev and the DiT360 LoRA (RF-Inversion +
Personalize-Anything token replacement, as DiT360's editing.py).

The mask is a PNG of any size: white = keep the source, black = generate (outpainting);
--invert regenerates the white region instead (inpainting).

python edit.py --image pano.png --mask mask.png --prompt "This is a panorama image. A village..."
"""

import argparse
import sys

from dit360.editing import STEPS, EditOptions, edit_image, open_image, open_mask
from dit360.generate import add_model_args, options_from_args
from dit360.image import check_output_path, save_panorama


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    e = EditOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image", required=True, help="the source panorama (2:1)")
    p.add_argument("--mask", required=True, help="PNG, white = keep (any size: nearest resize)")
    p.add_argument("--invert", action="store_true", help="inpaint: regenerate the white region")
    p.add_argument("--prompt", required=True, help="the target prompt")
    p.add_argument("--source-prompt", help="the source branch's prompt (default: --prompt)")
    p.add_argument(
        "--height", type=int, default=1024, help="work at height x 2 height (the image is resized)"
    )
    p.add_argument("--resize", action="store_true", help="stretch an image that is not 2:1")
    p.add_argument("--gamma", type=float, default=e.gamma, help="inversion controller (1: exact)")
    p.add_argument("--eta", type=float, default=e.eta, help="source branch controller")
    p.add_argument("--start", type=float, default=e.start, help="eta from this step fraction")
    p.add_argument("--stop", type=float, default=e.stop, help="eta up to this step fraction")
    p.add_argument("--tau", type=float, default=e.tau, help="token replacement while t > tau")
    p.add_argument(
        "--blend-until", type=float, default=e.blend_until, help="latent blending while t >= this"
    )
    p.add_argument(
        "--mask-pad",
        choices=("reference", "wrap"),
        default=e.mask_pad,
        help="pad columns of the mask: DiT360's [first|mask|last], or wrapped like the latents",
    )
    p.add_argument(
        "--paste-back", action="store_true", help="put the kept source pixels back, feathered"
    )
    p.add_argument("--feather", type=int, help="paste-back feather in pixels (default: H/32)")
    add_model_args(p, steps=STEPS, out="edited.png")
    return p.parse_args(argv)


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        out = check_output_path(args.out)
        image = open_image(args.image, args.height, args.resize)
        mask = open_mask(args.mask)
        opts = options_from_args(args)
        edit_opts = EditOptions(
            gamma=args.gamma,
            eta=args.eta,
            start=args.start,
            stop=args.stop,
            tau=args.tau,
            blend_until=args.blend_until,
            mask_pad=args.mask_pad,
            source_prompt=args.source_prompt,
            inpaint=args.invert,
            paste_back=args.paste_back,
            feather=args.feather,
        )
        result, report = edit_image(image, mask, args.prompt, opts, edit_opts, log=_log)
        save_panorama(result, out)
    except (ValueError, OSError) as e:  # OSError: missing or unreadable files, unwritable output
        sys.exit(f"error: {e}")
    print(f"wrote {out} ({result.width}x{result.height}): {report}")


if __name__ == "__main__":
    main()
