"""Limits and late failures of the batch commands: a batch streams its conditionings (CHUNK at a
time in CPU memory, whatever its size), a read-only --out-dir is named, train.py refuses a huge
--resolution before it writes anything."""

import os
import weakref
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_train
import torch
from clitest import expect_error
from test_batch import flags as batch_flags
from test_train import args as train_args

import sample
import train
from dit360.app import generate
from dit360.app.generate import CHUNK, Job, generate_many
from dit360.app.options import SampleOptions
from dit360.core.sampling import Conditioning

data, one_thread = test_train.data, test_train.one_thread


@pytest.mark.parametrize("count", [10, 10_000])
def test_batch_conditionings_stay_bounded(tiny_flux, monkeypatch, tmp_path, count):
    """generate_many over `count` prompts: the conditionings alive while an image runs never
    exceed one chunk's, and none is on the device it runs on before its image (a --prompts
    file kept every one on the device). Models and decoding are stubbed: this counts."""
    alive: list[weakref.ref] = []
    peak = [0]

    def encode(enc, prompts):  # what text.encode_prompt returns, one prompt
        c = Conditioning(torch.zeros(1, 4, 8), torch.zeros(1, 4, 3), torch.zeros(1, 8))
        alive.append(weakref.ref(c.txt))
        return c.txt, c.txt_ids, c.vec

    def latents(model, cond, opts, offload, negative=None):
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        return torch.zeros(1, 16, 4, 8)

    class VAE(torch.nn.Module):  # a stand-in the runtime moves and decodes with (stubbed below)
        pass

    import dit360.app.text

    monkeypatch.setattr(dit360.app.text, "load_text_encoders", lambda *a, **k: None)
    monkeypatch.setattr(dit360.app.text, "encode_prompt", encode)
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: torch.nn.Linear(1, 1))
    monkeypatch.setattr(generate, "generate_latents", latents)
    monkeypatch.setattr(generate, "load_vae", lambda *a, **k: VAE())
    monkeypatch.setattr(generate, "decode", lambda vae, z, tile=None: torch.zeros(1, 3, 32, 64))
    opts = SampleOptions(base=str(tiny_flux), lora=None, height=32, width=64, device="cpu")
    jobs = [Job(f"prompt {i}", 0, tmp_path / f"{i}.png") for i in range(count)]
    report = SimpleNamespace(stage=lambda name: nullcontext())  # no gc.collect per stage
    made = sum(1 for _ in generate_many(jobs, opts, lambda m: None, report))
    assert made == count and len(alive) == count
    assert 0 < peak[0] <= min(count, CHUNK), peak[0]


def test_read_only_out_dir_is_named(tiny_flux, tmp_path, capsys, monkeypatch):
    """A batch into a read-only folder names that folder (it named a made-up file x.png)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and access(p, mode))
    argv = batch_flags(tiny_flux, "--prompt", "a", "--num-images", "2", "--out-dir", str(locked))
    line = expect_error(capsys, sample.main, argv, tmp_path, r"--out-dir \S+locked: cannot write")
    assert "x.png" not in line


def test_train_refuses_a_huge_resolution(tiny_flux, data, tmp_path, capsys):
    """--resolution 1000000: one line before anything is written (it left args.json and an empty
    log, so the next run was refused)."""
    argv = train_args(tiny_flux, data, tmp_path / "out", "--resolution", "1000000")
    expect_error(capsys, train.main, argv, tmp_path, r"--height must be a positive multiple")
