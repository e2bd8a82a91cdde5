"""Training data: row checks, masks, augmentation, the mixing schedule, the loader and the cache."""

import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit360.app.panorama import token_mask
from dit360.core.loss import HybridSchedule
from dit360.load.image import from_pil, read_mask, read_rgb
from dit360.train.data import (
    Batch,
    Source,
    build_cache,
    cache_path,
    epoch_loader,
    epoch_order,
    load_sample,
    read_rows,
)

H = 32  # training height: 32 x 64 pixels = 2 x 4 tokens


def write_image(path: Path, w: int, h: int, seed: int = 0) -> Path:
    """A random RGB PNG."""
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def write_mask(path: Path, mask: np.ndarray) -> Path:
    """A bool array as an L PNG, white = True."""
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows (dicts, or raw strings) as a jsonl file."""
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_read_rows_lists_every_bad_row(tmp_path):
    """One ValueError names every bad row of both files with its line and file."""
    write_image(tmp_path / "good.png", 64, 32)
    write_image(tmp_path / "square.png", 32, 32)
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    write_mask(tmp_path / "m.png", np.ones((32, 64), bool))
    pano = write_jsonl(
        tmp_path / "pano.jsonl",
        [
            {"image": "good.png", "caption": "ok"},
            {"image": "missing.png", "caption": "a"},
            {"image": "garbage.png", "caption": "b"},
            {"image": "good.png", "caption": "  "},
            {"image": "square.png", "caption": "c"},
            "{not json",
            "[" * 100_000,  # nested past the recursion limit: a bad row, no RecursionError
        ],
    )
    persp = write_jsonl(
        tmp_path / "persp.jsonl",
        [
            {"image": "good.png", "caption": "ok", "mask": "m.png"},
            {"image": "good.png", "caption": "no mask"},
            {"image": "good.png", "caption": "d", "mask": "gone.png"},
        ],
    )
    with pytest.raises(ValueError) as e:
        read_rows(pano, persp)
    msg = str(e.value)
    assert msg.startswith("8 bad rows")
    for where in [f"pano.jsonl:{n}" for n in range(2, 8)]:
        assert where in msg
    for where in ["persp.jsonl:2", "persp.jsonl:3"]:
        assert where in msg
    assert "pano.jsonl:1 " not in msg and "persp.jsonl:1 " not in msg
    assert "missing.png" in msg and "garbage.png" in msg and "gone.png" in msg and "2:1" in msg


def test_read_rows_refuses_an_empty_file(tmp_path):
    """A --pano or --persp file with no rows (blank lines only): an error naming it and the fix."""
    write_image(tmp_path / "good.png", 64, 32)
    write_mask(tmp_path / "m.png", np.ones((32, 64), bool))
    pano = write_jsonl(tmp_path / "pano.jsonl", [{"image": "good.png", "caption": "ok"}])
    persp = write_jsonl(
        tmp_path / "persp.jsonl", [{"image": "good.png", "caption": "ok", "mask": "m.png"}]
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=f"--pano {empty}: no rows in it: fill it"):
        read_rows(empty, persp)
    with pytest.raises(ValueError, match=f"--persp {empty}: no rows in it: .* or drop --persp$"):
        read_rows(pano, empty)
    assert len(read_rows(pano, persp)["persp"]) == 1


def test_read_rows_paths_and_captions(tmp_path):
    """Paths resolve against the jsonl's folder (absolute kept); list captions keep the longest."""
    (tmp_path / "d").mkdir()
    good = write_image(tmp_path / "good.png", 64, 32)
    pano = write_jsonl(
        tmp_path / "d" / "pano.jsonl",
        [
            {"image": "../good.png", "caption": ["short", "the longest"]},
            "",
            {"image": str(good), "caption": " x "},
        ],
    )
    rows = read_rows(pano)
    assert [r.image.resolve() for r in rows["pano"]] == [good.resolve()] * 2
    assert [r.caption for r in rows["pano"]] == ["the longest", "x"]
    assert rows["pano"][1].source == "pano.jsonl:3" and rows["persp"] == []


