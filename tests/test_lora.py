"""LoRA: DiT360/peft, kohya and BFL formats against diffusers + peft; merge, export, errors."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model import inputs, rel_err, run_diffusers, run_ours
from tiny import TINY_TRANSFORMER, diffusers_transformer, save_transformer

import convert_weights
from dit360.core import lora
from dit360.load import config, lora_formats
from dit360.load.files import open_tensors
from dit360.load.weights import MERGED_KEY, load_flux, meta_flux

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parents[1]
SEED = 0  # of the tiny base model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The tiny random transformer saved in the FLUX.1-dev folder layout."""
    root = tmp_path_factory.mktemp("base")
    save_transformer(diffusers_transformer(SEED), root)
    return root


@pytest.fixture(scope="module")
def x() -> dict:
    """One set of model inputs."""
    return inputs()


def ours(base: Path) -> torch.nn.Module:
    """Our model loaded from the tiny folder, float32."""
    return load_flux(base, dtype=torch.float32)


def out(model, x: dict) -> torch.Tensor:
    """Our model's output, without autograd."""
    with torch.no_grad():
        return run_ours(model, x)


def pipeline(transformer):
    """A FluxPipeline holding only the transformer: enough for `load_lora_weights`."""
    from diffusers import FluxPipeline

    none = dict.fromkeys(["scheduler", "vae", "text_encoder", "tokenizer"], None)
    return FluxPipeline(**none, text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def dit360_lora(folder: Path, r=4, alpha=8, seed=1, prefix="transformer.", targets=None):
    """A random LoRA on the tiny model in DiT360's format (keys, file names, adapter_config)."""
    g = torch.Generator().manual_seed(seed)
    tensors, targets = {}, targets or list(lora_formats.DIT360_TARGETS)
    for name, m in diffusers_transformer(SEED).named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            tensors[f"{prefix}{name}.lora_A.weight"] = torch.randn(r, m.in_features, generator=g)
            tensors[f"{prefix}{name}.lora_B.weight"] = torch.randn(m.out_features, r, generator=g)
    tensors = {k: v * 0.1 for k, v in tensors.items()}
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder, tensors, config


def bfl_lora(path: Path, modules: dict[str, float | None], style: str, r: int = 4, seed: int = 2):
    """A random kohya/ComfyUI LoRA on whole BFL layers, and its deltas alpha / r * up @ down."""
    g = torch.Generator().manual_seed(seed)
    model, tensors, deltas = meta_flux(config.from_diffusers_config(TINY_TRANSFORMER)), {}, {}
    for module, alpha in modules.items():
        layer = model.get_submodule(module)
        down = torch.randn(r, layer.in_features, generator=g) * 0.1
        up = torch.randn(layer.out_features, r, generator=g) * 0.1
        deltas[module] = up @ down * (1.0 if alpha is None else alpha / r)
        stem = {"kohya": "lora_unet_" + module.replace(".", "_")}.get(
            style, "diffusion_model." + module
        )
        a, b = ("lora_A", "lora_B") if style == "comfy" else ("lora_down", "lora_up")
        tensors |= {f"{stem}.{a}.weight": down, f"{stem}.{b}.weight": up}
        if alpha is not None:
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path)
    return path, deltas


def merged_by_hand(base: Path, deltas: dict[str, torch.Tensor], factor: float = 1.0):
    """Our model with W + factor * delta written into the weights directly."""
    model = ours(base)
    state = model.state_dict()
    for module, delta in deltas.items():
        state[module + ".weight"] += factor * delta
    model.load_state_dict(state)
    return model


# Modules diffusers' kohya converter handles at any width (it hard-codes 3072 for linear1, and
# drops final_layer LoRAs: it forgets their `transformer.` prefix).
KOHYA_FOR_DIFFUSERS = {
    "double_blocks.0.img_attn.qkv": 8.0,
    "double_blocks.1.img_attn.proj": 2.0,
    "double_blocks.0.txt_attn.qkv": 8.0,
    "double_blocks.1.img_mlp.0": 4.0,
    "double_blocks.0.txt_mod.lin": 8.0,
    "single_blocks.1.linear2": 8.0,
    "single_blocks.0.modulation.lin": 8.0,
}
FUSED = {
    "double_blocks.0.img_attn.qkv": 8.0,
    "double_blocks.1.txt_attn.proj": 2.0,
    "single_blocks.0.linear1": 8.0,
    "single_blocks.1.linear1": 1.0,
    "txt_in": 8.0,
    "time_in.in_layer": 8.0,
    "final_layer.adaLN_modulation.1": 8.0,
}


