"""Training in less GPU memory: a float8 base (LoRA gradients against the float32 base, the
tensor-core path's backward), blocks streamed through forward and backward's recomputation
(bit-identical loss and gradients, blocks off home counted), and the logs (tensorboard and
matplotlib optional, with a clear message when missing)."""

import copy
import json
import sys

import pytest
import test_offload as off
import torch
from test_fp8 import flux
from torch import nn

from dit360 import fp8, offload
from dit360.distributed import recompute_blocks
from dit360.fp8 import quantize_fp8, to_fp8, upcast
from dit360.lora import Adapter, adapters
from dit360.report import plot_losses, summary_writer

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


def lora_grads(model: nn.Module, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss (mean square of the output) of one batch and the LoRA's gradients by name."""
    loss = model(*off.inputs(seed)).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_fp8_base_lora_gradients_within_bound():
    """A float8 base gives every LoRA tensor's gradient within GRAD_BOUND (relative, norm-wise)
    of the float32 base's, and the same loss to a few percent."""
    model = trainable(flux(lora=True))
    loss, want = lora_grads(model)
    loss8, got = lora_grads(quantize_fp8(copy.deepcopy(model)))
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


def test_scaled_mm_path_is_differentiable(monkeypatch):
    """On fp8 tensor cores (forced: the CPU runs rowwise _scaled_mm too) an input that needs a
    gradient goes through ScaledMatmul: the forward is _scaled_mm's, the input's gradient is the
    output gradient times the upcast weight (bf16)."""
    monkeypatch.setattr(fp8, "_fp8_cores", lambda device: True)
    g = torch.Generator().manual_seed(2)
    layer = to_fp8(nn.Linear(64, 48).to(torch.bfloat16))
    x = torch.randn(3, 5, 64, generator=g).bfloat16().requires_grad_(True)
    y = layer(x)
    with torch.no_grad():
        assert torch.equal(y, layer(x))  # the same product without autograd
    dy = torch.randn(y.shape, generator=g).bfloat16()
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy @ upcast(layer.weight, layer.scale, torch.bfloat16))
    # Against autograd through the dequantized weight in float32: the same to bf16 rounding.
    xs = x.detach().float().requires_grad_(True)
    w = layer.weight.float() * layer.scale[:, None]
    (xs @ w.T).backward(dy.float())
    torch.testing.assert_close(x.grad.float(), xs.grad, rtol=2**-7, atol=2**-7)


def streamed_model(ahead: int) -> tuple[nn.Module, list[nn.Module], list[nn.Module]]:
    """The tiny LoRA model parked (the LoRA stays, as FSDP owns it in training) and streamed with
    recompute; its blocks and LoRA adapters."""
    model = trainable(flux(lora=True))
    blocks, lora = off.blocks(model), [m for m in model.modules() if isinstance(m, Adapter)]
    for block in blocks:
        offload.park(block, skip=lora)
    offload.stream_recomputed(blocks, "cpu", ahead=ahead, skip=lora)
    return model, blocks, lora


@pytest.mark.parametrize("ahead", [1, 2])
def test_streamed_training_is_bit_identical_and_holds_few_blocks(ahead):
    """Blocks streamed through forward and backward's recomputation: the loss and LoRA gradients
    equal (bitwise, fp32) those of the resident model with recompute; while a block computes it is
    a copy, at most ahead + 2 blocks are off home, recomputation runs the blocks last to first,
    and after backward every block is home."""
    resident = trainable(flux(lora=True))
    recompute_blocks(off.blocks(resident))
    model, blocks, lora = streamed_model(ahead)
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
        want, got = lora_grads(resident, seed), lora_grads(model, seed)
        assert torch.equal(got[0], want[0])
        assert want[1].keys() == got[1].keys()
        assert all(torch.equal(got[1][n], want[1][n]) for n in want[1])
        n = len(blocks)
        assert [i for i, _ in seen] == [*range(n), *reversed(range(n))]
        print(f"ahead {ahead}: blocks off home {[c for _, c in seen]}")
        assert max(c for _, c in seen) <= ahead + 2
        assert all(at_home(b) for b in blocks)


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


def test_missing_tensorboard_and_matplotlib_say_what_to_install(monkeypatch, tmp_path):
    """Without tensorboard, --log tensorboard is one error naming the pip command; without
    matplotlib, no plot is drawn (train.py says how to get one)."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(
        ValueError, match=r"pip install tensorboard \(or pip install 'dit360\[logs\]'"
    ):
        summary_writer()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(dict(step=s, loss=1 / s)) + "\n" for s in (1, 2, 3)))
    assert not plot_losses(log, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.extras
def test_loss_plot_with_matplotlib(tmp_path):
    """With matplotlib (the logs extra) the loss plot is an 800x400 PNG."""
    from PIL import Image

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(dict(step=s, loss=1 / s)) + "\n" for s in range(1, 9)))
    assert plot_losses(log, tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size == (800, 400)
