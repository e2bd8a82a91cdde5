"""Fuzz every parser we own with generated hostile inputs (hypothesis, derandomized): the
safetensors header reader, the config.json / dit360_config / T5 config / adapter_config.json
readers, jsonl training rows, batch rows and masks. Each input must give a valid result or our
error, a ValueError or OSError (not a subclass such as JSONDecodeError) whose message names the
file on one line, within a time and a memory bound; never another exception."""

import io
import json
import math
import resource
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny import TINY_TRANSFORMER, TINY_VAE

from dit360.app import batch
from dit360.app.text import check_encoder
from dit360.load import config, files, image
from dit360.load.lora_formats import read_lora
from dit360.load.sources import Part
from dit360.load.weights import FLUX_CONFIG_KEY, meta_flux, read_flux
from dit360.train import data

FUZZ = settings(
    max_examples=40,
    derandomize=True,  # the same inputs on every run
    deadline=None,  # the bound is ours (SECONDS), counted inside the parser only
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SECONDS, PYTHON_MB, RSS_MB = 5, 64, 512
OURS = (ValueError, OSError, FileNotFoundError, PermissionError)  # exactly these classes


def outcome(call: Callable[[], object], name: str, lines: int = 1) -> object:
    """call()'s result, or None after our error naming `name` (on `lines` lines at most); any
    other exception, a slow call or a large allocation fails the test."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions escape
        assert type(e) in OURS, f"{type(e).__name__}: {e}"
        assert name in str(e) and len(str(e).splitlines()) <= lines, str(e)
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert time.monotonic() - start < SECONDS
        assert peak < PYTHON_MB * 2**20, f"{peak / 2**20:.0f} MB of Python memory"


@pytest.fixture(autouse=True)
def bounded_rss():
    """The whole process grows by less than RSS_MB during a fuzz test."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown < RSS_MB, f"grew {grown:.0f} MB"


# Hostile JSON values: other types, huge and negative numbers, NaN, unicode, nesting.
HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 10**9, 2**63, -(2**63), 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["(", "abc", "\u2028", "\x00", "[a-", "*"]),
    st.lists(st.integers(-3, 2**40), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def dumps(value: object) -> str:
    """JSON text; integers too long for Python's str() limit are written as a float."""
    try:
        return json.dumps(value)
    except ValueError:
        return "1e400"


@st.composite
def byte_edits(draw, data: bytes) -> bytes:
    """`data` with a few bytes flipped, inserted or removed, or cut short."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


@st.composite
def json_edits(draw, valid: dict) -> str:
    """`valid` with a key's value replaced by a hostile one (or a key added or removed), as text;
    sometimes the text's bytes edited too."""
    obj = dict(valid)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*obj, "extra"]) if obj else st.just("extra"))
        if draw(st.booleans()) and key in obj:
            del obj[key]
        else:
            obj[key] = draw(HOSTILE)
    return dumps(draw(st.sampled_from([obj, [obj], "text"])) if draw(st.booleans()) else obj)


def written(path: Path, content: str | bytes) -> Path:
    """`path` holding `content`."""
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        path.write_bytes(content)
    return path


# --- the safetensors header reader ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_safetensors(tmp_path_factory) -> bytes:
    """A valid file: three small tensors and metadata, as our writer writes it."""
    buf = tmp_path_factory.mktemp("seed") / "valid.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int8)}
    tensors["c"] = torch.zeros(0, 5, dtype=torch.bfloat16)
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    files.write_safetensors(buf, specs, tensors.items(), {"format": "pt", "x": "{}"})
    return buf.read_bytes()


def read_all(path: Path) -> dict:
    """Every tensor of a safetensors file, read."""
    tfile = files.open_tensors(path)
    return {k: tfile.get(k) for k in tfile.shapes}