def with_peft(tensors: dict, cfg: dict, x: dict) -> torch.Tensor:
    """diffusers + peft output with a peft-format LoRA, told its alpha as diffusers reads it."""
    reference = diffusers_transformer(SEED)
    metadata = {"transformer." + k: v for k, v in cfg.items()}
    reference.load_lora_adapter(tensors, prefix="transformer", metadata=metadata)
    return run_diffusers(reference, x)


def test_dit360_format_matches_peft(base, x, tmp_path):
    """DiT360-format LoRA (r 4, alpha 8): ours = diffusers + peft, unmerged, merged, unmerged."""
    folder, tensors, cfg = dit360_lora(tmp_path / "lora")
    expected = with_peft(tensors, cfg, x)
    model = ours(base)
    plain = out(model, x)
    lora_formats.load_lora(model, folder)
    qkv = model.double_blocks[0].img_attn.qkv.lora["lora0"]
    assert qkv.A.shape == (12, 32) and qkv.rows == [(0, 32), (32, 64), (64, 96)]
    assert model.single_blocks[0].linear1.lora["lora0"].rows == [(0, 32), (32, 64), (64, 96)]
    assert qkv.scales == [2.0] * 3
    err = rel_err(out(model, x), expected)
    lora.merge_lora(model)
    err_merged = rel_err(out(model, x), expected)
    print(f"dit360 format: unmerged {err:.2e}, merged {err_merged:.2e}")
    assert err < 1e-5 and err_merged < 1e-5
    assert rel_err(plain, expected) > 1e-2  # the LoRA matters: the check can fail
    lora.unmerge_lora(model)
    assert rel_err(out(model, x), expected) < 1e-5
    lora_formats.set_scale(model, 0.0)
    assert rel_err(out(model, x), plain) < 1e-6


def test_merge_leaves_plain_layer(base, x, tmp_path):
    """Merged, a layer runs its plain forward (no hook); unmerged or rescaled, the hook is back."""
    model = lora_formats.load_lora(ours(base), dit360_lora(tmp_path / "a")[0])
    qkv = model.double_blocks[0].img_attn.qkv
    assert type(qkv) is torch.nn.Linear and len(qkv._forward_hooks) == 1
    names = ["weight", "lora.lora0.A", "lora.lora0.B.2"]
    assert {f"double_blocks.0.img_attn.qkv.{n}" for n in names} <= set(model.state_dict())
    expected = out(model, x)
    lora.merge_lora(model)
    assert not any(m._forward_hooks for m in model.modules())
    assert rel_err(out(model, x), expected) < 1e-5
    lora.unmerge_lora(model)
    assert len(qkv._forward_hooks) == 1 and rel_err(out(model, x), expected) < 1e-5
    lora_formats.set_scale(model, 0.0)
    assert not qkv._forward_hooks
    assert torch.equal(out(copy.deepcopy(lora_formats.set_scale(model, 1.0)), x), out(model, x))


