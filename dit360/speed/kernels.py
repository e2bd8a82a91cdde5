"""Attention kernels: SDPA's by name, FlashAttention-3, and `attention_backend`, which installs one
in the transformer through its seam (`dit360.core.layers.attend`)."""

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..core import layers

# SDPA's kernels by name (--attention); "auto" lets PyTorch pick (cuDNN or Flash on Hopper).
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def fa3(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """FlashAttention-3 (Hopper; flash-attn's `hopper/` build): (B, H, L, d) -> (B, L, H, d)."""
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out[0] if isinstance(out, tuple) else out  # some versions also return the LSE


@contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Inside it, attention runs kernel `name`: SDPA's (an error if it cannot), fa3 or auto."""
    before, layers.attend = layers.attend, fa3 if name == "fa3" else layers.sdpa
    try:
        with nullcontext() if name in ("auto", "fa3") else sdpa_kernel(BACKENDS[name]):
            yield
    finally:
        layers.attend = before
