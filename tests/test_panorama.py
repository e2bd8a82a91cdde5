"""Panorama geometry: token helpers, projections vs py360convert, rotations, DiT360 loss grids."""

import math

import numpy as np
import py360convert
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from dit360.app import panorama as P
from dit360.app.options import EditOptions
from dit360.core.loss import loss_cube_faces, loss_yaw_rotation

# py360convert's list order is F R B L U D; ours is px nx py ny pz nz = R L U D F B.
OURS_TO_P3 = [1, 3, 4, 5, 0, 2]  # position of each of our faces in py360convert's list
P3_TO_OURS = [4, 0, 5, 1, 2, 3]  # position of each py360convert face in our order


def sphere_fn(dirs: torch.Tensor, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """A smooth random function on the sphere: per channel a quadratic in (x, y, z) -> (C, ...)."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.randn(channels, 3, generator=g, dtype=torch.float64)
    quad = torch.randn(channels, 3, 3, generator=g, dtype=torch.float64) * 0.5
    dirs = dirs.double()
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    quadratic = torch.einsum("cij,...i,...j->c...", quad, dirs, dirs)
    return torch.einsum("ci,...i->c...", lin, dirs) + quadratic


def smooth_pano(h: int, seed: int = 0) -> torch.Tensor:
    """A smooth random equirect image (1, 3, h, 2h), float64, seamless at the wrap and poles."""
    return sphere_fn(P.equirect_dirs(h, 2 * h, dtype=torch.float64), seed)[None]


def smooth_photo(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth random perspective image (1, 3, h, w), float64."""
    g = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(
        torch.linspace(-1, 1, h, dtype=torch.float64),
        torch.linspace(-1, 1, w, dtype=torch.float64),
        indexing="ij",
    )
    basis = torch.stack([torch.ones_like(u), u, v, u * v, u * u, v * v])  # (6, h, w)
    coeffs = torch.randn(3, 6, generator=g, dtype=torch.float64)
    return torch.einsum("ck,khw->chw", coeffs, basis)[None]


def to_np(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor -> (H, W, C) array for py360convert."""
    return x.permute(1, 2, 0).numpy()


def from_np(a: np.ndarray) -> torch.Tensor:
    """(H, W, C) array -> (C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)


def ptp(x: torch.Tensor) -> float:
    """Peak-to-peak range of a tensor."""
    return (x.amax() - x.amin()).item()


# --- tokens ------------------------------------------------------------------------------------


def test_pack_matches_flux_layout_and_roundtrips():
    """pack equals FluxPipeline._pack_latents' view/permute, unpack inverts it."""
    z = torch.randn(2, 16, 6, 10)
    ref = z.view(2, 16, 3, 2, 5, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 15, 64)
    assert_close(P.pack(z), ref, rtol=0, atol=0)
    assert_close(P.unpack(P.pack(z), 3, 5), z, rtol=0, atol=0)


def test_image_ids_and_wrap_pad():
    """Ids are (0, row, col); padded ids equal the wrapped ids; crop inverts wrap."""
    h, w = 3, 5
    ids = P.Grid(h, w, 0).ids()
    assert ids.shape == (1, h * w, 3)
    assert_close(ids[0, 2 * w + 4], torch.tensor([0.0, 2.0, 4.0]))
    grid = P.Grid(h, w, 2)
    padded = grid.ids(batch=3)
    assert padded.shape == (3, h * (w + 4), 3) == (3, grid.tokens, 3)
    assert padded[0, : w + 4, 2].tolist() == [3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert_close(padded, grid.wrap(ids).expand(3, -1, -1))
    x = torch.randn(2, h * w, 7)
    assert_close(P.Grid(h, w, 1).crop(P.Grid(h, w, 1).wrap(x)), x, rtol=0, atol=0)
    assert P.Grid(h, w, 0).wrap(x) is x
    z = torch.randn(2, 4, 2 * h, 2 * w)
    assert_close(grid.unpack(grid.pack(z)), z, rtol=0, atol=0)


def test_grid_masks():
    """Token masks from pixel masks (whole patches), and both pad modes of a token mask."""
    pixels = torch.ones(32, 48, dtype=torch.bool)
    pixels[3, 20] = False  # spoils token (0, 1)
    assert P.token_mask(pixels).tolist() == [True, False, True, True, True, True]
    keep = torch.tensor([[1, 0, 0, 0]], dtype=torch.bool)  # (h, w) = (1, 4)
    assert P.Grid(1, 4, 1).wrap_mask(keep.flatten(), "reference").tolist() == [1, 1, 0, 0, 0, 0]
    assert P.Grid(1, 4, 1).wrap_mask(keep.flatten(), "wrap").tolist() == [0, 1, 0, 0, 0, 1]
    assert P.Grid(1, 4, 0).wrap_mask(keep.flatten(), "wrap").tolist() == [1, 0, 0, 0]
    batched = P.Grid(1, 4, 1).wrap_mask(torch.stack([keep.flatten(), ~keep.flatten()]))
    assert batched.tolist() == [[0, 1, 0, 0, 0, 1], [1, 0, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match="mask_pad"):
        EditOptions(mask_pad="mirror", device="cpu")


# --- projections against py360convert -----------------------------------------------------------


def face_rays(face: int, tan_max: float = 1.0) -> torch.Tensor:
    """Directions (6, F, F, 3) of F x F face pixels whose centres span [-tan_max, tan_max]."""
    fov = 2 * math.degrees(math.atan(tan_max * face / (face - 1)))  # our rays sit at centres
    rays = P.camera_rays(face, face, fov, dtype=torch.float64)
    rots = torch.stack([P.rotation(*P.FACE_VIEWS[f]) for f in P.FACES])
    return torch.einsum("fij,hwj->fhwi", rots, rays)


@pytest.mark.parametrize("h,face", [(32, 16), (64, 32), (96, 40)])
def test_e2c_matches_py360convert(h, face):
    """Faces equal py360convert's e2p at each face view with aligned fov, and its e2c within
    0.35 ptp / F (its e2c puts face pixel centres on [-1, 1] corner to corner; ours at centres)."""
    x = smooth_pano(h)
    ours = P.equirect_to_cube(x, face)[0]  # (6, C, F, F)
    fov = 2 * math.degrees(math.atan((face - 1) / face))  # corner-aligned grid = our centres
    for i, name in enumerate(P.FACES):
        yaw, pitch = P.FACE_VIEWS[name]
        view = from_np(py360convert.e2p(to_np(x[0]), fov, yaw, pitch, (face, face)))
        assert_close(ours[i], view, rtol=0, atol=2e-6)
    theirs = py360convert.e2c(to_np(x[0]), face_w=face, cube_format="list")
    theirs = torch.stack([from_np(theirs[j]) for j in OURS_TO_P3])
    assert (ours - theirs).abs().max() < 0.35 * ptp(x) / face  # measured 0.29 ptp / F
    err_ours = (ours - sphere_fn(face_rays(face, (face - 1) / face)).transpose(0, 1)).abs().max()
    err_theirs = (theirs - sphere_fn(face_rays(face)).transpose(0, 1)).abs().max()
    assert err_ours < 1.1 * err_theirs  # both bilinear on the same image: equally accurate


@pytest.mark.parametrize("h,face", [(32, 16), (64, 32), (96, 40)])
def test_c2e_matches_py360convert(h, face):
    """c2e on py360convert's output grid agrees with its c2e within 0.8 ptp / F, and is closer to
    the true sphere function (py360convert samples its faces half a pixel off centre)."""
    x = smooth_pano(h)
    faces = P.equirect_to_cube(x, face)
    theirs = py360convert.c2e(
        [to_np(faces[0, i]) for i in P3_TO_OURS], h, 2 * h, cube_format="list"
    )
    lon = torch.linspace(-math.pi, math.pi, 2 * h, dtype=torch.float64)  # py360convert's c2e grid
    lat = torch.linspace(math.pi / 2, -math.pi / 2, h, dtype=torch.float64)
    lat, lon = torch.meshgrid(lat, lon, indexing="ij")
    dirs = torch.stack([lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()], dim=-1)
    ours, theirs = P.sample_cube(faces, dirs)[0], from_np(theirs)
    assert (ours - theirs).abs().max() < 0.8 * ptp(x) / face  # measured 0.68-0.72 ptp / F
    truth = sphere_fn(dirs)
    assert (ours - truth).abs().max() < 0.5 * (theirs - truth).abs().max()  # measured 0.32-0.39
    equi = P.cube_to_equirect(faces, h)
    assert equi.shape == (1, 3, h, 2 * h)
    assert (equi - x).abs().max() < 0.3 * ptp(x) / face  # measured 0.25-0.27 ptp / F


@pytest.mark.parametrize(
    "fov,yaw,pitch,roll,size",
    [(90, 0, 0, 0, (16, 16)), (60, 30, 20, 0, (12, 20)), (100, -120, -40, 25, (20, 16))],
)
def test_e2p_matches_py360convert(fov, yaw, pitch, roll, size):
    """e2p equals py360convert's e2p (same yaw/pitch/in_rot signs) with fov aligned to centres."""
    x = smooth_pano(48)
    ours = P.equirect_to_perspective(x, fov, yaw, pitch, roll, size)[0]
    h, w = size
    tx = math.tan(math.radians(fov) / 2)
    fovs = [2 * math.degrees(math.atan(t * (n - 1) / n)) for t, n in ((tx, w), (tx * h / w, h))]
    theirs = py360convert.e2p(to_np(x[0]), tuple(fovs), yaw, pitch, size, in_rot_deg=roll)
    assert_close(ours, from_np(theirs), rtol=0, atol=2e-6)


# --- perspective -> equirect ----------------------------------------------------------------------


def pixel_solid_angles(h: int) -> torch.Tensor:
    """Solid angle (h, 1) of one pixel in each row of an h x 2h equirect image."""
    top = math.pi / 2 - torch.arange(h, dtype=torch.float64) * math.pi / h
    return (math.pi / h * (top.sin() - (top - math.pi / h).sin()))[:, None]


@pytest.mark.parametrize(
    "fov,yaw,pitch,roll,size",
    [(90, 0, 0, 0, (24, 32)), (60, 150, 30, 20, (32, 24)), (120, -100, -50, -10, (16, 32))],
)
def test_perspective_roundtrip_and_mask_area(fov, yaw, pitch, roll, size):
    """p2e then e2p gives back the photo on its valid region; the mask's area is the fov's."""
    img = smooth_photo(*size)
    equi, mask = P.perspective_to_equirect(img, fov, yaw, pitch, roll, height=128)
    assert equi.shape == (1, 3, 128, 256) and mask.shape == (1, 1, 128, 256)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    back = P.equirect_to_perspective(equi, fov, yaw, pitch, roll, size)
    valid = P.equirect_to_perspective(mask, fov, yaw, pitch, roll, size) > 0.999
    assert valid.float().mean() > 0.9
    assert ((back - img).abs() * valid).max() < 0.01 * ptp(img)  # measured < 0.0075 ptp
    a = math.radians(fov)
    b = 2 * math.atan(math.tan(a / 2) * size[0] / size[1])
    omega = 4 * math.asin(math.sin(a / 2) * math.sin(b / 2))  # rectangular pyramid solid angle
    area = (mask[0, 0] * pixel_solid_angles(128)).sum().item()
    assert abs(area / omega - 1) < 0.003  # measured < 0.0011
    assert (equi * (1 - mask)).abs().max() == 0


# --- rotations and cube faces -------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, -3, 16])
def test_roll_equals_yaw_rotation(k):
    """A roll by k pixels equals rotate by a yaw of 360 k / W degrees."""
    x = torch.randn(2, 3, 16, 32, dtype=torch.float64)
    assert_close(P.rotate(x, 360 * k / 32), torch.roll(x, k, -1), rtol=0, atol=1e-10)
    assert_close(P.rotate(x.float(), 360 * k / 32), torch.roll(x.float(), k, -1), rtol=0, atol=3e-5)


def test_general_rotation_moves_views():
    """Looking along (yaw, pitch, roll) at a panorama rotated by them shows the original front."""
    x = smooth_pano(96)
    for yaw, pitch, roll in [(40, 0, 0), (-70, 35, 0), (150, -20, 30)]:
        turned = P.rotate(x, yaw, pitch, roll)
        view = P.equirect_to_perspective(turned, 80, yaw, pitch, roll, (24, 24))
        front = P.equirect_to_perspective(x, 80, 0, 0, 0, (24, 24))
        assert (view - front).abs().max() < 1e-3 * ptp(x)  # measured < 2.6e-4 ptp
    back = P.rotate(P.rotate(x, 0, 30, 0), 0, -30, 0)
    assert (back - x).abs().max() < 1e-3 * ptp(x)  # measured 3.5e-4 ptp


def test_cube_roundtrip_and_cross():
    """Six faces survive c2e -> e2c; each face sits at its place in the cross; cross edges meet."""
    face = 24
    faces = P.equirect_to_cube(smooth_pano(64), face)
    again = P.equirect_to_cube(P.cube_to_equirect(faces, 96), face)
    assert (again - faces).abs().max() < 0.01 * ptp(faces)  # measured 0.0044 ptp
    cross = P.cube_to_cross(faces)
    assert cross.shape == (1, 3, 3 * face, 4 * face)
    for i, name in enumerate(P.FACES):  # by position: cross rows and columns
        r, c = P.CROSS[name]
        tile = cross[..., r * face : (r + 1) * face, c * face : (c + 1) * face]
        assert_close(tile, faces[:, i], rtol=0, atol=0)
    cross, s, tol = cross[0], face, 0.04 * ptp(faces)  # measured <= 0.022 ptp; flipped: ~0.5
    for r in (face - 1, 2 * face - 1):  # py | pz and pz | ny horizontal edges
        assert (cross[:, r, s : 2 * s] - cross[:, r + 1, s : 2 * s]).abs().max() < tol
    for c in range(s - 1, 4 * s - 1, s):  # nx | pz | px | nz vertical edges
        assert (cross[:, s : 2 * s, c] - cross[:, s : 2 * s, c + 1]).abs().max() < tol


def test_dtypes_and_gradients():
    """Every projection keeps the image dtype and passes finite gradients, in bf16 too."""
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        x = torch.randn(2, 3, 16, 32, dtype=dtype, requires_grad=True)
        outs = [
            P.equirect_to_cube(x, 8),
            P.cube_to_equirect(P.equirect_to_cube(x, 8), 16),
            P.equirect_to_perspective(x, 90, 10, 20, 30, (8, 8)),
            P.perspective_to_equirect(x, 90, 10, 20, 30, 16)[0],
            P.rotate(x, 10, 20, 30),
            loss_yaw_rotation(x, 60),
            loss_cube_faces(x),
        ]
        assert all(o.dtype == dtype for o in outs)
        sum(o.float().sum() for o in outs).backward()
        assert x.grad.isfinite().all() and x.grad.abs().sum() > 0


# --- the DiT360 loss grids, written out from the reference definitions --------------------------


def ref_lat_range(h: int, w: int) -> tuple[float, float]:
    """Reference: latitudes of a centred crop of h rows from a panorama w/2 rows high."""
    full = w // 2
    start = (full - h) // 2
    return math.pi / 2 - math.pi * (start + h) / full, math.pi / 2 - math.pi * start / full


def ref_grid_sample(t: torch.Tensor, theta, phi, h: int, w: int) -> torch.Tensor:
    """Reference: lon/lat -> pixel over W-1 / H-1 -> [-1, 1] -> bilinear, border, corners."""
    lo, hi = ref_lat_range(h, w)
    u = (theta + math.pi) / (2 * math.pi) * (w - 1)
    v = (phi - lo) / (hi - lo) * (h - 1)
    grid = torch.stack([u / (w - 1) * 2 - 1, v / (h - 1) * 2 - 1], dim=-1)
    grid = grid.unsqueeze(0).repeat(t.shape[0], 1, 1, 1)
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=True)


def ref_yaw(t: torch.Tensor, deg: float) -> torch.Tensor:
    """Reference yaw loss rotation: 3-D rotation about y of the sphere grid, then grid_sample."""
    _, _, h, w = t.shape
    lo, hi = ref_lat_range(h, w)
    gv, gu = torch.meshgrid(torch.linspace(0, h - 1, h), torch.linspace(0, w - 1, w), indexing="ij")
    phi = lo + (hi - lo) * (gv / (h - 1))
    theta = -math.pi + 2 * math.pi * (gu / (w - 1))
    pts = torch.stack([phi.cos() * theta.sin(), phi.sin(), phi.cos() * theta.cos()], -1)
    pts = pts.to(t.dtype)
    a = np.deg2rad(deg)
    rot = torch.tensor([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    pts = torch.matmul(pts, rot.to(t.dtype).T)
    phi_r = torch.asin(torch.clamp(pts[..., 1], -1, 1))
    theta_r = torch.atan2(pts[..., 0], pts[..., 2])
    return ref_grid_sample(t, theta_r, phi_r, h, w)


def ref_cube(t: torch.Tensor) -> torch.Tensor:
    """Reference cube loss projection: faces +X -X +Y -Y +Z -Z of size H/2, each turned 90 CCW."""
    _, _, h, w = t.shape
    n = h // 2
    s = torch.linspace(-1, 1, n, dtype=t.dtype)
    a, b = torch.meshgrid(s, -s, indexing="ij")
    o = torch.ones_like(a)
    out = []
    for xyz in [(o, b, a), (-o, b, -a), (a, o, b), (a, -o, -b), (a, b, o), (-a, b, -o)]:
        d = torch.stack(xyz, dim=-1)
        d = d / torch.norm(d, dim=-1, keepdim=True)
        theta, phi = torch.atan2(d[..., 0], d[..., 2]), torch.asin(d[..., 1])
        out.append(torch.rot90(ref_grid_sample(t, theta, phi, h, w), k=1, dims=(-2, -1)))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("shape", [(2, 4, 16, 32), (1, 3, 24, 48), (2, 2, 12, 32)])
def test_loss_projections_match_reference(shape):
    """loss_yaw_rotation / loss_cube_faces equal the reference definitions (crops included)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for deg in (60, 180, 300, 17.5):
        assert_close(loss_yaw_rotation(x, deg), ref_yaw(x, deg))
    faces = loss_cube_faces(x)
    assert faces.shape == (shape[0], 6, shape[1], shape[2] // 2, shape[2] // 2)
    assert_close(faces, ref_cube(x))


# --- seam metrics ---------------------------------------------------------------------------------


def scharr_ds(strip: np.ndarray, c: float = 0.1) -> float:
    """The paper's DS of a strip (H, 6) restated with plain loops: rows reflected at the ends,
    |Scharr x-gradient| at columns 1..4, the two across the middle over those beside them."""
    h = strip.shape[0]
    a = np.concatenate([strip[1:2], strip, strip[-2:-1]])  # reflect: row -1 = row 1
    kernel = [[-3, 0, 3], [-10, 0, 10], [-3, 0, 3]]
    total = 0.0
    for y in range(1, h + 1):
        g = {}
        for x in range(1, 5):
            g[x] = abs(
                sum(kernel[i][j] * a[y + i - 1][x + j - 1] for i in range(3) for j in range(3))
            )
        total += g[2] / (g[1] + c) + g[3] / (g[4] + c)
    return total / (2 * h)


def test_discontinuity_score_restates_the_paper():
    """discontinuity_score equals a loop restatement of Christensen et al.'s DS on a hand-made
    strip, and takes the strip across the wrap (columns W-3 .. 2) of a wider image."""
    strip = np.array(
        [
            [0.20, 0.22, 0.25, 0.80, 0.82, 0.81],
            [0.21, 0.23, 0.24, 0.79, 0.80, 0.83],
            [0.30, 0.30, 0.31, 0.31, 0.32, 0.32],
            [0.10, 0.50, 0.10, 0.50, 0.10, 0.50],
            [0.00, 0.00, 0.00, 1.00, 1.00, 1.00],
        ]
    )
    expected = scharr_ds(strip)
    got = P.discontinuity_score(torch.from_numpy(strip), col=3)
    assert got.shape == () and abs(got.item() - expected) < 1e-12
    image = np.random.default_rng(0).random((5, 16))
    image[:, [13, 14, 15, 0, 1, 2]] = strip  # the wrap runs between columns 15 and 0
    assert abs(P.discontinuity_score(torch.from_numpy(image)).item() - expected) < 1e-12
    batch = torch.from_numpy(np.stack([image, image[::-1].copy()]))[:, None]  # (2, 1, 5, 16)
    assert P.discontinuity_score(batch).shape == (2, 1)
    with pytest.raises(ValueError, match="2 x 6"):
        P.discontinuity_score(torch.zeros(8, 5))
