"""Fuzz the image files we read (the one reader, `dit360.load.image`) and the settings `python -m
dit360.app.info` reads from them: every size, mode, format, multi-frame and truncated file gives
a correct result or our error naming the file, on one line, in bounded time and memory; a hostile
record is one error, and what info prints shows the terminal only what it is."""

import io
import json
import os
import signal
import struct
import subprocess
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin
from test_fuzz import FUZZ, bounded_rss, byte_edits, json_edits, outcome, written  # noqa: F401

import prepare
from dit360.app import info, outputs
from dit360.load.hub_data import suffix
from dit360.load.image import open_image, read_mask, read_rgb

W, H = 64, 32


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    """`img` saved as `fmt`."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunks(w: int, h: int, depth: int, colour: int, idat: bytes, extra: bytes = b"") -> bytes:
    """A PNG written by hand: its header, `extra` chunks, one IDAT of `idat`, the end."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    head = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + head + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


CHUNK = b"\0\0\0\0abCd" + struct.pack(">I", zlib.crc32(b"abCd"))  # an empty private chunk


def hostile_files() -> dict[str, bytes]:
    """Files nobody listed: sizes, modes, formats, frames, cuts, texts, inflation bombs."""
    noise = Image.effect_noise((W, H), 60).convert("RGB")
    files = {f"size{w}x{h}.png": encoded(Image.new("RGB", (w, h), 9), "PNG") for w, h in
             [(1, 1), (1, 77), (77, 1), (50, 25), (W, H + 1)]}  # fmt: skip
    for mode in ("1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16",
                 "I;16B", "RGBX", "RGBa"):  # fmt: skip
        try:
            img = noise.convert("L" if mode.startswith("I") else "RGB").convert(mode)
        except ValueError:  # no conversion from RGB: a blank one
            img = Image.new(mode, (W, H))
        for fmt in ("PNG", "TIFF", "WEBP", "JPEG", "GIF", "BMP"):
            try:
                files[f"mode-{mode.replace(';', '')}.{fmt.lower()}"] = encoded(img, fmt)
            except (OSError, ValueError, KeyError):
                pass  # this format cannot hold this mode
    frames = [Image.new("RGB", (W, H), c) for c in ("red", "lime")]
    for fmt in ("GIF", "PNG", "TIFF", "WEBP"):
        files[f"frames.{fmt.lower()}"] = encoded(
            frames[0], fmt, save_all=True, append_images=frames[1:]
        )
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "TIFF"):
        whole = encoded(noise, fmt)
        files[f"cut.{fmt.lower()}"], files[f"head.{fmt.lower()}"] = (
            whole[: len(whole) // 2],
            whole[:40],
        )
    big = PngImagePlugin.PngInfo()
    big.add_itxt("dit360", "x" * (2 << 20), zip=True)  # over PIL's MAX_TEXT_CHUNK inflated
    files |= {
        "jpeg-named.png": encoded(noise, "JPEG"),
        "svg.png": b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="32"/>',
        "text.png": b"not an image",
        "empty.png": b"",
        "big-text.png": encoded(noise, "PNG", pnginfo=big),
        "inflates.png": png_chunks(1, 1, 8, 0, zlib.compress(b"\0" * (64 << 20), 9)),  # 1 px, 64 MB
        "chunks.png": png_chunks(1, 1, 8, 0, zlib.compress(b"\0\0"), CHUNK * 20_000),
    }
    return files


FILES = hostile_files()


@pytest.mark.parametrize("name", sorted(FILES))
def test_hostile_image_files(tmp_path, name):
    """Each file read as an image and as a mask: the right size and type, or our error naming it."""
    path = tmp_path / name
    path.write_bytes(FILES[name])
    with warnings.catch_warnings(record=True) as seen:  # PIL's (corrupt EXIF...): not one line
        warnings.simplefilter("always")
        rgb = outcome(lambda: read_rgb(path, W, H), name)
        mask = outcome(lambda: read_mask(path, W, H), name)
    assert not seen, [str(w.message) for w in seen]
    assert rgb is None or (rgb.mode, rgb.size) == ("RGB", (W, H))
    assert mask is None or tuple(mask.shape) == (H, W)
    if name.startswith(("size", "mode", "frames", "jpeg", "chunks", "inflates")):
        assert rgb is not None, f"{name} is a good image"


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "P", "1"])
def test_every_mode_reads_as_its_rgb(tmp_path, mode):
    """An image of any mode (a TIFF file, or in memory where no format holds it) reads as PIL
    converts it to RGB, and as a mask as grey >= 128 of that: no mode is refused or misread."""
    ramp = np.linspace(0, 255, W * H * 3).astype(np.uint8).reshape(H, W, 3)
    img = Image.fromarray(ramp).convert(mode) if mode != "LAB" else Image.fromarray(ramp, "LAB")
    try:
        img.save(tmp_path / "m.tif")
        src = tmp_path / "m.tif"
    except OSError:  # HSV: no file format holds it
        src = img
    reference = (Image.open(src) if isinstance(src, Path) else src).convert("RGB")
    assert np.array_equal(np.asarray(read_rgb(src, W, H)), np.asarray(reference))
    expect = np.asarray(reference.convert("L")) >= 128
    assert np.array_equal(read_mask(src, W, H).numpy(), expect)


