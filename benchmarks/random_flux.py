"""Random FLUX.1-dev folders in the real Hugging Face layout, at any size up to the full one: what
`FluxPipeline.from_pretrained` and dit360 read (model_index.json, scheduler/, tokenizer/,
tokenizer_2/, text_encoder/ (CLIP-L), text_encoder_2/ (T5-XXL), transformer/, vae/), with sharded
safetensors and their index files. Nothing downloads; nothing is built in memory whole: tensors
are generated one by one (on the GPU if asked, which is fast at full size) and streamed to disk.

Values: seeded normal; weights of 2+ dimensions with std 1/sqrt(fan_in) (activations keep their
scale through 57 blocks, so the image depends on every layer), 1-d weights (norms) 1 + 0.02 n,
biases 0.02 n. The tokenizers are tests/tiny.py's small ones; the embedding tables keep their
configured vocabulary (at full size the real one, so memory is the real model's).
"""

import json
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # dit360 without an install; tests/tiny.py

from dit360.core.autoencoder import AutoEncoder  # noqa: E402
from dit360.load.config import (  # noqa: E402
    AE_PRESETS,
    PRESETS,
    AutoEncoderParams,
    FluxParams,
    to_diffusers_config,
)
from dit360.load.files import write_safetensors  # noqa: E402
from dit360.load.weights import AE_DIFFUSERS, FLUX_DIFFUSERS, meta_flux, split, their_keys  # noqa: E402

# google/t5-v1_1-xxl and openai/clip-vit-large-patch14 as FLUX.1-dev's text_encoder_2/ and
# text_encoder/ config.json give them (CLIP's eos id 2: it pools at the highest token id).
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
    dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)  # fmt: skip
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
    hidden_act="quick_gelu", bos_token_id=0, pad_token_id=1, eos_token_id=2,
)  # fmt: skip


@dataclass(frozen=True)
class Sizes:
    """The four models of a FLUX.1-dev folder; a text encoder's vocab_size None: the tokenizer's."""

    flux: FluxParams = PRESETS["flux-dev"]
    ae: AutoEncoderParams = AE_PRESETS["flux"]
    t5: dict = field(default_factory=lambda: dict(T5_XXL))
    clip: dict = field(default_factory=lambda: dict(CLIP_L))


FULL = Sizes()

# tests/tiny.py's sizes: 2 double + 2 single blocks of 2 heads of 16, a 4-level VAE of 32 channels.
TINY = Sizes(
    flux=FluxParams(
        vec_in_dim=24, context_in_dim=32, hidden_size=32, num_heads=2, depth=2,
        depth_single_blocks=2, axes_dim=(4, 6, 6),
    ),
    ae=AutoEncoderParams(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_num_groups=8),
    t5=dict(T5_XXL, vocab_size=None, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2),
    clip=dict(
        CLIP_L, vocab_size=None, hidden_size=24, intermediate_size=48, projection_dim=24,
        num_hidden_layers=2, num_attention_heads=2,
    ),
)  # fmt: skip


def medium(hidden: int = 256, depth: int = 4, single: int = 8) -> Sizes:
    """FLUX.1-dev's shapes where they meet the inputs (T5 width 4096, CLIP 768, 128-wide heads,
    RoPE axes (16, 56, 56)), fewer and narrower blocks, one-layer text encoders, a narrow VAE."""
    return Sizes(
        flux=FluxParams(hidden_size=hidden, num_heads=hidden // 128, depth=depth,
                        depth_single_blocks=single),
        ae=AutoEncoderParams(ch=32, num_res_blocks=1),
        t5=dict(T5_XXL, vocab_size=None, d_ff=64, num_heads=2, num_layers=1),
        clip=dict(CLIP_L, vocab_size=None, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2),
    )  # fmt: skip


def short_t5(sizes: Sizes, layers: int = 2) -> Sizes:
    """`sizes` with a T5 of `layers` blocks, of the same width and vocabulary: the transformer, the
    VAE and the peaks of denoising stay exact; only T5's seconds, memory and file shrink."""
    return replace(sizes, t5=dict(sizes.t5, num_layers=layers))


