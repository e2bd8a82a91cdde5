"""Valid flags together (README: each flag's row, "What is guaranteed"): seeded combinations of
sample.py's valid flags run to the end on the tiny model, each checked for its documented files
and for the images of single `--prompt --seed` runs; the warnings of a batch shown once each; a
rerun with another --cubemap-size; edit.py --photo with --invert, and too narrow a --fov."""

import random
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from clitest import expect_error
from PIL import Image
from test_photo import args as photo_args
from test_photo import photo_file

import edit
import sample
from dit360.app import cli
from dit360.app.info import read_record

PROMPTS = ["This is a panorama. A castle.", "This is a panorama. A lake at night."]
FACES = ("px", "nx", "py", "ny", "pz", "nz", "cross")
# A valid value of each flag (None: not given); the sampler picks one of each. Those above the
# line change pixels; those below must not (fp32: the offload modes are bit-identical).
TABLE = {
    "--lora-scale": [None, "0.5"],
    "--true-cfg": [None, "2"],
    "--negative-prompt": [None, "", "blurry"],
    "--wrap-pad": [None, "0", "2"],
    "--seamless-vae": [False, True],
    "--vae-tile": [None, "2"],
    "--reference-noise": [False, True],
    "--fp8": [False, True],
    "--no-merge-lora": [False, True],
    # ------------------------------------------------------------------ same pixels
    "--offload": [None, "none", "model", "blocks"],
    "--viewer": [False, True],
    "--cubemap": [False, True],
    "--cubemap-size": [None, "8"],
    "--captions": [False, True],
    "--overwrite": [False, True],
}
SAME = list(TABLE)[list(TABLE).index("--offload") :]


def flags(choice: dict) -> list[str]:
    """The argv of a choice {flag: value}: True a switch, None and False not given."""
    return [
        a
        for k, v in choice.items()
        if v not in (None, False)
        for a in (k, v)[: 1 + (v is not True)]
    ]


def base(tiny_flux, lora: Path) -> list[str]:
    return [
        *("--base", str(tiny_flux), "--lora", str(lora), "--steps", "2", "--seed", "4"),
        *("--height", "32", "--width", "64", "--device", "cpu", "--dtype", "fp32"),
    ]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    from test_lora import dit360_lora

    return dit360_lora(tmp_path_factory.mktemp("lora") / "lora", r=4, alpha=4)[0]


