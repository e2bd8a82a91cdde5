"""Valid train.py flags together (fuzz round 5): seeded combinations of a small table of each
flag's valid values, run to the end on the tiny model, checked against what the README promises
for any combination: the outputs each flag asks for and nothing else, memory modes and a resume
that change nothing, a resume with another --batch-size that trains no sample twice, a resume's
previews, and every flag reaching train.py through torchrun; prepare.py's photo flags that a run
would ignore (without --persp, or --fov with --fov-range) refused."""

import random
import re
from pathlib import Path

import numpy as np
import pytest
import test_train
from clitest import expect_error
from PIL import Image
from safetensors.torch import load_file
from test_prepare import make_images
from test_train import args, assert_same_lora, log
from torch.distributed.run import get_args_parser

import edit
import prepare
import sample
import train
from dit360.app.options import Parser

data, one_thread = test_train.data, test_train.one_thread  # its tiny data; one thread a process

# Each flag's valid values (None: not given). --sample-every also gives its prompts and 2 steps.
FLAGS = {
    "--recipe": [None, "pano", "hybrid"],
    "--persp": [None, "persp.jsonl"],
    "--batch-size": [None, "1", "2"],
    "--grad-accum": [None, "1", "2", "3"],
    "--loss-norm": [None, "sample", "token"],
    "--wrap-pad": [None, "0", "1", "2"],
    "--supervise-pad": [None, ""],
    "--aux-epochs": [None, "0:", "1:2"],
    "--lambda-yaw": [None, "0", "0.3"],
    "--warmup": [None, "linear:0.5", "epochs:0.5", "0"],
    "--max-grad-norm": [None, "1"],
    "--dropout": [None, "0", "0.5"],
    "--circular-encoder": [None, ""],
    "--cache-dir": [None, "CACHE"],
    "--offload": [None, "none", "blocks"],
    "--base-dtype": [None, "bf16", "fp8"],
    "--sample-every": [None, "1", "2"],
    "--save-every": [None, "1", "2"],
    "--keep": [None, "0", "1"],
    "--max-steps": ["1", "2", "3"],
    "--guidance": [None, "3.5"],
}


def combination(seed: int, data: Path, tmp: Path) -> tuple[list[str], dict[str, str | None]]:
    """A seeded draw of FLAGS -> train.py arguments and the values drawn."""
    rng, argv = random.Random(seed), []
    picked = {flag: rng.choice(values) for flag, values in FLAGS.items()}
    prompts = tmp / "prompts.txt"
    prompts.write_text("a lake\na city\n")
    files = {"persp.jsonl": str(data / "persp.jsonl"), "CACHE": str(tmp / "cache")}
    for flag, value in picked.items():
        if value is not None:
            argv += [flag, *([files.get(value, value)] if value else [])]
    if picked["--sample-every"]:
        argv += ["--sample-prompts", str(prompts), "--sample-steps", "2"]
    return argv, picked


def progress_free(err: str) -> list[str]:
    """stderr's lines that are no progress bar (tqdm: a '|', redrawn after a carriage return)."""
    return [line for line in re.split(r"[\r\n]", err) if line.strip("\x1b[A ") and "|" not in line]


@pytest.mark.parametrize("seed", range(10))
def test_a_combination_writes_what_its_flags_ask(seed, tiny_flux, data, tmp_path, capsys):
    """Exit 0; a log line a step; the checkpoints of --save-every and --keep, the previews of
    --sample-every (a 64x32 PNG a prompt), the LoRA, nothing else in --out; warnings once each."""
    argv, picked = combination(seed, data, tmp_path)
    out = tmp_path / "run"
    train.main(args(tiny_flux, data, out, *argv))
    total = int(picked["--max-steps"])
    assert [r["step"] for r in log(out)] == list(range(1, total + 1))
    every, keep = int(picked["--save-every"] or 500), int(picked["--keep"] or 2)
    saved = [s for s in range(1, total + 1) if s % every == 0 or s == total]
    kept = sorted(int(p.name[5:]) for p in (out / "checkpoints").iterdir())
    assert kept == (saved[-keep:] if keep else saved)
    shown = [s for s in range(1, total + 1) if picked["--sample-every"]]
    shown = [s for s in shown if s % int(picked["--sample-every"]) == 0]
    previews = sorted((out / "samples").rglob("*.png")) if shown else []
    assert [p.relative_to(out / "samples").as_posix() for p in previews] == [
        f"step-{s:08d}/{i:02d}.png" for s in shown for i in range(2)
    ]
    assert all(Image.open(p).size == (64, 32) for p in previews)
    assert load_file(out / "lora" / "adapter_model.safetensors")
    own = {".dit360-run", ".lock", "args.json", "log.jsonl", "loss.png", "lora", "checkpoints"}
    own |= {"samples"} if shown else set()
    own |= (
        {"cache"} if picked["--offload"] == "blocks" or picked["--base-dtype"] == "fp8" else set()
    )
    assert {p.name for p in out.iterdir()} <= own
    lines = progress_free(capsys.readouterr().err)
    assert all(line.startswith("warning: ") for line in lines), lines
    assert len(lines) == len(set(lines)), lines


