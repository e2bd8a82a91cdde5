"""Panorama geometry: projections (equirect, cube, perspective, a photo onto the canvas),
rotations, the seam metric; `Grid` is core/grid.py's, the losses' projections core/loss.py's.
Conventions are py360convert's (our oracle): equirect (B, C, H, W), W = 2H, pixel centres at
lon = 2 pi (j + 0.5) / W - pi, lat = pi/2 - pi (i + 0.5) / H, direction (cos(lat) sin(lon),
sin(lat), cos(lat) cos(lon)). Views in degrees: yaw turns right, pitch looks up, roll turns the
camera clockwise (u_deg, v_deg, in_rot_deg); fov horizontal, pixels square. Cube faces
(B, 6, C, F, F) in three.js order px nx py ny pz nz (py360convert's F R B L U D = pz px nz nx py
ny), upright 90-degree views; py (up) and ny (down) have the front (pz) at their nearest edge.
Masks are 1 where valid; grids float32 (float64 for float64 images).
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor

from ..core.grid import PATCH, Grid, geo_dtype, pack, token_mask, unpack  # noqa: F401
from ..load.image import from_pil, open_image, to_pil
from .options import check_height

FACES = ("px", "nx", "py", "ny", "pz", "nz")
# Degrees a perspective view may take (edit.py --photo, prepare.py): fov, and the orientation.
VIEW_RANGES = {"fov": (1, 179), "yaw": (-180, 180), "pitch": (-90, 90), "roll": (-180, 180)}
# The (yaw, pitch) of each face's view, in FACES order.
FACE_VIEWS = dict(zip(FACES, [(90, 0), (-90, 0), (0, 90), (0, -90), (0, 0), (180, 0)], strict=True))
CROSS = {"py": (0, 1), "nx": (1, 0), "pz": (1, 1), "px": (1, 2), "nz": (1, 3), "ny": (2, 1)}


def rotation(yaw: float, pitch: float = 0.0, roll: float = 0.0) -> Tensor:
    """Camera-to-world rotation (3, 3) float64 of a view, R = R_y(yaw) R_x(pitch) R_z(roll)."""
    y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
    ry = [[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]]
    rx = [[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]]
    rz = [[math.cos(r), math.sin(r), 0], [-math.sin(r), math.cos(r), 0], [0, 0, 1]]
    ry, rx, rz = (torch.tensor(m, dtype=torch.float64) for m in (ry, rx, rz))
    return ry @ rx @ rz  # columns: camera right, up, forward in world coordinates


FACE_ROTATIONS = torch.stack([rotation(*FACE_VIEWS[f]) for f in FACES])  # (6, 3, 3) float64


def equirect_dirs(h: int, w: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Unit directions (h, w, 3) of the pixel centres of an h x w equirectangular image."""
    lon = (torch.arange(w, device=device, dtype=dtype) + 0.5) * (2 * math.pi / w) - math.pi
    lat = math.pi / 2 - (torch.arange(h, device=device, dtype=dtype) + 0.5) * (math.pi / h)
    lat, lon = torch.meshgrid(lat, lon, indexing="ij")  # (h, w) each
    return torch.stack([lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()], dim=-1)


def camera_rays(h: int, w: int, fov: float, dtype: torch.dtype, device=None) -> Tensor:
    """Rays (h, w, 3) = (tan x, tan y, 1) through the pixel centres of a camera with this fov."""
    tx = math.tan(math.radians(fov) / 2)
    ty = tx * h / w
    x = ((torch.arange(w, device=device, dtype=dtype) + 0.5) * (2 / w) - 1) * tx
    y = (1 - (torch.arange(h, device=device, dtype=dtype) + 0.5) * (2 / h)) * ty
    y, x = torch.meshgrid(y, x, indexing="ij")  # (h, w) each
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)


