"""Training losses: noise-level sampling, the masked flow-matching loss on wrap-padded tokens, and
DiT360's yaw and cube losses. Time convention as in sampling.py: x_t = (1 - s) x0 + s noise,
target v = noise - x0.

Conventions learned from the reference (github.com/Insta360-Research-Team/DiT360):
- Noise levels (src/dit360.py:96-116, the same in src/dit360_mix_staged.py): u from diffusers'
  compute_density_for_timestep_sampling ("none" = uniform by default, train.py:90; "logit_normal"
  and "mode" are options), index = int(u * 1000), sigma = the FLUX.1-dev scheduler's sigma at that
  index = (1000 - index) / 1000. That scheduler has use_dynamic_shifting, so its training sigmas
  are not shifted; `mu` optionally shifts them with sampling.time_shift. Loss weighting
  (compute_loss_weighting_for_sd3, :200) is 1 for "none"; "sigma_sqrt" and "cosmap" are options.
- Latents sampled from the VAE posterior (:23-27), guidance 1.0 (train.sh), padding_n wrapped token
  columns on every forward, cropped before the loss (:128-191), squared error in float32 (:205-211).
- Perspective rows: squared error over the masked elements, x0.5 (dit360_mix_staged.py:250-263).
- Yaw / cube losses on the unpacked (B, 16, H/8, W/8) prediction and target (noise and x0 each
  projected), one angle from {60, 180, 300} per step (dit360.py:213-236), lambda 0.5 each
  (train.sh). Which epochs: src/dit360.py:239-242 (the train.py run) uses the main loss alone while
  `current_epoch < 2`, then adds both: on from epoch 2. src/dit360_mix_staged.py:244-248 adds them
  only while `current_epoch < 3` and only to batches whose masks are all white, but its launcher
  (train_mix_staged_lora_dynamic.sh) sets both lambdas and padding_n to 0. `aux_active` defaults
  to "from epoch 2" (DESIGN.md section 4); `aux_active(e, start=0, stop=3)` is the mix file's rule.

The yaw and cube projections reproduce the reference's (src/yaw_rotate.py, src/cube_map.py), which
differ from panorama.py's conventions: lon/lat grids spaced over W-1 / H-1 (column 0 and column
W-1 both at the seam), row 0 at latitude -pi/2, grid_sample with align_corners=True and border
padding, face size H/2. One deliberate difference: the reference builds its grids in the input
dtype, we build them in float32, so fp16/bf16 inputs are sampled at float32 positions rounded once.

Ours differs in the reduction, so that the caller can normalise by the global count of supervised
tokens over all ranks and micro-batches (torchtitan): `flow_loss` returns a SUM and a COUNT. Per
token the squared error is averaged over the 64 packed channels, so sum / count is the reference's
MSE for a batch of full-mask panoramas. A row's yaw and cube terms (per-row means, as the reference)
are counted with its number of supervised tokens, so for one panorama row (flow + 0.5 yaw + 0.5
cube) / count is the reference's loss. Perspective rows are weighted per token, not per row.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .panorama import Grid, geo_dtype, pack
from .sampling import Conditioning, add_noise, predict, time_shift

YAW_ANGLES = (60.0, 180.0, 300.0)  # degrees, the reference's choices
LEVELS = 1000  # num_train_timesteps of the FLUX.1-dev scheduler


# --- the yaw and cube losses' projections (reference conventions) ---------------------------------


def _loss_lat_range(h: int, w: int) -> tuple[float, float]:
    """Latitudes of the first and last rows of a centred crop of height h of a w/2-high panorama."""
    full = w // 2
    top = (full - h) // 2
    return math.pi / 2 - math.pi * (top + h) / full, math.pi / 2 - math.pi * top / full


def _loss_sample(x: Tensor, theta: Tensor, phi: Tensor, lat: tuple[float, float]) -> Tensor:
    """Sample x (B, C, H, W) at lon theta / lat phi grids as the reference does (W-1 spacing)."""
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
    rot = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=torch.float64)
    xyz = xyz @ rot.to(xyz.dtype).to(x.device).T  # (H, W, 3)
    phi = torch.asin(xyz[..., 1].clamp(-1, 1))
    theta = torch.atan2(xyz[..., 0], xyz[..., 2])
    return _loss_sample(x, theta, phi, lat)


def loss_cube_faces(x: Tensor) -> Tensor:
    """DiT360's cube-loss projection of x (B, C, H, W) -> faces (B, 6, C, H/2, H/2), +-X +-Y +-Z."""
    _, _, h, w = x.shape
    size = h // 2
    lat = _loss_lat_range(h, w)
    t = torch.linspace(-1, 1, size, device=x.device, dtype=geo_dtype(x))
    a, b = torch.meshgrid(t, -t, indexing="ij")  # a varies along rows, b along columns
    one = torch.ones_like(a)
    faces = [(one, b, a), (-one, b, -a), (a, one, b), (a, -one, -b), (a, b, one), (-a, b, -one)]
    xyz = torch.stack([torch.stack(f, dim=-1) for f in faces])  # (6, F, F, 3)
    xyz = xyz / xyz.norm(dim=-1, keepdim=True)
    xyz = torch.rot90(xyz, 1, dims=(1, 2))  # the reference turns each sampled face 90 deg CCW
    theta = torch.atan2(xyz[..., 0], xyz[..., 2])
    phi = torch.asin(xyz[..., 1])
    out = _loss_sample(
        x, rearrange(theta, "f h w -> (f h) w"), rearrange(phi, "f h w -> (f h) w"), lat
    )
    return rearrange(out, "b c (f h) w -> b f c h w", f=6)  # (B, 6, C, F, F)


