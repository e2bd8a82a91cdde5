"""Tiled VAE decoding: the up path in overlapping tiles, blended, so activation memory is bounded
by the tile size (`--vae-tile`); and a progress bar over the VAE's stages (`stages`), for a slow
device (at 1024x2048 on a CPU a decode takes minutes)."""

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.autoencoder import AutoEncoder, scale_latents, set_circular


def _starts(n: int, tile: int, overlap: int, wrap: bool) -> list[int]:
    """Tile starts over n, neighbours sharing ~`overlap`: around a circle (wrap) or flush."""
    if tile >= n:
        return [0]
    step = tile - overlap
    if wrap:
        count = math.ceil(n / step)
        return [round(i * n / count) for i in range(count)]
    count = math.ceil((n - overlap) / step)
    return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def _ramp(n: int, ramp: int) -> Tensor:
    """Blend weights along a tile: rising linearly over `ramp` pixels at both ends, never 0."""
    x = torch.arange(n) + 0.5
    return (torch.minimum(x, n - x) / max(ramp, 1)).clamp(max=1.0)


@contextmanager
def stages(modules: list[nn.Module], desc: str, total: int) -> Iterator[None]:
    """A progress bar `desc` of `total` ticks, one per forward of one of `modules` (hooked)."""
    bar = tqdm(total=total, desc=desc, unit="stage", leave=False, disable=None)

    def tick(*_: object) -> None:  # None: the module's output stays as it is
        bar.update()

    hooks = [m.register_forward_hook(tick) for m in modules]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        bar.close()


def encode(vae: AutoEncoder, x: Tensor, eps: Tensor | None = None) -> Tensor:
    """Image (B, 3, H, W) -> scaled latents in x's dtype, with a progress bar: the posterior mean,
    or with `eps` (float32, the latents' shape) the sample mean + std * eps."""
    enc = vae.encoder
    with stages([*enc.down, enc.mid], "encode", len(enc.down) + 1):
        mean, std = vae.posterior(x)
    mean = mean if eps is None else mean.float() + std.float() * eps.to(mean.device)
    return scale_latents(vae.params, mean).to(x.dtype)


def decode(
    vae: AutoEncoder, z: Tensor, tile: int | None = None, overlap: int | None = None
) -> Tensor:
    """Latent (B, 16, h, w) -> image (B, 3, 8h, 8w), with a progress bar; tiles bound memory."""
    dec, f = vae.decoder, vae.params.factor  # f: image pixels per latent pixel
    h, w = z.shape[-2:]
    if tile is None or (tile >= h and tile >= w):
        with stages([dec.mid, *dec.up], "decode", 1 + len(dec.up)):
            return vae.decode(z)
    overlap = tile // 4 if overlap is None else overlap
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap {overlap}, tile {tile}")
    # conv_in and the mid block (attention over all h*w latent pixels) run on the whole latent; the
    # up path, whose activations dominate memory, on tile x tile latent pixels at a time. Each tile
    # has its own GroupNorm statistics and zero-padded borders, so the result differs from the
    # untiled decode; the blend over `overlap` hides the seams. Circular: tiles wrap the width.
    z = z / vae.params.scale_factor + vae.params.shift_factor
    th, tw = min(tile, h), min(tile, w)
    rows, cols = _starts(h, tile, overlap, False), _starts(w, tile, overlap, vae.circular)
    win = _ramp(th * f, overlap * f)[:, None] * _ramp(tw * f, overlap * f)  # (8 th, 8 tw)
    win = win.to(z.device)  # blending is done in float32 whatever the model's dtype
    out = z.new_zeros(z.shape[0], dec.conv_out.out_channels, h * f, w * f, dtype=torch.float32)
    total = z.new_zeros(h * f, w * f, dtype=torch.float32)
    ticks = 1 + len(dec.up) * len(rows) * len(cols)  # the mid block, each tile's up levels
    with stages([dec.mid, *dec.up], "decode", ticks):
        mid = dec.mid(dec.conv_in(z))  # (B, width, h, w)
        # One tile across the whole width wraps onto itself; narrower tiles are zero-padded.
        set_circular(dec, vae.circular and len(cols) == 1)
        try:
            for r, c in itertools.product(rows, cols):
                cols_z = torch.arange(c, c + tw, device=z.device) % w
                x = dec.up_path(mid[:, :, r : r + th, cols_z])  # (B, 3, 8 th, 8 tw)
                px = torch.arange(c * f, (c + tw) * f, device=z.device) % (w * f)
                out[:, :, r * f : (r + th) * f].index_add_(3, px, x.float() * win)
                total[r * f : (r + th) * f].index_add_(1, px, win)
        finally:
            set_circular(dec, vae.circular)
    return (out / total).to(z.dtype)
