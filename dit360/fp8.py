"""float8 (e4m3) weights for the transformer blocks' linear layers, made at load (`--fp8`): half
the bytes of bf16 to hold, park, lend and stream.

Each weight row (output channel) is stored as float8_e4m3fn with its own float32 scale absmax/448
(448: e4m3's largest finite value), so every row uses the whole float8 range. The product runs on
the fp8 tensor cores of CUDA GPUs of compute capability 8.9+ (Ada, Hopper) through
`torch._scaled_mm`, the activations quantized per token the same way; elsewhere (CPU, older GPUs,
fp16/fp32 activations) the weight is upcast to the activation dtype and scaled (weight-only).
The tensor cores accumulate with fast accumulation (`FAST_ACCUM`, as torchao does in the
forward pass: about twice Hopper's throughput of the precise mode, which periodically promotes the
partial sums to float32); set `fp8.FAST_ACCUM = False` for the precise mode.
Training a LoRA over a float8 base needs the gradient of the input only (the base is frozen):
`_scaled_mm` has no autograd, so on the tensor cores a small autograd function multiplies the
output gradient by the upcast weight in backward (a bf16 matmul, never `_scaled_mm`: the backward
stays precise); the weight-only path is differentiable as is.
Left in the model dtype: the embedders and modulation layers (computed ahead, in CPU memory),
img_in, txt_in and final_layer (small, and at the model's input and output).
Reference: Micikevicius et al. 2022, "FP8 Formats for Deep Learning", https://arxiv.org/abs/2209.05433;
pytorch/ao `torchao.float8` (rowwise scaling).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core.model import Flux
from .offload import move
from .sampling import modulation_layers

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
TINY = 1e-12  # floor of an absmax: an all-zero row or token gets a finite scale
FAST_ACCUM = True  # _scaled_mm's use_fast_accum (forward only; the backward is a bf16 matmul)


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., K) float32 or bf16 as float8 and float32 scales (..., 1), one per row:
    x ~ q * scale."""
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


def scaled_mm_fits(x: Tensor, weight: Tensor) -> bool:
    """Whether x @ weight.T can run on the fp8 tensor cores: rowwise scaling computes in bf16,
    and cuBLASLt wants K and N multiples of 16."""
    n, k = weight.shape
    return x.dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0 and _fp8_cores(x.device)


def upcast(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The weight (N, K) in `dtype`, scaled (float8 to bf16/fp16/fp32 is exact)."""
    return weight.to(dtype) * scale.to(dtype)[:, None]


def fp8_linear(
    x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, weight_only: bool = False
) -> Tensor:
    """x (..., K) @ (weight * scale).T + bias, with weight (N, K) float8 and scale (N,) float32;
    differentiable with respect to x. `weight_only`: never quantize x (T5's activations have
    outliers that per-token float8 would flatten)."""
    if weight_only or not scaled_mm_fits(x, weight):
        return F.linear(x, upcast(weight, scale, x.dtype), bias)
    # 2-D in, 2-D out; the (..., N) view is made here, outside the autograd Function: a LoRA
    # hook adds into the output in place, which PyTorch forbids on views a Function returns.
    mm = ScaledMatmul.apply if torch.is_grad_enabled() and x.requires_grad else scaled_mm
    return mm(x.reshape(-1, x.shape[-1]), weight, scale, bias).reshape(*x.shape[:-1], -1)


class ScaledMatmul(torch.autograd.Function):
    """`scaled_mm` forward; backward: the input's gradient through the upcast weight, in bf16 (the
    frozen weight, scale and bias get none)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight, scale)
        return scaled_mm(x, weight, scale, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        weight, scale = ctx.saved_tensors
        return grad @ upcast(weight, scale, grad.dtype), None, None, None  # (..., N) @ (N, K)


def scaled_mm(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x (M, K) bf16 quantized per token, times the float8 weight on the tensor cores -> (M, N)
    bf16, a new tensor; accumulated as FAST_ACCUM says."""
    xq, xs = quantize(x)  # (M, K) row-major, (M, 1): per token
    # Rowwise scaling: a (M, K) row-major, b (K, N) column-major (weight.t() is), scales (M, 1)
    # and (1, N) float32; the output and the bias bf16.
    bias = None if bias is None else bias.to(torch.bfloat16)
    return torch._scaled_mm(
        xq, weight.t(), xs, scale[None], bias=bias, out_dtype=torch.bfloat16,
        use_fast_accum=FAST_ACCUM,
    )  # fmt: skip


class FP8Linear(nn.Module):
    """A linear layer with a float8 weight (N, K) and float32 scales (N,): `nn.Linear`'s duck
    type (in_features, out_features, weight, bias), so LoRA hooks and offloading see a linear."""

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
    """The float8 copy of a linear layer, on its device; it keeps the layer's hooks and LoRA
    adapters (these stay in the model dtype, a side path)."""
    q, scale = quantize(linear.weight.float())  # float32: one rounding, the float8 one
    new = FP8Linear(q, scale[:, 0], linear.bias, weight_only)
    new._forward_hooks.update(linear._forward_hooks)  # dit360.core.lora's hook adds the adapters
    new._forward_pre_hooks.update(linear._forward_pre_hooks)
    if "lora" in linear._modules:
        new.lora = linear.lora
    return new


def quantize_fp8(model: Flux, device: torch.device | str | None = None) -> Flux:
    """Replace the linear layers of the double and single blocks (not their modulation) by
    FP8Linear, in place and layer by layer: at most one layer exists twice at a time. `device`:
    each block is moved there (but its modulation) just before it is quantized, so a model read
    into CPU memory is never whole on the device in its own dtype (flux-dev: 17 GB bf16, 8.7 GB
    as float8). Merge a LoRA before: merging into a float8 weight would round it again."""
    keep = modulation_layers(model)
    for block in [*model.double_blocks, *model.single_blocks]:
        quantize_block(block if device is None else move(block, device, keep), keep)
    return model


def quantize_block(block: nn.Module, keep: list[nn.Module]) -> nn.Module:
    """Replace the linear layers of one block by FP8Linear, in place, except those in `keep`."""
    skip = {id(m) for mod in keep for m in mod.modules()}
    found = [
        (name, m)
        for name, m in block.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in skip
    ]
    for name, linear in found:
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent), child, to_fp8(linear))
        linear.weight = None  # freed now, not when the loop ends
    return block
