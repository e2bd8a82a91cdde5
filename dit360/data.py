"""Training data: jsonl rows, per-token masks, panorama augmentation, the DiT360 mixing schedule,
and the VAE-posterior / text-embedding cache.

Reference conventions (github.com/Insta360-Research-Team/DiT360), and ours:
- Rows `{"image", "caption", "mask"}` from two jsonl files (src/dynamic_dataset.py:18-33); a list
  caption uses its longest entry (:67-70). Paths are relative to the jsonl's folder unless
  absolute. We check every row first and report all bad rows in one ValueError.
- Images: resized to (H, 2H) with PIL bicubic (= torchvision Resize(BICUBIC) on a PIL image,
  :41-44), then mapped to [-1, 1] (:44).
- Masks: resized with nearest, white = supervised (:76-81 thresholds `> 128`; we use `>= 128`).
  The reference's (H/4, H/8) mask is flattened against the (H/8, W/8) latent grid, misaligned
  (DESIGN.md section 4); ours is per token on the packed (H/16, W/16) grid: a token is supervised
  only if its whole 16x16 patch is white. Panoramas without a mask are all white.
- Augmentation, panoramas only (:47-57): flip with p = 0.5, then a roll. The reference rolls by
  a pixel count uniform in [W/3, W] (src/data.py:16-36); we roll by whole 16-pixel token columns,
  uniform in [0, W/16), so the roll is exact on latents (2 columns a token) and on the token
  mask. Image and mask get the same flip and roll.
- Mixing (src/dynamic_dataset.py:126-151): epochs 0-1 panoramas only; epoch e >= 2 adds
  max(1, int(n_persp * 0.5**(e - 1))) perspective rows without replacement; the union is shuffled,
  the last partial batch dropped. The reference uses the global RNG; we seed by (seed, epoch), so
  a resumed run sees the same order.

Cache: `build_cache` stores once per row the VAE posterior (mean, std before scale/shift; latents
are still sampled each step) of the image and of its mirror image, and the text embeddings, in a
safetensors file named by a hash of (image path, file size, mtime, caption, height, model id).
Flipping an image does not flip its latent exactly (the encoder's kernels are not symmetric), so
both flips are cached: a flip picks the other entry, exactly. A roll by k tokens rolls the cached
posterior by 2k latent columns: exact with a width-circular encoder
(`AutoEncoder(circular_encoder=True)`); with the zero-padded encoder an approximation that differs
within the encoder's receptive field of the image's left and right edges.
"""

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .files import atomic_path
from .image import from_pil, read_mask, read_rgb
from .panorama import PATCH, token_mask
from .sampling import Conditioning

ROW_KINDS = ("pano", "persp")
READ_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
Encode = Callable[[Tensor], tuple[Tensor, Tensor]]  # pixels (B, 3, H, W) -> posterior mean, std
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


# --- rows ------------------------------------------------------------------------------------


def _parse(line: str, folder: Path) -> tuple[Path, str, Path | None]:
    """Image path, caption and mask path of one jsonl line; ValueError if malformed."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
        raise ValueError('no "image" path')
    caption = obj.get("caption")
    if isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
        caption = max(caption, key=len)  # the reference keeps the longest of several captions
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError("missing or empty caption")
    mask = obj.get("mask")
    if mask is not None and not isinstance(mask, str):
        raise ValueError('"mask" is not a path')
    image = folder / obj["image"]  # an absolute path stays absolute
    return image, caption.strip(), None if mask is None else folder / mask


def _image_size(path: Path, decode: bool) -> tuple[int, int]:
    """(width, height) of an image file; with decode the whole file is decoded."""
    with Image.open(path) as img:
        if decode:
            img.load()  # truncated or corrupt files fail here, not during training
        return img.size


def _check(row: Row, kind: str, decode: bool) -> str | None:
    """What is wrong with a row, or None."""
    if kind == "persp" and row.mask is None:
        return "perspective row without a mask"
    try:
        w, h = _image_size(row.image, decode)
        if kind == "pano" and abs(w / h - 2) > 0.02:
            return f"panorama is not 2:1 ({w}x{h})"
        if row.mask is not None:
            mw, mh = _image_size(row.mask, decode)
            if abs(mw / mh - w / h) > 0.02:
                return f"mask {row.mask.name} is {mw}x{mh}, image is {w}x{h}"
    except FileNotFoundError as e:
        return f"missing file {Path(e.filename or '').name}"
    except READ_ERRORS as e:
        return f"unreadable: {e}"
    return None


def read_rows(
    pano: str | Path | None = None,
    persp: str | Path | None = None,
    decode: bool = True,
    workers: int = 8,
) -> dict[str, list[Row]]:
    """Read and check both jsonl files; one ValueError lists every bad row of both."""
    rows: dict[str, list[Row]] = {}
    bad: list[str] = []
    for kind, file in (("pano", pano), ("persp", persp)):
        path, parsed = Path(file or ""), []
        lines = path.read_text(encoding="utf-8").splitlines() if file is not None else []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                image, caption, mask = _parse(line, path.parent)
            except ValueError as e:
                bad.append(f"{path.name}:{n}: {e}")
                continue
            parsed.append(Row(image, caption, mask, f"{path.name}:{n}"))
        with ThreadPoolExecutor(workers) as pool:  # PIL decodes without holding the GIL
            errors = list(pool.map(lambda r, k=kind: _check(r, k, decode), parsed))
        checked = list(zip(parsed, errors, strict=True))
        bad += [f"{r.source} ({r.image.name}): {e}" for r, e in checked if e]
        rows[kind] = [r for r, e in checked if e is None]
    if bad:
        raise ValueError(f"{len(bad)} bad rows:\n" + "\n".join(f"  {b}" for b in bad))
    return rows


# --- images, masks, augmentation ----------------------------------------------------------------


def draw_augment(generator: torch.Generator, width_tokens: int) -> tuple[bool, int]:
    """(flip with p = 0.5, roll by a whole number of token columns in [0, width_tokens))."""
    flip = bool(torch.rand((), generator=generator) < 0.5)
    return flip, int(torch.randint(width_tokens, (), generator=generator))


def augment(x: Tensor, flip: bool, shift: int) -> Tensor:
    """Mirror x (..., W) left-right if flip, then roll it right by shift columns."""
    return torch.roll(x.flip(-1) if flip else x, shift, dims=-1)


# --- cache -------------------------------------------------------------------------------------


def cache_path(row: Row, cache_dir: Path, height: int, model_id: str) -> Path:
    """The cache file of a row: a hash of the image file's identity, caption, size and model."""
    stat = row.image.stat()
    key = [str(row.image.resolve()), stat.st_size, stat.st_mtime_ns, row.caption, height, model_id]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
    return Path(cache_dir) / digest[:2] / f"{digest}.safetensors"