def test_16_bit_rows_load_as_their_8_bit_version(tmp_path):
    """A 16-bit grey panorama and mask pass read_rows and load as the 8-bit files (1 level)."""
    x = np.linspace(0, 65535, H * 2 * H).round().astype(np.uint16).reshape(H, 2 * H)
    m = np.zeros((H, 2 * H), np.uint16)
    m[:, :H] = 65535
    Image.fromarray(x).save(tmp_path / "p16.png")
    Image.fromarray(m).save(tmp_path / "m16.png")
    Image.fromarray(np.round(x / 65535 * 255).astype(np.uint8)).save(tmp_path / "p8.png")
    write_mask(tmp_path / "m8.png", m > 0)
    samples = []
    for bits in (16, 8):
        row = {"image": f"p{bits}.png", "caption": "a", "mask": f"m{bits}.png"}
        rows = read_rows(write_jsonl(tmp_path / f"{bits}.jsonl", [row]))
        samples.append(load_sample(Source(rows["pano"], [], H), "pano", 0, epoch=0))
    sixteen, eight = samples
    torch.testing.assert_close(sixteen["pixels"], eight["pixels"], rtol=0, atol=2 / 255)
    assert torch.equal(sixteen["token_mask"], eight["token_mask"])
    assert sixteen["token_mask"].any() and not sixteen["token_mask"].all()


def test_load_image_bicubic_and_range(tmp_path):
    """Images are resized with PIL bicubic to (H, 2H) and mapped to [-1, 1]."""
    path = write_image(tmp_path / "a.png", 100, 50)
    x = from_pil(read_rgb(path, 2 * H, H))
    expected = (
        np.asarray(Image.open(path).resize((2 * H, H), Image.BICUBIC), np.float32) / 127.5 - 1
    )
    assert x.shape == (3, H, 2 * H)
    torch.testing.assert_close(x, torch.from_numpy(expected).permute(2, 0, 1))


def test_token_mask_partial_patch(tmp_path):
    """A token is supervised only if its whole 16x16 patch is white (>= 128)."""
    m = np.full((32, 64), 255, np.uint8)
    m[20, 5] = 127  # one grey pixel: token (1, 0) is out
    m[0:16, 16:32] = 128  # exactly the threshold: token (0, 1) stays in
    m[10:16, 50:64] = 0  # part of token (0, 3)
    Image.fromarray(m, "L").save(tmp_path / "m.png")
    got = token_mask(read_mask(tmp_path / "m.png", 64, 32))
    expected = torch.tensor([[True, True, True, False], [False, True, True, True]]).flatten()
    assert torch.equal(got, expected)


def test_mask_resized_with_nearest(tmp_path):
    """A mask at twice the training size is resized with nearest: no grey, the edge stays put."""
    m = np.zeros((64, 128), bool)
    m[:, :64] = True
    write_mask(tmp_path / "m.png", m)
    mask = read_mask(tmp_path / "m.png", 64, 32)
    assert mask.shape == (32, 64) and mask[:, :32].all() and not mask[:, 32:].any()


def reference_persp_count(n: int, epoch: int) -> int:
    """DiT360's subset size (src/dynamic_dataset.py, train_dataloader), restated: none in epochs
    0 and 1, then max(int(n * 0.50 ** (epoch - 1)), 1) of torch.randperm(n) (so none of none)."""
    if epoch in (0, 1):
        return 0
    return len(torch.randperm(n)[: max(int(n * (0.50 ** (epoch - 1))), 1)])


def test_persp_count_formula():
    """The per-epoch perspective counts are the reference's, for many sizes and epochs."""
    persp_count = HybridSchedule().persp_count
    for n in (0, 1, 2, 3, 7, 40, 100, 1001):
        assert [persp_count(n, e) for e in range(26)] == [
            reference_persp_count(n, e) for e in range(26)
        ]
    assert [persp_count(100, e) for e in range(7)] == [0, 0, 50, 25, 12, 6, 3]
    later = HybridSchedule(persp_from=3, persp_decay=0.25)
    assert [later.persp_count(64, e) for e in range(6)] == [0, 0, 0, 16, 4, 1]


def order_of(n_pano: int, n_persp: int, epoch: int, seed: int, **ranks: int) -> list:
    """epoch_order of n_pano panoramas and n_persp perspective rows (never read)."""
    return epoch_order(Source([None] * n_pano, [None] * n_persp, 0, seed), epoch, **ranks)


def test_epoch_order_counts_and_seed():
    """Each epoch holds all panoramas plus persp_count distinct perspective rows, seeded."""
    for epoch in range(6):
        order = order_of(7, 40, epoch, seed=3)
        kinds = Counter(k for k, _ in order)
        assert kinds["pano"] == 7 and kinds["persp"] == HybridSchedule().persp_count(40, epoch)
        assert len(set(order)) == len(order)
        assert order == order_of(7, 40, epoch, seed=3)
    assert order_of(7, 40, 2, seed=3) != order_of(7, 40, 2, seed=4)
    persp = [sorted(i for k, i in order_of(7, 40, e, seed=3) if k == "persp") for e in (2, 3)]
    assert persp[0][: len(persp[1])] != persp[1]  # a fresh subset each epoch


