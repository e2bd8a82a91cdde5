"""Every command's bad input, table-driven: one line `error: ...`, exit 2, no traceback, nothing
written, all before any model loads; and the run-time refusal of non-finite latents (exit 1)."""

import contextlib
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clitest import expect_error, snapshot
from PIL import Image
from test_batch import flags as batch_flags
from test_editing import cli as edit_args
from test_editing import write_inputs
from test_prepare import make_images
from test_sample_cli import args as sample_args

import edit
import prepare
import sample

SAMPLE_CASES = [  # extra flags (the last of a repeated flag wins), the error line
    (["--steps", "0"], r"--steps must be an integer from 1 to 1000, got 0"),
    (["--attention", "cudnn"], r"--attention cudnn needs a CUDA GPU; use auto or flash"),
    (["--attention", "fa3"], r"--attention fa3 needs FlashAttention-3 \(module flash_attn_int"),
    (["--offload", "disk"], r"argument --offload: invalid choice: 'disk'"),
    (["--steps", "-3"], r"--steps must be an integer from 1 to 1000, got -3"),
    (["--steps", "2.5"], r"--steps: invalid int value"),
    (["--height", "0"], r"--height and --width must be positive multiples of 16, got 0x64"),
    (["--width", "100"], r"--height and --width must be positive multiples of 16, got 32x100"),
    (["--wrap-pad", "10"], r"--wrap-pad \(wrap_pad\) must be 0 to 4"),
    (["--wrap-pad", "-1"], r"--wrap-pad \(wrap_pad\) must be 0 to 4"),
    (["--wrap-pad", "3"], r"--wrap-pad 3 must be <= half the 4 columns"),
    (["--vae-tile", "0"], r"--vae-tile \(vae_tile\) must be at least 1"),
    (
        ["--guidance", "nan"],
        r"--guidance must be a finite number from -100 to 100, got nan",
    ),
    (
        ["--guidance", "inf"],
        r"--guidance must be a finite number from -100 to 100, got inf",
    ),
    (["--lora-scale", "nan"], r"--lora-scale \(lora_scale\) must be a finite number"),
    (["--seed", "-1"], r"--seed must be an integer from 0 to 2\*\*64 - 1"),
    (["--true-cfg", "0.5"], r"--true-cfg \(true_cfg\) must be a finite number >= 1 \(1: off\)"),
    (["--true-cfg", "inf"], r"--true-cfg \(true_cfg\) must be a finite number >= 1"),
    (["--true-cfg", "nan"], r"--true-cfg \(true_cfg\) must be a finite number >= 1"),
    (["--device", "cuda"], r"--device cuda: no such CUDA GPU here; use --device cpu"),
    (["--device", "cuda:3"], r"--device cuda:3: no such CUDA GPU"),
    (["--device", "nonsense"], r"--device nonsense: .*device string: nonsense"),
    (["--device", "meta"], r"--device meta: cannot run there; use cpu, cuda or cuda:N"),
    (["--device", "mps"], r"--device mps: cannot run there; use cpu, cuda or cuda:N"),
    (["--lora-scale", "0.5"], r"--lora-scale 0.5 needs --lora, which is none: give a LoRA or"),
    (["--num-images", "2", "--out-dir", "{tmp}/blocker"], r"blocker is a file: choose a folder"),
    (["--num-images", "2", "--out", "{tmp}/results"], r"results: use a \.png or \.jpg name \(a fo"),
    (["--dtype", "fp64"], r"--dtype: invalid choice"),
    (["--prompt"], r"--prompt: expected one argument"),
    (["--frobnicate"], r"unrecognized arguments: --frobnicate"),
    (["--out", "{tmp}/x.gif"], r"use a \.png, \.jpg or \.jpeg"),
    (["--out", "{tmp}/blocker/x.png"], r"cannot write .*x\.png: check the folder exists and"),
    (["--out", "{tmp}/folder.png"], r"cannot write .*folder\.png: it is a folder; choose another"),
    (["--base", "{tmp}/no-base"], r"--base: .*no-base: no such file or folder"),
    (["--lora", "{tmp}/no-lora.safetensors"], r"--lora: .*no-lora.safetensors: no such file"),
    # the stated limits (README, What is guaranteed), before any allocation
    (["--steps", "300000"], r"--steps must be an integer from 1 to 1000, got 300000"),
    (["--guidance", "1e39"], r"--guidance must be a finite number from -100 to 100"),
    (["--height", "1000000"], r"--height and --width must be at most 8192 pixels each, got 1000"),
    (["--num-images", "100000000"], r"--num-images: needs a whole number >= 1 and <= 100000, got"),
    (["--cubemap-size", "100000"], r"--cubemap-size: needs a whole number >= 1 and <= 8192, got"),
    (["--prompt", "x" * 20_001], r"--prompt is 20,001 characters: at most 20,000 \(T5 reads 512"),
    (
        ["--num-images", "2", "--seed", str(2**64 - 1), "--out-dir", "{tmp}/o"],
        r"--prompt:1: the seeds 18446744073709551615\.\.18446744073709551616 .* must fit in 64 b",
    ),
    (
        ["--out", "{tmp}/\udcff.png", "--viewer"],
        r"the name is not printable UTF-8 text: choose another",
    ),
    (["--lora", "{tmp}/a", "--lora", "none"], r"--lora none cannot be combined with other LoRAs"),
    (["--lora", "{tmp}/a", "--lora", "{tmp}/a"], r"--lora \S+a is given twice: give it once"),
    (
        ["--lora", "{tmp}/a", "--lora", "{tmp}/b", *["--lora-scale", "1"] * 3],
        r"--lora-scale 1 1 1: 3 scales for 2 LoRAs; give one scale for all, or one per --lora in",
    ),
    (["--lora", "auto", "--lora", "{tmp}/typo"], r"--lora: \S+typo: no such file or folder"),
    (["--lora", "none", "--lora-scale", "2", "--lora-scale", "1"], r"--lora-scale 2 1 needs --lo"),
]

