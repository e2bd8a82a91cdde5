"""prepare.py --hf-dataset: a dataset in the Hub's parquet layout (in a Hugging Face cache or a
local folder) read into panoramas, captions and pano.jsonl; resumable, offline, bad input."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from clitest import expect_error
from PIL import Image

import prepare
from dit360.load import hub_data
from dit360.train.data import read_rows

REPO = "someone/panos"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def encoded(seed: int, size: tuple[int, int] = (64, 32), fmt: str = "PNG") -> bytes:
    """A smooth random RGB image (w, h), encoded."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(size, Image.BILINEAR).save(buf, format=fmt)
    return buf.getvalue()


def write_dataset(
    root: Path,
    images: list[bytes],
    folder: str = "data",
    split: str = "train",
    files: int = 2,
    group: int = 2,
    columns: tuple[str, str] = ("image", "caption"),
) -> list[str]:
    """The rows as `datasets` pushes them: `folder/split-0000k-of-0000n.parquet`, the image a
    struct {bytes, path}, row groups of `group` rows; returns the captions."""
    captions = [f"a panorama number {i}" for i in range(len(images))]
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    per = -(-len(images) // files)
    (root / folder).mkdir(parents=True, exist_ok=True)
    for k in range(files):
        sl = slice(k * per, (k + 1) * per)
        cells = [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images[sl], k * per)]
        table = pa.table({columns[0]: pa.array(cells, kind), columns[1]: captions[sl]})
        name = f"{split}-{k:05d}-of-{files:05d}.parquet"
        pq.write_table(table, root / folder / name, row_group_size=group)
    return captions


def hub_cache(tmp_path: Path, images: list[bytes]) -> tuple[Path, list[str]]:
    """A Hugging Face cache holding dataset REPO at COMMIT (refs/main), and its captions."""
    cache = tmp_path / "hf-cache"
    repo = cache / f"datasets--{REPO.replace('/', '--')}"
    captions = write_dataset(repo / "snapshots" / COMMIT, images)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache, captions


def pixels(data: bytes | Path) -> np.ndarray:
    """Decoded RGB pixels of encoded bytes or a file."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        return np.asarray(img.convert("RGB"))


def test_hub_cache_by_repo_id(tmp_path):
    """A repo id found offline in HF_HUB_CACHE: pano.jsonl lists every row in order, each image
    the row's pixels with its caption and an all-white mask, as prepare --pano writes them."""
    images = [encoded(i, fmt="JPEG" if i % 2 else "PNG") for i in range(5)]
    cache, captions = hub_cache(tmp_path, images)
    out = tmp_path / "data"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "prepare.py", "--out", str(out), "--hf-dataset", REPO]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = read_rows(pano=out / "pano.jsonl")["pano"]
    assert [r.caption for r in rows] == captions
    assert [r.image.parent for r in rows] == [out / "panoramas"] * 5
    assert [r.image.suffix for r in rows] == [".png", ".jpg"] * 2 + [".png"]
    for r, data in zip(rows, images, strict=True):
        assert r.image.read_bytes() == data  # the stored bytes, not re-encoded
        assert (pixels(r.mask) == 255).all()
    again = tmp_path / "again"  # the existing panorama path over the written folder
    prepare.main(["--out", str(again), "--pano", str(out / "panoramas")])
    theirs = read_rows(pano=again / "pano.jsonl")["pano"]
    assert [(r.image.resolve(), r.caption) for r in theirs] == [(r.image, r.caption) for r in rows]


def test_local_copy_with_configs_and_columns(tmp_path, capsys):
    """A local folder with two configs and other column names: refused naming the configs, then
    read with --hf-config and the column flags."""
    src = tmp_path / "copy"
    cols = ("img", "text")
    write_dataset(src, [encoded(i) for i in range(3)], "indoor", files=1, columns=cols)
    write_dataset(src, [encoded(9)], "outdoor", files=1, columns=cols)
    out, base = tmp_path / "data", ["--hf-dataset", str(src)]
    flags = ["--image-column", "img", "--caption-column", "text"]
    expect_error(capsys, prepare.main, ["--out", str(out), *base, *flags], tmp_path,
                 r"several configs \(indoor, outdoor\).*--hf-config")  # fmt: skip
    prepare.main(["--out", str(out), *base, *flags, "--hf-config", "outdoor"])
    [row] = read_rows(pano=out / "pano.jsonl")["pano"]
    assert (pixels(row.image) == pixels(encoded(9))).all()


