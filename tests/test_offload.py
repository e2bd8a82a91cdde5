"""Offloading: park, lent and stream on a tiny FLUX with LoRA give the same outputs and keep at
most ahead + 1 blocks off their home, on the CPU (and on CUDA where there is a GPU); choose's logic
with a mocked CUDA."""

import pytest
import torch
from tiny import randomize
from torch import nn

from dit360.core.lora import adapters, inject
from dit360.core.model import Flux
from dit360.load.config import FluxParams
from dit360.load.lora_formats import target_rows
from dit360.memory import offload

CUDA = pytest.mark.gpu  # deselected by default (pyproject): run with `pytest -m gpu` on a GPU
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

# 2 double + 3 single blocks, so ahead = 2 leaves blocks behind; LoRA on every attention.
PARAMS = FluxParams(
    in_channels=64,
    out_channels=64,
    vec_in_dim=24,
    context_in_dim=32,
    hidden_size=32,
    num_heads=2,
    depth=2,
    depth_single_blocks=3,
    axes_dim=(4, 6, 6),
)


def tiny_flux(seed: int = 0) -> Flux:
    """A random tiny FLUX with a random (non-zero) LoRA, frozen."""
    model = Flux(PARAMS)
    model = inject(model, target_rows(model), rank=4, alpha=4, dropout=0.0)
    return randomize(model, seed).eval().requires_grad_(False)


def inputs(seed: int, device: str = "cpu", b: int = 2, n_img: int = 12, n_txt: int = 5) -> tuple:
    """Random positional inputs of Flux.forward."""
    g = torch.Generator().manual_seed(seed)
    p = PARAMS
    xs = (
        torch.randn(b, n_img, p.in_channels, generator=g),
        torch.randint(0, 8, (b, n_img, 3), generator=g).float(),
        torch.randn(b, n_txt, p.context_in_dim, generator=g),
        torch.zeros(b, n_txt, 3),
        torch.rand(b, generator=g),
        torch.randn(b, p.vec_in_dim, generator=g),
        torch.full((b,), 3.5),
    )
    return tuple(x.to(device) for x in xs)


def blocks(model: Flux) -> list[nn.Module]:
    """The blocks in the order forward runs them."""
    return [*model.double_blocks, *model.single_blocks]


def homes(module: nn.Module) -> dict[int, int]:
    """id -> home data_ptr of every parameter and buffer (after `park`)."""
    tensors = [*module.parameters(), *module.buffers()]
    return {id(t): getattr(t, offload.HOME).data_ptr() for t in tensors}


