"""Text to a 360-degree equirectangular panorama with FLUX.1-dev and the DiT360 LoRA.

python sample.py --prompt "This is a panorama. A medieval castle on a hilltop at sunset."
python sample.py --prompts prompts.txt --num-images 4 --out-dir panoramas   # many, one load

--prompts: a .txt (a prompt a line; blank lines and # comments skipped) or a .jsonl (rows
{"prompt": ..., and optionally "seed", "out" (relative to --out-dir), "steps", "guidance",
"negative_prompt"}).
Outputs are {index:04d}-seed{seed}.png in --out-dir (with --out NAME.png: NAME-seed{seed}.png for
--prompt, NAME-{index:04d}-seed{seed}.png for --prompts); those already there with the same
settings are skipped (resume); one made with other settings stops the batch (--overwrite: made
again). Each image records its settings: `python -m dit360.app.info IMAGE` prints them and the
command that makes it again.
Under torchrun, rank r of w makes jobs[r::w] on GPU LOCAL_RANK (no process group is needed).
"""

from dit360.app.cli import JOBS, LATE, handle_signals, run_main, starting

if __name__ == "__main__":  # before torch loads: Ctrl-C or SIGTERM while importing is one line
    handle_signals()
    starting("sample.py")


import argparse
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from dit360.app.batch import (
    batch_out,
    checked,
    checked_batch,
    checked_jobs,
    local_device,
    out_dir,
    read_rows,
    run_batch,
)
from dit360.app.generate import Job, generate, generate_many, job_options
from dit360.app.info import record, stamp
from dit360.app.options import (
    Options,
    Parser,
    SampleOptions,
    add_flags,
    bounded,
    fail,
)
from dit360.app.outputs import add_output_flags, extras_missing, write_extras
from dit360.load.image import FORMATS, save_panorama


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt")
    what.add_argument("--prompts", type=Path, help="a .txt (a prompt a line) or .jsonl file")
    p.add_argument(
        "--out",
        help=".png or .jpg, with 360 metadata (default: panorama.png); in a batch it names the "
        "outputs: NAME-seed0.png ...",
    )
    p.add_argument(
        "--num-images",
        type=bounded(int, 1, JOBS),
        default=1,
        help=f"seeds --seed.. for each prompt (a batch makes at most {JOBS:,} images)",
    )
    p.add_argument(
        "--out-dir", type=Path, help="batch outputs (default: --out's folder, else panoramas)"
    )
    add_flags(p, SampleOptions)
    add_output_flags(p)
    return p.parse_args(argv)


KEYS = {"prompt": str, "seed": int, "out": str, "steps": int, "guidance": (int, float),
        "negative_prompt": str}  # fmt: skip


def batch_jobs(args: argparse.Namespace, opts: SampleOptions) -> list[Job]:
    """The jobs of --prompts (or --prompt) x --num-images, each checked; ValueError if bad."""
    src = args.prompts or "--prompt"
    if args.prompts:
        rows = read_rows(args.prompts, "--prompts", KEYS, ("prompt",), text=True)
    else:
        rows = [(1, {"prompt": args.prompt})]
    if len(rows) * args.num_images > JOBS:  # before a job is made: 10^8 took hours in silence
        raise ValueError(
            f"{len(rows):,} prompts x --num-images {args.num_images:,} is more than {JOBS:,} "
            "images, the most a batch makes: split it"
        )
    suffix = Path(args.out).suffix if args.out else ".png"
    name = Path(args.out).stem + "-" if args.out else ""  # --out names the outputs

    def default(index: int, seed: int) -> str:
        """{index:04d}-seed{seed}.png; after --out NAME: NAME-seed{seed} for one prompt."""
        numbered = f"{index:04d}-" if args.prompts or not name else ""
        return f"{name}{numbered}seed{seed}{suffix}"

    def lines() -> Iterator[tuple[int, Job]]:
        for index, (n, row) in enumerate(rows):
            if "out" in row and args.num_images > 1:
                raise ValueError(
                    f'{src}:{n}: "out" names one image, but --num-images is {args.num_images}'
                )
            first = row.get("seed", opts.seed)
            if first + args.num_images > 2**64:
                raise ValueError(
                    f"{src}:{n}: the seeds {first}..{first + args.num_images - 1} (the seed, then "
                    f"one more for each of --num-images) must fit in 64 bits: below 2**64"
                )
            for seed in range(first, first + args.num_images):
                out = batch_out(args.out_dir, row.get("out", default(index, seed)), f"{src}:{n}")
                sets = {k: row.get(k) for k in Job.SETS}
                yield n, Job(row["prompt"], seed, out, **sets)

    jobs = checked_jobs(src, lines(), lambda job: job_options(opts, job), args)
    if opts.true_cfg == 1 and any(job.negative_prompt is not None for job in jobs):
        warnings.warn(f'{src}: "negative_prompt" is ignored at --true-cfg 1: give --true-cfg > 1',
                      stacklevel=2)  # fmt: skip
    return jobs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.prompts or args.num_images != 1 or args.out_dir:
        args.device = local_device(args.device)  # torchrun: a GPU per process
        if args.out and Path(args.out).suffix.lower() not in FORMATS:  # it names the outputs
            fail(f"--out {args.out}: use a .png or .jpg name (a folder for them is --out-dir)")
        args.out_dir = out_dir(args, Path(args.out).parent if args.out else Path("panoramas"))

        def record_for(opts: Options) -> Callable:
            return lambda job: record("sample.py", job_options(opts, job), prompt=job.prompt)

        opts, jobs = checked_batch(SampleOptions, args, batch_jobs, record_for)
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
        return run_batch(
            jobs,
            lambda todo: generate_many(todo, opts, log),
            record_for(opts),
            lambda job, image: write_extras(image, job.out, args, job.prompt),
            lambda job: extras_missing(job.out, args),
            args.overwrite,
        )
    args.out = args.out or "panorama.png"
    opts, out = checked(SampleOptions, args)
    try:
        made = record("sample.py", opts, prompt=args.prompt)  # its LoRAs hashed before loading
        image, report = generate(args.prompt, opts, log=lambda m: print(m, file=sys.stderr))
    except LATE as e:  # every input was checked: a weight file that fails to read, NaN latents
        fail(e, code=1)
    # a failed write is one line naming its file, exit 1 (cli.on_uncaught)
    save_panorama(image, out, stamp(made))
    extras = write_extras(image, out, args, args.prompt)
    print(f"wrote {out} ({image.width}x{image.height}): {report}; {extras}")


if __name__ == "__main__":
    run_main(main)
