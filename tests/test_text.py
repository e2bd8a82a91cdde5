"""Text encoders against diffusers' FluxPipeline on the tiny FLUX.1-dev folder, and bad input."""

import shutil
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import torch
from torch.testing import assert_close

from dit360 import text

PROMPTS = [
    "A beautiful 360-degree panorama of a mountain lake at sunset, café lights & reflections!",
    # Longer than 77 CLIP tokens (and truncated there), well under 512 T5 tokens.
    " ".join(["a quiet city street at night with neon lights and people"] * 12),
]


@pytest.fixture(scope="module")
def pipe(tiny_flux: Path):
    """diffusers' FluxPipeline on the tiny folder, float32 on CPU."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux, dtype=torch.float32)


def test_pipeline_generates(pipe) -> None:
    """The tiny folder is a working FLUX.1-dev pipeline: a 32x64 image in 2 steps."""
    gen = torch.Generator("cpu").manual_seed(0)
    out = pipe(
        "a panorama", height=32, width=64, num_inference_steps=2, generator=gen, output_type="pt"
    )
    assert out.images.shape == (1, 3, 32, 64)
    assert torch.isfinite(out.images).all()


def test_long_prompt_is_truncated_by_clip(pipe) -> None:
    """The second prompt really exceeds CLIP's 77 tokens (so truncation is exercised)."""
    assert len(pipe.tokenizer(PROMPTS[1]).input_ids) > 77
    assert len(pipe.tokenizer_2(PROMPTS[1]).input_ids) < 512


def test_encode_prompt_matches_diffusers(pipe, tiny_flux: Path) -> None:
    """txt, txt_ids and vec equal FluxPipeline.encode_prompt on a batch of two prompts."""
    enc = text.load_text_encoders(tiny_flux, "cpu", torch.float32)
    txt, txt_ids, vec = text.encode_prompt(enc, PROMPTS)
    with torch.no_grad():  # as in FluxPipeline.__call__ (SDPA picks another kernel under grad)
        ref_txt, ref_vec, ref_ids = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"))
    assert txt.shape == (2, 512, 32) and vec.shape == (2, 24) and txt_ids.shape == (2, 512, 3)
    assert txt.dtype == vec.dtype == txt_ids.dtype == torch.float32
    assert_close(txt, ref_txt, rtol=0, atol=0)
    assert_close(vec, ref_vec, rtol=0, atol=0)
    assert_close(txt_ids, ref_ids.expand(2, -1, -1), rtol=0, atol=0)
    assert vec[0].ne(vec[1]).any() and txt[0].ne(txt[1]).any()  # prompts differ, outputs too


def test_encode_frees_and_matches(tiny_flux: Path) -> None:
    """The one-shot encode() gives the same tensors as load + encode_prompt, short max_length."""
    enc = text.load_text_encoders(str(tiny_flux), "cpu", torch.float32)
    want = text.encode_prompt(enc, PROMPTS, max_length=64)
    got = text.encode(str(tiny_flux), PROMPTS, "cpu", torch.float32, max_length=64)
    assert got[0].shape == (2, 64, 32)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, rtol=0, atol=0)


def test_missing_folder(tmp_path: Path) -> None:
    """A missing local folder names the path and the expected layout."""
    with pytest.raises(FileNotFoundError, match="does-not-exist.*text_encoder_2"):
        text.load_text_encoders(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="does-not-exist.*text_encoder_2"):
        text.load_text_encoders(f"{tmp_path}/does-not-exist")


def test_missing_subfolder(tiny_flux: Path, tmp_path: Path) -> None:
    """A folder without text_encoder_2/ names the missing subfolder."""
    for name in ("tokenizer", "tokenizer_2", "text_encoder"):
        shutil.copytree(tiny_flux / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match="text_encoder_2 is missing.*FLUX.1-dev"):
        text.load_text_encoders(tmp_path)


def test_file_instead_of_folder(tmp_path: Path) -> None:
    """A single file is not a text-encoder source."""
    (tmp_path / "flux1-dev.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        text.load_text_encoders(tmp_path / "flux1-dev.safetensors")


def test_repo_not_cached_offline() -> None:
    """An uncached repo id in offline mode says so and names the expected layout."""
    with pytest.raises(
        FileNotFoundError, match="not in the Hugging Face cache.*local folder.*FLUX.1-dev"
    ):
        text.load_text_encoders("no-such-user/no-such-model")


def test_gated_repo_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gated repo tells the user to accept the license and log in."""

    def gated(*args, **kwargs):
        # GatedRepoError wants an HTTP response object; bypass __init__ to stay offline.
        err = huggingface_hub.errors.GatedRepoError.__new__(huggingface_hub.errors.GatedRepoError)
        Exception.__init__(err, "403 gated")
        raise err

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(PermissionError, match=r"accept its license.*hf auth login.*HF_TOKEN"):
        text.load_text_encoders("black-forest-labs/FLUX.1-dev")


def test_long_prompt_warns(tiny_flux: Path) -> None:
    """A prompt over T5's 512 or CLIP's 77 tokens is cut with a warning giving the token count;
    a short one is encoded silently."""
    enc = text.load_text_encoders(tiny_flux, "cpu", torch.float32)
    long = " ".join(["a quiet city street at night with neon lights and people"] * 60)
    counts = [len(tok(long).input_ids) for tok in (enc.clip_tokenizer, enc.t5_tokenizer)]
    assert counts[1] > 512
    with pytest.warns(UserWarning) as record:
        txt, _, _ = text.encode_prompt(enc, [long])
    assert [str(w.message) for w in record] == [
        f"prompt is {counts[0]} CLIP tokens; only the first 77 are used",
        f"prompt is {counts[1]} T5 tokens; only the first 512 are used",
    ]
    assert txt.shape == (1, 512, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text.encode_prompt(enc, PROMPTS[:1])
