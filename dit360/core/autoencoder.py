"""The FLUX VAE with the names of BFL's `ae.safetensors` (black-forest-labs/flux
`modules/autoencoder.py`): images (B, 3, H, W) in [-1, 1], latents (B, 16, H/8, W/8). Optional
circular width padding (off: diffusers' AutoencoderKL) makes decoding roll-equivariant, no seam."""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .params import AutoEncoderParams


class Conv(nn.Conv2d):
    """A 3x3 convolution with explicit (left, right, top, bottom) padding; the width may wrap."""

    def __init__(
        self, c_in: int, c_out: int, stride: int = 1, pad: tuple[int, ...] = (1, 1, 1, 1)
    ) -> None:
        super().__init__(c_in, c_out, kernel_size=3, stride=stride)
        self.pad = pad
        self.circular = False

    def forward(self, x: Tensor) -> Tensor:
        l, r, t, b = self.pad
        if self.circular:  # a 360-degree image has no left/right edge: column -1 is column W-1
            x = F.pad(x, (l, r, 0, 0), mode="circular")
            l = r = 0
        if l == r and t == b:  # symmetric: let the convolution pad (no copy)
            return F.conv2d(x, self.weight, self.bias, self.stride, (t, l))
        return F.conv2d(F.pad(x, (l, r, t, b)), self.weight, self.bias, self.stride)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the VAE's eps."""
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm-silu-conv twice plus a (1x1 conv when the width changes) shortcut."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = Conv(c_in, c_out)
        self.norm2 = group_norm(c_out, groups)
        self.conv2 = Conv(c_out, c_out)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (global, so roll-equivariant as it is)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)  # contiguous q, k, v: else SDPA falls back to building all (H*W)^2 scores
        q, k, v = (f(h).flatten(2).mT.contiguous()[:, None] for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        return x + self.proj_out(h[:, 0].mT.reshape(x.shape))


def mid(c: int, g: int) -> nn.Sequential:
    """Resnet, attention, resnet at the coarsest level."""
    blocks = dict(
        block_1=ResnetBlock(c, c, g), attn_1=AttnBlock(c, g), block_2=ResnetBlock(c, c, g)
    )
    return nn.Sequential(OrderedDict(blocks))


def level(c_in: int, c_out: int, n: int, groups: int, resample: str = "") -> nn.Sequential:
    """One resolution level: resnet blocks, then an optional "down"- or "up"-sampler."""
    blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(n)]
    parts = OrderedDict(block=nn.Sequential(*blocks))
    if resample == "down":  # stride 2 over [x | one zero column/row] on the right/bottom, as the
        # reference; with circular padding that column is the image's first: a roll by 2k rolls by k
        conv = Conv(c_out, c_out, stride=2, pad=(0, 1, 0, 1))
        parts["downsample"] = nn.Sequential(OrderedDict(conv=conv))
    elif resample == "up":  # nearest x2 maps a roll by k to a roll by 2k exactly
        up = nn.Upsample(scale_factor=2.0, mode="nearest")
        parts["upsample"] = nn.Sequential(OrderedDict(up=up, conv=Conv(c_out, c_out)))
    return nn.Sequential(parts)


def encoder(p: AutoEncoderParams) -> nn.Sequential:
    """Image (B, 3, H, W) -> latent moments (B, 2 z, H/8, W/8): mean, log-variance."""
    widths, last, g = p.channels, len(p.channels) - 1, p.norm_num_groups
    down = [
        level(([p.ch] + widths)[i], widths[i], p.num_res_blocks, g, "down" if i < last else "")
        for i in range(last + 1)
    ]  # level i: (B, width, H/2^i, W/2^i)
    parts = OrderedDict(conv_in=Conv(p.in_channels, p.ch), down=nn.Sequential(*down))
    parts.update(mid=mid(widths[-1], g), norm_out=group_norm(widths[-1], g), silu=nn.SiLU())
    parts["conv_out"] = Conv(widths[-1], 2 * p.z_channels)
    return nn.Sequential(parts)


class Decoder(nn.Module):
    """Unscaled latent (B, z, h, w) -> image (B, 3, 8h, 8w)."""

    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        widths, last, g = p.channels, len(p.channels) - 1, p.norm_num_groups
        self.conv_in = Conv(p.z_channels, widths[-1])
        self.mid = mid(widths[-1], g)
        # up[i] runs at level i (finest = 0); the levels run from last to 0
        self.up = nn.ModuleList(
            level(widths[min(i + 1, last)], widths[i], p.num_res_blocks + 1, g, "up" if i else "")
            for i in range(last + 1)
        )
        self.norm_out = group_norm(widths[0], g)
        self.conv_out = Conv(widths[0], p.out_ch)

    def forward(self, z: Tensor) -> Tensor:
        return self.up_path(self.mid(self.conv_in(z)))  # (B, width, h, w) -> (B, 3, 8h, 8w)

    def up_path(self, h: Tensor) -> Tensor:
        """From the mid-block output to pixels: the up levels, norm and output conv."""
        for lvl in reversed(self.up):
            h = lvl(h)  # x2 in size except at level 0
        return self.conv_out(F.silu(self.norm_out(h)))


def set_circular(module: nn.Module, on: bool) -> None:
    """Switch circular width padding on or off in every 3x3 convolution inside `module`."""
    for m in module.modules():
        if isinstance(m, Conv):
            m.circular = on


def scale_latents(
    p: AutoEncoderParams,
    mean: Tensor,
    std: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Latents scale * (x - shift): x the mean, or with `std` mean + std * eps (eps: float32)."""
    if std is not None:
        device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
        mean = mean.float() + std.float() * eps.to(mean.device)
    return p.scale_factor * (mean - p.shift_factor)


class AutoEncoder(nn.Module):
    """The FLUX VAE; `set_circular` switches on the seam-free width padding."""

    def __init__(self, params: AutoEncoderParams) -> None:
        super().__init__()
        self.params = params
        self.encoder = encoder(params)
        self.decoder = Decoder(params)
        self.set_circular(False)

    def set_circular(self, decoder: bool, encoder: bool = False) -> None:
        """Circular width padding in the decoder's and the encoder's 3x3 convolutions."""
        set_circular(self.decoder, decoder)
        set_circular(self.encoder, encoder)
        self.circular = decoder

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std (B, 16, H/8, W/8) of the latent distribution, before scale/shift."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # clamped as diffusers does

    def encode(
        self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> latent: the posterior mean, or a sample of it."""
        mean, std = self.posterior(x)
        return scale_latents(self.params, mean, std if sample else None, generator)

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, 16, h, w) -> image (B, 3, 8h, 8w)."""
        return self.decoder(z / self.params.scale_factor + self.params.shift_factor)
