"""A hostile environment rather than hostile files (README, What is guaranteed): a full disk at
each write (RLIMIT_FSIZE, SIGXFSZ ignored: a write past it fails with EFBIG), memory that runs
out while importing or computing, few file descriptors, unwritable caches and temporaries, an
offline Hub. Each is one line `error: ...` naming the file or the flag and the fix, no traceback;
a failed write leaves no temporary and the previous output whole."""

import argparse
import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import test_train
import torch
from clitest import expect_error, snapshot
from PIL import Image
from test_fuzz_data import H, encode, encode_text
from test_prepare import make_images
from test_sample_cli import args as sample_args
from test_train import ROOT, RUN
from test_train import args as train_args

import convert_weights
import prepare
import sample
import train
from dit360.app.cli import on_uncaught, said
from dit360.app.outputs import write_cubemap, write_viewer
from dit360.app.report import open_log
from dit360.load.convert import convert_flux
from dit360.load.files import write_safetensors
from dit360.load.image import save_panorama
from dit360.train.checkpoints import start_run
from dit360.train.data import build_cache, read_rows

data, one_thread = test_train.data, test_train.one_thread  # the tiny training rows
TOO_LARGE = r"\[Errno 27\] File too large.*: free space there, .*\(ulimit -f\)$"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")


@contextlib.contextmanager
def small_files(limit: int) -> Iterator[None]:
    """This process's files may not grow past `limit` bytes (a full disk): a write past it fails
    with EFBIG, not SIGXFSZ."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def limited(**limits: int) -> Callable[[], None]:
    """A subprocess's preexec_fn setting resource limits (RLIMIT_name: soft = hard)."""

    def set_them() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        for name, n in limits.items():
            resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (n, n))

    return set_them


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` (hidden ones too) with its size and mtime."""
    return {k: v for k, v in snapshot(folder).items() if (folder / k).is_file()}


def error_lines(stderr: str) -> list[str]:
    """The `error:` lines of stderr (progress bars redraw with \\r)."""
    return [e for e in stderr.replace("\r", "\n").splitlines() if e.startswith("error: ")]


# --- a full disk at each write of its own kind: the output's name, the previous one whole -------

PANO = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8))
TENSORS = {"a": torch.randn(64, 64), "b": torch.arange(1000)}


def weights_file(folder: Path, src: dict) -> None:
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in TENSORS.items()}
    write_safetensors(folder / "w.safetensors", specs, TENSORS.items(), {"m": "x"})


def marker(folder: Path, src: dict) -> None:
    start_run(folder, argparse.Namespace(overwrite=False))


def log(folder: Path, src: dict) -> None:
    (folder / "log.jsonl").write_text('{"step": 1}\n' * 200) if not src.get("again") else None
    open_log(folder / "log.jsonl", 1000).close()


def cache_entry(folder: Path, src: dict) -> None:
    rows = read_rows(pano=src["data"] / "pano.jsonl")["pano"][:1]
    build_cache(rows, folder, H, "m", encode, encode_text)


def cut_entry(folder: Path) -> None:
    """The cache entry cut short: stale, so the next write makes it again."""
    entry = next(folder.rglob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:100])


def prepared(folder: Path, src: dict) -> None:
    prepare.prepare(folder, pano=src["pano"], overwrite=True)


# output: (write it into a folder (`src`: the inputs), the file or folder an error must name,
# what makes a second write write again)
WRITERS = {
    "PNG image": (lambda f, src: save_panorama(PANO, f / "x.png"), "x.png"),
    "JPEG image": (lambda f, src: save_panorama(PANO, f / "x.jpg", {"prompt": "p"}), "x.jpg"),
    "viewer page": (lambda f, src: write_viewer(src["png"], f / "x.html"), "x.html"),
    "cube faces": (lambda f, src: write_cubemap(PANO, f / "x.png", 48), "x-cross.png"),
    "weights file": (weights_file, "w.safetensors"),
    "diffusers folder": (lambda f, src: convert_flux(src["flux"], f / "d", to="diffusers"), "d"),
    "run marker": (marker, ".dit360-run"),
    "log.jsonl": (log, "log.jsonl"),
    "cache entry": (cache_entry, "", cut_entry),
    "prepare's files": (prepared, ""),
}


@pytest.mark.parametrize("name", WRITERS)
def test_a_full_disk_names_the_output_and_keeps_the_previous(name, tiny_flux, data, tmp_path):
    """Each kind of output written once, then again with files limited to half its largest file:
    an OSError naming the output (not nothing, not our temporary), and the folder exactly as the
    first write left it (the previous output whole, no temporary left). It named no file (a write
    names none) or the temporary; the cache's writer raised safetensors' own error."""
    write, target, *stale = WRITERS[name]
    src = dict(flux=tiny_flux, data=data, png=tmp_path / "src.png", pano=tmp_path / "pano")
    PANO.save(src["png"])
    make_images(src["pano"], {"a.png": (64, 32), "b.png": (128, 64)})
    out = tmp_path / "out"
    out.mkdir()
    write(out, src)
    largest = max(p.stat().st_size for p in out.rglob("*") if p.is_file())
    for make_stale in stale:
        make_stale(out)
    before = files(out)
    with small_files(largest // 2), pytest.raises(OSError) as e:
        write(out, dict(src, again=True))
    assert re.search(TOO_LARGE, said(e.value)), said(e.value)
    assert not re.search(r"/\.[^/]*\.tmp[0-9]", str(e.value)), str(e.value)  # not our temporary
    assert str(out / target) in str(e.value), str(e.value)
    after = files(out)  # each output whole: the one that failed as it was, the others new
    assert after.keys() == before.keys(), "a temporary file was left"
    assert {k: after[k] for k in after if k.startswith(target)} == {
        k: before[k] for k in before if k.startswith(target)
    }


def test_a_full_disk_in_a_command_is_one_line(tiny_flux, tmp_path):
    """`sample.py --viewer` whose image fits but whose viewer page does not: one line naming the
    page (it named the image), exit 1, the previous page whole, no temporary."""
    out = tmp_path / "x.png"
    sample.main([*sample_args(tiny_flux, out), "--viewer"])  # the sizes of the image and page
    sizes = out.stat().st_size, out.with_suffix(".html").stat().st_size
    assert sizes[0] < sizes[1]
    out.with_suffix(".html").write_text("the previous page")
    cmd = [sys.executable, "sample.py", *sample_args(tiny_flux, out), "--viewer"]
    r = subprocess.run(
        cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
        preexec_fn=limited(FSIZE=sum(sizes) // 2),
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert error_lines(r.stderr) == [f"error: {said(OSError(27, 'File too large', str(out.with_suffix('.html'))))}"]
    assert out.with_suffix(".html").read_text() == "the previous page"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.html", "x.png"]
