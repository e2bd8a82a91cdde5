"""--fp8: float8 (e4m3) block weights with per-channel scales. Round-trip bound, a tiny model's
forward against float32, the rowwise torch._scaled_mm path (the CPU runs it too), LoRA hooks on an
fp8 linear, offloading, `generate` end to end, and loading float8-stored checkpoints."""

import copy

import pytest
import test_offload as off
import torch
from test_memory import decoded
from tiny import randomize
from torch import nn

from dit360.core.lora import adapters, inject
from dit360.core.model import Flux
from dit360.load.files import write_safetensors
from dit360.load.lora_formats import set_scale, target_rows
from dit360.load.weights import load_flux
from dit360.memory import fp8
from dit360.memory.ahead import modulation_layers
from dit360.memory.fp8 import FP8, FP8Linear, fp8_linear, quantize, quantize_fp8, to_fp8
from dit360.memory.offload import lent, park, stream

ULP_BOUND = 2**-4  # e4m3 keeps 3 mantissa bits: round to nearest errs by at most half an ulp


def flux(lora: bool = False, seed: int = 0) -> Flux:
    """The tiny FLUX of test_offload, weights std 1/sqrt(fan_in) (activations keep their scale),
    norms 1, biases small; with a random unmerged LoRA if asked."""
    model = Flux(off.PARAMS)
    model = inject(model, target_rows(model), rank=4, alpha=4, dropout=0.0) if lora else model
    randomize(model, seed)  # the LoRA's B too: not a no-op
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ".lora." not in name:
                p.mul_(p.shape[1] ** -0.5 / 0.2)
            elif name.endswith("scale"):
                p.fill_(1.0)
    return model.eval().requires_grad_(False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_round_trip_bound_per_channel():
    """Each element comes back within max(2^-4 |w|, 2^-10 s) of itself, s = absmax/448 its row's
    scale. Why: w/s lies in [-448, 448]; e4m3 writes a normal value (|v| >= 2^-6) as 2^e (1 + m/8),
    so its ulp is 2^(e-3) <= |v|/8 and rounding to nearest errs by <= 2^-4 |v|; below 2^-6 the
    subnormal ulp is 2^-9, an error <= 2^-10. Times s: <= 2^-4 |w|, or <= 2^-10 s. (The float32
    division w/s adds ~2^-24 relative: the 1e-6 slack.)"""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=g) * torch.logspace(-6, 3, 64)[:, None]  # 9 decades of rows
    w[3], w[5, :10] = 0.0, 1e-9  # an all-zero row; a few values far below their row's absmax
    q, s = quantize(w)
    assert q.dtype == FP8 and s.shape == (64, 1) and q.float().abs().max() <= 448
    back, w64 = q.double() * s.double(), w.double()
    bound = torch.maximum(ULP_BOUND * w64.abs(), 2**-10 * s.double()) + 1e-6 * w64.abs()
    assert ((back - w64).abs() <= bound).all()
    assert torch.equal(q[3].float(), torch.zeros(300))  # zero row: finite scale, zeros back
    assert (back - w64).abs().max() > 0  # it did round


def test_forward_close_to_float32():
    """The tiny model with fp8 blocks is within 2^-4 (relative) of float32, and not equal. Why
    2^-4, one weight's worst-case error: a rounding error is about uniform within its bound (half
    an ulp, 2^-5 to 2^-4 of the value), rms ~2^-4.5/sqrt(3) ~ 2.6 %, and independent from weight
    to weight, so a layer's output errs by about that; the blocks add their outputs to the
    residual stream, so the errors do not compound. Measured 0.013-0.018 here (three seeds), 0.04
    on the medium model (benchmarks/fp8.py); a wrong or missing scale errs by ~1."""
    model, xs = flux(), off.inputs(0)
    q = quantize_fp8(copy.deepcopy(model))
    kinds = {type(m) for b in [*q.double_blocks, *q.single_blocks] for m in b.modules()}
    assert FP8Linear in kinds
    assert all(type(m.lin) is nn.Linear for m in modulation_layers(q)[:-1])  # not quantized
    assert type(q.img_in) is type(q.final_layer.linear) is nn.Linear
    with torch.no_grad():
        ref, got = model(*xs), q(*xs)
    assert 0 < rel(got, ref) < ULP_BOUND
    layers = [m for m in q.modules() if isinstance(m, FP8Linear)]
    assert len(layers) == 4 * 2 * 2 + 2 * 3  # qkv, proj, mlp.0, mlp.2 per stream; linear1, 2
    assert all(m.weight.element_size() == 1 and m.scale.dtype == torch.float32 for m in layers)