EDIT_CASES = [
    (["--steps", "0"], r"--steps must be an integer from 1 to 1000"),
    (["--height", "0"], r"--height must be a positive multiple of 16, got 0"),
    (["--height", "40"], r"--height must be a positive multiple of 16, got 40"),
    (["--wrap-pad", "10"], r"--wrap-pad \(wrap_pad\) must be 0 to 4"),
    (["--wrap-pad", "3"], r"--wrap-pad 3 must be <= half the 4 columns"),
    (["--tau", "nan"], r"--tau must be a finite number, got nan"),
    (["--feather", "-5"], r"--feather must be at least 0"),
    (["--gamma", "1.5"], r"--gamma must be in \[0, 1\], got 1.5"),
    (["--eta", "nan"], r"--eta must be in \[0, 1\], got nan"),
    (["--eta-start", "-0.1"], r"--eta-start \(start\) must be in \[0, 1\]"),
    (["--eta-stop", "1.5"], r"--eta-stop \(stop\) must be in \[0, 1\]"),
    (["--eta-start", "0.5", "--eta-stop", "0.2"], r"need --eta-start <= --eta-stop, got 0.5 > 0.2"),
    (["--blend-until", "nan"], r"--blend-until \(blend_until\) must be a finite number"),
    (["--inversion-guidance", "inf"], r"--inversion-guidance .* must be a finite number"),
    (["--guidance=-inf"], r"--guidance must be a finite number"),
    (["--lora-scale", "nan"], r"--lora-scale \(lora_scale\) must be a finite number"),
    (["--mask-pad", "mirror"], r"--mask-pad: invalid choice"),
    (["--true-cfg", "0"], r"--true-cfg \(true_cfg\) must be a finite number >= 1"),
    (["--vae-tile", "0"], r"--vae-tile \(vae_tile\) must be at least 1"),
    (["--seed", "-1"], r"--seed must be an integer from 0 to 2\*\*64 - 1"),
    (["--device", "cuda"], r"--device cuda: no such CUDA GPU"),
    (["--device", "meta"], r"--device meta: cannot run there; use cpu, cuda or cuda:N"),
    (["--lora-scale", "0.5"], r"--lora-scale 0.5 needs --lora, which is none"),
    (["--paste-back", "--feather", "64"], r"--feather 64 must be under the image's width \(64 px"),
    (
        ["--out", "{tmp}/src.png"],
        r"--out .*src\.png is --image, which the edit would overwrite: ch",
    ),
    (["--out", "{tmp}/mask.png"], r"--out .*mask\.png is --mask, which the edit would overwrite"),
    (["--image", "{tmp}/missing.png"], r"No such file or directory.*missing\.png"),
    (["--image", "{tmp}/square.png"], r"square\.png: 32x32 is not 2:1; pass --resize"),
    (["--image", "{tmp}/text.png"], r"cannot identify image file"),
    (["--mask", "{tmp}/missing.png"], r"No such file or directory.*missing\.png"),
    (["--mask", "{tmp}/white.png"], r"nothing to generate"),
    (["--out", "{tmp}/out.gif"], r"use a \.png, \.jpg or \.jpeg"),
    (["--base", "{tmp}/no-base"], r"--base: .*no-base: no such file or folder"),
    (["--height", "100000"], r"--height must be a positive multiple of 16, got 100000: at most 40"),
    (["--steps", "300000"], r"--steps must be an integer from 1 to 1000"),
    (["--source-prompt", "x" * 20_001], r"--source-prompt \(source_prompt\) must be at most 20,0"),
    (
        ["--image", "{tmp}/cut.jpg"],
        r"cut\.jpg: not a readable image \((Truncated File Read|image file is truncated)",
    ),
    (
        ["--image", "{tmp}/bomb.png"],
        r"bomb\.png: Image size \(\d+ pixels\) exceeds limit .*resize it",
    ),
]

