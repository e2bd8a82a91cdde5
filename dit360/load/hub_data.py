"""A Hugging Face dataset in the Hub's parquet layout (repo id or local copy; pyarrow: extra `hub`)
written one record batch at a time as prepare.py's panorama folder: `NNNNNN.<ext>` (the stored
bytes) and `NNNNNN.txt` (the caption, last: a done marker, so a killed run resumes). DiT360 trains
on `Insta360-Research/Matterport3D_polished` (columns `image`, `caption`)."""

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .files import atomic_path
from .image import pil_quiet

BATCH = 64  # rows decoded at a time: a row group can be large, a batch of images is not
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass(frozen=True)
class HubSource:
    """The parquet files of one split of a dataset and the columns to read from them."""

    name: str  # as the user gave it, for messages
    files: list[Path]
    image: str
    caption: str
    rows: int


def fetch(name: str, split: str, config: str | None = None) -> Path:
    """A local folder as it is, or a dataset repo's parquet files of the split, fetched."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    flag = f"--hf-dataset {name}"
    parts = name.split("/")
    if path.exists() or len(parts) != 2 or not all(parts) or name.startswith((".", "~")):
        raise ValueError(f"{flag}: not a folder, nor a Hugging Face dataset id (owner/name)")
    from huggingface_hub import constants, errors, snapshot_download

    top = f"{config}/" if config else "*"  # the split's files in the Hub's layouts (`*`: folders)
    allow = [f"{top}{split}-*.parquet", f"{top}{split}/*.parquet", f"{split}-*.parquet"]
    try:
        return Path(snapshot_download(name, repo_type="dataset", allow_patterns=allow))
    except errors.LocalEntryNotFoundError:  # offline (or no network) and not (fully) cached
        include = f"{config or '*'}/{split}-*.parquet"
        raise ValueError(
            f"{flag}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and it cannot be "
            f"downloaded now (HF_HUB_OFFLINE=1 or no network): download it once with `hf download "
            f"{name} --repo-type dataset --include '{include}'`, or unset HF_HUB_OFFLINE, "
            "or pass a local folder copy"
        ) from None
    except errors.GatedRepoError:
        raise ValueError(
            f"{flag} is gated: accept its terms on https://huggingface.co/datasets/{name}, then "
            "log in with `hf auth login` or set HF_TOKEN"
        ) from None
    except errors.RepositoryNotFoundError:
        raise ValueError(
            f"{flag}: no such dataset on the Hub (or private: log in with `hf auth login`)"
        ) from None


def split_files(root: Path, split: str, config: str | None = None) -> list[Path]:
    """The split's parquet files under root, sorted; ValueError if none, or if several configs."""
    found = sorted(p for p in root.rglob("*.parquet") if p.is_file())
    rel = {p: p.relative_to(root) for p in found}
    ours = lambda p, s: p.name.startswith(f"{s}-") or p.parent.name == s  # noqa: E731
    conf = lambda p: rel[p].parts[0] if len(rel[p].parts) > 1 else None  # noqa: E731
    files = [p for p in found if ours(p, split) and config in (None, conf(p))]
    where = f"--hf-dataset {root}" + (f" --hf-config {config}" if config else "")
    if not files:
        splits = sorted({p.name.split("-")[0] if "-" in p.name else p.parent.name for p in found})
        raise ValueError(
            f"{where}: no parquet files of split {split!r} (<split>-*.parquet or "
            f"<split>/*.parquet); splits there: {', '.join(splits) or 'none'}; choose one "
            "with --hf-split"
        )
    if len(configs := sorted({str(conf(p)) for p in files})) > 1:
        raise ValueError(
            f"{where}: split {split!r} is in several configs ({', '.join(configs)}): choose one "
            "with --hf-config"
        )
    return files


