"""The FLUX autoencoder against diffusers' AutoencoderKL, its layouts, and the panorama options."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import TINY_VAE, randomize, save_autoencoder

from dit360.core.autoencoder import AutoEncoder
from dit360.load import weights
from dit360.load.config import AE_PRESETS, ae_from_diffusers_config, ae_from_shapes, to_json
from dit360.load.files import TensorFile
from dit360.load.weights import (
    AE_DIFFUSERS,
    check_plan,
    load_autoencoder,
    plan_from,
    their_keys,
)
from dit360.memory.tiling import _starts, decode

DATA = Path(__file__).parent / "data"
SCALE, SHIFT = 0.3611, 0.1159

# FLUX's VAE structure, small: 4 levels (x8), 16 latent channels, no quant convs, widths growing
# like FLUX's (x1, x2, x4, x4) so that the decoder level order matters for shapes.
SMALL_VAE = {
    **TINY_VAE,
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 2,
    "norm_num_groups": 4,
    "sample_size": 32,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def small_vae(seed: int = 0, **overrides):
    """A random diffusers AutoencoderKL with FLUX's structure."""
    from diffusers import AutoencoderKL

    return randomize(AutoencoderKL(**{**SMALL_VAE, **overrides}), seed).eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A FLUX.1-dev-like folder holding a random diffusers `vae/`, inputs and diffusers' outputs."""
    vae = small_vae()
    root = tmp_path_factory.mktemp("flux")
    vae.save_pretrained(root / "vae")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 64, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    z = torch.randn(2, 16, 4, 8, generator=g)  # (B, 16, H/8, W/8)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        sample = dist.sample(torch.Generator().manual_seed(2))
        image = vae.decode(z / SCALE + SHIFT).sample
    expected = dict(mean=dist.mean, std=dist.std, sample=SCALE * (sample - SHIFT), image=image)
    return root, x, z, expected


def check_parity(model: AutoEncoder, x, z, expected: dict) -> None:
    """Posterior, scaled latent (mean and sampled) and decode equal diffusers' within 1e-5."""
    with torch.no_grad():
        mean, std = model.posterior(x)
        got = dict(
            mean=mean,
            std=std,
            latent=model.encode(x),
            sample=model.encode(x, sample=True, generator=torch.Generator().manual_seed(2)),
            image=model.decode(z),
        )
    expected = {**expected, "latent": SCALE * (expected["mean"] - SHIFT)}
    errors = {k: rel_err(got[k], expected[k]) for k in got}
    assert max(errors.values()) < 1e-5, errors


def test_diffusers_folder_parity(reference):
    """A FLUX.1-dev folder and its `vae/` load and match diffusers within 1e-5."""
    root, x, z, expected = reference
    for src in (root, root / "vae"):
        model = load_autoencoder(src)
        assert model.params.norm_num_groups == 4 and model.params.ch_mult == (1, 2, 4, 4)
        check_parity(model, x, z, expected)


def test_bfl_single_file_parity(reference, tmp_path):
    """Written as a BFL `ae.safetensors`, the model loads (file or folder) and still matches."""
    root, x, z, expected = reference
    path = save_autoencoder(load_autoencoder(root), tmp_path / "ae.safetensors")
    for src in (path, tmp_path):
        model = load_autoencoder(src)
        AutoEncoder(model.params).load_state_dict(model.state_dict(), strict=True)
        check_parity(model, x, z, expected)


def test_config_from_shapes(reference, tmp_path):
    """Without config or metadata, the shapes give the config (but not the norm groups)."""
    root, *_ = reference
    model = load_autoencoder(root)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    inferred = ae_from_shapes(shapes, norm_num_groups=4)
    assert inferred == dataclasses.replace(model.params, resolution=256)  # resolution: unused
    save_file(model.state_dict(), tmp_path / "ae.safetensors")  # no metadata
    with pytest.raises(ValueError, match="not divisible by norm_num_groups 32"):
        load_autoencoder(tmp_path / "ae.safetensors")