PREPARE_CASES = [  # the whole command line after --out {tmp}/data
    ([], r"give --pano and/or --persp"),
    (["--pano", "{tmp}/missing"], r"--pano .*missing: no such folder"),
    (["--pano", "{tmp}/empty"], r"--pano .*empty: no images in it"),
    (["--persp", "{tmp}/captions"], r"--persp .*captions: no images in it"),
    (["--persp", "{tmp}/pano.txt"], r"--persp .*pano\.txt: not a folder"),
    (["--persp", "{tmp}/photos", "--height", "0"], r"--height must be a positive multiple of 16"),
    (["--persp", "{tmp}/photos", "--height", "30"], r"multiple of 16, got 30"),
    (["--persp", "{tmp}/photos", "--height", "-16"], r"multiple of 16, got -16"),
    (["--persp", "{tmp}/photos", "--height", "abc"], r"--height: invalid int value"),
    (["--persp", "{tmp}/photos", "--fov", "0"], r"--fov must be 1 to 179 degrees, got 0"),
    (["--persp", "{tmp}/photos", "--fov", "nan"], r"--fov must be 1 to 179 degrees, got nan"),
    (["--persp", "{tmp}/photos", "--fov", "200"], r"--fov must be 1 to 179 degrees"),
    (["--persp", "{tmp}/photos", "--fov-range", "0", "90"], r"--fov-range 0.0 90.0: need 1 <="),
    (["--persp", "{tmp}/photos", "--fov-range", "90", "60"], r"--fov-range 90.0 60.0"),
    (["--persp", "{tmp}/photos", "--pitch-range", "-100", "0"], r"need -90 <= LO <= HI <= 90"),
    (["--persp", "{tmp}/photos", "--yaw-range", "10", "-10"], r"--yaw-range 10.0 -10.0"),
    (["--persp", "{tmp}/photos", "--roll-range", "nan", "0"], r"--roll-range nan 0.0"),
    (["--persp", "{tmp}/photos", "--seed", "-1"], r"--seed must be an integer >= 0"),
    (["--persp", "{tmp}/photos", "--height", "1048576"], r"got 1048576: at most 4096 \(the width"),
    (["--pano", "{tmp}/pano", "--out", "{tmp}/pano.txt"], r"pano\.txt is not a writable folder"),
    (["--pano", "{tmp}/pano", "--out", "{tmp}/pano.txt/x"], r"is not a writable folder"),
    (["--pano", "{tmp}/pano", "--frobnicate"], r"unrecognized arguments: --frobnicate"),
    (
        ["--pano", "{tmp}/pano", "--out", "{tmp}/pano"],
        r"--out \S+pano is --pano \S+pano: choose an",
    ),
    (["--persp", "{tmp}/photos", "--out", "{tmp}/photos/d"], r"d is inside --persp \S+photos: ch"),
]