class Einsum(torch.nn.Module):
    """A linear layer that is not an nn.Linear: its own parameters and matmul."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.weight = torch.nn.Parameter(torch.randn(n_out, n_in))
        self.bias = torch.nn.Parameter(torch.randn(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...i,oi->...o", x, self.weight) + self.bias


def test_adapter_on_any_linear():
    """An adapter on a non-nn.Linear base equals W + scale * B @ A on its rows; merges exactly."""
    torch.manual_seed(0)
    layer, h = Einsum(8, 10), torch.randn(2, 5, 8)
    ad = lora.add_adapter(layer, "a", [(0, 4, 2, 1.5), (6, 10, 3, 0.5)])
    for p in ad.parameters():
        torch.nn.init.normal_(p)
    assert set(layer.state_dict()) == {"weight", "bias", "lora.a.A", "lora.a.B.0", "lora.a.B.1"}
    w = layer.weight.detach().clone()
    w[0:4] += 0.7 * 1.5 * ad.B[0].detach() @ ad.A[:2].detach()
    w[6:10] += 0.7 * 0.5 * ad.B[1].detach() @ ad.A[2:].detach()
    expected = h @ w.T + layer.bias.detach()
    with torch.no_grad():
        torch.testing.assert_close(lora_formats.set_scale(layer, 0.7)(h), expected)
        torch.testing.assert_close(lora.merge_lora(layer)(h), expected)
        assert not layer._forward_hooks
        torch.testing.assert_close(layer.weight, w)
        assert lora.unmerge_lora(layer)._forward_hooks
        torch.testing.assert_close(
            lora_formats.set_scale(layer, 0.0)(h), h @ layer.weight.T + layer.bias
        )


def test_other_peft_targets(base, x, tmp_path):
    """peft LoRA on lone/unequal parts, MLPs, embedders, final adaLN: ours = diffusers + peft."""
    targets = ["proj_mlp", "attn.to_k", "ff.net.0.proj", "norm_out.linear", "x_embedder"]
    targets += ["proj_out", "norm1_context.linear", "time_text_embed.timestep_embedder.linear_1"]
    folder, tensors, cfg = dit360_lora(tmp_path / "a", r=2, alpha=3, targets=targets)
    model = lora_formats.load_lora(ours(base), folder)
    assert model.single_blocks[0].linear1.lora["lora0"].rows == [(32, 64), (96, 224)]
    err = rel_err(out(model, x), with_peft(tensors, cfg, x))
    print(f"other peft targets: {err:.2e}")
    assert err < 1e-5
    exported = lora_formats.export_peft(model, tmp_path / "b") / "adapter_model.safetensors"
    back = load_file(exported)
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("spelling", ["", "old"])
def test_peft_key_spellings(base, x, tmp_path, spelling):
    """Without the `transformer.` prefix, or with `.lora.down/.up`: same as the DiT360 format."""
    folder, tensors, _ = dit360_lora(tmp_path / "a")
    expected = out(lora_formats.load_lora(ours(base), folder), x)
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    if spelling == "old":
        renamed = {
            k.replace("lora_A", "lora.down").replace("lora_B", "lora.up"): v
            for k, v in renamed.items()
        }
    save_file(renamed, tmp_path / "a" / "adapter_model.safetensors")
    assert torch.equal(out(lora_formats.load_lora(ours(base), folder), x), expected)


def test_kohya_matches_diffusers(base, x, tmp_path):
    """A kohya LoRA (fused qkv, per-module alpha, final adaLN): ours = diffusers' kohya loader."""
    path, deltas = bfl_lora(tmp_path / "kohya.safetensors", KOHYA_FOR_DIFFUSERS, "kohya")
    reference = diffusers_transformer(SEED)
    pipeline(reference).load_lora_weights(str(path))
    expected = run_diffusers(reference, x)
    model = lora_formats.load_lora(ours(base), path)
    err = rel_err(out(model, x), expected)
    err_merged = rel_err(out(lora.merge_lora(model), x), expected)
    err_hand = rel_err(out(merged_by_hand(base, deltas), x), expected)
    print(f"kohya: unmerged {err:.2e}, merged {err_merged:.2e}, by hand {err_hand:.2e}")
    assert max(err, err_merged, err_hand) < 1e-5


@pytest.mark.parametrize("style", ["kohya", "comfy", "comfy_down"])
def test_bfl_named_formats(base, x, tmp_path, style):
    """kohya and ComfyUI LoRAs on whole fused layers equal a merge by hand, unmerged and merged."""
    modules = {k: (None if style == "comfy" else v) for k, v in FUSED.items()}
    path, deltas = bfl_lora(tmp_path / "l.safetensors", modules, style)
    expected = out(merged_by_hand(base, deltas), x)
    model = lora_formats.load_lora(ours(base), path)
    assert rel_err(out(model, x), expected) < 1e-5
    assert rel_err(out(lora.merge_lora(model), x), expected) < 1e-5


