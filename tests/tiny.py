"""Tiny random FLUX models written in the real folder layouts, for tests (nothing downloads)."""

import io
import json
from pathlib import Path

import torch

# A FLUX.1-dev-shaped transformer, shrunk: 2 double + 2 single blocks, 2 heads of 16, RoPE axes
# summing to the head dim, guidance on. Latent channels stay 16 (64 after 2x2 packing).
TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=64,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Fill every parameter with seeded noise (diffusers zero-inits some layers, hiding bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def diffusers_transformer(seed: int = 0, **overrides):
    """A random diffusers FluxTransformer2DModel with the tiny config."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**{**TINY_TRANSFORMER, **overrides})
    return randomize(model, seed).eval()


def save_transformer(model, folder: Path, shard: str = "40KB") -> Path:
    """Save a diffusers transformer as FLUX.1-dev does: sharded safetensors plus an index."""
    out = Path(folder) / "transformer"
    model.save_pretrained(out, max_shard_size=shard, safe_serialization=True)
    return out


# FLUX.1-dev's VAE, shrunk: same 4 levels (x8 down-sampling), 16 latent channels, no quant convs,
# the published scale/shift, a mid-block attention; 32 channels per level in FLUX's 32 groups (a
# BFL ae.safetensors has no config: the groups cannot be read from the shapes).
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 32, 32),
    layers_per_block=1,
    act_fn="silu",
    latent_channels=16,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)

# CLIP-L shrunk: its pooled output (width = hidden size) feeds `pooled_projection_dim`; heads are
# 64 wide as in CLIP-L (a clip_l.safetensors has no config: the head count follows from that).
# eos_token_id 2 is what FLUX.1-dev's config says: CLIP then pools at argmax(input_ids), i.e. at
# the first <|endoftext|>, which is the highest id of the vocabulary.
TINY_CLIP = dict(
    hidden_size=TINY_TRANSFORMER["pooled_projection_dim"],
    intermediate_size=96,
    projection_dim=TINY_TRANSFORMER["pooled_projection_dim"],
    num_hidden_layers=2,
    num_attention_heads=1,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=0,
    pad_token_id=1,
    eos_token_id=2,
)

# T5-v1.1-XXL shrunk: gated-GELU feed-forward, relative position buckets as in the real one.
TINY_T5 = dict(
    d_model=TINY_TRANSFORMER["joint_attention_dim"],
    d_ff=64,
    d_kv=8,
    num_heads=4,
    num_layers=2,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
    dropout_rate=0.0,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)

# Words for the tiny vocabularies: enough that prompts mostly map to whole words.
WORDS = (
    "a an the of in on at with and under over by from to is are this that its two "
    "panorama panoramic 360 degree view equirectangular photo image scene picture wide "
    "mountain mountains lake river sea ocean beach island forest trees tree field grass "
    "snow desert canyon valley hills sky clouds cloudy sun sunset sunrise night stars moon "
    "city street road bridge building buildings tower house room interior hall church "
    "museum office kitchen bedroom window light lights neon warm cold blue green red gold "
    "golden white black bright dark old modern beautiful large small quiet busy people "
    "car cars boat boats water reflection hour evening morning winter summer autumn spring"
).split()

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def save_autoencoder(model, path: Path) -> Path:
    """Write our VAE as one BFL-layout safetensors file with its config in the metadata."""
    from dit360.load.config import to_json
    from dit360.load.files import write_safetensors
    from dit360.load.weights import AE_CONFIG_KEY

    state = model.state_dict()
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in state.items()}
    write_safetensors(path, specs, state.items(), {AE_CONFIG_KEY: to_json(model.params)})
    return Path(path)


def diffusers_vae(seed: int = 0, **overrides):
    """A random diffusers AutoencoderKL with FLUX's structure, tiny."""
    from diffusers import AutoencoderKL

    model = AutoencoderKL(**{**TINY_VAE, **overrides})
    return randomize(model, seed).eval()


def _write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented JSON, creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte alphabet: 256 printable characters, one per byte value, in vocab order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def write_clip_tokenizer(folder: Path) -> int:
    """Write a byte-level BPE CLIP tokenizer (vocab.json, merges.txt, configs); return its size."""
    base = _bytes_to_unicode()
    vocab = base + [c + "</w>" for c in base]
    merges: list[str] = []
    for word in WORDS:  # merge each word left to right into one token: "t h", "th e</w>"
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge, merged = f"{parts[0]} {parts[1]}", parts[0] + parts[1]
            if merge not in merges:
                merges.append(merge)
                vocab.append(merged)
            parts = [merged, *parts[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # the two highest ids, as in CLIP
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", {tok: i for i, tok in enumerate(vocab)})
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = dict(lstrip=False, normalized=True, rstrip=False, single_word=False, special=True)
    bos, eos = len(vocab) - 2, len(vocab) - 1
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(bos): {"content": "<|startoftext|>", **special},
                str(eos): {"content": "<|endoftext|>", **special},
            },
            "bos_token": "<|startoftext|>",
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": "<|endoftext|>",
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": "<|endoftext|>",
        },
    )
    token = dict(lstrip=False, normalized=True, rstrip=False, single_word=False)
    _write_json(
        folder / "special_tokens_map.json",
        {
            "bos_token": {"content": "<|startoftext|>", **token},
            "eos_token": {"content": "<|endoftext|>", **token},
            "pad_token": {"content": "<|endoftext|>", **token},
            "unk_token": {"content": "<|endoftext|>", **token},
        },
    )
    return len(vocab)


