"""The Python API checks its inputs before anything loads, as the CLI does, and its warnings name
the caller's line (not a line inside dit360); a batch warns its size once."""

import json
import warnings

import pytest
from PIL import Image
from test_edit_batch import flags, no_loads
from test_editing import PROMPT, write_inputs

import edit
from dit360.app import editing, generate
from dit360.app.editing import EditJob
from dit360.app.options import EditOptions, SampleOptions


def recorded() -> warnings.catch_warnings:
    """Every warning raised inside, recorded (none filtered away as already shown)."""
    w = warnings.catch_warnings(record=True)
    warnings.simplefilter("always")
    return w


def test_generate_checks_before_loading(tiny_flux, tmp_path, monkeypatch):
    """A missing --base or a too-long prompt is the CLI's error, raised before any model loads."""
    no_loads(monkeypatch)
    opts = SampleOptions(base=str(tmp_path / "nope"), lora="none", height=32, width=64)
    with pytest.raises((ValueError, OSError), match="--base: .*nope: no such file"):
        generate.generate(PROMPT, opts)
    opts = SampleOptions(base=str(tiny_flux), lora="none", height=32, width=64)
    with pytest.raises(ValueError, match=r"--prompt \(prompt\) is 30,000 characters"):
        generate.generate("a" * 30_000, opts)


def test_edit_image_checks_before_loading(tiny_flux, tmp_path, monkeypatch):
    """edit_image with a too-long prompt: the error before any model loads."""
    no_loads(monkeypatch)
    src, mask = write_inputs(tmp_path)
    opts = EditOptions(base=str(tiny_flux), lora="none", device="cpu")
    with pytest.raises(ValueError, match=r"--prompt \(prompt\) is 30,000 characters"):
        editing.edit_image(Image.open(src), Image.open(mask), "a" * 30_000, opts)


def test_a_bad_value_is_cut_in_its_line():
    """A 20,001-character --source-prompt: its error line shows 200 characters of it (it showed
    all 20,001)."""
    with pytest.raises(ValueError, match=r"^--source-prompt \(source_prompt\) must be") as e:
        EditOptions(source_prompt="a" * 20_001)
    assert len(str(e.value)) < 400 and str(e.value).endswith("aaa..."), len(str(e.value))


def test_edit_checks_each_source_once(tiny_flux, tmp_path, monkeypatch):
    """edit.py, one edit or a batch of one, checks the source and mask once before loading (it
    checked them twice: itself, then in edit_image or edit_many); edit_image alone checks them."""
    no_loads(monkeypatch)
    checks, check = [], editing.check_job
    for module in (editing, edit):
        monkeypatch.setattr(module, "check_job", lambda *a: checks.append(1) or check(*a))
    src, mask = write_inputs(tmp_path)
    rows = tmp_path / "edits.jsonl"
    rows.write_text(json.dumps({"image": "src.png", "mask": "mask.png", "prompt": PROMPT}))
    one = [
        "--image",
        str(src),
        "--mask",
        str(mask),
        "--prompt",
        PROMPT,
        "--out",
        str(tmp_path / "o.png"),
    ]
    for argv in (one, ["--edits", str(rows), "--out-dir", str(tmp_path / "out")]):
        checks.clear()
        with pytest.raises(AssertionError, match="a model was loaded"):
            edit.main([*flags(tiny_flux), *argv])
        assert checks == [1], argv
    Image.new("L", (128, 64), 255).save(white := tmp_path / "white.png")
    opts = EditOptions(base=str(tiny_flux), lora="none", device="cpu")
    with pytest.raises(ValueError, match="the mask keeps everything"):
        editing.edit_image(Image.open(src), Image.open(white), PROMPT, opts)


def test_warnings_name_the_callers_line(tiny_flux, tmp_path, monkeypatch):
    """The size warning of edit_image and the options' negative-prompt warning point at this file
    (they pointed inside dit360, or at a dataclass's generated __init__)."""
    no_loads(monkeypatch)
    src, mask = write_inputs(tmp_path)
    opts = EditOptions(base=str(tiny_flux), lora="none", device="cpu")
    with recorded() as warned, pytest.raises(AssertionError, match="a model was loaded"):
        editing.edit_image(Image.open(src), Image.open(mask), PROMPT, opts)
    with recorded() as more:
        SampleOptions(negative_prompt="blurry", device="cpu")
    found = [
        (str(w.message)[:20], w.filename) for w in [*warned, *more] if w.category is UserWarning
    ]
    assert len(found) == 2 and all(f == __file__ for _, f in found), found


def test_a_batch_warns_its_size_once(tiny_flux, tmp_path, monkeypatch):
    """Two edits at 32x64: the size's warning once, not once a row."""
    no_loads(monkeypatch)
    src, mask = write_inputs(tmp_path)
    jobs = [EditJob(PROMPT, 5, tmp_path / f"{i}.png", image=src, mask=mask) for i in range(2)]
    opts = EditOptions(base=str(tiny_flux), lora="none", device="cpu")
    with recorded() as warned, pytest.raises(AssertionError, match="a model was loaded"):
        next(editing.edit_many(jobs, opts))
    sizes = [w for w in warned if "trained at 1024x2048" in str(w.message)]
    assert len(sizes) == 1, [str(w.message) for w in warned]