def sample_equirect(x: Tensor, dirs: Tensor) -> Tensor:
    """Sample equirect x (B, C, H, W) along directions (h, w, 3) -> (B, C, h, w), seamlessly."""
    b, _, h, w = x.shape
    # One pixel of context so interpolation is seamless: the row beyond a pole is the edge row
    # half a turn away, the column beyond the seam is the opposite edge column.
    x = torch.cat([x[:, :, :1].roll(w // 2, -1), x, x[:, :, -1:].roll(w // 2, -1)], dim=2)
    x = torch.cat([x[..., -1:], x, x[..., :1]], dim=3)  # (B, C, H+2, W+2)
    lon = torch.atan2(dirs[..., 0], dirs[..., 2])
    lat = torch.atan2(dirs[..., 1], torch.hypot(dirs[..., 0], dirs[..., 2]))
    col = (lon + math.pi) * (w / (2 * math.pi)) + 0.5  # pixel centre j -> j + 1 in the padded image
    row = (math.pi / 2 - lat) * (h / math.pi) + 0.5
    grid = torch.stack([col * (2 / (w + 1)) - 1, row * (2 / (h + 1)) - 1], dim=-1)  # (h, w, 2)
    grid = grid.to(x.dtype).expand(b, -1, -1, -1)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=True)


def equirect_to_perspective(
    x: Tensor, fov: float, yaw: float, pitch: float, roll: float, size: tuple[int, int]
) -> Tensor:
    """Perspective view (B, C, h, w), size = (h, w), of the equirect image x (B, C, H, W)."""
    dtype = geo_dtype(x)
    rot = rotation(yaw, pitch, roll).to(dtype).to(x.device)
    rays = camera_rays(*size, fov, device=x.device, dtype=dtype)  # (h, w, 3)
    return sample_equirect(x, rays @ rot.T)


def perspective_to_equirect(
    img: Tensor, fov: float, yaw: float, pitch: float, roll: float, height: int
) -> tuple[Tensor, Tensor]:
    """Perspective image (B, C, h, w) -> equirect canvas (B, C, H, 2H), its mask (B, 1, H, 2H)."""
    b, _, h, w = img.shape
    if not 0 < fov < 180:
        raise ValueError(f"fov must be in (0, 180) degrees, got {fov}")
    dtype = geo_dtype(img)
    rot = rotation(yaw, pitch, roll).to(dtype).to(img.device)
    cam = equirect_dirs(height, 2 * height, img.device, dtype) @ rot  # (H, W, 3) in the camera's
    tx = math.tan(math.radians(fov) / 2)
    ty = tx * h / w
    depth = cam[..., 2].clamp_min(1e-6)
    u, v = cam[..., 0] / (depth * tx), cam[..., 1] / (depth * ty)  # image plane, [-1, 1] inside
    valid = (cam[..., 2] > 0) & (u.abs() <= 1) & (v.abs() <= 1)  # (H, W)
    grid = torch.stack([u, -v], dim=-1).clamp(-2, 2).to(img.dtype).expand(b, -1, -1, -1)
    out = F.grid_sample(img, grid, padding_mode="border", align_corners=False)
    mask = valid.to(img.dtype).expand(b, 1, -1, -1)
    return out * mask, mask


def project_photo(
    img: Image.Image, fov: float, yaw: float, pitch: float, roll: float, height: int
) -> tuple[Image.Image, Image.Image]:
    """An RGB photo (horizontal `fov`, view yaw/pitch/roll) in an H x 2H canvas, and its mask."""
    for (name, (lo, hi)), v in zip(VIEW_RANGES.items(), (fov, yaw, pitch, roll), strict=True):
        if not (isinstance(v, int | float) and lo <= v <= hi):  # NaN, text too
            raise ValueError(f"--{name} must be {lo} to {hi} degrees, got {v!r}")
    check_height("--height (height)", height)
    img = open_image(img)  # a PIL image (a tensor: TypeError)
    # The width whose centre pixels match the canvas resolution at the equator.
    target = max(1, round(2 * height * math.tan(math.radians(fov) / 2) / math.pi))
    if img.width > target:  # downscale with antialiasing first; bilinear sampling would alias
        img = img.resize((target, max(1, round(img.height * target / img.width))), Image.LANCZOS)
    x = from_pil(img, unit=True)[None]  # (1, 3, h, w)
    with torch.no_grad():
        canvas, mask = perspective_to_equirect(x, fov, yaw, pitch, roll, height)
    mask = Image.fromarray((mask[0, 0] * 255).to(torch.uint8).numpy(), "L")
    return to_pil(canvas[0], unit=True), mask


def equirect_to_cube(x: Tensor, face_size: int) -> Tensor:
    """Equirect (B, C, H, W) -> cube faces (B, 6, C, F, F) in FACES order, F = face_size."""
    dtype = geo_dtype(x)
    rays = camera_rays(face_size, face_size, 90.0, device=x.device, dtype=dtype)  # (F, F, 3)
    rots = FACE_ROTATIONS.to(dtype).to(x.device)
    dirs = torch.einsum("fij,hwj->fhwi", rots, rays)  # (6, F, F, 3)
    out = sample_equirect(x, rearrange(dirs, "f h w i -> (f h) w i"))  # (B, C, 6F, F)
    return rearrange(out, "b c (f h) w -> b f c h w", f=6)


def sample_cube(faces: Tensor, dirs: Tensor) -> Tensor:
    """Sample cube faces (B, 6, C, F, F) along directions (h, w, 3) -> (B, C, h, w)."""
    dtype = geo_dtype(faces)
    rots = FACE_ROTATIONS.to(dtype).to(faces.device)
    cam = torch.einsum("fji,hwj->fhwi", rots, dirs.to(dtype))  # (6, h, w, 3) in each face's camera
    face = cam[..., 2].argmax(dim=0)  # (h, w) the face each direction hits
    cam = cam.gather(0, face[None, ..., None].expand(1, -1, -1, 3))[0]  # (h, w, 3)
    u, v = cam[..., 0] / cam[..., 2], cam[..., 1] / cam[..., 2]  # in [-1, 1] on that face
    # A 3-D grid_sample with the face index as depth: the trilinear weights are 0/1 in depth.
    depth = (2 * face + 1) / 6 - 1
    grid = torch.stack([u, -v, depth.to(dtype)], dim=-1).to(faces.dtype)  # (h, w, 3)
    grid = grid.expand(faces.shape[0], 1, -1, -1, -1)  # (B, 1, h, w, 3)
    volume = rearrange(faces, "b f c h w -> b c f h w")
    out = F.grid_sample(volume, grid, padding_mode="border", align_corners=False)
    return out[:, :, 0]  # (B, C, h, w)


def cube_to_equirect(faces: Tensor, height: int, width: int | None = None) -> Tensor:
    """Cube faces (B, 6, C, F, F) in FACES order -> equirect (B, C, height, width = 2 height)."""
    dirs = equirect_dirs(height, width or 2 * height, faces.device, geo_dtype(faces))
    return sample_cube(faces, dirs)


def cube_to_cross(faces: Tensor) -> Tensor:
    """Faces (B, 6, C, F, F) -> the horizontal cross (B, C, 3F, 4F), black outside the faces."""
    b, _, c, s, _ = faces.shape
    out = faces.new_zeros(b, c, 3 * s, 4 * s)
    for i, name in enumerate(FACES):
        r, k = CROSS[name]  # horizontal cross: py above pz, then nx pz px nz, ny below pz
        out[:, :, r * s : (r + 1) * s, k * s : (k + 1) * s] = faces[:, i]
    return out


def rotate(x: Tensor, yaw: float, pitch: float = 0.0, roll: float = 0.0) -> Tensor:
    """Rotate equirect x (B, C, H, W): content at d moves to R d (yaw 360 k / W = roll by k)."""
    dtype = geo_dtype(x)
    rot = rotation(yaw, pitch, roll).to(dtype).to(x.device)
    dirs = equirect_dirs(*x.shape[-2:], x.device, dtype)  # (H, W, 3)
    return sample_equirect(x, dirs @ rot)  # row-vector d @ R = R^T d, the source direction


# The horizontal Scharr kernel, as OpenCV's (not normalised): rows weighted 3 10 3.
SCHARR_X = ((-3.0, 0.0, 3.0), (-10.0, 0.0, 10.0), (-3.0, 0.0, 3.0))


def discontinuity_score(gray: Tensor, col: int = 0, c: float = 0.1) -> Tensor:
    """Discontinuity Score (Christensen et al. 2024, arXiv 2407.18207) (...,) of grey images
    (..., H, W) in [0, 1] across the boundary left of column `col` (0: the wrap); lower: better."""
    # With a the strip of columns col-3 .. col+2 (wrapping) and g = |Scharr_x(a)| at its columns
    # 1 .. 4 (rows reflected, OpenCV's default border): DS = 1/(2H) sum_y [g(2, y) / (g(1, y) + c)
    # + g(3, y) / (g(4, y) + c)], the gradient across the boundary relative to the one beside it.
    # (The paper weights DS over a representation's borders: an equirectangular image has one.)
    h, w = gray.shape[-2:] if gray.ndim >= 2 else (0, 0)
    if h < 2 or w < 6 or not gray.is_floating_point() or not c > 0:  # else NaN or any number
        raise ValueError(
            f"the Discontinuity Score is of float grey images (..., H, W) of at least 2 x 6 pixels "
            f"in [0, 1] and c > 0, got {gray.dtype} {[*gray.shape]} and c = {c}"
        )
    strip = gray.roll(3 - col, dims=-1)[..., :6].reshape(-1, 1, h, 6)  # (N, 1, H, 6)
    strip = F.pad(strip, (0, 0, 1, 1), mode="reflect")  # (N, 1, H+2, 6)
    kernel = torch.tensor(SCHARR_X, dtype=strip.dtype, device=strip.device)[None, None]
    g = F.conv2d(strip, kernel)[:, 0].abs()  # (N, H, 4): columns 1 .. 4 of the strip
    ratio = g[..., 1] / (g[..., 0] + c) + g[..., 2] / (g[..., 3] + c)  # (N, H)
    return (ratio.mean(-1) / 2).reshape(gray.shape[:-2])