def expand(argv: list[str], tmp: Path) -> list[str]:
    return [a.format(tmp=tmp) for a in argv]


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA or MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("extra,match", SAMPLE_CASES, ids=[" ".join(c[0]) for c in SAMPLE_CASES])
def test_sample_bad_input(tiny_flux, tmp_path, capsys, no_cuda, extra, match):
    """sample.py: one line naming the flag, exit 2, nothing written."""
    (tmp_path / "blocker").write_text("a file where a folder should be")
    (tmp_path / "folder.png").mkdir()
    lora = None if "--lora" in extra else "none"  # --lora adds a LoRA: none is given alone
    argv = sample_args(tiny_flux, tmp_path / "pano.png", *expand(extra, tmp_path), lora=lora)
    expect_error(capsys, sample.main, argv, tmp_path, match)


@pytest.fixture
def edit_inputs(tmp_path):
    """A 2:1 source and its mask, a square source, an all-white mask, a text file named .png."""
    src, mask = write_inputs(tmp_path)
    write_inputs(tmp_path / "sq", size=(32, 32))[0].rename(tmp_path / "square.png")
    Image.new("L", (50, 20), 255).save(tmp_path / "white.png")
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (64, 32)).save(tmp_path / "cut.jpg")  # a JPEG cut short
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:300])
    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")  # 200 M pixels in 26 KB
    return src, mask


@pytest.mark.parametrize("extra,match", EDIT_CASES, ids=[" ".join(c[0]) for c in EDIT_CASES])
def test_edit_bad_input(tiny_flux, tmp_path, capsys, no_cuda, edit_inputs, extra, match):
    """edit.py: one line naming the flag or file, exit 2, nothing written, no model loaded."""
    argv = edit_args(tiny_flux, *edit_inputs, tmp_path / "out.png", *expand(extra, tmp_path))
    expect_error(capsys, edit.main, argv, tmp_path, match)


@pytest.mark.parametrize("extra,match", PREPARE_CASES, ids=[" ".join(c[0]) for c in PREPARE_CASES])
def test_prepare_bad_input(tmp_path, capsys, extra, match):
    """prepare.py: one line naming the flag, exit 2, no --out folder or file left behind."""
    make_images(tmp_path / "pano", {"a.png": (64, 32)})
    make_images(tmp_path / "photos", {"b.png": (32, 24)})
    (tmp_path / "empty").mkdir()
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "c.txt").write_text("a caption without its image")
    (tmp_path / "pano.txt").write_text("a file, not a folder")
    argv = expand(["--out", "{tmp}/data", *extra], tmp_path)
    expect_error(capsys, prepare.main, argv, tmp_path, match)


def test_prepare_requires_out(tmp_path, capsys):
    """prepare.py without --out: the parser's one line."""
    make_images(tmp_path / "pano", {"a.png": (64, 32)})
    expect_error(capsys, prepare.main, ["--pano", str(tmp_path / "pano")], tmp_path, "--out")


def test_read_only_output(tiny_flux, tmp_path, capsys, monkeypatch):
    """A read-only output folder is refused up front (os.access as a non-root user sees it)."""
    make_images(tmp_path / "pano", {"a.png": (64, 32)})
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and access(p, mode))
    argv = ["--out", str(locked / "data"), "--pano", str(tmp_path / "pano")]
    expect_error(capsys, prepare.main, argv, tmp_path, r"locked is not a writable folder")
    argv = sample_args(tiny_flux, locked / "pano.png")
    expect_error(capsys, sample.main, argv, tmp_path, r"cannot write .*locked/pano\.png")


