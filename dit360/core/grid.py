"""The panoramic token layout (DiT360): latents packed into 2x2-patch tokens, each token row
wrap-padded with copies of the opposite edge's columns, image position ids, token masks."""

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

PATCH = 16  # pixels per packed token side: the VAE's x8, then 2x2 packing


def pack(z: Tensor) -> Tensor:
    """Latents (B, C, H, W) -> tokens (B, H/2*W/2, C*4) of 2x2 patches, channels (c ph pw)."""
    return rearrange(z, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """Tokens (B, h*w, C*4) -> latents (B, C, 2h, 2w); h, w count packed tokens."""
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=2, pw=2)


def token_mask(mask: Tensor) -> Tensor:
    """Pixel mask (..., H, W) bool -> (..., H/16 * W/16): True where the whole patch is True."""
    patches = rearrange(mask, "... (h ph) (w pw) -> ... (h w) (ph pw)", ph=PATCH, pw=PATCH)
    return patches.all(dim=-1)


@dataclass(frozen=True)
class Grid:
    """The packed token grid of an image, h x w tokens, and its panoramic wrap (DiT360): each
    row padded [last `pad` cols | row | first `pad` cols], a pad token with its copy's image id."""

    h: int
    w: int
    pad: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.pad <= self.w:  # wider: fewer columns copied than `tokens` counts
            raise ValueError(f"pad must be 0 to w ({self.w}) token columns, got {self.pad}")

    @classmethod
    def for_image(cls, height: int, width: int, pad: int = 1) -> "Grid":
        """The grid of a height x width image: VAE x8, then 2x2 packing."""
        if height % PATCH or width % PATCH or height <= 0 or width <= 0:
            raise ValueError(f"height and width: multiples of 16 over 0, got {height}x{width}")
        return cls(height // PATCH, width // PATCH, pad)

    @property
    def tokens(self) -> int:
        return self.h * (self.w + 2 * self.pad)

    def wrap(self, x: Tensor) -> Tensor:
        """Tokens (B, h*w, C) -> (B, h*(w+2*pad), C), columns [last pad | grid | first pad]."""
        if self.pad == 0:
            return x
        g = rearrange(x, "b (h w) c -> b h w c", h=self.h)
        g = torch.cat([g[:, :, self.w - self.pad :], g, g[:, :, : self.pad]], dim=2)
        return rearrange(g, "b h w c -> b (h w) c")

    def crop(self, x: Tensor) -> Tensor:
        """Inverse of `wrap`: tokens (B, h*(w+2*pad), C) -> (B, h*w, C)."""
        if self.pad == 0:
            return x
        g = rearrange(x, "b (h w) c -> b h w c", h=self.h)
        return rearrange(g[:, :, self.pad : self.pad + self.w], "b h w c -> b (h w) c")

    def pack(self, z: Tensor) -> Tensor:
        """Latents (B, C, 2h, 2w) -> padded tokens (B, tokens, 4C)."""
        return self.wrap(pack(z))

    def unpack(self, x: Tensor) -> Tensor:
        """Padded tokens (B, tokens, 4C) -> latents (B, C, 2h, 2w), the pad columns cropped."""
        return unpack(self.crop(x), self.h, self.w)

    def ids(self, batch: int = 1, device=None) -> Tensor:
        """Image position ids (batch, tokens, 3) = (0, row, col); a pad column has its copy's."""
        cols = torch.arange(self.w, device=device)
        cols = torch.cat([cols[self.w - self.pad :], cols, cols[: self.pad]])
        ids = torch.zeros(self.h, len(cols), 3, device=device)
        ids[..., 1] = torch.arange(self.h, device=device)[:, None]
        ids[..., 2] = cols[None, :]
        return ids.reshape(1, -1, 3).expand(batch, -1, -1)

    def wrap_mask(self, mask: Tensor, mode: str = "wrap") -> Tensor:
        """Mask (..., h*w) -> (..., tokens): "wrap" as latents, "reference" [first|mask|last]."""
        if mode == "wrap":
            flat = self.wrap(mask.reshape(-1, self.h * self.w, 1))  # (B', tokens, 1)
            return flat.reshape(*mask.shape[:-1], self.tokens)
        g = mask.unflatten(-1, (self.h, self.w))  # parity: the reference's quirk (--mask-pad)
        g = torch.cat([g[..., : self.pad], g, g[..., self.w - self.pad :]], dim=-1)
        return g.flatten(-2)


def geo_dtype(x: Tensor) -> torch.dtype:
    """The dtype sampling grids are built in: float64 for float64 images, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
