"""Images in and out: the one reader of images and masks, tensors <-> PIL, and panorama files with
GPano XMP (https://developers.google.com/streetview/spherical-metadata) for 360 viewers."""

import io
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin
from torch import Tensor

from .files import atomic_path, short, unwritable

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def to_pil(x: Tensor, unit: bool = False) -> Image.Image:
    """An image (3, H, W) in [-1, 1] ([0, 1] if `unit`) -> 8-bit RGB, rounded as diffusers' does."""
    x = x.detach().float().cpu()
    if not x.isfinite().all():  # clamped, NaN would be black, in silence
        raise FloatingPointError(
            "the image is NaN/inf, so it is not made: fp16 overflows in the VAE (use --dtype bf16 "
            "or fp32), or the weights hold NaN"
        )
    x = (x if unit else x / 2 + 0.5).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def from_pil(img: Image.Image, unit: bool = False) -> Tensor:
    """An image as RGB (via open_image) -> (3, H, W) float32 in [-1, 1] ([0, 1] if `unit`)."""
    x = torch.from_numpy(np.asarray(open_image(img).convert("RGB"), dtype=np.float32) / 255)
    return x.permute(2, 0, 1) if unit else x.permute(2, 0, 1) * 2 - 1


QUIET = threading.Lock()  # catch_warnings swaps the process's filters: threads (data.py) in turn


@contextmanager
def pil_quiet(bombs: str = "error") -> Iterator[None]:
    """PIL's warnings dropped (a file's faults are its error), a decompression bomb's an error."""
    with QUIET, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter(bombs, Image.DecompressionBombWarning)
        yield


@contextmanager
def loaded(src: str | Path) -> Iterator[Image.Image]:
    """The image file `src` opened and read whole; ValueError naming it if truncated, corrupt, or
    over PIL's decompression-bomb limit (its warning too: refused before allocating the pixels)."""
    if (path := Path(src)).exists() and not path.is_file():  # a pipe with no writer: open blocks
        raise ValueError(f"{src}: not a file (a folder, pipe or device): name an image file")
    f = None
    try:
        with pil_quiet():  # the header: its size checked (a bomb), no line of PIL's
            f = Image.open(src)
        f.load()  # truncated or corrupt files fail here, without naming the file
    except Exception as e:  # noqa: BLE001 - PIL reports a corrupt file with errors of many kinds
        if f is not None:
            f.close()
        if isinstance(e, Image.DecompressionBombError | Image.DecompressionBombWarning):
            limit = f"at most {Image.MAX_IMAGE_PIXELS:,} pixels: resize it"
            raise ValueError(f"{src}: {e} ({limit})") from None
        if isinstance(e, OSError) and e.errno is not None:  # the file itself: missing, unreadable
            e.filename = e.filename or str(src)  # a read's error (EIO) names no file
            raise
        raise ValueError(f"{src}: not a readable image ({' '.join(str(e).split())})") from None
    with f:
        yield f


def open_image(src: str | Path | Image.Image) -> Image.Image:
    """An image read whole from a file (closed again), or the image given, as `plain` makes it."""
    if isinstance(src, Image.Image):
        return plain(src, "the image")
    if not isinstance(src, str | os.PathLike):  # an API user's tensor or array
        raise TypeError(
            f"a {type(src).__name__} is not an image: give a PIL image (to_pil makes one of a "
            "tensor) or an image file's path"
        )
    with loaded(src) as f:  # leaving it closes the file, not the pixels read
        return plain(f, str(src))


PLAIN = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")  # the modes the readers convert as they need


