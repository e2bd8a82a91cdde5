"""Weights in the layouts users hold: single component files (BFL, ComfyUI, float8 and scaled
float8), a bundled ComfyUI checkpoint, a folder of ComfyUI model files, every convert_weights.py
output; each gives the FLUX.1-dev folder's image. Inputs fail before any model loads.

The tiny transformer files keep our config metadata (convert_weights writes it): a real
flux1-dev.safetensors needs none, its RoPE axes follow from the 128-wide heads, but the tiny
model's axes cannot be read from its shapes. Everything else is as the real files have it: no
config beside T5, CLIP or the VAE, ComfyUI's prefixes and spare tensors, float8 norms."""

import json
import re
import shutil
import time
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from clitest import expect_error
from PIL import Image
from safetensors.torch import load_file, save_file
from test_sample_cli import args as sample_args

import convert_weights
import sample
from dit360.app import text
from dit360.load.convert import convert_flux
from dit360.load.sources import BUNDLE, Part, in_folder, resolve_sources
from dit360.load.weights import load_autoencoder, load_flux, read_flux

F8 = torch.float8_e4m3fn
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def bfl_state(tiny_flux: Path, folder: Path) -> dict[str, torch.Tensor]:
    """The tiny transformer's tensors under BFL names (our convert output), with its metadata."""
    return load_file(convert_flux(tiny_flux, folder / "bfl.safetensors"))


def comfy_states(tiny_flux: Path, tmp: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each part as ComfyUI's single files hold it: the transformer in BFL names, T5 with both
    embedding names, CLIP under transformers 4's `text_model.` with a text projection, the VAE in
    BFL names with no config."""
    t5 = load_file(tiny_flux / "text_encoder_2" / "model.safetensors")
    t5["encoder.embed_tokens.weight"] = t5["shared.weight"].clone()
    clip = load_file(tiny_flux / "text_encoder" / "model.safetensors")
    clip = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in clip.items()}
    hidden = clip["text_model.final_layer_norm.weight"].shape[0]
    clip["text_projection.weight"] = torch.randn(hidden, hidden)
    vae = load_autoencoder(tiny_flux).state_dict()
    return {"transformer": bfl_state(tiny_flux, tmp), "t5": t5, "clip": clip, "vae": vae}


def metadata(tmp: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(tmp / "bfl.safetensors", "pt") as f:
        return f.metadata()


def to_fp8(state: dict[str, torch.Tensor], scaled: bool) -> tuple[dict, dict]:
    """(file tensors, the values they stand for): every tensor cast to float8 (ComfyUI's raw fp8
    files), or ComfyUI's scaled fp8: matrices as float8 with a per-tensor scale, plus input
    scales and a marker; vectors raw float8 except norms (bf16)."""
    out, values = {"scaled_fp8": torch.empty(0, dtype=F8)} if scaled else {}, {}
    for k, t in state.items():
        if scaled and t.ndim == 2:
            scale = t.abs().max().float() / 448
            out[k] = (t / scale).to(F8)
            out[k.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
            out[k.removesuffix(".weight") + ".scale_input"] = torch.ones(())
            values[k] = out[k].float() * scale
        elif scaled and ("norm" in k or "scale" in k.rsplit(".", 1)[-1]):
            out[k] = t.to(torch.bfloat16)
            values[k] = out[k].float()
        else:
            out[k] = t.to(F8)
            values[k] = out[k].float()
    return out, values


def tokenizer_cache(tiny_flux: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny tokenizers as the two ungated hub repos, in a Hugging Face cache (offline)."""
    for name, folder in [("openai--clip-vit-large-patch14", "tokenizer"),
                         ("google--t5-v1_1-xxl", "tokenizer_2")]:  # fmt: skip
        repo = root / f"models--{name}"
        shutil.copytree(tiny_flux / folder, repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))


def image(tiny_flux: Path, out: Path, *flags: str) -> np.ndarray:
    """sample.py's image (tiny size, 3 steps, no LoRA unless `flags` say) with --base replaced
    when `flags` hold weight flags."""
    argv = sample_args(tiny_flux, out)
    if "--base" in flags or any(f in flags for f in ("--transformer", "--t5", "--clip", "--vae")):
        i = argv.index("--base")
        del argv[i : i + 2]
    if "--lora" in flags:
        i = argv.index("--lora")
        del argv[i : i + 2]
    sample.main([*argv, *flags])
    return np.asarray(Image.open(out))


