"""train.py end to end on the tiny FLUX.1-dev folder (CPU, gloo): 1 vs 2 processes, masks,
resume after a kill, export to sample.py and diffusers, the latent/text cache, input errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clitest import expect_error
from PIL import Image
from safetensors.torch import load_file
from test_lora import pipeline
from test_model import inputs, rel_err, run_diffusers, run_ours
from test_sample_cli import args as sample_args

import sample
import train
from dit360.app.report import has_matplotlib
from dit360.load.lora_formats import load_lora
from dit360.load.weights import load_flux
from dit360.train import checkpoints
from dit360.train.checkpoints import STATE
from dit360.train.data import Source, epoch_order

ROOT = Path(__file__).parents[1]
H = 32  # training height: 32 x 64 pixels = 2 x 4 tokens (2 x 6 with the wrap)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as torchrun gives each process: fast on 2 shared cores, and the
    same reduction order in the 1- and 2-process runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_rgb(path: Path, seed: int) -> str:
    """A random 32x64 RGB PNG; returns its file name."""
    rgb = np.random.default_rng(seed).integers(0, 256, (H, 2 * H, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path.name


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """4 panoramas (also the first 2 alone); 2 perspective rows with a half mask; 2 files of one
    perspective row with an all-black mask, different images."""
    root = tmp_path_factory.mktemp("data")
    words = ["lake", "forest", "city", "beach"]
    panos = [
        {"image": write_rgb(root / f"p{i}.png", i), "caption": f"a panorama of a {w}"}
        for i, w in enumerate(words)
    ]
    write_rows(root / "pano.jsonl", panos)
    write_rows(root / "pano2.jsonl", panos[:2])
    half = np.zeros((H, 2 * H), np.uint8)
    half[:, H // 2 : 3 * H // 2] = 255
    Image.fromarray(half, "L").save(root / "half.png")
    Image.fromarray(np.zeros_like(half), "L").save(root / "black.png")
    persp = [dict(image=write_rgb(root / f"q{i}.png", 10 + i), mask="half.png") for i in range(2)]
    write_rows(root / "persp.jsonl", [{**r, "caption": "a photo of a room"} for r in persp])
    for i in range(2):
        row = {
            "image": write_rgb(root / f"b{i}.png", 20 + i),
            "caption": "a room",
            "mask": "black.png",
        }
        write_rows(root / f"black{i}.jsonl", [row])
    return root


def args(tiny_flux: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """train.py arguments for the tiny model and data."""
    return [
        *("--base", str(tiny_flux), "--pano", str(data / "pano.jsonl"), "--out", str(out)),
        *("--height", str(H), "--lora-rank", "4", "--alpha", "8", "--workers", "0"),
        *("--device", "cpu", "--seed", "3", *extra),
    ]


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def first_moments(checkpoint: Path) -> torch.Tensor:
    """A checkpoint's AdamW first moments (exp_avg), flat, in name order."""
    state = load_file(checkpoint / STATE)
    return torch.cat([state[k].flatten() for k in sorted(state) if k.endswith("/exp_avg")])


def lora_file(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "lora" / "adapter_model.safetensors")


def assert_same_lora(a: Path, b: Path) -> None:
    """Bit-identical exported LoRAs."""
    x, y = lora_file(a), lora_file(b)
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x)


# A run long enough to cross epochs (4 panoramas, 2 per step: 2 steps an epoch), with gradient
# accumulation, LoRA dropout, yaw and cube losses from epoch 1 and checkpoints every 2 steps; the
# circular VAE encoder (not the recipe's), so that the cache's rolled latents are exact.
RUN = ("--max-steps", "6", "--batch-size", "1", "--grad-accum", "2", "--lr", "1e-3")
RUN += ("--aux-epochs", "1:", "--save-every", "2", "--keep", "0", "--circular-encoder")


@pytest.fixture(scope="module")
def trained(tiny_flux, data, tmp_path_factory) -> Path:
    """An uninterrupted 6-step single-process run."""
    out = tmp_path_factory.mktemp("trained")
    train.main(args(tiny_flux, data, out, *RUN))
    return out


