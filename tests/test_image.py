"""Reading images and masks: bit depths and modes, and output paths."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dit360.load.image import check_output_path, read_mask, read_rgb

W, H = 64, 32


def gradient16() -> np.ndarray:
    """A (H, W) uint16 grey ramp over the whole 16-bit range, at levels no multiple of 257."""
    return np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W)


def to8(x: np.ndarray) -> np.ndarray:
    """The 8-bit version of 16-bit levels: the nearest of 0..255 on the same 0..1 scale."""
    return np.round(x.astype(np.float64) * 255 / 65535).astype(np.uint8)


def write_png16(path: Path, rgb: np.ndarray) -> Path:
    """A 16-bit RGB PNG (colour type 2, depth 16) written by hand: PIL cannot write one."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))  # filter 0 rows

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def grey16_files(folder: Path, x: np.ndarray) -> list[Path]:
    """The 16-bit grey levels x as the files Pillow opens in modes I;16, I;16B and I."""
    big = Image.frombytes("I;16B", (x.shape[1], x.shape[0]), x.astype(">u2").tobytes())
    files = [folder / "i16.png", folder / "i16b.tif", folder / "i32.tif"]
    Image.fromarray(x).save(files[0])
    big.save(files[1])
    Image.fromarray(x.astype(np.int32)).save(files[2])
    assert [Image.open(f).mode for f in files] == ["I;16", "I;16B", "I"]
    return files


def test_16_bit_grey_reads_as_its_8_bit_version(tmp_path):
    """16-bit grey (I;16, I;16B, I) reads as the same ramp saved at 8 bits, within 1 level."""
    x = gradient16()
    Image.fromarray(to8(x)).save(tmp_path / "eight.png")
    eight = np.asarray(read_rgb(tmp_path / "eight.png", W, H), np.int16)
    for path in grey16_files(tmp_path, x):
        rgb = np.asarray(read_rgb(path, W, H), np.int16)
        assert np.abs(rgb - eight).max() <= 1, path
        assert np.abs(rgb - to8(x)[..., None]).max() <= 1, path
        mask = read_mask(path, W, H).numpy()
        near = np.abs(x.astype(np.int64) - 32768) <= 257  # within a level of the threshold
        assert (mask == (x >= 32768))[~near].all(), path


def test_16_bit_rgb_png_reads_as_8_bit(tmp_path):
    """A 16-bit RGB PNG reads as its 8-bit version, within 1 level (Pillow keeps the high byte)."""
    x = np.stack([gradient16(), gradient16()[::-1], np.full((H, W), 40000, np.uint16)], -1)
    rgb = np.asarray(read_rgb(write_png16(tmp_path / "rgb16.png", x), W, H), np.int16)
    assert np.abs(rgb - to8(x)).max() <= 1


def test_16_bit_mask_thresholds_at_half_range(tmp_path):
    """A 16-bit mask keeps from 32768 (half of 65536) up, whatever the file's mode."""
    levels = np.array([[0, 32767, 32768, 65535]], np.uint16)
    for path in grey16_files(tmp_path, levels):
        assert read_mask(path, 4, 1).tolist() == [[False, False, True, True]], path


@pytest.mark.parametrize("seed", range(3))
def test_a_jpeg_or_anti_aliased_mask_reads_as_its_clean_png(tmp_path, seed):
    """A binary mask saved as JPEG (quality 75) or with anti-aliased (blurred) edges gives the
    clean PNG's token mask: grey >= 128 is white. DiT360's rule (pixels == 255 after a nearest
    resize, pa_src/utils.py create_mask) misreads both: their white is 246..255."""
    keep = np.random.default_rng(seed).random((8, 16)) < 0.5  # a (h, w) token mask
    # 10 pixels a token: the 8x8 JPEG blocks straddle its edges (a multiple of 8 would not)
    clean = Image.fromarray(keep.astype(np.uint8) * 255).resize((160, 80), Image.NEAREST)
    clean.save(tmp_path / "clean.png")
    clean.save(tmp_path / "mask.jpg", quality=75)
    clean.filter(ImageFilter.GaussianBlur(3)).save(tmp_path / "soft.png")
    assert np.array_equal(read_mask(tmp_path / "clean.png", 16, 8).numpy(), keep)
    for name in ("mask.jpg", "soft.png"):
        assert np.array_equal(read_mask(tmp_path / name, 16, 8).numpy(), keep), name
        grey = Image.open(tmp_path / name).resize((16, 8), Image.NEAREST).convert("L")
        assert not np.array_equal(np.asarray(grey) == 255, keep), name  # the test has teeth


def test_16_bit_mask_with_a_transparent_grey_refused(tmp_path):
    """A 16-bit grey mask whose tRNS marks a grey as transparent is refused as its 8-bit twin
    is, not read with the transparent region as white."""
    levels = np.zeros((H, W), np.uint16)
    levels[:, : W // 4] = 65535
    Image.fromarray(levels).save(tmp_path / "m16.png", transparency=65535)
    Image.fromarray((levels // 257).astype(np.uint8)).save(tmp_path / "m8.png", transparency=255)
    for name in ("m8.png", "m16.png"):
        with pytest.raises(ValueError, match=rf"{name} has transparent pixels"):
            read_mask(tmp_path / name, W, H)


def test_float_and_out_of_range_images_refused(tmp_path):
    """A float image, or 32-bit integers beyond 16 bits, is refused naming the file."""
    Image.fromarray(np.ones((H, W), np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.full((H, W), 70000, np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match=r"f\.tif: a 32-bit float image .* save it as 8 or 16"):
        read_rgb(tmp_path / "f.tif", W, H)
    with pytest.raises(ValueError, match=r"big\.tif: integer pixels outside 0-65535"):
        read_mask(tmp_path / "big.tif", W, H)


def test_output_path_that_is_a_folder(tmp_path):
    """An output name that is an existing folder gets its own message, not 'check the folder'."""
    (tmp_path / "o.png").mkdir()
    with pytest.raises(IsADirectoryError, match=r"o\.png: it is a folder; choose another file"):
        check_output_path(tmp_path / "o.png")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(PermissionError, match=r"cannot write .*: check the folder exists"):
        check_output_path(tmp_path / "file" / "o.png")
    assert check_output_path(tmp_path / "new" / "o.png") == tmp_path / "new" / "o.png"
