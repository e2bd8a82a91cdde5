"""Training maths: noise levels, the masked flow-matching loss on wrap-padded tokens, DiT360's yaw
and cube losses, the hybrid schedule (docs/METHOD.md section 5), as DiT360's `src/dit360.py` and
`src/dit360_mix_staged.py`; the loss's projections are its `src/yaw_rotate.py`, `src/cube_map.py`
(grids over W-1 / H-1, row 0 at latitude -pi/2, border padding; ours float32). Time as sampling."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .grid import Grid, geo_dtype, pack
from .sampling import Conditioning, add_noise, predict, time_shift

YAW_ANGLES = (60.0, 180.0, 300.0)  # degrees, the reference's choices
LEVELS = 1000  # num_train_timesteps of the FLUX.1-dev scheduler
NORMS = ("sample", "token")  # flow_loss's normalisations


@dataclass(frozen=True)
class HybridSchedule:
    """DiT360's hybrid training by epoch: perspective rows, their weight, the yaw/cube epochs."""

    persp_from: int = 2  # first epoch with perspective rows (src/dynamic_dataset.py:132-136)
    persp_decay: float = 0.5  # of their share, epoch by epoch from persp_from on
    persp_weight: float = 0.5  # a perspective row's loss factor (dit360_mix_staged.py:263)
    aux_start: int = 2  # src/dit360.py:239; dit360_mix_staged.py:244 has 0 to 3
    aux_stop: int | None = None  # None: to the end

    def persp_count(self, n_persp: int, epoch: int) -> int:
        """Perspective rows in an epoch: none before persp_from, then max(1, int(n * decay**k)),
        k = epoch - persp_from + 1 (the reference: n * 0.5**(epoch - 1) from epoch 2)."""
        if epoch < self.persp_from or n_persp == 0:
            return 0
        return max(1, int(n_persp * self.persp_decay ** (epoch - self.persp_from + 1)))

    def aux_active(self, epoch: int) -> bool:
        """Whether the yaw and cube losses act in this epoch: aux_start <= epoch (< aux_stop)."""
        return epoch >= self.aux_start and (self.aux_stop is None or epoch < self.aux_stop)


@dataclass(frozen=True)
class LossConfig:
    """`flow_loss`'s normalisation ("sample", the reference's: a row's mean, counting rows; "token":
    counting supervised tokens), perspective weight, yaw/cube lambdas (0 = off), pad supervision."""

    norm: str = "sample"
    persp_weight: float = HybridSchedule.persp_weight
    lambda_yaw: float = 0.0
    lambda_cube: float = 0.0
    supervise_pad: bool = False

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r}: one of {', '.join(NORMS)}")


def _loss_lat_range(h: int, w: int) -> tuple[float, float]:
    """Latitudes of the first and last rows of a centred crop of height h of a w/2-high panorama."""
    full, top = w // 2, (w // 2 - h) // 2
    return math.pi / 2 - math.pi * (top + h) / full, math.pi / 2 - math.pi * top / full


def _loss_sample(x: Tensor, theta: Tensor, phi: Tensor, lat: tuple[float, float]) -> Tensor:
    """Sample x (B, C, H, W) at lon theta / lat phi grids as the reference does (W-1 spacing)."""
    # parity: the reference's grids, not panorama.py's pixel centres (see the module docstring)
    b, _, h, w = x.shape
    col = (theta + math.pi) / (2 * math.pi) * (w - 1)
    row = (phi - lat[0]) / (lat[1] - lat[0]) * (h - 1)
    grid = torch.stack([col / (w - 1) * 2 - 1, row / (h - 1) * 2 - 1], dim=-1)
    grid = grid.to(x.dtype).expand(b, *grid.shape)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def loss_yaw_rotation(x: Tensor, yaw: float) -> Tensor:
    """DiT360's yaw-loss rotation of x (B, C, H, W) by yaw degrees: out(lon) = x(lon + yaw)."""
    _, _, h, w = x.shape
    lat = _loss_lat_range(h, w)
    row = torch.arange(h, device=x.device, dtype=torch.float32)
    col = torch.arange(w, device=x.device, dtype=torch.float32)
    row, col = torch.meshgrid(row, col, indexing="ij")  # (H, W) each
    phi = lat[0] + (lat[1] - lat[0]) * (row / (h - 1))  # row 0 at the lower latitude
    theta = -math.pi + 2 * math.pi * (col / (w - 1))  # columns 0 and W-1 both on the seam
    xyz = torch.stack([phi.cos() * theta.sin(), phi.sin(), phi.cos() * theta.cos()], dim=-1)
    xyz = xyz.to(geo_dtype(x))
    c, s = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
    rot = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=xyz.dtype)
    xyz = xyz @ rot.to(x.device).T  # (H, W, 3)
    phi = torch.asin(xyz[..., 1].clamp(-1, 1))
    theta = torch.atan2(xyz[..., 0], xyz[..., 2])
    return _loss_sample(x, theta, phi, lat)