def test_full_size_dit360_manifest():
    """DiT360's 380 tensors, under its adapter_config.json, map onto flux-dev (meta device),
    each on its listed BFL rows."""
    data = json.loads((DATA / "dit360-lora.json").read_text())
    manifest, exported = data["tensors"], data["meta"]["adapter_config_json_as_exported_here"]
    model = meta_flux(config.PRESETS["flux-dev"])
    tensors = {k: torch.empty(v["shape"], device="meta") for k, v in manifest.items()}
    plan = lora_formats.plan_lora(tensors, model, exported)  # its adapter_config.json fits
    placed = {
        key: {"key": f"{layer}.weight", "rows": [p.start, p.end]}
        for layer, parts in plan.items()
        for p in parts
        for key in p.keys
    }
    assert placed == {k: v["bfl_target"] for k, v in manifest.items()}
    assert len(placed) == 380 and sum(map(len, plan.values())) == 190
    lora_formats.attach(model, plan, "dit360")
    state = {k: v for k, v in model.state_dict().items() if ".lora." in k}
    assert sum(p.numel() for p in state.values()) == 74_711_040


def test_inject_defaults():
    """inject() = DiT360's LoraConfig on flux-dev (meta): same modules and sizes, peft's init."""
    model = meta_flux(config.PRESETS["flux-dev"])
    model = lora.inject(model, lora_formats.target_rows(model))
    state = {k: v for k, v in model.state_dict().items() if ".lora." in k}
    assert sum(v.numel() for v in state.values()) == 74_711_040
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(state) and "double_blocks.0.img_attn.qkv.weight" in model.state_dict()
    qkv = model.double_blocks[0].img_attn.qkv.lora["default"]
    assert qkv.A.shape == (192, 3072) and qkv.scales == [1.0] * 3 and qkv.dropout.p == 0.05
    assert model.single_blocks[0].linear1.lora["default"].rows == [
        (0, 3072),
        (3072, 6144),
        (6144, 9216),
    ]


def test_inject_init_and_dropout(base, x):
    """A new LoRA starts as a no-op (B = 0, A ~ N(0, 1/r)); dropout acts only in training."""
    model = ours(base)
    plain = out(model, x)
    lora.inject(model, lora_formats.target_rows(model), rank=16, alpha=16, dropout=0.5)
    assert torch.equal(out(model, x), plain)
    ad = model.single_blocks[0].linear1.lora["default"]
    assert abs(ad.A.std().item() - 1 / 16) < 0.01 and all((b == 0).all() for b in ad.B)
    for *_, a in lora.adapters(model):
        for b in a.B:
            torch.nn.init.normal_(b)
    assert torch.equal(out(model.eval(), x), out(model.eval(), x))
    assert not torch.equal(out(model.train(), x), out(model.eval(), x))
    run_ours(model, x).square().mean().backward()  # gradients reach A and every B, not the base
    assert (ad.A.grad != 0).all() and all((b.grad != 0).any() for b in ad.B)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora." not in n)


