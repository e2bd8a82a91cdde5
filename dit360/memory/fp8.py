"""float8 (e4m3) weights for the blocks' linears, made at load (`--fp8`): one float32 scale per
row (absmax/448), products on the fp8 tensor cores (CUDA 8.9+, `torch._scaled_mm`, tokens quantized
likewise), elsewhere the weight upcast. Micikevicius et al. 2022, https://arxiv.org/abs/2209.05433;
pytorch/ao `torchao.float8` (rowwise scaling)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.model import Flux
from .ahead import modulation_layers
from .offload import move

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
TINY = 1e-12  # floor of an absmax: an all-zero row or token gets a finite scale
# _scaled_mm's use_fast_accum, as torchao's forward: ~2x Hopper's precise mode (the backward is a
# bf16 matmul). False: the precise mode, which promotes the partial sums to float32 periodically.
FAST_ACCUM = True


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., K) float32 or bf16 as float8 q and float32 scales (..., 1): x ~ q * scale."""
    scale = x.detach().abs().amax(-1, keepdim=True).float().clamp(min=TINY) / FP8_MAX
    # Divided in x's dtype (no float32 copy of a large activation), by the scale as rounded to
    # it, which is also the one returned; clamped as round-off may carry a value past 448, which
    # e4m3fn cannot hold (it has no infinity).
    scale = scale.to(x.dtype)
    q = (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.float()


def _fp8_cores(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU with float8 tensor cores (compute capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def upcast(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The weight (N, K) in `dtype`, scaled (float8 to bf16/fp16/fp32 is exact)."""
    return weight.to(dtype) * scale.to(dtype)[:, None]


def fp8_linear(
    x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, weight_only: bool = False
) -> Tensor:
    """x (..., K) @ (weight (N, K) float8 * scale (N,)).T + bias, differentiable in x; weight_only:
    x never quantized (T5's activations have outliers that per-token float8 would flatten)."""
    n, k = weight.shape  # rowwise scaling computes in bf16; cuBLASLt wants K, N multiples of 16
    if weight_only or x.dtype != torch.bfloat16 or k % 16 or n % 16 or not _fp8_cores(x.device):
        return F.linear(x, upcast(weight, scale, x.dtype), bias)
    # 2-D in, 2-D out; the (..., N) view is made here, outside the autograd Function: a LoRA
    # hook adds into the output in place, which PyTorch forbids on views a Function returns.
    mm = ScaledMatmul.apply if torch.is_grad_enabled() and x.requires_grad else scaled_mm
    return mm(x.reshape(-1, x.shape[-1]), weight, scale, bias).reshape(*x.shape[:-1], -1)


class ScaledMatmul(torch.autograd.Function):
    """`scaled_mm`; backward (`_scaled_mm` has none): x's gradient through the upcast weight."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight, scale)
        return scaled_mm(x, weight, scale, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        weight, scale = ctx.saved_tensors
        return grad @ upcast(weight, scale, grad.dtype), None, None, None  # (..., N) @ (N, K)


def scaled_mm(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x (M, K) bf16 quantized per token times the float8 weight on the tensor cores: (M, N)."""
    xq, xs = quantize(x)  # (M, K) row-major, (M, 1): per token
    # Rowwise scaling: a (M, K) row-major, b (K, N) column-major (weight.t() is), scales (M, 1)
    # and (1, N) float32; the output and the bias bf16.
    bias = None if bias is None else bias.to(torch.bfloat16)
    return torch._scaled_mm(
        xq, weight.t(), xs, scale[None], bias=bias, out_dtype=torch.bfloat16,
        use_fast_accum=FAST_ACCUM,
    )  # fmt: skip


class FP8Linear(nn.Module):
    """A float8 weight (N, K) and float32 scales (N,) as `nn.Linear`'s duck type, for LoRA hooks."""

    def __init__(
        self, weight: Tensor, scale: Tensor, bias: Tensor | None, weight_only: bool = False
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_only = weight_only
        self.weight = nn.Parameter(weight, requires_grad=False)
        # A buffer, so offloading moves it with the weight; not persistent: a training state dict
        # (the LoRA) leaves it out, like the frozen weight.
        self.register_buffer("scale", scale, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.scale, self.bias, self.weight_only)

    def extra_repr(self) -> str:
        only = ", weight-only" if self.weight_only else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3fn{only}"


@torch.no_grad()
def to_fp8(linear: nn.Linear, weight_only: bool = False) -> FP8Linear:
    """The float8 copy of a linear layer, on its device, with its hooks and LoRA adapters."""
    q, scale = quantize(linear.weight.float())  # float32: one rounding, the float8 one
    new = FP8Linear(q, scale[:, 0], linear.bias, weight_only)
    new._forward_hooks.update(linear._forward_hooks)  # dit360.core.lora's hook adds the adapters
    new._forward_pre_hooks.update(linear._forward_pre_hooks)
    if "lora" in linear._modules:
        new.lora = linear.lora
    return new


def quantize_fp8(model: Flux, device: torch.device | str | None = None) -> Flux:
    """The blocks' linears (not adaLN) as FP8Linear in place, block by block on `device`.
    Merge a LoRA first: float8 rounds again."""
    keep = modulation_layers(model)
    for block in [*model.double_blocks, *model.single_blocks]:
        quantize_block(block if device is None else move(block, device, keep), keep)
    return model


def quantize_block(block: nn.Module, keep: list[nn.Module]) -> nn.Module:
    """Replace the linear layers of one block by FP8Linear, in place, except those in `keep`."""
    skip = {id(m) for mod in keep for m in mod.modules()}
    found = [
        (n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear) and id(m) not in skip
    ]
    for name, linear in found:
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent), child, to_fp8(linear))
        linear.weight = None  # freed now, not when the loop ends
    return block
