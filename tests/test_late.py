"""Leftovers of the fuzzing rounds: a failure after every input check passed exits 1 (not 2, the
status of bad input), in each command and batch; a LoRA file's hostile key (a megabyte long) makes
a bounded line; a LoRA holding ComfyUI's scaled_fp8 marker is refused, not read as scaled; the
training lock's text is written whole or the run stops in one line, leaving no lock."""

import errno
import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_editing import cli as edit_args
from test_editing import write_inputs
from test_fuzz_resources import small_files
from test_lora import dit360_lora
from test_sample_cli import args as sample_args
from tiny import TINY_TRANSFORMER

import edit
import sample
from dit360.app import generate
from dit360.load import config, files, lora_formats
from dit360.load.weights import meta_flux
from dit360.train import checkpoints

LONG = "x" * 1_000_000  # a key a megabyte long


def run(capsys: pytest.CaptureFixture, main, argv: list[str]) -> tuple[int, list[str]]:
    """`main(argv)`'s exit status and its `error: ...` lines."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    return e.value.code, [line for line in err.splitlines() if line.startswith("error: ")]


def commands(tiny_flux: Path, tmp: Path, transformer: Path) -> dict[str, tuple]:
    """sample.py and edit.py, one image and a batch, on `transformer`: (main, argv)."""
    src, mask = write_inputs(tmp / "in")
    (tmp / "edits.jsonl").write_text(
        json.dumps({"image": str(src), "mask": str(mask), "prompt": "x"})
    )
    given, one = ["--transformer", str(transformer)], edit_args(tiny_flux, src, mask, tmp / "c.png")
    batch = ["--edits", str(tmp / "edits.jsonl"), "--out-dir", str(tmp / "d")]
    return {
        "sample": (sample.main, [*sample_args(tiny_flux, tmp / "a.png"), *given]),
        "sample batch": (
            sample.main,
            [*sample_args(tiny_flux, tmp / "b.png", "--num-images", "2"), *given],
        ),
        "edit": (edit.main, [*one, *given]),
        "edit batch": (edit.main, [*one[6:-2], *batch, *given]),  # no --image ... --out
    }


@pytest.mark.parametrize("command", ["sample", "sample batch", "edit", "edit batch"])
def test_a_shard_cut_after_its_checks_exits_1(tiny_flux, tmp_path, capsys, monkeypatch, command):
    """A shard whose data ends early once every check passed (its header was read whole): one line
    naming it, exit 1 (it was 2, bad input's), no image; the same shard cut before: exit 2."""
    folder = tmp_path / "transformer"
    shutil.copytree(tiny_flux / "transformer", folder)
    shard = sorted(folder.glob("*-of-*.safetensors"))[-1]
    main, argv = commands(tiny_flux, tmp_path, folder)[command]
    real = generate.offload_mode  # run_jobs asks it once the checks passed, before any model loads

    def cut_then(*args: object, **kwargs: object) -> str:
        os.truncate(shard, shard.stat().st_size - 4)  # the data's last bytes: the header stays
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "offload_mode", cut_then)
    code, errors = run(capsys, main, argv)
    assert code == 1 and len(errors) == 1 and str(shard) in errors[0], (code, errors)
    assert sorted(p.name for p in tmp_path.rglob("*.png*")) == ["mask.png", "src.png"]  # none made
    monkeypatch.undo()
    generate.CHECKED.clear()  # what check_inputs passed in this process: checked again
    code, errors = run(capsys, main, argv)  # cut before the checks: they see it
    assert code == 2 and len(errors) == 1 and str(shard) in errors[0], (code, errors)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """The tiny transformer on the meta device: enough to plan a LoRA onto."""
    return meta_flux(config.from_diffusers_config(TINY_TRANSFORMER))


