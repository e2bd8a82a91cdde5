"""Training data: jsonl rows, per-token masks, panorama augmentation (a flip, then a roll by whole
token columns), the epochs' order (mixing seeded by (seed, epoch): a resume sees the same order)
and the cache of text embeddings and VAE posteriors (of the image and its mirror: the encoder is
not flip-symmetric). A roll by k tokens rolls the posterior by 2k columns: exact with a circular
encoder. Masks and rolls differ from DiT360's src/dynamic_dataset.py: README, Reference fidelity.
"""

import hashlib
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from ..app.cli import check_prompt, one_line
from ..app.panorama import PATCH, token_mask
from ..core.loss import HybridSchedule
from ..core.sampling import Conditioning
from ..load.files import TensorFile, open_tensors, parse_json, read_text, write_safetensors
from ..load.image import from_pil, open_image, read_mask, read_rgb

AUGMENT_STREAM = 0  # seeded(seed, epoch, AUGMENT_STREAM, index): a panorama's flip and roll
READ_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
Encode = Callable[[Tensor], tuple[Tensor, Tensor]]  # pixels (B, 3, H, W) -> posterior mean, std
CACHED = ("mean", "std", "mean_flip", "std_flip", "txt", "vec")  # a cache entry's tensors
EncodeText = Callable[[list[str]], tuple[Tensor, Tensor, Tensor]]  # -> txt, txt_ids, vec


@dataclass(frozen=True)
class Row:
    """One checked jsonl row: resolved paths, the caption, and where it came from."""

    image: Path
    caption: str
    mask: Path | None
    source: str  # "file.jsonl:line", for messages


