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
from pathlib import Path

from PIL import Image

from .files import atomic_path
from .options import Parser, fail

MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

# The view maths mirror panorama.py: a ray (tan x, tan y, 1) through each pixel centre, with
# tan x = tan(fov / 2) at the left and right edges; turned to the world by R = R_y(yaw) R_x(pitch)
# (columns: camera right, up, forward); lon = atan2(x, z), lat = atan2(y, |(x, z)|), and the
# texel of pixel (row i, column j) at lon 2 pi (j + 0.5) / W - pi, lat pi / 2 - pi (i + 0.5) / H.
PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>html, body {{ margin: 0; height: 100%; overflow: hidden; background: #000; }}
canvas {{ display: block; width: 100vw; height: 100vh; cursor: grab; touch-action: none; }}
#msg {{ position: fixed; top: 1em; left: 1em; color: #fff; font: 14px sans-serif; }}</style>
</head><body><canvas id="view"></canvas><div id="msg"></div>
<script>
"use strict";
const SRC = "data:{mime};base64,{data}";
const VERTEX = `#version 300 es
void main() {{  // a full-screen quad as a triangle strip, from the vertex index alone
  vec2 corner = vec2(gl_VertexID & 1, gl_VertexID >> 1) * 2.0 - 1.0;
  gl_Position = vec4(corner, 0.0, 1.0);
}}`;
const FRAGMENT = `#version 300 es
precision highp float;
uniform sampler2D pano;
uniform vec2 size;    // canvas pixels
uniform mat3 rot;     // camera to world: columns right, up, forward
uniform float tanx;   // tan(horizontal fov / 2)
out vec4 color;
void main() {{
  vec2 ndc = gl_FragCoord.xy * 2.0 / size - 1.0;  // pixel centres; y up (origin bottom left)
  vec3 d = rot * vec3(ndc.x * tanx, ndc.y * tanx * size.y / size.x, 1.0);
  float lon = atan(d.x, d.z), lat = atan(d.y, length(d.xz));
  color = texture(pano, vec2(lon / 6.283185307179586 + 0.5, 0.5 - lat / 3.141592653589793));
}}`;

const canvas = document.getElementById("view");
const gl = canvas.getContext("webgl2", {{ preserveDrawingBuffer: true }});
const view = {{ yaw: 0, pitch: 0, fov: 90 }};
const FOV = [5, 150];  // the zoom's range, degrees
let program = null, pending = false;

function say(text) {{ document.getElementById("msg").textContent = text; }}

function readHash() {{  // #yaw=90&pitch=10&fov=75; missing or bad values keep the defaults
  const q = new URLSearchParams(location.hash.slice(1));
  const num = (k, d) => (q.has(k) && isFinite(parseFloat(q.get(k))) ? parseFloat(q.get(k)) : d);
  view.yaw = num("yaw", 0);
  view.pitch = Math.max(-90, Math.min(90, num("pitch", 0)));
  view.fov = Math.max(FOV[0], Math.min(FOV[1], num("fov", 90)));
}}

function writeHash() {{
  const r = (v) => Math.round(v * 10) / 10;
  const yaw = ((view.yaw % 360) + 540) % 360 - 180;  // in [-180, 180)
  history.replaceState(null, "", `#yaw=${{r(yaw)}}&pitch=${{r(view.pitch)}}&fov=${{r(view.fov)}}`);
}}

function shader(type, src) {{
  const s = gl.createShader(type);
  gl.shaderSource(s, src);
  gl.compileShader(s);
  if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(s));
  return s;
}}

function setup(img) {{
  program = gl.createProgram();
  gl.attachShader(program, shader(gl.VERTEX_SHADER, VERTEX));
  gl.attachShader(program, shader(gl.FRAGMENT_SHADER, FRAGMENT));
  gl.linkProgram(program);
  gl.useProgram(program);
  let src = img;  // larger than the GPU allows: scaled down on a 2-D canvas first
  const max = gl.getParameter(gl.MAX_TEXTURE_SIZE);
  if (img.width > max || img.height > max) {{
    const k = max / Math.max(img.width, img.height);
    src = document.createElement("canvas");
    src.width = Math.floor(img.width * k);
    src.height = Math.floor(img.height * k);
    src.getContext("2d").drawImage(img, 0, 0, src.width, src.height);
  }}
  gl.bindTexture(gl.TEXTURE_2D, gl.createTexture());
  gl.pixelStorei(gl.UNPACK_COLORSPACE_CONVERSION_WEBGL, gl.NONE);  // the file's values as they are
  gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA, gl.RGBA, gl.UNSIGNED_BYTE, src);  // row 0 = top
  gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_S, gl.REPEAT);  // longitude wraps at the seam
  gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
  gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.LINEAR);  // no mipmaps: no seam line
  gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.LINEAR);
}}

