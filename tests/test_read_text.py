"""The user's text files (jsonl rows, prompt lists, captions): UTF-8, or an error naming it."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from dit360.app import batch
from dit360.train import data, previews
from prepare import prepare

LATIN1 = "caf\xe9".encode("latin-1")  # a file saved in Latin-1: byte 0xe9 is not UTF-8


def readers(tmp_path):
    """(file name, read): each reader of the user's text files."""
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "p.png")
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / "photos" / "a.png")
    keys = {"prompt": str}
    return [
        ("prompts.txt", lambda f: batch.read_rows(f, "--prompts", keys, ("prompt",), text=True)),
        ("prompts.jsonl", lambda f: batch.read_rows(f, "--prompts", keys, ("prompt",))),
        ("pano.jsonl", lambda f: data.read_rows(pano=f)),
        ("persp.jsonl", lambda f: data.read_rows(persp=f)),
        ("previews.txt", previews.read_prompts),
        ("photos/a.txt", lambda f: prepare(tmp_path / "out", persp=f.parent, height=32)),
    ]


def content(name: str, text: bytes) -> bytes:
    """A valid file for the reader of `name`, with `text` as its prompt or caption."""
    if not name.endswith(".jsonl"):
        return text + b"\n"
    row = {"image": "p.png", "caption": "@", "mask": "p.png"}
    row = {"prompt": "@"} if name.startswith("prompts") else row
    return json.dumps(row).encode().replace(b"@", text) + b"\n"


def test_non_utf8_text_names_the_file_and_byte(tmp_path):
    """Each reader refuses a Latin-1 file naming it, the first bad byte, and the fix."""
    for name, read in readers(tmp_path):
        path = tmp_path / name
        path.write_bytes(content(name, LATIN1))
        at = path.read_bytes().index(b"\xe9")
        with pytest.raises(
            ValueError, match=re.escape(f"{path}: not UTF-8 text (byte {at}): save it as UTF-8")
        ):
            read(path)


def test_utf8_with_byte_order_mark_reads(tmp_path):
    """A UTF-8 file that starts with a byte order mark (Windows Notepad) reads as without one."""
    for name, read in readers(tmp_path):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + content(name, "caf\xe9".encode()))
        read(path)
    assert previews.read_prompts(tmp_path / "previews.txt") == ["caf\xe9"]
    rows = batch.read_rows(tmp_path / "prompts.txt", "--prompts", {"prompt": str}, (), text=True)
    assert rows == [(1, {"prompt": "caf\xe9"})]


def test_preview_prompts_read_as_sample_prompts(tmp_path):
    """train.py --sample-prompts reads a prompt list as sample.py --prompts does: blank lines and
    `#` comments skipped (a comment was rendered as a preview before)."""
    path = tmp_path / "prompts.txt"
    path.write_text("# mine\nThis is a panorama. A harbour.\n\n  # later\nA desert.\n")
    rows = batch.read_rows(path, "--prompts", {"prompt": str}, ("prompt",), text=True)
    assert previews.read_prompts(path) == [row["prompt"] for _, row in rows]
    assert len(rows) == 2