def test_epoch_order_ranks_partition():
    """Ranks get equal, disjoint shares whose union is the epoch less at most world - 1 samples."""
    for world in (1, 2, 3, 4):
        full = order_of(10, 8, 2, seed=0)
        shards = [order_of(10, 8, 2, seed=0, rank=r, world=world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        union = [x for s in shards for x in s]
        assert len(set(union)) == len(union) and set(union) <= set(full)
        assert len(full) - len(union) < world


def test_augmentation_mask_follows_image(tmp_path):
    """Flip and roll move image and mask together by whole tokens, seeded per (seed, epoch, row)."""
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 64), bool)
    mask[:, 16:40] = True  # tokens 1 and 2 fully, token 3 half: out
    mask[0:16, 48:64] = True
    rgb = np.where(mask[..., None], 200, 50).astype(np.uint8) + rng.integers(
        0, 40, (32, 64, 3), dtype=np.uint8
    )
    Image.fromarray(rgb).save(tmp_path / "p.png")
    write_mask(tmp_path / "m.png", mask)
    pano = write_jsonl(
        tmp_path / "pano.jsonl", [{"image": "p.png", "caption": "c", "mask": "m.png"}]
    )
    source = Source(**read_rows(pano), height=32, seed=1)
    seen = set()
    for epoch in range(12):
        s = load_sample(source, "pano", 0, epoch)
        bright = token_mask(s["pixels"].mean(0) > 0)  # tokens whose every pixel is bright
        assert torch.equal(s["token_mask"], bright)
        seen.add(tuple(s["token_mask"].tolist()))
        again = load_sample(source, "pano", 0, epoch)
        assert torch.equal(again["pixels"], s["pixels"])
    assert len(seen) > 3  # flips and rolls actually happen


def test_loader_batches_and_resume(tmp_path):
    """The loader yields Batches in epoch order, drops the last partial batch, and can resume."""
    for i in range(5):
        write_image(tmp_path / f"{i}.png", 64, 32, seed=i)
    write_mask(tmp_path / "m.png", np.ones((32, 64), bool))
    pano = write_jsonl(
        tmp_path / "pano.jsonl", [{"image": f"{i}.png", "caption": f"c{i}"} for i in range(3)]
    )
    persp = write_jsonl(
        tmp_path / "persp.jsonl",
        [{"image": f"{i}.png", "caption": "p", "mask": "m.png"} for i in (3, 4)],
    )
    source = Source(**read_rows(pano, persp), height=32)
    batches = list(epoch_loader(source, 2, batch_size=2))  # 3 pano + 1 persp = 2 batches
    assert len(batches) == 2 and all(isinstance(b, Batch) for b in batches)
    b = batches[0]
    assert b.pixels.shape == (2, 3, 32, 64) and b.token_mask.shape == (2, 8) and b.mean is None
    order = order_of(3, 2, 2, seed=0)
    assert [(k, i) for b in batches for k, i in zip(b.kind, b.index, strict=True)] == order
    assert torch.equal(batches[0].persp, torch.tensor([k == "persp" for k in b.kind]))
    resumed = list(epoch_loader(source, 2, batch_size=2, start_batch=1))
    assert len(resumed) == 1 and torch.equal(resumed[0].pixels, batches[1].pixels)


def test_cache_key_and_skip(tmp_path):
    """The cache key follows caption, mtime, height, model; cached rows are not re-encoded."""
    write_image(tmp_path / "a.png", 64, 32)
    pano = write_jsonl(tmp_path / "pano.jsonl", [{"image": "a.png", "caption": "c"}])
    row = read_rows(pano)["pano"][0]
    calls = []

    def encode(x):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], 16, 4, 8), torch.ones(x.shape[0], 16, 4, 8)

    def encode_text(captions):
        return torch.zeros(1, 5, 32), torch.zeros(1, 5, 3), torch.zeros(1, 24)

    assert build_cache([row], tmp_path / "c", 32, "m", encode, encode_text) == 1
    assert build_cache([row], tmp_path / "c", 32, "m", encode, encode_text) == 0
    assert calls == [2]  # the image and its mirror, once
    key = cache_path(row, tmp_path / "c", 32, "m")
    assert key.exists()
    assert cache_path(row, tmp_path / "c", 32, "other") != key
    assert cache_path(row, tmp_path / "c", 64, "m") != key
    assert cache_path(replace(row, caption="d"), tmp_path / "c", 32, "m") != key
    os.utime(row.image, ns=(1, 1))
    assert cache_path(row, tmp_path / "c", 32, "m") != key
    source = Source(pano=[row], persp=[], height=32, cache_dir=tmp_path / "c", model_id="m")
    with pytest.raises(FileNotFoundError, match="not cached"):
        load_sample(source, "pano", 0, 0)