@st.composite
def headers(draw) -> bytes:
    """A safetensors file with a generated header: entries of hostile dtype, shape, offsets."""
    entry = st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from(["F32", "BF16", "U8", "I64", "F8_E4M3", "Q4"]) | HOSTILE,
            "shape": st.lists(st.integers(-2, 6), max_size=3) | HOSTILE,
            "data_offsets": st.lists(st.integers(-16, 80), min_size=2, max_size=2) | HOSTILE,
        },
    )
    header = draw(
        st.dictionaries(st.text(max_size=6), entry | JSON, max_size=4)
        | st.fixed_dictionaries({"__metadata__": JSON | st.dictionaries(st.text(), st.text())})
        | JSON
    )
    blob = dumps(header).encode()
    body = draw(st.binary(max_size=80))
    length = draw(st.sampled_from([len(blob), len(blob) + 1, 2**62, 3 * 2**30]))
    return struct.pack("<Q", length) + blob + body


@FUZZ
@given(st.data())
def test_safetensors_header(tmp_path, tiny_safetensors, data):
    """Edited valid files and generated headers: our error or every tensor readable."""
    content = data.draw(byte_edits(tiny_safetensors) | headers())
    path = written(tmp_path / "f.safetensors", content)
    outcome(lambda: read_all(path), str(path))


def test_sparse_header_is_not_read(tmp_path):
    """A header declaring 2 GiB of a sparse file (a few KB on disk) is refused unread."""
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 2**31))
        f.truncate(2**31 + 4096)
    outcome(lambda: files.open_tensors(path), "first 8 bytes are no header length")


# --- the JSON configs ---------------------------------------------------------------------------


@FUZZ
@given(st.data())
def test_transformer_config_json(tmp_path, data):
    """config.json of a FluxTransformer2DModel: our error or parameters within the bounds."""
    valid = {**TINY_TRANSFORMER, "axes_dims_rope": [4, 6, 6]}
    text = data.draw(json_edits(valid) | byte_edits(json.dumps(valid).encode()))
    path = written(tmp_path / "config.json", text)
    params = outcome(lambda: config.from_diffusers_config(path), str(path))
    if params is not None:
        outcome(lambda: meta_flux(params), str(path))


@FUZZ
@given(st.data())
def test_vae_config_json(tmp_path, data):
    """config.json of an AutoencoderKL: our error or parameters within the bounds."""
    valid = {**TINY_VAE, "block_out_channels": [32, 32, 32, 32]}
    text = data.draw(json_edits(valid) | byte_edits(json.dumps(valid).encode()))
    path = written(tmp_path / "config.json", text)
    outcome(lambda: config.ae_from_diffusers_config(path), str(path))


@pytest.fixture(scope="module")
def tiny_bfl() -> tuple[dict, dict]:
    """A tiny transformer in our layout: its tensors (zeros) and its dit360_config."""
    params = config.from_diffusers_config(TINY_TRANSFORMER)
    state = {k: torch.zeros(v.shape) for k, v in meta_flux(params).state_dict().items()}
    return state, json.loads(config.to_json(params))


@FUZZ
@given(st.data())
def test_dit360_config_metadata(tmp_path, tiny_bfl, data):
    """A file's dit360_config (our JSON in its metadata), end to end through read_flux."""
    state, valid = tiny_bfl
    text = data.draw(json_edits(valid))
    path = tmp_path / "flux.safetensors"
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in state.items()}
    files.write_safetensors(path, specs, state.items(), {FLUX_CONFIG_KEY: text})
    outcome(lambda: read_flux(Part(path)), str(path))


@FUZZ
@given(st.data())
def test_text_encoder_config_json(tiny_flux, tmp_path, data):
    """T5's config.json beside its weights: our error or a model built on the meta device."""
    src = tiny_flux / "text_encoder_2"
    valid = json.loads((src / "config.json").read_text())
    folder = tmp_path / "t5"
    folder.mkdir(exist_ok=True)
    for f in src.glob("*.safetensors"):
        if not (folder / f.name).exists():
            (folder / f.name).symlink_to(f)
    config_text = data.draw(json_edits(valid))
    written(folder / "config.json", config_text)
    part = Part(folder)

    def read() -> object:
        return check_encoder(part, "t5")[1]

    outcome(read, str(folder))


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory) -> tuple[Path, dict]:
    """A valid LoRA folder of the tiny model: adapter_model.safetensors + adapter_config.json."""
    from test_lora import dit360_lora

    folder, _, cfg = dit360_lora(tmp_path_factory.mktemp("lora") / "a")
    return folder, cfg


