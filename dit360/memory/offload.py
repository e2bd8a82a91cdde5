"""Offloading frozen weights to host memory: `park` a module in (pinned) CPU memory, `lent` it to
the GPU for a with-block, or `stream` its blocks through it one at a time; `choose` picks the mode.
We swap `tensor.data` (autograd does not see it): each parked tensor keeps its host copy (its home)
in the attribute `HOME`; a device copy replaces `.data` while needed, dropped, never copied back."""

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "model", "blocks")  # least to most offloading: the order `choose` tries them
HOME, STREAMED = "_offload_home", "_offload_streamed"
# Pinned allocations are rounded up to a power of two (PyTorch's host caching allocator), so a
# 132 MB flux-dev weight alone would pin 256 MB: we pin power-of-two chunks and cut homes from them.
CHUNK, ALIGN = 2**29, 64  # bytes; 64: any dtype can view an aligned offset
MARGIN = 1.1  # `choose` wants 10% over the caller's estimate: CUDA context, fragmentation


def _tensors(
    module: nn.Module, skip: Iterable[nn.Module] = (), lending: bool = False
) -> list[Tensor]:
    """Each parameter and buffer of `module` once, less `skip`'s and, lending, streamed blocks'."""
    found: dict[int, Tensor] = {}
    todo, skip = [module], {id(m) for m in skip}
    while todo:
        m = todo.pop()
        if id(m) in skip or lending and getattr(m, STREAMED, False):
            continue
        tensors = [*m._parameters.values(), *m._buffers.values()]
        found |= {id(t): t for t in tensors if t is not None}
        todo += m._modules.values()
    return list(found.values())


