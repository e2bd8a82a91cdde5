"""edit.py --photo: a perspective photo placed into the panorama and the rest outpainted."""

import math

import numpy as np
import pytest
from clitest import expect_error
from PIL import Image

import edit
from dit360.app import editing
from dit360.app.panorama import project_photo

PROMPT = "This is a panorama image. A quiet lake under a cloudy sky."


def photo_file(path, w=48, h=32):
    """A smooth, non-constant RGB photo."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 64], axis=-1)
    Image.fromarray(rgb.round().astype(np.uint8), "RGB").save(path)
    return path


def args(tiny_flux, photo, out, *extra):
    return [
        *("--photo", str(photo), "--prompt", PROMPT, "--base", str(tiny_flux), "--lora", "none"),
        *("--steps", "2", "--seed", "5", "--height", "64", "--device", "cpu", "--dtype", "fp32"),
        *("--out", str(out), *extra),
    ]


def frustum(height: int, fov: float, aspect: float) -> np.ndarray:
    """Which pixel centres of an H x 2H panorama see the photo at yaw = pitch = roll = 0: a
    re-statement from the pinhole model (the view looks at the image centre, longitude 0)."""
    y, x = np.mgrid[0:height, 0 : 2 * height] + 0.5
    lon, lat = (x / (2 * height) - 0.5) * 2 * math.pi, (0.5 - y / height) * math.pi
    d = np.stack([np.cos(lat) * np.sin(lon), np.sin(lat), np.cos(lat) * np.cos(lon)])
    t = math.tan(math.radians(fov) / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (d[2] > 0) & (np.abs(d[0] / d[2]) <= t) & (np.abs(d[1] / d[2]) <= t / aspect)


@pytest.mark.filterwarnings("ignore:64x128")
def test_photo_to_panorama(tiny_flux, tmp_path, monkeypatch) -> None:
    """The mask is the projection's footprint (the frustum, up to its boundary pixels); with
    --paste-back the panorama under it is the projected photo exactly; without, it is not."""
    photo = photo_file(tmp_path / "photo.png")
    seen = []
    real = editing.edit_many

    def spy(jobs, *a, **k):
        seen.extend((job.image, job.mask) for job in jobs)
        return real(jobs, *a, **k)

    monkeypatch.setattr(edit, "edit_many", spy)  # edit.py's own name for it
    edit.main(args(tiny_flux, photo, tmp_path / "pasted.png", "--paste-back"))
    canvas, mask = project_photo(Image.open(photo).convert("RGB"), 90, 0, 0, 0, 64)
    [(image, used)] = seen
    assert np.array_equal(np.asarray(image), np.asarray(canvas))
    assert np.array_equal(np.asarray(used), np.asarray(mask))
    keep = np.asarray(mask) >= 128
    assert set(np.unique(np.asarray(mask))) == {0, 255}
    inside = frustum(64, 90, 48 / 32)
    assert (keep != inside).sum() <= 0.1 * inside.sum(), ((keep != inside).sum(), inside.sum())
    out = np.asarray(Image.open(tmp_path / "pasted.png"))
    assert np.array_equal(out[keep], np.asarray(canvas)[keep])
    edit.main(args(tiny_flux, photo, tmp_path / "plain.png"))
    plain = np.asarray(Image.open(tmp_path / "plain.png"))
    assert not np.array_equal(plain[keep], np.asarray(canvas)[keep])


BAD = [  # extra flags, the error line
    (["--fov", "0"], r"argument --fov: needs a finite number >= 1 and <= 179, got '0'"),
    (["--fov", "180"], r"--fov: needs a finite number >= 1 and <= 179"),
    (["--fov", "nan"], r"--fov: needs a finite number >= 1 and <= 179, got 'nan'"),
    (["--fov", "-30"], r"--fov: needs a finite number >= 1 and <= 179"),
    (["--yaw", "nan"], r"argument --yaw: needs a finite number >= -180 and <= 180, got 'nan'"),
    (["--yaw", "181"], r"--yaw: needs a finite number >= -180 and <= 180"),
    (["--pitch", "500"], r"argument --pitch: needs a finite number >= -90 and <= 90, got '500'"),
    (["--pitch", "nan"], r"--pitch: needs a finite number >= -90 and <= 90"),
    (["--roll", "inf"], r"argument --roll: needs a finite number >= -180 and <= 180, got 'inf'"),
    (["--out", "{tmp}/photo.png"], r"--out .*photo\.png is --photo, which the edit would overwr"),
    (["--mask", "{tmp}/m.png"], r"--photo: not allowed with --image, --mask"),
    (["--photo", "{tmp}/notes.txt"], r"cannot identify image file .*notes.txt"),
    (["--photo", "{tmp}/missing.jpg"], r"No such file or directory.*missing.jpg"),
]


@pytest.mark.parametrize("extra, match", BAD)
def test_bad_photo_inputs(tiny_flux, tmp_path, capsys, extra, match) -> None:
    """A bad --photo or --fov is one line, exit 2, nothing written, no model loaded."""
    photo = photo_file(tmp_path / "photo.png")
    (tmp_path / "notes.txt").write_text("not an image")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    expect_error(
        capsys, edit.main, args(tiny_flux, photo, tmp_path / "o.png", *extra), tmp_path, match
    )
