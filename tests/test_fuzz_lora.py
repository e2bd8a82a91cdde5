"""Fuzz the LoRA files we read (peft/diffusers, kohya, BFL/ComfyUI spellings; adapter_config.json):
tensors dropped, spelled twice, cast, reshaped, given odd alphas, foreign keys, peft options we do
not apply. Each file is our one-line error naming it, or applied whole: every key it holds used,
the merge equal to a re-statement of the LoRA formula in this file (and to peft's where it reads
the file, for random peft configs too), finite. Also: a full checkpoint given as a LoRA is
refused unread, a folder with both peft's and diffusers' file names is refused, and info's command
for an option-like --lora parses back."""

import json
import math
import re
from pathlib import Path

import pytest
import test_lora
import torch
from clitest import expect_error
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_fuzz import FUZZ, outcome
from test_lora import SEED, dit360_lora, out, with_peft
from test_model import inputs, rel_err
from test_sample_cli import args as sample_args
from tiny import TINY_TRANSFORMER, diffusers_transformer

import convert_weights
import sample
from dit360.app import info
from dit360.core.lora import merge_lora
from dit360.load import config, files, lora_formats
from dit360.load.weights import load_flux, meta_flux

HIDDEN = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]  # 32
base = test_lora.base  # the tiny transformer in the FLUX.1-dev folder layout (a fixture)
QKV = "lora_unet_double_blocks_0_img_attn_qkv"  # kohya's name of a fused layer (to_q, to_k, to_v)


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[dict, dict]:
    """A DiT360-format LoRA's tensors (diffusers names: q, k, v, out of each block) and config."""
    _, tensors, cfg = dit360_lora(tmp_path_factory.mktemp("lora") / "a")
    return tensors, cfg


def write(folder: Path, tensors: dict, cfg: dict | None) -> Path:
    """A LoRA folder: adapter_model.safetensors (+ adapter_config.json unless cfg is None)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").unlink(missing_ok=True)
    if cfg is not None:
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def rows_of(stem: str) -> tuple[str, int, int]:
    """Our layer and its rows that a file's module names, re-stated for the tiny model (hidden
    32): diffusers' q/k/v are thirds of the fused qkv (double) or the first rows of linear1."""
    if stem.startswith("lora_unet_"):
        assert stem == QKV, stem  # the one kohya module the fuzz adds
        return "double_blocks.0.img_attn.qkv", 0, 3 * HIDDEN
    name = re.sub(r"^(transformer\.|base_model\.model\.|diffusion_model\.)", "", stem)
    single, i, what = re.fullmatch(
        r"(single_)?transformer_blocks\.(\d)\.attn\.to_(.+)", name
    ).groups()
    if what == "out.0":
        return f"double_blocks.{i}.img_attn.proj", 0, HIDDEN
    k = "qkv".index(what)
    layer = f"single_blocks.{i}.linear1" if single else f"double_blocks.{i}.img_attn.qkv"
    return layer, k * HIDDEN, (k + 1) * HIDDEN


def expected_deltas(tensors: dict, cfg: dict | None) -> dict[str, list]:
    """Each layer's (start, end, W'[start:end] - W[start:end]) in float64, from the file by the
    formula: alpha / r * B @ A (alpha the module's `.alpha`, else the config's lora_alpha, over
    sqrt(r) with use_rslora; 1 without)."""
    ends = {".lora_A.weight": "A", ".lora.down.weight": "A", ".lora_down.weight": "A"}
    ends |= {".lora_B.weight": "B", ".lora.up.weight": "B", ".lora_up.weight": "B", ".alpha": "a"}
    groups: dict[str, dict] = {}
    for key, t in tensors.items():
        end = next(e for e in ends if key.endswith(e))
        groups.setdefault(key.removesuffix(end), {})[ends[end]] = t.double()
    deltas = {}
    for stem, g in groups.items():
        r = g["A"].shape[0]
        if "a" in g:
            scale = g["a"].item() / r
        elif cfg:
            scale = cfg["lora_alpha"] / (r**0.5 if cfg.get("use_rslora") else r)
        else:
            scale = 1.0
        layer, start, end = rows_of(stem)
        deltas.setdefault(layer, []).append((start, end, scale * g["B"] @ g["A"]))
    return deltas


