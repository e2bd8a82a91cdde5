"""edit.py --edits (a .jsonl of edits): the images of single runs, each model loaded once, outputs
written as they finish, resumed without loading, bad rows as one-line errors, torchrun's share."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from clitest import expect_error
from PIL import Image
from test_batch import counted, pixels
from test_editing import KEEP, PROMPT, SOURCE, write_inputs

import edit
from dit360.app import editing, generate, text
from dit360.app.options import EditOptions

ROOT = Path(__file__).parents[1]
LAKE = "This is a panorama. A frozen lake at night."
# Three edits: the defaults; inpainting with its own source prompt and seed; another prompt on
# the first source with its own steps and output name.
ROWS = [
    {"image": "a/src.png", "mask": "a/mask.png", "prompt": PROMPT},
    {"image": "b/src.png", "mask": "b/mask.png", "prompt": LAKE, "seed": 7, "invert": True,
     "source_prompt": SOURCE},
    {"image": "a/src.png", "mask": "a/mask.png", "prompt": LAKE, "seed": 6, "steps": 3,
     "guidance": 3, "out": "sub/lake.png"},
]  # fmt: skip
SINGLES = [  # the same edits as single edit.py runs: (folder, prompt, flags)
    ("a", PROMPT, []),
    ("b", LAKE, ["--seed", "7", "--invert", "--source-prompt", SOURCE]),
    ("a", LAKE, ["--seed", "6", "--steps", "3", "--guidance", "3"]),
]
NAMES = ["0000-seed5.png", "0001-seed7.png", "sub/lake.png"]
LOADERS = [(text, "load_text_encoders"), (generate, "load_model"), (generate, "load_vae")]


def flags(tiny_flux, *extra: str) -> list[str]:
    return [
        *("--base", str(tiny_flux), "--lora", "none", "--height", "32", "--steps", "2"),
        *("--seed", "5", "--device", "cpu", "--dtype", "fp32", *extra),
    ]


def sources(folder: Path) -> Path:
    """Two sources with their masks in folder/a and folder/b (the same files every call)."""
    write_inputs(folder / "a", seed=0)
    write_inputs(folder / "b", seed=1, keep=KEEP.flip(1))
    return folder


def write_rows(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def singles(tiny_flux, tmp_path_factory) -> list[np.ndarray]:
    """The three edits as single edit.py runs."""
    folder, images = sources(tmp_path_factory.mktemp("singles")), []
    for i, (sub, prompt, extra) in enumerate(SINGLES):
        out = folder / f"{i}.png"
        image, mask = folder / sub / "src.png", folder / sub / "mask.png"
        argv = ["--image", str(image), "--mask", str(mask), "--prompt", prompt, "--out", str(out)]
        edit.main([*flags(tiny_flux, *extra), *argv])
        images.append(pixels(out))
    return images


def no_loads(monkeypatch) -> None:
    """Make every model loader fail the test."""

    def fail(*a, **k):
        raise AssertionError("a model was loaded")

    for module, name in LOADERS:
        monkeypatch.setattr(module, name, fail)


def test_batch_equals_single_runs_and_resumes(tiny_flux, tmp_path, singles, monkeypatch, capsys):
    """Three edits (one inpainting, own seeds, steps, guidance, source prompt and output name):
    the single runs' images, pixel for pixel, each model loaded once, each image written before
    the next edit starts; a rerun skips all three and loads nothing."""
    rows, out = write_rows(sources(tmp_path) / "edits.jsonl", ROWS), tmp_path / "out"
    loads = [counted(monkeypatch, module, name) for module, name in LOADERS]
    written, invert = [], editing.invert
    monkeypatch.setattr(
        editing,
        "invert",
        lambda *a, **k: written.append([(out / n).exists() for n in NAMES]) or invert(*a, **k),
    )
    argv = flags(tiny_flux, "--edits", str(rows), "--out-dir", str(out))
    edit.main(argv)
    assert loads == [[1], [1], [1]]
    assert written == [[False] * 3, [True, False, False], [True, True, False]]
    for name, expected in zip(NAMES, singles, strict=True):
        assert np.array_equal(pixels(out / name), expected), name
    assert 'GPano:ProjectionType="equirectangular"' in str(Image.open(out / NAMES[0]).info["xmp"])
    printed = capsys.readouterr().out
    assert printed.count("wrote ") == 3 and "3 images written, 0 skipped" in printed
    assert "images/minute" in printed

    no_loads(monkeypatch)
    with warnings.catch_warnings(record=True) as warned:  # the size's, once (never, before)
        warnings.simplefilter("always")
        edit.main(argv)
    printed = capsys.readouterr().out
    assert printed.count("skip ") == 3 and "0 images written, 3 skipped" in printed
    assert ["trained at 1024x2048" in str(w.message) for w in warned] == [True]


def test_bad_rows(tiny_flux, tmp_path, capsys, monkeypatch):
    """A bad row is one line naming file:line, exit 2, before any model loads; nothing written."""
    sources(tmp_path)
    Image.new("L", (50, 20), 255).save(tmp_path / "white.png")
    write_inputs(tmp_path / "sq", size=(32, 32))
    (tmp_path / "text.png").write_text("not an image")
    write_inputs(tmp_path / "out")  # sources in --out-dir, where an "out" could overwrite them
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")  # a row writing through it
    no_loads(monkeypatch)
    good, rows = ROWS[0], tmp_path / "edits.jsonl"
    argv = flags(tiny_flux, "--edits", str(rows), "--out-dir", str(tmp_path / "out"))
    for bad, match in [
        ('{"image": "a/src.png"', "not JSON"),
        ({"image": "a/src.png", "prompt": "x"}, 'need an object with "image", "mask", "prompt"'),
        ({**good, "image": "nope.png"}, r"No such file.*nope\.png"),
        ({**good, "image": "text.png"}, "cannot identify image file"),
        ({**good, "image": "sq/src.png"}, r"src\.png: 32x32 is not 2:1; pass --resize"),
        ({**good, "mask": "white.png"}, "nothing to generate"),
        ({**good, "mask": "white.png", "invert": True}, "nothing to keep"),
        ({**good, "mask": "text.png"}, "cannot identify image file"),
        ({**good, "strength": 0.5}, "bad 'strength'"),
        ({**good, "seed": "3"}, "bad 'seed'"),
        ({**good, "invert": 1}, "bad 'invert'"),
        ({**good, "steps": True}, "bad 'steps'"),
        ({**good, "steps": 0}, r"--steps must be an integer from 1 to 1000"),
        ({**good, "seed": -1}, r"--seed must be an integer from 0 to 2\*\*64 - 1"),
        ({**good, "out": "x.gif"}, r"\.png, \.jpg"),
        ({**good, "out": "0000-seed5.png"}, "as line 1 does"),
        ({**good, "out": "../escape.png"}, r'"out" \.\./escape\.png is outside --out-dir: give a'),
        ({**good, "out": str(tmp_path / "abs.png")}, r"abs\.png is outside --out-dir"),
        ({**good, "out": "link/x.png"}, r"link/x\.png leads outside --out-dir through a symbolic"),
        ({**good, "image": "out/src.png", "out": "src.png"}, r'src\.png is its "image", which'),
        ({**good, "mask": "out/mask.png", "out": "mask.png"}, r'mask\.png is its "mask", which'),
    ]:
        write_rows(rows, [good, bad])
        expect_error(capsys, edit.main, argv, tmp_path, f"edits.jsonl:2: .*{match}")
    write_rows(rows, [good, {**good, "image": "sq/src.png"}])  # --resize stretches it to 2:1
    args = edit.parse_args([*argv, "--resize", "--out-dir", str(tmp_path / "out")])
    assert len(edit.edit_jobs(args, EditOptions(lora=None, device="cpu"))) == 2


def test_flags(tiny_flux, tmp_path, capsys, monkeypatch):
    """--edits replaces --image/--mask/--prompt/--out; a missing, empty or non-.jsonl file and
    --out-dir without --edits are one-line errors."""
    src, mask = write_inputs(tmp_path)
    rows = write_rows(tmp_path / "edits.jsonl", [ROWS[0]])
    no_loads(monkeypatch)
    batch = flags(tiny_flux, "--edits", str(rows))
    one = flags(tiny_flux, "--image", str(src), "--mask", str(mask), "--prompt", "x")
    for argv, match in [
        ([*batch, "--image", str(src)], "argument --edits: not allowed with argument --image"),
        ([*batch, "--out", "x.png"], "argument --edits: not allowed with argument --out"),
        (flags(tiny_flux, "--image", str(src)), "required: --mask, --prompt"),
        ([*one, "--out-dir", str(tmp_path)], "--out-dir: only with --edits"),
        (flags(tiny_flux, "--edits", str(tmp_path / "no.jsonl")), r"--edits .*no\.jsonl: no such"),
        (flags(tiny_flux, "--edits", str(src)), r"src\.png: use a \.jsonl file"),
        ([*batch, "--out-dir", str(src)], r"--out-dir .*src\.png is a file: choose a folder"),
    ]:
        expect_error(capsys, edit.main, argv, tmp_path, match)
    rows.write_text("\n")
    expect_error(capsys, edit.main, batch, tmp_path, r"edits\.jsonl: no edits in it")


def test_torchrun_shares_the_edits(tiny_flux, tmp_path, singles):
    """Under torchrun (2 CPU processes) rank r makes rows[r::2]: the single runs' images;
    the inputs' warnings (the size's) shown once, by rank 0 (every rank did)."""
    rows, out = write_rows(sources(tmp_path) / "edits.jsonl", ROWS), tmp_path / "out"
    argv = flags(tiny_flux, "--edits", str(rows), "--out-dir", str(out))
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run([*run, str(ROOT / "edit.py"), *argv], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0 of 2: 2 images written, 0 skipped" in r.stdout, r.stdout
    assert "rank 1 of 2: 1 images written, 0 skipped" in r.stdout, r.stdout
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert warned and len(set(warned)) == len(warned), r.stderr
    for name, expected in zip(NAMES, singles, strict=True):
        assert np.array_equal(pixels(out / name), expected), name
