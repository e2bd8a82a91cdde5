"""Fuzz the scripts' command lines in process: any value of a flag (numbers, text with control
characters or an argument's undecodable bytes, paths that are FIFOs, devices, /proc files,
symbolic link loops, names too long, sparse files of gigabytes) is one line `error: ...` naming
the flag or file, exit 2, nothing written, within a time and a memory bound, before a model
loads."""

import contextlib
import json
import os
import re
import signal
import tracemalloc
from pathlib import Path

import pytest
from clitest import snapshot
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz import FUZZ

import convert_weights
import edit
import prepare
import sample
import train
from dit360.app import info, outputs
from dit360.load import files, image

SECONDS, PYTHON_MB = 10, 64
LONG = "x" * 300  # a file name over the 255 bytes a name may have


@pytest.fixture
def odd(tmp_path: Path) -> Path:
    """A folder of hostile paths: a FIFO, a symbolic link loop, links (named .txt) to /dev/zero
    and /proc/self/mem, sparse 200 MB prompt files (a text file has at most 100 MB), `file.txt`."""
    os.mkfifo(tmp_path / "fifo.txt")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    for name, target in {"zero.txt": "/dev/zero", "mem.txt": "/proc/self/mem"}.items():
        os.symlink(target, tmp_path / name)
    for name in ("big.txt", "big.jsonl"):
        os.truncate(os.open(tmp_path / name, os.O_CREAT | os.O_WRONLY), 200 << 20)
    (tmp_path / "file.txt").write_text("a regular file")
    (tmp_path / "pano.jsonl").write_text("{}\n")
    return tmp_path


def bounded(capsys, main, argv: list[str], folder: Path, match: str | None, codes=(2,)) -> None:
    """One stderr line `error: ...` matching `match` (None: a success), an exit status in `codes`,
    `folder` unchanged, within SECONDS (a hang is stopped) and PYTHON_MB of Python memory (no
    unbounded read)."""

    def hang(*_: object) -> None:
        raise TimeoutError(f"still running after {SECONDS} s: waiting on a FIFO?")

    before, _ = snapshot(folder), capsys.readouterr()
    signal.signal(signal.SIGALRM, hang)
    signal.alarm(SECONDS)
    tracemalloc.start()
    try:
        with contextlib.nullcontext() if match is None else pytest.raises(SystemExit) as exit_info:
            main(argv)
    finally:
        signal.alarm(0)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < PYTHON_MB << 20, f"{peak >> 20} MB of Python memory: an unbounded read?"
    if match is not None:
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code in codes, (exit_info.value.code, err)
        assert len(err.splitlines()) == 1 and re.match(f"error: .*{match}", err), (match, err)
        assert snapshot(folder) == before, "the command left files behind or changed them"


def sample_argv(tiny_flux: Path, *extra: str, prompt=("--prompt", "a lake")) -> list[str]:
    """sample.py's tiny run with `extra` flags (--lora none unless they give --lora)."""
    lora = () if "--lora" in extra else ("--lora", "none")
    return [
        *prompt, *("--base", str(tiny_flux), *lora, "--height", "32", "--width", "64"),
        *("--steps", "1", "--device", "cpu", "--dtype", "fp32", *extra),
    ]  # fmt: skip


SAMPLE = [  # extra flags ({tmp}: the `odd` folder), what the one line says
    (["--prompt", "a\udcff"], r"--prompt is not UTF-8 text"),  # was a tokenizer's traceback
    (["--negative-prompt", "\udcff", "--true-cfg", "2"], r"--negative-prompt .* UTF-8 text"),
    (["--out", "{tmp}/a\nb.gif"], r"a\\nb\.gif: use a \.png"),  # was two lines
    (["--base", "x\ny/z"], r"--base: .*x\\ny/z"),  # huggingface_hub's message, two lines
    (["--lora", "x\ny/z"], r"--lora: .*x\\ny/z"),
    (["--out", "{tmp}/\x1b[2J\u2028.gif"], r"\\x1b\[2J\\u2028\.gif: use a \.png"),
    (["--out-dir", "{tmp}/loop", "--num-images", "2"], r"--out-dir \S+loop: "),  # a traceback
    (["--out-dir", f"{{tmp}}/{LONG}", "--num-images", "2"], r"--out-dir \S+x: .*too long"),
    (["--device", "cpu\n"], r"--device cpu\\n: "),
    (["--lora", "{tmp}", "--lora", "{tmp}/./"], r"--lora \S+ is given twice"),  # was used twice
    (["--device", "\udcff"], r"--device \\udcff: "),
]
PROMPTS = [  # FILE, what sample.py --prompts FILE says, and train.py --sample-prompts FILE
    ("big.txt", r"big\.txt: over 100,000,000 bytes", None),  # was read whole
    ("big.jsonl", r"big\.jsonl: over 100,000,000 bytes", None),
    ("mem.txt", r"mem\.txt: cannot read it \(Input/output error\)", None),  # named no file
    ("zero.txt", r"zero\.txt: no such file", None),
    ("fifo.txt", r"fifo\.txt: no such file", None),
    ("loop", r"loop: use a \.txt or \.jsonl file", None),
    ("file.txt/x.txt", r"x\.txt: no such file", None),
    (f"{LONG}.txt", r"File name too long", None),  # was a traceback
]