# --- changes of a valid file: each a (valid, hostile) pair of choices ----------------------------
SPELLINGS = [(".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight")]
SPELLINGS += [(".lora_down.weight", ".lora_up.weight")]  # peft, old diffusers, kohya/ComfyUI
PREFIXES = ["", "transformer.", "base_model.model."]
FLOATS = [torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]
NOT_FLOATS = [torch.int8, torch.int32, torch.uint8, torch.bool]
FOREIGN = [  # keys of other models, other adapter kinds, other tensors of ours
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",  # text encoder
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",  # SDXL
    "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1",  # LoKr
    "lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a",  # LoHa
    "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector",  # DoRA
    "lora_unet_double_blocks_0_img_attn_qkv.dora_scale",  # kohya's DoRA
    "transformer.transformer_blocks.0.attn.to_q.lora_B.bias",  # peft's lora_bias
    "transformer.transformer_blocks.0.attn.norm_q.lora_A.weight",  # a norm: no Linear
    "transformer.proj_out.lora_B.weight",  # a Linear, without its A
    "transformer.x_embedder.weight",  # a full checkpoint's tensor
    "base_model.model.proj_out.modules_to_save.default.weight",
    ".lora_A.weight",
    "transformer.transformer_blocks.9.attn.to_q.lora_A.weight",  # a block the model lacks
]
CONFIGS = [{"use_rslora": True}, {"lora_alpha": -3}, {"lora_alpha": 0}, {"use_dora": False}]
BAD_CONFIGS = [  # peft options that change the result; contradictions of the tensors
    {"use_dora": True}, {"layers_to_transform": [0]}, {"layers_to_transform": 0},
    {"exclude_modules": ["to_q"]}, {"layer_replication": [[0, 1]]}, {"peft_type": "LOHA"},
    {"alora_invocation_tokens": [1]}, {"use_qalora": True}, {"r": 8}, {"target_modules": ["to_k"]},
]  # fmt: skip


def modules(tensors: dict) -> dict[str, tuple[str, str]]:
    """Each module of the file -> its A's and B's key endings."""
    return {k.removesuffix(a): (a, b) for k in tensors for a, b in SPELLINGS if k.endswith(a)}


def change(tensors: dict, cfg: dict, draw, hostile: bool) -> None:
    """One change drawn: a valid one (another spelling, dtype, alpha, config, a kohya layer instead
    of its thirds) or, if `hostile`, an invalid one."""
    pick = lambda good, bad=(): draw(st.sampled_from(bad if hostile and bad else good))  # noqa: E731
    what = pick(["respell", "dtype", "alpha", "config", "kohya"])
    what = pick([what], [what, "drop", "shape", "foreign"])
    mods = modules(tensors)
    if not mods:
        return
    stem = draw(st.sampled_from(sorted(mods)))
    key = stem + mods[stem][draw(st.integers(0, 1))]
    if what == "respell":  # the module's A, B and alpha renamed (hostile: also kept)
        keep = pick([False], [True])  # hostile: the same module in two spellings
        other = [x for x in SPELLINGS if x != mods[stem]] if keep else SPELLINGS
        prefix, (a, b) = draw(st.sampled_from(PREFIXES)), draw(st.sampled_from(other))
        new = re.sub(r"^(transformer\.|base_model\.model\.)?", prefix, stem, count=1)
        new = stem if keep or stem.startswith("lora_unet_") else new  # kohya's: no prefix
        for old, end in [(mods[stem][0], a), (mods[stem][1], b), (".alpha", ".alpha")]:
            if stem + old in tensors and new + end != stem + old:
                tensors[new + end] = tensors[stem + old] if keep else tensors.pop(stem + old)
    elif what == "kohya":  # the fused layer whole, instead of (hostile: beside) its thirds
        r, cfg["target_modules"] = 4, "all-linear"  # the config's r; peft's every Linear
        if not pick([False], [True]):
            for m in [
                m for m in mods if re.search(r"(^|\.)transformer_blocks\.0\.attn\.to_[qkv]$", m)
            ]:
                for end in mods[m]:
                    del tensors[m + end]
                tensors.pop(m + ".alpha", None)
        tensors[QKV + ".lora_down.weight"] = torch.randn(r, HIDDEN) * 0.1
        tensors[QKV + ".lora_up.weight"] = torch.randn(3 * HIDDEN, r) * 0.1
    elif what == "dtype":
        tensors[key] = tensors[key].to(pick(FLOATS, NOT_FLOATS))
    elif what == "alpha":
        shape = pick([(), (1,), (1, 1)], [(2,), (0,), (2, 3)])
        value = pick([8.0, 4, 0.0, -2.0, 1e30], [float("nan"), float("inf"), 1e300])
        dtype = pick([torch.float32, torch.float64], [torch.int64, torch.bool, torch.float16])
        odd = not math.isfinite(value) or abs(value) > 1e9  # not an integer's
        tensors[stem + ".alpha"] = torch.full(shape, value, dtype=torch.float64).to(
            torch.float32 if odd and dtype in (torch.int64, torch.bool) else dtype
        )
    elif what == "config":
        cfg.update(pick(CONFIGS, BAD_CONFIGS))
    elif what == "drop":
        tensors.pop(key) if draw(st.booleans()) else tensors.clear()
    elif what == "shape":
        t = tensors[key]
        tensors[key] = draw(st.sampled_from([
            t.T, t[None], t.flatten(), t[:-1], t[:, :-1], t[:0], t[:1].expand(65, -1)
        ])).contiguous()  # fmt: skip
    elif what == "foreign":
        tensors[draw(st.sampled_from(FOREIGN))] = torch.randn(4, HIDDEN)