@pytest.fixture(scope="module")
def folder_image(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The FLUX.1-dev folder's image: what every other layout must give."""
    return image(tiny_flux, tmp_path_factory.mktemp("folder") / "pano.png")


@pytest.mark.filterwarnings("ignore:32x64")
def test_component_files_give_the_folder_image(
    tiny_flux, folder_image, tmp_path, monkeypatch
) -> None:
    """ComfyUI's four files as --transformer/--t5/--clip/--vae (tokenizers then from the ungated
    repos), a folder of them found by name in subfolders, and one bundled checkpoint."""
    tokenizer_cache(tiny_flux, tmp_path / "hub", monkeypatch)
    states, meta = comfy_states(tiny_flux, tmp_path), metadata(tmp_path)
    models = tmp_path / "ComfyUI" / "models"
    files = {
        "transformer": models / "diffusion_models" / "flux1-dev.safetensors",
        "t5": models / "text_encoders" / "t5xxl_fp16.safetensors",
        "clip": models / "clip" / "clip_l.safetensors",
        "vae": models / "vae" / "ae.safetensors",
    }
    for part, file in files.items():
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file(states[part], file, meta if part == "transformer" else None)
    flags = [x for part, file in files.items() for x in (f"--{part}", str(file))]
    assert np.array_equal(image(tiny_flux, tmp_path / "a.png", *flags), folder_image)
    assert np.array_equal(image(tiny_flux, tmp_path / "b.png", "--base", str(models)), folder_image)
    bundle = {BUNDLE[p] + k: t for p, state in states.items() for k, t in state.items()}
    save_file(bundle, tmp_path / "flux1-dev-all.safetensors", meta)
    got = image(
        tiny_flux, tmp_path / "c.png", "--base", str(tmp_path / "flux1-dev-all.safetensors")
    )
    assert np.array_equal(got, folder_image)
    src = resolve_sources(str(tmp_path / "flux1-dev-all.safetensors"))
    assert src.t5 == Part(tmp_path / "flux1-dev-all.safetensors", BUNDLE["t5"])
    assert src.clip_tokenizer.parent.parent.name == "models--openai--clip-vit-large-patch14"


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_files_read_as_their_values(tiny_flux, tmp_path, scaled) -> None:
    """A float8 transformer or T5 file (raw, or ComfyUI's scaled fp8 with per-tensor scales) loads
    exactly the values it stands for: those of a float32 file of the dequantized tensors."""
    states = comfy_states(tiny_flux, tmp_path)
    for part, load in [
        ("transformer", lambda p: load_flux(p, dtype=torch.float32).state_dict()),
        ("t5", lambda p: text.load_encoder(p, "t5", "cpu", torch.float32).state_dict()),
    ]:
        stored, values = to_fp8(states[part], scaled)
        meta = metadata(tmp_path) if part == "transformer" else None
        save_file(stored, tmp_path / f"{part}-fp8.safetensors", meta)
        save_file(values, tmp_path / f"{part}-values.safetensors", meta)
        got = load(Part(tmp_path / f"{part}-fp8.safetensors"))
        want = load(Part(tmp_path / f"{part}-values.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (part, k)
    model = load_flux(Part(tmp_path / "transformer-fp8.safetensors"), dtype=None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.filterwarnings("ignore:32x64")
def test_scaled_fp8_transformer_samples(tiny_flux, tmp_path) -> None:
    """sample.py with a scaled fp8 --transformer gives the image of its dequantized values."""
    stored, values = to_fp8(bfl_state(tiny_flux, tmp_path), scaled=True)
    meta = metadata(tmp_path)
    save_file(stored, tmp_path / "flux1-dev-fp8-scaled.safetensors", meta)
    save_file(values, tmp_path / "values.safetensors", meta)
    base = ("--base", str(tiny_flux))
    a = image(
        tiny_flux, tmp_path / "a.png", *base, "--transformer", str(tmp_path / "values.safetensors")
    )
    b = image(
        tiny_flux,
        tmp_path / "b.png",
        *base,
        "--transformer",
        str(tmp_path / "flux1-dev-fp8-scaled.safetensors"),
    )
    assert np.array_equal(a, b)


@pytest.mark.filterwarnings("ignore:32x64")
def test_every_convert_output_samples(tiny_flux, folder_image, tmp_path, capsys) -> None:
    """convert_weights.py's BFL file and diffusers folder give the folder's image; a merged file
    (BFL or diffusers) gives the unmerged LoRA's image, and the default LoRA is not added again."""
    from test_lora import dit360_lora

    lora = dit360_lora(tmp_path / "lora")[0]
    base = ("--base", str(tiny_flux))
    for out, extra in [("bfl.safetensors", []), ("diffusers", ["--to", "diffusers"])]:
        convert_weights.main(["--base", str(tiny_flux), "--out", str(tmp_path / out), *extra])
        got = image(tiny_flux, tmp_path / "x.png", *base, "--transformer", str(tmp_path / out))
        assert np.array_equal(got, folder_image), out
    want = image(tiny_flux, tmp_path / "lora.png", *base, "--lora", str(lora))
    for out, extra in [("merged.safetensors", []), ("merged", ["--to", "diffusers"])]:
        convert_weights.main(
            [
                "--base",
                str(tiny_flux),
                "--lora",
                str(lora),
                "--merge",
                "--out",
                str(tmp_path / out),
                *extra,
            ]
        )
        capsys.readouterr()
        got = image(tiny_flux, tmp_path / "m.png", *base, "--transformer", str(tmp_path / out),
                    "--lora", "auto")  # fmt: skip
        assert np.abs(got.astype(int) - want).max() <= 1, out  # merged in fp32 once, or per run
        assert "has one merged in" in capsys.readouterr().err, out


def test_folder_with_two_transformers(tiny_flux, tmp_path) -> None:
    """In a ComfyUI folder, links to one file (ComfyUI's clip/ and text_encoders/ often hold the
    same file) count once; two different transformer files: pick with --transformer, say which."""
    import os

    state = bfl_state(tiny_flux, tmp_path / "x")
    models = tmp_path / "models"
    (models / "unet").mkdir(parents=True)
    save_file(state, models / "unet" / "flux1-dev.safetensors")
    (models / "diffusion_models").mkdir()
    (models / "diffusion_models" / "flux1-dev.safetensors").symlink_to(
        models / "unet" / "flux1-dev.safetensors"
    )
    (models / "checkpoints").mkdir()
    os.link(
        models / "unet" / "flux1-dev.safetensors", models / "checkpoints" / "flux1-hard.safetensors"
    )
    found = in_folder(models, "transformer")
    assert found is not None and found.path.samefile(models / "unet" / "flux1-dev.safetensors")
    save_file(state, models / "diffusion_models" / "flux1-dev-fp8.safetensors")
    with pytest.raises(
        ValueError, match=r"several files hold a FLUX transformer .*flux1-dev-fp8.*--transformer"
    ):
        resolve_sources(str(models))


@pytest.mark.filterwarnings("ignore:32x64")
def test_bad_inputs_fail_before_loading(tiny_flux, tmp_path, capsys, monkeypatch) -> None:
    """A wrong --lora, the default LoRA not cached offline, a transformer file without encoders, a
    CLIP file as --t5: one line, exit 2, in seconds, and no model was ever built."""
    built = []
    for name in ("load_flux", "load_autoencoder"):
        monkeypatch.setattr(f"dit360.load.weights.{name}", lambda *a, n=name, **k: built.append(n))
    monkeypatch.setattr(text, "load_encoder", lambda *a, **k: built.append("encoder"))
    file = convert_flux(tiny_flux, tmp_path / "flux1-dev.safetensors")
    clip = tiny_flux / "text_encoder" / "model.safetensors"
    cases = [
        (["--lora", str(tmp_path / "typo.safetensors")], r"--lora: .*typo.safetensors: no such"),
        (["--lora", "auto"], r"--lora: Insta360-Research/DiT360.* not in the Hugging Face cache"),
        (["--base", str(file)], r"--base .*flux1-dev.safetensors holds the FLUX transformer but no "
         r"T5-XXL, CLIP-L, VAE: give --t5 \(e.g. t5xxl_fp16.safetensors\), --clip .*, or pass "
         r"it as --transformer \(the rest from black-forest-labs/FLUX.1-dev\)"),
        (["--t5", str(clip)], r"--t5: .*model.safetensors holds no T5-XXL"),
    ]  # fmt: skip
    for flags, match in cases:
        start = time.perf_counter()
        argv = sample_args(tiny_flux, tmp_path / "o.png")
        if flags[0] in ("--lora", "--base"):
            i = argv.index(flags[0])
            del argv[i : i + 2]
        expect_error(capsys, sample.main, [*argv, *flags], tmp_path, match)
        assert time.perf_counter() - start < 10
    assert built == []


def test_repo_ids_fetch_only_what_is_used(tiny_flux, tmp_path, monkeypatch) -> None:
    """With --transformer given, the --base repo is asked for the encoders, the VAE and the
    tokenizers only, never for its 24 GB transformer/ folder."""
    asked = []

    def fake(src, patterns=None, expected=""):
        asked.append((str(src), tuple(patterns or ())))
        return tiny_flux if str(src) == "acme/flux" else Path(src)

    monkeypatch.setattr("dit360.load.sources.resolve", fake)
    file = convert_flux(tiny_flux, tmp_path / "flux1-dev.safetensors")
    src = resolve_sources("acme/flux", str(file))
    axes = tuple(
        json.loads((tiny_flux / "transformer" / "config.json").read_text())["axes_dims_rope"]
    )
    assert src.transformer == Part(file, axes_dim=axes)  # --base's, for a file without them
    assert src.t5 == Part(tiny_flux / "text_encoder_2")
    [patterns] = [p for s, p in asked if s == "acme/flux"]
    assert "transformer/*" not in patterns and "transformer/config.json" in patterns
    assert {"text_encoder_2/*", "text_encoder/*", "vae/*", "tokenizer/*"} <= set(patterns)


@pytest.mark.filterwarnings("ignore:32x64")
def test_bare_transformer_takes_axes_from_base(tiny_flux, tmp_path, capsys, folder_image) -> None:
    """A transformer file with 16-wide heads and no config (its RoPE axes are not in the weights)
    as --transformer: the axes come from --base's transformer/config.json, and the image is the
    folder's; a --base without that config, or no --base, is told what to give."""
    file = tmp_path / "flux1-dev.safetensors"
    save_file(bfl_state(tiny_flux, tmp_path / "x"), file)  # no metadata: no config
    fix = r"head dim 16: the RoPE axes are not stored in the weights; give --base a folder \(or"
    with pytest.raises(ValueError, match=fix):
        read_flux(file)
    got = image(tiny_flux, tmp_path / "a.png", "--base", str(tiny_flux), "--transformer", str(file))
    assert np.array_equal(got, folder_image)
    base = tmp_path / "no-config"
    shutil.copytree(tiny_flux, base, ignore=shutil.ignore_patterns("transformer"))
    argv = [*sample_args(base, tmp_path / "out" / "b.png"), "--transformer", str(file)]
    (tmp_path / "out").mkdir()
    expect_error(capsys, sample.main, argv, tmp_path / "out", rf"--transformer: \S+ {fix}")


def test_uncached_defaults_say_what_to_do(tiny_flux, tmp_path, capsys, monkeypatch) -> None:
    """Offline with nothing cached: the default --base says how to get the gated FLUX.1-dev
    (its license, `hf auth login`); --lora auto offers --lora none."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    (out := tmp_path / "out").mkdir()
    argv = sample_args(tiny_flux, out / "o.png", lora="auto")
    gated = (
        r"--base: black-forest-labs/FLUX.1-dev is not in the Hugging Face cache .*, or pass a "
        r"local folder. It is gated: accept its license on https://huggingface.co/black-forest-"
        r"labs/FLUX.1-dev while logged in, and log in here with `hf auth login` \(or set "
        r"HF_TOKEN\) before downloading$"
    )
    i = argv.index("--base")
    no_base = argv[:i] + argv[i + 2 :]
    expect_error(capsys, sample.main, no_base, out, gated)
    auto = r"--lora: Insta360-Research/DiT360.* not in the Hugging Face cache .*; or run without "
    expect_error(capsys, sample.main, argv, out, auto + r"it: --lora none \(plain FLUX.1-dev\)$")


def test_text_errors_name_where_the_files_came_from(tiny_flux, tmp_path, capsys, monkeypatch):
    """A broken CLIP tokenizer of the cache's ungated repo (every part given by its flag), a broken
    T5 config of the cached default FLUX.1-dev: one line led by the repo id, naming the cache
    path; not `--base:` (no --base was given: it was)."""
    hub = tmp_path / "hub"
    tokenizer_cache(tiny_flux, hub, monkeypatch)
    cached = hub / "models--openai--clip-vit-large-patch14" / "snapshots" / COMMIT
    (cached / "vocab.json").write_text("[1, 2]")
    flux = hub / "models--black-forest-labs--FLUX.1-dev"
    shutil.copytree(tiny_flux, flux / "snapshots" / COMMIT)
    (flux / "refs").mkdir()
    (flux / "refs" / "main").write_text(COMMIT)
    config = flux / "snapshots" / COMMIT / "text_encoder_2" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "d_model": 0}))
    (out := tmp_path / "out").mkdir()
    argv = sample_args(tiny_flux, out / "o.png")
    i = argv.index("--base")
    no_base = argv[:i] + argv[i + 2 :]
    parts = [x for p in ("transformer", "t5", "clip", "vae") for x in (f"--{p}", str(tiny_flux))]
    resolve_sources.cache_clear()  # the default FLUX.1-dev: from this cache
    for flags, repo, path in [
        (parts, "openai/clip-vit-large-patch14", cached),
        ([], "black-forest-labs/FLUX.1-dev", config),
    ]:
        where = rf"^error: {re.escape(repo)}: {re.escape(str(path))}"
        err = expect_error(capsys, sample.main, [*no_base, *flags], out, where)
        assert "--base" not in err, err