def lora(folder: Path, edit: dict | None = None, cfg: dict | None = None) -> Path:
    """DiT360's LoRA of the tiny model with the tensors of `edit` added, its config with `cfg`."""
    folder, tensors, config = dit360_lora(folder)
    save_file({**tensors, **(edit or {})}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config | (cfg or {})))
    return folder / "adapter_model.safetensors"


HOSTILE = {  # a key a megabyte long, where each error line of the LoRA readers quotes it
    "key that matches no layer": ({f"transformer.{LONG}.lora_A.weight": torch.zeros(4, 32)}, None),
    "target_modules": (None, {"target_modules": ["attn.to_k", LONG]}),
    "20 such keys": ({f"{LONG}{i}.lora_A.weight": torch.zeros(4, 32) for i in range(20)}, None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_key_makes_a_short_line(model, tmp_path, case):
    """A LoRA whose key or target is a megabyte long: one line of a few hundred characters
    naming the file (it was megabytes long)."""
    path = lora(tmp_path / "lora", *HOSTILE[case])
    with pytest.raises(ValueError) as e:
        lora_formats.read_lora(path, model)
    said = str(e.value)
    assert str(path) in said and "..." in said and len(said) < 3_000, len(said)


def test_a_key_outside_its_file_makes_a_short_line(tmp_path):
    """A file's key a megabyte long whose bytes lie outside the file: a short line."""
    path = tmp_path / "x.safetensors"
    save_file({LONG: torch.zeros(4)}, path)
    os.truncate(path, path.stat().st_size - 4)
    with pytest.raises(ValueError, match=r"'xxx+\.\.\. lies outside the file") as e:
        files.open_tensors(path)
    assert len(str(e.value)) < 500


def test_a_scaled_fp8_lora_is_refused(model, tiny_flux, tmp_path, capsys):
    """A LoRA with ComfyUI's scaled_fp8 marker and a `.scale_weight` for one of its tensors
    (it was read silently as that tensor times the scale, the marker and `.scale_input`s
    dropped): refused in one line naming the file, exit 2 in sample.py. No tool writes a LoRA so:
    what its scales would mean is unknown, so it is not guessed."""
    key = next(k for k in dit360_lora(tmp_path / "plain")[1] if k.endswith("lora_A.weight"))
    marked = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    scales = {key.replace(".weight", ".scale_weight"): torch.tensor(3.0)}
    scales[key.replace(".weight", ".scale_input")] = torch.tensor(1.0)
    path = lora(tmp_path / "lora", marked | scales)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} holds scaled_fp8"):
        lora_formats.read_lora(path, model)
    argv = sample_args(tiny_flux, tmp_path / "pano.png", lora=str(path.parent))
    code, errors = run(capsys, sample.main, argv)
    assert code == 2 and len(errors) == 1 and "holds scaled_fp8" in errors[0], (code, errors)
    assert not (tmp_path / "pano.png").exists()


@pytest.mark.parametrize("links", [True, False])
@pytest.mark.parametrize("limit", [0, 3])
def test_a_lock_that_cannot_be_written_whole(tmp_path, capsys, monkeypatch, links, limit):
    """The lock's `pid host` under a file size limit (a full disk; a write of 3 bytes is short):
    one line naming the lock, exit 1, no lock nor temporary left (it kept `123`, or a bare lock);
    with no hard links in the folder (the lock made in place) too."""
    if not links:
        monkeypatch.setattr(
            os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "no"))
        )
    capsys.readouterr()
    with small_files(limit), pytest.raises(SystemExit) as e:
        checkpoints.take_lock(tmp_path / "out")
    err = capsys.readouterr().err.splitlines()
    lock = tmp_path / "out" / ".lock"
    assert e.value.code == 1 and len(err) == 1 and f"cannot write the lock {lock}" in err[0], err
    assert "File too large" in err[0] and "ulimit -f" in err[0], err
    assert os.listdir(tmp_path / "out") == []
    assert checkpoints.take_lock(tmp_path / "out") == lock  # free: the next run takes it
    assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}"
    checkpoints.release(lock, made=False)