def loss_cube_faces(x: Tensor) -> Tensor:
    """DiT360's cube-loss projection of x (B, C, H, W) -> faces (B, 6, C, H/2, H/2), +-X +-Y +-Z."""
    _, _, h, w = x.shape
    t = torch.linspace(-1, 1, h // 2, device=x.device, dtype=geo_dtype(x))
    a, b = torch.meshgrid(t, -t, indexing="ij")  # a varies along rows, b along columns
    one = torch.ones_like(a)
    faces = [(one, b, a), (-one, b, -a), (a, one, b), (a, -one, -b), (a, b, one), (-a, b, -one)]
    xyz = torch.stack([torch.stack(f, dim=-1) for f in faces])  # (6, F, F, 3)
    xyz = xyz / xyz.norm(dim=-1, keepdim=True)
    xyz = torch.rot90(xyz, 1, dims=(1, 2))  # the reference turns each sampled face 90 deg CCW
    xyz = rearrange(xyz, "f h w c -> (f h) w c")  # the faces stacked, sampled at once
    theta, phi = torch.atan2(xyz[..., 0], xyz[..., 2]), torch.asin(xyz[..., 1])
    out = _loss_sample(x, theta, phi, _loss_lat_range(h, w))  # (B, C, 6F, F)
    return rearrange(out, "b c (f h) w -> b f c h w", f=6)  # (B, 6, C, F, F)


def sample_sigmas(
    batch: int, generator: torch.Generator, scheme: str = "none", mu: float | None = None
) -> Tensor:
    """Noise levels (batch,) float32 in {1/1000, ..., 1}: the scheduler's at int(u * 1000), u from
    SD3's densities ("none": uniform, "logit_normal", "mode"), diffusers' defaults; mu: a shift."""
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(batch, generator=generator, device=generator.device))
    else:
        u = torch.rand(batch, generator=generator, device=generator.device)
        if scheme == "mode":
            u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    index = (u * LEVELS).long().clamp(0, LEVELS - 1)  # clamped: a sigmoid can round to 1.0
    sigmas = (LEVELS - index).float() / LEVELS  # timesteps 1000 .. 1, divided by 1000
    return sigmas if mu is None else time_shift(mu, sigmas)


def draw_yaw(generator: torch.Generator) -> float:
    """A yaw angle for the yaw loss, uniform over YAW_ANGLES."""
    return YAW_ANGLES[int(torch.randint(len(YAW_ANGLES), (), generator=generator))]


def flow_loss(
    model: nn.Module,
    x0: Tensor,
    noise: Tensor,
    sigmas: Tensor,
    cond: Conditioning,
    token_mask: Tensor,
    grid: Grid,
    guidance: float | None = 1.0,
    config: LossConfig = LossConfig(),
    *,
    persp: Tensor | None = None,
    yaw: float | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Masked flow-matching loss -> (sum, count, detached "flow", "yaw", "cube" sums) for latents
    x0, noise (B, 16, 2h, 2w), sigmas (B,), token_mask (B, h*w) True = supervised, persp (B,)."""
    b, h, w = x0.shape[0], grid.h, grid.w
    if x0.shape[-2:] != (2 * h, 2 * w) or noise.shape != x0.shape:
        raise ValueError(f"latents {tuple(x0.shape)}, {tuple(noise.shape)} do not fit {grid}")
    if token_mask.shape != (b, h * w):
        raise ValueError(f"token_mask {tuple(token_mask.shape)} is not ({b}, {h * w})")
    if config.lambda_yaw and yaw is None:
        raise ValueError("lambda_yaw > 0 needs a yaw angle (draw_yaw)")
    x0, noise = x0.float(), noise.float()
    xt = add_noise(x0, noise, sigmas)  # (B, 16, 2h, 2w)
    target = noise - x0  # (B, 16, 2h, 2w)

    tokens = grid.pack(xt).to(dtype or x0.dtype)  # (B, tokens, 64)
    pred = predict(model, tokens, grid, cond, sigmas.to(x0.device), guidance).float()
    tgt, mask = pack(target), token_mask.to(x0.device)  # (B, h*w, 64), (B, h*w)
    pad = config.supervise_pad  # the pad tokens against the wrapped target, or cropped
    if pad:
        tgt, mask = grid.wrap(tgt), grid.wrap_mask(mask)  # (B, tokens, 64), (B, tokens)
    err = ((pred if pad else grid.crop(pred)) - tgt).square().mean(-1)  # like mask

    persp = (torch.zeros(b, dtype=torch.bool) if persp is None else persp).to(x0.device)
    count = mask.sum(-1)  # (B,)
    row_w = torch.where(persp, config.persp_weight, 1.0)  # (B,) float32
    if config.norm == "sample":  # a panorama row's mean; the persp rows' pooled mean x their number
        pooled = torch.where(persp, count[persp].sum(), count).clamp(min=1)
        row_w = row_w * torch.where(persp, persp.sum(), 1) / pooled  # nothing supervised adds 0
    # where, not a multiplication: masked tokens get exactly zero gradient, even from inf/nan.
    flow = (torch.where(mask, err, 0.0).sum(-1) * row_w).sum()
    parts = {"flow": flow, "yaw": flow.new_zeros(()), "cube": flow.new_zeros(())}

    full = mask.all(-1) & ~persp  # (B,) rows for yaw / cube
    if (config.lambda_yaw or config.lambda_cube) and full.any():
        p, t = grid.unpack(pred[full]), target[full]  # (B', 16, 2h, 2w) each
        scale = (row_w * count)[full]  # a row's mean: x1 (sample) or x its tokens (token)
        if config.lambda_yaw:
            d = loss_yaw_rotation(p, yaw) - loss_yaw_rotation(t, yaw)  # (B', 16, 2h, 2w)
            parts["yaw"] = (d.square().flatten(1).mean(1) * scale).sum()
        if config.lambda_cube:
            d = loss_cube_faces(p) - loss_cube_faces(t)  # (B', 6, 16, h, h)
            parts["cube"] = (d.square().flatten(1).mean(1) * scale).sum()
    total = flow + config.lambda_yaw * parts["yaw"] + config.lambda_cube * parts["cube"]
    n = count.sum() if config.norm == "token" else count.new_tensor(b)
    return total, n, {k: v.detach() for k, v in parts.items()}
