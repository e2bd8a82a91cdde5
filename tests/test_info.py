"""Every image records how it was made (A1111's `parameters` text and our JSON, in PNG and JPEG),
`python -m dit360.app.info` prints the command that makes it again (the same pixels), batches skip
only outputs recorded with the job's settings, and --captions feeds prepare.py."""

import hashlib
import json
import shlex

import numpy as np
import pytest
from clitest import expect_error
from PIL import Image
from test_batch import counted, flags, pixels
from test_edit_batch import LOADERS, sources
from test_edit_batch import flags as edit_flags
from test_sample_cli import PROMPT

import edit
import prepare
import sample
from dit360.app import info, text


def remade(capsys, path, out) -> list[str]:
    """The command `python -m dit360.app.info path --out out` prints (its last line)."""
    capsys.readouterr()
    info.main([str(path), "--out", str(out)])
    return shlex.split(capsys.readouterr().out.strip().splitlines()[-1])


def user_comment(path) -> str:
    """A JPEG's EXIF UserComment, decoded as A1111 (piexif) reads a UNICODE one."""
    raw = Image.open(path).getexif().get_ifd(0x8769)[0x9286]
    assert raw[:8] == b"UNICODE\0"
    return raw[8:].decode("utf-16-be")


def test_png_and_jpeg_record_and_remake(tiny_flux, tmp_path, capsys):
    """A sample.py image (with true CFG and a LoRA) records its settings in the web UIs' key and
    in our JSON, beside its GPano XMP; the info command, run, gives the same pixels."""
    from test_lora import dit360_lora

    lora = dit360_lora(tmp_path / "lora", r=4, alpha=4)[0]
    [file] = lora.glob("*.safetensors")
    extra = ["--negative-prompt", "blurry", "--true-cfg", "2", "--lora-scale", "0.5"]
    given = [str(lora) if a == "none" else a for a in flags(tiny_flux, *extra)]  # --lora LORA
    for name in ("a.png", "a.jpg"):
        out = tmp_path / name
        sample.main([*given, "--prompt", PROMPT, "--out", str(out)])
        with Image.open(out) as f:
            params = f.info["parameters"] if name.endswith("png") else user_comment(out)
            assert (
                b"GPano:ProjectionType" in f.info.get("xmp", b"") or "XML:com.adobe.xmp" in f.info
            )
        sha = hashlib.sha256(file.read_bytes()).hexdigest()[:12]
        lines = params.splitlines()
        assert lines[:2] == [PROMPT, "Negative prompt: blurry"], params
        for part in ("Steps: 2", "Seed: 4", "CFG scale: 2.0", "Size: 64x32", f": {sha}"):
            assert part in lines[2], (part, params)
        rec = info.read_record(out)
        assert rec["flags"]["prompt"] == PROMPT and rec["flags"]["negative_prompt"] == "blurry"
        assert rec["loras"] == [[str(lora), 0.5, sha]] and rec["flags"]["base"] == str(tiny_flux)
        cmd = remade(capsys, out, tmp_path / f"again-{name}")
        assert cmd[:2] == ["python", "sample.py"]
        sample.main(cmd[2:])
        assert np.array_equal(pixels(out), pixels(tmp_path / f"again-{name}"))
        assert info.read_record(tmp_path / f"again-{name}")["flags"] == rec["flags"]


@pytest.mark.parametrize("source", ["image", "photo"])
def test_edit_records_and_remakes(tiny_flux, tmp_path, capsys, source):
    """An edit records its source and mask (or photo and view) and its edit settings; its command
    gives the same pixels."""
    folder = sources(tmp_path)
    if source == "photo":
        rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / "photo.png")
        argv = ["--photo", str(tmp_path / "photo.png"), "--fov", "150", "--yaw", "10"]
    else:
        argv = ["--image", str(folder / "a/src.png"), "--mask", str(folder / "a/mask.png")]
        argv += ["--invert"]
    out = tmp_path / "edited.png"
    argv += ["--prompt", PROMPT, "--tau", "0.3", "--out", str(out)]
    edit.main([*edit_flags(tiny_flux), *argv])
    rec = info.read_record(out)
    assert rec["flags"]["invert"] is (source == "image") and rec["flags"]["tau"] == 0.3
    assert rec["loras"] == []
    if source == "photo":
        assert rec["flags"]["photo"] == str(tmp_path / "photo.png") and rec["flags"]["fov"] == 150
    else:
        assert rec["flags"]["image"] == str(folder / "a/src.png")
        assert "Mask: " in Image.open(out).info["parameters"]
    cmd = remade(capsys, out, tmp_path / "again.png")
    assert cmd[:2] == ["python", "edit.py"]
    edit.main(cmd[2:])
    assert np.array_equal(pixels(out), pixels(tmp_path / "again.png"))