def test_export_round_trip(base, x, tmp_path):
    """A LoRA trained here (random B), exported, loads in diffusers and in ours: same output."""
    model = ours(base)
    model = lora.inject(model, lora_formats.target_rows(model), rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for *_, ad in lora.adapters(model):
            for b in ad.B:
                b.normal_(std=0.1)
    expected = out(model, x)
    folder = lora_formats.export_peft(model, tmp_path / "export")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (4, 8, "LORA")
    assert sorted(cfg["target_modules"]) == sorted(lora_formats.DIT360_TARGETS)
    keys = load_file(folder / "adapter_model.safetensors")
    assert "transformer.single_transformer_blocks.1.attn.to_v.lora_B.weight" in keys
    reference = diffusers_transformer(SEED)
    pipeline(reference).load_lora_weights(str(folder))
    err = rel_err(run_diffusers(reference, x), expected)
    print(f"round trip: diffusers vs ours {err:.2e}")
    assert err < 1e-5
    assert rel_err(out(lora_formats.load_lora(ours(base), folder), x), expected) < 1e-6
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left


def test_several_loras(base, x, tmp_path):
    """Two LoRAs at once, each with its weight, equal both merged by hand."""
    folder, *_ = dit360_lora(tmp_path / "a")
    path, deltas = bfl_lora(tmp_path / "k.safetensors", FUSED, "kohya")
    expected = merged_by_hand(base, {k: -0.5 * v for k, v in deltas.items()})
    lora_formats.load_lora(expected, folder, scale=0.7, merge=True)
    model = lora_formats.load_lora(ours(base), folder, scale=0.7)
    lora_formats.load_lora(model, path, scale=-0.5)
    assert rel_err(out(model, x), out(expected, x)) < 1e-5
    with pytest.raises(ValueError, match="name the one"):
        lora_formats.export_peft(model, tmp_path / "x")


def test_cli_merge(base, x, tmp_path):
    """convert_weights.py --merge writes one file that equals the unmerged LoRA at --lora-scale."""
    folder, *_ = dit360_lora(tmp_path / "a")
    path = tmp_path / "merged.safetensors"
    args = ["--base", str(base), "--lora", str(folder), "--merge", "--out", str(path)]
    convert_weights.main([*args, "--lora-scale", "0.5"])
    merged = load_flux(path, dtype=None)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    expected = out(lora_formats.load_lora(ours(base), folder, scale=0.5), x)
    err = rel_err(out(merged, x), expected)
    print(f"merged file vs unmerged LoRA: {err:.2e}")
    assert err < 1e-5


def test_cli_lora_to_peft(base, x, tmp_path):
    """convert_weights.py --lora: kohya (linear1, alpha per module) to peft, loads everywhere."""
    path, _ = bfl_lora(tmp_path / "k.safetensors", FUSED, "kohya")
    folder = tmp_path / "peft"
    convert_weights.main(["--lora", str(path), "--base", str(base), "--out", str(folder)])
    expected = out(lora_formats.load_lora(ours(base), path), x)
    reference = diffusers_transformer(SEED)
    pipeline(reference).load_lora_weights(str(folder))
    assert rel_err(run_diffusers(reference, x), expected) < 1e-5
    assert json.loads((folder / "adapter_config.json").read_text())["alpha_pattern"]
    assert (
        rel_err(out(lora_formats.load_lora(ours(base), folder), x), expected) < 1e-5
    )  # alpha_pattern


def test_cli_lora_from_hub_cache(base, tmp_path):
    """--lora takes a repo id, resolved through the Hugging Face cache (offline)."""
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-lora"
    commit = "0123456789abcdef0123456789abcdef01234567"
    dit360_lora(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    args = ["--lora", "acme/tiny-lora", "--base", str(base), "--out", str(tmp_path / "o")]
    r = subprocess.run(
        [sys.executable, str(ROOT / "convert_weights.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert len(load_file(tmp_path / "o" / "adapter_model.safetensors")) == 28


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"transformer.foo.lora_A.weight": torch.zeros(4, 32)}, r"match no layer.*foo\.lora_A"),
        ({"lora_te1_text_model_x.lora_down.weight": torch.zeros(4, 8)}, r"lora_te1_text_model_x"),
        ({"transformer.proj_out.lora_A.weight": torch.zeros(4, 32)}, r"proj_out: has \['A'\]"),
        (
            {"transformer.transformer_blocks.1.attn.to_k.lora_B.weight": torch.zeros(31, 4)},
            r"transformer_blocks\.1\.attn\.to_k: A \(4, 32\), B \(31, 4\); double_blocks\.1\.img",
        ),
    ],
)
def test_errors_list_keys(base, tmp_path, edit, message):
    """Unknown keys, missing halves and wrong shapes are listed; nothing is applied."""
    folder, tensors, _ = dit360_lora(tmp_path / "a")
    save_file({**tensors, **edit}, folder / "adapter_model.safetensors")
    model = ours(base)
    with pytest.raises(ValueError, match=message):
        lora_formats.load_lora(model, folder)
    assert not any(hasattr(m, "lora") or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"r": 8}, r"to_q: rank 4, but the config says r 8"),
        ({"rank_pattern": {"to_k": 2}}, r"to_k: rank 4, but the config says r 2"),
        ({"target_modules": ["attn.to_k"]}, r"to_q: not in the config's target_modules"),
        ({"target_modules": r".*\.to_k"}, r"to_q: not matched by the config's target_modules"),
    ],
)
def test_config_contradicting_the_tensors(base, tmp_path, change, message):
    """An adapter_config.json that disagrees with its tensors (rank, targets: peft would build
    other layers) is refused with the module named, not applied with a wrong alpha / r."""
    folder, _, cfg = dit360_lora(tmp_path / "a")
    (folder / "adapter_config.json").write_text(json.dumps(cfg | change))
    with pytest.raises(ValueError, match=message):
        lora_formats.load_lora(ours(base), folder)


