"""Fuzz the weight folders and files users hold: shard indexes and their shards (entries moved,
dropped, pointing out of the folder; shards missing, cut, duplicated, links broken or to another
shard, FIFOs), stray downloads, scaled fp8 scales of any shape, tensors that overlap in the data
area, fused parts that do not fuse, integer weights, a model held twice in one file. Each must give
exactly the weights the clean input gives (for scaled fp8: ComfyUI's `weight * scale`), or our
one-line error naming the file, before a model is built; never a wait, a traceback or a change to
the user's folder. An index naming a file outside its folder is refused (only plain names of
files in the folder are shards; links in it are followed: a Hugging Face snapshot is links)."""

import json
import os
import shutil
import signal
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from clitest import expect_error, snapshot
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_fuzz import FUZZ, outcome
from test_sample_cli import args as sample_args

import convert_weights
import sample
from dit360.load import files
from dit360.load.convert import convert_flux
from dit360.load.sources import find_part
from dit360.load.weights import load_autoencoder, load_flux

F8 = torch.float8_e4m3fn
INDEX = "diffusion_pytorch_model.safetensors.index.json"


@contextmanager
def no_wait(seconds: int = 5) -> Iterator[None]:
    """A call that blocks (a FIFO opened for reading) fails the test instead of hanging it."""

    def stop(*_: object) -> None:
        raise AssertionError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's tensors."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def clean(tiny_flux: Path) -> dict[str, torch.Tensor]:
    """The tiny sharded transformer folder's model, in float32: what every harmless edit gives."""
    return state(load_flux(tiny_flux / "transformer", dtype=torch.float32))


