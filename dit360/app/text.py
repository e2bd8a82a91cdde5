"""Text conditioning for FLUX: T5-XXL token embeddings (`txt`) and the CLIP-L pooled vector (`vec`),
as diffusers' `FluxPipeline.encode_prompt`; the only module importing transformers. Weights: a
folder of https://huggingface.co/black-forest-labs/FLUX.1-dev's layout (gated: accept its terms)."""

import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..load.files import MAX_TEXT, Rule, TensorFile, check_json, number, read_json, whole
from ..load.sources import TOKENIZER_REPOS, Part, Sources, config_beside, flagged, resolve_sources
from ..load.weights import float_dtype
from ..memory.fp8 import to_fp8
from ..memory.offload import MODES, lent, park, stream
from .cli import check_prompt
from .report import free

# CLIP-L as FLUX.1-dev's text_encoder/config.json has it; sizes come from the tensors. Heads are
# 64 wide in CLIP-L (and G); eos_token_id 2 makes CLIP pool at argmax(ids), the first end token.
CLIP_L = dict(hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)
# Tensors the CLIP-L files carry that CLIPTextModel has not (ComfyUI's and older saves).
CLIP_EXTRAS = ("text_projection.weight", "logit_scale", "text_model.embeddings.position_ids")


@dataclass
class TextEncoders:
    """The two tokenizers and encoders; drop the object (and empty the CUDA cache) to free them."""

    clip_tokenizer: CLIPTokenizerFast
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


def t5_config(tfile: TensorFile) -> T5Config:
    """T5 encoder sizes from the tensors (the relative position table is (buckets, heads))."""
    shapes = tfile.shapes
    vocab, d_model = shapes.get("shared.weight") or shapes["encoder.embed_tokens.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    ff = "encoder.block.0.layer.1.DenseReluDense."
    gated = ff + "wi_0.weight" in shapes
    return T5Config(
        vocab_size=vocab, d_model=d_model, num_heads=heads, relative_attention_num_buckets=buckets,
        d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        d_ff=shapes[ff + ("wi_0.weight" if gated else "wi.weight")][0],
        num_layers=len({k.split(".")[2] for k in shapes if k.startswith("encoder.block.")}),
        feed_forward_proj="gated-gelu" if gated else "relu", relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6, tie_word_embeddings=False,
    )  # fmt: skip


def clip_config(tfile: TensorFile) -> CLIPTextConfig:
    """CLIP text encoder sizes from the tensors, the rest as FLUX.1-dev's CLIP-L."""
    shapes = {k.removeprefix("text_model."): v for k, v in tfile.shapes.items()}
    vocab, hidden = shapes["embeddings.token_embedding.weight"]
    return CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=shapes["embeddings.position_embedding.weight"][0],
        intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=len({k.split(".")[2] for k in shapes if k.startswith("encoder.layers.")}),
        projection_dim=hidden, **CLIP_L,
    )  # fmt: skip


Checked = tuple[TensorFile, nn.Module, dict[int, str]]  # a text encoder's tensors, meta model, keys


def check_encoder(part: Part, kind: str) -> Checked:
    """A text encoder's tensors, meta model and `_keys`; its config.json, else the tensors'."""
    tfile = part.open()
    cls, model_type, infer, model_cls = ENCODERS[kind]
    found = config_beside(part.path, model_type=model_type) if not part.prefix else None
    where = str(found[1] if found else part)
    try:
        if found is None:
            config = infer(tfile)
        else:
            config = cls.from_dict(check_json(found[0], ENCODER_RULES, where))
        # the sizes read from the tensors too (a 0-row position table: a late error)
        check_json(config.to_dict(), ENCODER_RULES, where)
    except KeyError as e:
        raise ValueError(f"{part} is not a {kind.upper()} text encoder: no tensor {e}") from None
    except Exception as e:  # noqa: BLE001 - transformers checks a config with errors of many kinds
        message = " ".join(str(e).split())
        raise ValueError(message if message.startswith(where) else f"{part}: {message}") from None
    try:
        with torch.device("meta"):
            model = model_cls(config)
    except (ValueError, KeyError, TypeError) as e:  # an unknown activation, heads that do not fit
        raise ValueError(f"{part}: its config makes no {kind.upper()} encoder: {e}") from None
    return tfile, model, _keys(model, tfile, part)


# The sizes of T5's and CLIP's config.json, bounded far above T5-XXL's and CLIP-L's (and more
# than a file could hold), so that a config can never make us build a huge model.
SIZE, LAYERS = whole(1, 2**16), whole(1, 256)
ENCODER_RULES: dict[str, Rule] = {
    "vocab_size": whole(1, 2**20), "d_model": SIZE, "d_ff": SIZE, "d_kv": SIZE, "num_heads": SIZE,
    "num_layers": LAYERS, "relative_attention_num_buckets": SIZE,
    "relative_attention_max_distance": SIZE, "hidden_size": SIZE, "intermediate_size": SIZE,
    "num_attention_heads": SIZE, "num_hidden_layers": LAYERS, "max_position_embeddings": SIZE,
    "projection_dim": SIZE, "layer_norm_epsilon": number(0, 1), "layer_norm_eps": number(0, 1),
}  # fmt: skip