@pytest.mark.parametrize("kind", ["folder", "pipe"])
def test_not_a_file_named_like_an_image(tmp_path, kind):
    """A folder or a named pipe (with no writer: opening it would block for ever) called x.png:
    our error naming it, at once."""
    (tmp_path / "x.png").mkdir() if kind == "folder" else os.mkfifo(tmp_path / "x.png")

    def blocked(*_):
        raise TimeoutError("x.png: open blocked")  # not our error: the test fails, not hangs

    old = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(5)
    try:
        for read in (read_rgb, read_mask):
            assert outcome(lambda r=read: r(tmp_path / "x.png", W, H), "x.png") is None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_exif_orientation_is_honoured(tmp_path):
    """A photo whose EXIF turns it (orientation 6: 90 degrees clockwise) reads turned, as viewers
    show it and as prepare.py read photos; reading the result again does not turn it twice."""
    a = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    for name in ("turned.png", "turned.tif"):
        Image.fromarray(a).save(tmp_path / name, exif=exif)
        img = open_image(tmp_path / name)
        assert np.array_equal(np.asarray(img), np.rot90(a, k=-1)), name  # clockwise
        assert np.array_equal(np.asarray(open_image(img)), np.asarray(img))  # once
        assert read_rgb(tmp_path / name, H, W).size == (H, W)


@pytest.mark.parametrize("fmt", ["WEBP", "JPEG"])
def test_corrupt_exif_reads_unturned(tmp_path, fmt):
    """A file whose EXIF block is not TIFF (WebP), or is cut inside its orientation entry (JPEG),
    reads as it is stored, as viewers show it: the block is not the image."""
    blob = b"MQ\0*\0\0\0\x08" if fmt == "WEBP" else b"Exif\0\0MM\0*\0\0\0\x08\0\x01\x01\x12"
    path = written(tmp_path / "e.img", encoded(Image.new("RGB", (W, H), 9), fmt, exif=blob))
    img = outcome(lambda: open_image(path), "e.img")
    assert img is not None and img.size == (W, H)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF", "WEBP"])
def test_multi_frame_files_read_their_first_frame(tmp_path, fmt):
    """An animation or a multi-page file reads as its first frame (what a still viewer shows)."""
    (tmp_path / "a").write_bytes(FILES[f"frames.{fmt.lower()}"])
    red = np.subtract(read_rgb(tmp_path / "a", W, H).getpixel((5, 5)), (255, 0, 0))
    assert np.abs(red).max() <= 4  # WebP is lossy


def test_mid_grey_mask_keeps(tmp_path):
    """Grey 128 is white (keep), 127 black: the documented threshold, in 8 and 16 bits."""
    Image.new("L", (W, H), 128).save(tmp_path / "128.png")
    Image.new("L", (W, H), 127).save(tmp_path / "127.png")
    Image.fromarray(np.full((H, W), 128 * 257, np.uint16)).save(tmp_path / "16.png")
    assert (
        read_mask(tmp_path / "128.png", W, H).all() and read_mask(tmp_path / "16.png", W, H).all()
    )
    assert not read_mask(tmp_path / "127.png", W, H).any()


