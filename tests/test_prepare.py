"""The data preparation command: jsonl rows, images and masks a training loader can read."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import py360convert
import pytest
from clitest import expect_error
from PIL import Image

from dit360.app.panorama import VIEW_RANGES
from dit360.train.data import read_rows
from prepare import main, prepare


def make_images(folder: Path, sizes: dict[str, tuple[int, int]], seed: int = 0) -> None:
    """Write random smooth RGB images (name -> (w, h)) with a caption file each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (w, h) in sizes.items():
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"a photo called {name}\n")


def raw_rows(path: Path) -> list[dict]:
    """The json objects of a jsonl file as written, each with exactly the keys training reads."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(row) == {"image", "caption", "mask"} for row in rows)
    return rows


def load(path: Path) -> np.ndarray:
    """An image file as an array, closing the file."""
    with Image.open(path) as img:
        return np.asarray(img)


def solid_angle(mask: np.ndarray) -> float:
    """Solid angle covered by a binary equirectangular mask (h, 2h)."""
    h = mask.shape[0]
    top = math.pi / 2 - np.arange(h) * math.pi / h
    rows = math.pi / h * (np.sin(top) - np.sin(top - math.pi / h))
    return float(((mask > 0) * rows[:, None]).sum())


def test_prepare_writes_loadable_rows(tmp_path):
    """pano + persp jsonl rows point at existing images with binary masks of the same size."""
    make_images(tmp_path / "pano", {"a.png": (64, 32), "b.jpg": (96, 48)})
    make_images(tmp_path / "photos", {"c.jpg": (40, 30), "sub/d.png": (30, 40)}, seed=1)
    out = tmp_path / "data"
    folders = ["--pano", str(tmp_path / "pano"), "--persp", str(tmp_path / "photos")]
    views = "--height 64 --fov 80 --pitch-range -30 30 --roll-range -10 10".split()
    main(["--out", str(out), *folders, *views])
    assert len(raw_rows(out / "pano.jsonl")) == 2 and len(raw_rows(out / "persp.jsonl")) == 2
    # The training loader's reader checks every row (files exist and decode, 2:1 panoramas, masks
    # the image's shape) and raises if any is bad; it resolves paths against the jsonl's folder.
    rows = read_rows(pano=out / "pano.jsonl", persp=out / "persp.jsonl")
    pano, persp = rows["pano"], rows["persp"]
    assert [r.caption for r in pano] == ["a photo called a.png", "a photo called b.jpg"]
    assert len(persp) == 2 and persp[1].image.name == "sub__d.png"
    for r in pano:
        image, mask = load(r.image), load(r.mask)
        assert image.shape[:2] == mask.shape and image.shape[1] == 2 * image.shape[0]
        assert (mask == 255).all()
    for r, (w, h) in zip(persp, [(40, 30), (30, 40)], strict=True):
        image, mask = load(r.image), load(r.mask)
        assert image.shape == (64, 128, 3) and mask.shape == (64, 128)
        assert set(np.unique(mask)) == {0, 255}
        assert (image[mask == 0] == 0).all() and image[mask == 255].mean() > 10
        a = math.radians(80)
        b = 2 * math.atan(math.tan(a / 2) * h / w)
        omega = 4 * math.asin(math.sin(a / 2) * math.sin(b / 2))
        assert abs(solid_angle(mask) / omega - 1) < 0.02
    assert not list(out.rglob("*.tmp"))
    assert not (out / "pano.jsonl").read_text().count(str(tmp_path))  # relative paths


def test_prepare_absolute_paths_and_sampled_views(tmp_path):
    """--absolute writes absolute paths; sampled views differ between photos but repeat by seed."""
    make_images(tmp_path / "photos", {"a.png": (32, 24), "b.png": (32, 24)})
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        prepare(out, persp=tmp_path / "photos", absolute=True, height=32, seed=3)
    written = raw_rows(outs[0] / "persp.jsonl")
    assert all(Path(r["image"]).is_absolute() and Path(r["mask"]).is_absolute() for r in written)
    rows = [read_rows(persp=out / "persp.jsonl")["persp"] for out in outs]
    assert [r.image for r in rows[0]] == [Path(r["image"]) for r in written]
    masks = [[load(r.mask) for r in rs] for rs in rows]
    assert (masks[0][0] == masks[1][0]).all() and (masks[0][1] == masks[1][1]).all()
    assert (masks[0][0] != masks[0][1]).any()


def test_bad_rows_are_listed_together(tmp_path, capsys):
    """An unreadable image, a missing caption and a non 2:1 panorama are all named in one error,
    and nothing at all is written (no jsonl, no masks, no projected photos)."""
    make_images(tmp_path / "pano", {"good.png": (64, 32), "square.png": (32, 32)})
    make_images(tmp_path / "photos", {"fine.png": (32, 24), "nocap.png": (32, 24)})
    (tmp_path / "photos" / "nocap.txt").unlink()
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "photos" / "broken.txt").write_text("broken")
    out = tmp_path / "data"
    with pytest.raises(ValueError) as err:
        prepare(out, pano=tmp_path / "pano", persp=tmp_path / "photos", height=32)
    message = str(err.value)
    assert "3 bad rows" in message
    assert "square.png: not 2:1 (32x32)" in message and "nocap.png: missing caption" in message
    assert "broken.jpg" in message
    assert not out.exists()
    out.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--pano", str(tmp_path / "pano")])
    assert exit_info.value.code == 1 and "error: 1 bad rows" in capsys.readouterr().err
    assert not list(out.iterdir())
    written = prepare(
        out, pano=tmp_path / "pano", persp=tmp_path / "photos", height=32, skip_bad=True
    )
    rows = read_rows(pano=written["pano"], persp=written["persp"])
    assert [len(rows[k]) for k in ("pano", "persp")] == [1, 1]


def test_rerun_needs_overwrite(tmp_path, capsys):
    """A second run into the same --out is refused (the jsonl untouched) unless --overwrite."""
    make_images(tmp_path / "pano", {"a.png": (64, 32)})
    out, pano = tmp_path / "data", ["--pano", str(tmp_path / "pano")]
    main(["--out", str(out), *pano])
    (out / "pano.jsonl").write_text('{"edited": "by hand"}\n')
    expect_error(capsys, main, ["--out", str(out), *pano], tmp_path, r"holds pano\.jsonl from an")
    main(["--out", str(out), *pano, "--overwrite"])
    assert [r.image.name for r in read_rows(pano=out / "pano.jsonl")["pano"]] == ["a.png"]


def test_16_bit_photo_projects_as_its_8_bit_version(tmp_path):
    """A 16-bit grey photo is projected as the same photo saved at 8 bits, not as solid white."""
    x = np.linspace(0, 65535, 24 * 32).round().astype(np.uint16).reshape(24, 32)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(x).save(photos / "a16.png")
    Image.fromarray(np.round(x / 65535 * 255).astype(np.uint8)).save(photos / "a8.png")
    for name in ("a16", "a8"):
        (photos / f"{name}.txt").write_text("a ramp")
    written = prepare(tmp_path / "data", persp=photos, height=32, fov=80, yaw_range=(0, 0))
    sixteen, eight = (load(r.image).astype(int) for r in read_rows(persp=written["persp"])["persp"])
    assert np.abs(sixteen - eight).max() <= 1 and sixteen.std() > 10


def test_projected_photo_matches_py360convert(tmp_path):
    """py360convert's perspective view of a written canvas, at the photo's view, is the photo."""
    make_images(tmp_path / "photos", {"wide.png": (40, 30), "tall.png": (30, 40)}, seed=2)
    yaw, pitch, roll = 160.0, 25.0, 10.0  # across the seam (160 + 40 > 180), tilted and rolled
    fixed = {"yaw_range": (yaw, yaw), "pitch_range": (pitch, pitch), "roll_range": (roll, roll)}
    # Height 128: the photos are narrower than prepare's target width, so they are not resized.
    written = prepare(tmp_path / "data", persp=tmp_path / "photos", height=128, fov=80, **fixed)
    rows = read_rows(persp=written["persp"])["persp"]
    assert [r.image.name for r in rows] == ["tall.png", "wide.png"]
    for r in rows:
        photo = load(tmp_path / "photos" / r.image.name).astype(np.float64)
        h, w = photo.shape[:2]
        # Ours spans the fov edge to edge (pixel centres inside); py360convert puts the outermost
        # pixel centres at +-tan(fov / 2), so it gets the centre-to-centre field of view.
        t = math.tan(math.radians(80) / 2)
        fov = tuple(math.degrees(2 * math.atan(t * (n - 1) / w)) for n in (w, h))
        mask, canvas = (
            py360convert.e2p(load(f).astype(np.float64), fov, yaw, pitch, (h, w), in_rot_deg=roll)
            for f in (r.mask, r.image)
        )
        # Compare where every canvas pixel e2p interpolates from is inside the mask.
        inside = mask >= 255 - 1e-6
        err = np.abs(canvas - photo)[inside]
        # Tolerance, in 8-bit levels: the round trip is two bilinear resamplings of a smooth
        # (bilinearly upscaled 4x4) image plus the canvas's uint8 rounding; over seeds and views
        # the mean error is 0.3-0.5 and the largest 8. A view off by 0.5 degrees (a quarter
        # photo pixel) in yaw or roll, or 1 degree in fov, already gives a mean of about 1 or more.
        assert inside.mean() > 0.9 and err.mean() < 0.75 and err.max() < 12


def test_help_mentions_captions():
    """python prepare.py --help runs and explains where captions come from."""
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "prepare.py", "--help"], cwd=root, capture_output=True, text=True
    )
    assert res.returncode == 0 and ".txt" in res.stdout and "same stem" in res.stdout


def test_overwrite_switches_whole_or_not_at_all(tmp_path, monkeypatch):
    """prepare --overwrite stopped at each of its renames in turn (a kill at the switch): each
    jsonl still names existing files of one run, every projected photo inside its own mask
    (old and new views differ: a mix would not be), and a rerun leaves one run's files."""
    make_images(tmp_path / "pano", {"p.png": (64, 32)})
    make_images(tmp_path / "photos", {"a.png": (32, 24), "b.png": (32, 24)})
    folders = dict(pano=tmp_path / "pano", persp=tmp_path / "photos", height=32)
    old, new = dict(fov=60, yaw_range=(0, 0)), dict(fov=100, yaw_range=(150, 150))
    prepare(tmp_path / "old", **folders, **old)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == stop:
            raise KeyboardInterrupt  # killed here
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    stop = 0
    prepare(tmp_path / "count", **folders, **new)  # how many renames a run makes
    for stop in range(1, len(calls) + 1):
        calls.clear()
        out = tmp_path / f"killed-{stop}"
        shutil.copytree(tmp_path / "old", out)
        with pytest.raises(KeyboardInterrupt):
            prepare(out, **folders, overwrite=True, **new)
        rows = read_rows(pano=out / "pano.jsonl", persp=out / "persp.jsonl")  # files exist
        for r in rows["persp"]:
            image, mask = load(r.image).max(axis=2), load(r.mask)
            assert (image[mask == 0] == 0).all() and (image[mask == 255] > 0).mean() > 0.95
    stop = 0
    prepare(out, **folders, overwrite=True, **new)  # after the last kill: old files left
    names = " ".join(sorted(p.name for p in out.iterdir()))
    assert re.fullmatch(r"pano-files-\d+ pano.jsonl persp-files-\d+ persp.jsonl", names), names


def test_help_shows_every_default(capsys):
    """prepare.py --help says each view flag's default (collect_perspectives'), the ranges too."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--height HEIGHT", "1024"), ("--seed SEED", "0")]:
        assert re.search(rf"{flag} [^-]*\(default: {default}\)", text), flag
    for angle, (lo, hi) in VIEW_RANGES.items():  # the range flags had no help at all
        assert re.search(
            rf"--{angle}-range LO HI each photo's .*\({lo} to {hi}\) \(default: ", text
        )