@pytest.fixture(scope="module")
def bfl(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """The tiny transformer in BFL names (our convert output) and its metadata (the config)."""
    path = convert_flux(tiny_flux, tmp_path_factory.mktemp("bfl") / "flux1-dev.safetensors")
    with safe_open(path, "pt") as f:
        return load_file(path), f.metadata()


# --- sharded folders: the index and its shards -------------------------------------------------


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*-of-*.safetensors"))


def _index(folder: Path, change) -> None:
    index = json.loads((folder / INDEX).read_text())
    change(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


def _retarget(folder: Path, value: str, pick: int) -> None:
    _index(folder, lambda m: m.update({sorted(m)[pick % len(m)]: value}))


def _replace(shard: Path, make) -> None:
    shard.unlink()
    make(shard)


def _duplicate(folder: Path, pick: int) -> None:
    """A tensor of one shard also in another, with other values (two downloads mixed)."""
    a, b = _shards(folder)[pick % 8], _shards(folder)[8 + pick % 8]
    key, tensor = next(iter(load_file(a).items()))
    save_file({**load_file(b), key: tensor + 1}, b)


def _stray(folder: Path, pick: int) -> None:
    """What a half-finished download leaves: a .incomplete, a stray shard (other values), a tmp."""
    shard = _shards(folder)[pick % 17]
    save_file({k: v + 1 for k, v in load_file(shard).items()}, folder / "stray.safetensors")
    (folder / f"{shard.name}.incomplete").write_bytes(shard.read_bytes()[:100])
    (folder / ".diffusion_pytorch_model.safetensors.tmp1").write_bytes(b"")


CONTENT_EDITS = {  # name -> edit(folder, a file outside it, a drawn number); shards stay files
    "entry out of the folder": lambda f, out, n: _retarget(f, f"../{out.name}", n),
    "absolute entry": lambda f, out, n: _retarget(f, str(out), n),
    "entry in a subfolder": lambda f, out, n: _retarget(f, f"sub/{out.name}", n),
    "entry moved to another shard": lambda f, out, n: _retarget(f, _shards(f)[n % 17].name, n),
    "entry dropped": lambda f, out, n: _index(f, lambda m: m.pop(sorted(m)[n % len(m)])),
    "entry added": lambda f, out, n: _index(f, lambda m: m.update(nope=_shards(f)[0].name)),
    "tensor in two shards": lambda f, out, n: _duplicate(f, n),
    "stray files": lambda f, out, n: _stray(f, n),
}
SHAPE_EDITS = {  # one of these last: the index emptied or gone, a shard gone or not a file
    "empty map": lambda f, out, n: _index(f, dict.clear),
    "shard missing": lambda f, out, n: _shards(f)[n % 17].unlink(),
    "shard cut": lambda f, out, n: os.truncate(_shards(f)[n % 17], 500),
    "broken link": lambda f, out, n: _replace(_shards(f)[n % 17], lambda p: p.symlink_to("blob")),
    "link to another shard": lambda f, out, n: _replace(
        _shards(f)[n % 17], lambda p: p.symlink_to(_shards(f)[(n + 1) % 16])
    ),
    "shard a FIFO": lambda f, out, n: _replace(_shards(f)[n % 17], os.mkfifo),
    "shard a folder": lambda f, out, n: _replace(_shards(f)[n % 17], Path.mkdir),
    "no index": lambda f, out, n: (f / INDEX).unlink(),
    "two indexes": lambda f, out, n: shutil.copy(f / INDEX, f / f"model.{INDEX}"),
}
FOLDER_EDITS = CONTENT_EDITS | SHAPE_EDITS


@FUZZ
@given(st.data())
def test_sharded_folder(tiny_flux, clean, tmp_path, data):
    """A sharded folder with a few hostile edits: the clean folder's weights exactly, or our one
    line naming the folder; the folder unchanged; the file its index names outside it never
    opened (a FIFO: opening it would wait)."""
    folder = tmp_path / "transformer"
    shutil.rmtree(tmp_path, ignore_errors=True)
    shutil.copytree(tiny_flux / "transformer", folder)
    outside = tmp_path / "outside.safetensors"
    os.mkfifo(outside)
    edits = data.draw(st.lists(st.sampled_from(sorted(CONTENT_EDITS)), max_size=2, unique=True))
    edits += [data.draw(st.sampled_from(sorted(SHAPE_EDITS)))] * data.draw(st.booleans())
    for edit in edits:
        FOLDER_EDITS[edit](folder, outside, data.draw(st.integers(0, 100)))
    before = snapshot(tmp_path)
    with no_wait():
        model = outcome(lambda: load_flux(folder, dtype=torch.float32), str(folder))
    if model is not None:
        got = state(model)
        assert got.keys() == clean.keys() and all(torch.equal(got[k], clean[k]) for k in got)
    assert snapshot(tmp_path) == before


def _snapshot_links(folder: Path, outside: Path, n: int) -> None:
    """A Hugging Face snapshot: each file a link to a blob outside the folder."""
    (folder.parent / "blobs").mkdir()
    for shard in [*_shards(folder), folder / INDEX]:
        shard.rename(folder.parent / "blobs" / f"{shard.name}.blob")
        shard.symlink_to(Path("..") / "blobs" / f"{shard.name}.blob")


@pytest.mark.parametrize(
    "edit", ["entry moved to another shard", "entry dropped", "stray files", "snapshot links"]
)
def test_harmless_edits_give_the_clean_weights(tiny_flux, clean, tmp_path, edit):
    """What a folder may hold that changes no weight (an index entry moved or dropped, stray
    files, every file a link out of the folder, as a Hugging Face snapshot): the clean weights."""
    folder = tmp_path / "transformer"
    shutil.copytree(tiny_flux / "transformer", folder)
    {**FOLDER_EDITS, "snapshot links": _snapshot_links}[edit](folder, tmp_path / "x", 5)
    got = state(load_flux(folder, dtype=torch.float32))
    assert got.keys() == clean.keys() and all(torch.equal(got[k], clean[k]) for k in got)


def test_shard_count_bounds_the_folder(tiny_flux, monkeypatch):
    """The limit on a header's tensors holds for a folder's shards together."""
    monkeypatch.setattr(files, "MAX_TENSORS", 100)  # each shard holds at most 14, all 112
    with pytest.raises(ValueError, match=r"transformer: 10\d tensors, more than the 100 we"):
        files.open_tensors(tiny_flux / "transformer")


@pytest.mark.parametrize("index", [True, False])
def test_large_folders_give_a_short_line(tmp_path, index):
    """An index naming 5,000 missing shards, a folder of 5,000 files and no index: one line of
    a few names (not a megabyte), in seconds."""
    names = [f"model-{i:05d}.safetensors" for i in range(5_000)]
    if index:
        (tmp_path / INDEX).write_text(json.dumps({"weight_map": {n: n for n in names}}))
    else:
        for name in names:
            (tmp_path / name).touch()
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)) as error:
        files.open_tensors(tmp_path)
    assert len(str(error.value)) < 1000 and time.perf_counter() - start < 5


# --- one file: scales, fused parts, dtypes, overlapping tensors --------------------------------