def test_run_writes_everything(trained):
    """Checkpoints, the LoRA, a log line per step with all components, the loss curve."""
    steps = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert steps == ["step-00000002", "step-00000004", "step-00000006"]
    assert all(
        (trained / "checkpoints" / s / "lora" / "adapter_config.json").is_file() for s in steps
    )
    rows = log(trained)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1, 2, 2]
    assert rows[0]["yaw"] == rows[0]["cube"] == 0 and rows[-1]["yaw"] > 0 and rows[-1]["cube"] > 0
    assert all(r["lr"] == 1e-3 for r in rows)  # warm-up: int(0.05 * 6) = 0 steps
    assert (trained / "loss.png").is_file() == has_matplotlib()  # optional: test_train_memory
    assert any(v.abs().max() > 0 for k, v in lora_file(trained).items() if "lora_B" in k)


def test_args_height_is_resolution_and_the_line_says_the_real_dtype(
    tiny_flux, data, tmp_path, capsys
):
    """--height (the other commands' name) and --resolution are one flag stored as "resolution"
    (so an older args.json resumes); on the CPU the line says the base runs in float32, not bf16."""
    out = tmp_path / "o"
    old = train.parse_args(args(tiny_flux, data, out, "--resolution", str(2 * H)))
    assert old.resolution == 2 * H
    train.main(args(tiny_flux, data, out, "--max-steps", "1", "--batch-size", "1"))
    assert json.loads((out / "args.json").read_text())["resolution"] == H
    line = next(x for x in capsys.readouterr().out.splitlines() if "writing to" in x)
    assert "base float32" in line and "bf16" not in line


# --- 1 vs 2 processes --------------------------------------------------------------------------


def test_two_processes_equal_one_and_overfit(tiny_flux, data, tmp_path):
    """torchrun, 2 ranks x batch 1 = 1 rank x batch 2 (FSDP sums the ranks' gradients; recompute
    off in one): the same step-1 loss and gradients; and the loss falls over 30 steps. A 2-rank
    resume is bit-identical; a 2-rank checkpoint resumes on 1 rank."""
    common = ("--grad-accum", "1", "--lr", "1e-2", "--warmup", "0", "--lora-rank", "8")
    common += ("--alpha", "8", "--dropout", "0", "--aux-epochs", "0:")  # yaw, cube from step 1
    one, two, again = tmp_path / "one", tmp_path / "two", tmp_path / "again"
    one_args = (*common, "--batch-size", "2", "--max-steps", "1", "--no-recompute")  # same numbers
    train.main(args(tiny_flux, data, one, *one_args))

    def torchrun(out: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", "2", "train.py", *args(tiny_flux, data, out, *common)]
        cmd += ["--batch-size", "1", "--max-steps", "30", *extra]
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]

    torchrun(two, "--save-every", "1", "--keep", "0")

    loss1, loss2 = log(one)[0]["loss"], log(two)[0]["loss"]
    # After one AdamW step exp_avg = (1 - beta1) * gradient, exactly as rounded in both runs.
    ga = first_moments(one / "checkpoints" / "step-00000001") / 0.1
    gb = first_moments(two / "checkpoints" / "step-00000001") / 0.1
    print(f"1 vs 2 processes: loss {loss1} vs {loss2}; max grad diff {(ga - gb).abs().max():.2e}")
    assert abs(loss1 - loss2) <= 1e-6 * abs(loss1)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-5 * ga.abs().max().item())
    assert ga.abs().max() > 0

    losses = [r["loss"] for r in log(two)]
    assert len(losses) == 30
    print(
        f"overfit: first 8 mean {np.mean(losses[:8]):.3f}, last 8 mean {np.mean(losses[-8:]):.3f}"
    )
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])

    # On 2 ranks, each rank takes its shards of the full state: steps 29-30 again, the same,
    # with a preview at each (rank 0 draws it: a sampling of 2 steps on FSDP-sharded weights).
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lake\n")
    preview = ("--sample-every", "1", "--sample-prompts", str(prompts), "--sample-steps", "2")
    torchrun(again, "--resume", str(two / "checkpoints" / "step-00000028"), *preview)
    assert_same_lora(again, two)
    assert sorted(p.parent.name for p in (again / "samples").rglob("*.png")) == [
        "step-00000029",
        "step-00000030",
    ]

    # The 2-rank checkpoint resumes on 1 rank (each rank takes its shards of the full state;
    # batch 2 covers the same samples).
    train.main(
        args(tiny_flux, data, two, *common, "--batch-size", "2", "--max-steps", "31", "--resume")
    )
    assert [r["step"] for r in log(two)] == list(range(1, 32))


