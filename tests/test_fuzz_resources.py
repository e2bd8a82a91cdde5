"""A hostile environment rather than hostile files (README, What is guaranteed): a full disk at
each write (RLIMIT_FSIZE, SIGXFSZ ignored: a write past it fails with EFBIG), memory that runs
out while importing or computing, few file descriptors, unwritable caches and temporaries, an
offline Hub. Each is one line `error: ...` naming the file or the flag and the fix, no traceback;
a failed write leaves no temporary and the previous output whole."""

import argparse
import contextlib
import errno
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
import edit
import prepare
import sample
import train
from dit360.app.cli import STATE, on_uncaught, said
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
    """A run's log as a resumed run rewrites it (less the lines past its step)."""
    if not src.get("again"):
        (folder / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n' * 200)
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


def test_a_full_disk_in_a_command_is_one_line(tiny_flux, tmp_path, capsys):
    """`sample.py --viewer` whose image fits in 10 kB but whose viewer page does not: one line
    (what the script's `cli.on_uncaught` says of the error) naming the page (it named the image),
    the previous page whole, no temporary."""
    out, page = tmp_path / "x.png", tmp_path / "x.html"
    page.write_text("the previous page")
    with small_files(10_000), pytest.raises(OSError) as e:
        sample.main([*sample_args(tiny_flux, out), "--viewer"])
    capsys.readouterr()
    on_uncaught(type(e.value), e.value, e.tb)
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {TOO_LARGE[:-1]}\n", err) and f"'{page}'" in err, err
    assert page.read_text() == "the previous page" and out.stat().st_size < 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.html", "x.png"]


# --- memory: one line naming what ran out and the fix, while importing too --------------------

RAN_OUT = [  # what a failed allocation raises: Python's, torch's (CPU and CUDA), numpy's
    MemoryError(),
    RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 262144 bytes. Error code 12 (Cannot allocate memory)"
    ),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has ..."),
    MemoryError("Unable to allocate 1.00 TiB for an array with shape (2**40,)"),
    ImportError("libtorch_cpu.so: failed to map segment from shared object"),
    OSError(12, "Cannot allocate memory"),
    RuntimeError("Too many open files. Communication with the workers is no longer possible."),
    OSError(28, "No space left on device", "/data/out.png"),
]


@pytest.mark.parametrize("e", RAN_OUT, ids=lambda e: type(e).__name__)
def test_running_out_is_one_line_with_the_fix(e, capsys, monkeypatch):
    """An uncaught resource error, wherever it is raised, is one line `error: ...` with what ran
    out and the fix (sample.py's --offload, --fp8, smaller sizes; ulimit), not a traceback."""
    monkeypatch.setitem(STATE, "flags", ("--height", "--offload", "--fp8"))  # sample.py's
    on_uncaught(type(e), e, None)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(r"out of memory: .*--offload, --fp8|ulimit -n|free space there", err), err


FLAG = r"(?<![\w-])--[\w-]+"  # a flag, not the end of another (--fp8 in --t5-fp8)


@pytest.mark.parametrize("script", [sample, edit, train, prepare, convert_weights])
def test_running_out_names_only_the_commands_options(script, capsys, monkeypatch):
    """The fix of running out of memory or open files names only options the running command has
    (its --help lists them), and some where it has them: every command named sample.py's and
    train.py's (prepare.py, convert_weights.py have none of them)."""
    monkeypatch.setitem(STATE, "flags", ())
    with pytest.raises(SystemExit):
        getattr(script, "parse_args", script.main)(["--help"])
    has = set(re.findall(FLAG, capsys.readouterr().out))
    named = [
        re.findall(FLAG, said(e)) for e in (MemoryError(), RuntimeError("Too many open files"))
    ]
    assert set(named[0] + named[1]) <= has, (named, has)
    assert bool(named[0]) == (script is not convert_weights), named
    assert named[1] == (["--workers"] if script is train else []), named