@torch.no_grad()
def build_cache(
    rows: list[Row],
    cache_dir: str | Path,
    height: int,
    model_id: str,
    encode: Encode,
    encode_text: EncodeText,
    rank: int = 0,
    world: int = 1,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Cache this rank's share of rows (every world-th), skipping cached ones; returns the count.

    encode: CPU float32 pixels (B, 3, H, W) in [-1, 1] -> posterior (mean, std), e.g. a wrapper of
    `AutoEncoder.posterior` that moves them to its device; encode_text: captions -> (txt, txt_ids,
    vec), e.g. `partial(text.encode_prompt, encoders)`.
    """
    written = 0
    for row in rows[rank::world]:
        path = cache_path(row, Path(cache_dir), height, model_id)
        if path.exists():
            continue
        x = from_pil(read_rgb(row.image, 2 * height, height))
        mean, std = encode(torch.stack([x, x.flip(-1)]))  # (2, 16, H/8, W/8): as is, mirrored
        txt, _, vec = encode_text([row.caption])
        tensors = {"mean": mean[0], "std": std[0], "mean_flip": mean[1], "std_flip": std[1]}
        tensors = {k: v.to("cpu", dtype).contiguous() for k, v in tensors.items()}
        tensors |= {"txt": txt[0].to("cpu", dtype).contiguous(), "vec": vec[0].to("cpu", dtype)}
        with atomic_path(path) as tmp:  # a killed run leaves no partial entry
            save_file(tensors, tmp)
        written += 1
    return written


# --- samples, batches --------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Everything a sample is loaded from: the rows, the training height, seed and cache."""

    pano: list[Row]
    persp: list[Row]
    height: int
    seed: int = 0
    cache_dir: Path | None = None
    model_id: str = ""

    def __post_init__(self) -> None:
        if self.height % PATCH:
            raise ValueError(f"training height must be a multiple of {PATCH}, got {self.height}")


@dataclass
class Batch:
    """A training batch; pixels (uncached) or the VAE posterior and text embeddings (cached)."""

    kind: tuple[str, ...]  # "pano" / "persp" per row
    index: tuple[int, ...]  # row number within its kind
    token_mask: Tensor  # (B, L) bool on the packed grid, L = H/16 * W/16
    captions: tuple[str, ...]
    pixels: Tensor | None = None  # (B, 3, H, W) in [-1, 1]
    mean: Tensor | None = None  # (B, 16, H/8, W/8) posterior mean, before scale/shift
    std: Tensor | None = None  # (B, 16, H/8, W/8)
    txt: Tensor | None = None  # (B, L_txt, 4096) T5
    vec: Tensor | None = None  # (B, 768) CLIP pooled

    @property
    def persp(self) -> Tensor:
        """(B,) bool: which rows are perspective canvases."""
        return torch.tensor([k == "persp" for k in self.kind], device=self.token_mask.device)

    def to(self, device: torch.device | str) -> "Batch":
        """The batch with its tensors on device."""
        move = {k: getattr(self, k) for k in ("token_mask", "pixels", "mean", "std", "txt", "vec")}
        return replace(self, **{k: v.to(device) for k, v in move.items() if v is not None})


def load_sample(source: Source, kind: str, index: int, epoch: int) -> dict:
    """One sample, augmented by a generator seeded with (seed, epoch, kind, index)."""
    row = (source.pano if kind == "pano" else source.persp)[index]
    h = source.height
    mask = read_mask(row.mask, 2 * h, h) if row.mask else torch.ones(h, 2 * h, dtype=torch.bool)
    flip, shift = False, 0
    if kind == "pano":
        gen = seeded(source.seed, epoch, ROW_KINDS.index(kind), index)
        flip, shift = draw_augment(gen, 2 * h // PATCH)
    mask = token_mask(augment(mask, flip, shift * PATCH))
    sample = dict(kind=kind, index=index, token_mask=mask, caption=row.caption)
    if source.cache_dir is None:
        pixels = from_pil(read_rgb(row.image, 2 * h, h))  # (3, H, W)
        sample["pixels"] = augment(pixels, flip, shift * PATCH)
        return sample
    path = cache_path(row, source.cache_dir, h, source.model_id)
    if not path.exists():
        raise FileNotFoundError(f"{row.source} ({row.image.name}) is not cached: run build_cache")
    with safe_open(path, "pt") as f:  # only this flip's entries are read
        for key in ("mean", "std"):
            x = f.get_tensor(key + ("_flip" if flip else ""))  # (16, H/8, W/8)
            sample[key] = torch.roll(x, 2 * shift, dims=-1)  # 2 latent columns a token
        sample["txt"], sample["vec"] = f.get_tensor("txt"), f.get_tensor("vec")
    return sample


def collate(samples: list[dict]) -> Batch:
    """Stack samples into a Batch."""
    first = samples[0]
    tensors = {
        k: torch.stack([s[k] for s in samples]) for k in first if isinstance(first[k], Tensor)
    }
    return Batch(
        kind=tuple(s["kind"] for s in samples),
        index=tuple(s["index"] for s in samples),
        captions=tuple(s["caption"] for s in samples),
        **tensors,
    )


def posterior(batch: Batch, encode: Encode) -> tuple[Tensor, Tensor]:
    """The VAE posterior (mean, std) of a batch: cached, or encoded from its pixels."""
    if batch.mean is not None:
        return batch.mean, batch.std
    return encode(batch.pixels)


def conditioning(batch: Batch, encode_text: EncodeText | None = None) -> Conditioning:
    """Text conditioning of a batch: cached embeddings, or encode_text(captions)."""
    if batch.txt is not None:
        txt, vec = batch.txt, batch.vec
        txt_ids = torch.zeros(*txt.shape[:2], 3, device=txt.device, dtype=txt.dtype)
        return Conditioning(txt, txt_ids, vec)
    if encode_text is None:
        raise ValueError("the batch is not cached: pass encode_text")
    return Conditioning(*encode_text(list(batch.captions)))


# --- mixing schedule and loader ----------------------------------------------------------------


def persp_count(n_persp: int, epoch: int) -> int:
    """Perspective rows in an epoch: 0 for epochs 0-1, then max(1, int(n * 0.5**(e - 1)))."""
    if epoch < 2 or n_persp == 0:
        return 0
    return max(1, int(n_persp * 0.5 ** (epoch - 1)))


def epoch_order(
    n_pano: int, n_persp: int, epoch: int, seed: int, rank: int = 0, world: int = 1
) -> list[tuple[str, int]]:
    """This rank's (kind, index) samples of an epoch, the same for the same (seed, epoch).

    All panoramas plus a fresh random subset of persp_count perspective rows, shuffled. Every rank
    gets the same count: the shuffled list is cut to a multiple of world (at most world - 1
    samples dropped, different ones each epoch), then rank r takes every world-th from r.
    """
    gen = seeded(seed, epoch)
    persp = torch.randperm(n_persp, generator=gen)[: persp_count(n_persp, epoch)].tolist()
    items = [("pano", i) for i in range(n_pano)] + [("persp", i) for i in persp]
    items = [items[i] for i in torch.randperm(len(items), generator=gen).tolist()]
    items = items[: len(items) - len(items) % world]
    return items[rank::world]


class EpochData(Dataset):
    """The samples of one epoch on one rank, from sample `start` of its order on."""

    def __init__(self, source: Source, epoch: int, rank: int = 0, world: int = 1, start: int = 0):
        self.source, self.epoch = source, epoch
        order = epoch_order(len(source.pano), len(source.persp), epoch, source.seed, rank, world)
        self.order = order[start:]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        return load_sample(self.source, *self.order[i], self.epoch)


def epoch_loader(
    source: Source,
    epoch: int,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    start_batch: int = 0,
) -> DataLoader:
    """Batches of an epoch in order (already shuffled), the last partial one dropped as in the
    reference; start_batch skips batches already trained on (resume)."""
    data = EpochData(source, epoch, rank, world, start_batch * batch_size)
    return DataLoader(
        data,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
    )
