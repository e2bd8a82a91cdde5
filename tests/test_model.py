"""The FLUX transformer against diffusers on the same random weights, in every weight layout."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny import TINY_TRANSFORMER, diffusers_transformer, save_transformer

from dit360.load import config, weights
from dit360.load.convert import convert_flux
from dit360.load.files import TensorFile
from dit360.load.weights import load_flux, meta_flux, plan_from

DATA = Path(__file__).parent / "data"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def wrapped_ids(h: int, w: int, pad: int) -> torch.Tensor:
    """Image ids (h*(w+2*pad), 3) of a grid with `pad` wrapped columns per side, written by hand."""
    cols = [(c - pad) % w for c in range(w + 2 * pad)]
    return torch.tensor([[0.0, r, c] for r in range(h) for c in cols])


def inputs(seed: int = 1, batch: int = 2, h: int = 4, w: int = 6, pad: int = 1, txt_len: int = 7):
    """Random model inputs on a padded token grid (docs/METHOD.md section 2), diffusers' 2-D ids."""
    g = torch.Generator().manual_seed(seed)
    c = TINY_TRANSFORMER
    img_ids = wrapped_ids(h, w, pad)
    return dict(
        img=torch.randn(batch, len(img_ids), c["in_channels"], generator=g),
        img_ids=img_ids,
        txt=torch.randn(batch, txt_len, c["joint_attention_dim"], generator=g),
        txt_ids=torch.zeros(txt_len, 3),
        t=torch.rand(batch, generator=g),
        y=torch.randn(batch, c["pooled_projection_dim"], generator=g),
        guidance=torch.full((batch,), 2.8),
    )


def run_ours(model, x: dict) -> torch.Tensor:
    b = x["img"].shape[0]
    return model(
        x["img"],
        x["img_ids"].expand(b, -1, -1),
        x["txt"],
        x["txt_ids"].expand(b, -1, -1),
        x["t"],
        x["y"],
        x["guidance"] if model.params.guidance_embed else None,
    )