def scale_shapes(rows: int, cols: int) -> list[tuple[int, ...]]:
    """Shapes a scale_weight may be given: ones that broadcast to (rows, cols), ones that do not."""
    fit = [(), (1,), (cols,), (rows, 1), (1, cols), (rows, cols), (1, 1)]
    return fit + [
        (rows + 1,),
        (0,),
        (1, 1, 1),
        (rows, 2, 1),
        (cols, rows) if rows != cols else (0, 1),
    ]


@FUZZ
@given(st.data())
def test_scaled_fp8_scales(bfl, tmp_path, data):
    """A scaled fp8 file (ComfyUI's `scaled_fp8`) whose scales have drawn shapes, some weights
    without one: the model holds `weight * scale` as ComfyUI broadcasts it (no scale: 1), or, for
    a scale that does not broadcast to its weight, our error naming the file and the scale."""
    tensors, metadata = bfl
    out, want, fits = {"scaled_fp8": torch.empty(0, dtype=F8)}, {}, True
    matrices = sorted(k for k, t in tensors.items() if t.ndim == 2)
    drawn = data.draw(st.lists(st.sampled_from(matrices), max_size=4, unique=True))
    for k, t in tensors.items():
        if t.ndim != 2:  # vectors and norms: bf16, unscaled
            out[k] = t.to(torch.bfloat16)
            want[k] = out[k].float()
            continue
        out[k] = (t * 8).to(F8)
        shape = data.draw(st.sampled_from([None, *scale_shapes(*t.shape)])) if k in drawn else ()
        if shape is None:
            want[k] = out[k].float()
            continue
        scale = torch.rand(shape) / 8 + 0.05
        out[k.removesuffix("weight") + "scale_weight"] = scale
        out[k.removesuffix("weight") + "scale_input"] = torch.ones(())
        try:
            want[k] = out[k].float() * scale  # ComfyUI's dequantization
            fits &= want[k].shape == t.shape
        except RuntimeError:
            fits = False
    path = tmp_path / "flux1-dev-fp8-scaled.safetensors"
    save_file(out, path, metadata)
    model = outcome(lambda: load_flux(path, dtype=torch.float32), str(path))
    assert (model is not None) == fits
    if model is not None:
        got = state(model)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


FUSED = [  # diffusers' parts of a fused tensor (concat), a swapped one, a squeezed 1x1 conv
    "transformer_blocks.0.attn.to_k.weight",
    "single_transformer_blocks.1.proj_mlp.weight",
    "norm_out.linear.weight",
    "x_embedder.weight",
]
SQUEEZED = ["encoder.mid_block.attentions.0.to_q.weight", "decoder.conv_in.weight"]
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int64,
    torch.uint8,
    torch.bool,
]


