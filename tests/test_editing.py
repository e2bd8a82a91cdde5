"""Editing (RF-Inversion + token replacement) against an independent re-statement of DiT360's
editing on diffusers' transformer, its properties, and edit.py end to end on the tiny model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clitest import expect_error
from PIL import Image
from torch.testing import assert_close

import edit as edit_cli
from dit360.app.editing import EditJob, check_mask, edit, invert, read_source, rf_params
from dit360.app.options import EditOptions
from dit360.app.panorama import Grid
from dit360.app.text import encode
from dit360.core import editing as core
from dit360.core.editing import feather, paste_back, rows
from dit360.core.sampling import Conditioning, schedule
from dit360.load.image import read_mask
from dit360.load.weights import load_flux

SOURCE = "This is a panorama. A village by a lake under snow mountains."
PROMPT = "This is a panorama. A city by a lake at sunset."
H, W = 2, 4  # packed token grid: a 32x64 image
STEPS = 6  # sigmas 1, .89, .76, .61 (> 0.5: swap + blend), .44, .24 at this token count
DEFAULT = EditOptions()
VARIED = EditOptions(gamma=0.6, eta=0.7, start=0.2, stop=0.8, tau=0.3, blend_until=0.7)


@pytest.fixture(scope="module")
def pipe(tiny_flux):
    """diffusers' FluxPipeline on the tiny random FLUX.1-dev folder, float32."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def ours(tiny_flux):
    """Our transformer and the conditioning rows ["", SOURCE, PROMPT]."""
    cond = Conditioning(*encode(tiny_flux, ["", SOURCE, PROMPT], "cpu", torch.float32))
    return load_flux(tiny_flux, "cpu", torch.float32), cond


def tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpadded packed source latents, inversion noise and target noise, each (1, H*W, 64)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, H * W, 64, generator=g) for _ in range(3))


KEEP = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)  # (H, W): first col kept


# --- the reference, re-stated on diffusers' parts -------------------------------------------------


class Replace:
    """Personalize-Anything on diffusers' attention: while t > tau the target's (batch 1) image
    hidden states at the mask take the source's (batch 0), in place, before q/k/v."""

    def __init__(self, mask: torch.Tensor, tau: float, txt_len: int):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.mask, self.tau, self.txt_len, self.plain = mask, tau, txt_len, FluxAttnProcessor()

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
        image_rotary_emb=None, timestep=None,
    ):  # fmt: skip
        if timestep > self.tau:  # single blocks see [txt | img]; the reference skips 512 tokens
            img = hidden_states if encoder_hidden_states is not None else hidden_states[:, 512:]
            assert encoder_hidden_states is not None or self.txt_len == 512
            img[1:, self.mask] = img[0, self.mask]  # the target (and its negative row)
        return self.plain(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
        )


def pad1(x: torch.Tensor) -> torch.Tensor:
    """[last col | grid | first col] of (B, H*W, C) tokens, written out."""
    g = x.reshape(x.shape[0], H, W, -1)
    return torch.cat([g[:, :, -1:], g, g[:, :, :1]], dim=2).reshape(x.shape[0], -1, x.shape[-1])


