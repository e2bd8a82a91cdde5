"""Text to a 360-degree equirectangular panorama with FLUX.1-dev and the DiT360 LoRA.

python sample.py --prompt "This is a panorama. A medieval castle on a hilltop at sunset."
python sample.py --prompts prompts.txt --num-images 4 --out-dir panoramas   # many, one load

--prompts: a .txt (a prompt a line; blank lines and # comments skipped) or a .jsonl (rows
{"prompt": ..., and optionally "seed", "out" (relative to --out-dir), "steps", "guidance"}).
Outputs are {index:04d}-seed{seed}.png in --out-dir; those already there are skipped (resume).
Under torchrun, rank r of w makes jobs[r::w] on GPU LOCAL_RANK (no process group is needed).
"""

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from dit360.files import exit_on_sigterm, resolve
from dit360.generate import Job, generate, generate_many, job_options
from dit360.image import check_output_path, save_panorama
from dit360.options import Options, Parser, SampleOptions, add_flags, fail, from_args
from dit360.outputs import add_output_flags, write_extras


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt")
    what.add_argument("--prompts", type=Path, help="a .txt (a prompt a line) or .jsonl file")
    p.add_argument("--out", help=".png or .jpg, with 360 metadata (default: panorama.png)")
    p.add_argument("--num-images", type=int, default=1, help="seeds --seed.. for each prompt")
    p.add_argument("--out-dir", type=Path, help="batch outputs (default: --out's folder)")
    add_flags(p, SampleOptions)
    add_output_flags(p)
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


def checked(cls: type, args: argparse.Namespace, out: Path | None = None) -> tuple[Options, Path]:
    """The options (`cls`, from the flags) and the output path (`out`, or --out), every one checked
    before anything slow: a mistake is one line and exit 2. Warnings raised meanwhile are shown
    once all pass. edit.py uses it too."""
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            opts = from_args(cls, args)
            out = check_output_path(out or args.out)
            check_sources(opts)
        except (ValueError, OSError) as e:
            fail(e)
        except RuntimeError as e:  # torch.device's, on a malformed --device
            fail(f"--device {args.device}: {e}")
    for w in warned:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return opts, out


KEYS = {"prompt": str, "seed": int, "out": str, "steps": int, "guidance": (int, float)}


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a .txt (a prompt a line) or .jsonl prompts file; ValueError naming
    file:line on a bad row."""
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"--prompts {path}: use a .txt or .jsonl file")
    if not path.is_file():
        raise ValueError(f"--prompts {path}: no such file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line, where = line.strip(), f"{path}:{n}"
        if not line or (path.suffix == ".txt" and line.startswith("#")):
            continue
        try:
            row = json.loads(line) if path.suffix == ".jsonl" else {"prompt": line}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{where}: need an object with a "prompt" string')
        for k, v in row.items():
            if k not in KEYS or isinstance(v, bool) or not isinstance(v, KEYS[k]):
                raise ValueError(f"{where}: bad {k!r}: {v!r} (keys: {', '.join(KEYS)})")
        rows.append((n, row))
    if not rows:
        raise ValueError(f"--prompts {path}: no prompts in it")
    return rows


def batch_jobs(args: argparse.Namespace, opts: SampleOptions) -> list[Job]:
    """The jobs of --prompts (or --prompt) x --num-images, each checked; ValueError if bad."""
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    src = args.prompts or "--prompt"
    rows = read_rows(args.prompts) if args.prompts else [(1, {"prompt": args.prompt})]
    suffix = Path(args.out).suffix if args.out else ".png"
    jobs, seen = [], {}
    for index, (n, row) in enumerate(rows):
        where = f"{src}:{n}"
        if "out" in row and args.num_images > 1:
            raise ValueError(
                f'{where}: "out" names one image, but --num-images is {args.num_images}'
            )
        for seed in range(row.get("seed", opts.seed), row.get("seed", opts.seed) + args.num_images):
            out = args.out_dir / row.get("out", f"{index:04d}-seed{seed}{suffix}")
            job = Job(row["prompt"], seed, out, row.get("steps"), row.get("guidance"))
            try:
                job_options(opts, job), check_output_path(out)
            except (ValueError, OSError) as e:
                raise ValueError(f"{where}: {e}") from None
            if out in seen:
                raise ValueError(f"{where}: writes {out}, as line {seen[out]} does")
            jobs.append(job)
            seen[out] = n
    return jobs


def run_batch(args: argparse.Namespace, opts: SampleOptions) -> None:
    """Generate the batch's missing images with the models loaded once; print each, then a total."""
    try:
        jobs = batch_jobs(args, opts)
    except (ValueError, OSError) as e:
        fail(e)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    jobs, todo = jobs[rank::world], []  # under torchrun: this process's share
    for job in jobs:
        if job.out.exists():
            print(f"skip {job.out}: it exists")
        else:
            todo.append(job)
    start, log = time.perf_counter(), lambda m: print(m, file=sys.stderr)
    try:
        for job, image, seconds in generate_many(todo, opts, log):
            try:
                save_panorama(image, job.out)
                extras = write_extras(image, job.out, args)
            except OSError as e:
                fail(f"cannot write {job.out}: {e}", code=1)
            print(f"wrote {job.out} ({image.width}x{image.height}) in {seconds:.1f}s; {extras}")
    except (ValueError, OSError) as e:  # missing or bad weights (--base, --lora)
        fail(e)
    except FloatingPointError as e:  # NaN/inf latents: that image is not written
        fail(e, code=1)
    minutes = (time.perf_counter() - start) / 60
    rate = f", {len(todo) / minutes:.1f} images/minute" if todo else ""
    who = f"rank {rank} of {world}: " if world > 1 else ""
    print(f"{who}{len(todo)} images written, {len(jobs) - len(todo)} skipped (they exist){rate}")


def main(argv: list[str] | None = None) -> None:
    exit_on_sigterm()
    args = parse_args(argv)
    if args.prompts or args.num_images != 1 or args.out_dir:
        if "LOCAL_RANK" in os.environ and args.device is None and torch.cuda.is_available():
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun: a GPU per process
        args.out_dir = args.out_dir or (Path(args.out).parent if args.out else Path("panoramas"))
        return run_batch(args, checked(SampleOptions, args, args.out_dir / "x.png")[0])
    args.out = args.out or "panorama.png"
    opts, out = checked(SampleOptions, args)
    try:
        image, report = generate(args.prompt, opts, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, OSError) as e:  # missing or bad weights (--base, --lora)
        fail(e)
    except FloatingPointError as e:  # NaN/inf latents: nothing is written
        fail(e, code=1)
    try:
        save_panorama(image, out)
        extras = write_extras(image, out, args)
    except OSError as e:
        fail(f"cannot write {out}: {e}", code=1)
    print(f"wrote {out} ({image.width}x{image.height}): {report}; {extras}")


if __name__ == "__main__":
    main()