@pytest.mark.parametrize("extra,match", SAMPLE, ids=[ascii(" ".join(c[0]))[:40] for c in SAMPLE])
def test_sample_hostile_values(tiny_flux, odd, capsys, extra, match):
    """sample.py: hostile text and paths are one line naming the flag, exit 2, nothing written."""
    extra = [a.format(tmp=odd) for a in extra]
    out = [] if "--out" in extra else ["--out", str(odd / "pano.png")]
    bounded(capsys, sample.main, sample_argv(tiny_flux, *out, *extra), odd, match)


@pytest.mark.parametrize("name,match,train_match", PROMPTS, ids=[c[0][:20] for c in PROMPTS])
def test_prompt_files_are_bounded(tiny_flux, odd, capsys, name, match, train_match):
    """--prompts and train.py --sample-prompts: a FIFO, /dev/zero, /proc/self/mem or a sparse 200
    MB file is one line naming it, at once (not read whole: sparse, it could be 8 GB, or a wait)."""
    argv = sample_argv(
        tiny_flux, "--out-dir", str(odd / "o"), prompt=("--prompts", f"{odd}/{name}")
    )
    bounded(capsys, sample.main, argv, odd, match)
    argv = ["--pano", str(odd / "pano.jsonl"), "--out", str(odd / "run"), "--sample-every", "1"]
    argv += ["--sample-prompts", f"{odd}/{name}", "--base", str(tiny_flux), "--device", "cpu"]
    bounded(capsys, train.main, argv, odd, train_match or match)


def test_train_rows_are_bounded(tiny_flux, odd, capsys):
    """train.py --pano: a sparse 200 MB jsonl is one line naming it, not read."""
    argv = ["--pano", str(odd / "big.jsonl"), "--out", str(odd / "run"), "--device", "cpu"]
    bounded(capsys, train.main, [*argv, "--base", str(tiny_flux)], odd, r"big\.jsonl: over 100")


def test_edit_hostile_paths(tiny_flux, odd, capsys):
    """edit.py: an --image through a symbolic link loop and a hostile --source-prompt are one line
    (the loop was a RuntimeError traceback from checking --out against the inputs)."""
    src, mask = _inputs(odd)
    argv = [
        *("--image", str(odd / "loop"), "--mask", str(mask), "--prompt", "a", "--height", "32"),
        *("--base", str(tiny_flux), "--lora", "none", "--device", "cpu", "--out", f"{odd}/e.png"),
    ]  # fmt: skip
    bounded(capsys, edit.main, argv, odd, r"loop")
    argv[1] = str(src)
    bounded(
        capsys, edit.main, [*argv, "--source-prompt", "\udcff"], odd, r"--source-prompt .*UTF-8"
    )


def _inputs(folder: Path) -> tuple[Path, Path]:
    from test_editing import write_inputs

    return write_inputs(folder / "in")


TEXT = st.text(st.characters(exclude_characters="\x00/"), max_size=40)  # argv holds no NUL
PATHS = ("--out", "--out-dir", "--resume", "--cache-dir", "--sample-prompts", "--photo")
SCRIPTS = {  # a script's main, a command line failing late (at --base, after every flag's check)
    "sample": (sample.main, ["--prompt", "a", "--out", "{tmp}/p.png"],
               ["--out", "--device", "--lora", "--steps", "--guidance", "--seed", "--lora-scale",
                "--num-images", "--cubemap-size", "--offload", "--out-dir", "--negative-prompt",
                "--height", "--width", "--wrap-pad", "--vae-tile", "--attention"]),
    "edit": (edit.main, ["--prompt", "a", "--photo", "{tmp}/in/src.png", "--height", "32"],
             ["--fov", "--yaw", "--pitch", "--roll", "--feather", "--gamma", "--tau", "--out",
              "--mask-pad", "--source-prompt", "--eta-start", "--photo"]),
    "train": (train.main, ["--pano", "{tmp}/pano.jsonl", "--height", "32", "--out", "{tmp}/run"],
              ["--height", "--lr", "--warmup", "--aux-epochs", "--dropout", "--device", "--out",
               "--sample-prompts", "--lora-rank", "--alpha", "--cache-dir", "--workers"]),
    "convert": (convert_weights.main, ["--out", "{tmp}/x.safetensors"],
                ["--lora-scale", "--axes-dim", "--dtype", "--to", "--out"]),
}  # fmt: skip