# (whole run, run stopped after step 2, its resume): the memory modes README says change nothing.
BLOCKS, RESIDENT = ("--offload", "blocks"), ("--base-dtype", "bf16", "--offload", "none")
MEMORY = [
    (BLOCKS, ("--no-recompute", "--workers", "1"), ("--save-every", "1", "--keep", "1")),
    (("--no-recompute",), RESIDENT, BLOCKS),
]


@pytest.mark.parametrize("seed", range(len(MEMORY)))
def test_memory_modes_and_a_resume_change_nothing(seed, tiny_flux, data, tmp_path, monkeypatch):
    """A combination run whole in one memory mode, and run in another, stopped after its step-2
    checkpoint, resumed in a third: the same losses, LoRA and previews, bit for bit (fp32, one
    cache)."""
    argv, _ = combination(100 + seed, data, tmp_path)
    keep = {"--offload", "--base-dtype", "--save-every", "--keep", "--max-steps", "--cache-dir"}
    argv = [a for i, a in enumerate(argv) if not {a, argv[i - 1] if i else ""} & keep]
    argv += ["--max-steps", "4", "--cache-dir", str(tmp_path / "cache"), "--save-every", "2"]
    first, second, third = MEMORY[seed]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train.main(args(tiny_flux, data, whole, *argv, *first))
    save = train.save_checkpoint

    def save_then_die(*a, **kw):
        if (path := save(*a, **kw)).name == "step-00000002":
            raise KeyboardInterrupt  # as if killed right after the checkpoint
        return path

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(tiny_flux, data, cut, *argv, *second))
    monkeypatch.setattr(train, "save_checkpoint", save)
    train.main(args(tiny_flux, data, cut, *argv, *third, "--resume"))
    assert [r["loss"] for r in log(cut)] == [r["loss"] for r in log(whole)]
    assert_same_lora(cut, whole)
    shown = sorted(p.relative_to(whole) for p in whole.rglob("*.png"))
    assert shown == sorted(p.relative_to(cut) for p in cut.rglob("*.png"))  # previews too
    assert all(
        np.array_equal(*(np.asarray(Image.open(o / p)) for o in (whole, cut))) for p in shown
    )


def test_resume_with_another_batch_size_trains_no_sample_twice(
    tiny_flux, data, tmp_path, monkeypatch
):
    """Stopped after 3 samples of an epoch (batch 1), resumed with --batch-size 2: no sample of
    that epoch is drawn again (it goes on at the next whole batch, as drop_last ends an epoch)."""
    drawn = []  # (epoch, index in the epoch's global order) of every sample trained on
    draw = train.draw

    def spy(ae, mean, std, seed, epoch, first, stride):
        drawn.extend((epoch, first + j * stride) for j in range(mean.shape[0]))
        return draw(ae, mean, std, seed, epoch, first, stride)

    monkeypatch.setattr(train, "draw", spy)
    out, run = tmp_path / "run", ("--grad-accum", "1", "--save-every", "1", "--warmup", "0")
    train.main(args(tiny_flux, data, out, *run, "--batch-size", "1", "--max-steps", "3"))
    train.main(
        args(tiny_flux, data, out, *run, "--batch-size", "2", "--max-steps", "5", "--resume")
    )
    assert len(drawn) == len(set(drawn)), sorted(drawn)
    assert [r["epoch"] for r in log(out)] == [0, 0, 0, 1, 1]