@pytest.fixture(scope="module")
def diffusers_files(tiny_flux: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The tiny transformer's and VAE's tensors in diffusers' names, each as one file holds them."""
    folders = {part: tiny_flux / part for part in ("transformer", "vae")}
    return {p: {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
            for p, d in folders.items()}  # fmt: skip


@FUZZ
@given(st.data(), st.sampled_from(["transformer", "vae"]))
def test_parts_of_other_shapes_and_dtypes(tiny_flux, diffusers_files, tmp_path, data, part):
    """A diffusers-named transformer or VAE file (with its config) whose fused, swapped or
    squeezed parts have drawn shapes (a scalar, a vector, another width) or dtypes (integers,
    bool): loaded only if every tensor has its shape and a floating-point dtype, else our error
    naming the file."""
    tensors, fine = dict(diffusers_files[part]), True
    keys = st.lists(st.sampled_from(FUSED if part != "vae" else SQUEEZED), min_size=1, unique=True)
    for key in data.draw(keys):
        t = tensors[key]
        shapes = [t.shape, (), (t.shape[0],), (t.shape[0], 5), (1, *t.shape)]
        shape, dtype = data.draw(st.sampled_from(shapes)), data.draw(st.sampled_from(DTYPES))
        tensors[key] = torch.zeros(shape).to(dtype)
        fine &= tuple(shape) == t.shape and dtype.is_floating_point
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    shutil.copy(tiny_flux / part / "config.json", tmp_path)
    load = load_autoencoder if part == "vae" else load_flux
    model = outcome(lambda: load(tmp_path, dtype=None), str(tmp_path))
    assert (model is not None) == fine


def test_vae_levels_are_bounded_before_matching(diffusers_files, tmp_path):
    """A VAE file naming 400 decoder levels (a FLUX VAE has 4, a config at most 8): our error at
    once, not a key table of 400 levels matched against every key (quadratic: minutes)."""
    tensors = dict(diffusers_files["vae"])
    tensors |= {f"decoder.up_blocks.{i}.x": torch.zeros(1) for i in range(400)}
    save_file(tensors, tmp_path / "ae.safetensors")
    start = time.perf_counter()
    assert outcome(lambda: load_autoencoder(tmp_path / "ae.safetensors"), "ae.safetensors") is None
    assert time.perf_counter() - start < 1


def raw(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file with this header (as JSON) and data area."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 6)), min_size=1, max_size=5))
def test_tensors_do_not_share_bytes(tmp_path, spans):
    """Tensors at drawn offsets (some overlapping, some zero-size): a file is read only if no byte
    lies in two tensors, so its tensors (and a model made of them) fit in the file."""
    header = {
        f"t{i}": {"dtype": "F32", "shape": [n], "data_offsets": [4 * s, 4 * (s + n)]}
        for i, (s, n) in enumerate(spans)
    }
    path = raw(tmp_path / "f.safetensors", header, bytes(4 * 18))
    tfile = outcome(lambda: files.open_tensors(path), str(path))
    disjoint = all(s + n <= s2 for (s, n), (s2, _) in pairwise(sorted(spans)))
    assert (tfile is not None) == disjoint


@pytest.mark.parametrize(
    "part, prefixes",
    [
        ("transformer", ("model.diffusion_model.", "")),
        ("transformer", ("diffusion_model.", "transformer.")),
        ("vae", ("vae.", "")),
    ],
)
def test_model_twice_in_one_file(bfl, tiny_flux, tmp_path, part, prefixes):
    """A file holding one model under two prefixes (another copy, other values): which is meant
    is unknown, so our error naming the file, not the first prefix's weights."""
    tensors = bfl[0] if part == "transformer" else load_autoencoder(tiny_flux).state_dict()
    both = {p + k: v + i for i, p in enumerate(prefixes) for k, v in tensors.items()}
    path = tmp_path / "merged.safetensors"
    save_file(both, path)
    assert outcome(lambda: find_part(path, part), str(path)) is None


# --- the commands -------------------------------------------------------------------------------


def _fifo(tmp: Path) -> Path:
    (tmp / "fifo").mkdir()
    os.mkfifo(tmp / "fifo" / "flux1-dev.safetensors")
    return tmp / "fifo"


def _scaled(bfl, tmp: Path) -> Path:
    tensors, metadata = bfl
    out = {"scaled_fp8": torch.empty(0, dtype=F8)}
    for k, t in tensors.items():
        out[k] = t.to(F8) if t.ndim == 2 else t
        if t.ndim == 2:
            out[k.removesuffix("weight") + "scale_weight"] = torch.ones(t.shape[0] + 1)
    save_file(out, tmp / "flux-fp8.safetensors", metadata)
    return tmp / "flux-fp8.safetensors"


def _folder(tiny_flux, tmp: Path, edit: str) -> Path:
    shutil.copytree(tiny_flux / "transformer", tmp / "transformer")
    FOLDER_EDITS[edit](tmp / "transformer", tmp / "x.safetensors", 3)
    return tmp / "transformer"


CASES = {  # a hostile --transformer -> what its line says
    "scale that does not fit": (_scaled, r"scale_weight' \(\d+,\) does not scale \(\d+, \d+\)"),
    "only file a FIFO": (lambda b, t: _fifo(t), r"fifo holds no FLUX transformer"),
    "shard a FIFO": (lambda b, t: _folder(b, t, "shard a FIFO"), r"shards that are missing"),
    "shard missing": (lambda b, t: _folder(b, t, "shard missing"), r"shards that are missing"),
    "two shards": (
        lambda b, t: _folder(b, t, "tensor in two shards"),
        r"00012.* is also in .*00004",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_commands_refuse_in_one_line(tiny_flux, bfl, tmp_path, capsys, monkeypatch, case):
    """sample.py --transformer X: one line naming the file, exit 2, before any model is built;
    convert_weights.py --base X: one line, exit 1, no output."""
    make, match = CASES[case]
    weights = make(bfl if case.startswith("scale") else tiny_flux, tmp_path)

    def fill(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was built")

    monkeypatch.setattr("dit360.load.weights.fill", fill)
    start = time.perf_counter()
    argv = [*sample_args(tiny_flux, tmp_path / "o.png"), "--transformer", str(weights)]
    with no_wait(20):
        expect_error(capsys, sample.main, argv, tmp_path, match)
        argv = ["--base", str(weights), "--out", str(tmp_path / "c.safetensors")]
        expect_error(capsys, convert_weights.main, argv, tmp_path, match, code=1)
    assert time.perf_counter() - start < 20