def test_full_size_layouts():
    """The flux preset has exactly ae.bfl.json's tensors; AE_DIFFUSERS maps ae.diffusers.json."""
    bfl = json.loads((DATA / "ae.bfl.json").read_text())
    with torch.device("meta"):
        model = AutoEncoder(AE_PRESETS["flux"])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(bfl["tensors"])  # same names, in module order
    assert ours == {k: tuple(v["shape"]) for k, v in bfl["tensors"].items()}
    assert sum(v.numel() for v in model.state_dict().values()) == bfl["meta"]["param_count"]

    diffusers = json.loads((DATA / "ae.diffusers.json").read_text())
    shapes = {k: tuple(v["shape"]) for k, v in diffusers["tensors"].items()}
    tfile = TensorFile(
        {}, shapes, dict.fromkeys(shapes, torch.float32), {}, DATA / "ae.diffusers.json"
    )
    plan = plan_from(tfile, AE_DIFFUSERS)
    check_plan(plan, ours, tfile)  # nothing missing, unexpected or misshapen
    used = [k for _, keys in plan.sources.values() for k in keys]
    assert sorted(used) == sorted(shapes)  # every diffusers tensor used once
    assert all(their_keys(k, AE_DIFFUSERS) == plan.sources[k] for k in ours)  # invertible
    assert sum(op == "squeeze" for op, _ in plan.sources.values()) == 8
    params = ae_from_diffusers_config(diffusers["meta"]["config"])
    assert params == dataclasses.replace(AE_PRESETS["flux"], resolution=1024)


def test_decoder_level_order_negative_control(reference, monkeypatch, tmp_path):
    """Not reversing the decoder levels fails: unplaceable tensors, or a wrong image."""
    table = weights.ae_diffusers

    def unreversed(levels: int, resnets_only: bool = False) -> list:
        """The table with decoder.up.{l} -> up_blocks.{l} instead of up_blocks.{levels - 1 - l}."""
        rules = table(levels)
        for l in range(levels):
            rules = [
                (op, ours, theirs.replace(f"up_blocks.{levels - 1 - l}.", f"up_blocks.{l}."))
                if ours.startswith(f"decoder.up.{l}.") and (".block." in ours or not resnets_only)
                else (op, ours, theirs)
                for op, ours, theirs in rules
            ]
        return rules

    root, x, z, expected = reference
    monkeypatch.setattr(weights, "ae_diffusers", unreversed)
    with pytest.raises(ValueError, match="unexpected tensors.*up_blocks.0.upsamplers"):
        load_autoencoder(root)
    # With the same widths at every level and the upsamplers mapped right, the resnets load
    # without a shape error, in the wrong order: the image no longer matches diffusers.
    monkeypatch.setattr(weights, "ae_diffusers", lambda n: unreversed(n, resnets_only=True))
    vae = small_vae(seed=5, block_out_channels=(16, 16, 16, 16))
    vae.save_pretrained(tmp_path / "vae")
    with torch.no_grad():
        image = vae.decode(z / SCALE + SHIFT).sample
        assert rel_err(load_autoencoder(tmp_path).decode(z), image) > 1e-2
    monkeypatch.setattr(weights, "ae_diffusers", table)
    assert rel_err(load_autoencoder(tmp_path).decode(z), image) < 1e-5


def test_missing_tensor_is_named(reference, tmp_path):
    """A checkpoint lacking a tensor fails with that tensor's name."""
    root, *_ = reference
    model = load_autoencoder(root)
    state = {k: v for k, v in model.state_dict().items() if k != "decoder.up.1.upsample.conv.bias"}
    save_file(state, tmp_path / "ae.safetensors", {"dit360_ae_config": to_json(model.params)})
    with pytest.raises(ValueError, match=r"missing \(1\).*decoder.up.1.upsample.conv.bias"):
        load_autoencoder(tmp_path / "ae.safetensors")


def test_circular_decode_is_roll_equivariant(reference):
    """Circular decoder: rolling the latent by k columns rolls the image by 8k, exactly."""
    root, x, z, expected = reference
    model = load_autoencoder(root)
    k = 3
    with torch.no_grad():
        plain = model.decode(z)
        assert rel_err(plain, expected["image"]) < 1e-5  # default = diffusers
        rolled = model.decode(z.roll(k, dims=-1))
        assert rel_err(rolled, plain.roll(8 * k, dims=-1)) > 1e-2  # zero padding has a seam
        model.set_circular(True)
        image = model.decode(z)
        torch.testing.assert_close(model.decode(z.roll(k, dims=-1)), image.roll(8 * k, dims=-1))


def test_circular_encode_is_roll_equivariant(reference):
    """Circular encoder: rolling the image by 8k pixels rolls the latent by k columns."""
    root, x, z, expected = reference
    model = load_autoencoder(root)
    model.set_circular(decoder=False, encoder=True)
    with torch.no_grad():
        latent = model.encode(x)
        torch.testing.assert_close(model.encode(x.roll(16, dims=-1)), latent.roll(2, dims=-1))
    assert rel_err(model.decode(z), expected["image"]) < 1e-5  # decoder unaffected


