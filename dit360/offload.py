"""Offloading frozen weights to host memory, for GPUs too small to hold a whole model: `park` a
module in (pinned) CPU memory, `lent` it to the GPU for a with-block, or `stream` its blocks
through the GPU one at a time, the next ones copied ahead on a side CUDA stream; `choose` picks the
mode from the free GPU memory. We swap `tensor.data`, which autograd does not see: inference, or
training with each streamed block recomputed in backward (`stream_recomputed`), which fetches it
again.

Each parked parameter and buffer keeps its host copy (its home) in the attribute `HOME`; a device
copy replaces `.data` while it is needed and is dropped afterwards, never copied back.
"""

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
    """Every parameter and buffer of `module` once (tied weights are one tensor), less those of
    the modules in `skip` and, when lending, of the blocks a `stream` moves."""
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
    """(tensor, its host copy) one at a time: largest first, each copy cut from the first chunk with
    room (first-fit decreasing); a new chunk is the largest power of two within what is left (at
    most CHUNK, at least the tensor), so the chunks add up to about the tensors' size."""
    sizes = [max(1, -(-t.nbytes // ALIGN)) * ALIGN for t in tensors]  # > 0: a chunk exists
    left, chunks = sum(sizes), []  # chunks: [uint8 tensor, bytes used]
    for i in sorted(range(len(tensors)), key=lambda i: -sizes[i]):
        t, n = tensors[i], sizes[i]
        chunk = next((c for c in chunks if len(c[0]) - c[1] >= n), None)
        if chunk is None:
            size = max(1 << (n - 1).bit_length(), 1 << (min(CHUNK, left).bit_length() - 1))
            chunks.append(chunk := [torch.empty(size, dtype=torch.uint8, pin_memory=pin), 0])
        home = chunk[0][chunk[1] : chunk[1] + t.nbytes].view(t.dtype).view(t.shape)
        chunk[1], left = chunk[1] + n, left - n
        yield t, home.copy_(t.detach())


def move(
    module: nn.Module, device: torch.device | str, skip: Iterable[nn.Module] = ()
) -> nn.Module:
    """Move every parameter and buffer of `module` (but those of the modules in `skip`) to
    `device`, tensor by tensor; not for parked modules (their homes stay)."""
    for t in _tensors(module, skip):
        t.data = t.data.to(device)
    return module


def park(module: nn.Module, skip: Iterable[nn.Module] = ()) -> nn.Module:
    """Move every parameter and buffer (but those of the modules in `skip`) to CPU memory, pinned
    when CUDA is available, tensor by tensor (never a second full copy in host memory), as the
    module's home. Idempotent."""
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
    """The parked module on `device` inside the with-block, back home after (the device copies
    are dropped). Left as they are: tensors not parked, the modules in `skip`, and blocks being
    streamed (their `stream` moves them)."""
    tensors = [t for t in _tensors(module, skip, lending=True) if hasattr(t, HOME)]
    try:
        for t in tensors:  # copy=True: a real copy even when `device` is the CPU
            t.data = getattr(t, HOME).to(device, non_blocking=True, copy=True)
        yield module
    finally:
        for t in tensors:
            t.data = getattr(t, HOME)


class _Streamer:
    """The copies of parked blocks on `device`: `before(i, upcoming)` makes block i's (waiting for
    it) and issues the upcoming blocks' early, on a side CUDA stream; `drop(i)` sends it home.
    It marks the blocks streamed (`lent` leaves them to it); `stop` removes `hooks`, unmarks
    them and sends them home."""

    def __init__(
        self, blocks: Sequence[nn.Module], device: torch.device | str, skip: Iterable[nn.Module]
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
        self.hooks: list = []  # the callers' hooks on the blocks, removed by `stop`
        for block in blocks:
            setattr(block, STREAMED, True)

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
        """Send block i back home, dropping its device copies (a tensor autograd saved keeps its
        copy alive until backward is done with it)."""
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

    def stop(self) -> None:
        """Remove the hooks and send every block home."""
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
) -> Callable[[], None]:
    """Stream parked blocks that run in order (forward after forward) through `device`: a block's
    copy is made before its forward and dropped after it, the next `ahead` blocks' copies are
    issued early, so at most ahead + 1 blocks are on `device`; their submodules in `skip` stay
    home. Returns the function that stops."""
    s, n = _Streamer(blocks, device, skip), len(blocks)
    ahead = max(0, min(ahead, n - 1))
    for i, block in enumerate(blocks):
        # Wraps around to the next forward's first blocks.
        nxt = [(i + 1 + k) % n for k in range(ahead)]
        s.hooks.append(block.register_forward_pre_hook(lambda m, a, i=i, nxt=nxt: s.before(i, nxt)))
        s.hooks.append(block.register_forward_hook(lambda m, a, out, i=i: s.drop(i)))
    return s.stop


def stream_recomputed(
    blocks: Sequence[nn.Module],
    device: torch.device | str,
    ahead: int = 1,
    skip: Iterable[nn.Module] = (),
) -> Callable[[], None]:
    """Training: recompute each parked block in backward (activation checkpointing) and stream it
    through `device` twice a step, in forward (blocks 0, 1, ..., the next `ahead` prefetched) and
    in backward's recomputation (..., 1, 0, the previous `ahead` prefetched). The checkpointed
    function itself fetches and drops, since the recomputation calls it without the module's hooks.

    A forward drops its block at once (checkpointing saves none of its tensors), but the last:
    backward starts with it. A recomputed block stays until the recomputation of the one before
    it begins: autograd saved its weights themselves (a frozen tensor is not detached), so they
    must stay the device copies until its backward is over, which it is by then (that backward
    makes the gradient of the block's input, which the block before needs first). The first
    block stays for the next forward. So at most ahead + 1 blocks are on `device`. Returns the
    function that stops (the blocks keep their checkpointed forward)."""
    s, n = _Streamer(blocks, device, skip), len(blocks)
    ahead = max(0, min(ahead, n - 1))
    calls: list[int] = []  # blocks whose module call (a forward, not a recomputation) is under way
    for i, block in enumerate(blocks):
        s.hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)))
        run = _streamed(block.forward, i, n, ahead, s, calls)
        block.forward = partial(checkpoint, run, use_reentrant=False)
    return s.stop


def _streamed(
    forward: Callable, i: int, n: int, ahead: int, s: _Streamer, calls: list[int]
) -> Callable:
    """Block i's forward or recomputation between fetching and dropping (`stream_recomputed`)."""

    def run(*args: object, **kwargs: object) -> object:
        if calls and calls[-1] == i:  # a forward
            calls.pop()
            s.before(i, range(i + 1, min(n, i + 1 + ahead)))
            try:
                return forward(*args, **kwargs)
            finally:
                if i < n - 1 or not torch.is_grad_enabled():
                    s.drop(i)
        for j in [j for j in s.ready if j > i]:  # a recomputation: their backward is over
            s.drop(j)
        s.before(i, range(i - 1, max(-1, i - 1 - ahead), -1))
        return forward(*args, **kwargs)

    return run


def choose(
    device: torch.device | str, needs: dict[str, float], log: Callable[[str], None] = print
) -> str:
    """The offload mode for `device`: the first of MODES whose need (GiB) fits its free memory with
    a margin, else "blocks"; "none" off CUDA. Logs the choice and why."""
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