def parser_of(main, monkeypatch) -> Parser:
    """The argparse parser a script's main builds (it stops at parse_args)."""
    made = []

    def grab(self, *a, **kw):
        made.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(Parser, "parse_args", grab)
    with pytest.raises(SystemExit):
        main([])
    return made[0]


@pytest.mark.parametrize("script", [train, sample, edit], ids=lambda m: m.__name__)
def test_every_flag_reaches_the_script_through_torchrun(monkeypatch, script):
    """`torchrun ... train.py --FLAG V` (sample.py, edit.py: the README runs them so too):
    torchrun hands every flag's name (as --help gives it first) to the script; a prefix of its own
    options it refuses (--log: --log-dir, --logs-specs; --start: --start-method)."""
    parser, torchrun = parser_of(script.main, monkeypatch), get_args_parser()
    names = [a.option_strings[0] for a in parser._actions if a.option_strings[0] != "-h"]
    for name in names:
        argv = ["--standalone", "--nproc_per_node", "2", "script.py", name, "x"]
        assert torchrun.parse_args(argv).training_script_args == [name, "x"], name


def test_a_resume_drops_the_previews_of_the_steps_it_redoes(tiny_flux, data, tmp_path, monkeypatch):
    """Killed after its step-3 preview (checkpoint at step 2), resumed with --sample-every 2 and
    another --lr: step 3's preview, of a LoRA no run now has, goes as the log's line does."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lake\n")
    out, run = tmp_path / "run", ("--max-steps", "3", "--save-every", "2", "--grad-accum", "1")
    run += ("--sample-prompts", str(prompts), "--sample-steps", "2")
    render = train.render

    def render_then_die(model, conds, view, folder, main):
        written = render(model, conds, view, folder, main)
        if folder.name == "step-00000003":
            raise KeyboardInterrupt  # killed after the preview, before the step-4 checkpoint
        return written

    monkeypatch.setattr(train, "render", render_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(tiny_flux, data, out, *run, "--sample-every", "1"))
    monkeypatch.setattr(train, "render", render)
    train.main(args(tiny_flux, data, out, *run, "--sample-every", "2", "--lr", "1e-2", "--resume"))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000001", "step-00000002"]
    assert [r["step"] for r in log(out)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--pano", "{tmp}/pano", "--fov", "90"], r"^error: --fov without --persp: add it"),
        (
            ["--pano", "{tmp}/pano", "--height", "64", "--seed", "3", "--yaw-range", "0", "9"],
            r"^error: --height, --seed, --yaw-range without --persp: add it, or drop them$",
        ),
        (
            ["--persp", "{tmp}/photos", "--fov", "90", "--fov-range", "30", "60"],
            r"^error: --fov gives every photo its fov, --fov-range draws it: give one$",
        ),
    ],
    ids=["fov, panoramas only", "views, panoramas only", "fov and fov-range"],
)
def test_prepare_refuses_photo_flags_a_run_would_ignore(extra, match, tmp_path, capsys):
    """prepare.py's view flags place photos only: with --pano alone (they did nothing) or --fov
    beside --fov-range (the range was dropped), one line naming them, exit 2, nothing written."""
    make_images(tmp_path / "pano", {"a.png": (64, 32)})
    make_images(tmp_path / "photos", {"b.png": (32, 24)})
    argv = ["--out", str(tmp_path / "data"), *(a.format(tmp=tmp_path) for a in extra)]
    expect_error(capsys, prepare.main, argv, tmp_path, match)


QK = ("attn.to_q", "attn.to_k")


def test_a_resume_takes_the_targets_in_any_order(tiny_flux, data, tmp_path):
    """--targets names modules: a resume that gives them in another order, or one twice, is the
    same LoRA (not refused as other settings), and equals a run never stopped."""
    run = ("--save-every", "1", "--grad-accum", "1", "--lr", "1e-3")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train.main(args(tiny_flux, data, whole, *run, "--max-steps", "2", "--targets", *QK))
    train.main(args(tiny_flux, data, cut, *run, "--max-steps", "1", "--targets", *QK))
    again = ("--max-steps", "2", "--targets", *QK[::-1], QK[0], "--resume")
    train.main(args(tiny_flux, data, cut, *run, *again))
    assert_same_lora(cut, whole)
