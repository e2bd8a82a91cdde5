"""Regional compilation (`--compile`): one torch.compile'd `forward` per block kind, shared by all
blocks; hooks around it (streaming, FSDP) stay eager, the weights they swap are graph inputs, the
LoRA hooks and `qkv_hook` inside are traced and guarded. Reference: PyTorch's "Reducing
torch.compile cold start compilation time with regional compilation" recipe."""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import MethodType

import torch
from torch import nn

from ..core.model import Flux


def compile_blocks(model: Flux, **options) -> Flux:
    """Compile every block's `forward` in place (once per kind); `options` go to torch.compile."""
    for blocks in (model.double_blocks, model.single_blocks):
        if len(blocks) == 0:
            continue
        # One function per kind: dynamo caches by code object and, with nn modules inlined, reads
        # each block's weights as inputs, so all blocks of a kind share one graph.
        fn = torch.compile(type(blocks[0]).forward, **options)
        # Dynamo by default assumes the hooks of inlined modules never change: a LoRA hooked on
        # (or unhooked from) a linear after the first compile would silently be ignored (or kept).
        fn = torch._dynamo.config.patch(skip_nnmodule_hook_guards=False)(fn)
        for block in blocks:
            block.forward = MethodType(fn, block)
    return model


@contextmanager
def first_step_timed(model: nn.Module, log: Callable[[str], None] = print) -> Iterator[None]:
    """Log how much longer the model's first forward in the with-block took: about the compile."""
    times: list[float] = []  # seconds per forward

    def before(module: nn.Module, args: tuple) -> None:
        times.append(-time.perf_counter())

    def after(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if out.is_cuda:  # the GPU runs behind the CPU: wait for the step to end
            torch.cuda.synchronize(out.device)
        times[-1] += time.perf_counter()

    hooks = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
    if times:
        first, rest = times[0], times[1:]
        each = sum(rest) / len(rest) if rest else 0.0
        log(
            f"compile: the first step took {first:.1f}s, the others {each:.2f}s each: "
            f"compiling took about {first - each:.1f}s"
        )