def test_16_bit_grey_memory_is_bounded(tmp_path):
    """A 16-bit grey image of 16 M pixels (a few KB of file) reads without 8-byte-a-pixel arrays
    (the limit is PIL's pixels; the reader must not multiply their bytes): right levels too."""
    side = 4096
    raw = (b"\0" + struct.pack(">H", 40000) * side) * side  # filter byte, then the row
    path = written(tmp_path / "big16.png", png_chunks(side, side, 16, 0, zlib.compress(raw, 9)))
    del raw
    rgb = outcome(lambda: read_rgb(path, W, H), "big16.png")
    assert rgb is not None and rgb.getpixel((0, 0)) == (156,) * 3  # round(40000 / 257)


@FUZZ
@given(st.data(), st.sampled_from(["PNG", "TIFF", "WEBP", "GIF", "JPEG"]))
def test_edited_image_bytes(tmp_path, data, fmt):
    """Edited files of each format (16-bit, EXIF-turned, CMYK, alpha): an image or our error."""
    exif = Image.Exif()
    exif[0x0112] = 8
    seeds = {
        "PNG": lambda: encoded(
            Image.fromarray(np.arange(W * H, dtype=np.uint16).reshape(H, W) * 30), "PNG"
        ),
        "TIFF": lambda: encoded(Image.new("CMYK", (W, H), (1, 2, 3, 4)), "TIFF", exif=exif),
        "WEBP": lambda: encoded(Image.new("RGBA", (W, H), (1, 2, 3, 200)), "WEBP", exif=exif),
        "GIF": lambda: FILES["frames.gif"],
        "JPEG": lambda: encoded(Image.new("RGB", (W, H), 7), "JPEG", exif=exif),
    }
    path = written(tmp_path / "x.img", data.draw(byte_edits(seeds[fmt]())))
    rgb = outcome(lambda: read_rgb(path, W, H), str(path))
    assert rgb is None or rgb.size == (W, H)


# --- python -m dit360.app.info --------------------------------------------------------------

RECORD = {
    "version": "1",
    "script": "sample.py",
    "flags": {"prompt": "a lake", "height": 32, "steps": 4, "true_cfg": 1.0, "guidance": 3.5,
              "seed": 1, "wrap_pad": 0},
    "loras": [["l.safetensors", 1.0, "abcdef012345"]],
}  # fmt: skip


def stamped(path: Path, text: str, key: str = info.KEY) -> Path:
    """A PNG holding `text` under `key`."""
    meta = PngImagePlugin.PngInfo()
    meta.add_itxt(key, text)
    Image.new("RGB", (W, H)).save(path, pnginfo=meta)
    return path


def info_outcome(capsys, path: Path) -> str:
    """What `python -m dit360.app.info path` prints; one line `error: ...` naming it, exit 2, or
    printable lines (no \\r, ESC, bidi controls: they could show the terminal another text)."""
    capsys.readouterr()
    try:
        info.main([str(path)])
    except SystemExit as e:
        err = capsys.readouterr().err
        assert e.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {path}"), err
        return ""
    out = capsys.readouterr().out
    assert all(line.isprintable() for line in out.splitlines()), out
    return out


HOSTILE_RECORDS = {
    "deep": "[" * 100_000 + "]" * 100_000,
    "deep-flags": '{"flags": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "no-keys": json.dumps({"flags": {}}),
    "bad-loras": json.dumps({**RECORD, "loras": [[1]]}),
    "no-script": json.dumps({k: v for k, v in RECORD.items() if k != "script"}),
    "script-int": json.dumps({**RECORD, "script": 5}),
    "height-none": json.dumps({**RECORD, "flags": {**RECORD["flags"], "height": None}}),
    "surrogate": json.dumps(RECORD).replace("a lake", "\\ud800"),
    "controls": json.dumps(
        {**RECORD, "flags": {**RECORD["flags"], "prompt": "\rrm -rf ~ #\x1b[8m\u202e"}}
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_RECORDS))
def test_info_hostile_records(tmp_path, capsys, name):
    """A record of the wrong shape, types or nesting: one error naming the image, or its lines."""
    info_outcome(capsys, stamped(tmp_path / f"{name}.png", HOSTILE_RECORDS[name]))


