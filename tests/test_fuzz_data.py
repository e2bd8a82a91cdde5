"""Fuzz what train.py and prepare.py read back of their own outputs, once a user, a full disk or
a cut-off copy changed them: the --cache-dir entries (cut, swapped, another run's, edited,
non-finite, a folder or a link) and prepare.py --hf-dataset's resumable folder and its parquet
input. An entry that is not its row's is never used: encoded again, or our one-line error naming
the file; nothing of the user's is removed."""

import json
import shutil
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from clitest import expect_error
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_data import write_image, write_jsonl
from test_fuzz import FUZZ, outcome
from test_hub_data import encoded, write_dataset

import prepare
from dit360.train.data import Source, build_cache, cache_path, load_sample, read_rows

H = 32


def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A posterior that names its image: every value the image's mean (flip and roll keep it)."""
    m = x.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1).expand(-1, 16, H // 8, H // 4)
    return m.clone(), m.abs() + 1


def encode_text(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text embeddings that name their caption."""
    v = float(sum(map(ord, captions[0])))
    return torch.full((1, 5, 32), v), torch.zeros(1, 5, 3), torch.full((1, 24), v)


def rewrite(path: Path, change) -> None:
    """The entry's tensors changed by change(dict), saved with its metadata."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    save_file(change(load_file(path)), path, metadata=meta)


def header_end(path: Path) -> int:
    """Where an entry's data starts."""
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


# how an entry goes wrong: (path, the other row's entry, the cache, n) -> what the run must do
def cut(p, other, cache, n):
    p.write_bytes(p.read_bytes()[: n % p.stat().st_size])


def flip_header_byte(p, other, cache, n):
    data = bytearray(p.read_bytes())
    data[n % header_end(p)] ^= 0x20
    p.write_bytes(bytes(data))


def swapped(p, other, cache, n):
    a, b = p.read_bytes(), other.read_bytes()
    p.write_bytes(b), other.write_bytes(a)


def as_half(p, other, cache, n):
    rewrite(p, lambda t: {k: v.half() for k, v in t.items()})


def key_dropped(p, other, cache, n):
    rewrite(p, lambda t: {k: v for i, (k, v) in enumerate(t.items()) if i != n % len(t)})


def key_added(p, other, cache, n):
    rewrite(p, lambda t: t | {"extra": torch.zeros(n % 7 + 1)})


def narrower(p, other, cache, n):
    rewrite(
        p,
        lambda t: {k: v[..., : 1 + n % 7].contiguous() if v.ndim == 3 else v for k, v in t.items()},
    )


def unmarked(p, other, cache, n):  # an entry of before the key was written in it
    save_file(load_file(p), p)


def huge_shape(p, other, cache, n):
    head = {"mean": {"dtype": "F32", "shape": [2**40, 2 ** (n % 30)], "data_offsets": [0, 4]}}
    blob = json.dumps(head).encode()
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 4)


def claims_huge_header(p, other, cache, n):
    p.write_bytes(struct.pack("<Q", 2**63 + n) + b"{}")


def link_to_users_file(p, other, cache, n):
    p.unlink()
    p.symlink_to(cache / "user.txt")


REENCODED = [cut, flip_header_byte, swapped, as_half, key_dropped, key_added, narrower, unmarked]
REENCODED += [huge_shape, claims_huge_header, link_to_users_file]


@pytest.fixture
def rows(tmp_path):
    """Two panorama rows with different images and captions."""
    write_image(tmp_path / "a.png", 2 * H, H, seed=0)
    write_image(tmp_path / "b.png", 2 * H, H, seed=1)
    jsonl = [{"image": "a.png", "caption": "one"}, {"image": "b.png", "caption": "two"}]
    return read_rows(write_jsonl(tmp_path / "pano.jsonl", jsonl))["pano"]


def loaded(rows, cache: Path, model: str = "m") -> list[dict]:
    """Each row's sample as training reads it (epoch 0: a flip and a roll drawn)."""
    source = Source(rows, [], H, cache_dir=cache, model_id=model)
    return [load_sample(source, "pano", i, 0) for i in range(len(rows))]


def fresh(rows, tmp_path: Path) -> list[dict]:
    """The samples of a cache encoded from nothing."""
    cache = tmp_path / "fresh"
    if not cache.exists():
        build_cache(rows, cache, H, "m", encode, encode_text)
    return loaded(rows, cache)


@given(st.sampled_from(REENCODED), st.integers(0, 2**16))
@FUZZ
def test_a_changed_cache_entry_is_encoded_again(rows, tmp_path, capfd, change, n):
    """Whatever happened to an entry, the next build encodes it again with one warning line
    naming it (or keeps it, if it still is its row's), and training reads its row's values."""
    cache = tmp_path / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    (cache / "user.txt").write_text("mine")
    build_cache(rows, cache, H, "m", encode, encode_text)
    path, other = (cache_path(r, cache, H, "m") for r in rows)
    change(path, other, cache, n)
    capfd.readouterr()
    outcome(lambda: build_cache(rows, cache, H, "m", encode, encode_text), str(path))
    warnings = capfd.readouterr().err.splitlines()
    assert len(warnings) <= 1 and all(
        w.startswith("warning: ") and "encoding" in w for w in warnings
    )
    for got, want in zip(loaded(rows, cache), fresh(rows, tmp_path), strict=True):
        assert all(torch.equal(got[k], want[k]) for k in ("mean", "std", "txt", "vec"))
    assert (cache / "user.txt").read_text() == "mine"


def test_stale_entries_are_one_warning(rows, tmp_path, capfd):
    """Every entry stale (written before entries held their key): one warning line for all."""
    cache = tmp_path / "cache"
    build_cache(rows, cache, H, "m", encode, encode_text)
    for path in (cache_path(r, cache, H, "m") for r in rows):
        save_file(load_file(path), path)  # its tensors, without the key
    capfd.readouterr()
    assert build_cache(rows, cache, H, "m", encode, encode_text) == len(rows) == 2
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith("warning: cache entry") and "and 1 more: encoding them again" in line
    assert build_cache(rows, cache, H, "m", encode, encode_text) == 0


def test_another_runs_entry_is_not_used(rows, tmp_path):
    """An entry of another height, model or caption copied to this run's name is encoded again."""
    cache = tmp_path / "cache"
    build_cache(rows, cache, H, "other model", encode, lambda c: encode_text(["other"]))
    for row in rows:
        path = cache_path(row, cache, H, "m")
        path.parent.mkdir(exist_ok=True)
        shutil.copy(cache_path(row, cache, H, "other model"), path)
    assert build_cache(rows, cache, H, "m", encode, encode_text) == 2
    for got, want in zip(loaded(rows, cache), fresh(rows, tmp_path), strict=True):
        assert torch.equal(got["vec"], want["vec"])


def test_non_finite_or_changed_entry_stops_training_naming_it(rows, tmp_path):
    """An entry made non-finite (its key kept), or changed after the build, is our OSError naming
    it when training reads it (train.py: one line, exit 1), never a NaN step."""
    cache = tmp_path / "cache"
    build_cache(rows, cache, H, "m", encode, encode_text)
    path = cache_path(rows[0], cache, H, "m")
    rewrite(path, lambda t: t | {"vec": torch.full_like(t["vec"], float("nan"))})
    with pytest.raises(OSError, match=rf"{path}.*non-finite.*delete it"):
        loaded(rows, cache)
    as_half(path, None, cache, 0)
    with pytest.raises(OSError, match=rf"{path}.*not made for pano.jsonl:1.*delete it"):
        loaded(rows, cache)


def test_a_folder_at_an_entry_is_one_error_and_kept(rows, tmp_path):
    """A folder (of the user's) where an entry goes: our OSError naming it; nothing in it goes."""
    cache = tmp_path / "cache"
    path = cache_path(rows[0], cache, H, "m")
    path.mkdir(parents=True)
    (path / "mine.safetensors").write_bytes(b"x")
    assert outcome(lambda: build_cache(rows, cache, H, "m", encode, encode_text), str(path)) is None
    assert (path / "mine.safetensors").read_bytes() == b"x"


# --- prepare.py --hf-dataset: the parquet files and the resumable folder -----------------------

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def table(path: Path, image=None, caption=None) -> None:
    """A one-row parquet file, image and caption arrays given or the Hub's."""
    image = image if image is not None else pa.array([{"bytes": encoded(0), "path": "a"}], IMAGE)
    pq.write_table(
        pa.table(
            {"image": image, "caption": caption if caption is not None else pa.array(["a room"])}
        ),
        path,
    )


BAD_PARQUET = {  # name -> (how the file is made, what the error line says)
    "text": (lambda p: p.write_text("not parquet"), "not a parquet file"),
    "empty": (lambda p: p.write_bytes(b""), "not a parquet file"),
    "cut": (lambda p: (table(p), p.write_bytes(p.read_bytes()[:-9])), "not a parquet file"),
    "caption bytes": (
        lambda p: table(p, caption=pa.array([b"a room"])),
        "binary in .*, not string",
    ),
    "caption int": (lambda p: table(p, caption=pa.array([5])), "int64 in .*, not string"),
    "caption list": (lambda p: table(p, caption=pa.array([["a", "b"]])), "not string"),
    "caption null type": (lambda p: table(p, caption=pa.array([None])), "null in .*, not string"),
    "image string": (lambda p: table(p, image=pa.array(["x.png"])), "not binary"),
    "image bytes int": (
        lambda p: table(p, image=pa.array([{"bytes": 5}], pa.struct([("bytes", pa.int64())]))),
        "int64 in .*, not binary",
    ),
    "zero rows": (lambda p: table(p, pa.array([], IMAGE), pa.array([], pa.string())), "no rows"),
}


@pytest.mark.parametrize("name", BAD_PARQUET)
def test_a_bad_parquet_file_is_one_line_naming_it(tmp_path, capsys, name):
    """A split's later file that is not parquet or holds other column types: one line naming it,
    exit 2, nothing written (no caption written as "b'...'" or "5")."""
    src = tmp_path / "copy"
    write_dataset(src, [encoded(0)], files=1)  # the first file is good: every file is checked
    make, says = BAD_PARQUET[name]
    bad = src / "data" / "train-00001-of-00002.parquet"
    if name == "zero rows":  # a split with no rows at all
        bad = src / "data" / "train-00000-of-00001.parquet"
    make(bad)
    argv = ["--out", str(tmp_path / "data"), "--hf-dataset", str(src)]
    line = expect_error(capsys, prepare.main, argv, tmp_path, says)
    assert bad.name in line or name == "zero rows", line


def test_a_later_file_without_the_column_is_one_line(tmp_path, capsys):
    """The columns are checked in every file of the split, not the first only."""
    src = tmp_path / "copy"
    write_dataset(src, [encoded(0)], files=1)
    write_dataset(src, [encoded(1)], files=1, split="train2", columns=("image", "text"))
    (src / "data" / "train2-00000-of-00001.parquet").rename(src / "data" / "train-x.parquet")
    argv = ["--out", str(tmp_path / "data"), "--hf-dataset", str(src)]
    expect_error(capsys, prepare.main, argv, tmp_path, r"no such column .*train-x.parquet")


def test_a_marker_without_its_image_is_written_again(tmp_path):
    """A done marker whose image is gone (deleted, or never written) does not drop its row: the
    rerun writes the image again, and pano.jsonl lists every row."""
    src = tmp_path / "copy"
    captions = write_dataset(src, [encoded(i) for i in range(3)], files=1)
    out = tmp_path / "data"
    argv = ["--out", str(out), "--hf-dataset", str(src)]
    prepare.main(argv)
    (out / "panoramas" / "000001.png").unlink()
    prepare.main([*argv, "--overwrite"])
    assert [r.caption for r in read_rows(pano=out / "pano.jsonl")["pano"]] == captions


def test_a_folder_named_as_a_row_is_kept_and_one_line(tmp_path, capsys):
    """A folder where a row's image goes: one line naming it, exit 1, the folder kept."""
    src = tmp_path / "copy"
    write_dataset(src, [encoded(i) for i in range(2)], files=1)
    out = tmp_path / "data"
    argv = ["--out", str(out), "--hf-dataset", str(src)]
    prepare.main(argv)
    folder = out / "panoramas" / "000001.png"
    folder.unlink()
    folder.mkdir()
    (folder / "mine.txt").write_text("mine")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        prepare.main([*argv, "--overwrite"])
    *bars, line = capsys.readouterr().err.strip().splitlines()  # after the progress bar
    assert exit_info.value.code == 1 and line.startswith("error: ") and "000001.png" in line
    assert not any(b.startswith("error") for b in bars)
    assert (folder / "mine.txt").read_text() == "mine"