# --- noise levels and the loss ------------------------------------------------------------------


def sample_sigmas(
    batch: int,
    generator: torch.Generator | None = None,
    scheme: str = "none",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    mu: float | None = None,
) -> Tensor:
    """Noise levels (batch,) float32 in {1/1000, ..., 1}, on the generator's device.

    scheme: "none" (uniform), "logit_normal" or "mode" (SD3's densities); mu: optional shift.
    """
    device = generator.device if generator is not None else "cpu"
    if scheme == "logit_normal":
        u = torch.randn(batch, generator=generator, device=device) * logit_std + logit_mean
        u = torch.sigmoid(u)
    else:
        u = torch.rand(batch, generator=generator, device=device)
        if scheme == "mode":
            u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    index = (u * LEVELS).long().clamp(0, LEVELS - 1)  # clamped: a sigmoid can round to 1.0
    sigmas = (LEVELS - index).float() / LEVELS  # timesteps 1000 .. 1, divided by 1000
    return sigmas if mu is None else time_shift(mu, sigmas)


def loss_weights(sigmas: Tensor, scheme: str = "none") -> Tensor:
    """Per-row loss weights (B,) of SD3's weighting schemes; 1 for "none"."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)


def draw_yaw(generator: torch.Generator | None = None) -> float:
    """A yaw angle for the yaw loss, uniform over YAW_ANGLES."""
    return YAW_ANGLES[int(torch.randint(len(YAW_ANGLES), (), generator=generator))]


def aux_active(epoch: int, start: int = 2, stop: int | None = None) -> bool:
    """Whether the yaw and cube losses are on in this epoch: start <= epoch (< stop)."""
    return epoch >= start and (stop is None or epoch < stop)


def flow_loss(
    model: nn.Module,
    x0: Tensor,
    noise: Tensor,
    sigmas: Tensor,
    cond: Conditioning,
    token_mask: Tensor,
    grid: Grid,
    guidance: float | None = 1.0,
    *,
    persp: Tensor | None = None,
    persp_weight: float = 0.5,
    weighting: str = "none",
    lambda_yaw: float = 0.0,
    lambda_cube: float = 0.0,
    yaw: float | None = None,
    supervise_pad: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Masked flow-matching loss -> (loss sum, supervised token count, detached parts).

    x0, noise: latents (B, 16, 2h, 2w) for grid (h, w tokens, grid.pad wrapped columns a side);
    sigmas (B,); token_mask (B, h*w) bool, True = supervised; persp (B,) bool rows weighted by
    persp_weight. The model sees x_t packed and wrap-padded, in `dtype` (default x0's), through
    sampling.predict. The prediction is cropped before the loss, unless supervise_pad: then the
    pad tokens are supervised against the wrapped target (and counted). Yaw / cube terms (weights
    lambda_yaw / lambda_cube; 0 = off) apply to panorama rows whose mask is all white.
    parts: "flow", "yaw", "cube" sums before the lambdas (0 when off), like the loss sum.
    """
    b, h, w = x0.shape[0], grid.h, grid.w
    if x0.shape[-2:] != (2 * h, 2 * w) or noise.shape != x0.shape:
        raise ValueError(f"latents {tuple(x0.shape)}, {tuple(noise.shape)} do not fit {grid}")
    if token_mask.shape != (b, h * w):
        raise ValueError(f"token_mask {tuple(token_mask.shape)} is not ({b}, {h * w})")
    x0, noise = x0.float(), noise.float()
    xt = add_noise(x0, noise, sigmas)  # (B, 16, 2h, 2w)
    target = noise - x0  # (B, 16, 2h, 2w)

    tokens = grid.pack(xt).to(dtype or x0.dtype)  # (B, tokens, 64)
    pred = predict(model, tokens, grid, cond, sigmas.to(x0.device), guidance).float()
    tgt, mask = pack(target), token_mask.to(x0.device)  # (B, h*w, 64), (B, h*w)
    if supervise_pad:
        tgt = grid.wrap(tgt)  # (B, tokens, 64): pad tokens target the wrapped grid
        mask = grid.wrap_mask(mask)
        err = (pred - tgt).square().mean(-1)  # (B, tokens)
    else:
        err = (grid.crop(pred) - tgt).square().mean(-1)  # (B, h*w)

    row_w = loss_weights(sigmas, weighting).to(x0.device)  # (B,)
    if persp is not None:
        persp = persp.to(x0.device)
        row_w = torch.where(persp, row_w * persp_weight, row_w)
    # where, not a multiplication: masked tokens get exactly zero gradient, even from inf/nan.
    flow = (torch.where(mask, err, 0.0).sum(-1) * row_w).sum()
    count = mask.sum(-1)  # (B,)
    total = flow
    parts = {"flow": flow.detach(), "yaw": flow.new_zeros(()), "cube": flow.new_zeros(())}

    full = mask.all(-1) if persp is None else mask.all(-1) & ~persp  # (B,) rows for yaw / cube
    if (lambda_yaw or lambda_cube) and full.any():
        p = grid.unpack(pred[full])  # (B', 16, 2h, 2w)
        t = target[full]
        scale = (row_w * count)[full]  # each row's mean counts like its supervised tokens
        if lambda_yaw:
            if yaw is None:
                raise ValueError("lambda_yaw > 0 needs a yaw angle (draw_yaw)")
            d = loss_yaw_rotation(p, yaw) - loss_yaw_rotation(t, yaw)  # (B', 16, 2h, 2w)
            parts["yaw"] = (d.square().flatten(1).mean(1) * scale).sum()
            total = total + lambda_yaw * parts["yaw"]
        if lambda_cube:
            d = loss_cube_faces(p) - loss_cube_faces(t)  # (B', 6, 16, h, h)
            parts["cube"] = (d.square().flatten(1).mean(1) * scale).sum()
            total = total + lambda_cube * parts["cube"]
    parts = {k: v.detach() for k, v in parts.items()}
    return total, count.sum(), parts
