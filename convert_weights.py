"""Convert FLUX transformer weights between layouts and dtypes.

python convert_weights.py --base black-forest-labs/FLUX.1-dev --out flux1-dev.safetensors
python convert_weights.py --base flux1-dev.safetensors --to diffusers --out flux-diffusers/transformer
"""

import argparse

import torch

from dit360.weights import convert_flux

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--base", required=True, help="repo id, FLUX.1-dev-style folder, or .safetensors file"
    )
    parser.add_argument(
        "--out", required=True, help="output .safetensors file (bfl) or folder (diffusers)"
    )
    parser.add_argument("--to", choices=["bfl", "diffusers"], default="bfl", help="output layout")
    parser.add_argument("--dtype", choices=DTYPES, help="output dtype (default: keep the input's)")
    parser.add_argument(
        "--axes-dim",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        help="RoPE axes, e.g. 16,56,56; only needed for a bare file of a non-standard model",
    )
    args = parser.parse_args(argv)
    try:
        out = convert_flux(args.base, args.out, DTYPES.get(args.dtype), args.to, args.axes_dim)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