def test_tile_starts():
    """Tiles cover every position, overlap by at least overlap - 1, wrap only when asked."""
    for n, tile, overlap in [(32, 8, 2), (33, 8, 4), (16, 12, 4), (8, 8, 2)]:
        for wrap in (False, True):
            starts = _starts(n, tile, overlap, wrap)
            cover = torch.zeros(n)
            for s in starts:
                cover[torch.arange(s, s + min(tile, n)) % n] += 1
            assert cover.min() >= 1
            if len(starts) > 1:
                assert cover.sum() - n >= len(starts if wrap else starts[1:]) * (overlap - 1)
            assert wrap or starts[-1] + tile == n or starts == [0]
    assert _starts(32, 8, 2, wrap=True) == [0, 5, 11, 16, 21, 27]  # the last tile crosses 32 -> 0


def largest_activation(model: AutoEncoder, z: torch.Tensor, **kw) -> int:
    """Decode, returning the largest number of elements any decoder module produced."""
    sizes = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append(o.numel()))
        for m in model.decoder.modules()
    ]
    with torch.no_grad():
        decode(model, z, **kw)
    for h in hooks:
        h.remove()
    return max(sizes)


@pytest.mark.parametrize("circular", [False, True])
def test_tiled_decode(reference, circular):
    """Tiled decode stays close to the untiled one (rel err < 0.1 at tile 8, random weights) and
    bounds the largest activation by B x max width x (8 tile)^2."""
    root, *_ = reference
    model = load_autoencoder(root)
    model.set_circular(circular)
    z = torch.randn(1, 16, 8, 16, generator=torch.Generator().manual_seed(3))
    tile = 4
    with torch.no_grad():
        full = model.decode(z)
        assert decode(model, z, tile=16).equal(full)  # one tile = untiled
        errors = [rel_err(decode(model, z, tile=t, overlap=2), full) for t in (4, 8)]
    assert errors[1] < 0.1 and errors[1] < errors[0] < 0.25, errors
    bound = max(model.params.channels) * (8 * tile) ** 2
    assert largest_activation(model, z, tile=tile) <= bound < largest_activation(model, z)


def test_attention_gets_contiguous_inputs(monkeypatch):
    """The mid-block attention hands SDPA contiguous (B, 1, H*W, C) q, k, v: with a strided last
    dim SDPA falls back to the math kernel and builds the whole (H*W)^2 score matrix (at
    1024x2048, 32,768 latent pixels: +9 GB measured on CPU, against +0.05 GB contiguous)."""
    import dit360.core.autoencoder as ae_module

    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append([t.is_contiguous() and t.shape[1] == 1 for t in (q, k, v)])
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(ae_module.F, "scaled_dot_product_attention", spy)
    model = randomize(
        AutoEncoder(AE_PRESETS["flux"].__class__(ch=32, ch_mult=(1, 1), norm_num_groups=8)), 0
    )
    with torch.no_grad():
        model.decode(model.encode(torch.randn(1, 3, 16, 32)))
    assert seen == [[True] * 3, [True] * 3]  # the encoder's and the decoder's mid block


def test_vae_progress_counts_every_stage(reference, monkeypatch):
    """encode (mean and sample) and decode (untiled and tiled) tick a progress bar once per VAE
    level and mid block, reaching its total; the outputs are the plain model's (a sample: with the
    same eps) and the hooks are gone afterwards."""
    from dit360.memory import tiling

    bars = []

    class Bar:
        def __init__(self, total: int, desc: str, **kw) -> None:
            self.total, self.desc, self.n = total, desc, 0
            bars.append(self)

        def update(self, n: int = 1) -> None:
            self.n += n

        def close(self) -> None:
            pass

    monkeypatch.setattr(tiling, "tqdm", Bar)
    root, x, *_ = reference
    model = load_autoencoder(root)
    z = torch.randn(1, 16, 8, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mean = model.encode(x)
        assert tiling.encode(model, x).equal(mean)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(4))  # a sample's
        sample = model.encode(x, sample=True, generator=torch.Generator().manual_seed(4))
        assert tiling.encode(model, x, eps).equal(sample)
        assert tiling.decode(model, z).equal(model.decode(z))
        tiling.decode(model, z, tile=4, overlap=2)
    levels = len(model.params.ch_mult)
    tiles = len(_starts(8, 4, 2, False)) * len(_starts(16, 4, 2, False))  # 3 x 7
    assert [(b.desc, b.total) for b in bars] == [
        ("encode", levels + 1), ("encode", levels + 1), ("decode", levels + 1),
        ("decode", 1 + levels * tiles)
    ]  # fmt: skip
    assert all(b.n == b.total for b in bars), [(b.n, b.total) for b in bars]
    assert not any(m._forward_hooks for m in model.modules())
