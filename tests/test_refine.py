"""prepare.py --refine-poles: the caps against py360convert's projection of the paper's face
mask, the paste-back (outside the caps the original exactly), regeneration inside them, resume."""

import numpy as np
import py360convert
import pytest
from clitest import expect_error
from PIL import Image

import prepare
from dit360.app import refine
from dit360.app.refine import cap_alpha, face_mask, paste_caps, pole_faces
from dit360.train.data import read_rows

H, W, FACE = 64, 128, 64  # 64x128 panoramas; faces of 64 put the masked square on 2x2 tokens


def smooth(seed: int) -> np.ndarray:
    """A smooth random H x W RGB panorama (H, W, 3) uint8."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((W, H), Image.BILINEAR))


def panoramas(folder, n: int) -> list[np.ndarray]:
    """n smooth random panoramas with captions, as files in folder; their pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(smooth(i)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"a room number {i}")
    return [smooth(i) for i in range(n)]


def flags(tiny_flux) -> list[str]:
    """--refine-poles on the tiny model, 64-pixel faces, few steps, on the CPU."""
    return [
        *("--refine-poles", "--refine-base", str(tiny_flux), "--refine-face-size", str(FACE)),
        *("--refine-steps", "2", "--refine-device", "cpu", "--refine-dtype", "fp32"),
    ]


def test_caps_are_the_face_masks_square():
    """The caps, projected onto the cube by py360convert (e2c), fill the central square
    F/4 <= u, v < 3F/4 of its top and bottom faces and nothing else (up to one face pixel at the
    square's edge, py360convert putting pixel centres corner to corner); the four side faces
    get none."""
    cap = (cap_alpha(512, 1024, 0) > 0).numpy().astype(np.float64)[..., None]
    f = 128
    faces = py360convert.e2c(cap, face_w=f, mode="nearest", cube_format="dict")
    square = np.asarray(face_mask(f)) == 0
    near = [np.roll(square, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    edge = np.any(near, 0) & ~np.all(near, 0)  # one pixel either side of the square's edge
    for k in "UD":
        got = faces[k][..., 0] > 0.5
        assert (got == square)[~edge].all() and square.sum() == (f // 2) ** 2
    assert all(faces[k].max() == 0 for k in "FRBL")


def test_paste_keeps_the_original_outside_the_caps():
    """With faces that differ from the panorama's, outside the caps every pixel is the original's
    and inside nearly all differ; with the panorama's own faces the caps come back close (the
    back-projection is oriented as the faces were taken)."""
    pano = smooth(1)
    cap = cap_alpha(H, W, 0).numpy() > 0
    noise = np.random.default_rng(2).integers(0, 256, (FACE, FACE, 3), dtype=np.uint8)
    other = {f: Image.fromarray(noise) for f in refine.POLES}
    out = paste_caps(pano, other, 2 * 2 / FACE)
    assert (out[~cap] == pano[~cap]).all()
    assert (out[cap] != pano[cap]).any(-1).mean() > 0.9
    same = paste_caps(pano, pole_faces(pano, FACE), 0.0)
    assert (
        np.abs(same.astype(int) - pano)[cap].mean() < 10
    )  # 8-bit levels: two resamplings (3.8; a mirrored face 80)
    assert np.abs(out.astype(int) - pano)[cap].mean() > 30


def test_refine_poles_regenerates_the_caps(tiny_flux, tmp_path):
    """prepare.py --refine-poles with the tiny FLUX: the refined panorama (listed in pano.jsonl
    with its caption) is the original outside the caps exactly and regenerated inside."""
    [original] = panoramas(tmp_path / "pano", 1)
    out = tmp_path / "data"
    prepare.main(["--out", str(out), "--pano", str(tmp_path / "pano"), *flags(tiny_flux)])
    [row] = read_rows(pano=out / "pano.jsonl")["pano"]
    assert row.image == out / "refined" / "p0.png" and row.caption == "a room number 0"
    with Image.open(row.image) as img:
        refined = np.asarray(img.convert("RGB"))
    cap = cap_alpha(H, W, 0).numpy() > 0
    assert (refined[~cap] == original[~cap]).all()
    assert (refined[cap] != original[cap]).any(-1).mean() > 0.5


def test_refine_poles_resumes_after_a_kill(tiny_flux, tmp_path, monkeypatch):
    """Killed during the second of 3 batches: the first batch's panoramas stay written and the rerun
    edits only the rest (an editor that negates the faces stands in for FLUX: fast)."""
    panoramas(tmp_path / "pano", 3)
    out = tmp_path / "data"
    argv = ["--out", str(out), "--pano", str(tmp_path / "pano"), *flags(tiny_flux)]
    calls = []

    def negate(jobs, opts, log=print):
        assert opts.lora is None and opts.wrap_pad == 0  # plain FLUX on perspective faces
        calls.append(len(jobs))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second batch
        for job in jobs:
            yield job, Image.fromarray(255 - np.asarray(job.image)), 0.0

    monkeypatch.setattr(refine, "edit_many", negate)
    with pytest.raises(KeyboardInterrupt):
        prepare.main([*argv, "--refine-batch", "2"])
    done = sorted(p.name for p in (out / "refined").iterdir())
    assert done == ["p0.png", "p0.txt", "p1.png", "p1.txt"] and not (out / "pano.jsonl").exists()
    before = {n: (out / "refined" / n).stat().st_mtime_ns for n in done}
    calls.clear()
    prepare.main([*argv, "--refine-batch", "2"])
    assert calls == [2]  # the third panorama's two faces; the first two skipped, not rewritten
    assert all((out / "refined" / n).stat().st_mtime_ns == t for n, t in before.items())
    rows = read_rows(pano=out / "pano.jsonl")["pano"]
    assert [r.image.name for r in rows] == ["p0.png", "p1.png", "p2.png"]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--refine-steps", "2"], r"--refine-steps without --refine-poles"),
        (["--refine-poles", "--refine-face-size", "96"], r"--refine-face-size .* multiple of 64"),
        (
            ["--refine-poles", "--refine-steps", "0"],
            r"^error: --refine-steps must be an integer from 1 to",
        ),
        (["--refine-poles", "--refine-prompt", "{where}"], r"--refine-prompt '\{where\}'"),
        (["--refine-poles", "--refine-base", "nowhere/at/all"], r"--refine-base"),
        (["--refine-poles", "--persp"], r"--refine-poles refines panoramas: give --pano or"),
    ],
)
def test_refine_flag_errors(tmp_path, capsys, extra, match):
    """A bad --refine-* value: one line naming that flag, exit 2, nothing written."""
    panoramas(tmp_path / "pano", 1)
    source = ["--pano"] * ("--persp" not in extra) + [str(tmp_path / "pano")]
    argv = ["--out", str(tmp_path / "data"), *extra, *source]
    expect_error(capsys, prepare.main, argv, tmp_path, match)
