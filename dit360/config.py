"""Reading a model configuration (the dataclasses and presets are `dit360.core.params`').

A configuration comes from a preset, a diffusers `config.json`, our safetensors metadata (JSON), or
the tensor shapes of a checkpoint, so a tiny test model loads exactly like FLUX.1-dev.
"""

import json
from pathlib import Path

from .core.params import AE_PRESETS, PRESETS, AutoEncoderParams, FluxParams  # noqa: F401

FLUX_DEV = "black-forest-labs/FLUX.1-dev"  # the base model's Hugging Face repo (gated)
DIT360_LORA = "Insta360-Research/DiT360-Panorama-Image-Generation"  # the published LoRA

# FLUX.1 uses (16, 56, 56) for its 128-wide heads; the split is not recorded in the weights.
DEFAULT_AXES = {128: (16, 56, 56)}

# Our field -> the key of diffusers' FluxTransformer2DModel config (hidden size: heads x head dim).
FLUX_CONFIG_KEYS = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "vec_in_dim": "pooled_projection_dim",
    "context_in_dim": "joint_attention_dim",
    "num_heads": "num_attention_heads",
    "depth": "num_layers",
    "depth_single_blocks": "num_single_layers",
    "axes_dim": "axes_dims_rope",
    "guidance_embed": "guidance_embeds",
}


def _read_config(config: dict | str | Path, keys: dict[str, str]) -> tuple[dict, dict]:
    """A diffusers config (a dict or a path to config.json), and our fields it sets via `keys`."""
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    return config, {ours: config[k] for ours, k in keys.items() if config.get(k) is not None}


def _count(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    """How many numbered modules `{prefix}{n}.` the checkpoint has."""
    return len({k[len(prefix) :].split(".")[0] for k in shapes if k.startswith(prefix)})


def from_diffusers_config(config: dict | str | Path) -> FluxParams:
    """Read a diffusers `FluxTransformer2DModel` config.json (a dict or a path)."""
    config, ours = _read_config(config, FLUX_CONFIG_KEYS)
    if config.get("patch_size", 1) != 1:
        raise ValueError(f"only patch_size 1 is supported, config has {config['patch_size']}")
    ours.setdefault("out_channels", ours.get("in_channels", 64))
    ours.setdefault("guidance_embed", False)  # diffusers' default
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return FluxParams(**ours, hidden_size=hidden)


def to_diffusers_config(p: FluxParams) -> dict:
    """The diffusers config.json for these parameters."""
    if p.mlp_ratio != 4.0 or not p.qkv_bias:
        raise ValueError("diffusers' FluxTransformer2DModel needs mlp_ratio 4 and qkv biases")
    theirs = {k: getattr(p, ours) for ours, k in FLUX_CONFIG_KEYS.items()}
    theirs.update(attention_head_dim=p.head_dim, axes_dims_rope=list(p.axes_dim))
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, **theirs}


def from_shapes(
    shapes: dict[str, tuple[int, ...]], axes_dim: tuple[int, ...] | None = None
) -> FluxParams:
    """Infer `FluxParams` from the BFL-named tensor shapes of a checkpoint."""
    try:
        hidden, in_channels = shapes["img_in.weight"]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        params = dict(
            in_channels=in_channels,
            out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / hidden,
            num_heads=hidden // head_dim,
            depth=_count(shapes, "double_blocks."),
            depth_single_blocks=_count(shapes, "single_blocks."),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except KeyError as e:
        raise ValueError(f"not a FLUX transformer checkpoint: tensor {e} is missing") from None
    axes_dim = axes_dim or DEFAULT_AXES.get(head_dim)
    if axes_dim is None:
        raise ValueError(
            f"head dim {head_dim}: the RoPE axes are not stored in the weights; pass axes_dim "
            "or load from a folder with a config.json"
        )
    return FluxParams(**params, axes_dim=tuple(axes_dim))


# Our field -> the key of diffusers' AutoencoderKL config (`ch`, `ch_mult`: block_out_channels).
AE_CONFIG_KEYS = {
    "resolution": "sample_size",
    "in_channels": "in_channels",
    "out_ch": "out_channels",
    "num_res_blocks": "layers_per_block",
    "z_channels": "latent_channels",
    "scale_factor": "scaling_factor",
    "shift_factor": "shift_factor",
    "norm_num_groups": "norm_num_groups",
}


def ae_from_diffusers_config(config: dict | str | Path) -> AutoEncoderParams:
    """Read a diffusers `vae/config.json` (AutoencoderKL) as a dict or a path."""
    config, ours = _read_config(config, AE_CONFIG_KEYS)
    if config.get("use_quant_conv", True) or config.get("use_post_quant_conv", True):
        raise ValueError("the FLUX VAE has no quant_conv/post_quant_conv: set both to false")
    if not config.get("mid_block_add_attention", True) or config.get("act_fn", "silu") != "silu":
        raise ValueError("the FLUX VAE has a mid-block attention and silu activations")
    widths = list(config["block_out_channels"])
    if any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first")
    ours.setdefault("shift_factor", 0.0)  # diffusers' default, unlike FLUX's
    return AutoEncoderParams(**ours, ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths))


def ae_from_shapes(
    shapes: dict[str, tuple[int, ...]], norm_num_groups: int = 32
) -> AutoEncoderParams:
    """Infer the config from BFL-named shapes; scale/shift (not stored) are FLUX's."""
    try:
        ch, in_channels = shapes["encoder.conv_in.weight"][:2]
        widths = [
            shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]
            for i in range(_count(shapes, "encoder.down."))
        ]
        return AutoEncoderParams(
            in_channels=in_channels,
            ch=ch,
            out_ch=shapes["decoder.conv_out.weight"][0],
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=_count(shapes, "encoder.down.0.block."),
            z_channels=shapes["decoder.conv_in.weight"][1],
            norm_num_groups=norm_num_groups,
        )
    except KeyError as e:
        raise ValueError(f"not a FLUX autoencoder checkpoint: tensor {e} is missing") from None
