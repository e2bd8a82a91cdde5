"""Fuzz the text encoders' and tokenizers' files as users hold them (`dit360.app.text`): a
tokenizer folder's files (tokenizer_config.json's values, broken, missing, huge or special
vocabulary files, a vocabulary past its encoder's embedding), the encoders' weights (integer
tensors, an empty position table) and prompts. Each gives tokenizers whose ids its encoder
embeds, or our one-line error naming the file, before the encoders load; never remote code."""

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from clitest import expect_error
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_cli_errors import expect_failure
from test_fuzz import FUZZ, bounded_rss, byte_edits, json_edits, outcome  # noqa: F401
from test_sample_cli import args as sample_args

import sample
from dit360.app import generate, text
from dit360.app.options import SampleOptions
from dit360.load.files import MAX_TEXT
from dit360.load.sources import Part, Sources, resolve_sources

KINDS = {"clip": "tokenizer", "t5": "tokenizer_2"}  # a tokenizer's folder in FLUX.1-dev's layout
ENCODERS = {"clip": "text_encoder", "t5": "text_encoder_2"}


def copied(tiny_flux: Path, to: Path) -> Sources:
    """The tiny FLUX's two tokenizer folders copied into `to`, with its encoders."""
    for folder in KINDS.values():
        shutil.rmtree(to / folder, ignore_errors=True)
        shutil.copytree(tiny_flux / folder, to / folder)
    encoders = {k: Part(tiny_flux / folder) for k, folder in ENCODERS.items()}
    return Sources(to / "tokenizer", to / "tokenizer_2", **encoders)


def checked(src: Sources, name: str) -> object:
    """load_tokenizers(src) within outcome's bounds; tokenizers it gives encode a hostile prompt
    to ids their encoder embeds (an id past it is an IndexError in the encoder)."""
    toks = outcome(lambda: text.load_tokenizers(src), name)
    for tok, kind in zip(toks, KINDS, strict=True) if toks else ():
        rows = text.check_encoder(getattr(src, kind), kind)[1].config.vocab_size
        ids = text._token_ids(tok, ["a </s> <|endoftext|> <extra_id_0> \u00e9\u200b"], 77, kind)
        assert int(ids.max()) < rows, (kind, int(ids.max()), rows)
    return toks


@FUZZ
@given(st.data())
def test_tokenizer_config_json(tiny_flux, tmp_path, data) -> None:
    """A tokenizer_config.json or special_tokens_map.json with hostile values (model_max_length
    "77", a pad token 5, 10**30, unknown classes, auto_map): tokenizers or our error. Before,
    transformers' TypeErrors and Exceptions were tracebacks, at loading or at encoding."""
    src = copied(tiny_flux, tmp_path)
    kind = data.draw(st.sampled_from(list(KINDS)))
    name = data.draw(st.sampled_from(["tokenizer_config.json", "special_tokens_map.json"]))
    path = tmp_path / KINDS[kind] / name
    path.write_text(data.draw(json_edits(json.loads(path.read_text()))))
    checked(src, str(path.parent))


@FUZZ
@given(st.data())
def test_vocabulary_files(tiny_flux, tmp_path, data) -> None:
    """A vocabulary file (tokenizer.json, spiece.model, vocab.json, merges.txt) with bytes
    flipped, inserted, removed or cut: tokenizers or our error (were Exceptions of tokenizers)."""
    src = copied(tiny_flux, tmp_path)
    path = tmp_path / data.draw(
        st.sampled_from(
            ["tokenizer_2/tokenizer.json", "tokenizer_2/spiece.model", "tokenizer/vocab.json",
             "tokenizer/merges.txt"]
        )
    )  # fmt: skip
    if path.name == "spiece.model":  # read only without tokenizer.json
        (path.parent / "tokenizer.json").unlink()
    path.write_bytes(data.draw(byte_edits(path.read_bytes())))
    checked(src, str(path.parent))