def open_source(
    name: str,
    split: str = "train",
    config: str | None = None,
    image: str = "image",
    caption: str = "caption",
) -> HubSource:
    """The split's files (fetched if a repo id) with the columns checked; ValueError if not."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            "--hf-dataset needs pyarrow: pip install 'dit360[hub]' (or pip install pyarrow)"
        ) from None
    files, rows = split_files(fetch(name, split, config), split, config), 0
    for file in files:  # each file's columns: a later file may lack them, or hold other types
        try:
            meta = pq.ParquetFile(file).metadata
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"--hf-dataset {name}: {file} is not a parquet file ({e})") from None
        schema, rows = meta.schema.to_arrow_schema(), rows + meta.num_rows
        for flag, column, ok in (
            ("--image-column", image, (pa.binary(), pa.large_binary())),
            ("--caption-column", caption, (pa.string(), pa.large_string())),
        ):
            if column not in schema.names:
                raise ValueError(
                    f"{flag} {column}: no such column in {name} ({file.name}); its columns: "
                    f"{', '.join(schema.names)}"
                )
            kind = schema.field(column).type
            if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
                kind = kind.field("bytes").type  # the Hub's image: {bytes, path}
            if kind not in ok:
                raise ValueError(
                    f"{flag} {column}: {kind} in {file.name}, not {' or '.join(map(str, ok))} "
                    f"(an image: its bytes; a caption: text); choose it with {flag}"
                )
    if not rows:
        raise ValueError(f"--hf-dataset {name}: split {split!r} has no rows; choose another")
    return HubSource(name, files, image, caption, rows)


def image_bytes(value: dict | bytes | None, where: str) -> bytes:
    """The encoded image of a cell: a {bytes, path} struct, or bytes."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if not data:
        path = value.get("path") if isinstance(value, dict) else None
        raise ValueError(f"{where}: the image holds no bytes (path: {path})")
    return data


def suffix(data: bytes) -> str:
    """The file suffix of encoded image bytes (.png if PIL cannot tell: prepare says unreadable)."""
    try:
        with pil_quiet("ignore"), Image.open(io.BytesIO(data)) as img:  # too large: prepare says
            return SUFFIXES.get(img.format, ".png")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return ".png"


def write_row(folder: Path, name: str, data: bytes, caption: str | None) -> None:
    """The image's bytes, then its caption (the done marker), each written atomically."""
    with atomic_path(folder / f"{name}{suffix(data)}") as tmp:
        tmp.write_bytes(data)
    with atomic_path(folder / f"{name}.txt") as tmp:
        tmp.write_text("" if caption is None else str(caption), encoding="utf-8")


def read_group(pf, group: int, columns: list[str]) -> Iterator[tuple]:
    """The rows (tuples of the columns) of one row group of a ParquetFile, BATCH rows at a time."""
    for b in pf.iter_batches(batch_size=BATCH, row_groups=[group], columns=columns):
        yield from zip(*(b[c].to_pylist() for c in columns), strict=True)


def extract(src: HubSource, folder: Path) -> Path:
    """Each row as `NNNNNN.<ext>` + `NNNNNN.txt` (its index) in folder, but the rows done before."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    names, index = {p.name for p in folder.iterdir() if p.is_file()}, 0
    done = {n[:-4] for n in names if n.endswith(".txt")}  # a marker counts with its image only
    done = {n for n in done if any(n + s in names for s in SUFFIXES.values())}
    with tqdm(total=src.rows, desc="dataset", unit="img", disable=None) as bar:
        for path in src.files:
            pf = pq.ParquetFile(path)
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                names, index = [f"{i:06d}" for i in range(index, index + n)], index + n
                if done.issuperset(names):
                    bar.update(n)
                    continue
                rows = read_group(pf, group, [src.image, src.caption])
                for name, (image, caption) in zip(names, rows, strict=True):
                    if name not in done:
                        data = image_bytes(image, f"{src.name} row {int(name)} ({path.name})")
                        write_row(folder, name, data, caption)
                    bar.update(1)
    return folder


def add_flags(parser) -> None:
    """prepare.py's --hf-* flags and the column names."""
    parser.add_argument(
        "--hf-dataset",
        help="a Hugging Face dataset id (e.g. Insta360-Research/Matterport3D_polished) or a local "
        "folder copy in the Hub's parquet layout: its panoramas and captions are written to "
        "OUT/panoramas/ (resumable) and used as --pano (needs pip install 'dit360[hub]')",
    )
    parser.add_argument("--hf-split", help="the split to read (train)")
    parser.add_argument("--hf-config", help="the config (subset) folder, if several hold the split")
    parser.add_argument("--image-column", help="the dataset's image column (image)")
    parser.add_argument("--caption-column", help="the dataset's caption column (caption)")


def from_flags(args: dict) -> dict:
    """open_source's arguments popped out of prepare.py's args ({} without --hf-dataset)."""
    names = {"hf_dataset": "name", "hf_split": "split", "hf_config": "config"}
    names |= {"image_column": "image", "caption_column": "caption"}
    given = {names[k]: args.pop(k) for k in list(args) if k in names}
    if given and "name" not in given:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k, v in names.items() if v in given)
        raise ValueError(f"{flags} without --hf-dataset: add it, or drop them")
    return given
