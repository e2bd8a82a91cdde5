"""convert_weights.py: every bad argument is one line and no file; our exports load back; a killed
or terminated conversion leaves nothing that the next run does not clean up."""

import contextlib
import io
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clitest import expect_error
from safetensors.torch import load_file, save_file
from test_lora import dit360_lora

import convert_weights
from dit360.load.weights import load_flux

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def inputs(tiny_flux, tmp_path_factory) -> dict[str, Path]:
    """The tiny FLUX.1-dev folder, a LoRA on it, one with a NaN, and a file that is no model."""
    root = tmp_path_factory.mktemp("inputs")
    lora, tensors, _ = dit360_lora(root / "lora")
    nan, _, _ = dit360_lora(root / "nan")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, nan / "adapter_model.safetensors")
    save_file({"x": torch.zeros(2)}, root / "junk.safetensors")
    (root / "file.txt").write_text("not a folder")
    return dict(base=tiny_flux, lora=lora, nan=nan, junk=root / "junk.safetensors", root=root)


def state(src: Path) -> dict[str, torch.Tensor]:
    """Our model's tensors loaded from any layout, in the file's dtype."""
    return load_flux(src, dtype=None).state_dict()


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# (argv with {base}, {lora}, {nan}, {junk}, {root}, {out} filled in, message, exit status)
BAD = [
    ("--out {out}/a.safetensors", "give --base, --lora", 2),
    ("--base {base}", "required: --out", 2),
    ("--base {base} --out {out}/a.safetensors --bogus", "unrecognized arguments: --bogus", 2),
    ("--base {base} --merge --out {out}/a.safetensors", "give --base, --lora, or both", 2),
    ("--base {base} --lora {lora} --to diffusers --out {out}/p", "--to sets the layout", 2),
    ("--base {base} --lora {lora} --merge --lora-scale nan --out {out}/a.safetensors", "finite", 2),
    ("--base {base} --lora {lora} --merge --lora-scale inf --out {out}/a.safetensors", "finite", 2),
    ("--base {base} --lora-scale 0.5 --out {out}/a.safetensors", "--lora-scale needs --lora", 2),
    ("--base {base} --axes-dim 16,56 --out {out}/a.safetensors", "three positive even", 2),
    ("--base {base} --axes-dim 4,x,6 --out {out}/a.safetensors", "three positive even", 2),
    ("--base {base} --axes-dim 4,5,7 --out {out}/a.safetensors", "three positive even", 2),
    ("--lora {lora} --axes-dim 4,6,6 --out {out}/p", "--axes-dim needs --base", 2),
    (
        "--lora {lora} --out {out}/p",
        r"^error: --lora \S+ does not fit full-size FLUX.1-dev, whose "
        r"layer sizes --lora alone assumes: give the model it was trained on with --base$",
        2,  # checked before any work (it was exit 1, a late failure)
    ),
    ("--base {base} --dtype fp8 --out {out}/a.safetensors", "invalid choice: 'fp8'", 2),
    ("--base {base} --out {out}/a.bin", "name a .safetensors file", 2),
    ("--base {base} --out {out}", "name a .safetensors file", 2),
    ("--base {base} --to diffusers --out {out}/d.safetensors", "is a folder", 2),
    ("--base {base} --to diffusers --out {out}", r"holds other files \(keep\.txt\)", 2),
    ("--lora {lora} --out {out}/keep.txt", "is a folder", 2),
    ("--base {base} --out {root}/file.txt/a.safetensors", "cannot write there", 2),
    ("--base {out}/none.safetensors --out {out}/a.safetensors", "no such file or folder", 1),
    ("--base {junk} --out {out}/a.safetensors", "holds no FLUX transformer", 1),
    ("--base {base} --lora {junk} --merge --out {out}/a.safetensors", "junk", 1),
    ("--base {base} --lora {junk} --out {out}/p", "junk", 2),  # the LoRA alone: read first
    ("--base {base} --lora {nan} --merge --out {out}/a.safetensors", "not finite.*NaN", 1),
    (
        "--base {base} --lora {lora} --merge --lora-scale 1e39 --out {out}/a.safetensors",
        "<= 1000",
        2,
    ),
    ("--lora {lora} --lora-scale 1e300 --out {out}/p", r"--lora-scale.*<= 1000, got '1e300'", 2),
    (
        "--base {base} --lora {nan} --out {out}/p",
        r"NaN or inf \(in transformer\..*lora_A.*not written",
        1,
    ),
    ("--lora {lora} --lora {nan} --out {out}/p", "--lora is given 2 times: only --merge folds", 2),
    ("--base {base} --lora {lora} --lora {lora} --merge --out {out}/a.safetensors", "twice", 2),
    ("--base {base} --lora none --lora {lora} --merge --out {out}/a.safetensors", "combined", 2),
    (
        "--base {base} --lora {lora} --lora {nan} --merge --lora-scale 1 --lora-scale 2 "
        "--lora-scale 3 --out {out}/a.safetensors",
        r"--lora-scale 1 2 3: 3 scales for 2 LoRAs; give one scale for all, or one per --lora",
        2,
    ),
    (
        "--base {base} --lora {lora} --lora {nan} --merge --out {out}/a.safetensors",
        r"not finite after merging \S+lora at scale 1, \S+nan at scale 1: a LoRA holds NaN",
        1,
    ),
]


