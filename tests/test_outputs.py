"""Files written beside a panorama (dit360.app.outputs): the cube map against py360convert, the
cross by position, the XMP packet, and sample.py / edit.py with --viewer and --cubemap."""

import argparse
import os
import re

import numpy as np
import py360convert
import pytest
import torch
from clitest import expect_error
from PIL import Image
from test_editing import cli as edit_args
from test_editing import write_inputs
from test_panorama import OURS_TO_P3, smooth_pano
from test_sample_cli import args as sample_args

import edit
import sample
from dit360.app import panorama as P
from dit360.app.outputs import extras_missing, write_cubemap, write_extras
from dit360.load.image import XPACKET_ID, open_image, save_panorama


def smooth_image(h: int) -> Image.Image:
    """A smooth random h x 2h panorama, 8-bit."""
    x = smooth_pano(h)[0]
    x = (x - x.amin()) / (x.amax() - x.amin())  # (3, h, 2h) in [0, 1]
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def levels(src) -> np.ndarray:
    """An image or image file as float levels (H, W, 3) in 0..255."""
    return np.asarray(open_image(src).convert("RGB"), dtype=np.float64)


def test_cubemap_files(tmp_path):
    """--cubemap's faces (px nx py ny pz nz, H/2 by default) are py360convert's e2c faces after
    reordering (F R B L U D -> ours) within its grid offset; the cross has each face at its place
    and black elsewhere; c2e of the faces read back is the panorama within the projections'
    tolerance."""
    h, face = 64, 32
    img = smooth_image(h)
    written = write_cubemap(img, tmp_path / "pano.png")
    names = [f"pano-{f}.png" for f in P.FACES] + ["pano-cross.png"]
    assert [p.name for p in written] == names and sorted(
        p.name for p in tmp_path.iterdir()
    ) == sorted(names)
    ours = np.stack([levels(tmp_path / n) for n in names[:6]])  # (6, F, F, 3)
    assert ours.shape == (6, face, face, 3)
    theirs = py360convert.e2c(levels(img), face_w=face, cube_format="list")
    theirs = np.stack([theirs[j] for j in OURS_TO_P3])
    assert np.abs(ours - theirs).max() < 0.35 * 255 / face + 1  # measured 2.8 (unordered: 248)
    cross = levels(tmp_path / "pano-cross.png")
    assert cross.shape == (3 * face, 4 * face, 3)
    filled = np.zeros(cross.shape[:2], dtype=bool)
    for i, name in enumerate(P.FACES):
        r, c = P.CROSS[name]  # py above pz; nx pz px nz; ny below pz
        assert np.array_equal(cross[r * face : (r + 1) * face, c * face : (c + 1) * face], ours[i])
        filled[r * face : (r + 1) * face, c * face : (c + 1) * face] = True
    assert filled.sum() == 6 * face * face and not cross[~filled].any()
    faces = torch.from_numpy(ours / 255).permute(0, 3, 1, 2)[None]  # (1, 6, 3, F, F)
    back = P.cube_to_equirect(faces, h)[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(back - levels(img)).max() < 0.3 * 255 / face + 1  # measured 2.2
    write_cubemap(img, tmp_path / "small.jpg", 8)
    assert Image.open(tmp_path / "small-nz.jpg").size == (8, 8)
    assert Image.open(tmp_path / "small-cross.jpg").size == (32, 24)


def test_write_extras_takes_a_mapping(tmp_path):
    """write_extras and extras_missing (the README's API) take the flags as a mapping too; else,
    or a flag of another type, one TypeError naming what `args` holds, nothing written (a dict
    was an AttributeError deep inside)."""
    img, path = smooth_image(16), tmp_path / "p.png"
    img.save(path)
    flags = {"captions": True, "viewer": True, "cubemap": False, "cubemap_size": None}
    assert extras_missing(path, flags) and extras_missing(path, argparse.Namespace(**flags))
    line = write_extras(img, str(path), flags, "A lake.")
    assert line.endswith("also wrote p.txt, p.html")
    assert (tmp_path / "p.txt").read_text() == "A lake.\n"
    assert not extras_missing(path, flags) and not extras_missing(path, argparse.Namespace(**flags))
    before = sorted(os.listdir(tmp_path))
    for bad in [{**flags, "viewer": "yes"}, {"captions": True}, object(), None]:
        with pytest.raises(TypeError, match=r"^args must hold captions, viewer, cubemap \("):
            write_extras(img, path, bad, "x")
        with pytest.raises(TypeError, match=r"^args must hold captions, viewer, cubemap \("):
            extras_missing(path, bad)
    assert sorted(os.listdir(tmp_path)) == before


def test_xmp_is_a_standard_packet(tmp_path):
    """PNG and JPEG GPano XMP comes in the <?xpacket?> wrapper (exiftool -validate: no "missing
    xpacket wrapper" warning), which PIL still reads back."""
    img = Image.new("RGB", (64, 32), (90, 120, 200))
    begin = f'<?xpacket begin="\ufeff" id="{XPACKET_ID}"?><x:xmpmeta'.encode()
    for name in ("p.png", "p.jpg"):
        save_panorama(img, tmp_path / name)
        raw = (tmp_path / name).read_bytes()
        assert raw.count(begin) == 1 and raw.count(b'</x:xmpmeta><?xpacket end="w"?>') == 1
        xmp = Image.open(tmp_path / name).info["xmp"]
        assert xmp.startswith(begin) and b'GPano:ProjectionType="equirectangular"' in xmp
    assert b"http://ns.adobe.com/xap/1.0/\x00" + begin in (tmp_path / "p.jpg").read_bytes()


def test_sample_writes_extras(tiny_flux, tmp_path, capsys):
    """sample.py --viewer --cubemap writes the page and the faces beside the image and prints the
    seam score, for one image and for a batch."""
    out = tmp_path / "pano.jpg"
    with pytest.warns(UserWarning, match="trained at 1024x2048"):
        sample.main(sample_args(tiny_flux, out, "--viewer", "--cubemap", "--cubemap-size", "8"))
    line = capsys.readouterr().out.strip()
    assert re.search(r"; seam score \d+\.\d{3} \(middle \d+\.\d{3}; lower is better\)", line)
    assert "also wrote pano.html, pano-px.jpg" in line and "pano-cross.jpg" in line
    assert Image.open(tmp_path / "pano-cross.jpg").size == (32, 24)
    assert "data:image/jpeg;base64," in (tmp_path / "pano.html").read_text()
    argv = [
        *sample_args(tiny_flux, out, "--viewer"),
        "--num-images",
        "2",
        "--out-dir",
        str(tmp_path / "b"),
    ]
    with pytest.warns(UserWarning, match="trained at 1024x2048"):
        sample.main(argv)
    printed = capsys.readouterr().out
    assert printed.count("seam score") == 2
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "pano-seed4.html", "pano-seed4.jpg", "pano-seed5.html", "pano-seed5.jpg",
    ]  # fmt: skip
    (tmp_path / "b" / "pano-seed5.html").unlink()  # a resumed batch makes what is missing
    page = (tmp_path / "b" / "pano-seed4.html").stat().st_mtime_ns
    with pytest.warns(UserWarning, match="trained at 1024x2048"):
        sample.main(argv)
    printed = capsys.readouterr().out
    assert "skip " in printed and "pano-seed5.jpg: it exists; seam score" in printed
    assert (tmp_path / "b" / "pano-seed5.html").is_file()
    assert (tmp_path / "b" / "pano-seed4.html").stat().st_mtime_ns == page  # not rewritten
    (tmp_path / "b" / "pano-seed5.html").unlink()  # its image cut after its record: one line
    os.truncate(
        tmp_path / "b" / "pano-seed5.jpg", (tmp_path / "b" / "pano-seed5.jpg").stat().st_size - 99
    )
    with pytest.warns(UserWarning, match="trained at 1024x2048"):
        cut = r"pano-seed5.jpg: not a readable image \(image file is truncated.*\)"
        expect_error(
            capsys, sample.main, argv, tmp_path / "b", cut + ": remove it to make it again$"
        )