@FUZZ
@given(st.data())
def test_adapter_config_json(lora_folder, tmp_path, data):
    """adapter_config.json edited: our error or a plan for the tiny model."""
    folder, valid = lora_folder
    mine = tmp_path / "lora"
    mine.mkdir(exist_ok=True)
    if not (mine / "adapter_model.safetensors").exists():
        (mine / "adapter_model.safetensors").symlink_to(folder / "adapter_model.safetensors")
    valid = valid | {"rank_pattern": {"to_q": 4}, "alpha_pattern": {"to_k": 2.5}}
    text = data.draw(json_edits(valid) | byte_edits(json.dumps(valid).encode()))
    written(mine / "adapter_config.json", text)
    model = meta_flux(config.from_diffusers_config(TINY_TRANSFORMER))
    outcome(lambda: read_lora(mine, model), str(mine))


# --- rows and masks -----------------------------------------------------------------------------


def png(size: tuple[int, int], mode: str = "L", fill: int = 255) -> bytes:
    """An image's PNG bytes."""
    buf = io.BytesIO()
    Image.new(mode, size, fill).save(buf, format="PNG")
    return buf.getvalue()


@FUZZ
@given(st.data())
def test_training_rows(tmp_path, data):
    """A pano jsonl of edited rows: our error (each bad row on a line naming the file) or rows."""
    (tmp_path / "p.png").write_bytes(png((32, 16), "RGB"))
    valid = {"image": "p.png", "caption": "a lake", "mask": "p.png"}
    lines = data.draw(st.lists(json_edits(valid) | st.text(max_size=30), min_size=1, max_size=4))
    path = written(tmp_path / "pano.jsonl", "\n".join(lines))
    rows = len(path.read_bytes().decode("utf-8", "replace").splitlines())
    result = outcome(lambda: data_rows(path), "pano.jsonl", lines=rows + 1)
    assert result is None or all(r.image.is_file() for r in result["pano"])


def data_rows(path: Path) -> dict:
    """data.read_rows of a pano file."""
    return data.read_rows(pano=path)


@FUZZ
@given(st.data(), st.sampled_from([".jsonl", ".txt"]))
def test_batch_rows(tmp_path, data, suffix):
    """A --prompts file of edited rows: our error naming file:line, or typed rows."""
    valid = {"prompt": "a lake", "seed": 3, "out": "x.png", "steps": 4, "guidance": 2.5}
    keys = {"prompt": str, "seed": int, "out": str, "steps": int, "guidance": (int, float)}
    lines = data.draw(st.lists(json_edits(valid) | st.text(max_size=30), min_size=1, max_size=4))
    content = "\n".join(lines).encode("utf-8", "surrogatepass")
    content = data.draw(st.just(content) | byte_edits(content))
    path = written(tmp_path / f"prompts{suffix}", content)
    rows = outcome(lambda: batch.read_rows(path, "--prompts", keys, ("prompt",), True), str(path))
    for _, row in rows or []:
        assert all(isinstance(v, keys[k]) for k, v in row.items())


@FUZZ
@given(st.data())
def test_masks(tmp_path, data):
    """Edited PNG and JPEG masks: our error naming the file, or a (16, 32) bool mask."""
    jpeg = io.BytesIO()
    Image.new("L", (32, 16), 200).save(jpeg, format="JPEG")
    seed = data.draw(st.sampled_from([png((32, 16)), png((32, 16), "LA"), jpeg.getvalue()]))
    path = written(tmp_path / "mask.png", data.draw(byte_edits(seed)))
    mask = outcome(lambda: image.read_mask(path, 32, 16), str(path))
    assert mask is None or (mask.shape == (16, 32) and mask.dtype == torch.bool)


def test_outcome_catches_foreign_errors():
    """The property can fail: a JSONDecodeError (a ValueError subclass) or a TypeError escapes."""
    for error in (json.JSONDecodeError("x", "doc", 0), TypeError("f.json")):
        with pytest.raises(AssertionError):
            outcome(lambda e=error: (_ for _ in ()).throw(e), "f.json")
    assert math.isnan(outcome(lambda: float("nan"), "f.json"))
