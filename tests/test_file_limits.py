"""Hostile weight files and JSON: every size is bounded before it costs memory or time, and every
malformed file is one ValueError naming the file and the key (issue 23, sections 2 and 3)."""

import json
import re
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from clitest import expect_error
from test_lora import dit360_lora
from tiny import TINY_TRANSFORMER

import sample
from dit360.load import config, files
from dit360.load.lora_formats import read_lora
from dit360.load.sources import Part, flagged
from dit360.load.weights import FLUX_CONFIG_KEY, meta_flux, read_flux


def safetensors(path: Path, header: object, body: bytes = b"", length: int | None = None) -> Path:
    """A file with this header (JSON) and data section; `length` overrides the declared size."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + body)
    return path


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HEADERS = [
    ([F32], "header: expected a JSON object"),
    ({"a": {"dtype": "F32", "shape": [2]}}, "tensor 'a': 'data_offsets' is missing"),
    ({"a": F32 | {"data_offsets": [-8, 0]}}, "tensor 'a': 'data_offsets' must be a list of 2"),
    ({"a": F32 | {"shape": [-2]}}, r"tensor 'a': 'shape' must be a list of values, each an int"),
    ({"a": F32 | {"dtype": "Q4"}}, "tensor 'a': 'dtype' must be one of F64"),
    ({"a": F32 | {"shape": [2.0]}}, r"'shape' must be .*got \[2\.0\]"),
    ({"a": F32 | {"data_offsets": [0, 16]}}, "'a' lies outside the file"),
    ({"a": F32 | {"data_offsets": [8, 8]}}, "'a' lies outside the file"),
    ({"a": F32, "__metadata__": {"k": 1}}, "'__metadata__' must be an object whose values"),
    ({"a": "F32"}, "tensor 'a': expected a JSON object"),
]


@pytest.mark.parametrize("header, message", HEADERS)
def test_malformed_headers(tmp_path, header, message):
    """Each malformed header is one ValueError naming the file: never bytes of the header read as
    weights (negative offsets), never a KeyError or AttributeError."""
    path = safetensors(tmp_path / "h.safetensors", header, bytes(8))
    with pytest.raises(ValueError, match=message) as e:
        files.open_tensors(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def bounded(call, seconds: float = 5, mb: float = 20) -> Exception:
    """The error `call()` raises, checked to come within `seconds` and `mb` of Python memory."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(ValueError) as e:
            call()
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    assert time.monotonic() - start < seconds and peak < mb, (time.monotonic() - start, peak)
    return e.value


def test_header_size_and_tensor_count(tmp_path, monkeypatch):
    """A header declaring 2 GiB of a sparse file is refused unread (the format caps headers at
    100 MB); more tensors than MAX_TENSORS are refused."""
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 2**31))
        f.truncate(2**31 + 4096)  # a few KB on disk
    error = bounded(lambda: files.open_tensors(path))
    assert "sparse.safetensors: not a safetensors file (its first 8 bytes are no header" in str(
        error
    )
    monkeypatch.setattr(files, "MAX_TENSORS", 2)
    many = {k: F32 | {"data_offsets": [0, 8]} for k in "abc"}
    with pytest.raises(ValueError, match="3 tensors, more than the 2"):
        files.open_tensors(safetensors(tmp_path / "many.safetensors", many, bytes(8)))


@pytest.mark.parametrize(
    "content, message",
    [
        ({"num_layers": 100000}, r"'num_layers' must be an integer in \[0, 1024\], got 100000"),
        ({"num_attention_heads": 10**9}, r"'num_attention_heads' must be .*got 1000000000"),
        ({"joint_attention_dim": -4}, r"'joint_attention_dim' must be .*got -4"),
        ({"axes_dims_rope": "16,56,56"}, r"'axes_dims_rope' must be a list"),
        ({"guidance_embeds": 1}, r"'guidance_embeds' must be true or false"),
        ({"attention_head_dim": None}, r"'attention_head_dim' is missing"),
        ([1, 2], r"expected a JSON object \{...\}, got \[1, 2\]"),
        ("{not json", r"is not valid JSON \(Expecting property name"),
        (b"\xff\xfe{}", r"not UTF-8 text \(byte 0\)"),
    ],
)
def test_config_json_named_with_its_key(tmp_path, content, message):
    """A transformer config.json of the wrong shape: one line naming the file and the key."""
    path = tmp_path / "config.json"
    if isinstance(content, dict):
        content = json.dumps({**TINY_TRANSFORMER, **content})
    elif isinstance(content, list):
        content = json.dumps(content)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    error = bounded(lambda: config.from_diffusers_config(path))
    assert str(path) in str(error) and "\n" not in str(error)
    assert re.search(message, str(error)), str(error)


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """The tiny transformer's tensors in our layout (zeros)."""
    params = config.from_diffusers_config(TINY_TRANSFORMER)
    return {k: torch.zeros(v.shape) for k, v in meta_flux(params).state_dict().items()}