def test_edit_writes_extras(tiny_flux, tmp_path, capsys):
    """edit.py --viewer writes the page beside the edited image and prints the seam score."""
    src, mask = write_inputs(tmp_path)
    with pytest.warns(UserWarning, match="trained at 1024x2048"):
        edit.main(edit_args(tiny_flux, src, mask, tmp_path / "out.png", "--viewer", "--steps", "2"))
    line = capsys.readouterr().out.strip()
    assert "seam score" in line and line.endswith("also wrote out.html")
    assert (tmp_path / "out.html").exists()


def test_flag_errors(tiny_flux, tmp_path, capsys):
    """A bad --cubemap-size is one line, exit 2, nothing written; a non-2:1 image gets no page
    or cube map, with a warning."""
    out = tmp_path / "x.png"
    for size in ("0", "-3", "big"):
        argv = sample_args(tiny_flux, out, "--cubemap", "--cubemap-size", size)
        expect_error(
            capsys, sample.main, argv, tmp_path, "--cubemap-size: needs a whole number >= 1"
        )
    with pytest.warns(UserWarning) as warned:
        sample.main([*sample_args(tiny_flux, out, "--viewer", "--cubemap"), "--width", "32"])
    assert any("not 2:1: no viewer page or cube map" in str(w.message) for w in warned)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