# --- masks ----------------------------------------------------------------------------------------


def test_black_mask_row_contributes_nothing(tiny_flux, data, tmp_path):
    """A perspective row whose mask is all black adds no loss and no gradient: another image
    under the same mask leaves the whole run bit-identical."""
    # 2 panoramas in epochs 0-1, + the perspective row in epoch 2: one step an epoch.
    assert ("persp", 0) in epoch_order(Source([None] * 2, [None], 0, seed=3), 2)
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        a = args(tiny_flux, data, out, "--epochs", "3", "--batch-size", "1", "--grad-accum", "3")
        a += ["--pano", str(data / "pano2.jsonl"), "--persp", str(data / f"black{i}.jsonl")]
        train.main([*a, "--lr", "1e-2"])
        outs.append(out)
    assert [r["epoch"] for r in log(outs[0])] == [0, 1, 2]
    assert log(outs[0])[-1]["loss"] == log(outs[1])[-1]["loss"]
    assert_same_lora(*outs)


# --- resume ---------------------------------------------------------------------------------------


def test_resume_after_kill_is_bit_identical(tiny_flux, data, tmp_path, monkeypatch, trained):
    """Killed after the step-4 checkpoint, resumed: the same LoRA at step 6 as without the kill."""
    out = tmp_path / "killed"
    save = train.save_checkpoint

    def save_then_die(*a, **kw):
        path = save(*a, **kw)
        if path.name == "step-00000004":
            raise KeyboardInterrupt  # as if killed right after the checkpoint
        return path

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(tiny_flux, data, out, *RUN))
    monkeypatch.undo()
    assert [r["step"] for r in log(out)] == [1, 2, 3, 4]
    train.main(args(tiny_flux, data, out, *RUN, "--resume"))
    assert [r["loss"] for r in log(out)] == [r["loss"] for r in log(trained)]
    assert_same_lora(out, trained)


def test_kill_while_writing_a_checkpoint(tiny_flux, data, tmp_path, monkeypatch, trained):
    """The step-4 checkpoint is cut off mid-write: step 2 stays the latest complete one, the torn
    one is not left, and resuming from step 2 reaches the same LoRA as the uninterrupted run."""
    out = tmp_path / "torn"
    write = checkpoints.write_safetensors

    def torn_write(path, specs, tensors, metadata):
        write(path, specs, tensors, metadata)
        if json.loads(metadata["counters"])["step"] == 4:  # half the file, then the "kill"
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "write_safetensors", torn_write)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(tiny_flux, data, out, *RUN))
    monkeypatch.undo()
    assert sorted(train.steps(out / "checkpoints")) == [2]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    train.main(args(tiny_flux, data, out, *RUN, "--resume"))
    assert_same_lora(out, trained)


# --- export ---------------------------------------------------------------------------------------