def test_rank_pattern_that_fits(base, x, tmp_path):
    """peft's rank_pattern gives the rank of the modules it matches: r 8 with every target's rank
    4 in rank_pattern loads, equal to the same tensors under r 4; a target it leaves out is
    refused."""
    folder, _, cfg = dit360_lora(tmp_path / "a")
    fours = dict.fromkeys(lora_formats.DIT360_TARGETS, 4)
    (folder / "adapter_config.json").write_text(json.dumps(cfg | {"r": 8, "rank_pattern": fours}))
    plain = dit360_lora(tmp_path / "b")[0]
    got = out(lora_formats.load_lora(ours(base), folder), x)
    assert torch.equal(got, out(lora_formats.load_lora(ours(base), plain), x))
    fours.pop("attn.to_k")
    (folder / "adapter_config.json").write_text(json.dumps(cfg | {"r": 8, "rank_pattern": fours}))
    with pytest.raises(ValueError, match="to_k: rank 4, but the config says r 8"):
        lora_formats.load_lora(ours(base), folder)


def test_diffusers_save_lora_weights_file(base, x, tmp_path):
    """A file written by diffusers' save_lora_weights, its peft config (alpha != r, a rank_pattern)
    in the safetensors metadata: our model with it equals diffusers' load_lora_weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = diffusers_transformer(SEED)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["attn.to_q", "attn.to_v", "proj_mlp"],
        rank_pattern={"proj_mlp": 2}, init_lora_weights=False,
    )  # fmt: skip
    trained.add_adapter(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    layers = get_peft_model_state_dict(trained)
    pipeline(None).save_lora_weights(
        tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=cfg.to_dict()
    )
    [path] = tmp_path.glob("*.safetensors")
    reference = diffusers_transformer(SEED)
    pipeline(reference).load_lora_weights(str(path))
    expected = run_diffusers(reference, x)
    assert rel_err(out(lora_formats.load_lora(ours(base), path), x), expected) < 1e-5


def test_all_linear_config(base, x, tmp_path):
    """peft's "all-linear" shorthand in target_modules matches every module of the file."""
    folder, _, cfg = dit360_lora(tmp_path / "a")
    plain = out(lora_formats.load_lora(ours(base), folder), x)
    (folder / "adapter_config.json").write_text(json.dumps(cfg | {"target_modules": "all-linear"}))
    assert torch.equal(out(lora_formats.load_lora(ours(base), folder), x), plain)


