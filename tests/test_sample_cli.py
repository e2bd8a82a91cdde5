"""sample.py end to end on the tiny FLUX.1-dev folder: parity with FluxPipeline, files, errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clitest import expect_error
from PIL import Image

import sample

ROOT = Path(__file__).parents[1]
PROMPT = "This is a panorama. A castle on a hill at sunset."


def args(tiny_flux, out, *extra, lora: str | None = "none") -> list[str]:
    """sample.py's tiny run; `lora` None: no --lora flag (`extra` gives them)."""
    return [
        *("--prompt", PROMPT, "--base", str(tiny_flux), *(("--lora", lora) if lora else ())),
        *("--height", "32", "--width", "64", "--steps", "3", "--seed", "4"),
        *("--device", "cpu", "--dtype", "fp32", "--out", str(out), *extra),
    ]


def pipeline_image(tiny_flux, lora=None, weights: dict | None = None, **kw) -> np.ndarray:
    """diffusers' FluxPipeline (+ load_lora_weights; of each of `weights`' LoRAs, weighted by
    set_adapters) with the settings of `args` (and `kw`), as int16."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux, torch_dtype=torch.float32)
    if lora:
        pipe.load_lora_weights(lora)
    for i, path in enumerate(weights or {}):
        pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
    if weights:
        pipe.set_adapters([f"lora{i}" for i in range(len(weights))], list(weights.values()))
    image = pipe(
        PROMPT,
        height=32,
        width=64,
        num_inference_steps=3,
        guidance_scale=2.8,
        generator=torch.Generator("cpu").manual_seed(4),
        **kw,
    ).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("offload", ["none", "model", "blocks"])
def test_matches_flux_pipeline(tiny_flux, tmp_path, capsys, offload):
    """--lora none --wrap-pad 0: the same image as diffusers' FluxPipeline (max pixel diff <= 1),
    in each --offload mode."""
    out = tmp_path / "pano.png"
    with pytest.warns(UserWarning, match="trained at 1024x2048"):
        sample.main(args(tiny_flux, out, "--wrap-pad", "0", "--offload", offload))
    assert f"offload {offload} (--offload)" in capsys.readouterr().err
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert got.shape == (32, 64, 3)
    assert np.abs(got - pipeline_image(tiny_flux)).max() <= 1


@pytest.mark.parametrize("merge", [True, False])
def test_lora_matches_flux_pipeline(tiny_flux, tmp_path, capsys, merge):
    """--lora DIR (DiT360 format), merged or not: the image of FluxPipeline + load_lora_weights;
    loading the LoRA is announced."""
    from test_lora import dit360_lora

    folder = dit360_lora(tmp_path / "lora", r=4, alpha=4)[0]
    out = tmp_path / "pano.png"
    extra = ["--wrap-pad", "0"] + ([] if merge else ["--no-merge-lora"])
    sample.main(args(tiny_flux, out, *extra, lora=str(folder)))
    how = "merged into the weights" if merge else "as adapters"
    assert f"LoRA {folder} at scale 1.0, {how}" in capsys.readouterr().err
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(got - pipeline_image(tiny_flux, folder)).max() <= 1
    assert np.abs(got - pipeline_image(tiny_flux)).max() > 1  # the LoRA changes it beyond that


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_two_loras_match_flux_pipeline(tiny_flux, tmp_path, capsys):
    """--lora twice, a --lora-scale each, as adapters: FluxPipeline's image with both LoRAs
    (load_lora_weights with adapter names) weighted by set_adapters."""
    from test_lora import KOHYA_FOR_DIFFUSERS, bfl_lora, dit360_lora

    folder = dit360_lora(tmp_path / "lora", r=4, alpha=4)[0]
    style = bfl_lora(tmp_path / "style.safetensors", KOHYA_FOR_DIFFUSERS, "kohya", r=2)[0]
    out = tmp_path / "pano.png"
    loras = ["--lora", str(folder), "--lora", str(style), "--no-merge-lora"]
    scales = ["--lora-scale", "0.8", "--lora-scale", "1.5"]
    sample.main(args(tiny_flux, out, "--wrap-pad", "0", *loras, *scales, lora=None))
    err = capsys.readouterr().err
    assert f"LoRA {folder} at scale 0.8, as adapters" in err
    assert f"LoRA {style} at scale 1.5, as adapters" in err
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(got - pipeline_image(tiny_flux, weights={folder: 0.8, style: 1.5})).max() <= 1
    other = pipeline_image(tiny_flux, weights={folder: 0.8, style: 0.0})
    assert np.abs(got - other).max() > 1  # the second LoRA changes it beyond that


def test_true_cfg_matches_flux_pipeline(tiny_flux, tmp_path, capsys):
    """--negative-prompt --true-cfg 4 --wrap-pad 0: FluxPipeline's image with negative_prompt and
    true_cfg_scale; the cost is said; a batch row's "negative_prompt" is the same."""
    neg = ("--negative-prompt", "blurry, a seam", "--true-cfg", "4")
    out = tmp_path / "pano.png"
    sample.main(args(tiny_flux, out, "--wrap-pad", "0", *neg))
    assert "true CFG at scale 4.0: two transformer calls a step" in capsys.readouterr().err
    got = np.asarray(Image.open(out), dtype=np.int16)
    expected = pipeline_image(tiny_flux, negative_prompt=neg[1], true_cfg_scale=4.0)
    assert np.abs(got - expected).max() <= 1
    assert np.abs(got - pipeline_image(tiny_flux)).max() > 1  # true CFG changes it beyond that
    rows = tmp_path / "rows.jsonl"
    rows.write_text(f'{{"prompt": "{PROMPT}", "negative_prompt": "{neg[1]}", "out": "b.png"}}\n')
    batch = args(tiny_flux, tmp_path / "x.png", "--wrap-pad", "0", *neg[2:])
    batch[batch.index("--prompt") : batch.index("--prompt") + 2] = ["--prompts", str(rows)]
    with pytest.warns(UserWarning, match="--true-cfg 4.0 is off where no negative prompt"):
        sample.main([*batch, "--out-dir", str(tmp_path)])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png"), dtype=np.int16), got)