def with_config(path: Path, state: dict, **change: object) -> Path:
    """Our file of `state` whose dit360_config has `change` applied."""
    params = json.loads(config.to_json(config.from_diffusers_config(TINY_TRANSFORMER))) | change
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in state.items()}
    files.write_safetensors(path, specs, state.items(), {FLUX_CONFIG_KEY: json.dumps(params)})
    return path


def test_metadata_config_bounded_and_compared_before_building(tmp_path, tiny_state):
    """dit360_config with 100,000 blocks is refused by its bound; with 1,000 (in bounds; building
    them would take ~40 s) it is compared with the file's 2 blocks before any model is built."""
    huge = with_config(tmp_path / "a.safetensors", tiny_state, depth=100000)
    error = bounded(lambda: read_flux(Part(huge)))
    assert f"{huge} metadata dit360_config: 'depth' must be an integer in [0, 1024]" in str(error)
    many = with_config(tmp_path / "b.safetensors", tiny_state, depth=1000)
    error = bounded(lambda: read_flux(Part(many)), mb=60)
    assert re.search(
        r"b\.safetensors does not fit the model: missing \(\d+\): .*double_blocks\.9\.", str(error)
    )
    error = bounded(lambda: read_flux(Part(with_config(tmp_path / "c", tiny_state, depth=None))))
    assert "'depth' must be an integer" in str(error)


def test_cli_blames_the_config_not_the_device(tiny_flux, tmp_path, capsys):
    """sample.py with a hidden size of 10^9 in config.json: one line naming the file and key,
    exit 2 (it was blamed on `--device None`)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_flux, base, symlinks=True)
    path = base / "transformer" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"attention_head_dim": 10**9}))
    argv = ["--base", str(base), "--prompt", "x", "--out", str(tmp_path / "o.png")]
    argv += ["--lora", "none", "--device", "cpu"]
    match = r"--base: .*transformer/config\.json: 'attention_head_dim' must be an integer in"
    expect_error(capsys, sample.main, argv, tmp_path, match)


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    """A valid LoRA folder of the tiny model."""
    return dit360_lora(tmp_path_factory.mktemp("lora") / "a")[0]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"lora_alpha": "abc"}, r"'lora_alpha' must be a finite number .*got 'abc'"),
        ({"target_modules": "("}, r"'target_modules' must be a regular expression or a list"),
        ({"r": 0}, r"'r' must be an integer in \[1, 65536\], got 0"),
        ({"rank_pattern": {"(": 2}}, r"'rank_pattern' must be an object \{regular expression"),
        ({"alpha_pattern": {"to_q": float("nan")}}, r"'alpha_pattern' must be"),
        ([{"r": 4}], r"expected a JSON object"),
        ("r = 4", r"not valid JSON"),
        (b"\x80", r"not UTF-8"),
    ],
)
def test_adapter_config_named_with_its_key(lora, tmp_path, content, message):
    """A hostile adapter_config.json: one ValueError naming the file and the key."""
    folder = tmp_path / "lora"
    shutil.copytree(lora, folder)
    path = folder / "adapter_config.json"
    if isinstance(content, dict):
        content = json.dumps(json.loads(path.read_text()) | content)
    elif isinstance(content, list):
        content = json.dumps(content)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    model = meta_flux(config.from_diffusers_config(TINY_TRANSFORMER))
    with pytest.raises(ValueError, match=message) as e:
        read_lora(folder, model)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_flagged_rewords_any_error():
    """flagged prefixes the flag to errors whose class needs more than a message to be built."""

    def raises(error: Exception) -> None:
        raise error

    cases = [
        (json.JSONDecodeError("Expecting value", "x", 0), ValueError),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), ValueError),
        (FileNotFoundError("no such file"), FileNotFoundError),
    ]
    for error, kind in cases:
        with pytest.raises(kind, match="^--base: ") as e:
            flagged("--base", raises, error)
        assert type(e.value) is kind