def test_failed_prepare_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A prepare that fails half-way (a write error on the second photo) removes what it wrote:
    no masks/, persp/*.png, jsonl, or --out folder it created."""
    make_images(tmp_path / "pano", {"a.png": (64, 32)})
    make_images(tmp_path / "photos", {"b.png": (32, 24), "c.png": (32, 24)})
    real, calls = prepare.save_png, []

    def flaky(img, path):
        calls.append(path)
        if len(calls) == 4:  # the pano mask, photo b and its mask, then photo c
            raise OSError(28, "No space left on device")
        real(img, path)

    monkeypatch.setattr(prepare, "save_png", flaky)
    before = snapshot(tmp_path)
    argv = ["--out", str(tmp_path / "data"), "--pano", str(tmp_path / "pano")]
    with pytest.raises(SystemExit) as exit_info:
        prepare.main([*argv, "--persp", str(tmp_path / "photos"), "--height", "32"])
    assert exit_info.value.code == 1 and len(calls) == 4
    assert "error: [Errno 28] No space left" in capsys.readouterr().err
    assert snapshot(tmp_path) == before and not (tmp_path / "data").exists()


def expect_failure(capsys, main, argv: list[str], folder: Path, match: str) -> None:
    """A run that fails after its work began: exit 1, its last stderr line the only `error: ...`
    (after progress lines), no traceback, `folder` unchanged."""
    before = snapshot(folder)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 1 and len(errors) == 1, (exit_info.value.code, err)
    assert err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err
    assert re.search(match, errors[0]), (match, errors[0])
    assert snapshot(folder) == before, "the command left files behind or changed them"


NON_FINITE = r"latents are NaN/inf, so nothing is decoded: check the LoRA .*--guidance.*fp16"


def test_sample_refuses_nan_latents(tiny_flux, tmp_path, capsys):
    """A LoRA holding a NaN makes NaN latents: exit 1 naming the likely causes, no image (it was
    an all-black PNG and exit 0)."""
    from safetensors.torch import load_file, save_file
    from test_lora import dit360_lora

    folder = dit360_lora(tmp_path / "lora", r=4, alpha=4)[0]
    tensors = load_file(folder / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors")
    argv = sample_args(tiny_flux, tmp_path / "pano.png", lora=str(folder))
    expect_failure(capsys, sample.main, argv, tmp_path, NON_FINITE)


def test_edit_refuses_nan_latents(tiny_flux, tmp_path, capsys, monkeypatch):
    """edit.py: an edit that ends in inf latents (fp16 overflow, say) writes no image, exit 1."""
    import dit360.app.editing

    src, mask = write_inputs(tmp_path)
    real = dit360.app.editing.edit
    monkeypatch.setattr(
        dit360.app.editing, "edit", lambda *a, **k: (real(*a, **k)[0] * float("inf"), None)
    )
    argv = edit_args(tiny_flux, src, mask, tmp_path / "out.png", "--steps", "2")
    expect_failure(capsys, edit.main, argv, tmp_path, NON_FINITE)


ROOT = Path(__file__).parents[1]


def script(name: str, *argv: str) -> subprocess.CompletedProcess:
    """Run a script as a user does (its `__main__` entry), capturing its output."""
    cmd = [sys.executable, str(ROOT / name), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_batch_error_is_the_only_line(tiny_flux, tmp_path):
    """A bad batch row at a size that warns: stderr is the one `error:` line, no warning before
    it (the size's warning was replayed before the rows were checked)."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a lake", "steps": 0}\n')
    r = script(
        "sample.py", *batch_flags(tiny_flux, "--prompts", str(rows), "--out-dir", str(tmp_path))
    )
    error = f"error: {rows}:1: --steps must be an integer from 1 to 1000, got 0"
    assert r.returncode == 2 and r.stderr.splitlines() == [error], r.stderr


def test_warning_is_one_line(tiny_flux, tmp_path):
    """A warning is one line `warning: ...` on stderr, not Python's file:line and source line;
    here of a batch whose image exists (made by the same job), so nothing loads; an image made
    with other settings is the one line `error: ...`, no warning before it."""
    flags = batch_flags(tiny_flux, "--prompt", "a", "--out-dir", str(tmp_path))
    assert script("sample.py", *flags).returncode == 0
    r = script("sample.py", *flags)
    warning = (
        "warning: 32x64 (height x width): DiT360 was trained at 1024x2048 only; expect weaker "
        "panoramas"
    )
    assert r.returncode == 0 and r.stderr.splitlines()[0] == warning, r.stderr
    assert "UserWarning" not in r.stderr and "skip " in r.stdout
    r = script("sample.py", *batch_flags(tiny_flux, "--prompt", "b", "--out-dir", str(tmp_path)))
    assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr
    assert len(r.stderr.splitlines()) == 1 and "made with other settings" in r.stderr


@pytest.mark.parametrize(
    "name, rank",
    [(n, "0") for n in ("sample.py", "edit.py", "train.py", "convert_weights.py", "prepare.py")]
    + [("train.py", "1")],
)
def test_interrupt_is_one_line(name, rank):
    """Ctrl-C (a KeyboardInterrupt in main, here from its parsing of the flags) is one line
    `error: interrupted` and exit 130, no traceback; under torchrun from rank 0 alone."""
    code = (
        "import argparse, runpy, sys\n"
        "def stop(*a, **k): raise KeyboardInterrupt\n"
        f"argparse.ArgumentParser.parse_args = stop; sys.argv = [{name!r}]\n"
        f"runpy.run_path({name!r}, run_name='__main__')"
    )
    env = {**os.environ, "RANK": rank}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env
    )
    said = "error: interrupted\n" if rank == "0" else ""
    assert r.returncode == 130 and r.stderr == said, r.stderr


@pytest.mark.parametrize("version, refused", [("2.7.1+cu126", True), ("2.8.0", False)])
def test_train_refuses_an_old_torch(tmp_path, version, refused):
    """train.py under a torch older than 2.8 (FSDP2's settings) stops with one line, exit 2,
    before its imports (dit360.train.distributed's would be a traceback on < 2.6); 2.8 passes the
    check (then --help)."""
    code = (
        "import runpy, sys, torch\n"
        f"torch.__version__ = {version!r}; sys.argv = ['train.py', '--help']\n"
        "runpy.run_path('train.py', run_name='__main__')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    error = (
        "error: train.py needs torch >= 2.8 (FSDP2's fully_shard and its settings), "
        f"this is {version}: pip install 'torch>=2.8'"
    )
    if refused:
        assert r.returncode == 2 and r.stderr.splitlines() == [error], r.stderr
    else:
        assert r.returncode == 0 and "usage:" in r.stdout, r.stderr


@pytest.mark.parametrize("name", ["sample.py", "edit.py"])
def test_a_terminal_sees_a_first_line_at_once(name):
    """On a terminal, the first line comes before torch is imported (seconds of silence before),
    and a pipe gets none (the error tests above: stderr is the one `error:` line)."""
    master, slave = pty.openpty()
    cmd = [sys.executable, "-X", "importtime", str(ROOT / name), "--help"]
    p = subprocess.Popen(cmd, stderr=slave, stdout=subprocess.DEVNULL, cwd=ROOT)
    os.close(slave)
    err = b""
    with contextlib.suppress(OSError):  # EIO once all is read: the script has closed its end
        while select.select([master], [], [], 60)[0] and (chunk := os.read(master, 1 << 16)):
            err += chunk  # read as it comes: a full pty would block the script
    os.close(master)
    r = subprocess.CompletedProcess(cmd, p.wait(timeout=60))
    lines = err.decode().splitlines()
    first = next(i for i, x in enumerate(lines) if not x.startswith("import time:"))
    loaded = next(i for i, x in enumerate(lines) if re.search(r"\| +torch$", x))
    assert r.returncode == 0 and lines[first] == f"{name}: starting (importing torch)..."
    assert first < loaded, (first, loaded)


@pytest.mark.parametrize("script", [sample, edit, prepare])
@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_bad_flag_under_torchrun_is_said_by_rank_0(script, rank, monkeypatch, capsys):
    """torchrun gives every rank the same arguments: a bad flag is one line from rank 0, and the
    other ranks exit 2 without repeating it (was a line per rank)."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("RANK", rank)
    with pytest.raises(SystemExit) as e:
        script.main(["--no-such-flag"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("error: ") == (rank == "0") and err.count("\n") == (rank == "0"), err