def write_t5_tokenizer(folder: Path, extra_ids: int = 100) -> int:
    """Train a tiny sentencepiece unigram model and write T5's tokenizer folder; return its size."""
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    # Sentences from the word list, in a fixed order, so training is deterministic.
    corpus = [" ".join(WORDS[i : i + 7]) for i in range(0, len(WORDS), 3)]
    corpus += [s.capitalize() + "." for s in corpus] + ["0123456789 , . ! ? ' - ( ) :"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="unigram",
        vocab_size=400,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,  # T5's ids: <pad> 0, </s> 1, <unk> 2, no <s>
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    n = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    special = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    names = {0: "<pad>", 1: "</s>", 2: "<unk>"}
    names |= {n + extra_ids - 1 - i: f"<extra_id_{i}>" for i in range(extra_ids)}  # reversed
    extra = [f"<extra_id_{i}>" for i in range(extra_ids)]
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": True,
            "added_tokens_decoder": {str(i): {"content": s, **special} for i, s in names.items()},
            "additional_special_tokens": extra,
            "clean_up_tokenization_spaces": True,
            "eos_token": "</s>",
            "extra_ids": extra_ids,
            "legacy": True,
            "model_max_length": 512,
            "pad_token": "<pad>",
            "sp_model_kwargs": {},
            "tokenizer_class": "T5Tokenizer",
            "unk_token": "<unk>",
        },
    )
    token = dict(lstrip=False, normalized=False, rstrip=False, single_word=False)
    _write_json(
        folder / "special_tokens_map.json",
        {
            "additional_special_tokens": extra,
            "eos_token": {"content": "</s>", **token},
            "pad_token": {"content": "<pad>", **token},
            "unk_token": {"content": "<unk>", **token},
        },
    )
    # FLUX.1-dev also ships the converted fast tokenizer next to spiece.model.
    T5TokenizerFast.from_pretrained(folder).backend_tokenizer.save(str(folder / "tokenizer.json"))
    return n + extra_ids


def write_text_encoders(folder: Path, seed: int = 0) -> None:
    """Write tokenizer/, tokenizer_2/, text_encoder/ (CLIP) and text_encoder_2/ (T5), random."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_vocab = write_clip_tokenizer(folder / "tokenizer")
    t5_vocab = write_t5_tokenizer(folder / "tokenizer_2")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=clip_vocab, **TINY_CLIP))
    randomize(clip, seed).save_pretrained(folder / "text_encoder")
    t5_vocab = -(-t5_vocab // 8) * 8  # padded to a multiple of 8, like T5's 32128
    t5 = T5EncoderModel(T5Config(vocab_size=t5_vocab, **TINY_T5))
    randomize(t5, seed + 1).save_pretrained(folder / "text_encoder_2")


def write_tiny_pipeline(folder: Path, seed: int = 0) -> Path:
    """Write a complete tiny random FLUX.1-dev folder that FluxPipeline.from_pretrained reads."""
    folder = Path(folder)
    _write_json(folder / "model_index.json", MODEL_INDEX)
    _write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    write_text_encoders(folder, seed)
    save_transformer(diffusers_transformer(seed + 2), folder)
    diffusers_vae(seed + 3).save_pretrained(folder / "vae")
    return folder