def test_negative_prompt_ignored_at_true_cfg_1(tiny_flux, tmp_path, capsys):
    """--negative-prompt without --true-cfg > 1 is ignored, as in diffusers, with a warning."""
    out = tmp_path / "pano.png"
    with pytest.warns(UserWarning, match="--negative-prompt is ignored at --true-cfg 1"):
        sample.main(args(tiny_flux, out, "--wrap-pad", "0", "--negative-prompt", "blurry"))
    assert "true CFG" not in capsys.readouterr().err
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(got - pipeline_image(tiny_flux)).max() <= 1


def test_gpano_metadata(tiny_flux, tmp_path):
    """PNG and JPEG outputs carry GPano XMP with the equirectangular projection and sizes."""
    for name in ("pano.png", "pano.jpg"):
        out = tmp_path / name
        sample.main(args(tiny_flux, out, "--seamless-vae"))
        xmp = Image.open(out).info["xmp"]
        xmp = xmp.decode() if isinstance(xmp, bytes) else xmp
        assert 'GPano:ProjectionType="equirectangular"' in xmp
        assert 'GPano:FullPanoWidthPixels="64"' in xmp
        assert 'GPano:CroppedAreaImageHeightPixels="32"' in xmp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pano.jpg", "pano.png"]


def test_height_alone_makes_a_full_panorama(tiny_flux, tmp_path):
    """--height alone: the width follows, 2 x height, a 2:1 image with GPano metadata (the width
    stayed 2048 before: --height 32 made a 32x2048 strip without it)."""
    argv = args(tiny_flux, tmp_path / "pano.png", "--steps", "1")
    del argv[argv.index("--width") : argv.index("--width") + 2]
    with pytest.warns(UserWarning, match="trained at 1024x2048"):
        sample.main(argv)
    image = Image.open(tmp_path / "pano.png")
    assert image.size == (64, 32) and "xmp" in image.info


def test_cli_errors(tiny_flux, tmp_path, capsys):
    """Bad sizes, a missing base folder and an unwritable output fail with one clear line, exit 2,
    and write nothing."""
    out = tmp_path / "x.png"
    (tmp_path / "blocker").write_text("a file where a folder should be")
    for argv, match in [
        ([*args(tiny_flux, out), "--height", "30"], "multiples of 16"),
        (args(tmp_path / "no-such-folder", out), "no-such-folder"),
        (args(tiny_flux, tmp_path / "blocker" / "x.png"), "cannot write"),
        (args(tiny_flux, tmp_path / "x.gif"), r"\.png, \.jpg"),
    ]:
        expect_error(capsys, sample.main, argv, tmp_path, match)


def test_cli_exit_code(tmp_path):
    """As a command, a bad argument exits with status 2 and one line on stderr, no traceback."""
    cmd = [sys.executable, str(ROOT / "sample.py"), "--prompt", "x", "--width", "100"]
    r = subprocess.run(cmd + ["--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "multiples of 16" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_not_2to1_has_no_gpano(tiny_flux, tmp_path):
    """A 32x32 output is no full panorama: written with a warning and without GPano metadata."""
    out = tmp_path / "square.png"
    with pytest.warns(UserWarning, match="not 2:1.*no 360 \\(GPano\\) metadata"):
        sample.main([*args(tiny_flux, out), "--width", "32"])
    assert Image.open(out).size == (32, 32) and "xmp" not in Image.open(out).info


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_attention_backend(tiny_flux, tmp_path, monkeypatch, backend):
    """--attention forces SDPA's kernel in every attention call while denoising (the others are
    off), and the image is still FluxPipeline's."""
    from dit360.core import layers

    flags, attention = [], layers.attention

    def spy(*a, **k):
        b = torch.backends.cuda
        flags.append((b.math_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled()))
        return attention(*a, **k)

    monkeypatch.setattr(layers, "attention", spy)  # the transformer's attention
    out = tmp_path / "pano.png"
    with pytest.warns(UserWarning, match="trained at 1024x2048"):
        sample.main(args(tiny_flux, out, "--wrap-pad", "0", "--attention", backend))
    expected = (backend == "math", backend == "flash", False)
    assert flags and set(flags) == {expected}
    got = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(got - pipeline_image(tiny_flux)).max() <= 1


def test_help_says_out_dirs_default(capsys):
    """--out-dir's help names the folder a batch without --out writes to (panoramas)."""
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--out-dir OUT_DIR batch outputs (default: --out's folder, else panoramas)" in text


def test_schnell_transformer_warns_guidance_unused(tiny_flux, tmp_path, capsys):
    """A transformer without the guidance embedder (FLUX.1-schnell) runs, and says --guidance does
    nothing (it was silently ignored)."""
    from tiny import diffusers_transformer, save_transformer

    schnell = save_transformer(diffusers_transformer(seed=3, guidance_embeds=False), tmp_path / "t")
    out = tmp_path / "pano.png"
    with pytest.warns(UserWarning) as warned:
        sample.main(args(tiny_flux, out, "--transformer", str(schnell)))
    said = [str(w.message) for w in warned if "guidance" in str(w.message)]
    assert len(said) == 1 and "no guidance input (FLUX.1-schnell?)" in said[0], said
    assert out.is_file()
