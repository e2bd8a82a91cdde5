"""Text to a 360-degree equirectangular panorama with FLUX.1-dev and the DiT360 LoRA.

python sample.py --prompt "This is a panorama. A medieval castle on a hilltop at sunset."
"""

import argparse
import sys
import warnings
from pathlib import Path

from dit360.files import exit_on_sigterm, resolve
from dit360.generate import generate
from dit360.image import check_output_path, save_panorama
from dit360.options import Options, Parser, SampleOptions, add_flags, fail, from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", default="panorama.png", help=".png or .jpg, with 360 metadata")
    add_flags(p, SampleOptions)
    return p.parse_args(argv)


def check_sources(opts: Options) -> None:
    """Fail now, not after minutes of loading, on a missing --base or --lora (a repo id is fetched
    now: --base's model_index.json only, the LoRA's files, which are needed anyway)."""
    sources = [("--base", opts.base, ["model_index.json"], "a FLUX.1-dev folder or repo id")]
    if opts.lora:
        sources += [("--lora", opts.lora, ["*.safetensors", "*.json"], "a LoRA file or folder")]
    for flag, src, files, expected in sources:
        try:
            resolve(src, files, expected)
        except OSError as e:  # missing, gated, or not downloadable now
            raise ValueError(f"{flag}: {e}") from None


def checked(cls: type, args: argparse.Namespace) -> tuple[Options, Path]:
    """The options (`cls`, from the flags) and the output path, every one checked before anything
    slow: a mistake is one line and exit 2. Warnings raised meanwhile are shown once all pass.
    edit.py uses it too."""
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            opts = from_args(cls, args)
            out = check_output_path(args.out)
            check_sources(opts)
        except (ValueError, OSError) as e:
            fail(e)
        except RuntimeError as e:  # torch.device's, on a malformed --device
            fail(f"--device {args.device}: {e}")
    for w in warned:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return opts, out


def main(argv: list[str] | None = None) -> None:
    exit_on_sigterm()
    args = parse_args(argv)
    opts, out = checked(SampleOptions, args)
    try:
        image, report = generate(args.prompt, opts, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, OSError) as e:  # missing or bad weights (--base, --lora)
        fail(e)
    except FloatingPointError as e:  # NaN/inf latents: nothing is written
        fail(e, code=1)
    try:
        save_panorama(image, out)
    except OSError as e:
        fail(f"cannot write {out}: {e}", code=1)
    print(f"wrote {out} ({image.width}x{image.height}): {report}")


if __name__ == "__main__":
    main()