def plain(img: Image.Image, name: str) -> Image.Image:
    """`img` turned as its EXIF orientation says (as viewers show it), in a mode of PLAIN: 16-bit
    grey (modes I;16... and I, 0-65535) as 8-bit L, v / 257 rounded, where PIL's convert would
    clip at 255 (16-bit RGB PNGs open as 8-bit already), CMYK, LAB... as RGB; float (F) refused."""
    if img.mode == "F":
        raise ValueError(
            f"{name}: a 32-bit float image has no standard 8-bit range: save it as 8 or 16 bits"
        )
    try:  # Orientation: a copy only where it turns; a corrupt EXIF block leaves it, as viewers
        with pil_quiet():
            img = ImageOps.exif_transpose(img) if img.getexif().get(0x0112, 1) != 1 else img
    except Exception:  # noqa: BLE001 - PIL's EXIF parser fails with errors of many kinds
        pass
    if img.mode == "I" or img.mode.startswith("I;16"):
        img = img if img.mode in ("I", "I;16") else img.convert("I")  # I;16B...: no extrema
        lo, hi = img.getextrema()
        if lo < 0 or hi > 65535:
            raise ValueError(f"{name}: integer pixels outside 0-65535: save it as 8 or 16 bits")
        out = img.point(lambda v: v / 257 + 0.5).convert("L")  # PIL's point truncates: rounded
        if (t := img.info.get("transparency")) is not None:  # a transparent grey: as an alpha
            out.putalpha(Image.fromarray((np.asarray(img) != t).astype(np.uint8) * 255))
        out.info = {k: v for k, v in img.info.items() if k != "transparency"}  # keeps EXIF
        return out
    return img if img.mode in PLAIN else img.convert("RGBA" if img.mode == "RGBa" else "RGB")


def read_rgb(src: str | Path | Image.Image, width: int, height: int) -> Image.Image:
    """RGB at width x height, resized with bicubic (as the reference resizes images)."""
    return resized(open_image(src).convert("RGB"), width, height, Image.BICUBIC)


def resized(img: Image.Image, width: int, height: int, how: int) -> Image.Image:
    """`img` at width x height (PIL's `how`), a size that PIL reads; else ValueError."""
    limit = Image.MAX_IMAGE_PIXELS  # read at the call: a user may raise it
    if not all(isinstance(n, int) and n > 0 for n in (width, height)) or width * height > limit:
        raise ValueError(
            f"cannot resize to {width!r}x{height!r}: give whole numbers > 0, at most {limit:,} "
            "pixels in all (PIL's limit)"
        )
    return img if img.size == (width, height) else img.resize((width, height), how)


def read_mask(src: str | Path | Image.Image, width: int, height: int) -> Tensor:
    """A mask (height, width) bool, white (grey >= 128, or 32768 of 16 bits) = True, resized with
    nearest; one with transparent pixels is refused, not misread (masks are read from grey)."""
    img = open_image(src)
    name = "the mask" if isinstance(src, Image.Image) else str(src)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            raise ValueError(
                f"{name} has transparent pixels: masks are read from grey levels (white = the "
                "masked region), not from alpha; flatten it onto a black or white background"
            )
    gray = resized(img.convert("L"), width, height, Image.NEAREST)
    return torch.from_numpy(np.asarray(gray) >= 128)


XPACKET_ID = "W5M0MpCehiHzreSzNTczkc9d"  # the XMP specification's fixed packet id


def gpano_xmp(width: int, height: int) -> bytes:
    """GPano XMP of a full panorama, in the `<?xpacket?>` wrapper exiftool -validate expects."""
    fields = {
        "ProjectionType": "equirectangular", "UsePanoramaViewer": "True",
        "FullPanoWidthPixels": width, "FullPanoHeightPixels": height,
        "CroppedAreaImageWidthPixels": width, "CroppedAreaImageHeightPixels": height,
        "CroppedAreaLeftPixels": 0, "CroppedAreaTopPixels": 0,
    }  # fmt: skip
    attrs = "".join(f' GPano:{k}="{v}"' for k, v in fields.items())
    return (
        f'<?xpacket begin="\ufeff" id="{XPACKET_ID}"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
        f'xmlns:GPano="http://ns.google.com/photos/1.0/panorama/"{attrs}/></rdf:RDF></x:xmpmeta>'
        '<?xpacket end="w"?>'
    ).encode()


