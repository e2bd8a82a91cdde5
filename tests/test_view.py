"""The viewer page (`dit360.app.outputs.write_viewer`): screenshots in headless Chromium against our
own projection, and `python -m dit360.app.view` on good and bad input."""

import numpy as np
import pytest
import torch
from clitest import expect_error
from PIL import Image
from scene import dom, drawn_panorama, screenshot

from dit360.app import panorama as P
from dit360.app.outputs import view_main, write_viewer

# Mean absolute difference (0-255 levels) allowed between a screenshot and our render of the same
# view. Measured: 1.3e-5 (SwiftShader samples the texture bilinearly as grid_sample does; one
# channel of one pixel differs by 1). A view 1 degree off in yaw already differs by 2.5, so the
# bound leaves room for GPUs with coarser texture filtering and still catches any convention slip.
BOUND = 0.5


def render(pano: Image.Image, yaw: float, pitch: float, fov: float, size: tuple) -> np.ndarray:
    """Our perspective render (h, w, 3) of the panorama, rounded to 8 bits like the screenshot."""
    x = torch.from_numpy(np.asarray(pano, dtype=np.float64) / 255).permute(2, 0, 1)[None]
    out = P.equirect_to_perspective(x, fov, yaw, pitch, 0, size)[0].permute(1, 2, 0)
    return (out.numpy() * 255).round()


@pytest.mark.browser
@pytest.mark.parametrize(
    "yaw,pitch,fov,width,height",
    [(170, 15, 75, 320, 240), (-60, -30, 100, 200, 300)],  # across the seam; portrait, looking down
)
def test_screenshot_matches_our_projection(tmp_path, yaw, pitch, fov, width, height):
    """The page at #yaw/pitch/fov in headless Chromium equals equirect_to_perspective's view (MAD
    < BOUND); a view 5 degrees off in yaw, the pitch's sign flipped or the fov taken as vertical
    differs more than 4 x BOUND (the negative controls)."""
    pano = drawn_panorama(256)
    pano.save(tmp_path / "scene.png")
    page = write_viewer(tmp_path / "scene.png")
    shot = screenshot(page, f"yaw={yaw}&pitch={pitch}&fov={fov}", width, height).astype(float)
    size = (height, width)
    mad = np.abs(shot - render(pano, yaw, pitch, fov, size)).mean()
    assert mad < BOUND, mad  # measured 1.3e-5 and 1.7e-5
    vertical = np.degrees(2 * np.arctan(np.tan(np.radians(fov) / 2) * width / height))
    for wrong in [(yaw + 5, pitch, fov), (yaw, -pitch, fov), (yaw, pitch, vertical)]:
        control = np.abs(shot - render(pano, *wrong, size)).mean()
        assert control > 4 * BOUND, (wrong, control)  # measured >= 6.6 (5 degrees of yaw)


# A page that shows the viewer in a 400 x 300 frame, drags across it and turns the wheel, then
# records the viewer's address fragment on its own body.
HARNESS = """<!DOCTYPE html><html><body style="margin: 0">
<iframe id="f" src="scene.html#yaw=0&pitch=0&fov=90" width="400" height="300"></iframe>
<script>
const f = document.getElementById("f");
f.onload = () => setTimeout(() => {
  const w = f.contentWindow, c = w.document.getElementById("view");
  const at = (type, x, y) => c.dispatchEvent(
    new w.PointerEvent(type, { clientX: x, clientY: y, pointerId: 1, bubbles: true }));
  at("pointerdown", 200, 150); at("pointermove", 100, 170); at("pointerup", 100, 170);
  c.dispatchEvent(new w.WheelEvent("wheel", { deltaY: 100, cancelable: true, bubbles: true }));
  document.body.dataset.hash = w.location.hash;
}, 200);
</script></body></html>"""


@pytest.mark.browser
def test_drag_and_wheel_update_the_fragment(tmp_path):
    """Dragging 100 px left and 20 px down at fov 90 in a 400 px wide view turns the view 22.5
    degrees right and 4.5 up (the panorama follows the pointer); the wheel widens the fov by
    exp(deltaY / 1000); the address fragment follows, so the view can be shared."""
    drawn_panorama(16).save(tmp_path / "scene.png")
    write_viewer(tmp_path / "scene.png")
    (tmp_path / "harness.html").write_text(HARNESS)
    assert 'data-hash="#yaw=22.5&amp;pitch=4.5&amp;fov=99.5"' in dom(
        tmp_path / "harness.html", 420, 320
    )


def test_page_is_self_contained(tmp_path):
    """The page embeds the image's bytes as a data URI, loads nothing from the network, and
    `python -m dit360.app.view` writes it beside the image (or at --out)."""
    drawn_panorama(16).save(tmp_path / "p.jpg", quality=90)
    view_main([str(tmp_path / "p.jpg")])
    page = (tmp_path / "p.html").read_text()
    assert "data:image/jpeg;base64," in page and "http" not in page
    view_main([str(tmp_path / "p.jpg"), "--out", str(tmp_path / "sub" / "v.html")])
    assert (tmp_path / "sub" / "v.html").read_text() == page


def test_cli_errors(tmp_path, capsys):
    """A missing file, a non-image, a non-2:1 image or a bad --out name: one line, exit 2."""
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (30, 20)).save(tmp_path / "wide.png")
    Image.new("RGB", (40, 20)).save(tmp_path / "ok.png")
    for argv, match in [
        ([str(tmp_path / "missing.png")], "no such file"),
        ([str(tmp_path / "notes.png")], "not a readable image"),
        ([str(tmp_path / "wide.png")], "30x20 is not 2:1"),
        ([str(tmp_path / "ok.png"), "--out", str(tmp_path / "v.txt")], "use a .html"),
        ([], "required: image"),
    ]:
        expect_error(capsys, view_main, argv, tmp_path, match)


def test_wheel_ships_the_page(tmp_path):
    """The page is package data: a built wheel (what `pip install .` installs) carries it."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root, src = Path(__file__).parents[1], tmp_path / "src"  # built in a copy: no build/ here
    shutil.copytree(root / "dit360", src / "dit360", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    r = subprocess.run([*cmd, "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("dit360-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dit360/app/viewer.html" in names and "dit360/core/model.py" in names  # and the method
    layers = ("memory/ahead", "speed/kernels", "load/files", "app/generate", "train/data")
    assert all(f"dit360/{m}.py" in names for m in layers)  # and every layer of the runtime
