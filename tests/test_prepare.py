"""The data preparation command: jsonl rows, images and masks a training loader can read."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dit360.prepare import main, prepare


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


def read_rows(path: Path) -> list[dict]:
    """The rows of a jsonl file with paths resolved against its folder."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        assert set(row) == {"image", "caption", "mask"}
        row["image"], row["mask"] = path.parent / row["image"], path.parent / row["mask"]
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
    pano, persp = read_rows(out / "pano.jsonl"), read_rows(out / "persp.jsonl")
    assert [r["caption"] for r in pano] == ["a photo called a.png", "a photo called b.jpg"]
    assert len(persp) == 2 and persp[1]["image"].name == "sub__d.png"
    for r in pano:
        image, mask = load(r["image"]), load(r["mask"])
        assert image.shape[:2] == mask.shape and image.shape[1] == 2 * image.shape[0]
        assert (mask == 255).all()
    for r, (w, h) in zip(persp, [(40, 30), (30, 40)], strict=True):
        image, mask = load(r["image"]), load(r["mask"])
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
    rows = [[json.loads(x) for x in (out / "persp.jsonl").read_text().splitlines()] for out in outs]
    assert all(Path(r["image"]).is_absolute() and Path(r["mask"]).is_absolute() for r in rows[0])
    masks = [[load(r["mask"]) for r in rs] for rs in rows]
    assert (masks[0][0] == masks[1][0]).all() and (masks[0][1] == masks[1][1]).all()
    assert (masks[0][0] != masks[0][1]).any()


def test_bad_rows_are_listed_together(tmp_path):
    """An unreadable image, a missing caption and a non 2:1 panorama are all named in one error."""
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
    assert not (out / "pano.jsonl").exists() and not (out / "persp.jsonl").exists()
    with pytest.raises(SystemExit, match="1 bad rows"):
        main(["--out", str(out), "--pano", str(tmp_path / "pano")])
    written = prepare(
        out, pano=tmp_path / "pano", persp=tmp_path / "photos", height=32, skip_bad=True
    )
    assert [len(read_rows(written[k])) for k in ("pano", "persp")] == [1, 1]


def test_help_mentions_captions():
    """python -m dit360.prepare --help runs and explains where captions come from."""
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "-m", "dit360.prepare", "--help"], cwd=root, capture_output=True, text=True
    )
    assert res.returncode == 0 and ".txt" in res.stdout and "same stem" in res.stdout