def check_output_path(
    path: str | Path, flag: str = "", beside: Iterable[Path] = (), replace: bool = True
) -> Path:
    """Fail early (before any model runs) on an output path (given by `flag`), or a file written
    `beside` it, that cannot be written, or is read-only and would be replaced (`replace`)."""
    path, named = Path(path), f"{flag} {path}".lstrip()
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"{named}: use a .png, .jpg or .jpeg file name")
    if not str(path).isprintable():  # written, but not printed on one line nor put in a page
        raise ValueError(f"{named}: the name is not printable UTF-8 text: choose another")
    for out in [path, *beside]:
        name = named if out == path else f"{out} (beside {named})"
        if out.is_dir():
            raise IsADirectoryError(
                f"cannot write {name}: it is a folder; choose another file name or remove it"
            )
        if out.is_symlink():  # replacing it would replace the link, not what it points to
            raise ValueError(
                f"cannot write {name}: it is a symbolic link (to {os.readlink(out)}); name the "
                "file it points to, or another file"
            )
        writable = os.access(out, os.W_OK) and out.stat().st_mode & 0o222  # root: the mode
        if replace and out.exists() and not writable:  # "do not replace", as cp and > hear it
            raise PermissionError(
                f"cannot write {name}: it is read-only: chmod u+w it or choose another "
                + (flag or "file")
            )
    if unwritable(path.absolute().parent):
        raise PermissionError(f"cannot write {named}: check the folder exists and is writable")
    return path


def save_panorama(img: Image.Image, path: str | Path, text: dict[str, str] | None = None) -> Path:
    """Write a PNG or JPEG atomically, with GPano XMP if 2:1 and the `text` entries (`info.stamp`):
    PNG text chunks; JPEG: `parameters` as EXIF UserComment (for A1111), the rest as the comment."""
    path, img, text = check_output_path(path), open_image(img), text or {}  # a PIL image
    if not all(isinstance(x, str) for entry in text.items() for x in entry):  # written as text
        raise TypeError(f"text must be {{str: str}} (`info.stamp` makes it), got {short(text)}")
    w, h = img.size
    xmp = gpano_xmp(w, h) if w == 2 * h else None
    if xmp is None:
        warnings.warn(f"{w}x{h} is not 2:1: no 360 (GPano) metadata", stacklevel=2)  # once a batch
    if FORMATS[path.suffix.lower()] == "PNG":
        info = PngImagePlugin.PngInfo()
        if xmp:
            info.add_itxt("XML:com.adobe.xmp", xmp.decode())
        for key, value in text.items():
            info.add_itxt(key, value)
        save_image(img, path, format="PNG", pnginfo=info)
    else:
        exif, rest = Image.Exif(), [v for k, v in text.items() if k != "parameters"]
        if "parameters" in text:  # EXIF's UNICODE comments are UTF-16, as piexif writes them
            user_comment = b"UNICODE\0" + text["parameters"].encode("utf-16-be")
            # The Exif IFD as a dict: Pillow 11.0 drops what get_ifd() of a new Exif is given
            exif[0x8769] = {0x9286: user_comment}  # Exif IFD, UserComment
        extra = {"comment": "\n".join(rest)} if rest else {}
        img = img if img.mode in ("L", "RGB") else img.convert("RGB")  # what JPEG holds
        save_image(img, path, format="JPEG", quality=95, xmp=xmp, exif=exif, **extra)
    return path


def save_image(img: Image.Image, path: Path, **kw: Any) -> None:
    """`img` saved by PIL (`kw`) atomically, encoded in memory first: PIL's JPEG encoder writes to
    a file with os.write and misses a short write (a full disk: a cut JPEG, kept as whole)."""
    data = io.BytesIO()
    img.save(data, **kw)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.getbuffer())