def test_difference_names_the_first_setting():
    """The first differing setting, in the job's order, then those only the old record has."""
    new = {"flags": {"prompt": "a", "steps": 2}, "loras": []}
    assert info.difference(new, new) is None
    assert info.difference(None, new) == "it records no settings"
    old = {"flags": {"prompt": "b", "steps": 3}, "loras": []}
    assert info.difference(old, new) == "--prompt is 'b' there, 'a' now"
    old = {"flags": {**new["flags"], "resize": True}, "loras": []}
    assert info.difference(old, new) == "--resize is True there, None now"
    assert "LoRAs" in info.difference({**new, "loras": [["x", 1.0, "abc"]]}, new)


def test_batch_skips_only_the_same_settings(tiny_flux, tmp_path, capsys, monkeypatch):
    """A new prompt into the folder of an earlier batch: one error naming the file and the
    setting, exit 2, nothing written; the same job again: skipped, nothing loaded; --overwrite
    remakes them with the new settings."""
    folder = tmp_path / "out"
    old = [*flags(tiny_flux), "--prompt", PROMPT, "--num-images", "2", "--out-dir", str(folder)]
    sample.main(old)
    new = [*flags(tiny_flux), "--prompt", "a new prompt", "--num-images", "2"]
    new += ["--out-dir", str(folder)]
    expect_error(capsys, sample.main, new, tmp_path, r"0000-seed4\.png exists.*--prompt")
    steps = [*old, "--steps", "3"]
    expect_error(capsys, sample.main, steps, tmp_path, r"0000-seed4\.png.*--steps is 2 there")
    loads = [counted(monkeypatch, m, n) for m, n in [(text, "load_text_encoders")]]
    capsys.readouterr()
    sample.main(old)
    assert "0 images written, 2 skipped" in capsys.readouterr().out and loads == [[]]
    sample.main([*new, "--overwrite"])
    assert "2 images written" in capsys.readouterr().out
    assert info.read_record(folder / "0000-seed5.png")["flags"]["prompt"] == "a new prompt"


def test_edit_batch_refuses_stale(tiny_flux, tmp_path, capsys, monkeypatch):
    """An --edits batch whose output records another prompt stops before loading anything."""
    sources(tmp_path)
    rows = tmp_path / "edits.jsonl"
    row = {"image": "a/src.png", "mask": "a/mask.png", "prompt": PROMPT}
    rows.write_text(json.dumps(row) + "\n")
    argv = [*edit_flags(tiny_flux), "--edits", str(rows), "--out-dir", str(tmp_path / "e")]
    edit.main(argv)
    rows.write_text(json.dumps({**row, "prompt": "another"}) + "\n")
    for module, name in LOADERS:
        monkeypatch.setattr(module, name, lambda *a, **k: 1 / 0)
    expect_error(capsys, edit.main, argv, tmp_path, r"0000-seed5\.png exists.*--prompt")


def test_captions_feed_prepare(tiny_flux, tmp_path, capsys):
    """sample.py --captions writes NAME.txt (the prompt) beside each image; prepare.py --pano
    takes the folder as it is; a rerun that lost a caption writes it again."""
    folder = tmp_path / "out"
    sample.main([*flags(tiny_flux), "--prompt", PROMPT, "--num-images", "2", "--captions",
                 "--out-dir", str(folder)])  # fmt: skip
    assert (folder / "0000-seed5.txt").read_text() == PROMPT + "\n"
    (folder / "0000-seed4.txt").unlink()
    sample.main([*flags(tiny_flux), "--prompt", PROMPT, "--num-images", "2", "--captions",
                 "--out-dir", str(folder)])  # fmt: skip
    assert (folder / "0000-seed4.txt").read_text() == PROMPT + "\n"
    prepare.main(["--out", str(tmp_path / "data"), "--pano", str(folder)])
    assert len((tmp_path / "data" / "pano.jsonl").read_text().splitlines()) == 2


def test_lora_hash_once_a_run(tmp_path, monkeypatch):
    """A LoRA file is hashed once however many images record it, and again once it changes."""
    path, want = tmp_path / "x.safetensors", hashlib.sha256(b"abc").hexdigest()[:12]
    path.write_bytes(b"abc")
    calls = counted(monkeypatch, hashlib, "sha256")
    assert info.file_hash(path) == info.file_hash(path) == want and len(calls) == 1
    path.write_bytes(b"abcd")
    assert info.file_hash(path) != want and len(calls) == 2