function draw() {{
  pending = false;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(canvas.clientWidth * dpr);
  canvas.height = Math.round(canvas.clientHeight * dpr);
  gl.viewport(0, 0, canvas.width, canvas.height);
  const y = (view.yaw * Math.PI) / 180, p = (view.pitch * Math.PI) / 180;
  const cy = Math.cos(y), sy = Math.sin(y), cp = Math.cos(p), sp = Math.sin(p);
  const rot = [cy, 0, -sy, -sy * sp, cp, -cy * sp, sy * cp, sp, cy * cp];  // R_y R_x, by column
  gl.uniformMatrix3fv(gl.getUniformLocation(program, "rot"), false, rot);
  gl.uniform2f(gl.getUniformLocation(program, "size"), canvas.width, canvas.height);
  gl.uniform1f(gl.getUniformLocation(program, "tanx"), Math.tan((view.fov * Math.PI) / 360));
  gl.drawArrays(gl.TRIANGLE_STRIP, 0, 4);
}}

function redraw() {{
  if (program && !pending) {{ pending = true; requestAnimationFrame(draw); }}
}}

let drag = null;
canvas.addEventListener("pointerdown", (e) => {{
  drag = {{ x: e.clientX, y: e.clientY }};
  canvas.setPointerCapture(e.pointerId);
}});
canvas.addEventListener("pointermove", (e) => {{
  if (!drag) return;
  const k = view.fov / canvas.clientWidth;  // degrees per CSS pixel at the centre, about
  view.yaw -= (e.clientX - drag.x) * k;  // the panorama follows the pointer
  view.pitch = Math.max(-90, Math.min(90, view.pitch + (e.clientY - drag.y) * k));
  drag = {{ x: e.clientX, y: e.clientY }};
  writeHash();
  redraw();
}});
canvas.addEventListener("pointerup", () => {{ drag = null; }});
canvas.addEventListener("wheel", (e) => {{
  e.preventDefault();
  view.fov = Math.max(FOV[0], Math.min(FOV[1], view.fov * Math.exp(e.deltaY * 0.001)));
  writeHash();
  redraw();
}}, {{ passive: false }});
window.addEventListener("hashchange", () => {{ readHash(); redraw(); }});
window.addEventListener("resize", redraw);

readHash();
if (!gl) {{
  say("This viewer needs WebGL2.");
}} else {{
  const img = new Image();
  img.onload = () => {{
    try {{ setup(img); draw(); }} catch (err) {{ say(`WebGL error: ${{err.message}}`); }}
  }};
  img.onerror = () => say("The embedded panorama could not be decoded.");
  img.src = SRC;
}}
</script></body></html>
"""


def viewer_html(data: bytes, mime: str = "image/png", title: str = "panorama") -> str:
    """The viewer page (HTML text) of an equirectangular image file's bytes `data`."""
    encoded = base64.b64encode(data).decode("ascii")
    return PAGE.format(title=html.escape(title), mime=mime, data=encoded)


def check_panorama(path: str | Path) -> str:
    """The format (PNG, JPEG, WEBP) of the image file at `path` if it is readable and 2:1 (a full
    sphere), else ValueError."""
    try:
        with Image.open(path) as img:
            img.load()  # truncated or corrupt files fail here
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