def special_tokens(folder: Path, n: int) -> None:
    """`n` special tokens in the folder's tokenizer_config.json."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = [f"<x{i}>" for i in range(n)]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def config(key: str, value: object) -> Callable[[Path], None]:
    """A change of one key of a tokenizer_config.json."""

    def change(folder: Path) -> None:
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))

    return change


# (the folder, what is done to it, our error's words); each was a traceback, a hang, an
# unbounded read or (no vocabulary) a tokenizer mapping every word to <unk>, silently.
REFUSED = [
    ("t5", lambda f: [(f / n).unlink() for n in ("tokenizer.json", "spiece.model")],
     r"no tokenizer.json or spiece.model"),
    ("clip", lambda f: (f / "vocab.json").unlink(), r"no tokenizer.json or vocab.json"),
    ("clip", lambda f: (f / "merges.txt").unlink(), r"not a CLIP tokenizer"),
    ("clip", lambda f: (f / "vocab.json").write_text("[1, 2]"), r"not a CLIP tokenizer"),
    ("t5", lambda f: (f / "tokenizer.json").write_text("{}"), r"not a T5 tokenizer"),
    ("t5", lambda f: os.mkfifo(f / "added_tokens.json"), r"added_tokens.json is not a file"),
    ("t5", lambda f: [(f / "tokenizer.json").unlink(), (f / "tokenizer.json").symlink_to(
        "/dev/zero")], r"tokenizer.json is not a file of at most"),
    ("clip", lambda f: os.truncate(f / "vocab.json", MAX_TEXT + 1), r"vocab.json is not a file"),
    ("t5", lambda f: special_tokens(f, 10_000), r"'additional_special_tokens' must be at most"),
    ("t5", config("model_max_length", "512"), r"not a T5 tokenizer \('>' not supported"),
    ("clip", config("pad_token", 5), r"pad_token has to be"),
    ("t5", config("init_inputs", ["/dev/zero"]), r"not a T5 tokenizer"),
    ("clip", config("pad_token", None), r"does not have a padding token"),
    ("clip", lambda f: [shutil.rmtree(f), shutil.copytree(f.parent / "tokenizer_2", f)],
     r"its end token is id 1; .*text_encoder pools at id"),  # T5's as CLIP's: was silent
]  # fmt: skip


@pytest.mark.parametrize("kind,change,match", REFUSED)
def test_tokenizer_files_refused(tiny_flux, tmp_path, kind, change, match) -> None:
    """Each listed folder: our error naming it, the fix (the ungated repo's files), in bounds."""
    src = copied(tiny_flux, tmp_path)
    change(tmp_path / KINDS[kind])
    assert outcome(lambda: text.load_tokenizers(src), str(tmp_path / KINDS[kind])) is None
    with pytest.raises(ValueError, match=match) as e:
        text.load_tokenizers(src)
    assert str(e.value).endswith("'s files") and len(str(e.value).splitlines()) == 1


def test_tokenizer_folder_loop(tiny_flux, tmp_path) -> None:
    """--base's tokenizer_2/ a symbolic link loop: our error naming it (the ungated repo was
    fetched instead: offline, a line naming only that repo)."""
    for name in ("text_encoder", "text_encoder_2", "tokenizer"):
        (tmp_path / name).symlink_to(tiny_flux / name)
    (tmp_path / "tokenizer_2").symlink_to(tmp_path / "tokenizer_2")
    src = resolve_sources(str(tmp_path), parts=("t5", "clip"))
    where = re.escape(str(tmp_path / "tokenizer_2"))
    with pytest.raises(ValueError, match=rf"^--base: {where} is not a T5 tokenizer \(.*symbolic"):
        text.load_tokenizers(src)


def test_no_remote_code(tiny_flux, tmp_path) -> None:
    """auto_map and tokenizer_class naming a module of the folder: it is never imported (found
    nothing: transformers is called with its class, trust_remote_code off)."""
    src = copied(tiny_flux, tmp_path)
    marker = tmp_path / "ran"
    for folder in KINDS.values():
        (tmp_path / folder / "evil.py").write_text(f"open({str(marker)!r}, 'w')\nEvil = None\n")
        config("auto_map", {"AutoTokenizer": ["evil.Evil", "evil.Evil"]})(tmp_path / folder)
        config("tokenizer_class", "Evil")(tmp_path / folder)
    assert checked(src, str(tmp_path)) is not None and not marker.exists()


def smaller(state: dict[str, torch.Tensor], key: str, rows: int) -> dict[str, torch.Tensor]:
    """`state` with tensor `key` cut to its first `rows` rows."""
    return {**state, key: state[key][:rows].clone()}


@pytest.mark.parametrize("kind,key", [("clip", "embeddings.token_embedding.weight"),
                                      ("t5", "shared.weight")])  # fmt: skip
def test_vocabulary_past_embedding(tiny_flux, tmp_path, capsys, monkeypatch, kind, key) -> None:
    """A --clip/--t5 file embedding fewer tokens than its tokenizer has: one line naming both,
    exit 2, before any model loads (was an IndexError traceback in the encoder, or on CUDA a
    device assert)."""
    built = []
    monkeypatch.setattr(text, "load_encoder", lambda *a, **k: built.append(a))
    state = load_file(tiny_flux / ENCODERS[kind] / "model.safetensors")
    file = tmp_path / f"{kind}.safetensors"
    save_file(smaller(state, key, 50), file)
    argv = [*sample_args(tiny_flux, tmp_path / "o.png"), f"--{kind}", str(file)]
    err = expect_error(
        capsys, sample.main, argv, tmp_path, rf"{KINDS[kind]} is not a .* \(ids up to"
    )
    assert f"{file} embeds ids below 50" in err and built == []


def test_bad_tokenizer_before_encoders(tiny_flux, tmp_path, monkeypatch) -> None:
    """load_text_encoders (train.py's way in) checks the tokenizers before the ~10 GB encoders
    load (it loaded them first, then failed)."""
    src = copied(tiny_flux, tmp_path)
    (tmp_path / "tokenizer_2" / "tokenizer.json").write_text("{")
    monkeypatch.setattr(text, "load_encoder", lambda *a, **k: pytest.fail("an encoder loaded"))
    with pytest.raises(ValueError, match=r"tokenizer_2 is not a T5 tokenizer"):
        text.load_text_encoders(src, "cpu", torch.float32)


def test_each_encoder_checked_once(tiny_flux, monkeypatch) -> None:
    """check_inputs and load_text_encoders each build an encoder's meta model once, its tokenizer
    checked against it (the tokenizer check built a second: ~40 ms for T5-XXL)."""
    built, check = [], text.check_encoder
    monkeypatch.setattr(text, "check_encoder", lambda p, kind: built.append(kind) or check(p, kind))
    monkeypatch.setattr(generate, "CHECKED", set())  # not passed already in this process
    generate.check_inputs(SampleOptions(base=str(tiny_flux), lora="none"))
    assert sorted(built) == ["clip", "t5"]
    text.load_text_encoders(str(tiny_flux), "cpu", torch.float32)
    assert sorted(built) == ["clip", "clip", "t5", "t5"]


def weights(tiny_flux: Path, folder: Path, kind: str, change: Callable) -> Path:
    """The tiny encoder's tensors, changed, as one ComfyUI-style file (no config beside it)."""
    state = {
        k.removeprefix("text_model."): v
        for k, v in load_file(tiny_flux / ENCODERS[kind] / "model.safetensors").items()
    }
    file = folder / f"{kind}.safetensors"
    save_file(change(state), file)
    return file


# Weights no encoder can use: integer or bool tensors (were cast to floats: a silent garbage
# encoder), a 0-row position table (an inferred config outside ENCODER_RULES: a late error).
BAD_WEIGHTS = [
    ("t5", lambda s: {k: (v * 10).to(torch.int8) for k, v in s.items()}, r"of torch.int8"),
    ("clip", lambda s: {k: v.to(torch.bool) for k, v in s.items()}, r"of torch.bool"),
    ("clip", lambda s: smaller(s, "embeddings.position_embedding.weight", 0),
     r"'max_position_embeddings' must be an integer in \[1, "),
]  # fmt: skip


@pytest.mark.parametrize("kind,change,match", BAD_WEIGHTS)
def test_encoder_weights_refused(tiny_flux, tmp_path, kind, change, match) -> None:
    """Our error naming the file, from the headers alone."""
    file = weights(tiny_flux, tmp_path, kind, change)
    assert outcome(lambda: text.check_encoder(Part(file), kind), str(file)) is None
    with pytest.raises(ValueError, match=match) as e:
        text.check_encoder(Part(file), kind)
    assert str(file) in str(e.value)


@pytest.fixture(scope="module")
def encoders(tiny_flux: Path) -> text.TextEncoders:
    """The tiny text encoders, in float32."""
    return text.load_text_encoders(tiny_flux, "cpu", torch.float32)


PROMPTS = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=200),
    st.builds(lambda s, n: s * n, st.sampled_from(["\u200b", "</s>", "\U0001f600", " ", "a"]),
              st.integers(1, 2000)),
)  # fmt: skip