def test_export_loads_in_sample_and_diffusers(tiny_flux, trained, tmp_path):
    """The trained LoRA: sample.py --lora runs with it; diffusers' load_lora_weights gives the
    same transformer output as ours with it."""
    from diffusers import FluxTransformer2DModel

    png = tmp_path / "pano.png"
    argv = sample_args(
        tiny_flux, png, "--prompt", "a lake", "--steps", "2", lora=str(trained / "lora")
    )
    with pytest.warns(UserWarning, match="trained at 1024x2048"):
        sample.main(argv)
    assert Image.open(png).size == (64, 32)
    x = inputs()
    ours = load_lora(load_flux(tiny_flux, dtype=torch.float32), trained / "lora")
    with torch.no_grad():
        expected = run_ours(ours, x)
    reference = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    pipeline(reference).load_lora_weights(str(trained / "lora"))
    reference.eval()  # the LoRA dropout layers diffusers just added
    err = rel_err(run_diffusers(reference, x), expected)
    with torch.no_grad():
        base = run_ours(load_flux(tiny_flux, dtype=torch.float32), x)
    effect = rel_err(base, expected)
    print(f"diffusers vs ours with the trained LoRA: {err:.2e} (the LoRA changes it {effect:.2e})")
    assert err < 1e-5 and effect > 1e-4


# --- cache ----------------------------------------------------------------------------------------


def test_cache_gives_the_uncached_losses(tiny_flux, data, tmp_path, trained):
    """--cache-dir: the same losses as encoding on the fly, to float32 round-off (the cached
    posterior is of the unrolled image, rolled; T5 runs on one caption instead of a batch)."""
    out = tmp_path / "cached"
    train.main(args(tiny_flux, data, out, *RUN, "--cache-dir", str(tmp_path / "cache")))
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 4
    a = torch.tensor([r["loss"] for r in log(trained)])
    b = torch.tensor([r["loss"] for r in log(out)])
    print(f"cached vs uncached losses: max rel diff {((a - b).abs() / a.abs()).max():.2e}")
    torch.testing.assert_close(b, a, rtol=1e-4, atol=0)


# --- errors ---------------------------------------------------------------------------------------


def test_input_errors(tiny_flux, data, tmp_path, capsys):
    """Bad rows are all named; a missing base and a bad resolution are one clear line each."""
    bad = write_rows(
        tmp_path / "bad.jsonl",
        [{"image": "p0.png", "caption": ""}, {"image": "sub/nope.png", "caption": "x"}],
    )
    (tmp_path / "p0.png").write_bytes((data / "p0.png").read_bytes())
    with pytest.raises(SystemExit):
        train.main(args(tiny_flux, data, tmp_path / "o", "--pano", str(bad)))
    err = capsys.readouterr().err
    assert re.search(r"error: 2 bad rows:\n.*bad.jsonl:1.*\n.*bad.jsonl:2.*missing file ", err)
    # the file as read, from the jsonl's folder (the bare name before: not the path to fix)
    assert Path(re.search(r"missing file (\S+)$", err, re.M)[1]) == tmp_path / "sub" / "nope.png"
    no_base = args(tiny_flux, data, tmp_path / "o", "--base", str(tmp_path / "no-such-base"))
    expect_error(capsys, train.main, no_base, tmp_path, "no-such-base: no such file or folder")
    resolution = args(tiny_flux, data, tmp_path / "o", "--resolution", "40")
    expect_error(capsys, train.main, resolution, tmp_path, "multiple of 16")
    assert not (tmp_path / "o").exists()


def test_component_files_train_the_same(tiny_flux, data, tmp_path, trained):
    """--transformer as convert_weights.py's BFL file and --vae as a BFL ae.safetensors (no
    config) train exactly as the FLUX.1-dev folder does."""
    from safetensors.torch import save_file

    from dit360.load.convert import convert_flux
    from dit360.load.weights import load_autoencoder

    bfl = convert_flux(tiny_flux, tmp_path / "flux1-dev.safetensors")
    save_file(load_autoencoder(tiny_flux).state_dict(), tmp_path / "ae.safetensors")
    parts = ("--transformer", str(bfl), "--vae", str(tmp_path / "ae.safetensors"))
    train.main(args(tiny_flux, data, tmp_path / "parts", *RUN, *parts))
    assert [r["loss"] for r in log(tmp_path / "parts")] == [r["loss"] for r in log(trained)]
    assert_same_lora(tmp_path / "parts", trained)
