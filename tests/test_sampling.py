"""Sampling against diffusers' FluxPipeline and an independent re-statement of DiT360's wrap."""

from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from dit360.app.generate import generate_latents
from dit360.app.options import SampleOptions
from dit360.app.text import encode
from dit360.core.sampling import Conditioning, noise, schedule, shift_mu
from dit360.load.weights import load_flux

PROMPT = "This is a panorama. A castle on a hill at sunset."


@pytest.fixture(scope="module")
def pipe(tiny_flux):
    """diffusers' FluxPipeline on the tiny random FLUX.1-dev folder, float32."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux, torch_dtype=torch.float32)


@pytest.mark.parametrize("steps,seq_len", [(28, 8320), (28, 8192), (4, 48), (50, 4096)])
def test_schedule_matches_diffusers(pipe, steps, seq_len):
    """Shifted sigmas equal the FLUX.1-dev scheduler's bit for bit for the same token count."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = pipe.scheduler
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    assert shift_mu(seq_len) == pytest.approx(calculate_shift(seq_len), abs=1e-12)
    assert torch.equal(schedule(steps, seq_len), sched.sigmas)


def test_noise_matches_diffusers():
    """Seeded CPU float32 noise equals diffusers' randn_tensor for the same seed."""
    from diffusers.utils.torch_utils import randn_tensor

    g = torch.Generator("cpu").manual_seed(7)
    expected = randn_tensor((1, 16, 128, 256), generator=g, dtype=torch.float32)
    assert torch.equal(noise(7, 1, 1024, 2048), expected)


def opts(tiny_flux, **kw) -> SampleOptions:
    base = dict(base=tiny_flux, lora=None, height=32, width=96, steps=3, device="cpu")
    return SampleOptions(**{**base, "dtype": torch.float32, **kw})


@pytest.fixture(scope="module")
def ours(tiny_flux):
    """Our transformer and conditioning from the tiny folder."""
    cond = Conditioning(*encode(tiny_flux, [PROMPT], "cpu", torch.float32))
    return load_flux(tiny_flux, "cpu", torch.float32), cond


def test_plain_flux_latents_match_pipeline(pipe, ours, tiny_flux):
    """--wrap-pad 0 is plain FLUX: the latents equal FluxPipeline's, seed for seed."""
    o = opts(tiny_flux, wrap_pad=0, seed=3)
    got = generate_latents(*ours, o)
    packed = pipe(
        PROMPT,
        height=o.height,
        width=o.width,
        num_inference_steps=o.steps,
        guidance_scale=o.guidance,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="latent",
    ).images
    expected = pipe._unpack_latents(packed, o.height, o.width, 8)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


def reference_wrap(pipe, o: SampleOptions, pad: int) -> torch.Tensor:
    """DiT360's sampling re-stated on diffusers' parts: pad noise and ids once, shift from the
    padded length, never re-sync, crop before unpacking."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.utils.torch_utils import randn_tensor

    h, w = o.height // 16, o.width // 16
    txt, vec, txt_ids = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=512)
    g = torch.Generator("cpu").manual_seed(o.seed)
    z = randn_tensor((1, 16, 2 * h, 2 * w), generator=g, dtype=torch.float32)
    x = pipe._pack_latents(z, 1, 16, 2 * h, 2 * w).reshape(1, h, w, 64)
    x = torch.cat([x[:, :, w - pad :], x, x[:, :, :pad]], dim=2).reshape(1, -1, 64)
    ids = pipe._prepare_latent_image_ids(1, h, w, "cpu", torch.float32).reshape(h, w, 3)
    ids = torch.cat([ids[:, w - pad :], ids, ids[:, :pad]], dim=1).reshape(-1, 3)
    sched = pipe.scheduler
    sched.set_timesteps(
        sigmas=np.linspace(1.0, 1 / o.steps, o.steps), mu=calculate_shift(x.shape[1])
    )
    guidance = torch.full((1,), o.guidance)
    with torch.no_grad():
        for t in sched.timesteps:
            v = pipe.transformer(
                hidden_states=x,
                timestep=t.expand(1) / 1000,
                guidance=guidance,
                pooled_projections=vec,
                encoder_hidden_states=txt,
                txt_ids=txt_ids,
                img_ids=ids,
                return_dict=False,
            )[0]
            x = sched.step(v, t, x, return_dict=False)[0]
    x = x.reshape(1, h, w + 2 * pad, 64)[:, :, pad : pad + w].reshape(1, -1, 64)
    return pipe._unpack_latents(x, o.height, o.width, 8)


@pytest.mark.parametrize("pad", [1, 2])
def test_wrap_pad_latents_match_reference(pipe, ours, tiny_flux, pad):
    """--wrap-pad N: latents equal diffusers' transformer driven on padded latents and ids."""
    o = opts(tiny_flux, wrap_pad=pad, seed=5)
    assert_close(generate_latents(*ours, o), reference_wrap(pipe, o, pad), rtol=1e-5, atol=1e-5)


def test_pad_columns_stay_in_sync(ours, tiny_flux):
    """A pad token and the column it copies share value and id, so the transformer moves them
    alike: re-syncing the pad columns would change nothing beyond round-off (so we never do)."""
    from dit360.app.panorama import Grid
    from dit360.memory.ahead import denoise

    model, cond = ours
    grid = Grid(2, 6, 1)
    x = grid.pack(noise(2, 1, 32, 96))
    with torch.no_grad():
        out = denoise(model, x, grid, cond, schedule(4, grid.tokens), 2.8)
    assert_close(out, grid.wrap(grid.crop(out)), rtol=1e-5, atol=1e-5)
    assert (out - x).abs().max() > 0.1  # the latents did move


@pytest.mark.parametrize("scale", [4.0, 1.0])
def test_true_cfg_latents_match_pipeline(pipe, ours, tiny_flux, scale):
    """--negative-prompt with --true-cfg: the latents equal FluxPipeline's with negative_prompt
    and true_cfg_scale (at 1 the negative prompt is ignored, as there), and differ from plain."""
    negative = "blurry, a seam"
    model, cond = ours
    neg = Conditioning(*encode(tiny_flux, [negative], "cpu", torch.float32))
    with pytest.warns(UserWarning, match="ignored") if scale == 1 else nullcontext():
        o = opts(tiny_flux, wrap_pad=0, seed=5, negative_prompt=negative, true_cfg=scale)
    got = generate_latents(model, cond, o, negative=neg if o.negative() else None)
    packed = pipe(
        PROMPT,
        negative_prompt=negative,
        true_cfg_scale=scale,
        height=o.height,
        width=o.width,
        num_inference_steps=o.steps,
        guidance_scale=o.guidance,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="latent",
    ).images
    assert_close(got, pipe._unpack_latents(packed, o.height, o.width, 8), rtol=1e-5, atol=1e-5)
    plain = generate_latents(model, cond, opts(tiny_flux, wrap_pad=0, seed=5))
    assert (got - plain).abs().max() > 1e-2 if scale > 1 else torch.equal(got, plain)
