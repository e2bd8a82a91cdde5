"""Training losses: noise levels, the masked flow loss, yaw / cube terms, cached vs uncached."""

import json
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny import SCHEDULER_CONFIG, randomize
from torch import nn

from dit360.app.panorama import Grid
from dit360.core.autoencoder import scale_latents
from dit360.core.loss import (
    YAW_ANGLES,
    HybridSchedule,
    LossConfig,
    draw_yaw,
    flow_loss,
    loss_cube_faces,
    loss_yaw_rotation,
    sample_sigmas,
)
from dit360.core.model import Flux
from dit360.core.sampling import Conditioning, time_shift
from dit360.load.config import AutoEncoderParams, FluxParams
from dit360.train.data import Source, encoded, epoch_order, load_batch, read_rows

PARAMS = FluxParams(
    hidden_size=32,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=(4, 6, 6),
    context_in_dim=32,
    vec_in_dim=24,
)
GRID = Grid.for_image(64, 128)  # 4 x 8 tokens, 1 pad column a side; latents (16, 8, 16)
TOKEN, SAMPLE, YAW = LossConfig("token"), LossConfig("sample"), LossConfig(lambda_yaw=0.5)


@pytest.fixture(scope="module")
def model() -> Flux:
    """A tiny random FLUX transformer."""
    return randomize(Flux(PARAMS), 0)


class Capture(nn.Module):
    """Wraps a model and keeps its last output, with its gradient."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        self.out = self.model(*args)
        if self.out.requires_grad:
            self.out.retain_grad()
        return self.out


class Tokenwise(nn.Module):
    """A model with no token mixing, so x0 at one token affects that token's loss only."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, img, img_ids, txt, txt_ids, t, y, guidance):
        return self.lin(img) * (1 + t[:, None, None])


def inputs(b: int, seed: int = 0):
    """Latents x0 and noise (B, 16, 8, 16), sigmas (B,), text conditioning."""
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, b, 16, 8, 16, generator=g)
    sigmas = torch.rand(b, generator=g)
    cond = Conditioning(
        torch.randn(b, 8, 32, generator=g), torch.zeros(b, 8, 3), torch.randn(b, 24)
    )
    return x0, noise, sigmas, cond


# --- an independent restatement of the token layout and the model call -----------------------
# Written from the conventions (FLUX 2x2 packing, DiT360 wrap padding), with plain reshape /
# permute / index gathers; nothing here calls dit360's pack, wrap_pad, wrap_crop or predict.