@FUZZ
@given(script=st.sampled_from(sorted(SCRIPTS)), data=st.data())
def test_any_value_is_one_line(tmp_path, capsys, script, data):
    """sample.py, edit.py, train.py, convert_weights.py: any text for a flag, on a command line
    that then fails at its missing --base, is one line `error: ...`, exit 2, nothing written."""
    main, argv, flags = SCRIPTS[script]
    folder = tmp_path / "f"
    if not folder.exists():
        folder.mkdir()
        src, mask = _inputs(folder)
        row = {"image": str(src), "mask": str(mask), "caption": "a lake"}
        (folder / "pano.jsonl").write_text(json.dumps(row) + "\n")
    flag, value = data.draw(st.sampled_from(flags)), data.draw(TEXT)
    value = f"{folder}/{value}" if flag in PATHS else value
    argv = [f"{flag}={value}", *[a.format(tmp=folder) for a in argv], "--base", f"{folder}/none"]
    argv += ["--device", "cpu"] if script != "convert" else []
    bounded(capsys, main, argv, folder, "", (1, 2) if script == "convert" else (2,))  # 1: late


@pytest.mark.parametrize(
    "main,argv",
    [(info.main, ["{tmp}/fifo.txt"]), (outputs.view_main, ["{tmp}/zero.txt"]),
     (outputs.view_main, ["{tmp}/loop"]), (outputs.evaluate_main, ["{tmp}/fifo.txt"]),
     (outputs.evaluate_main, [f"{{tmp}}/{LONG}"]), (info.main, [f"{{tmp}}/{LONG}"]),
     (outputs.view_main, [f"{{tmp}}/{LONG}.png"]), (info.main, ["{tmp}/big.txt"])],
)  # fmt: skip
def test_readers_refuse_odd_files(odd, capsys, main, argv):
    """python -m dit360.app.info / view / evaluate: a FIFO, a device, a loop, a name too long or
    a sparse 200 MB file is one line, at once (a name too long was a traceback)."""
    bounded(capsys, main, [a.format(tmp=odd) for a in argv], odd, r"")


def test_prepare_out_through_a_loop(odd, capsys):
    """prepare.py --out through a symbolic link loop: one line (was a RuntimeError traceback)."""
    src, _ = _inputs(odd)
    argv = ["--pano", str(src.parent), "--out", str(odd / "loop" / "data")]
    bounded(capsys, prepare.main, argv, odd, r"loop")


def test_evaluate_skips_what_is_no_file(odd, capsys):
    """python -m dit360.app.evaluate DIR: a FIFO or a folder named *.png in DIR is not read (the
    FIFO waited for ever, the folder was `error: Is a directory`); the panorama is scored."""
    src, _ = _inputs(odd)
    os.mkfifo(src.parent / "fifo.png")
    (src.parent / "folder.png").mkdir()
    (src.parent / "mask.png").unlink()  # 2:1 too
    bounded(capsys, outputs.evaluate_main, [str(src.parent)], odd, None)
    assert "mean of 1 panoramas" in capsys.readouterr().out


@pytest.mark.parametrize("read", [files.open_tensors, image.open_image])
def test_read_errors_name_the_file(read):
    """A file whose read fails (/proc/self/mem: EIO at offset 0) is an OSError naming it (the
    weights reader and the image reader said `[Errno 5] Input/output error`, naming nothing)."""
    with pytest.raises(OSError) as error:
        read("/proc/self/mem")
    assert type(error.value) is OSError and "/proc/self/mem" in str(error.value), error.value


def test_training_warnings_are_one_line(capsys):
    """warn0 (a lock's, a checkpoint's warning) escapes what a path may hold: a line break, ESC."""
    from dit360.train.distributed import warn0

    warn0("skipping checkpoint out/a\nb\x1b[2Kc: unreadable")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err, err
    assert err == "warning: skipping checkpoint out/a\\nb\\x1b[2Kc: unreadable\n"
