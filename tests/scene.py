"""A drawn test panorama (sky, mountains, a ground grid, a sun, four numbered markers at yaw 0, 90,
180 and -90) and screenshots of pages in headless Chromium.

python tests/scene.py docs/viewer.png   # the README's screenshot of the viewer
"""

import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).parents[1]))  # dit360 without an install
from dit360.app import panorama as P  # noqa: E402

MARKERS = {0: (210, 40, 40), 90: (40, 170, 60), 180: (40, 80, 210), -90: (230, 200, 40)}


def direction(yaw: float, pitch: float) -> np.ndarray:
    """The unit view direction (3,) of yaw and pitch in degrees (panorama.py's axes)."""
    y, p = math.radians(yaw), math.radians(pitch)
    return np.array([math.cos(p) * math.sin(y), math.sin(p), math.cos(p) * math.cos(y)])


def drawn_panorama(h: int) -> Image.Image:
    """An h x 2h RGB panorama drawn on the sphere, so it is seamless at the wrap and the poles."""
    d = P.equirect_dirs(h, 2 * h, dtype=torch.float64).numpy()  # (h, 2h, 3)
    x, y, z = d[..., 0], d[..., 1], d[..., 2]
    lon, lat = np.arctan2(x, z), np.degrees(np.arcsin(y.clip(-1, 1)))
    t = y.clip(0, 1)[..., None] ** 0.5
    img = (1 - t) * np.array([205, 222, 240]) + t * np.array(
        [45, 95, 185]
    )  # sky, horizon to zenith
    ridge = (
        6 + 3 * np.sin(3 * lon + 1) + 2 * np.sin(7 * lon) + 1.2 * np.sin(13 * lon + 2)
    )  # degrees
    hills = (lat >= 0) & (lat < ridge)
    img[hills] = np.array([95, 110, 135]) + lat[hills, None] * 2.5
    ground, depth = y < 0, 1 / np.maximum(-y, 1e-6)  # the ground plane one unit below the eye
    gx, gz = x * depth, z * depth
    line = np.minimum(abs(gx - gx.round()), abs(gz - gz.round())) < 0.04  # a 1-unit grid
    fade = np.exp(-depth / 6)[..., None]  # the grid fades with distance (no aliasing far away)
    soil = np.array([110, 140, 70]) * (0.75 + 0.25 * fade)
    img[ground] = soil[ground]
    grid = ground & line
    img[grid] = (1 - fade[grid]) * soil[grid] + fade[grid] * np.array([60, 70, 40])

    def disc(yaw: float, pitch: float, radius: float, color: tuple, ring: tuple | None = None):
        angle = np.degrees(np.arccos((d @ direction(yaw, pitch)).clip(-1, 1)))
        if ring:
            img[angle < 1.25 * radius] = ring
        img[angle < radius] = color

    disc(40, 35, 4, (255, 240, 185))  # the sun
    for yaw, color in MARKERS.items():
        disc(yaw, 4, 6, color, (255, 255, 255))
    out = torch.from_numpy(img.transpose(2, 0, 1) / 255)[None]  # (1, 3, h, 2h)
    font = ImageFont.load_default(28)
    for yaw in MARKERS:  # a sign above each marker, its yaw written on it
        sign = Image.new("RGB", (96, 48), "white")
        draw = ImageDraw.Draw(sign)
        draw.rectangle([0, 0, 95, 47], outline="black", width=3)
        draw.text((48, 24), str(yaw), fill="black", anchor="mm", font=font)
        photo = torch.from_numpy(np.asarray(sign, dtype=np.float64) / 255).permute(2, 0, 1)[None]
        canvas, mask = P.perspective_to_equirect(photo, 14, yaw, 17, 0, h)
        out = out * (1 - mask) + canvas * mask
    return Image.fromarray((out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def chromium() -> str:
    """The Chromium executable; a test failure (not a skip: `-m browser` asked for it) if it is
    missing."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.fail(
            "the browser tests need Chromium, not found on PATH: apt-get install chromium "
            "(.ci/run installs it), or deselect them (the default: -m 'not browser')",
            pytrace=False,
        )
    return exe


def headless(url: str, width: int, height: int, *flags: str) -> str:
    """Run headless Chromium on `url` in a width x height window (WebGL drawn in software by
    SwiftShader: no GPU needed) until the page is idle; returns its stdout."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            chromium(), "--headless", "--no-sandbox", "--hide-scrollbars", "--mute-audio",
            "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
            "--force-device-scale-factor=1", f"--window-size={width},{height}",
            "--virtual-time-budget=10000",  # run the page's timers and frames until it is drawn
            f"--user-data-dir={tmp}", *flags, url,
        ]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout


def screenshot(page: Path, fragment: str, width: int, height: int) -> np.ndarray:
    """A screenshot (height, width, 3) uint8 of the page `page#fragment`."""
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        headless(f"{page.resolve().as_uri()}#{fragment}", width, height, f"--screenshot={shot}")
        return np.asarray(Image.open(shot).convert("RGB"))


def dom(page: Path, width: int, height: int) -> str:
    """The page's DOM once it is idle (its scripts may open other local files)."""
    return headless(
        page.resolve().as_uri(), width, height, "--allow-file-access-from-files", "--dump-dom"
    )


if __name__ == "__main__":  # the README's screenshot: the viewer at a shared view
    from dit360.app.outputs import write_viewer

    with tempfile.TemporaryDirectory() as tmp:
        drawn_panorama(1024).save(Path(tmp) / "scene.png")
        page = write_viewer(Path(tmp) / "scene.png")
        Image.fromarray(screenshot(page, "yaw=45&pitch=10&fov=110", 960, 540)).save(sys.argv[1])