def ref_pack(z: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, H, W) -> tokens (B, H/2 * W/2, 4C): 2x2 patches, channel order (c ph pw)."""
    b, c, hh, ww = z.shape
    z = z.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5)  # b h w c ph pw
    return z.reshape(b, (hh // 2) * (ww // 2), 4 * c)


def ref_unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens (B, h*w, 4C) -> latents (B, C, 2h, 2w), the inverse of ref_pack."""
    b, _, c4 = x.shape
    x = x.reshape(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # b c h ph w pw
    return x.reshape(b, c4 // 4, 2 * h, 2 * w)


def ref_columns(w: int, pad: int) -> list[int]:
    """The grid column each padded token column copies: [last pad | grid | first pad]."""
    return [w - pad + i for i in range(pad)] + list(range(w)) + list(range(pad))


def ref_pad(x: torch.Tensor, h: int, w: int, pad: int) -> torch.Tensor:
    """Tokens (B, h*w, C) -> (B, h*(w+2pad), C), each row's columns gathered by ref_columns."""
    cols = ref_columns(w, pad)
    return x.reshape(x.shape[0], h, w, -1)[:, :, cols].reshape(x.shape[0], h * len(cols), -1)


def ref_crop(x: torch.Tensor, h: int, w: int, pad: int) -> torch.Tensor:
    """Tokens (B, h*(w+2pad), C) -> (B, h*w, C): the middle w columns of each row."""
    grid = x.reshape(x.shape[0], h, w + 2 * pad, -1)[:, :, pad : pad + w]
    return grid.reshape(x.shape[0], h * w, -1)


def ref_ids(b: int, h: int, w: int, pad: int) -> torch.Tensor:
    """Image ids (B, h*(w+2pad), 3) = (0, row, col); a pad column has the id of its copy."""
    ids = [[0.0, float(r), float(c)] for r in range(h) for c in ref_columns(w, pad)]
    return torch.tensor(ids).expand(b, -1, -1)


def ref_velocity(model, tokens, h, w, pad, cond: Conditioning, sigmas) -> torch.Tensor:
    """The model called directly on padded tokens; guidance 1.0, timesteps = sigmas.

    The model takes round_to_model_dtype(sigma * 1000) / 1000: in float32 that is sigma.
    """
    b = tokens.shape[0]
    ids, guidance = ref_ids(b, h, w, pad), torch.full((b,), 1.0)
    return model(
        tokens, ids, cond.txt, torch.zeros(b, cond.txt.shape[1], 3), sigmas, cond.vec, guidance
    )


def test_restatement_matches_diffusers_layout():
    """The restated packing and ids agree with diffusers' FluxPipeline; pads copy the far edge."""
    from diffusers import FluxPipeline

    z = torch.randn(2, 16, 8, 16)
    assert torch.equal(ref_pack(z), FluxPipeline._pack_latents(z, 2, 16, 8, 16))
    assert torch.equal(ref_unpack(ref_pack(z), 4, 8), z)
    assert torch.equal(
        ref_ids(1, 4, 8, 0)[0],
        FluxPipeline._prepare_latent_image_ids(1, 4, 8, "cpu", torch.float32),
    )
    x = torch.arange(4 * 8).view(1, 32, 1)
    rows = ref_pad(x, 4, 8, 2).view(4, 12)
    assert rows[0].tolist() == [6, 7, *range(8), 0, 1] and torch.equal(rows[:, 2:10], x.view(4, 8))
    assert torch.equal(ref_crop(ref_pad(x, 4, 8, 2), 4, 8, 2), x)


def partial_mask(b: int) -> torch.Tensor:
    """(B, 32) token masks with the left half of the grid supervised."""
    m = torch.zeros(b, 4, 8, dtype=torch.bool)
    m[:, :, :4] = True
    return m.flatten(1)


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode"])
def test_sigmas_match_reference_sampling(scheme):
    """Same draws as diffusers' density + FLUX.1-dev's scheduler lookup, as the reference does."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    config = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}
    sched = FlowMatchEulerDiscreteScheduler(**config)
    u = compute_density_for_timestep_sampling(
        scheme, 256, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(5)
    )
    timesteps = sched.timesteps[(u * 1000).long()]
    index = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    ours = sample_sigmas(256, torch.Generator().manual_seed(5), scheme)
    assert torch.equal(ours, sched.sigmas[index])
    assert ((ours * 1000).round() / 1000 == ours).all() and ours.min() > 0 and ours.max() <= 1


def test_sigmas_shift_shares_sampling_code():
    """With mu, the training sigmas go through sampling.time_shift."""
    plain = sample_sigmas(16, torch.Generator().manual_seed(1))
    shifted = sample_sigmas(16, torch.Generator().manual_seed(1), mu=1.15)
    assert torch.equal(shifted, time_shift(1.15, plain))


def test_flow_loss_matches_restatement(model):
    """Sum over supervised tokens of the channel-mean squared error on the cropped prediction."""
    x0, noise, sigmas, cond = inputs(2)
    mask = partial_mask(2)
    with torch.no_grad():
        loss, count, parts = flow_loss(model, x0, noise, sigmas, cond, mask, GRID, config=TOKEN)
        rows, n_rows, _ = flow_loss(model, x0, noise, sigmas, cond, mask, GRID, config=SAMPLE)
        s = sigmas.view(2, 1, 1, 1)
        tokens = ref_pad(ref_pack((1 - s) * x0 + s * noise), 4, 8, 1)  # (2, 4 * 10, 64)
        pred = ref_crop(ref_velocity(model, tokens, 4, 8, 1, cond, sigmas), 4, 8, 1)
        err = (pred - ref_pack(noise - x0)).square().mean(-1)  # (2, 32)
    torch.testing.assert_close(loss, err[mask].sum())
    assert count == 32 and parts["yaw"] == 0 and parts["cube"] == 0
    row_means = [err[i][mask[i]].mean() for i in range(2)]  # "sample": each row's mean, summed
    torch.testing.assert_close(rows, sum(row_means))
    assert n_rows == 2
    # Two perspective rows: DiT360 pools their supervised elements (one torch.cat, then the mean)
    # x 0.5, the batch's loss; "sample" sums it once per row.
    persp, mask[1, :8] = torch.ones(2, dtype=torch.bool), True  # 16 and 20 tokens: pooling is
    with torch.no_grad():  # not the mean of the row means
        pooled, n_rows, _ = flow_loss(
            model, x0, noise, sigmas, cond, mask, GRID, config=SAMPLE, persp=persp
        )
    torch.testing.assert_close(pooled, 2 * 0.5 * err[mask].mean())
    assert n_rows == 2


def test_supervise_pad_targets_the_wrapped_grid(model):
    """With supervise_pad the pad columns are supervised against the wrapped target, and counted."""
    grid = Grid(4, 8, pad=2)
    x0, noise, sigmas, cond = inputs(1)
    mask, pad = partial_mask(1), LossConfig("token", supervise_pad=True)
    with torch.no_grad():
        loss, count, _ = flow_loss(model, x0, noise, sigmas, cond, mask, grid, config=pad)
        s = sigmas.view(1, 1, 1, 1)
        tokens = ref_pad(ref_pack((1 - s) * x0 + s * noise), 4, 8, 2)  # (1, 4 * 12, 64)
        pred = ref_velocity(model, tokens, 4, 8, 2, cond, sigmas)
        err = (pred - ref_pad(ref_pack(noise - x0), 4, 8, 2)).square().mean(-1)  # (1, 4 * 12)
    padded = ref_pad(mask[..., None], 4, 8, 2)[..., 0]  # (1, 4 * 12): pad cols 6, 7 | 0, 1
    assert count == padded.sum() == 4 * (4 + 2)
    torch.testing.assert_close(loss, err[padded].sum())


def test_masked_prediction_gets_zero_gradient(model):
    """Masked and pad tokens of the prediction get exactly zero gradient; supervised ones do not."""
    x0, noise, sigmas, cond = inputs(2)
    mask = partial_mask(2)
    cap = Capture(model)
    loss, _, _ = flow_loss(cap, x0, noise, sigmas, cond, mask, GRID, config=YAW, yaw=60.0)
    loss.backward()
    grad = cap.out.grad.view(2, 4, 10, 64)  # padded grid
    inner = grad[:, :, 1:9].reshape(2, 32, 64)
    assert (inner[~mask] == 0).all() and (grad[:, :, [0, 9]] == 0).all()
    assert (inner[mask].abs().sum(-1) > 0).all()


def test_masked_x0_gets_zero_gradient():
    """With a token-wise model, x0 at masked tokens gets exactly zero gradient."""
    torch.manual_seed(0)
    x0, noise, sigmas, cond = inputs(2)
    x0.requires_grad_(True)
    mask = partial_mask(2)
    loss, _, _ = flow_loss(Tokenwise(), x0, noise, sigmas, cond, mask, GRID)
    loss.backward()
    per_channel = mask[..., None].expand(-1, -1, 64).float()  # (2, 32, 64)
    pixel_mask = ref_unpack(per_channel, 4, 8).bool()  # (2, 16, 8, 16)
    assert (x0.grad[~pixel_mask] == 0).all() and (x0.grad[pixel_mask] != 0).all()


@pytest.mark.parametrize("norm", ["sample", "token"])
def test_black_perspective_row_contributes_nothing(model, norm):
    """An all-black perspective row adds nothing to the loss and no gradient to the model; it
    counts as a row ("sample", as the reference's loss of 0 in its step's mean), no tokens."""
    x0, noise, sigmas, cond = inputs(2)
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[1] = False
    persp = torch.tensor([False, True])
    both, count, _ = flow_loss(
        model, x0, noise, sigmas, cond, mask, GRID, config=LossConfig(norm), persp=persp
    )
    one = Conditioning(cond.txt[:1], cond.txt_ids[:1], cond.vec[:1])
    alone, _, _ = flow_loss(
        model, x0[:1], noise[:1], sigmas[:1], one, mask[:1], GRID, config=LossConfig(norm)
    )
    torch.testing.assert_close(both, alone)
    assert count == {"sample": 2, "token": 32}[norm]
    row = Conditioning(cond.txt[1:], cond.txt_ids[1:], cond.vec[1:])
    model.zero_grad(set_to_none=True)
    loss, count, _ = flow_loss(
        model,
        x0[1:],
        noise[1:],
        sigmas[1:],
        row,
        mask[1:],
        GRID,
        config=LossConfig(norm),
        persp=persp[1:],
    )
    loss.backward()
    assert loss == 0 and count == {"sample": 1, "token": 0}[norm]
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_perspective_rows_weigh_half(model):
    """A perspective row counts x0.5 (the reference's weight), per supervised token."""
    x0, noise, sigmas, cond = inputs(1)
    mask = partial_mask(1)
    with torch.no_grad():
        pano, _, _ = flow_loss(model, x0, noise, sigmas, cond, mask, GRID)
        persp, _, _ = flow_loss(
            model, x0, noise, sigmas, cond, mask, GRID, persp=torch.tensor([True])
        )
    torch.testing.assert_close(persp, 0.5 * pano)


def test_yaw_and_cube_terms_match_restatement(model):
    """Yaw and cube terms equal the reference's per-row formulas, on full panorama rows only."""
    x0, noise, sigmas, cond = inputs(3)
    mask = torch.ones(3, 32, dtype=torch.bool)
    mask[2, 5] = False  # a partial panorama: no yaw / cube
    persp = torch.tensor([False, True, False])  # a perspective row: no yaw / cube
    cap = Capture(model)
    with torch.no_grad():
        loss, count, parts = flow_loss(
            cap, x0, noise, sigmas, cond, mask, GRID,
            config=LossConfig("token", lambda_yaw=0.5, lambda_cube=0.25), persp=persp, yaw=300.0,
        )  # fmt: skip
    pred = ref_unpack(ref_crop(cap.out[:1], 4, 8, 1), 4, 8)  # row 0 only, (1, 16, 8, 16)
    n, x, p = noise[:1], x0[:1], pred
    yaw = loss_yaw_rotation(p, 300.0) - (loss_yaw_rotation(n, 300.0) - loss_yaw_rotation(x, 300.0))
    cube = loss_cube_faces(p) - (loss_cube_faces(n) - loss_cube_faces(x))
    torch.testing.assert_close(parts["yaw"], yaw.square().mean() * 32)
    torch.testing.assert_close(parts["cube"], cube.square().mean() * 32)
    torch.testing.assert_close(loss, parts["flow"] + 0.5 * parts["yaw"] + 0.25 * parts["cube"])
    assert count == 32 + 32 + 31
    # One full panorama row: loss / count is the reference's loss_v + l_yaw * yaw + l_cube * cube.
    with torch.no_grad():
        loss, count, _ = flow_loss(
            cap, x0[:1], noise[:1], sigmas[:1], Conditioning(cond.txt[:1], cond.txt_ids[:1],
            cond.vec[:1]), mask[:1], GRID, config=LossConfig(lambda_yaw=0.5, lambda_cube=0.25),
            yaw=300.0,
        )  # fmt: skip
    mse = (ref_unpack(ref_crop(cap.out, 4, 8, 1), 4, 8) - (n - x)).square().mean()
    expected = mse + 0.5 * yaw.square().mean() + 0.25 * cube.square().mean()
    torch.testing.assert_close(loss / count, expected)


def test_yaw_draw_and_aux_epochs():
    """Yaw angles come from {60, 180, 300}, seeded; aux losses are on from epoch 2 by default."""
    draws = [draw_yaw(torch.Generator().manual_seed(i)) for i in range(30)]
    assert set(draws) == set(YAW_ANGLES)
    assert draws == [draw_yaw(torch.Generator().manual_seed(i)) for i in range(30)]
    assert [HybridSchedule().aux_active(e) for e in range(5)] == [False, False, True, True, True]
    window = HybridSchedule(aux_start=0, aux_stop=3)
    assert [window.aux_active(e) for e in range(5)] == [True, True, True, False, False]
    with pytest.raises(ValueError, match="yaw"):
        x0, noise, sigmas, cond = inputs(1)
        mask = partial_mask(1) | True
        flow_loss(Tokenwise(), x0, noise, sigmas, cond, mask, GRID, config=LossConfig(lambda_yaw=1))
    with pytest.raises(ValueError, match="norm 'mean': one of sample, token"):
        LossConfig("mean")


# --- cached vs uncached ------------------------------------------------------------------------


def fake_encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic 'VAE' that commutes with flips and 8-pixel rolls: 8x8 means, mixed."""
    w = torch.linspace(-1, 1, 48).view(16, 3)
    mean = torch.einsum("oc,bchw->bohw", w, F.avg_pool2d(x, 8))  # (B, 16, H/8, W/8)
    return mean, 0.05 + 0.1 * mean.abs()


def fake_text(captions: list[str]):
    """Deterministic 'text encoders' keyed by the caption."""
    gens = [torch.Generator().manual_seed(zlib.crc32(c.encode())) for c in captions]
    txt = torch.stack([torch.randn(8, 32, generator=g) for g in gens])
    vec = torch.stack([torch.randn(24, generator=g) for g in gens])
    return txt, torch.zeros(len(captions), 8, 3), vec


def epoch_losses(model, source: Source, epoch: int, encode) -> list[torch.Tensor]:
    """The loss of every sample of an epoch, each with step-seeded noise, sigma and latents."""
    out = []
    for step, item in enumerate(epoch_order(source, epoch)):
        batch = load_batch(source, epoch, [item])
        gen = torch.Generator().manual_seed(1000 * epoch + step)
        mean, std, cond = encoded(batch, encode, fake_text)
        z = scale_latents(AutoEncoderParams(), mean, std, gen)
        noise = torch.randn(z.shape, generator=gen)
        sigmas = sample_sigmas(1, gen)
        with torch.no_grad():
            loss, _, _ = flow_loss(
                model, z, noise, sigmas, cond, batch.token_mask, GRID,
                config=LossConfig(lambda_yaw=0.5, lambda_cube=0.5), persp=batch.persp,
                yaw=draw_yaw(gen),
            )  # fmt: skip
        out.append(loss)
    return out


@pytest.fixture(scope="module")
def panoramas(tmp_path_factory):
    """Three random 64x128 panoramas and their rows."""
    root = tmp_path_factory.mktemp("panos")
    rows = []
    for i in range(3):
        rgb = np.random.default_rng(i).integers(0, 256, (64, 128, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "caption": f"panorama {i}"}))
    (root / "pano.jsonl").write_text("\n".join(rows))
    return read_rows(root / "pano.jsonl")["pano"]


def test_cached_and_uncached_give_the_same_loss(model, panoramas, tmp_path):
    """The cache path (both flips cached, latents rolled) gives the uncached loss, same seeds."""
    from dit360.train.data import build_cache

    build_cache(panoramas, tmp_path, 64, "fake", fake_encode, fake_text)
    plain = Source(panoramas, [], height=64, seed=7)
    cached = Source(panoramas, [], height=64, seed=7, cache_dir=tmp_path, model_id="fake")
    for epoch in range(3):
        a = epoch_losses(model, plain, epoch, fake_encode)
        b = epoch_losses(model, cached, epoch, fake_encode)
        torch.testing.assert_close(torch.stack(a), torch.stack(b))


def test_cache_with_circular_vae_matches(model, panoramas, tmp_path):
    """With a real (tiny) VAE whose encoder wraps the width, cached rolls match to round-off."""
    from dit360.core.autoencoder import AutoEncoder
    from dit360.train.data import build_cache

    torch.manual_seed(0)
    params = AutoEncoderParams(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_num_groups=4)
    ae = AutoEncoder(params).eval()
    ae.set_circular(False, encoder=True)
    build_cache(panoramas, tmp_path, 64, "tiny-vae", ae.posterior, fake_text)
    plain = Source(panoramas, [], height=64, seed=3)
    cached = Source(panoramas, [], height=64, seed=3, cache_dir=tmp_path, model_id="tiny-vae")
    with torch.no_grad():
        a = torch.stack(epoch_losses(model, plain, 0, ae.posterior))
        b = torch.stack(epoch_losses(model, cached, 0, ae.posterior))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