@pytest.mark.scaled_mm_cpu
@pytest.mark.parametrize("fast", [True, False])
def test_scaled_mm_path_matches_its_emulation(monkeypatch, fast):
    """The fp8 tensor-core path (forced here: the CPU runs rowwise torch._scaled_mm too, from
    torch 2.12) equals per-token-quantized x times the dequantized weight, to bf16 output
    rounding, with fast accumulation (the default) and precise; it hands _scaled_mm the layouts
    CUDA requires (a row-major, b column-major) and fp8.FAST_ACCUM."""
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    x = (torch.randn(2, 5, 64, generator=g) * torch.logspace(-2, 2, 5)[:, None]).bfloat16()
    layer, seen = to_fp8(lin), {}
    scaled_mm = torch._scaled_mm

    def spy(a, b, *args, **kw):
        seen.update(a=a.stride(), b=b.stride(), out=kw["out_dtype"], fast=kw["use_fast_accum"])
        return scaled_mm(a, b, *args, **kw)

    assert fp8.FAST_ACCUM  # the default
    monkeypatch.setattr(fp8, "FAST_ACCUM", fast)
    monkeypatch.setattr(fp8, "_fp8_cores", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    got = layer(x)
    assert seen == dict(a=(64, 1), b=(1, 64), out=torch.bfloat16, fast=fast)
    assert got.shape == (2, 5, 48)
    xq, xs = quantize(x.reshape(-1, 64))
    w = layer.weight.float() * layer.scale[:, None]
    expected = (xq.float() * xs) @ w.T + layer.bias.float()  # (10, 48)
    torch.testing.assert_close(got.float().reshape(10, 48), expected, rtol=2**-7, atol=1e-2)


def test_weight_only_path():
    """Off fp8 GPUs: weight upcast to the activation dtype times its scale, then F.linear."""
    lin = nn.Linear(32, 16)
    layer, x = to_fp8(lin), torch.randn(3, 32)
    w = layer.weight.float() * layer.scale[:, None]
    torch.testing.assert_close(fp8_linear(x, layer.weight, layer.scale, None), x @ w.T)
    torch.testing.assert_close(layer(x), x @ w.T + lin.bias)


def test_unmerged_lora_hooks_act_on_fp8_linear():
    """An unmerged LoRA stays a side path in the model dtype: its hook moves to the fp8 layer and
    adds B @ A x to its output; scaling the LoRA to 0 unhooks it there."""
    model = flux(lora=True)
    q = quantize_fp8(copy.deepcopy(model))
    layer = q.double_blocks[0].img_attn.qkv
    assert isinstance(layer, FP8Linear) and layer.lora["default"].A.dtype == torch.float32
    x = torch.randn(2, 7, layer.in_features)
    delta = torch.zeros(2, 7, layer.out_features)
    layer.lora["default"].add_(x, delta)
    assert delta.abs().max() > 0
    torch.testing.assert_close(
        layer(x), fp8_linear(x, layer.weight, layer.scale, layer.bias) + delta
    )
    assert len(list(adapters(q))) == len(list(adapters(model)))
    xs = off.inputs(2)
    with torch.no_grad():
        ref, with_lora = model(*xs), q(*xs)
        assert rel(with_lora, ref) < ULP_BOUND
        without = set_scale(q, 0.0)(*xs)
    assert not layer._forward_hooks and rel(without, with_lora) > 3 * rel(with_lora, ref)


def test_lora_after_fp8_is_refused():
    """A LoRA cannot be merged into, or added onto, float8 weights (their rows carry scales): both
    fail with the fix (load the LoRA before quantizing) instead of corrupting the weights."""
    from dit360.core.lora import Part, add_adapter, fold_

    layer = to_fp8(nn.Linear(8, 4))
    part = Part(0, 4, torch.ones(2, 8), torch.ones(4, 2), 1.0)
    with pytest.raises(ValueError, match="before --fp8"):
        fold_(layer.weight.data, [part], 1.0)
    with pytest.raises(ValueError, match="before --fp8"):
        add_adapter(layer, "late", [(0, 4, 2, 1.0)])


def test_offload_blocks_equals_fp8_alone():
    """fp8 parked, lent and its blocks streamed gives the same output, bit for bit; the streamed
    homes hold the float8 weights (half of bf16's bytes) and their scales."""
    q, xs = quantize_fp8(flux(lora=True)), off.inputs(3)
    with torch.no_grad():
        expected = q(*xs)
        park(q)
        stop = stream(off.blocks(q), "cpu", ahead=1)
        try:
            with lent(q, "cpu"):
                got = q(*xs)
        finally:
            stop()
    assert torch.equal(got, expected)
    qkv = q.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == FP8 and hasattr(qkv.weight, "_offload_home")
    assert hasattr(qkv.scale, "_offload_home")


@pytest.mark.parametrize("lora", ["merged", "adapters"])
def test_generate_fp8(tiny_flux, tmp_path, monkeypatch, lora):
    """`generate --fp8` runs end to end (LoRA merged before quantizing, or adapters beside it),
    close to the image without it, and offload blocks decodes the same image as none."""
    from test_lora import dit360_lora

    from dit360.app import generate as gen
    from dit360.app.options import SampleOptions

    seen, quantized = decoded(monkeypatch, gen), []
    monkeypatch.setattr(gen, "quantize_fp8", lambda m, d: quantized.append(m) or quantize_fp8(m, d))
    folder = str(dit360_lora(tmp_path / "lora", r=4, alpha=4)[0])
    base = dict(base=tiny_flux, lora=folder, merge_lora=lora == "merged", height=32, width=64)
    runs = ((False, "none", False), (True, "none", False), (True, "blocks", False))
    for on, mode, t5 in runs + ((True, "blocks", True),) * (lora == "merged"):
        with pytest.warns(UserWarning, match="trained at 1024x2048"):
            o = SampleOptions(
                **base, steps=2, device="cpu", dtype="fp32", fp8=on, offload=mode, t5_fp8=t5
            )
        image, _ = gen.generate("a lake at sunset", o, log=lambda _: None)
        assert image.size == (64, 32)
    assert len(quantized) == len(seen) - 1
    layer = quantized[0].single_blocks[0].linear1
    assert isinstance(layer, FP8Linear) and bool(layer._forward_hooks) == (lora == "adapters")
    assert torch.equal(seen[1], seen[2])
    assert 0 < rel(seen[1], seen[0]) < ULP_BOUND
    if lora == "merged":  # --t5-fp8 too: T5's rounding moves the latents a little more
        assert 0 < rel(seen[3], seen[2]) < ULP_BOUND, rel(seen[3], seen[2])  # measured 3e-3


def test_load_float8_checkpoint(tmp_path):
    """A float8_e4m3fn file without scales (ComfyUI's flux1-dev-fp8 layout: BFL names behind
    `model.diffusion_model.`) loads upcast to the asked dtype, scale 1; dtype None gives bf16."""
    model, prefix = randomize(Flux(off.PARAMS), 0), "model.diffusion_model."
    state = {prefix + k: v.to(FP8) for k, v in model.state_dict().items()}
    path = tmp_path / "flux1-dev-fp8.safetensors"
    write_safetensors(path, {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}, state.items())
    for dtype, expected in ((torch.float32, torch.float32), (None, torch.bfloat16)):
        got = load_flux(path, "cpu", dtype, axes_dim=off.PARAMS.axes_dim).state_dict()
        assert {v.dtype for v in got.values()} == {expected}
        for k, v in state.items():
            assert torch.equal(got[k.removeprefix(prefix)], v.to(expected))


def test_quantize_on_device_block_by_block(monkeypatch):
    """--fp8 reads the transformer into CPU memory and quantizes it block by block on the device:
    each block is moved there (but its modulation, computed ahead in CPU memory) right before it
    is quantized, so the device never holds more than one block in the model dtype."""
    model = flux()
    blocks = [*model.double_blocks, *model.single_blocks]
    events, move, quantize_block = [], fp8.move, fp8.quantize_block

    def spy_move(module, device, skip):
        assert {id(m) for m in skip} == {id(m) for m in modulation_layers(model)}
        wide = [m for m in module.modules() if isinstance(m, nn.Linear) and m not in skip]
        events.append(("move", module, len(wide), device))
        return move(module, device, skip)

    def spy_quantize(block, keep):
        events.append(("quantize", block))
        return quantize_block(block, keep)

    monkeypatch.setattr(fp8, "move", spy_move)
    monkeypatch.setattr(fp8, "quantize_block", spy_quantize)
    quantize_fp8(model, "cpu")
    expected = [e for b in blocks for e in (("move", b), ("quantize", b))]
    assert [e[:2] for e in events] == expected
    assert all(e[2] > 0 and e[3] == "cpu" for e in events[::2])  # bf16 linears, moved
    assert not [m for b in blocks for m in b.modules() if type(m) is nn.Linear and m not in
                {l for mod in modulation_layers(model) for l in mod.modules()}]  # fmt: skip


def test_fp8_needs_fit_a_16_gb_card():
    """The offload chooser knows --fp8 halves the transformer: a 16 GiB card (about 15 GiB free)
    keeps everything on it with fp8, and streams blocks in bf16."""
    from dit360.app.generate import offload_needs
    from dit360.app.options import SampleOptions
    from dit360.memory.offload import MARGIN

    free = 15.0
    for on, mode in ((True, "none"), (False, "blocks")):
        needs = offload_needs(SampleOptions(fp8=on, device="cpu", dtype="bf16"))
        assert next(m for m, gb in needs.items() if gb * MARGIN <= free) == mode


@pytest.mark.gpu
def test_quantize_on_cuda_peak():
    """On a GPU: quantizing a CPU-held model onto it peaks at its float8 result plus one block in
    bf16 and the float32 temporaries of one layer (its copy and its quotient: 4x its bf16 bytes),
    never the bf16 model."""
    model = flux().to(torch.bfloat16)
    blocks = [*model.double_blocks, *model.single_blocks]
    bf16 = sum(t.nbytes for b in blocks for t in b.parameters())
    one = max(sum(t.nbytes for t in b.parameters()) for b in blocks)
    layer = max(m.weight.nbytes for b in blocks for m in b.modules() if isinstance(m, nn.Linear))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    quantize_fp8(model, "cuda")
    held = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    assert held < 0.75 * bf16 and peak <= held + one + 4 * layer + 2**20, (held, peak, one, layer)
