"""Seam scores (`dit360.app.outputs.seam_scores`): a deliberate seam against its rolled,
seamless version, and `python -m dit360.app.evaluate` on a folder (and that
`-m dit360.app.view` runs too)."""

import runpy
import sys

import numpy as np
import pytest
from clitest import expect_error
from PIL import Image
from scene import drawn_panorama

from dit360.app.outputs import evaluate_main, seam_report, seam_scores


def with_seam(img: Image.Image, step: float = 0.05) -> Image.Image:
    """The panorama under an exposure ramp across its width: a step of `step` at the wrap."""
    x = np.asarray(img, dtype=np.float64) / 255
    x = x + step * np.linspace(0, 1, img.width)[None, :, None]
    return Image.fromarray((x.clip(0, 1) * 255).round().astype(np.uint8))


def test_seam_scores_worse_than_rolled_version():
    """A panorama with a seam at the wrap scores far worse there than its version rolled by half
    a turn (whose wrap is seamless), and the rolled version's middle score is the seam's; the
    drawn panorama itself scores alike at the wrap and in the middle."""
    pano = drawn_panorama(128)
    seamed = with_seam(pano)
    rolled = Image.fromarray(np.roll(np.asarray(seamed), seamed.width // 2, axis=1))
    (seam, middle), (rolled_seam, rolled_middle) = map(seam_scores, (seamed, rolled))
    assert seam > 10 * rolled_seam and seam > 10 * middle  # measured 5.9 vs 0.17
    assert abs(rolled_middle - seam) < 1e-12 and abs(rolled_seam - middle) < 1e-12
    wrap, mid = seam_scores(pano)
    assert wrap < 0.5 and mid < 0.5  # measured 0.16, 0.17
    assert seam_report(seamed).startswith(f"seam score {seam:.3f} (middle {middle:.3f}")


def test_cli_prints_scores(tmp_path, capsys):
    """`python -m dit360.app.evaluate DIR` prints a line per panorama (below DIR too), skips images
    that are not 2:1, and ends with the means."""
    pano = drawn_panorama(32)
    (tmp_path / "sub").mkdir()
    pano.save(tmp_path / "a.png")
    with_seam(pano, 0.2).save(tmp_path / "sub" / "b.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "a-px.png")
    (tmp_path / "notes.txt").write_text("not an image")
    evaluate_main([str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and "a-px.png: skipped, 16x16 is not 2:1" in lines[0]
    (a, b) = (seam_scores(Image.open(tmp_path / p)) for p in ("a.png", "sub/b.png"))
    assert lines[1] == f"{tmp_path / 'a.png'}: seam {a[0]:.3f}, middle {a[1]:.3f}"
    assert lines[2].startswith(f"{tmp_path / 'sub' / 'b.png'}: seam {b[0]:.3f}")
    assert lines[3].startswith(f"mean of 2 panoramas: seam {(a[0] + b[0]) / 2:.3f}")


def test_cli_errors(tmp_path, capsys):
    """A missing path, a folder without images, an unreadable image or no 2:1 image among them:
    one line, exit 2."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("not an image")
    (tmp_path / "square").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "square" / "s.png")
    for argv, match in [
        ([str(tmp_path / "missing")], "no such file or folder"),
        ([str(tmp_path / "empty")], "no images"),
        ([str(tmp_path / "bad")], "x.png: not a readable image"),
        ([str(tmp_path / "square")], "no 2:1 panoramas"),
        ([], "required: paths"),
    ]:
        expect_error(capsys, evaluate_main, argv, tmp_path, match)


def test_16_bit_grey_scores_as_its_8_bit_version():
    """A 16-bit grey panorama (PIL mode I;16) is scored as its 8-bit version, not clipped white."""
    g = np.random.default_rng(0).integers(0, 65536, (32, 64)).astype(np.uint16)
    wide = Image.fromarray(g)
    narrow = Image.fromarray(np.round(g / 257).astype(np.uint8))
    assert wide.mode == "I;16" and seam_scores(wide)[0] > 0
    assert seam_scores(wide) == seam_scores(narrow)


@pytest.mark.parametrize(
    "module,match", [("dit360.app.evaluate", "paths"), ("dit360.app.view", "image")]
)
def test_module_commands(module, match, tmp_path, capsys, monkeypatch):
    """`python -m dit360.app.evaluate` and `python -m dit360.app.view` run their commands."""

    def run(argv: list[str]) -> None:
        monkeypatch.setattr(sys, "argv", [module, *argv])
        monkeypatch.delitem(sys.modules, module, raising=False)  # as `python -m` finds it
        runpy.run_module(module, run_name="__main__")

    expect_error(capsys, run, [], tmp_path, f"required: {match}")