ENCODERS = {  # config class, config.json's model_type, config from the tensors, model class
    "t5": (T5Config, "t5", t5_config, T5EncoderModel),
    "clip": (CLIPTextConfig, "clip_text_model", clip_config, CLIPTextModel),
}


def _keys(model: nn.Module, tfile: TensorFile, part: Part) -> dict[int, str]:
    """The file's key per parameter id; ValueError if any is missing, misshapen or left over."""
    names: dict[int, list[str]] = {}  # tied weights (shared, encoder.embed_tokens): one tensor
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    keys, used, problems = {}, set(), []
    params = {id(p): p for p in model.parameters()}
    for pid, ns in names.items():
        spellings = [s for n in ns for s in (n, "text_model." + n, n.removeprefix("text_model."))]
        key = next((k for k in spellings if k in tfile.shapes), None)
        if key is None or tfile.shapes[key] != params[pid].shape:
            problems.append(f"{ns[0]} {tuple(params[pid].shape)}")
            continue
        if not tfile.dtypes[key].is_floating_point:  # int8, bool: not weights we can read
            problems.append(f"{key} of {tfile.dtypes[key]}")
        keys[pid] = key
        used.update(k for k in spellings if k in tfile.shapes)
    extra = [k for k in tfile.shapes if k not in used and k not in CLIP_EXTRAS]
    if problems or extra:
        raise ValueError(
            f"{part} does not fit its {type(model).__name__}: missing or misshapen "
            f"{problems[:5]}, unexpected {extra[:5]}"
        )
    return keys


def load_encoder(
    part: Part | Checked,
    kind: str,
    device: torch.device | str,
    dtype: torch.dtype,
    fp8: bool = False,
) -> T5EncoderModel | CLIPTextModel:
    """A text encoder (`part` or its `check_encoder`) read tensor by tensor; fp8: T5's in float8."""
    if fp8 and kind != "t5":
        raise ValueError(f"fp8 text encoders: T5 only, not {kind}")
    dtype = float_dtype(dtype)
    tfile, model, keys = part if isinstance(part, tuple) else check_encoder(part, kind)
    # Not the feed-forward's `wo`: T5 casts its input to its weight dtype (float8 would wreck it)
    # and keeps it in float32 for 8-bit and float16 loads, as precision-critical.
    targets = {
        id(m.weight): name
        for name, m in model.named_modules()
        if fp8 and isinstance(m, nn.Linear) and not name.endswith(".wo")
    }
    for p in list(model.parameters()):
        key = keys[id(p)]
        t = tfile.get(key).to(torch.float32 if _fp32(key, dtype) else dtype).to(device)
        torch.utils.swap_tensors(p, nn.Parameter(t, requires_grad=False))  # ties hold
        if id(p) in targets:  # T5's linears have no bias: the weight is all there is to read
            parent, _, child = targets[id(p)].rpartition(".")
            parent = model.get_submodule(parent)
            setattr(parent, child, to_fp8(getattr(parent, child), weight_only=True))
            p.data = p.data.new_empty(0)  # the list above still holds it: free it now
    for module in model.modules():  # CLIP's position ids: a buffer the file need not hold
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                ids = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
                module.register_buffer(name, ids, persistent=False)
    return model.eval().requires_grad_(False)


def load_text_encoders(
    src: str | Path | Sources,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    offload: str = "none",
    t5_fp8: bool = False,
) -> TextEncoders:
    """CLIP and T5, frozen, with tokenizers (`Sources`, a folder or repo id); offloaded: parked."""
    if offload not in MODES:
        raise ValueError(f"offload must be one of {', '.join(MODES)}, got {offload!r}")
    src = src if isinstance(src, Sources) else resolve_sources(str(src), parts=("t5", "clip"))
    checked = check_encoders(src)
    clip_tokenizer, t5_tokenizer = load_tokenizers(src, checked)  # before the ~10 GB they check
    home = device if offload == "none" else "cpu"
    clip = load_encoder(checked["clip"], "clip", home, dtype)  # small: ~250 MB
    t5 = load_encoder(checked["t5"], "t5", home, dtype, t5_fp8)  # ~9.5 GB in bf16, 5.8 GB with fp8
    if offload != "none":  # pinned host memory, tensor by tensor
        clip, t5 = park(clip), park(t5)
    return TextEncoders(clip_tokenizer, clip, t5_tokenizer, t5, torch.device(device), offload)


# Each tokenizer's class and the files it reads its vocabulary from (one of them is needed).
# The fast (tokenizers-backed) classes, transformers 5's only ones: 4.x gives 5's ids.
Tokenizer = CLIPTokenizerFast | T5TokenizerFast
TOKENIZERS = {
    "clip": (CLIPTokenizerFast, ("tokenizer.json", "vocab.json")),
    "t5": (T5TokenizerFast, ("tokenizer.json", "spiece.model")),
}