def _homes(tensors: list[Tensor], pin: bool) -> Iterator[tuple[Tensor, Tensor]]:
    """(tensor, its host copy) one at a time, largest first, cut from the first chunk with room."""
    sizes = [max(1, -(-t.nbytes // ALIGN)) * ALIGN for t in tensors]  # > 0: a chunk exists
    left, chunks = sum(sizes), []  # chunks: [uint8 tensor, bytes used]
    for i in sorted(range(len(tensors)), key=lambda i: -sizes[i]):
        t, n = tensors[i], sizes[i]
        chunk = next((c for c in chunks if len(c[0]) - c[1] >= n), None)
        if chunk is None:  # the largest power of two in what is left: chunks add up to the total
            size = max(1 << (n - 1).bit_length(), 1 << (min(CHUNK, left).bit_length() - 1))
            chunks.append(chunk := [torch.empty(size, dtype=torch.uint8, pin_memory=pin), 0])
        home = chunk[0][chunk[1] : chunk[1] + t.nbytes].view(t.dtype).view(t.shape)
        chunk[1], left = chunk[1] + n, left - n
        yield t, home.copy_(t.detach())


def move(
    module: nn.Module, device: torch.device | str, skip: Iterable[nn.Module] = ()
) -> nn.Module:
    """Move `module` (but `skip`) to `device` tensor by tensor; not for parked modules."""
    for t in _tensors(module, skip):
        t.data = t.data.to(device)
    return module


def park(module: nn.Module, skip: Iterable[nn.Module] = ()) -> nn.Module:
    """Home `module` (but `skip`) in CPU memory, pinned on CUDA, tensor by tensor. Idempotent."""
    new = []
    for t in _tensors(module, skip):
        if hasattr(t, HOME):
            t.data = getattr(t, HOME)  # parked already (maybe lent right now): back home
        else:
            new.append(t)
    with torch.no_grad():
        for t, home in _homes(new, torch.cuda.is_available()):
            t.data = home  # the old copy is freed here, before the next one is made
            setattr(t, HOME, home)
    return module


@contextmanager
def lent(
    module: nn.Module, device: torch.device | str, skip: Iterable[nn.Module] = ()
) -> Iterator[nn.Module]:
    """The parked module on `device` inside the with-block, but `skip` and streamed blocks."""
    tensors = [t for t in _tensors(module, skip, lending=True) if hasattr(t, HOME)]
    try:
        for t in tensors:  # copy=True: a real copy even when `device` is the CPU
            t.data = getattr(t, HOME).to(device, non_blocking=True, copy=True)
        yield module
    finally:
        for t in tensors:
            t.data = getattr(t, HOME)


class _Streamer:
    """Parked blocks copied to `device` before they run (`ahead` early), dropped after: `stream`."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        ahead: int,
        skip: Iterable[nn.Module],
        recompute: bool,
    ) -> None:
        self.device, skip, self.blocks = torch.device(device), list(skip), blocks
        self.tensors = [_tensors(b, skip) for b in blocks]
        if any(not hasattr(t, HOME) for ts in self.tensors for t in ts):
            raise ValueError(
                "offload.stream: the blocks have tensors that are not parked: park() them"
            )
        cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if cuda else None
        self.ready: dict[int, torch.cuda.Event | None] = {}  # blocks on `device` -> copy events
        self.done: list[torch.cuda.Event] = []  # the end of the compute of dropped blocks
        self.n, self.recompute = len(blocks), recompute
        self.ahead = max(0, min(ahead, self.n - 1))
        self.called: int | None = None  # the block whose module call (not a recomputation) runs
        self.hooks = []
        for i, block in enumerate(blocks):
            setattr(block, STREAMED, True)
            self.hooks.append(block.register_forward_pre_hook(partial(self.call, i)))
            self.hooks.append(block.register_forward_hook(partial(self.returned, i)))
            if recompute:  # checkpoint's recomputation calls `forward` without the module's hooks
                run = partial(self.recomputed, block.forward, i)
                block.forward = partial(checkpoint, run, use_reentrant=False)

    def fetch(self, i: int) -> None:
        """Issue the copy of block i: on the side stream on CUDA, so it overlaps compute."""
        side = self.side
        compute = torch.cuda.current_stream(self.device) if side else None
        with torch.cuda.stream(side):  # a no-op when side is None (off CUDA)
            for t in self.tensors[i]:
                copy = getattr(t, HOME).to(self.device, non_blocking=True, copy=True)
                if side:  # used on the compute stream: the allocator must not reuse it early
                    copy.record_stream(compute)
                t.data = copy
            self.ready[i] = side.record_event() if side else None

    def drop(self, i: int) -> None:
        """Send block i home (a tensor autograd saved keeps its copy alive until backward)."""
        for t in self.tensors[i]:
            t.data = getattr(t, HOME)
        if self.ready.pop(i, None) is not None:  # on CUDA: mark where its compute ends
            self.done.append(torch.cuda.current_stream(self.device).record_event())

    def before(self, i: int, upcoming: Iterable[int]) -> None:
        """Block i on `device` (waiting for its copy), the upcoming blocks' copies issued."""
        if i not in self.ready:  # the first block, or blocks run out of order
            self.fetch(i)
        if (event := self.ready[i]) is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        # The CPU runs ahead of the GPU: before copying more, wait until the dropped blocks'
        # compute is over, so the allocator reuses their memory rather than taking more.
        while self.done:
            self.done.pop().synchronize()
        for j in upcoming:
            if j not in self.ready:
                self.fetch(j)

    def call(self, i: int, module: nn.Module, args: tuple) -> None:
        """Before block i's forward: the next `ahead` prefetched, in inference around to the next
        forward's first blocks; not in training, whose backward starts with the last block."""
        self.called, end = i, i + 1 + self.ahead
        end = min(end, self.n) if self.recompute else end
        self.before(i, [j % self.n for j in range(i + 1, end)])

    def returned(self, i: int, module: nn.Module, args: tuple, out: object) -> None:
        """After block i's forward: dropped, but training's last block (backward starts with it)."""
        if not self.recompute or i < self.n - 1 or not torch.is_grad_enabled():
            self.drop(i)

    def recomputed(self, forward: Callable, i: int, *args: object, **kwargs: object) -> object:
        """Block i's checkpointed forward; a recomputation (..., 1, 0) fetches it and the previous
        `ahead`, and drops later blocks (their backward is over, autograd saved their weights)."""
        if self.called == i:  # a forward: its hooks fetch and drop
            self.called = None
        else:
            for j in [j for j in self.ready if j > i]:
                self.drop(j)
            self.before(i, range(i - 1, max(-1, i - 1 - self.ahead), -1))
        return forward(*args, **kwargs)

    def stop(self) -> None:
        """Remove the hooks and send every block home (a recomputed forward stays)."""
        for hook in self.hooks:
            hook.remove()
        for i, block in enumerate(self.blocks):
            self.drop(i)
            block.__dict__.pop(STREAMED, None)


def stream(
    blocks: Sequence[nn.Module],
    device: torch.device | str,
    ahead: int = 1,
    skip: Iterable[nn.Module] = (),
    recompute: bool = False,
) -> Callable[[], None]:
    """Stream parked blocks through `device`, ahead + 1 there, `skip` home; returns the stop.
    `recompute` (training): checkpointed, streamed again in backward."""
    return _Streamer(blocks, device, ahead, skip, recompute).stop


def choose(
    device: torch.device | str, needs: dict[str, float], log: Callable[[str], None] = print
) -> str:
    """The first of MODES whose need (GiB) fits `device`'s free memory, else "blocks"; logged."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        log(f"offload none ({device})")  # not a CUDA device: nothing to offload to
        return "none"
    free = torch.cuda.mem_get_info(device)[0] / 2**30
    fits = [m for m in MODES if m in needs and needs[m] * MARGIN <= free]
    mode = fits[0] if fits else "blocks"
    wants = ", ".join(f"{m} {needs[m]:.1f}" for m in MODES if m in needs)
    warn = "" if fits else " (nothing fits: expect out-of-memory)"
    log(f"offload {mode}: {free:.1f} GiB free on {device}, needs (GiB, +10%): {wants}{warn}")
    return mode