def reference(
    pipe, x0, y1, z, keep, o: EditOptions, steps=STEPS, guidance=3.5, calls=None, negative=None
):
    """DiT360's pa_src/pipeline.py `invert` then `__call__` with editing.py's mask and the
    PersonalizeAnything processor; inverted and target latents (1, H*(W+2), 64), padded. With a
    `negative` prompt, true CFG (o.true_cfg) as FluxPipeline's on a third row, the target with
    the negative prompt and the same replacement."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    calls = [] if calls is None else calls
    tr, sched = pipe.transformer, pipe.scheduler
    x0, y1, z = pad1(x0), pad1(y1), pad1(z)
    ids = pipe._prepare_latent_image_ids(1, H, W, "cpu", torch.float32)[None]
    ids = pad1(ids)[0]
    mask = torch.cat([keep[:, :1], keep, keep[:, -1:]], dim=1).reshape(-1)  # editing.py's quirk
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(H * W))
    sigmas = sched.sigmas

    def run(x, t, txt, vec, tids, g, **kw):
        calls.append(x.shape[0])
        return tr(hidden_states=x, timestep=t, guidance=g, pooled_projections=vec,
                  encoder_hidden_states=txt, txt_ids=tids, img_ids=ids, return_dict=False,
                  **kw)[0]  # fmt: skip

    with torch.no_grad():
        txt, vec, tids = pipe.encode_prompt("", prompt_2=None, max_sequence_length=512)
        y, n = x0, len(sigmas)
        for i in range(n - 1):  # Algorithm 1, t_i = i / N with N = len(sigmas)
            t = torch.tensor(i / n)
            u = run(y, t.expand(1), txt, vec, tids, torch.zeros(1))
            y = y + (u + o.gamma * ((y1 - y) / (1 - t) - u)) * (sigmas[i] - sigmas[i + 1])
        prompts = [SOURCE, PROMPT] + ([] if negative is None else [negative])
        txt, vec, tids = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=512)
        b = len(prompts)
        x, lo = torch.cat([y, *[z] * (b - 1)]), int(o.start * steps)
        hi = min(int(o.stop * steps), steps)
        tr.set_attn_processor(Replace(mask, o.tau, txt.shape[1]))
        try:
            for i, t in enumerate(sched.timesteps):  # Algorithm 2 on [source, target]
                kw = {"joint_attention_kwargs": {"timestep": t.item() / 1000}}
                v = run(x, t.expand(b) / 1000, txt, vec, tids, torch.full((b,), guidance), **kw)
                eta = o.eta if lo <= i < hi else 0.0
                v_t, v_c = -v[:1], (x0 - x[:1]) / (1 - (1 - t / 1000))
                src = x[:1] + (v_t + eta * (v_c - v_t)) * (sigmas[i] - sigmas[i + 1])
                if negative is not None:  # FluxPipeline's true CFG on the target
                    v = torch.cat([v[:1], v[2:] + o.true_cfg * (v[1:2] - v[2:])])
                tgt = sched.step(v[1:2], t, x[1:2], return_dict=False)[0]
                if t.item() / 1000 >= o.blend_until:
                    m = mask[:, None].float()
                    tgt = tgt * (1.0 - m) + src * m
                x = torch.cat([src, *[tgt] * (b - 1)])
        finally:
            tr.set_attn_processor(FluxAttnProcessor())
    return y, x[1:2]


def run_ours(
    ours, x0, y1, z, keep, o: EditOptions, steps=STEPS, keep_source=False, calls=None, neg=None
):
    """Our invert + edit on the same inputs (`neg`: the negative's conditioning); inverted,
    target, source (padded)."""
    model, cond = ours
    grid = Grid(H, W, 1)
    pad = grid.wrap
    sigmas = schedule(steps, H * W)
    calls = [] if calls is None else calls
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        with torch.no_grad():
            inv = invert(model, pad(x0), pad(y1), grid, rows(cond, slice(0, 1)), sigmas, o)
            mask, cond = grid.wrap_mask(keep.flatten(), o.mask_pad), rows(cond, slice(1, 3))
            args = (model, inv, pad(x0), pad(z), mask, grid, cond, sigmas, o, keep_source, neg)
            tgt, src = edit(*args)
    finally:
        handle.remove()
    return inv, tgt, src


# --- parity with the reference ------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1.0, 0.6])
def test_invert_matches_reference(pipe, ours, gamma):
    """Inverted latents equal the reference's; at gamma 1 without a single transformer call."""
    x0, y1, _ = tensors(1)
    model, cond = ours
    ref_calls, our_calls, o = [], [], EditOptions(gamma=gamma)
    expected, _ = reference(pipe, x0, y1, y1, KEEP, o, calls=ref_calls)
    sigmas, grid = schedule(STEPS, H * W), Grid(H, W, 1)
    handle = model.register_forward_pre_hook(lambda m, a: our_calls.append(a[0].shape[0]))
    with torch.no_grad():
        got = invert(model, pad1(x0), pad1(y1), grid, rows(cond, slice(0, 1)), sigmas, o)
    handle.remove()
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert ref_calls[:STEPS] == [1] * STEPS  # the reference calls the model at every step
    assert our_calls == ([] if gamma == 1 else [1] * STEPS)


@pytest.mark.parametrize("o", [DEFAULT, VARIED], ids=["defaults", "varied"])
def test_edit_matches_reference(pipe, ours, o):
    """Inverted and edited latents equal the reference's (token replacement in every attention
    layer, eta window, blending); at the defaults with half the reference's transformer calls."""
    x0, y1, z = tensors(2)
    ref_calls, our_calls = [], []
    inv_ref, tgt_ref = reference(pipe, x0, y1, z, KEEP, o, calls=ref_calls)
    inv, tgt, _ = run_ours(ours, x0, y1, z, KEEP, o, calls=our_calls)
    assert_close(inv, inv_ref, rtol=1e-5, atol=1e-5)
    assert_close(tgt, tgt_ref, rtol=1e-5, atol=1e-5)
    assert ref_calls == [1] * STEPS + [2] * STEPS
    if o == DEFAULT:  # no inversion calls; the source is dropped once t <= tau (last 2 steps)
        assert our_calls == [2, 2, 2, 2, 1, 1]
    model, _ = ours
    assert all(b.qkv_hook is None for b in [*model.double_blocks, *model.single_blocks])


@pytest.mark.parametrize("o", [DEFAULT, VARIED], ids=["defaults", "varied"])
def test_planned_edit_equals_plain_loop(ours, o):
    """`edit_planned` (what edit.py runs: the source row dropped once nothing reads it, the
    modulations computed ahead) gives the plain Algorithm 2 loop's source bit for bit and its
    target to float32 round-off; at the defaults with fewer rows through the model."""
    x0, y1, z = (pad1(x) for x in tensors(5))
    model, cond = ours
    grid, sigmas, p = Grid(H, W, 1), schedule(STEPS, H * W), rf_params(o)
    keep, both = grid.wrap_mask(KEEP.flatten(), o.mask_pad), rows(cond, slice(1, 3))
    rows_seen = []
    handle = model.register_forward_pre_hook(lambda m, a: rows_seen.append(a[0].shape[0]))
    try:
        with torch.no_grad():
            inv = core.invert(model, x0, y1, grid, rows(cond, slice(0, 1)), sigmas, p)
            plain = core.edit(model, inv, x0, z, keep, grid, both, sigmas, p)
            n = len(rows_seen)
            planned = edit(model, inv, x0, z, keep, grid, both, sigmas, o, keep_source=True)
    finally:
        handle.remove()
    assert torch.equal(planned[1], plain[1])
    # A step with the target alone is a batch of one: its float32 matmuls round differently
    # from the pair's (measured 1.7e-6 on values up to 5).
    assert_close(planned[0], plain[0], rtol=0, atol=1e-5)
    assert rows_seen[n - STEPS : n] == [2] * STEPS
    assert sum(rows_seen[n:]) < 2 * STEPS if o == DEFAULT else sum(rows_seen[n:]) <= 2 * STEPS


@pytest.mark.parametrize("o", [DEFAULT, VARIED], ids=["defaults", "varied"])
def test_true_cfg_edit_matches_reference(pipe, ours, tiny_flux, o):
    """--negative-prompt --true-cfg 3 on an edit: the target's velocity is FluxPipeline's true CFG
    combination (its negative row with the same token replacement), the inversion is unchanged,
    and the target differs from the edit without it; the plain loop agrees with the planned."""
    negative = "blurry, a seam"
    o = EditOptions(**{**vars(o), "negative_prompt": negative, "true_cfg": 3.0})
    neg = Conditioning(*encode(tiny_flux, [negative], "cpu", torch.float32))
    x0, y1, z = tensors(2)
    inv_ref, tgt_ref = reference(pipe, x0, y1, z, KEEP, o, negative=negative)
    inv, tgt, _ = run_ours(ours, x0, y1, z, KEEP, o, neg=neg)
    assert_close(inv, inv_ref, rtol=1e-5, atol=1e-5)
    assert_close(tgt, tgt_ref, rtol=1e-5, atol=1e-5)
    assert (tgt - run_ours(ours, x0, y1, z, KEEP, o)[1]).abs().max() > 1e-2
    model, cond = ours
    grid, sigmas, p, both = (
        Grid(H, W, 1),
        schedule(STEPS, H * W),
        rf_params(o),
        rows(cond, slice(1, 3)),
    )
    keep = grid.wrap_mask(KEEP.flatten(), o.mask_pad)
    with torch.no_grad():
        plain = core.edit(model, inv, pad1(x0), pad1(z), keep, grid, both, sigmas, p, negative=neg)
    assert_close(plain[0], tgt, rtol=0, atol=1e-5)


def test_edit_uses_the_replacement(pipe, ours):
    """Without token replacement and blending (tau, blend_until above 1) the result differs:
    the parity above exercises the replacement, not a no-op."""
    x0, y1, z = tensors(2)
    _, with_swap, _ = run_ours(ours, x0, y1, z, KEEP, DEFAULT)
    off = EditOptions(tau=2.0, blend_until=2.0)
    _, without, _ = run_ours(ours, x0, y1, z, KEEP, off)
    _, tgt_ref = reference(pipe, x0, y1, z, KEEP, off)
    assert_close(without, tgt_ref, rtol=1e-5, atol=1e-5)
    assert (with_swap - without).abs().max() > 1e-2


def test_eta_one_returns_to_source(ours):
    """eta = 1 over the whole range brings the source branch back to the source latents."""
    x0, y1, z = tensors(3)
    o = EditOptions(gamma=0.6, start=0.0, stop=1.0)
    _, _, src = run_ours(ours, x0, y1, z, KEEP, o, keep_source=True)
    assert_close(src, pad1(x0), rtol=1e-5, atol=1e-5)
    _, _, src = run_ours(ours, x0, y1, z, KEEP, DEFAULT, keep_source=True)  # stop 0.99: last free
    assert (src - pad1(x0)).abs().max() > 1e-3


# --- masks and the wrap ------------------------------------------------------------------------


def test_wrap_mask_keeps_pad_columns_in_sync(ours):
    """With the "wrap" mask a pad token and the column it copies stay equal through the edit;
    DiT360's [first | mask | last] padding breaks that when the edge columns differ."""
    x0, y1, z = tensors(4)
    grid = Grid(H, W, 1)
    synced = lambda x: grid.wrap(grid.crop(x))  # noqa: E731
    _, tgt, _ = run_ours(ours, x0, y1, z, KEEP, EditOptions(mask_pad="wrap"))
    assert_close(tgt, synced(tgt), rtol=1e-5, atol=1e-5)
    _, tgt, _ = run_ours(ours, x0, y1, z, KEEP, DEFAULT)
    assert (tgt - synced(tgt)).abs().max() > 1e-2


def test_read_mask():
    """Any size and mode, nearest resize to the grid, white >= 0.5 keeps; transparency refused."""
    a = np.zeros((64, 128), np.uint8)
    a[:, :64], a[:, 64:96] = 128, 127  # 128/255 >= 0.5 keeps, 127/255 does not
    for img in (Image.fromarray(a), Image.fromarray(a).convert("RGB")):
        assert read_mask(img, 4, 2).tolist() == [[True, True, False, False]] * 2
    rgba = Image.fromarray(a).convert("RGBA")
    assert read_mask(rgba, 4, 2).tolist() == [[True, True, False, False]] * 2  # opaque: fine
    rgba.putalpha(Image.fromarray((a > 0).astype(np.uint8) * 255))
    with pytest.raises(ValueError, match="transparent pixels"):
        read_mask(rgba, 4, 2)
    with pytest.raises(ValueError, match="nothing to generate"):
        check_mask(torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="nothing to keep"):
        check_mask(torch.zeros(2, 4, dtype=torch.bool))


def test_16_bit_source_reads_as_its_8_bit_version(tmp_path):
    """edit.py's --image and an --edits row's image read a 16-bit grey panorama as its 8 bits."""
    x = np.linspace(0, 65535, 32 * 64).round().astype(np.uint16).reshape(32, 64)
    Image.fromarray(x).save(tmp_path / "p16.png")
    Image.fromarray(np.round(x / 65535 * 255).astype(np.uint8)).save(tmp_path / "p8.png")
    cli, job = [], []
    for name in ("p16.png", "p8.png"):
        cli.append(np.asarray(edit_cli.read_panorama(tmp_path / name, height=32), np.int16))
        row = EditJob("a", 0, Path(), image=tmp_path / name, mask=tmp_path / name)
        job.append(np.asarray(read_source(row), np.int16))
    assert np.abs(cli[0] - cli[1]).max() <= 1 and np.abs(job[0] - job[1]).max() <= 1
    assert cli[0].std() > 10


def test_feather_wraps_around_the_seam():
    """The feather is 1 on kept pixels, crosses the seam, and commutes with a horizontal roll."""
    keep = torch.zeros(16, 64, dtype=torch.bool)
    keep[4:12, :6] = True
    alpha = feather(keep, 4)
    assert torch.all(alpha[keep] == 1)
    assert alpha[8, -1] > 0.5 and alpha[8, -4] > 0 and alpha[8, 32] == 0  # across the seam
    assert_close(feather(keep.roll(30, 1), 4), alpha.roll(30, 1))
    edited, source = torch.rand(3, 16, 64) * 2 - 1, torch.rand(3, 16, 64) * 2 - 1
    out = paste_back(edited, source, keep, 4)
    assert torch.equal(out[:, keep], source[:, keep])
    assert torch.equal(out[:, :, 32], edited[:, :, 32])


# --- edit.py end to end ---------------------------------------------------------------------------


def write_inputs(folder, size=(32, 64), keep=KEEP, seed=0):
    """A smooth random source PNG of `size` and a mask PNG of twice its size, white = keep."""
    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 8, generator=g), size=size)
    img = (img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    src, mask = folder / "src.png", folder / "mask.png"
    Image.fromarray(img).save(src)
    m = keep.repeat_interleave(32, 0).repeat_interleave(2 * size[1] // keep.shape[1], 1)
    Image.fromarray(m.numpy().astype(np.uint8) * 255).save(mask)
    return src, mask


def cli(tiny_flux, src, mask, out, *extra) -> list[str]:
    return [
        *("--image", str(src), "--mask", str(mask), "--prompt", PROMPT, "--source-prompt", SOURCE),
        *("--base", str(tiny_flux), "--lora", "none", "--steps", str(STEPS), "--seed", "5"),
        *("--height", "32", "--device", "cpu", "--dtype", "fp32", "--out", str(out), *extra),
    ]


@pytest.mark.parametrize("offload", ["none", "blocks"])
def test_cli_outpaint_matches_reference(pipe, tiny_flux, tmp_path, capsys, offload):
    """edit.py writes the reference's edited image (diffusers' VAE, a posterior sample) with XMP,
    in each --offload mode."""
    from diffusers.utils.torch_utils import randn_tensor

    src, mask = write_inputs(tmp_path)
    out = tmp_path / "out.png"
    edit_cli.main(cli(tiny_flux, src, mask, out, "--offload", offload))
    assert f"offload {offload} (--offload)" in capsys.readouterr().err

    vae, sc = pipe.vae, pipe.vae.config
    pack = lambda x: pipe._pack_latents(x, 1, 16, 2 * H, 2 * W)  # noqa: E731
    # target noise, inversion noise, the posterior's eps: one draw from --seed
    n = randn_tensor((3, 16, 2 * H, 2 * W), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x = pipe.image_processor.preprocess(Image.open(src).convert("RGB"))
        post = vae.encode(x).latent_dist
        x0 = pack((post.mean + post.std * n[2:] - sc.shift_factor) * sc.scaling_factor)
    gray = Image.open(mask).resize((W, H), Image.Resampling.NEAREST).convert("L")
    keep = torch.from_numpy(np.asarray(gray) == 255)  # pa_src/utils.py create_mask
    _, tgt = reference(pipe, x0, pack(n[1:2]), pack(n[:1]), keep, DEFAULT)
    tgt = tgt.reshape(1, H, W + 2, 64)[:, :, 1:-1].reshape(1, -1, 64)
    with torch.no_grad():
        lat = pipe._unpack_latents(tgt, 16 * H, 16 * W, 8) / sc.scaling_factor + sc.shift_factor
        expected = pipe.image_processor.postprocess(vae.decode(lat).sample, output_type="pil")[0]
    got = Image.open(out)
    diff = np.abs(np.asarray(got, np.int16) - np.asarray(expected, np.int16))
    assert got.size == (16 * W, 16 * H) and diff.max() <= 1, diff.max()
    xmp = got.info["xmp"]
    xmp = xmp.decode() if isinstance(xmp, bytes) else xmp
    assert 'GPano:ProjectionType="equirectangular"' in xmp


def test_a_small_source_is_told_its_height(tmp_path):
    """A 128x64 source at the default --height edits at 2048x1024 (the reference's default): the
    line says so, and which --height keeps the source's size."""
    src, _ = write_inputs(tmp_path, size=(64, 128))
    lines = []
    edit_cli.read_panorama(src, edit_cli.parse_args(["--edits", "x"]).height, log=lines.append)
    said = "edited at 2048x1024 (--height 1024, the reference's default; --height 64 keeps the"
    assert lines == [f"{src}: 128x64, {said} source's height)"]


def test_cli_inpaint_paste_back(tiny_flux, tmp_path, capsys):
    """--invert --paste-back: the kept (black) region is the source, pixel for pixel; --resize
    stretches a non-2:1 image to 2:1 at --height, and the resize is said."""
    src, mask = write_inputs(tmp_path, size=(48, 80))
    out = tmp_path / "out.png"
    extra = ("--invert", "--paste-back", "--feather", "3", "--resize")
    edit_cli.main(cli(tiny_flux, src, mask, out, *extra))
    said = "edited at 64x32 (--height 32, given; --height 48 keeps the source's height)"
    assert f"{src}: 80x48, {said}" in capsys.readouterr().err
    got = np.asarray(Image.open(out))
    source = np.asarray(edit_cli.read_panorama(src, 32, resize=True))
    keep = (~read_mask(Image.open(mask), 64, 32)).numpy()
    assert got.shape == (32, 64, 3) and keep.any() and not keep.all()
    assert np.array_equal(got[keep], source[keep])
    assert not np.array_equal(got[~keep], source[~keep])


def test_cli_true_cfg(tiny_flux, tmp_path, capsys):
    """--negative-prompt --true-cfg 3 changes the edit and says its cost; an --edits row's
    "negative_prompt" gives the same image."""
    src, mask = write_inputs(tmp_path)
    neg = ("--negative-prompt", "blurry", "--true-cfg", "3")
    edit_cli.main(cli(tiny_flux, src, mask, tmp_path / "cfg.png", *neg))
    assert "true CFG at scale 3.0 on the target" in capsys.readouterr().err
    edit_cli.main(cli(tiny_flux, src, mask, tmp_path / "plain.png"))
    assert "true CFG" not in capsys.readouterr().err
    got, plain = (np.asarray(Image.open(tmp_path / f), np.int16) for f in ("cfg.png", "plain.png"))
    assert np.abs(got - plain).max() > 1
    row = {"image": "src.png", "mask": "mask.png", "prompt": PROMPT, "negative_prompt": "blurry"}
    (tmp_path / "edits.jsonl").write_text(json.dumps(row | {"out": "row.png"}) + "\n")
    argv = cli(tiny_flux, src, mask, tmp_path / "x.png", *neg[2:])
    argv = [a for a in argv[6:] if a not in ("--out", str(tmp_path / "x.png"))]
    edit_cli.main([*argv, "--edits", str(tmp_path / "edits.jsonl"), "--out-dir", str(tmp_path)])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "row.png"), np.int16), got)


