r"""Convert FLUX transformer weights between layouts and dtypes; merge or convert LoRAs.

python convert_weights.py --base black-forest-labs/FLUX.1-dev --out flux1-dev.safetensors
python convert_weights.py --base flux1-dev.safetensors --to diffusers \
    --out flux-diffusers/transformer
python convert_weights.py --base black-forest-labs/FLUX.1-dev \
    --lora Insta360-Research/DiT360-Panorama-Image-Generation --merge --out flux-dit360.safetensors
python convert_weights.py --base flux1-dev.safetensors --lora ./dit360-lora \
    --lora style.safetensors --lora-scale 1 --lora-scale 0.6 --merge \
    --out flux-dit360-style.safetensors   # several LoRAs, each at its scale
python convert_weights.py --lora kohya_lora.safetensors --out my-lora-peft   # peft/diffusers format

--out is a .safetensors file (our layout; an existing file is replaced) or a folder
(--to diffusers, --lora alone) that is new, empty or a previous output of the same kind, which is
replaced; a symbolic link is refused (name what it points to). Outputs appear whole or not at
all; what a killed run left is removed by the next run (only our temporary names, of processes
that are gone). Arguments are checked before any weights are read. Exit status: 2 bad
arguments, 1 failed, 130 interrupted (Ctrl-C).
"""

from dit360.app.cli import handle_signals, one_line, run_main

if __name__ == "__main__":  # before torch loads: Ctrl-C or SIGTERM while importing is one line
    handle_signals()


import argparse
from pathlib import Path

from dit360.app.options import DTYPES, Parser, bounded, fail
from dit360.load.convert import check_out, convert_flux, peft_plan
from dit360.load.lora_formats import paired_loras, write_peft

LORA_SCALE = bounded(float, -1000, 1000)  # beyond it a LoRA outweighs any base weight


def axes(text: str) -> tuple[int, ...]:
    """--axes-dim: three positive even integers, e.g. 16,56,56."""
    dims = tuple(int(v) if v.strip().isdigit() else 0 for v in text.split(","))
    if len(dims) != 3 or any(d <= 0 or d % 2 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r}: give three positive even integers: 16,56,56")
    return dims


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--base", help="repo id, FLUX.1-dev-style folder, or .safetensors file")
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output .safetensors file (bfl) or folder (diffusers, --lora alone)",
    )
    p.add_argument(
        "--lora",
        action="append",
        help="LoRA: repo id, folder or .safetensors (peft/diffusers, kohya, BFL/ComfyUI keys), or "
        "a train.py run or checkpoint folder; alone (--base only gives the sizes, default "
        "flux-dev) it is written in the peft format; with --merge it may be given several times",
    )
    p.add_argument("--merge", action="store_true", help="fold the --lora into --base's weights")
    p.add_argument(
        "--lora-scale",
        type=LORA_SCALE,
        action="append",
        help="weight of the LoRA (|scale| <= 1000): once for all, or once per --lora in order; "
        "default 1",
    )
    p.add_argument(
        "--to", choices=["bfl", "diffusers"], help="layout of a --base conversion; None: bfl"
    )
    p.add_argument("--dtype", choices=DTYPES, help="output dtype; None: the input's")
    p.add_argument(
        "--axes-dim",
        type=axes,
        help="RoPE axes, e.g. 16,56,56; only needed for a bare file of a non-standard model",
    )
    args = p.parse_args(argv)
    if args.lora:  # none, or each with its scale
        try:
            args.lora, args.lora_scale = paired_loras(tuple(args.lora), args.lora_scale or 1.0)
        except ValueError as e:
            p.error(str(e))
    if not args.base and not args.lora or args.merge and not (args.base and args.lora):
        p.error("give --base, --lora, or both with --merge")
    if args.lora and not args.merge and args.to:
        p.error("--to sets the layout of a --base conversion; --lora alone writes the peft format")
    if not args.lora and args.lora_scale:
        p.error("--lora-scale needs --lora")
    if args.lora and len(args.lora) > 1 and not args.merge:
        p.error(
            f"--lora is given {len(args.lora)} times: only --merge folds several (into --base); "
            "convert them to the peft format one at a time"
        )
    if args.axes_dim and not args.base:
        p.error("--axes-dim needs --base (it describes the base model)")
    args.kind = "peft" if args.lora and not args.merge else args.to or "bfl"
    try:
        check_out(args.out, args.kind, {"--base": args.base, "--lora": args.lora})
    except ValueError as e:
        p.error(str(e))
    except OSError as e:  # an --out folder we may not even list
        p.error(f"--out {args.out}: {e}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dtype = DTYPES.get(args.dtype)
    if args.kind == "peft":  # the LoRA read and fitted before any work: unfit, a bad input
        try:
            [lora], [scale] = args.lora, args.lora_scale
            plan = peft_plan(lora, args.base, scale, args.axes_dim)
        except (ValueError, OSError) as e:
            fail(" ".join(str(e).split()))
    try:
        if args.kind == "peft":
            out = write_peft(*plan, args.out, dtype=dtype)
        else:
            merge = dict(lora=args.lora, lora_scale=args.lora_scale) if args.merge else {}
            out = convert_flux(args.base, args.out, dtype, args.kind, args.axes_dim, **merge)
    except (ValueError, OSError) as e:  # unreadable or unfit weights, a failed write
        fail(" ".join(str(e).split()), code=1)
    print(f"wrote {one_line(out)}")


if __name__ == "__main__":
    run_main(main)