def test_missing_column_names_the_columns(tmp_path, capsys):
    """A column that is not there: one line naming the flag and the columns there are, exit 2,
    nothing written."""
    src = tmp_path / "copy"
    write_dataset(src, [encoded(0)], files=1, columns=("image", "text"))
    argv = ["--out", str(tmp_path / "data"), "--hf-dataset", str(src)]
    line = r"--caption-column caption: no such column .*its columns: image, text$"
    expect_error(capsys, prepare.main, argv, tmp_path, line)
    expect_error(capsys, prepare.main, [*argv, "--hf-split", "test"], tmp_path,
                 r"no parquet files of split 'test'.*splits there: train")  # fmt: skip


def test_uncached_offline_says_how_to_download(tmp_path, capsys, monkeypatch):
    """Offline with the dataset not cached: one line naming the download command and the env var."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    argv = ["--out", str(tmp_path / "data"), "--hf-dataset", "someone/absent"]
    expect_error(capsys, prepare.main, argv, tmp_path,
                 r"not in the Hugging Face cache .*hf download someone/absent --repo-type dataset"
                 r".*HF_HUB_OFFLINE")  # fmt: skip


def test_not_2_to_1_is_a_bad_row_as_for_pano(tmp_path, capsys):
    """A square image is listed as a bad row (exit 1, no pano.jsonl) like a --pano file, and
    skipped with --skip-bad."""
    src = tmp_path / "copy"
    captions = write_dataset(src, [encoded(0), encoded(1, (32, 32)), encoded(2)], files=1)
    out = tmp_path / "data"
    argv = ["--out", str(out), "--hf-dataset", str(src)]
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(argv)
    err = capsys.readouterr().err
    assert (
        exit_info.value.code == 1 and "1 bad rows" in err and "000001.png: not 2:1 (32x32)" in err
    )
    assert not (out / "pano.jsonl").exists()
    prepare.main([*argv, "--skip-bad"])
    assert [r.caption for r in read_rows(pano=out / "pano.jsonl")["pano"]] == captions[::2]


def test_resume_after_a_kill(tmp_path, monkeypatch):
    """Killed after 3 of 7 rows: the rerun writes only the other 4 (a row group of done rows is not
    read, the written files are not touched) and the result is the uninterrupted run's."""
    src = tmp_path / "copy"
    images = [encoded(i) for i in range(7)]
    captions = write_dataset(src, images, files=2, group=2)  # files of 4 + 3 rows, groups of 2
    out = tmp_path / "data"
    argv = ["--out", str(out), "--hf-dataset", str(src)]
    write, read = hub_data.write_row, hub_data.read_group
    written, groups = [], []

    def killed(folder, name, data, caption):
        if len(written) == 3:
            raise KeyboardInterrupt  # as Ctrl-C or a kill between two rows
        written.append(name)
        write(folder, name, data, caption)

    monkeypatch.setattr(hub_data, "write_row", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(argv)
    assert not (out / "pano.jsonl").exists()
    folder = out / "panoramas"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert sorted(before) == [f"00000{i}{s}" for i in range(3) for s in (".png", ".txt")]

    def spy_write(folder, name, data, caption):
        written.append(name)
        write(folder, name, data, caption)

    def spy_read(pf, group, columns):
        groups.append(group)
        return read(pf, group, columns)

    monkeypatch.setattr(hub_data, "write_row", spy_write)
    monkeypatch.setattr(hub_data, "read_group", spy_read)
    prepare.main(argv)
    assert written[3:] == ["000003", "000004", "000005", "000006"]
    assert groups == [1, 0, 1]  # file 1: group 0 (rows 0, 1) done, not read; file 2: both
    assert all(folder.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())
    rows = read_rows(pano=out / "pano.jsonl")["pano"]
    assert [r.caption for r in rows] == captions
    assert all((pixels(r.image) == pixels(d)).all() for r, d in zip(rows, images, strict=True))
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]