def test_a_bug_is_still_a_traceback(capsys):
    """Any other uncaught error keeps Python's traceback (a bug must show where it is)."""
    on_uncaught(KeyError, KeyError("x"), None)
    assert capsys.readouterr().err.startswith("KeyError")


def test_memory_running_out_while_importing_torch(tmp_path):
    """A script whose address space cannot map torch's libraries: one line and exit 1 (it was a
    20-line ImportError traceback): the hook is set before the imports."""
    code = (
        "from dit360.app.cli import handle_signals\n"
        "handle_signals()\n"
        "import resource\n"
        "size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + 2**26, resource.RLIM_INFINITY))\n"
        "import torch\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(error_lines(r.stderr)) == 1 and "out of memory: " in r.stderr, r.stderr


# --- few file descriptors: the loader's workers ---------------------------------------------


def test_workers_without_their_open_files_are_refused(tiny_flux, data, tmp_path):
    """train.py --workers 2 where `ulimit -n` allows 40: one line naming --workers and the limit,
    exit 2, nothing written (a worker's batch, passed as descriptors, was dropped: the run waited
    for it for ever)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", *train_args(tiny_flux, data, out, *RUN, "--workers", "2")]
    r = subprocess.run(
        cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
        preexec_fn=limited(NOFILE=40),
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert error_lines(r.stderr) == [
        "error: --workers 2: needs 64 open files, ulimit -n allows 40: raise it, or give fewer "
        "--workers"
    ]
    assert not out.exists()


def test_workers_raise_the_soft_limit_they_need(tiny_flux, data, tmp_path):
    """Under a soft limit of 40 open files (the hard one higher), --workers 2 raises it to what
    they need instead of hanging."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, hard))
    try:
        train.parse_args(train_args(tiny_flux, data, tmp_path / "run", "--workers", "2"))
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert raised >= 64


# --- unwritable places besides --out; the Hub offline -----------------------------------------


@pytest.mark.parametrize("how", ["a file in its path", "a read-only folder"])
def test_an_unwritable_cache_dir_is_refused_up_front(how, tiny_flux, data, tmp_path, capsys,
                                                     monkeypatch):  # fmt: skip
    """train.py --cache-dir that cannot be written: one line naming the flag, exit 2, nothing
    written (it failed after the run's folder was marked, exit 1)."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "locked").mkdir()
    cache = tmp_path / ("file/cache" if how.startswith("a file") else "locked/cache")
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: Path(p) != tmp_path / "locked" and access(p, m))
    argv = train_args(tiny_flux, data, tmp_path / "run", *RUN, "--cache-dir", str(cache))
    expect_error(capsys, train.main, argv, tmp_path, r"--cache-dir \S+: \S+ is not a folder")


def test_an_unwritable_cache_of_the_environment_names_its_variable(tmp_path, monkeypatch):
    """A cache folder set in the environment that cannot be made (TORCHINDUCTOR_CACHE_DIR, which
    importing transformers creates): the line names the variable, not only a path."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "file" / "inductor"))
    with pytest.raises(OSError) as e:
        cache_dir()
    assert f"(from TORCHINDUCTOR_CACHE_DIR={tmp_path}/file/inductor: make it" in said(e.value)
    cut = OSError(errno.EIO, "Input/output error", f"{tmp_path}/file/inductor/x")  # a failed read
    assert "TORCHINDUCTOR_CACHE_DIR" not in said(cut)  # of a file in it: no such hint


def test_an_uncached_repo_offline_says_what_to_download(tiny_flux, tmp_path, capsys, monkeypatch):
    """HF_HUB_OFFLINE=1 and a --base repo id not in the cache: one line with the `hf download`
    command of the files needed (it said only "download it once with network access")."""

    def offline(*a, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    argv = sample_args("someone/flux", tmp_path / "x.png")
    expect_error(
        capsys, sample.main, argv, tmp_path, r"`hf download someone/flux( --include '.+')+`"
    )
