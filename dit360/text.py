"""Text conditioning for FLUX: T5-XXL token embeddings (`txt`) and the CLIP-L pooled vector (`vec`),
as diffusers' `FluxPipeline.encode_prompt` computes them. The only module that imports transformers.

Weights come from a FLUX.1-dev folder or a Hugging Face repo of that layout, by default
https://huggingface.co/black-forest-labs/FLUX.1-dev (gated: accept its license first).
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .files import resolve
from .report import free

TEXT_FOLDERS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
LAYOUT = (
    "a FLUX.1-dev folder with tokenizer/ (CLIP), tokenizer_2/ (T5), text_encoder/ (CLIP) and "
    "text_encoder_2/ (T5), or a Hugging Face repo id such as black-forest-labs/FLUX.1-dev"
)


@dataclass
class TextEncoders:
    """The two tokenizers and encoders; drop the object (and empty the CUDA cache) to free them."""

    clip_tokenizer: CLIPTokenizer
    clip: CLIPTextModel
    t5_tokenizer: T5TokenizerFast
    t5: T5EncoderModel


def load_text_encoders(
    base: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> TextEncoders:
    """Load CLIP and T5 with their tokenizers from a FLUX.1-dev folder or repo id, frozen."""
    path = resolve(base, [f"{name}/*" for name in TEXT_FOLDERS], LAYOUT)
    if not path.is_dir():
        raise ValueError(f"{path} is a file, but the text encoders need {LAYOUT}")
    for name in TEXT_FOLDERS:
        if not (path / name).is_dir():
            raise FileNotFoundError(f"{path / name} is missing; expected {LAYOUT}")
    clip = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype)
    t5 = T5EncoderModel.from_pretrained(path / "text_encoder_2", dtype=dtype)
    return TextEncoders(
        clip_tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        clip=clip.to(device).eval().requires_grad_(False),
        t5_tokenizer=T5TokenizerFast.from_pretrained(path / "tokenizer_2"),
        t5=t5.to(device).eval().requires_grad_(False),
    )


def _token_ids(tok: CLIPTokenizer | T5TokenizerFast, texts: list[str], n: int, name: str) -> Tensor:
    """Token ids (B, n): each prompt padded and truncated to n tokens; we warn if cut, not HF."""
    for count in (c for c in map(len, tok(texts, verbose=False).input_ids) if c > n):
        warnings.warn(f"prompt is {count} {name} tokens; only the first {n} are used", stacklevel=2)
    return tok(
        texts, padding="max_length", max_length=n, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompt(
    enc: TextEncoders, prompts: list[str], max_length: int = 512
) -> tuple[Tensor, Tensor, Tensor]:
    """Encode to txt (B, L, d_t5), txt_ids (B, L, 3) zeros, vec (B, d_clip); L = max_length."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    device = enc.clip.device
    # CLIP: 77 tokens (its position table), padded with <|endoftext|>, pooled at the first one.
    ids = _token_ids(enc.clip_tokenizer, prompts, enc.clip.config.max_position_embeddings, "CLIP")
    vec = enc.clip(ids.to(device), output_hidden_states=False).pooler_output  # (B, d_clip)
    vec = vec.to(enc.clip.dtype)
    # T5: padded to max_length with <pad>; no attention mask (padding is attended to), like
    # FLUX.1-dev's training and BFL's and diffusers' code.
    ids = _token_ids(enc.t5_tokenizer, prompts, max_length, "T5")  # (B, L)
    txt = enc.t5(ids.to(enc.t5.device), output_hidden_states=False)[0]  # (B, L, d_t5)
    txt = txt.to(dtype=enc.t5.dtype, device=device)
    # Text tokens take no RoPE position: their ids are all zero.
    txt_ids = torch.zeros(txt.shape[0], txt.shape[1], 3, device=device, dtype=enc.clip.dtype)
    return txt, txt_ids, vec


def encode(
    base: str | Path,
    prompts: list[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    max_length: int = 512,
) -> tuple[Tensor, Tensor, Tensor]:
    """Load the encoders, encode `prompts`, and free the encoders before returning."""
    out = encode_prompt(load_text_encoders(base, device, dtype), prompts, max_length)
    free(device)  # the encoders died with the call: give their ~10 GB back before denoising
    return out