@pytest.mark.parametrize("side", [10_000, 20_000])
def test_info_on_a_bomb(tmp_path, capsys, side):
    """An image over PIL's pixel limit (100 M pixels: PIL warns; 200 M: it raises), whose pixels
    info never reads: its record printed, or one line, and no warning (a second line)."""
    meta = PngImagePlugin.PngInfo()
    meta.add_itxt(info.KEY, json.dumps(RECORD))
    Image.new("1", (side, 10_000)).save(tmp_path / "bomb.png", pnginfo=meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = info_outcome(capsys, tmp_path / "bomb.png")
    assert bool(out) == (side == 10_000)


def test_hub_image_suffix_of_a_bomb():
    """A dataset's image over PIL's limits gets a suffix (prepare then reads it and says why)."""
    for side in (10_000, 20_000):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert suffix(encoded(Image.new("1", (side, 10_000)), "PNG")) == ".png"


@FUZZ
@given(st.data())
def test_info_edited_records(tmp_path, capsys, data):
    """Records with keys and flags replaced by hostile values, and edited files: one line or
    printable output."""
    rec = {**RECORD, "flags": json.loads(data.draw(json_edits(RECORD["flags"])))}
    text = data.draw(st.just(json.dumps(rec)) | json_edits(RECORD))
    path = stamped(tmp_path / "r.png", text)
    path.write_bytes(data.draw(st.just(path.read_bytes()) | byte_edits(path.read_bytes())))
    info_outcome(capsys, path)


def test_info_command_is_the_recorded_one(tmp_path, capsys):
    """A prompt with a carriage return, ESC, a newline, quotes and a bidi control prints a
    command on one printable line that bash reads back as exactly the recorded words."""
    prompt = "a\r\x1b[2K\nb'c\"\\ d \u202e é 山"
    rec = {**RECORD, "flags": {**RECORD["flags"], "prompt": prompt}}
    out = info_outcome(capsys, stamped(tmp_path / "p.png", json.dumps(rec)))
    line = out.splitlines()[-1]
    words = subprocess.run(
        ["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, check=True
    )
    assert words.stdout.decode().split("\0")[:-1] == info.command(rec, tmp_path / "p-again.png")


def test_evaluate_tiny_panorama(tmp_path, capsys):
    """A 2:1 image too small for the seam score (4x2) is skipped with a line, not a trace."""
    Image.new("RGB", (4, 2)).save(tmp_path / "tiny.png")
    Image.new("RGB", (12, 6)).save(tmp_path / "small.png")
    outputs.evaluate_main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "tiny.png: skipped" in out and "small.png: seam" in out


def test_prepare_names_a_bad_image_once(tmp_path, capsys):
    """prepare.py lists each bad image on its line, named once (the reader's error names it too)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, data in (("cut.jpg", FILES["cut.jpeg"]), ("head.png", FILES["head.png"])):
        (photos / name).write_bytes(data)
        (photos / name).with_suffix(".txt").write_text("a room")
    with pytest.raises(SystemExit) as e:
        prepare.main(["--persp", str(photos), "--out", str(tmp_path / "d"), "--height", "32"])
    err = capsys.readouterr().err
    lines = err[err.index("error:") :].splitlines()  # after tqdm's bars
    assert e.value.code == 1 and lines[0] == "error: 2 bad rows, nothing written:", lines
    for line, name in zip(lines[1:], ("cut.jpg", "head.png"), strict=True):
        assert line.startswith(f"  {photos / name}: not a readable image"), line
        assert line.count(f"{photos / name}: ") == 1, line


def test_threads_leave_the_warning_filters(tmp_path):
    """Images opened by 8 threads at once (data.read_rows' pool; EXIF turned too) leave the
    process's warning filters as they were: catch_warnings from threads, interleaved, left
    `ignore` behind, which hid every later warning of the run."""
    img = Image.new("RGB", (64, 32), (9, 99, 199))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path := tmp_path / "turned.jpg", exif=exif)
    before = list(warnings.filters)
    with ThreadPoolExecutor(8) as pool:
        sizes = set(pool.map(lambda _: open_image(path).size, range(400)))
    assert sizes == {(32, 64)} and warnings.filters == before