def run_diffusers(model, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(
            hidden_states=x["img"],
            encoder_hidden_states=x["txt"],
            pooled_projections=x["y"],
            timestep=x["t"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"] if model.config.guidance_embeds else None,
            return_dict=False,
        )[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random diffusers transformer saved in the sharded FLUX.1-dev layout, and its output."""
    model = diffusers_transformer(seed=0)
    root = tmp_path_factory.mktemp("flux")
    save_transformer(model, root)
    x = inputs()
    return root, x, run_diffusers(model, x)


def test_diffusers_folder_parity(reference):
    """Sharded diffusers folder -> our model: diffusers' output bit for bit in float32 (the fast
    path's fusions are kept to bf16/fp16, where the reference rounds more)."""
    root, x, expected = reference
    assert len(list((root / "transformer").glob("*.safetensors"))) > 3  # shards cut blocks
    model = load_flux(root, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(run_ours(model, x), expected)


def test_bfl_single_file_parity(reference, tmp_path):
    """Converted to one BFL-layout file, the model loads from it and still matches diffusers."""
    root, x, expected = reference
    path = convert_flux(root, tmp_path / "flux.safetensors")
    model = load_flux(path, dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(run_ours(model, x), expected) < 1e-5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_schnell_without_guidance(tmp_path):
    """A model without the guidance embedding (schnell) loads and matches diffusers."""
    model = diffusers_transformer(seed=3, guidance_embeds=False)
    save_transformer(model, tmp_path)
    x = inputs(seed=4)
    ours = load_flux(tmp_path, dtype=torch.float32)
    assert ours.guidance_in is None
    with torch.no_grad():
        assert rel_err(run_ours(ours, x), run_diffusers(model, x)) < 1e-5


@pytest.mark.parametrize(
    "rule",
    [
        ("swap", "identity"),  # forget the final adaLN [shift; scale] swap
        ("to_q", "to_k"),  # exchange q and k of one fused qkv
    ],
)
def test_negative_control(reference, monkeypatch, rule):
    """Deliberately mis-mapping one tensor breaks parity: the check can fail."""
    root, x, expected = reference
    table = list(weights.FLUX_DIFFUSERS)
    if rule[0] == "swap":
        table[-2] = ("identity", *table[-2][1:])
    else:
        i = next(i for i, r in enumerate(table) if r[1] == "double_blocks.{i}.img_attn.qkv")
        q, k, v = table[i][2]
        table[i] = ("concat", table[i][1], (k, q, v))
    monkeypatch.setattr(weights, "FLUX_DIFFUSERS", table)
    with torch.no_grad():
        err = rel_err(run_ours(load_flux(root, dtype=torch.float32), x), expected)
    assert err > 1e-3, err


def test_diffusers_export_round_trip(reference, tmp_path):
    """Our diffusers export loads strictly in diffusers and reproduces the output."""
    from diffusers import FluxTransformer2DModel

    root, x, expected = reference
    out = convert_flux(root, tmp_path / "transformer", to="diffusers", dtype=torch.float32)
    model = FluxTransformer2DModel.from_pretrained(out).eval()
    assert rel_err(run_diffusers(model, x), expected) < 1e-6


def test_dtype_conversion(reference, tmp_path):
    """--dtype bf16 stores bf16 tensors; loading keeps the requested dtype."""
    root, x, expected = reference
    path = convert_flux(root, tmp_path / "bf16.safetensors", dtype=torch.bfloat16)
    model = load_flux(path, dtype=None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = run_ours(model.float(), x)
    assert rel_err(out, expected) < 5e-2


def manifest(name: str) -> dict[str, tuple[int, ...]]:
    tensors = json.loads((DATA / name).read_text())["tensors"]
    return {k: tuple(v["shape"]) for k, v in tensors.items()}


@pytest.mark.parametrize("preset", ["flux-dev", "flux-schnell"])
def test_full_size_names_and_shapes(preset):
    """On the meta device, our presets have exactly the names and shapes of the BFL files."""
    ours = {k: tuple(v.shape) for k, v in meta_flux(config.PRESETS[preset]).state_dict().items()}
    assert ours == manifest(f"{preset}.bfl.json")


def test_full_size_diffusers_coverage():
    """Every tensor of FLUX.1-dev's diffusers shards maps onto flux-dev, nothing left over."""
    shapes = manifest("flux-dev.diffusers.json")
    tfile = TensorFile({}, shapes, {}, {}, Path("flux-dev.diffusers.json"))
    plan = plan_from(tfile, weights.FLUX_DIFFUSERS)
    used = [k for _, keys in plan.sources.values() for k in keys]
    assert sorted(used) == sorted(shapes)
    assert plan.shapes == manifest("flux-dev.bfl.json")
    assert config.from_shapes(plan.shapes) == config.PRESETS["flux-dev"]
    published = json.loads((DATA / "flux-dev.diffusers.json").read_text())["meta"]
    assert (
        config.from_diffusers_config(published["published_config_json"])
        == config.PRESETS["flux-dev"]
    )


def test_float16_matches_diffusers(reference):
    """In float16, as DiT360's inference.py runs, we match diffusers to float16 round-off."""
    root, x, _ = reference
    from diffusers import FluxTransformer2DModel

    half = {k: v.half() if k in ("img", "txt", "t", "y", "guidance") else v for k, v in x.items()}
    theirs = FluxTransformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch.float16)
    expected = run_diffusers(theirs.eval(), half).float()
    with torch.no_grad():
        got = run_ours(load_flux(root, dtype=torch.float16), half).float()
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) < 3e-3


def test_unsharded_diffusers_folder_parity(reference, tmp_path):
    """One unsharded diffusers file: its config.json is read (head dim 16: RoPE axes need it),
    whether given the FLUX.1-dev folder, its `transformer/` or the file itself."""
    root, x, expected = reference
    folder = save_transformer(diffusers_transformer(seed=0), tmp_path, shard="10GB")
    file = folder / "diffusion_pytorch_model.safetensors"
    assert [p.name for p in folder.glob("*.safetensors")] == [file.name]
    for src in (tmp_path, folder, file):
        model = load_flux(src, dtype=torch.float32)
        assert model.params.axes_dim == TINY_TRANSFORMER["axes_dims_rope"]
        with torch.no_grad():
            assert rel_err(run_ours(model, x), expected) < 1e-5


def test_config_only_beside_diffusers_weights(reference, tmp_path):
    """config.json counts only as a FluxTransformer2DModel config beside diffusers-named weights:
    a BFL file ignores one, and a diffusers file ignores another model's."""
    root, *_ = reference
    config = {**TINY_TRANSFORMER, "_class_name": "FluxTransformer2DModel"}
    (tmp_path / "config.json").write_text(json.dumps({**config, "axes_dims_rope": [2, 8, 6]}))
    ours = convert_flux(root, tmp_path / "flux.safetensors")  # axes (4, 6, 6) in its metadata
    assert load_flux(ours).params.axes_dim == (4, 6, 6)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(ours), bare)  # BFL names, no metadata: the config beside is not ours
    with pytest.raises(ValueError, match="head dim 16: the RoPE axes are not stored"):
        load_flux(bare)
    theirs = convert_flux(root, tmp_path / "d", to="diffusers") / "config.json"
    theirs.write_text(json.dumps({**config, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="head dim 16: the RoPE axes are not stored"):
        load_flux(theirs.parent)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_bit_identical_to_diffusers(dtype):
    """Our one complex multiply rotates q and k exactly as diffusers' cos/sin form (and the
    reference's rotation matrices), on wrapped panorama ids, in every dtype we run."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from dit360.core.layers import apply_rope
    from dit360.core.rope import embed_ids

    ids = wrapped_ids(12, 20, pad=2)
    cos, sin = FluxPosEmbed(10_000, [16, 56, 56])(ids)
    x = torch.randn(2, 3, len(ids), 128, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1)
    pe = embed_ids(ids[None], (16, 56, 56), 10_000)
    # q and k as the blocks hand them over: contiguous, laid out (B, L, H, D) (rotated in that
    # layout, no copy), or cut at an odd offset (copied first)
    strided = x.transpose(1, 2).contiguous().transpose(1, 2)
    odd = torch.cat([x.new_zeros(1), x.flatten()])[1:].view(x.shape)
    for q in (x, strided, odd):
        got = apply_rope(q, pe)
        assert got.dtype == dtype and torch.equal(got, expected)
    assert apply_rope(strided, pe).stride() == strided.stride()


def test_single_block_in_place_path_equals_autograd_path():
    """Without autograd the single block writes attention and the MLP activation into linear1's
    output instead of concatenating them (training keeps the copy): both give one result."""
    from dit360.core.layers import SingleStreamBlock
    from dit360.core.rope import embed_ids

    g = torch.Generator().manual_seed(3)
    block = SingleStreamBlock(64, 4, 256)
    for p in block.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    x, vec = torch.randn(2, 30, 64, generator=g), torch.randn(2, 64, generator=g)
    pe = embed_ids(wrapped_ids(5, 4, pad=1)[None].expand(2, -1, -1), (4, 6, 6), 10_000)
    with torch.no_grad():
        in_place = block(x, vec, pe)
    copied = block(x, vec, pe)
    assert copied.requires_grad and not in_place.requires_grad
    torch.testing.assert_close(in_place, copied.detach(), rtol=1e-6, atol=1e-6)


def test_fa3_gets_its_layout_and_matches_sdpa(reference, monkeypatch):
    """--attention fa3 hands FlashAttention-3 q, k, v as (B, L, H, d) with contiguous heads and
    takes its (B, L, H, d) output, (out, lse) or out alone, without a copy; the model's output is
    the SDPA one. FA3 needs a Hopper GPU: a stand-in module with its signature checks the calls,
    and the options refuse fa3 off CUDA even when the module is there."""
    import sys
    import types

    from dit360.app.options import SampleOptions
    from dit360.speed.kernels import attention_backend

    root, x, _ = reference
    calls = []

    def flash_attn_func(q, k, v):
        assert q.shape[1] > q.shape[2] and all(t.stride(-1) == 1 for t in (q, k, v))
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        calls.append(out.shape)
        out = out.transpose(1, 2).contiguous()  # FA3 writes (B, L, H, d)
        return (out, None) if len(calls) % 2 else out

    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace())
    sys.modules["flash_attn_interface"].flash_attn_func = flash_attn_func
    model = load_flux(root, dtype=torch.float32)
    with torch.no_grad():
        expected = run_ours(model, x)
        with attention_backend("fa3"):
            got = run_ours(model, x)
    n = model.params.depth + model.params.depth_single_blocks
    assert len(calls) == n
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    with pytest.raises(ValueError, match="fa3 runs on a CUDA GPU in bf16 or fp16, not cpu"):
        SampleOptions(attention="fa3", device="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_bit_identical_to_reference(dtype):
    """Our one fused pass equals BFL's RMSNorm (float32 inside, rounded to the input dtype, then
    times the scale in that dtype), bit for bit."""
    from dit360.core.layers import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 50, 128, generator=g) * 4).to(dtype)
    norm = RMSNorm(128).to(dtype)
    norm.scale.data = torch.randn(128, generator=g).to(dtype)
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * norm.scale
    with torch.no_grad():
        assert torch.equal(norm(x), expected)
