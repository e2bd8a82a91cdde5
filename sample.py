"""Text to a 360-degree equirectangular panorama with FLUX.1-dev and the DiT360 LoRA.

python sample.py --prompt "This is a panorama. A medieval castle on a hilltop at sunset."
"""

import argparse
import sys

import torch

from dit360.generate import DIT360_LORA, FLUX_DEV, Options, generate
from dit360.image import check_output_path, save_panorama

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Options()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompt", required=True)
    p.add_argument("--base", default=FLUX_DEV, help="FLUX.1-dev repo id or a folder in its layout")
    p.add_argument(
        "--lora", default=DIT360_LORA, help="LoRA repo id, folder or .safetensors file; 'none'"
    )
    p.add_argument("--lora-scale", type=float, default=d.lora_scale)
    p.add_argument(
        "--no-merge-lora",
        action="store_true",
        help="keep the LoRA as adapters (default: fold it into the weights, faster per step)",
    )
    p.add_argument("--height", type=int, default=d.height)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--wrap-pad", type=int, default=d.wrap_pad, help="packed columns per side (0: plain FLUX)"
    )
    p.add_argument("--resync", action="store_true", help="re-copy pad columns before every step")
    p.add_argument(
        "--seamless-vae", action="store_true", help="circular VAE decoder: no seam at the wrap"
    )
    p.add_argument("--vae-tile", type=int, help="decode in latent tiles of this size (less memory)")
    p.add_argument(
        "--reference-noise",
        action="store_true",
        help="draw the noise on --device in --dtype, as DiT360's inference.py (default: CPU fp32)",
    )
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", choices=DTYPES, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--out", default="panorama.png", help=".png or .jpg, with 360 metadata")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        out = check_output_path(args.out)
        opts = Options(
            base=args.base,
            lora=None if str(args.lora).lower() == "none" else args.lora,
            lora_scale=args.lora_scale,
            merge_lora=not args.no_merge_lora,
            height=args.height,
            width=args.width,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            wrap_pad=args.wrap_pad,
            resync=args.resync,
            seamless_vae=args.seamless_vae,
            vae_tile=args.vae_tile,
            reference_noise=args.reference_noise,
            device=args.device,
            dtype=DTYPES[args.dtype] if args.dtype else Options(device=args.device).dtype,
        )
        image, report = generate(args.prompt, opts, log=lambda m: print(m, file=sys.stderr))
        save_panorama(image, out)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out} ({image.width}x{image.height}): {report}")


if __name__ == "__main__":
    main()