@pytest.mark.parametrize("argv, match, code", BAD, ids=[f"{i:02d}" for i in range(len(BAD))])
def test_bad_arguments(inputs, tmp_path, capsys, argv, match, code):
    """Each bad input: one line `error: ...`, exit 2 (usage) or 1 (failure), no file written."""
    (tmp_path / "keep.txt").write_text("the user's")
    argv = argv.format(**{k: str(v) for k, v in inputs.items()}, out=tmp_path).split()
    stdout = io.StringIO()

    def run(argv: list[str]) -> None:
        with contextlib.redirect_stdout(stdout):
            convert_weights.main(argv)

    expect_error(capsys, run, argv, tmp_path, match, code)
    assert stdout.getvalue() == ""
    assert not [p for p in inputs["root"].iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("kind", ["bfl", "diffusers", "merged"])
def test_exports_load_back(inputs, tmp_path, kind):
    """Our BFL file, diffusers folder and merged file load back with load_flux and --base."""
    base, lora = str(inputs["base"]), str(inputs["lora"])
    first = tmp_path / ("diffusers" if kind == "diffusers" else "first.safetensors")
    extra = {"bfl": [], "diffusers": ["--to", "diffusers"], "merged": ["--lora", lora, "--merge"]}
    convert_weights.main(["--base", base, "--out", str(first), *extra[kind]])
    again = tmp_path / "again.safetensors"
    convert_weights.main(["--base", str(first), "--out", str(again)])
    loaded = state(first)  # head dim 16: the RoPE axes come from our metadata or config.json
    assert_same(load_file(again), loaded)
    if kind != "merged":
        assert_same(loaded, state(inputs["base"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, again.name])


@pytest.mark.parametrize("kind", ["diffusers", "peft"])
def test_folder_output_is_replaced(inputs, tmp_path, kind):
    """A previous output in a folder (diffusers: even sharded) is replaced whole, nothing old left
    over; a temporary file a killed run left inside goes too."""
    out, base = tmp_path / "out", str(inputs["base"])
    previous = inputs["base"] / "transformer" if kind == "diffusers" else inputs["lora"]
    shutil.copytree(previous, out)
    names = {"diffusers": ["config.json", "diffusion_pytorch_model.safetensors"]}
    names["peft"] = ["adapter_config.json", "adapter_model.safetensors"]
    dead = f".{names[kind][1]}.tmp99999999.{socket.gethostname()}"  # a pid that cannot exist
    (out / dead).write_text("a killed run's")
    flags = ["--to", "diffusers"] if kind == "diffusers" else ["--lora", str(inputs["lora"])]
    convert_weights.main(["--base", base, "--out", str(out), *flags])
    assert sorted(p.name for p in out.iterdir()) == names[kind]
    assert leftovers(tmp_path) == []
    if kind == "diffusers":
        assert_same(state(out), state(inputs["base"]))


# Runs convert_weights.main with a pause after the first tensors, so a test can signal it mid-write.
PAUSED = """
import sys, time
import dit360.load.files as files

write = files.write_safetensors

def paused(path, specs, tensors, metadata=None):
    def slow():
        for i, item in enumerate(tensors):
            if i == 3:
                print("writing", flush=True)
                time.sleep(120)
            yield item
    write(path, specs, slow(), metadata)

files.write_safetensors = paused  # before convert_weights imports it
import convert_weights
from dit360.app.cli import handle_signals

handle_signals()  # as the script's __main__ does
convert_weights.main(sys.argv[1:])
"""


def start_paused(argv: list[str]) -> subprocess.Popen:
    """A conversion in a subprocess, returned once it has written a few tensors and paused."""
    cmd, pipe = [sys.executable, "-c", PAUSED, *argv], subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=pipe, stderr=pipe, text=True)
    line = proc.stdout.readline()
    if line != "writing\n":
        proc.kill()
        pytest.fail(f"the conversion did not start writing: {line!r} {proc.stderr.read()}")
    return proc


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary files and folders under `folder`."""
    return [str(p.relative_to(folder)) for p in folder.rglob(".*tmp*")]


@pytest.mark.parametrize("to", ["bfl", "diffusers"])
def test_killed_conversion_is_cleaned_up(inputs, tmp_path, to):
    """SIGKILL mid-write leaves a temporary file only; the next run removes it and succeeds."""
    out = tmp_path / ("d" if to == "diffusers" else "x.safetensors")
    argv = ["--base", str(inputs["base"]), "--to", to, "--out", str(out)]
    proc = start_paused(argv)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    assert leftovers(tmp_path) and not out.exists()  # what a killed run leaves: its temp only
    convert_weights.main(argv)
    assert leftovers(tmp_path) == [] and [p.name for p in tmp_path.iterdir()] == [out.name]
    assert_same(state(out), state(inputs["base"]))


def test_terminated_conversion_removes_its_temp(inputs, tmp_path):
    """SIGTERM mid-write: exit 143 at once, and no file or temporary file is left."""
    out = tmp_path / "d"
    proc = start_paused(["--base", str(inputs["base"]), "--to", "diffusers", "--out", str(out)])
    assert leftovers(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("to", ["bfl", "diffusers"])
def test_a_linked_out_is_refused_up_front(inputs, tmp_path, capsys, to):
    """--out a symbolic link (to a file, to a folder): one line before any weight is read, exit 2;
    the link and what it points to unchanged."""
    target = tmp_path / ("real.safetensors" if to == "bfl" else "real")
    if to == "bfl":
        target.write_bytes(b"the user's")
    else:
        target.mkdir()
    link = tmp_path / ("link.safetensors" if to == "bfl" else "link")
    link.symlink_to(target)
    argv = ["--base", str(inputs["base"]), "--to", to, "--out", str(link)]
    expect_error(capsys, convert_weights.main, argv, tmp_path, r"--out .*link.* is a symbolic link")


def test_a_long_out_name_converts(inputs, tmp_path):
    """A legal 250-byte --out file name (its temporary name would pass the 255-byte limit)."""
    out = tmp_path / ("é" * 60 + "x" * 120 + ".safetensors")  # 120 + 120 + 12 bytes
    convert_weights.main(["--base", str(inputs["base"]), "--out", str(out)])
    assert_same(state(out), state(inputs["base"]))
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
