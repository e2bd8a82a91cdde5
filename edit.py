"""Outpaint or inpaint a 360-degree panorama with FLUX.1-dev and the DiT360 LoRA (RF-Inversion +
Personalize-Anything token replacement, as DiT360's editing.py).

The mask is a PNG of any size: white = keep the source, black = generate (outpainting);
--invert regenerates the white region instead (inpainting).

python edit.py --image pano.png --mask mask.png --prompt "This is a panorama image. A village..."
"""

import argparse
import sys

import torch

from dit360.editing import STEPS, EditOptions, edit_image, open_image, open_mask
from dit360.generate import DIT360_LORA, FLUX_DEV, Options
from dit360.image import check_output_path, save_panorama

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d, e = Options(), EditOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--image", required=True, help="the source panorama (2:1)")
    p.add_argument("--mask", required=True, help="PNG, white = keep (any size: nearest resize)")
    p.add_argument("--invert", action="store_true", help="inpaint: regenerate the white region")
    p.add_argument("--prompt", required=True, help="the target prompt")
    p.add_argument("--source-prompt", help="the source branch's prompt (default: --prompt)")
    p.add_argument("--base", default=FLUX_DEV, help="FLUX.1-dev repo id or a folder in its layout")
    p.add_argument(
        "--lora", default=DIT360_LORA, help="LoRA repo id, folder or .safetensors file; 'none'"
    )
    p.add_argument("--lora-scale", type=float, default=d.lora_scale)
    p.add_argument(
        "--height", type=int, default=1024, help="work at height x 2 height (the image is resized)"
    )
    p.add_argument("--resize", action="store_true", help="stretch an image that is not 2:1")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--seed", type=int, default=d.seed)
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
    p.add_argument(
        "--seamless-vae", action="store_true", help="circular VAE encoder and decoder (no seam)"
    )
    p.add_argument("--vae-tile", type=int, help="decode in latent tiles of this size (less memory)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--out", default="edited.png", help=".png or .jpg, with 360 metadata")
    return p.parse_args(argv)


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        out = check_output_path(args.out)
        image = open_image(args.image, args.height, args.resize)
        mask = open_mask(args.mask)
        opts = Options(
            base=args.base,
            lora=None if str(args.lora).lower() == "none" else args.lora,
            lora_scale=args.lora_scale,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            seamless_vae=args.seamless_vae,
            vae_tile=args.vae_tile,
            device=args.device,
            dtype=DTYPES[args.dtype] if args.dtype else Options(device=args.device).dtype,
        )
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