@FUZZ
@given(st.data())
def test_hostile_lora_refused_or_applied_whole(base, valid, tmp_path, data):
    """A valid LoRA changed 1 to 3 times: our one-line error naming the file, or a LoRA whose
    every key is used and whose merge equals the formula applied to the file (finite)."""
    tensors, cfg = dict(valid[0]), dict(valid[1])
    hostile = data.draw(st.booleans())
    for i in range(data.draw(st.integers(1, 3))):
        change(tensors, cfg, data.draw, hostile and i == 0)  # at most one hostile change
    with_cfg = data.draw(st.booleans()) or cfg != valid[1]  # without: diffusers' alpha 1 files
    folder = write(tmp_path / "lora", tensors, cfg if with_cfg else None)
    meta = meta_flux(config.from_diffusers_config(TINY_TRANSFORMER))
    plan = outcome(lambda: lora_formats.read_lora(folder, meta), str(folder))
    event(f"hostile {hostile}, applied {plan is not None}")  # --hypothesis-show-statistics
    if plan is None:
        assert hostile, "a valid LoRA was refused"
        return
    used = {k for parts in plan.values() for p in parts for k in p.keys}
    assert used == set(tensors), f"keys not applied: {set(tensors) - used}"  # nothing dropped
    model = load_flux(base, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_lora(lora_formats.load_lora(model, folder))
    deltas = expected_deltas(tensors, cfg if with_cfg else None)
    after = model.state_dict()
    for name, w in ((k, after[k]) for k in before):  # the base's weights, not the adapters'
        want = before[name].double()
        for start, end, delta in deltas.get(name.removesuffix(".weight"), []):
            want[start:end] += delta
        err = (w.double() - want).abs().max() / (1 + want.abs().max())  # alpha 1e30: float32's
        assert w.isfinite().all() and err < 1e-5, (name, err)


@pytest.mark.parametrize(
    "spelling",
    [
        {QKV + ".lora_down.weight": (4, HIDDEN), QKV + ".lora_up.weight": (96, 4)},  # kohya
        {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": (4, HIDDEN),
         "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": (96, 4)},  # ComfyUI
        {"transformer.transformer_blocks.0.attn.to_q.lora.down.weight": (4, HIDDEN)},  # diffusers
        {"transformer_blocks.0.attn.to_k.lora_A.weight": (4, HIDDEN),
         "transformer_blocks.0.attn.to_k.lora_B.weight": (HIDDEN, 4)},  # no prefix
        {"base_model.model.transformer_blocks.0.attn.to_v.lora_A.weight": (4, HIDDEN),
         "base_model.model.transformer_blocks.0.attn.to_v.lora_B.weight": (HIDDEN, 4)},  # peft
    ],
)  # fmt: skip
def test_same_rows_in_two_spellings_refused(valid, tmp_path, spelling):
    """The peft file plus its double_blocks.0 q/k/v again, spelled otherwise (a whole fused layer,
    or one tensor): refused naming the second; it was applied twice, or one silently dropped."""
    tensors = valid[0] | {k: torch.randn(s) * 0.1 for k, s in spelling.items()}
    folder = write(tmp_path / "lora", tensors, None)  # no config: its targets would refuse kohya's
    meta = meta_flux(config.from_diffusers_config(TINY_TRANSFORMER))
    with pytest.raises(ValueError, match=r"a second (LoRA for double_blocks\.0\.img_attn|A)"):
        lora_formats.read_lora(folder, meta)


@pytest.mark.parametrize(
    "change",
    [{"use_dora": True}, {"layers_to_transform": [1], "layers_pattern": "transformer_blocks"},
     {"exclude_modules": ["attn.to_k"]}, {"layer_replication": [[0, 2]]}, {"use_qalora": True},
     {"alora_invocation_tokens": [3, 4]}, {"target_parameters": ["attn.to_q.weight"]},
     {"kasa_config": {}}, {"peft_type": "LOKR"}],
)  # fmt: skip
def test_peft_options_we_do_not_apply_refused(valid, tmp_path, capsys, tiny_flux, change):
    """adapter_config.json asking peft for DoRA, some layers only, aLoRA...: one line naming the
    file and the option, exit 2 before any model loads (the plain LoRA was applied instead)."""
    folder = write(tmp_path / "lora", valid[0], valid[1] | change)
    key = next(iter(change))
    argv = sample_args(tiny_flux, tmp_path / "pano.png", lora=str(folder))
    expect_error(capsys, sample.main, argv, tmp_path, rf"adapter_config.json: '{key}' must be")


def test_full_checkpoint_as_lora_refused_unread(base, tmp_path, capsys, monkeypatch):
    """A whole transformer given as --lora is refused naming its keys, no tensor read (all of
    it, 24 GB for FLUX.1-dev, was read first); sample.py and convert_weights.py say so in a line."""
    full = next((base / "transformer").glob("*.safetensors"))
    reads = []
    monkeypatch.setattr(files.TensorFile, "_read", lambda self, key: reads.append(key))
    meta = meta_flux(config.from_diffusers_config(TINY_TRANSFORMER))
    with pytest.raises(ValueError, match=r"keys that match no layer: \['\w"):
        lora_formats.read_lora(full, meta)
    assert reads == []
    argv = ["--base", str(base), "--lora", str(full), "--out", str(tmp_path / "p")]
    expect_error(capsys, convert_weights.main, argv, tmp_path, "match no layer")  # bad input: 2


def test_float8_and_mixed_dtypes_match_peft(base, valid, tmp_path):
    """A LoRA with float8, float16, bfloat16 and float64 tensors among float32 ones: ours (merged)
    equals diffusers + peft on the same file; convert_weights.py --lora exports it (float8 raised
    in the merge's concatenation and the export's finiteness check)."""
    tensors, cfg = dict(valid[0]), valid[1]
    keys = sorted(tensors)
    for key, dtype in zip(keys[::7], [torch.float8_e4m3fn, torch.float16, torch.float8_e5m2,
                                      torch.bfloat16, torch.float64], strict=False):  # fmt: skip
        tensors[key] = tensors[key].to(dtype)
    folder = write(tmp_path / "lora", tensors, cfg)
    x = inputs()
    expected = with_peft(tensors, cfg, x)  # peft reads float8 too
    model = merge_lora(lora_formats.load_lora(load_flux(base, dtype=torch.float32), folder))
    assert rel_err(out(model, x), expected) < 1e-5
    convert_weights.main(["--base", str(base), "--lora", str(folder), "--out", str(tmp_path / "p")])
    again = merge_lora(lora_formats.load_lora(load_flux(base, dtype=torch.float32), tmp_path / "p"))
    assert rel_err(out(again, x), expected) < 1e-5


@pytest.mark.parametrize("lora", ["-x.safetensors", "--lora=y", "-"])
def test_info_command_with_an_option_like_lora(tmp_path, lora):
    """A recorded --lora (or prompt) that starts with "-": info's command parses back to it (it
    printed `--lora -x.safetensors`, which argparse refuses: "expected one argument")."""
    flags = {"prompt": lora, "lora": [lora, "b"], "lora_scale": [-0.5, 1.0], "steps": 3}
    argv = info.command({"script": "sample.py", "flags": flags}, tmp_path / "o.png")[2:]
    args = sample.parse_args(argv)
    assert (args.prompt, args.lora, args.lora_scale) == (lora, (lora, "b"), (-0.5, 1.0))


def test_folder_with_two_usual_lora_names_refused(valid, tmp_path, capsys, tiny_flux):
    """A folder holding both adapter_model.safetensors (peft reads it) and
    pytorch_lora_weights.safetensors (diffusers' load_lora_weights reads it): --lora of it is one
    line naming both, exit 2 (the first was taken silently)."""
    folder = write(tmp_path / "lora", valid[0], valid[1])
    save_file(dict(valid[0]), folder / "pytorch_lora_weights.safetensors")
    argv = sample_args(tiny_flux, tmp_path / "pano.png", lora=str(folder))
    found = r"found \['adapter_model.safetensors', 'pytorch_lora_weights.safetensors'\]"
    expect_error(capsys, sample.main, argv, tmp_path, rf"--lora: \S+lora must hold one .*{found}")


PEFT = settings(FUZZ, max_examples=12)  # each builds diffusers' model: ~0.5 s


@PEFT
@given(st.data())
def test_random_peft_configs_match_peft(base, tmp_path, data):
    """A peft LoRA of random targets, ranks (rank_pattern), alphas (alpha_pattern, negative and
    fractional too) and use_rslora: ours, merged, equals diffusers + peft on the same file."""
    draw, g = data.draw, torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    short = draw(st.sets(st.sampled_from(lora_formats.DIT360_TARGETS + ("proj_mlp",)), min_size=1))
    r, tensors, ranks, alphas = draw(st.integers(1, 4)), {}, {}, {}
    for name, m in diffusers_transformer(SEED).named_modules():
        if lora_formats.targeted(name, short):
            ranks[name], alphas[name] = (
                draw(st.integers(1, 4)),
                draw(st.sampled_from([None, -2, 0.5, 6])),
            )
            tensors[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(ranks[name], m.in_features, generator=g) * 0.1
            )
            tensors[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(m.out_features, ranks[name], generator=g) * 0.1
            )
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": draw(st.sampled_from([1, 4, 16, 2.5])),
           "target_modules": sorted(short), "use_rslora": draw(st.booleans()),
           "rank_pattern": {n: k for n, k in ranks.items() if k != r},
           "alpha_pattern": {n: a for n, a in alphas.items() if a is not None}}  # fmt: skip
    folder = write(tmp_path / "lora", tensors, cfg)
    x = inputs()
    model = merge_lora(lora_formats.load_lora(load_flux(base, dtype=torch.float32), folder))
    assert rel_err(out(model, x), with_peft(tensors, cfg, x)) < 1e-5


@pytest.mark.parametrize("name", ["x.png", "x.json", "x.txt", "runs"])
def test_no_lora_file_said_in_words(tiny_flux, tmp_path, capsys, name):
    """--lora of a .png, .json or text file says it is no safetensors file (not the header length
    its first bytes read as); of a folder of train.py runs, what was looked for there (not `[]`)."""
    given = tmp_path / name
    if name == "runs":
        (given / "run1" / "lora").mkdir(parents=True)
    else:
        given.write_bytes({"png": b"\x89PNG\r\n\x1a\n" + bytes(64)}.get(name[2:], b'{"r": 4}\n'))
    said = {"runs": r"runs holds no LoRA: looked for adapter_model.safetensors, .*\*.safetensors"}
    said = said.get(name, rf"{name}: not a safetensors file \(its first 8 bytes are no header len")
    argv = sample_args(tiny_flux, tmp_path / "pano.png", lora=str(given))
    expect_error(capsys, sample.main, argv, tmp_path, rf"--lora: \S+{said}.*: give ")