def two_loras(tiny_flux: Path, tmp_path: Path, x: dict, weights: list[float]):
    """A DiT360-format LoRA (r 4, the attention projections; alpha = r: diffusers ignores
    adapter_config.json) and a kohya one (r 2, fused qkv, MLP, modulation; alpha per module), and
    diffusers' transformer output with both loaded by `load_lora_weights(..., adapter_name=...)`
    and weighted by `set_adapters`."""
    from diffusers import FluxTransformer2DModel

    folder = dit360_lora(tmp_path / "dit360", r=4, alpha=4)[0]
    path = bfl_lora(tmp_path / "style.safetensors", KOHYA_FOR_DIFFUSERS, "kohya", r=2, seed=5)[0]
    reference = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    pipe = pipeline(reference)
    pipe.load_lora_weights(str(folder), adapter_name="dit360")
    pipe.load_lora_weights(str(path), adapter_name="style")
    pipe.set_adapters(["dit360", "style"], adapter_weights=weights)
    return folder, path, run_diffusers(reference.eval(), x)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_two_loras_match_diffusers_set_adapters(tiny_flux, x, tmp_path):
    """--lora twice with a --lora-scale each (load_model: merged, and as adapters) and
    convert_weights.py --merge of both equal diffusers' two adapters under set_adapters'
    adapter_weights; the merged file records both, so --lora auto adds nothing to it."""
    from dit360.app.generate import load_model, lora_sources
    from dit360.app.options import Options

    scales = [0.7, -0.5]
    folder, path, expected = two_loras(tiny_flux, tmp_path, x, scales)
    with torch.no_grad():  # each LoRA matters: the checks below can fail
        alone = out(lora_formats.load_lora(load_flux(tiny_flux, dtype=torch.float32), folder), x)
    assert rel_err(alone, expected) > 1e-2
    errs, logs = {}, []
    for merge in (True, False):
        opts = Options(
            base=str(tiny_flux), lora=(str(folder), str(path)), lora_scale=tuple(scales),
            merge_lora=merge, device="cpu", dtype="fp32",
        )  # fmt: skip
        model = load_model(opts, log=logs.append)
        assert len(lora_formats.lora_names(model)) == 2
        errs[merge] = rel_err(out(model, x), expected)
    pairs = list(zip((folder, path), scales, strict=True))
    how = ["merged into the weights", "as adapters"]
    assert logs == [f"LoRA {p} at scale {s}, {h}" for h in how for p, s in pairs]
    merged = tmp_path / "merged.safetensors"
    argv = ["--base", str(tiny_flux), "--lora", str(folder), "--lora", str(path), "--merge"]
    convert_weights.main(
        [*argv, "--lora-scale", "0.7", "--lora-scale", "-0.5", "--out", str(merged)]
    )
    errs["file"] = rel_err(out(load_flux(merged, dtype=torch.float32), x), expected)
    print(f"two LoRAs vs diffusers set_adapters: merged, adapters, --merge file: {errs}")
    assert max(errs.values()) < 1e-5
    opts = Options(base=str(tiny_flux), transformer=str(merged), device="cpu")
    assert lora_sources(opts) == []  # auto: the file has LoRAs merged in
    recorded = json.loads(open_tensors(merged).metadata[MERGED_KEY])
    assert recorded == [{"lora": str(p), "scale": s} for p, s in pairs]


def test_lora_from_a_training_run(tiny_flux, tmp_path):
    """--lora takes a train.py run (--out) or one of its checkpoints: their lora/; a run without
    its final lora/ names its latest checkpoint instead."""
    import numpy as np
    from PIL import Image

    import train
    from dit360.app.generate import lora_file, lora_sources
    from dit360.app.options import Options

    rgb = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "p.png")
    (tmp_path / "pano.jsonl").write_text(json.dumps({"image": "p.png", "caption": "a lake"}))
    run = tmp_path / "run"
    train.main([
        "--base", str(tiny_flux), "--pano", str(tmp_path / "pano.jsonl"), "--out", str(run),
        "--resolution", "32", "--lora-rank", "2", "--workers", "0", "--device", "cpu",
        "--max-steps", "1", "--save-every", "1",
    ])  # fmt: skip
    step = run / "checkpoints" / "step-00000001"
    for given, found in [(run, run / "lora"), (step, step / "lora")]:
        opts = Options(base=str(tiny_flux), lora=str(given), lora_scale=0.5, device="cpu")
        [(src, path, scale)] = lora_sources(opts)
        assert (src, path, scale) == (str(given), found / "adapter_model.safetensors", 0.5)
        plan = lora_formats.read_lora(given, load_flux(tiny_flux, dtype=None))
        modules = [k for k in load_file(path) if k.endswith("lora_A.weight")]
        assert sum(map(len, plan.values())) == len(modules) > 0  # a part for each
    shutil.rmtree(run / "lora")  # as if the run were still going
    unfinished = f"{run} is a training run that has not written its final lora/ yet: give its"
    with pytest.raises(FileNotFoundError, match=f"{unfinished} latest checkpoint, {step}$"):
        lora_file(str(run))
