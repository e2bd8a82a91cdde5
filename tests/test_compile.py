"""--compile (`dit360.speed.compiling`): compiled blocks give the eager outputs, and compile once
per block kind, not per block, step, streamed offload, LoRA layer or editing step. Counted with
dynamo's counters: `frames` counts compilations (a recompile is one more)."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from dit360.app.panorama import Grid
from dit360.app.text import encode
from dit360.core.editing import replacing_tokens, rows
from dit360.core.sampling import Conditioning, predict, schedule
from dit360.load.weights import load_flux
from dit360.memory.ahead import ahead, denoise
from dit360.memory.offload import park, stream
from dit360.speed.compiling import compile_blocks

GRID = Grid(2, 4, 1)
# Dynamo's tracing, guards and hooks are the backend's input, the same for every backend: the
# tests of what recompiles use aot_eager, which skips inductor's slow C++ compile on a CPU.
FAST = dict(backend="aot_eager")


@pytest.fixture(scope="module")
def ours(tiny_flux):
    """Our tiny transformer and two conditioning rows."""
    cond = Conditioning(*encode(tiny_flux, ["a lake", "a lake at sunset"], "cpu", torch.float32))
    return load_flux(tiny_flux, "cpu", torch.float32), cond


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and counts its own compilations."""
    torch._dynamo.reset()
    counters.clear()


def compiled() -> int:
    """Compilations since the test began (a recompile counts one more)."""
    assert not counters["graph_break"], dict(counters["graph_break"])
    return counters["frames"]["ok"]


def run(model: torch.nn.Module, cond: Conditioning, steps: int = 2) -> torch.Tensor:
    """Denoise seeded noise on the tiny grid."""
    x = torch.randn(1, GRID.tokens, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return denoise(model, x, GRID, rows(cond, slice(0, 1)), schedule(steps, GRID.tokens), 2.8)


@pytest.mark.slow
def test_inductor_matches_eager_compiling_once_per_kind(ours):
    """Inductor-compiled blocks denoise as eager ones (1e-5 relative in float32), with one
    compilation per block kind for 2 + 2 blocks and 2 steps."""
    model, cond = ours
    expected = run(model, cond)
    got = run(compile_blocks(copy.deepcopy(model)), cond)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    assert compiled() == 2  # a double and a single block


def test_streamed_offload_recompiles_nothing(ours):
    """Blocks streamed through `offload.stream` (hooks around forward, `param.data` swapped) reuse
    the graphs of another model's blocks, and give the eager latents."""
    model, cond = ours
    expected = run(model, cond)
    got = run(compile_blocks(copy.deepcopy(model), **FAST), cond)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert compiled() == 2
    streamed = compile_blocks(park(copy.deepcopy(model)), **FAST)
    stop = stream([*streamed.double_blocks, *streamed.single_blocks], "cpu")
    try:
        got = run(streamed, cond, steps=3)
    finally:
        stop()
    torch.testing.assert_close(got, run(model, cond, steps=3), rtol=1e-5, atol=1e-6)
    assert compiled() == 2


def test_unmerged_lora_compiles_once_more(ours, tmp_path):
    """An unmerged LoRA (forward hooks on linears inside the blocks) is traced into the graph:
    eager outputs, one more compilation per kind (hooks guarded), none per layer."""
    from test_lora import dit360_lora

    from dit360.load.lora_formats import load_lora

    model, cond = ours
    folder = str(dit360_lora(tmp_path / "lora", r=4, alpha=4)[0])
    lora = load_lora(copy.deepcopy(model), folder, scale=1.0, merge=False)
    plain = compile_blocks(copy.deepcopy(model), **FAST)
    run(plain, cond)
    expected = run(lora, cond)
    got = run(compile_blocks(lora, **FAST), cond)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert compiled() == 4


def test_qkv_hook_compiles_once(ours):
    """Editing's token replacement (a new `qkv_hook` closure every step) compiles once per kind
    and gives the eager velocities."""
    model, cond = ours
    keep = GRID.wrap_mask(torch.tensor([1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool), "wrap")
    x = torch.randn(2, GRID.tokens, 64, generator=torch.Generator().manual_seed(1))
    sigmas = schedule(3, GRID.tokens)
    cond = ahead(model, cond, sigmas[:-1], 2.8)

    def velocities(m: torch.nn.Module) -> list[torch.Tensor]:
        out = []
        for t in sigmas[:-1]:
            with torch.no_grad(), replacing_tokens(m, keep):
                out.append(predict(m, x, GRID, cond, t, 2.8))
        return out

    expected = velocities(model)
    got = velocities(compile_blocks(copy.deepcopy(model), **FAST))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert compiled() == 2