@pytest.mark.parametrize("seed", [1, 9, 12, 17])  # offload none, model, blocks x2
def test_combination(tiny_flux, lora, tmp_path, seed):
    """A seeded combination of valid flags with --num-images 2: exactly the documented files,
    each image recording its settings, the second the image of a single run at --seed 5 without
    the flags that must not change pixels."""
    rng = random.Random(seed)
    choice = {k: rng.choice(v) for k, v in TABLE.items()}
    out = tmp_path / "out"
    argv = [*base(tiny_flux, lora), *flags(choice), "--prompt", PROMPTS[0], "--num-images", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the size's (not 1024x2048); true CFG's when half given
        sample.main([*argv, "--out-dir", str(out)])
        alone = {k: v for k, v in choice.items() if k not in SAME}
        single = [*base(tiny_flux, lora), *flags(alone), "--prompt", PROMPTS[0], "--seed", "5"]
        sample.main([*single, "--out", str(tmp_path / "single.png")])
    names = {f"0000-seed{s}" for s in (4, 5)}
    cube = [f"-{f}.png" for f in FACES] * bool(choice["--cubemap"])
    ends = [".png", *[".html"] * choice["--viewer"], *[".txt"] * choice["--captions"], *cube]
    assert sorted(p.name for p in out.iterdir()) == sorted(n + e for n in names for e in ends)
    for name in names:
        assert read_record(out / f"{name}.png")["flags"]["seed"] == int(name[-1])
    assert np.array_equal(pixels(out / "0000-seed5.png"), pixels(tmp_path / "single.png"))
    if choice["--cubemap"]:
        side = int(choice["--cubemap-size"] or 16)
        assert Image.open(out / "0000-seed5-px.png").size == (side, side)


def shown(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Python's own `warnings.showwarning` (pytest records them instead)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def test_batch_warns_once(tiny_flux, tmp_path, capsys, monkeypatch):
    """A batch of images not 2:1 with --viewer --cubemap, as the script runs it (`run_main`):
    each warning is one line, shown once, not once an image; no viewer page or cube face."""
    monkeypatch.setattr(cli, "handle_signals", lambda: None)  # pytest keeps its own
    monkeypatch.setattr(cli, "SHOWN", set(), raising=False)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    monkeypatch.setitem(cli.STATE, "running", False)
    argv = ["--base", str(tiny_flux), "--lora", "none", "--steps", "1", "--device", "cpu"]
    argv += ["--height", "32", "--width", "32", "--viewer", "--cubemap", "--captions"]
    argv += ["--prompt", PROMPTS[0], "--num-images", "3", "--out-dir", str(tmp_path)]
    with warnings.catch_warnings():  # restores showwarning: Python's own, as in a script
        warnings.simplefilter("default")
        warnings.showwarning = shown  # as Python shows them in a script, not pytest's recorder
        cli.run_main(lambda: sample.main(argv))
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(lines) == 3 and len(set(lines)) == 3, lines  # size, no GPano, no viewer/cube
    assert all(line.count("warning:") == 1 for line in lines), lines
    names = {f"0000-seed{s}{e}" for s in range(3) for e in (".png", ".txt")}
    assert {p.name for p in tmp_path.iterdir()} == names


def test_rerun_makes_faces_of_the_new_size(tiny_flux, tmp_path):
    """A batch rerun with another --cubemap-size skips the image but makes its faces again at
    that size (they are not what was asked); at the same size it writes nothing."""
    argv = ["--base", str(tiny_flux), "--lora", "none", "--steps", "1", "--device", "cpu"]
    argv += ["--height", "32", "--width", "64", "--cubemap", "--prompt", PROMPTS[0]]
    argv += ["--num-images", "1", "--out-dir", str(tmp_path)]
    face, image = tmp_path / "0000-seed0-px.png", tmp_path / "0000-seed0.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the size's
        for size, side in [(None, 16), ("8", 8), ("16", 16)]:
            made = image.stat().st_mtime_ns if image.exists() else None
            sample.main([*argv, *(["--cubemap-size", size] if size else [])])
            assert Image.open(face).size == (side, side)
            assert Image.open(tmp_path / "0000-seed0-cross.png").size == (4 * side, 3 * side)
            assert made in (None, image.stat().st_mtime_ns)  # the image itself is skipped
        before = face.stat().st_mtime_ns
        sample.main([*argv, "--cubemap-size", "16"])
    assert face.stat().st_mtime_ns == before


def test_photo_with_invert_is_refused(tiny_flux, tmp_path, capsys):
    """edit.py --photo --invert would regenerate the photo and keep the black canvas (or, where
    the footprint is under a token, fail naming a mask the user never gave): one line, exit 2."""
    photo = photo_file(tmp_path / "photo.png")
    argv = photo_args(tiny_flux, photo, tmp_path / "o.png", "--invert")
    expect_error(capsys, edit.main, argv, tmp_path, r"--photo: not allowed with .*--invert")


def test_photo_too_narrow_names_fov(tiny_flux, tmp_path, capsys):
    """edit.py --photo at a valid --fov whose footprint is under a token: one line naming --photo
    and --fov and the fix, not a mask the user never gave."""
    photo = photo_file(tmp_path / "photo.png")
    argv = photo_args(tiny_flux, photo, tmp_path / "o.png", "--fov", "3", "--height", "256")
    err = expect_error(capsys, edit.main, argv, tmp_path, r"--photo's footprint \(--fov 3.0\)")
    assert "the mask" not in err and "a wider --fov" in err, err