@FUZZ
@given(prompt=PROMPTS)
def test_prompts_encode(encoders, prompt) -> None:
    """Any prompt (nothing but zero-width spaces, emoji, special tokens' text, thousands of
    tokens): finite embeddings of the fixed shapes, at most a warning (found nothing)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        txt, _, vec = text.encode_prompt(encoders, [prompt], max_length=64)
    assert all(" are used" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert txt.shape == (1, 64, encoders.t5.config.d_model) and txt.isfinite().all()
    assert vec.shape == (1, encoders.clip.config.hidden_size) and vec.isfinite().all()


@pytest.mark.filterwarnings("ignore:32x64")
def test_nan_t5_weights_named(tiny_flux, tmp_path, capsys) -> None:
    """A --t5 file holding a NaN: exit 1, one line naming the text encoders among the causes
    (it named the LoRA, --guidance and fp16 only), no image written."""
    state = load_file(tiny_flux / ENCODERS["t5"] / "model.safetensors")
    state["shared.weight"][:] = float("nan")
    save_file(state, file := tmp_path / "t5xxl_fp16.safetensors")
    argv = [*sample_args(tiny_flux, tmp_path / "o.png"), "--t5", str(file)]
    expect_failure(capsys, sample.main, argv, tmp_path, r"NaN/inf.* text encoders \(NaN")