def test_cli_errors(tiny_flux, tmp_path, capsys):
    """Bad images, masks and options fail with one clear line, exit 2, before any model runs,
    and leave no output behind."""
    src, mask = write_inputs(tmp_path)
    out = tmp_path / "out.png"
    white, black = tmp_path / "white.png", tmp_path / "black.png"
    Image.new("L", (50, 20), 255).save(white)
    Image.new("L", (50, 20), 0).save(black)
    square, _ = write_inputs(tmp_path / "square", size=(32, 32))
    (tmp_path / "text.png").write_text("not an image")
    for argv, match in [
        (cli(tiny_flux, src, white, out), "nothing to generate"),
        (cli(tiny_flux, src, black, out), "nothing to keep"),
        ([*cli(tiny_flux, src, white, out), "--invert"], "nothing to keep"),
        (cli(tiny_flux, square, mask, out), "not 2:1"),
        ([*cli(tiny_flux, src, mask, out), "--height", "40"], "multiple of 16"),
        (cli(tiny_flux, tmp_path / "text.png", mask, out), "cannot identify"),
        (cli(tiny_flux, src, tmp_path / "missing.png", out), "No such file"),
        (
            [*cli(tiny_flux, src, mask, out), "--eta-start", "0.5", "--eta-stop", "0.2"],
            "start <= --eta-stop",
        ),
    ]:
        expect_error(capsys, edit_cli.main, argv, tmp_path, match)
