"""A 360-degree viewer page for an equirectangular panorama: one self-contained HTML file, the
image embedded as a data URI, no network. A WebGL2 fragment shader on a full-screen quad turns
each pixel into a view direction and looks the panorama up there, with the projection of
`panorama.equirect_to_perspective` (same yaw and pitch signs; fov is horizontal, pixels square),
so a screenshot of the page equals our own render of the same view (tested in headless Chromium).

Drag to look around, the wheel zooms; the URL fragment holds the view (`#yaw=90&pitch=10&fov=75`,
degrees), so a view can be shared.

python -m dit360.view pano.png [--out pano.html]
"""

import base64
import html
import re
from importlib import resources
from pathlib import Path

from .files import atomic_path
from .image import loaded
from .options import Parser, fail

MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

# The page: dit360/viewer.html, with @title@, @mime@ and @data@ filled in. Its view maths mirror
# panorama.py: a ray (tan x, tan y, 1) through each pixel centre, with tan x = tan(fov / 2) at the
# left and right edges; turned to the world by R = R_y(yaw) R_x(pitch) (columns: camera right, up,
# forward); lon = atan2(x, z), lat = atan2(y, |(x, z)|), and the texel of pixel (row i, column j)
# at lon 2 pi (j + 0.5) / W - pi, lat pi / 2 - pi (i + 0.5) / H.
FIELD = re.compile(r"@(title|mime|data)@")


def viewer_html(data: bytes, mime: str = "image/png", title: str = "panorama") -> str:
    """The viewer page (HTML text) of an equirectangular image file's bytes `data`."""
    fields = dict(title=html.escape(title), mime=mime, data=base64.b64encode(data).decode("ascii"))
    page = resources.files(__package__).joinpath("viewer.html").read_text(encoding="utf-8")
    return FIELD.sub(lambda m: fields[m[1]], page)


def check_panorama(path: str | Path) -> str:
    """The format (PNG, JPEG, WEBP) of the image file at `path` if it is readable and 2:1 (a full
    sphere), else ValueError."""
    try:
        with loaded(path) as img:
            fmt, (w, h) = img.format, img.size
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    if fmt not in MIME:
        raise ValueError(f"{path}: {fmt} images are not embedded; use PNG, JPEG or WebP")
    if w != 2 * h:
        raise ValueError(f"{path}: {w}x{h} is not 2:1 (equirectangular)")
    return fmt


def write_viewer(image: str | Path, out: str | Path | None = None) -> Path:
    """Write the viewer page of the panorama file `image` to `out` (default: beside it, .html),
    atomically. The file's bytes are embedded as they are."""
    image = Path(image)
    fmt = check_panorama(image)
    out = Path(out) if out else image.with_suffix(".html")
    with atomic_path(out) as tmp:
        tmp.write_text(viewer_html(image.read_bytes(), MIME[fmt], image.stem), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__)
    p.add_argument("image", type=Path, help="an equirectangular panorama (2:1 PNG, JPEG or WebP)")
    p.add_argument("--out", type=Path, help="the page to write (default: IMAGE with .html)")
    args = p.parse_args(argv)
    if not args.image.is_file():
        fail(f"{args.image}: no such file")
    if args.out is not None and args.out.suffix.lower() not in (".html", ".htm"):
        fail(f"--out {args.out}: use a .html file name")
    try:
        out = write_viewer(args.image, args.out)
    except ValueError as e:
        fail(e)
    except OSError as e:
        fail(f"cannot write {args.out or args.image.with_suffix('.html')}: {e}")
    print(f"wrote {out}: open it in a browser (drag to look around, the wheel zooms)")


if __name__ == "__main__":
    main()
