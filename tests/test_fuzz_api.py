"""Fuzz the Python API (README, Python API) with what a library user passes and no CLI would:
options of the wrong type or out of range, prompts that are not text, tensors for images, jobs
that are a generator or not jobs, sizes past any bound, outputs over an input. Each call gives the
documented result or a TypeError / ValueError naming the argument, raised before any model loads
or large allocation; never a deep traceback, a silent wrong result or a user's file replaced.
Also: the README's snippet runs (on the tiny model; test_readme checks its imports and the layer
table's names)."""

import itertools
import json
import math
import re
import shutil
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from test_edit_batch import no_loads
from test_fuzz import FUZZ
from test_lora import dit360_lora

from dit360.app import editing, generate, outputs, panorama, text
from dit360.app.cli import JOBS
from dit360.app.editing import EditJob
from dit360.app.generate import Job
from dit360.app.options import EditOptions, SampleOptions, flag
from dit360.core import editing as core
from dit360.core.grid import Grid
from dit360.load import convert, image, lora_formats, weights

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
API = README[README.index("## Python API") : README.index("## Hardware")]
BASE = dict(lora="none", steps=2, device="cpu", dtype="fp32")  # what both options take
TINY = dict(BASE, height=32, width=64)
# What a user may pass for any field: each of a wrong type, or out of every range we take.
HOSTILE = [
    None, True, 0, -1, 2**70, 2.5, math.nan, math.inf, -math.inf, "2", "", b"x", ["a"], (),
    {"a": 1}, torch.tensor(1.0), np.float32(1.0), Path("x"), torch.float64, "float32",
]  # fmt: skip


def refused(e: BaseException, *names: str) -> None:
    """`e` is a TypeError or ValueError (no subclass: not torch's, not a KeyError) on one line,
    naming one of `names`."""
    assert type(e) in (TypeError, ValueError), f"{type(e).__name__}: {e}"
    assert len(str(e).splitlines()) == 1 and any(n in str(e) for n in names), str(e)


def settled(value: object, kind: object) -> bool:
    """Whether an accepted field `value` is of what its annotation `kind` says, restated: no bool
    for a number, floats finite, text as str (a path taken as its text), tuples of those."""
    arms = getattr(kind, "__args__", (kind,))
    items = [a.__args__[0] for a in arms if getattr(a, "__origin__", None) is tuple]
    if isinstance(value, tuple):
        return bool(items) and all(settled(v, items[0]) for v in value)
    if isinstance(value, float):
        return float in arms and math.isfinite(value)
    if type(value) in (int, bool, str, type(None)):
        return type(value) in arms or type(value) is int and float in arms
    return any(isinstance(value, a) for a in arms if isinstance(a, type))  # a dtype, a device


@FUZZ
@given(
    cls=st.sampled_from([SampleOptions, EditOptions]),
    data=st.data(),
    value=st.sampled_from(HOSTILE),
)
def test_options_fields_typed_or_refused(cls, data, value):
    """Any value in any field: options whose every field is of its annotated type (a bool step,
    "no" for a switch, 1.0 pad columns were taken, to fail deep or mean another thing), or
    TypeError or ValueError naming the field (a TypeError from abs() or len() named none)."""
    field = data.draw(st.sampled_from(fields(cls)))
    try:
        with warnings.catch_warnings():  # the size's, the negative prompt's
            warnings.simplefilter("ignore")
            o = cls(**{**(TINY if cls is SampleOptions else BASE), field.name: value})
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions escape
        return refused(e, flag(field.name, api=False))  # the name as it says it
    for f in fields(o):
        assert settled(getattr(o, f.name), f.type), (f.name, getattr(o, f.name))
    json.dumps({f.name: getattr(o, f.name) for f in fields(o) if f.name not in ("dtype", "device")})


