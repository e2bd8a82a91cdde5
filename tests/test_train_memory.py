"""Training in less GPU memory: a float8 base (LoRA gradients against the float32 base, the
tensor-core path's backward), blocks streamed through forward and backward's recomputation
(bit-identical loss and gradients, blocks off home counted), and the logs (tensorboard and
matplotlib optional, with a clear message when missing)."""

import copy
import json
import sys

import numpy as np
import pytest
import test_offload as off
import test_train
import torch
from clitest import expect_error
from PIL import Image
from test_fp8 import flux
from test_sample_cli import args as sample_args
from test_train import args, assert_same_lora, log
from torch import nn

import sample
import train
from dit360.app.report import plot_losses, summary_writer
from dit360.core.lora import Adapter, adapters
from dit360.memory import fp8, offload
from dit360.memory.ahead import ahead
from dit360.memory.fp8 import quantize_fp8, to_fp8, upcast
from dit360.train.distributed import recompute_blocks

# e4m3 rounds each weight to 3 mantissa bits: a relative error <= u = 2^-4, about u / sqrt(3) =
# 3.6% rms when the rounding errors spread evenly. A LoRA gradient passes through several of the
# base's products in series (the forward to the loss and back), whose errors add about in
# quadrature: sqrt(n) x 3.6% for n products, 12.5% for the tiny model's longest path (n = 12).
# The bound is twice that, 4 u = 25%: a quarter of a wrong gradient's 100%. Measured: 8% worst,
# 5% median (the printout).
GRAD_BOUND = 4 * 2**-4


def trainable(model: nn.Module) -> nn.Module:
    """The LoRA of `model` trainable, the base frozen."""
    for _, _, ad in adapters(model):
        ad.requires_grad_(True)
    return model


