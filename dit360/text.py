"""Text conditioning for FLUX: T5-XXL token embeddings (`txt`) and the CLIP-L pooled vector (`vec`),
as diffusers' `FluxPipeline.encode_prompt` computes them. The only module that imports transformers.

Weights come from a FLUX.1-dev folder or a Hugging Face repo of that layout, by default
https://huggingface.co/black-forest-labs/FLUX.1-dev (gated: accept its license first).
"""

import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from .files import open_tensors, resolve
from .offload import MODES, lent, park, stream
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
    device: torch.device = torch.device("cpu")  # where they compute
    offload: str = "none"  # "model": parked, lent to `device` to encode; "blocks": T5's streamed


def _fp32(name: str, dtype: torch.dtype) -> bool:
    """Whether from_pretrained keeps T5's parameter `name` in float32 (`wo` in float16 loads)."""
    keep = set(getattr(T5EncoderModel, "_keep_in_fp32_modules_strict", None) or ())
    keep = keep if dtype in (torch.float16, torch.bfloat16) else set()
    keep |= set(T5EncoderModel._keep_in_fp32_modules or ()) if dtype == torch.float16 else set()
    return not keep.isdisjoint(name.split("."))


def load_t5(folder: Path, device: torch.device | str, dtype: torch.dtype) -> T5EncoderModel:
    """T5 built on the meta device and filled from its safetensors tensor by tensor, straight onto
    `device`: unlike from_pretrained then .to(device), the host never stages the whole model."""
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config.from_pretrained(folder))
    tfile = open_tensors(folder)
    names: dict[int, list[str]] = {}  # tied weights (shared, encoder.embed_tokens): one tensor
    for name, p in t5.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for p in list(t5.parameters()):
        key = next((k for k in names[id(p)] if k in tfile.shapes), None)
        if key is None or tfile.shapes[key] != p.shape:
            raise ValueError(f"{tfile.source}: no tensor {names[id(p)][0]} of shape {p.shape}")
        t = tfile.get(key).to(torch.float32 if _fp32(key, dtype) else dtype).to(device)
        torch.utils.swap_tensors(p, nn.Parameter(t, requires_grad=False))  # ties hold
    return t5.eval().requires_grad_(False)


def load_text_encoders(
    base: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    offload: str = "none",
) -> TextEncoders:
    """Load CLIP and T5 with their tokenizers from a FLUX.1-dev folder or repo id, frozen; with
    `offload` "model" or "blocks" they wait parked in (pinned) host memory, see `dit360.offload`."""
    if offload not in MODES:
        raise ValueError(f"offload must be one of {', '.join(MODES)}, got {offload!r}")
    path = resolve(base, [f"{name}/*" for name in TEXT_FOLDERS], LAYOUT)
    if not path.is_dir():
        raise ValueError(f"{path} is a file, but the text encoders need {LAYOUT}")
    for name in TEXT_FOLDERS:
        if not (path / name).is_dir():
            raise FileNotFoundError(f"{path / name} is missing; expected {LAYOUT}")
    home = device if offload == "none" else "cpu"
    clip = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype)  # small: ~250 MB
    clip = clip.to(home).eval().requires_grad_(False)
    t5 = load_t5(path / "text_encoder_2", home, dtype)  # ~9.5 GB in bf16
    if offload != "none":  # pinned host memory, tensor by tensor
        clip, t5 = park(clip), park(t5)
    return TextEncoders(
        clip_tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        clip=clip,
        t5_tokenizer=T5TokenizerFast.from_pretrained(path / "tokenizer_2"),
        t5=t5,
        device=torch.device(device),
        offload=offload,
    )


@contextmanager
def _on_device(enc: TextEncoders, model: nn.Module) -> Iterator[None]:
    """`model` ready on enc.device for the with-block: lent if offloaded, T5's blocks streamed."""
    with ExitStack() as stack:
        if enc.offload == "blocks" and model is enc.t5:
            stack.callback(stream(list(model.encoder.block), enc.device))
        if enc.offload != "none":
            stack.enter_context(lent(model, enc.device))
        yield


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
    device = enc.device
    # CLIP: 77 tokens (its position table), padded with <|endoftext|>, pooled at the first one.
    ids = _token_ids(enc.clip_tokenizer, prompts, enc.clip.config.max_position_embeddings, "CLIP")
    with _on_device(enc, enc.clip):
        vec = enc.clip(ids.to(device), output_hidden_states=False).pooler_output  # (B, d_clip)
    vec = vec.to(enc.clip.dtype)
    # T5: padded to max_length with <pad>; no attention mask (padding is attended to), like
    # FLUX.1-dev's training and BFL's and diffusers' code.
    ids = _token_ids(enc.t5_tokenizer, prompts, max_length, "T5")  # (B, L)
    with _on_device(enc, enc.t5):
        txt = enc.t5(ids.to(device), output_hidden_states=False)[0]  # (B, L, d_t5)
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
    offload: str = "none",
) -> tuple[Tensor, Tensor, Tensor]:
    """Load the encoders, encode `prompts`, and free the encoders before returning."""
    out = encode_prompt(load_text_encoders(base, device, dtype, offload), prompts, max_length)
    free(device)  # the encoders died with the call: give their ~10 GB back before denoising
    return out