def seeded(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (stable across runs and machines)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _parse(line: str, folder: Path, source: str) -> Row:
    """A jsonl line {"image", "caption", "mask"} as a Row (src/dynamic_dataset.py:18-33)."""
    obj = parse_json(line, "the line")  # [[...]] nested 10^5 deep too: a bad row, no traceback
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
        raise ValueError('no "image" path')
    caption = obj.get("caption")
    if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
        caption = max(caption, key=len)  # as the reference (src/dynamic_dataset.py:67-70)
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("missing or empty caption")
    check_prompt(caption, "its caption")
    mask = obj.get("mask")
    if mask is not None and not isinstance(mask, str):
        raise ValueError('"mask" is not a path')
    image = folder / obj["image"]  # an absolute path stays absolute
    return Row(image, caption.strip(), None if mask is None else folder / mask, source)


def _check(row: Row, kind: str) -> str | None:
    """What is wrong with a row, or None."""
    if kind == "persp" and row.mask is None:
        return "perspective row without a mask"
    try:
        w, h = open_image(row.image).size
        if kind == "pano" and abs(w / h - 2) > 0.02:
            return f"panorama is not 2:1 ({w}x{h})"
        if row.mask is not None:
            mw, mh = open_image(row.mask).size
            if abs(mw / mh - w / h) > 0.02:
                return f"mask {row.mask.name} is {mw}x{mh}, image is {w}x{h}"
    except FileNotFoundError as e:
        return f"missing file {e.filename or row.image}"  # as read: from the jsonl's folder
    except READ_ERRORS as e:
        return f"unreadable: {e}"
    return None


def read_rows(
    pano: str | Path | None = None, persp: str | Path | None = None
) -> dict[str, list[Row]]:
    """Read and check both jsonl files; one ValueError lists every bad row or an empty file."""
    rows: dict[str, list[Row]] = {"pano": [], "persp": []}
    bad: list[str] = []
    for kind, file in (("pano", pano), ("persp", persp)):
        if file is None:
            continue
        path, parsed = Path(file), []
        text = read_text(path).splitlines()
        lines = [(n, line) for n, line in enumerate(text, start=1) if line.strip()]
        if not lines:
            drop = " or drop --persp" if kind == "persp" else ""
            raise ValueError(
                f"--{kind} {path}: no rows in it: fill it (prepare.py writes one){drop}"
            )
        for n, line in lines:
            try:
                parsed.append(_parse(line, path.parent, f"{path.name}:{n}"))
            except ValueError as e:
                bad.append(f"{path.name}:{n}: {e}")
        with ThreadPoolExecutor(8) as pool:  # PIL decodes without holding the GIL
            errors = list(pool.map(partial(_check, kind=kind), parsed))
        checked = list(zip(parsed, errors, strict=True))
        bad += [f"{r.source} ({r.image.name}): {e}" for r, e in checked if e]
        rows[kind] = [r for r, e in checked if e is None]
    if bad:
        raise ValueError(f"{len(bad)} bad rows:\n" + "\n".join(f"  {b}" for b in bad))
    return rows


def cache_key(row: Row, height: int, model_id: str) -> str:
    """What a row's cache entry is made of: the image file's identity, caption, size and model."""
    stat = row.image.stat()
    key = [str(row.image.resolve()), stat.st_size, stat.st_mtime_ns, row.caption, height, model_id]
    return json.dumps(key)


def cache_path(row: Row, cache_dir: Path, height: int, model_id: str) -> Path:
    """The cache file of a row: named by a hash of its key."""
    digest = hashlib.sha256(cache_key(row, height, model_id).encode()).hexdigest()[:32]
    return Path(cache_dir) / digest[:2] / f"{digest}.safetensors"


def cache_entry(row: Row, cache_dir: Path, height: int, model_id: str) -> TensorFile:
    """A row's cache entry, its header checked: made for this row and settings (its key, written
    in it: a file copied or renamed is not), float32 latents of the size; ValueError if not."""
    path = cache_path(row, cache_dir, height, model_id)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{row.source} ({row.image.name}) is not cached ({path})")
    if not path.is_file():  # not ours to replace: a user's folder
        raise OSError(f"cache entry {path} is not a file: move it out of {cache_dir}")
    f = open_tensors(path)  # its header bounded and checked
    shapes = [f.shapes.get(k, ()) for k in CACHED]
    if (
        f.metadata.get("row") != cache_key(row, height, model_id)
        or set(f.shapes) != set(CACHED)
        or set(f.dtypes.values()) != {torch.float32}
        or {s[1:] for s in shapes[:4]} != {(height // 8, height // 4)}
        or [len(s) for s in shapes] != [3, 3, 3, 3, 2, 1]
    ):
        raise ValueError(f"cache entry {path} was not made for {row.source} with these settings")
    return f


@torch.no_grad()
def build_cache(
    rows: list[Row],
    cache_dir: str | Path,
    height: int,
    model_id: str,
    encode: Encode,
    encode_text: EncodeText,
) -> int:
    """Cache the rows not cached yet (a rank passes its share); returns how many were written."""
    todo, stale = [], []
    for row in rows:
        try:
            cache_entry(row, Path(cache_dir), height, model_id)
        except FileNotFoundError:
            todo.append(row)
        except ValueError as e:  # a copy cut short, another row's, edited, of a version before
            todo, stale = [*todo, row], [*stale, e]
    if stale:  # one line, not one a row (a whole cache may be stale)
        more = f" and {len(stale) - 1} more" if len(stale) > 1 else ""
        print(f"warning: {one_line(f'{stale[0]}{more}')}: encoding them again", file=sys.stderr)
    for row in todo:
        x = from_pil(read_rgb(row.image, 2 * height, height))
        mean, std = encode(torch.stack([x, x.flip(-1)]))  # (2, 16, H/8, W/8): as is, mirrored
        txt, _, vec = encode_text([row.caption])
        parts = (mean[0], std[0], mean[1], std[1], txt[0], vec[0])  # as CACHED names them
        tensors = {k: v.to("cpu", torch.float32) for k, v in zip(CACHED, parts, strict=True)}
        specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
        meta = dict(row=cache_key(row, height, model_id))
        path = cache_path(row, Path(cache_dir), height, model_id)
        write_safetensors(path, specs, tensors.items(), meta)  # atomic: no partial entry
    return len(todo)


@dataclass(frozen=True)
class Source:
    """What samples are loaded from: rows, training height, seed, cache, the epochs' mixing."""

    pano: list[Row]
    persp: list[Row]
    height: int
    seed: int = 0
    cache_dir: Path | None = None
    model_id: str = ""
    schedule: HybridSchedule = HybridSchedule()


@dataclass
class Batch:
    """A training batch; pixels (uncached) or the VAE posterior and text embeddings (cached)."""

    kind: tuple[str, ...]  # "pano" / "persp" per row
    index: tuple[int, ...]  # row number within its kind
    token_mask: Tensor  # (B, L) bool on the packed grid, L = H/16 * W/16
    persp: Tensor  # (B,) bool: which rows are perspective canvases
    caption: tuple[str, ...]
    pixels: Tensor | None = None  # (B, 3, H, W) in [-1, 1]
    mean: Tensor | None = None  # (B, 16, H/8, W/8) posterior mean, before scale/shift
    std: Tensor | None = None  # (B, 16, H/8, W/8)
    txt: Tensor | None = None  # (B, L_txt, 4096) T5
    vec: Tensor | None = None  # (B, 768) CLIP pooled

    def to(self, device: torch.device | str) -> "Batch":
        """The batch with its tensors on device."""
        tensors = {k: v for k, v in vars(self).items() if isinstance(v, Tensor)}
        return replace(self, **{k: v.to(device) for k, v in tensors.items()})


def augment(x: Tensor, flip: bool, shift: int) -> Tensor:
    """Mirror x (..., W) left-right if flip, then roll it right by shift columns."""
    return torch.roll(x.flip(-1) if flip else x, shift, dims=-1)


def load_sample(source: Source, kind: str, index: int, epoch: int) -> dict:
    """One sample; a panorama is flipped and rolled as drawn from (seed, epoch, index)."""
    row = (source.pano if kind == "pano" else source.persp)[index]
    h = source.height
    mask = read_mask(row.mask, 2 * h, h) if row.mask else torch.ones(h, 2 * h, dtype=torch.bool)
    flip, shift = False, 0  # shift in token columns
    if kind == "pano":
        gen = seeded(source.seed, epoch, AUGMENT_STREAM, index)
        flip = bool(torch.rand((), generator=gen) < 0.5)
        shift = int(torch.randint(2 * h // PATCH, (), generator=gen))
    mask = token_mask(augment(mask, flip, shift * PATCH))
    sample = dict(kind=kind, index=index, token_mask=mask, persp=torch.tensor(kind == "persp"))
    sample["caption"] = row.caption
    if source.cache_dir is None:
        pixels = from_pil(read_rgb(row.image, 2 * h, h))  # (3, H, W)
        sample["pixels"] = augment(pixels, flip, shift * PATCH)
        return sample
    try:  # checked again (a file may change during the run); OSError: train.py stops on one line
        f = cache_entry(row, source.cache_dir, h, source.model_id)
    except ValueError as e:
        raise OSError(f"{e}: delete it, then --resume (it is encoded again)") from None
    for key in ("mean", "std"):  # only this flip's entries are read
        x = f.get(key + ("_flip" if flip else ""))  # (16, H/8, W/8)
        sample[key] = torch.roll(x, 2 * shift, dims=-1)  # 2 latent columns a token
    sample["txt"], sample["vec"] = f.get("txt"), f.get("vec")
    if not all(torch.isfinite(sample[k]).all() for k in ("mean", "std", "txt", "vec")):
        raise OSError(f"cache entry {f.source} holds non-finite values: delete it, then --resume")
    return sample


def load_batch(source: Source, epoch: int, items: list[tuple[str, int]]) -> Batch:
    """Load a batch's samples (kind, index) and stack them: tensors stacked, the rest as tuples."""
    samples = [load_sample(source, kind, index, epoch) for kind, index in items]
    fields = {k: [s[k] for s in samples] for k in samples[0]}
    return Batch(
        **{k: torch.stack(v) if isinstance(v[0], Tensor) else tuple(v) for k, v in fields.items()}
    )


def encoded(
    batch: Batch, encode: Encode | None, encode_text: EncodeText | None
) -> tuple[Tensor, Tensor, Conditioning]:
    """A batch's VAE posterior (mean, std) and text conditioning: cached, or encoded now."""
    if batch.txt is not None:
        txt_ids = batch.txt.new_zeros(*batch.txt.shape[:2], 3)  # (B, L_txt, 3)
        return batch.mean, batch.std, Conditioning(batch.txt, txt_ids, batch.vec)
    return *encode(batch.pixels), Conditioning(*encode_text(list(batch.caption)))


def epoch_order(source: Source, epoch: int, rank: int = 0, world: int = 1) -> list[tuple[str, int]]:
    """This rank's (kind, index) samples of an epoch, fixed by (seed, epoch): every panorama and
    persp_count perspective rows, shuffled, cut to a multiple of world; rank r takes r::world."""
    gen = seeded(source.seed, epoch)
    n_persp = len(source.persp)
    persp = torch.randperm(n_persp, generator=gen)[: source.schedule.persp_count(n_persp, epoch)]
    items = [("pano", i) for i in range(len(source.pano))] + [("persp", i) for i in persp.tolist()]
    items = [items[i] for i in torch.randperm(len(items), generator=gen).tolist()]
    items = items[: len(items) - len(items) % world]
    return items[rank::world]


def epoch_loader(
    source: Source,
    epoch: int,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    start_batch: int = 0,
) -> DataLoader:
    """An epoch's batches from start_batch, in order; the last partial one dropped."""
    return DataLoader(
        epoch_order(source, epoch, rank, world)[start_batch * batch_size :],  # loaded in workers
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=partial(load_batch, source, epoch),
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
    )
