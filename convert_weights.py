r"""Convert FLUX transformer weights between layouts and dtypes; merge or convert LoRAs.

python convert_weights.py --base black-forest-labs/FLUX.1-dev --out flux1-dev.safetensors
python convert_weights.py --base flux1-dev.safetensors --to diffusers \
    --out flux-diffusers/transformer
python convert_weights.py --base black-forest-labs/FLUX.1-dev \
    --lora Insta360-Research/DiT360-Panorama-Image-Generation --merge --out flux-dit360.safetensors
python convert_weights.py --lora kohya_lora.safetensors --out my-lora-peft   # peft/diffusers format
"""

import argparse

from dit360.convert import convert_flux, convert_lora
from dit360.options import DTYPES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--base", help="repo id, FLUX.1-dev-style folder, or .safetensors file")
    parser.add_argument(
        "--out",
        required=True,
        help="output .safetensors file (bfl, --merge) or folder (diffusers, --lora alone)",
    )
    parser.add_argument(
        "--lora",
        help="LoRA: repo id, folder or .safetensors (peft/diffusers, kohya, BFL/ComfyUI keys); "
        "alone (--base only gives the sizes, default flux-dev) it is written in the peft format",
    )
    parser.add_argument(
        "--merge", action="store_true", help="fold --lora into --base: one file in our layout"
    )
    parser.add_argument("--lora-scale", type=float, default=1.0, help="weight of the LoRA")
    parser.add_argument("--to", choices=["bfl", "diffusers"], default="bfl", help="output layout")
    parser.add_argument("--dtype", choices=DTYPES, help="output dtype (default: keep the input's)")
    parser.add_argument(
        "--axes-dim",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        help="RoPE axes, e.g. 16,56,56; only needed for a bare file of a non-standard model",
    )
    args = parser.parse_args(argv)
    if not args.base and not args.lora or args.merge and not (args.base and args.lora):
        parser.error("give --base, --lora, or both with --merge")
    if args.merge and args.to != "bfl":
        parser.error("--merge writes our (bfl) layout only")
    dtype = DTYPES.get(args.dtype)
    try:
        if args.merge:
            out = convert_flux(
                args.base, args.out, dtype, "bfl", args.axes_dim, args.lora, args.lora_scale
            )
        elif args.lora:
            out = convert_lora(
                args.lora, args.out, args.base, args.lora_scale, args.axes_dim, dtype
            )
        else:
            out = convert_flux(args.base, args.out, dtype, args.to, args.axes_dim)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