def photo() -> Image.Image:
    """A small random RGB picture."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 64, 3), np.uint8))


def half_mask() -> Image.Image:
    """The left half kept (white)."""
    m = np.zeros((32, 64), np.uint8)
    m[:, :32] = 255
    return Image.fromarray(m)


def opts(kind=SampleOptions, base=None):
    """Tiny options of `kind` (building them reads no model)."""
    with warnings.catch_warnings():  # the size's
        warnings.simplefilter("ignore")
        return kind(base=base, **(TINY if kind is SampleOptions else BASE))


OUT = Path("o.png")
CALLS = {  # a call, and what its error must name
    "prompt list": (lambda b: generate.generate(["a", "b"], opts(base=b)), "prompt"),
    "prompt None": (lambda b: generate.generate(None, opts(base=b)), "prompt"),
    "prompt bytes": (lambda b: generate.generate(b"a", opts(base=b)), "prompt"),
    "edit options": (lambda b: generate.generate("a", opts(EditOptions, b)), "opts"),
    "options dict": (lambda b: generate.generate("a", {"steps": 2}), "opts"),
    "options None": (lambda b: editing.edit_image(photo(), half_mask(), "a", None), "opts"),
    "sample options": (
        lambda b: editing.edit_image(photo(), half_mask(), "a", opts(base=b)),
        "opts",
    ),
    "not jobs": (lambda b: next(generate.generate_many(["a"], opts(base=b))), "jobs"),
    "job not an edit": (
        lambda b: next(editing.edit_many([Job("a", 1, OUT)], opts(EditOptions, b))),
        "jobs",
    ),
    "job seed text": (lambda b: Job("a", "1", OUT), "seed"),
    "job seed bool": (lambda b: Job("a", True, OUT), "seed"),
    "tensor image": (
        lambda b: editing.edit_image(torch.rand(3, 32, 64), half_mask(), "a", opts(EditOptions, b)),
        "image",
    ),
    "array mask": (
        lambda b: editing.edit_image(photo(), np.ones((32, 64)), "a", opts(EditOptions, b)),
        "mask",
    ),
    "invert text": (
        lambda b: EditJob("a", 1, OUT, image=photo(), mask=half_mask(), invert="yes"),
        "invert",
    ),
    "size past PIL's": (
        lambda b: next(
            editing.edit_many(
                [EditJob("a", 1, OUT, image=photo(), mask=half_mask(), size=(152_000,) * 2)],
                opts(EditOptions, b),
            )
        ),
        "cannot resize",
    ),
    "too many jobs": (
        lambda b: next(
            generate.generate_many(itertools.repeat(Job("a", 1, OUT), JOBS + 1), opts(base=b))
        ),
        f"{JOBS:,}",
    ),
}


@pytest.mark.parametrize("name", CALLS)
def test_api_calls_refused_before_loading(name, tiny_flux, monkeypatch):
    """Each hostile call: a TypeError or ValueError naming the argument, before any model loads
    (an AttributeError, a TypeError from len(), a model loaded with EditOptions as
    SampleOptions, before)."""
    no_loads(monkeypatch)
    call, named = CALLS[name]
    with pytest.raises(Exception) as e:  # noqa: PT011 - `refused` says which
        call(str(tiny_flux))
    refused(e.value, named)


def test_a_generator_of_jobs_runs_every_job(tiny_flux, monkeypatch):
    """A generator of jobs is checked and run whole (it was used up by the checks, then len()
    failed on it)."""
    ran = []
    monkeypatch.setattr(generate, "run_jobs", lambda jobs, *a, **k: iter(ran.append(jobs) or []))
    jobs = (Job(p, s, Path(f"{s}.png")) for p, s in [("a", 1), ("b", 2)])
    assert list(generate.generate_many(jobs, opts(base=str(tiny_flux)))) == []
    assert [j.prompt for j in ran[0]] == ["a", "b"]


SIZES = [(0, 32), (-1, 32), (64.5, 32), (9500, 9500), (90_000_000, 1)]


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("read", [image.read_rgb, image.read_mask], ids=["rgb", "mask"])
def test_reads_at_a_size_past_any_bound_refused(read, size):
    """read_rgb / read_mask to a size of no whole numbers or past PIL's pixel limit: ValueError
    naming the size, before a pixel is allocated (9500 x 9500 was made: 270 MB)."""
    with pytest.raises(ValueError, match="cannot resize to .*PIL's limit") as e:
        read(photo(), *size)
    refused(e.value, "pixels")


TENSORS = {  # calls given a tensor or an array for an image
    "save_panorama": lambda p: image.save_panorama(torch.rand(3, 32, 64), p / "a.png"),
    "read_rgb": lambda p: image.read_rgb(np.zeros((32, 64, 3), np.uint8), 64, 32),
    "seam_report": lambda p: outputs.seam_report(torch.rand(3, 32, 64)),
    "project_photo": lambda p: panorama.project_photo(torch.rand(3, 8, 8), 90, 0, 0, 0, 32),
}


@pytest.mark.parametrize("name", TENSORS)
def test_a_tensor_for_an_image_refused(name, tmp_path):
    """A tensor or array where a PIL image goes: one TypeError saying to give a PIL image (deep
    TypeErrors and AttributeErrors before), nothing written."""
    with pytest.raises(TypeError) as e:
        TENSORS[name](tmp_path)
    refused(e.value, "give a PIL image")
    assert list(tmp_path.iterdir()) == []


def test_save_panorama_jpeg_of_any_mode(tmp_path):
    """An RGBA or palette image saved as JPEG is written as RGB (PIL's OSError before)."""
    for mode in ("RGBA", "P", "LA"):
        path = image.save_panorama(photo().convert(mode), tmp_path / f"{mode}.jpg")
        with Image.open(path) as f:
            assert f.mode in ("RGB", "L") and f.size == (64, 32)


def test_save_panorama_text_is_text(tmp_path):
    """`text` entries that are not strings: TypeError naming `text`, nothing written (an
    AttributeError from PIL's PNG writer before)."""
    for entries in ({"a": 3}, {3: "a"}, {"parameters": None}):
        for name in ("a.png", "a.jpg"):
            with pytest.raises(TypeError, match="text must be"):
                image.save_panorama(photo(), tmp_path / name, entries)
    assert not any(tmp_path.iterdir())


VIEWS = [  # project_photo's fov, yaw, pitch, roll, height; what the error names
    ((0, 0, 0, 0, 32), "--fov"), ((math.nan, 0, 0, 0, 32), "--fov"),
    ((90, math.inf, 0, 0, 32), "--yaw"), ((90, 0, 91, 0, 32), "--pitch"),
    ((90, 0, 0, -181, 32), "--roll"), ((90, 0, 0, 0, 0), "--height"),
    ((90, 0, 0, 0, -5), "--height"), ((90, 0, 0, 0, 33), "--height"),
    ((90, 0, 0, 0, 10**5), "--height"), (("90", 0, 0, 0, 32), "--fov"),
]  # fmt: skip


@pytest.mark.parametrize(("view", "named"), VIEWS, ids=str)
def test_project_photo_view_and_height_bounded(view, named):
    """A view out of edit.py's ranges or a height it refuses: ValueError naming it, before the
    canvas is allocated (10^5: a 2 x 10^10 pixel canvas; 0: ZeroDivisionError; NaN: an error
    naming no angle)."""
    with pytest.raises(ValueError) as e:
        panorama.project_photo(photo(), *view)
    refused(e.value, named)


@pytest.mark.parametrize(
    ("size", "image_size"),
    [(0, (64, 32)), (-1, (64, 32)), (2.5, (64, 32)), (10**5, (64, 32)), (8, (50, 32))],
    ids=str,
)
def test_write_cubemap_refuses_what_it_cannot_make(size, image_size, tmp_path):
    """A face size of 0 (the default, in silence), below 0 (torch's error), not whole or past
    8192 (6 faces allocated), or a non-2:1 image (its faces wrong): ValueError, nothing written;
    a str path works."""
    with pytest.raises(ValueError) as e:
        outputs.write_cubemap(photo().resize(image_size), str(tmp_path / "c.png"), size)
    refused(e.value, "--cubemap-size", "2:1")
    assert list(tmp_path.iterdir()) == []
    assert len(outputs.write_cubemap(photo(), str(tmp_path / "c.png"), 4)) == 7


def test_write_viewer_replaces_no_image(tmp_path):
    """write_viewer(image, out) with an out not .html (the image itself, another picture): refused,
    the file unchanged (the page replaced the panorama)."""
    pano = image.save_panorama(photo(), tmp_path / "pano.png")
    before = pano.read_bytes()
    for out in (pano, tmp_path / "other.jpg", tmp_path):
        with pytest.raises(ValueError) as e:
            outputs.write_viewer(pano, out)
        refused(e.value, "use a .html file name")
    assert pano.read_bytes() == before and sorted(tmp_path.iterdir()) == [pano]


@pytest.mark.parametrize(
    ("gray", "c"),
    [(torch.zeros(8, 16, dtype=torch.uint8), 0.1), (torch.zeros(8, 16), 0.0),
     (torch.rand(8, 16), -0.5), (torch.rand(16), 0.1)],
    ids=["uint8", "c 0", "c negative", "1-D"],
)  # fmt: skip
def test_discontinuity_score_refuses_what_has_no_score(gray, c):
    """Integer pixels (torch's overflow error), c <= 0 (NaN or a negative score), one axis (an
    unpacking error): ValueError naming what it needs."""
    with pytest.raises(ValueError) as e:
        panorama.discontinuity_score(gray, c=c)
    refused(e.value, "float grey images")


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A DiT360-format LoRA of the tiny transformer."""
    return dit360_lora(tmp_path_factory.mktemp("lora") / "lora")[0]


@pytest.mark.parametrize("scale", [math.nan, math.inf, "1", None], ids=str)
def test_lora_scale_finite(tiny_flux, lora, scale):
    """load_lora (merged or not) and set_scale at a scale that is not a finite number: ValueError,
    the weights unchanged (NaN weights, or a str kept as the multiplier, before)."""
    model = weights.load_flux(tiny_flux, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (True, False):
        with pytest.raises(ValueError) as e:
            lora_formats.load_lora(model, lora, scale=scale, merge=merge)
        refused(e.value, "scale must be a finite number")
        assert lora_formats.lora_names(model) == set()  # nothing half attached
    lora_formats.load_lora(model, lora, scale=0.5)
    with pytest.raises(ValueError, match="finite"):
        lora_formats.set_scale(model, scale)
    with pytest.raises(ValueError, match="no LoRA named 'nope'"):  # it changed nothing, silently
        lora_formats.set_scale(model, 2.0, "nope")
    state = {k: v for k, v in model.state_dict().items() if k in before}
    assert all(torch.equal(before[k], v) for k, v in state.items())


@pytest.mark.parametrize("dtype", ["bf16", torch.int8], ids=str)
@pytest.mark.parametrize("load", [weights.load_flux, text.load_text_encoders], ids=["flux", "text"])
def test_loaders_dtype_named(tiny_flux, load, dtype):
    """dtype "bf16" (a string) or an integer dtype: TypeError naming dtype, before a tensor is read
    (torch's "Invalid device string: 'bf16'"; text encoders cast to int8, in silence)."""
    with pytest.raises(TypeError) as e:
        load(tiny_flux, dtype=dtype)
    refused(e.value, "dtype must be a float torch.dtype")


def test_conversions_never_write_over_an_input(tiny_flux, lora, tmp_path):
    """convert_flux / convert_lora with out an input, inside one or holding one, or an integer
    dtype: ValueError, the inputs byte for byte as they were, nothing written (the transformer
    folder, the LoRA folder were replaced by their conversion)."""
    base = shutil.copytree(tiny_flux / "transformer", tmp_path / "transformer")
    lora = shutil.copytree(lora, tmp_path / "lora")
    files = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    calls = [
        lambda: convert.convert_flux(base, base, to="diffusers"),
        lambda: convert.convert_flux(base, base / "x.safetensors"),
        lambda: convert.convert_flux(base, tmp_path, to="diffusers"),
        lambda: convert.convert_flux(base, lora / "m.safetensors", lora=(str(lora),)),
        lambda: convert.convert_flux(base, tmp_path / "i.safetensors", dtype=torch.int8),
        lambda: convert.convert_lora(lora, lora, base=base),
        lambda: convert.convert_lora(lora, lora / "sub", base=base),
    ]
    for call in calls:
        with pytest.raises((TypeError, ValueError)) as e:
            call()
        refused(e.value, "--out", "dtype")
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == files


def test_core_shapes_never_broadcast():
    """paste_back with a mask or source of another shape, edit / edit_planned with a keep that is
    not one bool per token, a Grid padded wider than it is: ValueError (a (1, W) mask was
    broadcast over every row; a keep of length 1 swapped the last token only; a pad of 5 on 4
    columns copied 5 + 4, `tokens` counted 10, the schedule shifted for them), before the model is
    called."""
    for pad in (-1, 5):
        with pytest.raises(ValueError, match="pad must be 0 to w"):
            Grid(2, 4, pad)
    edited, keep = torch.rand(3, 32, 64), torch.ones(32, 64, dtype=torch.bool)
    for args in [
        (edited, edited, keep[:1]),
        (edited, edited[:, :16], keep),
        (edited, edited, keep.T),
    ]:
        with pytest.raises(ValueError, match="paste_back needs"):
            core.paste_back(*args, 2)
    grid, z = Grid(2, 4), torch.rand(1, 12, 64)
    p = core.RFInversion(1, 1, 0, 1, 0.5, 0.5, 0.0, 0.0)
    for bad in (
        torch.ones(1, dtype=torch.bool),
        torch.ones(12),
        torch.ones(2, 6, dtype=torch.bool),
    ):
        for fn in (core.edit, core.edit_planned):
            with pytest.raises(ValueError, match=r"keep must be bool \(12,\)"):
                fn(None, z, z, z, bad, grid, None, torch.linspace(1, 0, 3), p)


def test_readme_snippet_runs(tiny_flux, tmp_path, monkeypatch, capsys):
    """The README's Python API snippet, on the tiny model (its SampleOptions given the tiny folder
    as base, a small size and no LoRA): it writes canyon.png, a 2:1 panorama with 360 metadata,
    and prints the report and the seam score."""
    code = re.search(r"```python\n(.*?)```", API, re.S)[1]
    assert code.count("SampleOptions(seed") == 1
    tiny = f"SampleOptions(base={str(tiny_flux)!r}, **{TINY!r}, "
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="trained at 1024x2048"):
        exec(code.replace("SampleOptions(seed", tiny + "seed"), {})  # noqa: S102
    with Image.open(tmp_path / "canyon.png") as f:
        assert f.size == (64, 32) and "GPano" in f.info.get("XML:com.adobe.xmp", "")
    assert re.search(r"peak .*seam score \d", capsys.readouterr().out)


def test_a_nan_image_is_never_made(tiny_flux, monkeypatch):
    """A decode that gives NaN (the VAE overflowing in fp16): FloatingPointError, no image (to_pil
    clamped NaN to black, and generate returned that in silence)."""
    with pytest.raises(FloatingPointError, match="NaN"):
        image.to_pil(torch.full((3, 4, 8), math.nan))
    nan = lambda vae, latents, **k: torch.full((1, 3, 32, 64), math.nan)  # noqa: E731
    monkeypatch.setattr(generate, "decode", nan)
    with pytest.raises(FloatingPointError, match="fp16 overflows in the VAE"):
        generate.generate("a", opts(base=str(tiny_flux)), log=lambda _: None)