def lora_grads(
    model: nn.Module, seed: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss (mean square of the output) of one batch and the LoRA's gradients by name."""
    x = [t.to(dtype) if t.is_floating_point() else t for t in off.inputs(seed, device)]
    loss = model(*x).float().square().mean()
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("device", off.DEVICES)
def test_fp8_base_lora_gradients_within_bound(device):
    """A float8 base gives every LoRA tensor's gradient within GRAD_BOUND (relative, norm-wise)
    of the float32 base's (CPU: the weight-only path), or of the bf16 base's (CUDA, bf16: the
    tensor cores' path where the GPU has them), and the same loss to a few percent."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = trainable(flux(lora=True).to(device, dtype))
    loss, want = lora_grads(model, 1, device, dtype)
    loss8, got = lora_grads(quantize_fp8(copy.deepcopy(model)), 1, device, dtype)
    errs = {n: ((got[n] - want[n]).norm() / want[n].norm()).item() for n in want}
    worst = max(errs, key=errs.get)
    print(
        f"fp8 vs fp32 base: loss {loss8:.5g} vs {loss:.5g}; LoRA gradients: worst relative error "
        f"{errs[worst]:.3%} ({worst}), median {sorted(errs.values())[len(errs) // 2]:.3%}"
    )
    n_lora = sum(p.numel() > 0 for n, p in model.named_parameters() if ".lora." in n)
    assert len(want) == n_lora and all(g.abs().max() > 0 for g in want.values())
    assert errs[worst] < GRAD_BOUND
    torch.testing.assert_close(loss8, loss, rtol=GRAD_BOUND / 4, atol=0)


@pytest.mark.scaled_mm_cpu
def test_scaled_mm_path_is_differentiable(monkeypatch):
    """On fp8 tensor cores (forced: the CPU runs rowwise _scaled_mm too) an input that needs a
    gradient goes through ScaledMatmul: the forward is _scaled_mm's, the output takes in-place
    adds (a LoRA's), the input's gradient is the output gradient times the upcast weight (bf16)."""
    monkeypatch.setattr(fp8, "_fp8_cores", lambda device: True)
    g = torch.Generator().manual_seed(2)
    layer = to_fp8(nn.Linear(64, 48).to(torch.bfloat16))
    x = torch.randn(3, 5, 64, generator=g).bfloat16().requires_grad_(True)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y, layer(x))  # the same product without autograd
    y[..., :16] += 1  # as a LoRA hook adds its rows: in place on the output (not a Function view)
    dy = torch.randn(y.shape, generator=g).bfloat16()
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy @ upcast(layer.weight, layer.scale, torch.bfloat16))
    # Against autograd through the dequantized weight in float32: the same to bf16 rounding.
    xs = x.detach().float().requires_grad_(True)
    w = layer.weight.float() * layer.scale[:, None]
    (xs @ w.T).backward(dy.float())
    torch.testing.assert_close(x.grad.float(), xs.grad, rtol=2**-7, atol=2**-7)


def streamed_model(
    ahead: int, device: str = "cpu"
) -> tuple[nn.Module, list[nn.Module], list[nn.Module]]:
    """The tiny LoRA model on `device` with its blocks parked (the LoRA stays, as FSDP owns it in
    training) and streamed with recompute; its blocks and LoRA adapters."""
    model = trainable(flux(lora=True).to(device))
    blocks, lora = off.blocks(model), [m for m in model.modules() if isinstance(m, Adapter)]
    for block in blocks:
        offload.park(block, skip=lora)
    offload.stream(blocks, device, ahead=ahead, skip=lora, recompute=True)
    return model, blocks, lora


@pytest.mark.parametrize("device", off.DEVICES)
@pytest.mark.parametrize("ahead", [1, 2])
def test_streamed_training_is_bit_identical_and_holds_few_blocks(ahead, device):
    """Blocks streamed through forward and backward's recomputation: the loss and LoRA gradients
    equal (bitwise, fp32; on CUDA to round-off, as attention's backward may sum in any order)
    those of the resident model with recompute; while a block computes it is a copy, at most
    ahead + 1 blocks are off home, recomputation runs the blocks last to first, and after
    backward only the first block is off home (the next forward starts with it)."""
    resident = trainable(flux(lora=True).to(device))
    recompute_blocks(off.blocks(resident))
    model, blocks, lora = streamed_model(ahead, device)

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        tol = dict(rtol=1e-4, atol=1e-6 * b.abs().max().item())
        return torch.equal(a, b) if device == "cpu" else torch.allclose(a, b, **tol)

    homes = {id(t): t.data_ptr() for b in blocks for t in offload._tensors(b, lora)}

    def at_home(block: nn.Module) -> bool:
        return all(t.data_ptr() == homes[id(t)] for t in offload._tensors(block, lora))

    seen = []  # (block, blocks off home) at each block's first linear, forward and recompute

    def count(i: int) -> None:
        assert not at_home(blocks[i])
        seen.append((i, sum(not at_home(b) for b in blocks)))

    for i, block in enumerate(blocks):
        first = block.img_attn.qkv if hasattr(block, "img_attn") else block.linear1
        first.register_forward_pre_hook(lambda m, a, i=i: count(i))
    for seed in (1, 2):  # twice: the second step starts with the state the first left
        seen.clear()
        want, got = lora_grads(resident, seed, device), lora_grads(model, seed, device)
        assert same(got[0], want[0])
        assert want[1].keys() == got[1].keys()
        assert all(same(got[1][n], want[1][n]) for n in want[1])
        n = len(blocks)
        assert [i for i, _ in seen] == [*range(n), *reversed(range(n))]
        print(f"ahead {ahead}: blocks off home {[c for _, c in seen]}")
        assert max(c for _, c in seen) == ahead + 1
        assert [at_home(b) for b in blocks] == [False] + [True] * (n - 1)


def test_streamed_preview_without_grad_leaves_all_home():
    """Without gradients (a preview), a streamed forward equals the resident one and drops the
    last block too."""
    resident = flux(lora=True)
    model, blocks, lora = streamed_model(1)
    tensors, x = [t for b in blocks for t in offload._tensors(b, lora)], off.inputs(3)
    with torch.no_grad():
        assert torch.equal(model(*x), resident(*x))
    home = [getattr(t, offload.HOME) for b in blocks for t in offload._tensors(b, lora)]
    assert all(t.data_ptr() == h.data_ptr() for t, h in zip(tensors, home, strict=True))


def test_missing_tensorboard_and_matplotlib_say_what_to_install(
    tiny_flux, data, monkeypatch, tmp_path, capsys
):
    """Without tensorboard, train.py --log tensorboard is one error naming the pip command, before
    anything is written; without matplotlib, no plot is drawn (train.py says how to get one)."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ValueError, match=r"pip install tensorboard \(or pip install 'dit360"):
        summary_writer()
    argv = args(tiny_flux, data, tmp_path / "out", "--log", "tensorboard")
    expect_error(capsys, train.main, argv, tmp_path, r"--log tensorboard needs tensorboard: pip")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rows = tmp_path / "log.jsonl"
    rows.write_text("".join(json.dumps(dict(step=s, loss=1 / s)) + "\n" for s in (1, 2, 3)))
    assert not plot_losses(rows, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.extras
def test_loss_plot_with_matplotlib(tmp_path):
    """With matplotlib (the logs extra) the loss plot is an 800x400 PNG."""
    rows = tmp_path / "log.jsonl"
    rows.write_text("".join(json.dumps(dict(step=s, loss=1 / s)) + "\n" for s in range(1, 9)))
    assert plot_losses(rows, tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size == (800, 400)


@pytest.mark.extras
def test_tensorboard_events_and_loss_plot_of_a_run(tiny_flux, tmp_path, data):
    """With the logs extra, train.py --log tensorboard writes event files that tensorboard reads
    back with log.jsonl's loss at every step, and the run ends with its 800x400 loss.png."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    train.main(args(tiny_flux, data, out, *SHORT, "--log", "tensorboard"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    board = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert board == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in log(out)]
    assert len(board) == 2 and Image.open(out / "loss.png").size == (800, 400)


# --- train.py end to end ------------------------------------------------------------------------

data, trained, one_thread = test_train.data, test_train.trained, test_train.one_thread
SHORT = ("--max-steps", "2", "--grad-accum", "2", "--lr", "1e-3", "--aux-epochs", "0:")


def test_streamed_run_equals_resident_run(tiny_flux, data, tmp_path, monkeypatch):
    """train.py --offload blocks: the same losses, LoRA and step-2 preview, bit for bit (fp32), as
    the base on the device (FSDP-sharded: the preview gathers it); both read one --cache-dir.
    Streaming computes the modulations ahead, once a micro-batch (their weights wait home)."""
    cache, outs, calls = str(tmp_path / "cache"), {}, []
    monkeypatch.setattr(train, "ahead", lambda *a: calls.append(1) or ahead(*a))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lake at dawn\n")
    previews = ("--sample-every", "2", "--sample-prompts", str(prompts), "--sample-steps", "2")
    for mode in ("none", "blocks"):
        outs[mode] = tmp_path / mode
        a = (*SHORT, *previews, "--offload", mode, "--cache-dir", cache)
        train.main(args(tiny_flux, data, outs[mode], *a))
    assert len(calls) == 2 * 2  # steps x micro-batches, in the streamed run only
    assert [r["loss"] for r in log(outs["blocks"])] == [r["loss"] for r in log(outs["none"])]
    assert_same_lora(outs["blocks"], outs["none"])
    a, b = (
        np.asarray(Image.open(o / "samples" / "step-00000002" / "00.png")) for o in outs.values()
    )
    assert np.array_equal(a, b) and a.shape == (32, 64, 3)


def test_fp8_base_overfits(tiny_flux, data, tmp_path):
    """train.py --base-dtype fp8 (the cache by default) reduces the loss on 2 panoramas."""
    out = tmp_path / "fp8"
    a = ("--base-dtype", "fp8", "--pano", str(data / "pano2.jsonl"), "--batch-size", "2")
    a += ("--grad-accum", "1", "--lr", "1e-2", "--warmup", "0", "--dropout", "0")
    a += ("--lora-rank", "8", "--alpha", "8", "--max-steps", "16", "--aux-epochs", "99:")
    train.main(args(tiny_flux, data, out, *a))
    losses = [r["loss"] for r in log(out)]
    print(f"fp8 overfit: first 4 mean {np.mean(losses[:4]):.3f}, last 4 {np.mean(losses[-4:]):.3f}")
    assert (out / "cache").is_dir()
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])


class FakeWriter:
    """tensorboard's SummaryWriter as train.py uses it: records the scalars."""

    scalars: list = []

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        FakeWriter.scalars.append((tag, step))

    def close(self) -> None:
        pass


def test_all_new_options_resume_bit_identical_and_previews_equal_sample(
    tiny_flux, data, tmp_path, monkeypatch
):
    """fp8 base, streamed blocks, previews every 2 steps and tensorboard at once: killed after the
    step-2 checkpoint and resumed, the same LoRA, losses and previews as a run never stopped; the
    step-2 preview is `sample.py --lora` on the step-2 LoRA, pixel for pixel."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lake at dawn\n\na city at night\n")
    opts = ("--base-dtype", "fp8", "--offload", "blocks", "--log", "tensorboard")
    opts += ("--sample-every", "2", "--sample-prompts", str(prompts), "--sample-steps", "2")
    run = (*SHORT[:1], "4", *SHORT[2:], "--save-every", "2", "--keep", "0", *opts)
    monkeypatch.setattr(train, "summary_writer", lambda: FakeWriter)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train.main(args(tiny_flux, data, whole, *run))
    assert sorted(set(FakeWriter.scalars))[:2] == [("train/cube", 1), ("train/cube", 2)]
    save = train.save_checkpoint

    def save_then_die(*a, **kw):
        path = save(*a, **kw)
        if path.name == "step-00000002":
            raise KeyboardInterrupt  # as if killed right after the checkpoint
        return path

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(tiny_flux, data, killed, *run))
    monkeypatch.setattr(train, "save_checkpoint", save)
    train.main(args(tiny_flux, data, killed, *run, "--resume"))
    assert [r["loss"] for r in log(killed)] == [r["loss"] for r in log(whole)]
    assert_same_lora(killed, whole)
    for step in ("step-00000002", "step-00000004"):
        for name in ("00.png", "01.png"):
            a, b = (np.asarray(Image.open(o / "samples" / step / name)) for o in (whole, killed))
            assert np.array_equal(a, b)

    png = tmp_path / "sampled.png"
    lora = str(whole / "checkpoints" / "step-00000002" / "lora")
    argv = sample_args(tiny_flux, png, "--prompt", "a city at night", "--seed", "3", lora=lora)
    argv += ["--steps", "2", "--fp8", "--no-merge-lora"]  # the last of a repeated flag wins
    with pytest.warns(UserWarning, match="trained at 1024x2048"):
        sample.main(argv)
    preview = np.asarray(Image.open(whole / "samples" / "step-00000002" / "01.png"))
    sampled = np.asarray(Image.open(png))
    print(
        f"preview vs sample.py: max pixel difference {np.abs(preview.astype(int) - sampled).max()}"
    )
    assert np.array_equal(preview, sampled)


def test_fp8_and_streaming_refused_on_several_ranks(tiny_flux, data, tmp_path, monkeypatch, capsys):
    """--base-dtype fp8 or --offload blocks on a world of 2 (faked): one error saying why."""
    monkeypatch.setattr(train.distributed, "init", lambda device: (0, 2))
    for flag in (("--base-dtype", "fp8"), ("--offload", "blocks")):
        argv = args(tiny_flux, data, tmp_path / "out", *flag)
        expect_error(capsys, train.main, argv, tmp_path, r"are for one process: on several, FSDP")


def test_backward_never_reads_a_dropped_block(monkeypatch):
    """Home copies poisoned with NaN, the 'device' copies made from clean ones: on the CPU this
    tells the two apart as a GPU would (a tensor autograd saved must still be the device copy when
    backward uses it, not the home a drop put back). Loss and gradients stay those of the
    resident model."""
    resident = trainable(flux(lora=True))
    recompute_blocks(off.blocks(resident))
    model, blocks, lora = streamed_model(1)
    clean = {}
    for b in blocks:
        for t in offload._tensors(b, lora):
            clean[id(t)] = getattr(t, offload.HOME).clone()
            getattr(t, offload.HOME).fill_(float("nan"))  # t.data is its home: NaN too

    def fetch(self: offload._Streamer, i: int) -> None:
        for t in self.tensors[i]:
            t.data = clean[id(t)].clone()
        self.ready[i] = None

    monkeypatch.setattr(offload._Streamer, "fetch", fetch)
    for seed in (1, 2):
        want, got = lora_grads(resident, seed), lora_grads(model, seed)
        assert torch.equal(got[0], want[0])
        assert all(torch.equal(got[1][n], want[1][n]) for n in want[1])