# Token lists transformers adds one at a time, in quadratic time (200,000 tokens: an hour);
# FLUX.1-dev's T5 tokenizer has 103.
TOKEN_LISTS: dict[str, Rule] = {
    k: ((list, dict), lambda v: len(v) <= 1000, "at most 1,000 tokens")
    for k in ("additional_special_tokens", "extra_special_tokens", "added_tokens_decoder")
}


def check_encoders(src: Sources) -> dict[str, Checked]:
    """CLIP's and T5's `check_encoder`, an error led by where its file came from (`src.origin`)."""
    return {
        k: flagged(src.origin.get(k, ""), check_encoder, getattr(src, k), k) for k in TOKENIZERS
    }


def load_tokenizers(
    src: Sources, checked: dict[str, Checked] | None = None
) -> tuple[CLIPTokenizerFast, T5TokenizerFast]:
    """CLIP's and T5's tokenizers checked against their encoders (`checked`, else made here)."""
    checked = checked or check_encoders(src)
    return tuple(
        flagged(src.origin.get(f"{k}_tokenizer", ""), load_tokenizer, src, k, checked[k][1])
        for k in TOKENIZERS
    )


def load_tokenizer(src: Sources, kind: str, encoder: nn.Module) -> Tokenizer:
    """`kind`'s tokenizer (files bounded, no code run, ids its `encoder` embeds), or ValueError."""
    cls, needs = TOKENIZERS[kind]
    folder, part = getattr(src, f"{kind}_tokenizer"), getattr(src, kind)
    repo = TOKENIZER_REPOS[f"{kind}_tokenizer"][0]
    config = encoder.config  # the ids it embeds; where CLIP pools
    try:
        for f in (f for f in folder.iterdir() if f.suffix in (".json", ".txt", ".model", ".jinja")):
            if not f.is_file() or f.stat().st_size > MAX_TEXT:  # a FIFO, /dev/zero, 8 GB
                raise ValueError(f"{f.name} is not a file of at most {MAX_TEXT:,} bytes")
            if f.name in ("tokenizer_config.json", "special_tokens_map.json"):
                check_json(read_json(f), TOKEN_LISTS, f.name)
        if not any((folder / f).is_file() for f in needs):
            raise ValueError(f"no {' or '.join(needs)}")
        # T5's add_prefix_space (FLUX.1-dev's tokenizer_config sets it) made transformers 4.x
        # rebuild tokenizer.json from spiece.model: a warning, and an error without protobuf (no
        # dependency of ours). Unset, tokenizer.json gives the same ids.
        fast = kind == "t5" and (folder / "tokenizer.json").is_file()
        kwargs = {"add_prefix_space": None} if fast else {}
        tok = cls.from_pretrained(folder, **kwargs)  # trust_remote_code off: no auto_map is run
        if (top := max(tok.get_vocab().values())) >= config.vocab_size:  # an IndexError later
            raise ValueError(f"ids up to {top}, but {part} embeds ids below {config.vocab_size}")
        pools = top if config.eos_token_id == 2 else config.eos_token_id  # transformers' rule
        if kind == "clip" and tok.eos_token_id != pools:  # another tokenizer (T5's), silently
            raise ValueError(f"its end token is id {tok.eos_token_id}; {part} pools at id {pools}")
        _token_ids(tok, ["a"], 8, kind)  # as encoding calls it (a model_max_length of "77")
    except Exception as e:  # noqa: BLE001 - transformers and tokenizers fail with many kinds
        what = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(
            f"{folder} is not a {kind.upper()} tokenizer ({what}): use {repo}'s files"
        ) from None
    return tok


@contextmanager
def _on_device(enc: TextEncoders, model: nn.Module) -> Iterator[None]:
    """`model` ready on enc.device for the with-block: lent if offloaded, T5's blocks streamed."""
    with ExitStack() as stack:
        if enc.offload == "blocks" and model is enc.t5:
            stack.callback(stream(list(model.encoder.block), enc.device))
        if enc.offload != "none":
            stack.enter_context(lent(model, enc.device))
        yield


def _token_ids(tok: Tokenizer, texts: list[str], n: int, name: str) -> Tensor:
    """Token ids (B, n): each prompt padded and truncated to n tokens; we warn if cut, not HF."""
    for text, ids in zip(texts, tok(texts, verbose=False).input_ids, strict=True):
        if len(ids) > n:
            what = repr(text if len(text) <= 60 else f"{text[:28]}...{text[-28:]}")  # its ends
            warnings.warn(f"prompt {what} is {len(ids)} {name} tokens: {n} are used", stacklevel=2)
    pad = dict(padding="max_length", max_length=n, truncation=True, return_tensors="pt")
    return tok(texts, **pad).input_ids


@torch.no_grad()
def encode_prompt(
    enc: TextEncoders, prompts: list[str], max_length: int = 512
) -> tuple[Tensor, Tensor, Tensor]:
    """Encode to txt (B, L, d_t5), txt_ids (B, L, 3) zeros, vec (B, d_clip); L = max_length."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    for p in prompts:  # before the tokenizer: a 100 MB prompt aborts it, 10 MB takes a minute
        check_prompt(p, f"prompt {p[:28]!r}...")
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