def folder_bytes(sizes: Sizes, dtype: torch.dtype = torch.bfloat16, vocab: tuple = (0, 0)) -> int:
    """Bytes the weights of a folder of `sizes` take in `dtype` (a text encoder whose vocab_size is
    None counts `vocab`'s size: the tokenizer's), computed on the meta device."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextConfig(**{**sizes.clip, "vocab_size": sizes.clip["vocab_size"] or vocab[0] or 8})
    t5 = T5Config(**{**sizes.t5, "vocab_size": sizes.t5["vocab_size"] or vocab[1] or 8})
    with torch.device("meta"):
        models = [meta_flux(sizes.flux), AutoEncoder(sizes.ae), CLIPTextModel(clip)]
        models.append(T5EncoderModel(t5))
    numel = sum(sum(torch.Size(s).numel() for s in hf_shapes(m).values()) for m in models)
    return numel * dtype.itemsize


def vae_config(p: AutoEncoderParams) -> dict:
    """diffusers' AutoencoderKL config.json for our VAE parameters (FLUX's structure)."""
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": p.in_channels,
        "out_channels": p.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * len(p.ch_mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(p.ch_mult),
        "block_out_channels": p.channels,
        "layers_per_block": p.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": p.z_channels,
        "norm_num_groups": p.norm_num_groups,
        "sample_size": 1024,
        "scaling_factor": p.scale_factor,
        "shift_factor": p.shift_factor,
        "force_upcast": True,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


def through_table(model: torch.nn.Module, table: list, hidden: int) -> dict[str, tuple]:
    """The diffusers names and shapes of a meta model of ours, through a key table."""
    shapes = {}
    for name, t in model.state_dict().items():
        op, keys = their_keys(name, table)
        parts = split(op, t, len(keys), hidden)
        shapes.update({k: tuple(p.shape) for k, p in zip(keys, parts, strict=True)})
    return shapes


def hf_shapes(model: torch.nn.Module) -> dict[str, tuple]:
    """Names and shapes of a transformers model, one name per tied tensor (loading re-ties)."""
    seen, shapes = set(), {}
    for name, p in model.state_dict(keep_vars=True).items():
        if id(p) not in seen:
            seen.add(id(p))
            shapes[name] = tuple(p.shape)
    return shapes


def values(name: str, shape: tuple, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Seeded random values for one tensor (see the module docstring), generated on `device`."""
    gen = torch.Generator(device).manual_seed(seed * 7919 + zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if len(shape) >= 2:
        t *= torch.Size(shape[1:]).numel() ** -0.5
    else:
        t = 1 + 0.02 * t if name.endswith("weight") else 0.02 * t
    return t.to(dtype)


def write_weights(
    folder: Path,
    stem: str,
    shapes: dict[str, tuple],
    seed: int,
    device: str,
    dtype: torch.dtype,
    shard_bytes: int,
    pool: ThreadPoolExecutor,
) -> list:
    """Shards `{stem}-0000i-of-0000n.safetensors` + index, or one `{stem}.safetensors`."""
    shards, size = [{}], 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if size and size + nbytes > shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][name], size = shape, size + nbytes
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{stem}.safetensors"] if len(shards) == 1 else [
        f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]  # fmt: skip
    if len(shards) > 1:
        total = sum(torch.Size(s).numel() * dtype.itemsize for s in shapes.values())
        weight_map = {k: n for n, shard in zip(names, shards, strict=True) for k in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def write(path: Path, shard: dict) -> None:
        specs = {k: (dtype, s) for k, s in shard.items()}
        tensors = ((k, values(k, s, seed, device, dtype)) for k, s in shard.items())
        write_safetensors(path, specs, tensors, {"format": "pt"})

    return [pool.submit(write, folder / n, shard) for n, shard in zip(names, shards, strict=True)]


def write_flux_folder(
    folder: str | Path,
    sizes: Sizes = FULL,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    shard_gb: float = 5.0,
) -> bool:
    """Write a random FLUX.1-dev folder; reuse one this call already wrote (same sizes, dtype,
    seed). True if written, False if reused."""
    from tiny import MODEL_INDEX, SCHEDULER_CONFIG, write_clip_tokenizer, write_t5_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = Path(folder)
    recipe = json.dumps(dict(sizes=asdict(sizes), dtype=str(dtype), seed=seed), sort_keys=True)
    done = folder / "random-weights.json"  # written last: its presence means complete
    if done.is_file() and done.read_text() == recipe:
        return False
    done.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    vocab = write_clip_tokenizer(folder / "tokenizer"), write_t5_tokenizer(folder / "tokenizer_2")
    clip = CLIPTextConfig(**{**sizes.clip, "vocab_size": sizes.clip["vocab_size"] or vocab[0]})
    t5 = T5Config(**{**sizes.t5, "vocab_size": sizes.t5["vocab_size"] or -(-vocab[1] // 8) * 8})
    clip.architectures, t5.architectures = ["CLIPTextModel"], ["T5EncoderModel"]
    clip.save_pretrained(folder / "text_encoder")
    t5.save_pretrained(folder / "text_encoder_2")
    (folder / "transformer").mkdir(exist_ok=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(to_diffusers_config(sizes.flux)))
    (folder / "vae").mkdir(exist_ok=True)
    (folder / "vae" / "config.json").write_text(json.dumps(vae_config(sizes.ae), indent=2))
    with torch.device("meta"):
        ae, clip_model, t5_model = AutoEncoder(sizes.ae), CLIPTextModel(clip), T5EncoderModel(t5)
    flux = through_table(meta_flux(sizes.flux), FLUX_DIFFUSERS, sizes.flux.hidden_size)
    parts = [  # folder, file stem, names and shapes, seed offset (the files shard as FLUX.1-dev's)
        ("transformer", "diffusion_pytorch_model", flux, 0),
        ("text_encoder_2", "model", hf_shapes(t5_model), 1),
        ("text_encoder", "model", hf_shapes(clip_model), 2),
        ("vae", "diffusion_pytorch_model", through_table(ae, AE_DIFFUSERS, 0), 3),
    ]
    with ThreadPoolExecutor(4) as pool:  # file writes and device copies overlap across shards
        jobs = [
            job
            for sub, stem, shapes, k in parts
            for job in write_weights(
                folder / sub, stem, shapes, seed + k, device, dtype, int(shard_gb * 2**30), pool
            )
        ]
        for job in jobs:
            job.result()
    done.write_text(recipe)
    return True