def away(module: nn.Module, home: dict[int, int]) -> bool:
    """Whether every parameter and buffer of `module` is a copy, not its home."""
    return all(t.data_ptr() != home[id(t)] for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_stream_matches_resident(device: str) -> None:
    """Parked, lent and streamed (ahead 1), two forwards in a row equal the resident model's."""
    model, xs = tiny_flux().to(device), [inputs(1, device), inputs(2, device)]
    want = [model(*x) for x in xs]
    offload.park(model)
    assert all(t.device.type == "cpu" for t in model.parameters())
    assert all(t.is_pinned() == torch.cuda.is_available() for t in model.parameters())
    stop = offload.stream(blocks(model), device, ahead=1)
    with offload.lent(model, device):
        got = [model(*x) for x in xs]
    stop()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    home = homes(model)
    assert all(t.data_ptr() == home[id(t)] for t in model.parameters())  # all back home
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks(model))
    with offload.lent(model, device):  # still works, parked, without the stream
        assert torch.equal(model(*xs[0]), want[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ahead", [1, 2])
@torch.no_grad()
def test_stream_holds_at_most_ahead_plus_one(ahead: int, device: str) -> None:
    """Counted in each block's pre-hook: the running block (LoRA included) is a copy, and exactly
    ahead + 1 blocks are off their home (the rest wait at home), across the wrap-around."""
    model = offload.park(tiny_flux())
    home, seen = homes(model), []
    assert sum(1 for _ in adapters(model)) == 2 * 2 + 3  # q/k/v/out LoRA in every block

    def count(block: nn.Module, args: tuple) -> None:
        assert away(block, home)  # its weights and its LoRA's are copies on the device
        assert all(t.device.type == device for t in block.parameters())
        seen.append(sum(1 for b in blocks(model) if not all(
            t.data_ptr() == home[id(t)] for t in b.parameters()
        )))  # fmt: skip

    stop = offload.stream(blocks(model), device, ahead=ahead)
    hooks = [b.register_forward_pre_hook(count) for b in blocks(model)]  # after stream's own
    with offload.lent(model, device):
        for seed in (1, 2):
            model(*inputs(seed, device))
    stop()
    for h in hooks:
        h.remove()
    assert len(seen) == 2 * 5 and max(seen) == ahead + 1 and min(seen) == ahead + 1


@torch.no_grad()
def test_lent_runs_every_layer_on_copies() -> None:
    """Inside lent + stream, every layer with weights outside the blocks, and every layer run
    within a block's forward, runs on copies, none on its home."""
    model = offload.park(tiny_flux())
    home, at_home, inside = homes(model), [], []
    owned = {m for b in blocks(model) for m in b.modules()}

    def check(m: nn.Module, args: tuple) -> None:
        # Flux.modulations runs the blocks' adaLN layers before the blocks: not the stream's job.
        if m in owned and not inside:
            return
        if any(t.data_ptr() == home[id(t)] for t in m.parameters(recurse=False)):
            at_home.append(m)

    stop = offload.stream(blocks(model), "cpu")
    hooks = [m.register_forward_pre_hook(check) for m in model.modules()]
    for b in blocks(model):
        hooks.append(b.register_forward_pre_hook(lambda m, args: inside.append(m)))
        hooks.append(b.register_forward_hook(lambda m, args, out: inside.remove(m)))
    with offload.lent(model, "cpu"):
        model(*inputs(1))
    stop()
    for h in hooks:
        h.remove()
    assert at_home == []


@torch.no_grad()
def test_lent_part_of_streamed_block() -> None:
    """A layer of a streamed block can be lent on its own (lending the model skips it)."""
    model = offload.park(tiny_flux())
    home, lin = homes(model), model.double_blocks[0].img_mod.lin
    stop = offload.stream(blocks(model), "cpu")
    with offload.lent(model, "cpu"):
        assert not away(lin, home) and away(model.img_in, home)
        with offload.lent(lin, "cpu"):
            assert away(lin, home)
    stop()
    assert not away(lin, home)


def with_buffers(seed: int = 0) -> nn.Module:
    """A module with buffers (batch-norm statistics) and a weight tied in two places."""
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.BatchNorm1d(4), nn.ReLU(), lin).eval()
    g = torch.Generator().manual_seed(seed)
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            t.data = torch.rand(t.shape, generator=g) + 0.5
    return model


@torch.no_grad()
def test_lent_restores_home_and_moves_buffers() -> None:
    """lent gives equal outputs from copies (buffers too), and data_ptrs equal home after exit."""
    model, x = with_buffers(), torch.randn(3, 4)
    want = model(x)
    offload.park(model)
    home = homes(model)
    assert len(home) == 2 + 2 + 3  # linear (tied: once), batch-norm weight and bias, 3 buffers
    with offload.lent(model, "cpu") as lent_model:
        assert lent_model is model and away(model, home)
        assert model[0].weight is model[3].weight  # ties hold
        got = model(x)
    assert torch.equal(got, want)
    assert all(t.data_ptr() == home[id(t)] for t in [*model.parameters(), *model.buffers()])


def test_park_is_idempotent() -> None:
    """Parking twice changes nothing; the homes hold the exact values; parking brings a lent
    module home."""
    model = with_buffers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    home = homes(offload.park(model))
    assert homes(offload.park(model)) == home
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype
    with offload.lent(model, "cpu"):
        offload.park(model)
        assert all(t.data_ptr() == home[id(t)] for t in model.parameters())


@torch.no_grad()
def test_unparked_tensors_stay() -> None:
    """lent leaves tensors that are not parked where they are (a model loaded on the device);
    stream refuses blocks that are not parked."""
    model, x = tiny_flux(), inputs(1)
    offload.park(model.img_in)
    ptrs = {id(t): t.data_ptr() for t in model.parameters()}
    with offload.lent(model, "cpu"):
        moved = {id(t) for t in model.parameters() if t.data_ptr() != ptrs[id(t)]}
        model(*x)
    assert moved == {id(t) for t in model.img_in.parameters()}
    assert all(t.data_ptr() == ptrs[id(t)] for t in model.parameters())
    with pytest.raises(ValueError, match="not parked"):
        offload.stream(blocks(model), "cpu")


@torch.no_grad()
def test_skip_stays_home() -> None:
    """Modules in `skip` stay home under lent and stream (the blocks' adaLN layers, computed
    ahead), and each can still be lent on its own."""
    model = offload.park(tiny_flux())
    home, seen = homes(model), []
    kept = [model.time_in, *(b.img_mod for b in model.double_blocks)]
    rest = [c for b in blocks(model) for c in b.children() if c not in kept]

    def check(block: nn.Module, args: tuple) -> None:
        seen.append(block)
        assert all(away(m, home) for m in block.children() if m not in kept)
        assert not any(away(m, home) for m in kept)

    stop = offload.stream(blocks(model), "cpu", skip=kept)
    hooks = [b.register_forward_pre_hook(check) for b in blocks(model)]
    with offload.lent(model, "cpu", skip=kept):
        assert away(model.img_in, home) and not any(away(m, home) for m in kept)
        with offload.lent(kept[1], "cpu"):
            assert away(kept[1], home)
        model(*inputs(1))
    stop()
    for h in hooks:
        h.remove()
    assert len(seen) == 5 and rest and not any(away(m, home) for m in rest)


def test_homes_pack_tightly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Homes are cut from power-of-two chunks that add up to about the tensors' size (pinned
    allocations are rounded to powers of two one by one), with every value and dtype kept."""
    monkeypatch.setattr(offload, "CHUNK", 2**20)
    g = torch.Generator().manual_seed(0)
    # flux-dev's weight sizes (MB: modulation 113, qkv 57, proj 19, mlp 75, linear1 132, ...)
    mb = [113, 113, 57, 19, 75, 75, 57, 19, 75, 75, 132, 94, 57, 0.01, 0.01] * 4
    tensors = [torch.randn(int(m * 1000), generator=g).to(torch.bfloat16) for m in mb]
    tensors += [torch.tensor(True), torch.arange(7), torch.empty(0)]
    pairs = list(offload._homes(tensors, pin=False))
    assert [id(t) for t, _ in sorted(pairs, key=lambda p: -p[0].nbytes)] == [
        id(t) for t in sorted(tensors, key=lambda t: -t.nbytes)
    ]
    for t, h in pairs:
        assert torch.equal(t, h) and t.dtype == h.dtype
        assert h.data_ptr() != t.data_ptr() or t.numel() == 0
    chunks = {h.untyped_storage().data_ptr(): h.untyped_storage().nbytes() for _, h in pairs}
    assert all(n & (n - 1) == 0 for n in chunks.values())  # powers of two
    total = sum(t.nbytes for t in tensors)
    assert sum(chunks.values()) < 1.08 * total, (sum(chunks.values()), total)


def test_choose_on_cpu() -> None:
    """On the CPU nothing is offloaded, and the log says why."""
    lines = []
    assert offload.choose("cpu", {"none": 1e9, "model": 1e9, "blocks": 1e9}, lines.append) == "none"
    assert lines == ["offload none (cpu)"]  # not an error: nothing to offload to


@pytest.mark.parametrize(
    "free_gb, mode", [(40, "none"), (30, "model"), (22, "model"), (14, "blocks"), (5, "blocks")]
)
def test_choose_on_cuda(monkeypatch: pytest.MonkeyPatch, free_gb: float, mode: str) -> None:
    """With CUDA mocked: the first mode whose need plus 10% fits the free memory, else blocks,
    logged in one line with the numbers."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gb * 2**30, 2**40))
    needs, lines = {"none": 33.0, "model": 20.0, "blocks": 12.0}, []
    assert offload.choose("cuda", needs, lines.append) == mode
    (line,) = lines
    assert line.startswith(f"offload {mode}: {free_gb:.1f} GiB free on cuda")
    assert "none 33.0, model 20.0, blocks 12.0" in line
    assert ("nothing fits" in line) == (free_gb < 12 * offload.MARGIN)
