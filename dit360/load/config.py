"""Reading a model configuration (the dataclasses and presets are `dit360.core.params`'): from a
preset, a diffusers `config.json`, our safetensors metadata (JSON) or a checkpoint's tensor shapes.
"""

import json
from dataclasses import asdict
from pathlib import Path

from ..core.params import AE_PRESETS, PRESETS, AutoEncoderParams, FluxParams  # noqa: F401
from .files import FLAG, Rule, check_json, listed, number, parse_json, read_json, whole

# Bounds of every size a config may give, far above FLUX.1's, so that a config can never make us
# build a model larger than a file could hold: widths and channels, block counts.
SIZE, BLOCKS = whole(1, 2**16), whole(0, 1024)

# What each field of our params may hold (checked before any model is built from them).
FLUX_RULES: dict[str, Rule] = {
    "in_channels": SIZE, "out_channels": SIZE, "vec_in_dim": SIZE, "context_in_dim": SIZE,
    "hidden_size": SIZE, "mlp_ratio": number(1 / 64, 64), "num_heads": SIZE,
    "depth": BLOCKS, "depth_single_blocks": BLOCKS, "axes_dim": listed(SIZE, range(1, 9)),
    "theta": whole(1, 2**31), "qkv_bias": FLAG, "guidance_embed": FLAG,
}  # fmt: skip
AE_RULES: dict[str, Rule] = {
    "resolution": SIZE, "in_channels": SIZE, "ch": SIZE, "out_ch": SIZE,
    "ch_mult": listed(whole(1, 64), range(1, 9)), "num_res_blocks": whole(1, 16),
    "z_channels": SIZE, "scale_factor": number(1e-6, 1e6), "shift_factor": number(-1e6, 1e6),
    "norm_num_groups": SIZE,
}  # fmt: skip
RULES = {FluxParams: FLUX_RULES, AutoEncoderParams: AE_RULES}


def checked(cls: type, values: dict, where: str):
    """`cls` (FluxParams or AutoEncoderParams) of `values` within RULES, or ValueError at `where`"""
    check_json(values, RULES[cls], where)
    try:
        return cls(**values)
    except ValueError as e:  # what the fields say together (divisibility, RoPE axes)
        raise ValueError(f"{where}: {e}") from None


def to_json(params: FluxParams | AutoEncoderParams) -> str:
    """The JSON we store in safetensors metadata (read back, checked, by `from_json`)."""
    return json.dumps(asdict(params), sort_keys=True)


def from_json(cls: type, text: str, where: str = "the config"):
    """`cls` from our JSON (`to_json`'s, read at `where`): every field known and within RULES."""
    return checked(cls, check_json(parse_json(text, where), RULES[cls], where, only=True), where)


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


def _read_config(
    config: dict | str | Path, keys: dict[str, str], rules: dict[str, Rule], where: str
) -> tuple[dict, dict, str]:
    """A diffusers config (dict or config.json path) checked, our fields it sets, and its `where`"""
    if not isinstance(config, dict):
        config, where = read_json(config), str(config)
    check_json(config, rules, where)
    return config, {ours: config[k] for ours, k in keys.items() if config.get(k) is not None}, where


def _count(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    """How many numbered modules `{prefix}{n}.` the checkpoint has."""
    return len({k[len(prefix) :].split(".")[0] for k in shapes if k.startswith(prefix)})


# The rules of diffusers' keys: ours renamed, and the two that make the hidden size.
FLUX_DIFFUSERS_RULES = {k: FLUX_RULES[ours] for ours, k in FLUX_CONFIG_KEYS.items()}
FLUX_DIFFUSERS_RULES |= {"attention_head_dim": SIZE, "patch_size": whole(1, 1)}


def from_diffusers_config(config: dict | str | Path, where: str = "config.json") -> FluxParams:
    """Read a diffusers `FluxTransformer2DModel` config.json (a dict from `where`, or a path)."""
    config, ours, where = _read_config(config, FLUX_CONFIG_KEYS, FLUX_DIFFUSERS_RULES, where)
    check_json(config, {}, where, required=("num_attention_heads", "attention_head_dim"))
    ours.setdefault("out_channels", ours.get("in_channels", 64))
    ours.setdefault("guidance_embed", False)  # diffusers' default
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return checked(FluxParams, {**ours, "hidden_size": hidden}, where)


def to_diffusers_config(p: FluxParams) -> dict:
    """The diffusers config.json for these parameters."""
    if p.mlp_ratio != 4.0 or not p.qkv_bias:
        raise ValueError("diffusers' FluxTransformer2DModel needs mlp_ratio 4 and qkv biases")
    theirs = {k: getattr(p, ours) for ours, k in FLUX_CONFIG_KEYS.items()}
    theirs.update(attention_head_dim=p.head_dim, axes_dims_rope=list(p.axes_dim))
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, **theirs}


def _dims(shapes: dict[str, tuple[int, ...]], key: str, ndim: int) -> tuple[int, ...]:
    """The shape of tensor `key`, which must be present and have `ndim` dimensions."""
    if key not in shapes:
        raise ValueError(f"tensor {key!r} is missing")
    if len(shape := shapes[key]) != ndim:
        raise ValueError(f"tensor {key} has shape {shape}, not {ndim} dimensions")
    return shape


def _ratio(a: int, b: int) -> float:
    """a / b, 0 for b = 0 (then the rules of the params refuse it)."""
    return a / b if b else 0


def from_shapes(
    shapes: dict[str, tuple[int, ...]],
    axes_dim: tuple[int, ...] | None = None,
    where: str = "the checkpoint",
) -> FluxParams:
    """Infer `FluxParams` from the BFL-named tensor shapes of a checkpoint (`where`)."""
    try:
        hidden, in_channels = _dims(shapes, "img_in.weight", 2)
        head_dim = _dims(shapes, "double_blocks.0.img_attn.norm.query_norm.scale", 1)[0]
        params = dict(
            in_channels=in_channels,
            out_channels=_dims(shapes, "final_layer.linear.weight", 2)[0],
            vec_in_dim=_dims(shapes, "vector_in.in_layer.weight", 2)[1],
            context_in_dim=_dims(shapes, "txt_in.weight", 2)[1],
            hidden_size=hidden,
            mlp_ratio=_ratio(_dims(shapes, "double_blocks.0.img_mlp.0.weight", 2)[0], hidden),
            num_heads=int(_ratio(hidden, head_dim)),
            depth=_count(shapes, "double_blocks."),
            depth_single_blocks=_count(shapes, "single_blocks."),
            qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except ValueError as e:
        raise ValueError(f"{where}: not a FLUX transformer: {e}") from None
    axes_dim = axes_dim or DEFAULT_AXES.get(head_dim)
    if axes_dim is None:
        raise ValueError(
            f"{where}: head dim {head_dim}: the RoPE axes are not stored in the weights; give "
            "--base a folder (or repo id) whose transformer/config.json has them (axes_dims_rope), "
            "load the folder with its config.json, or give --axes-dim (convert_weights.py; "
            "axes_dim in Python)"
        )
    return checked(FluxParams, {**params, "axes_dim": tuple(axes_dim)}, f"{where} (its shapes)")


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


AE_DIFFUSERS_RULES = {k: AE_RULES[ours] for ours, k in AE_CONFIG_KEYS.items()}
AE_DIFFUSERS_RULES["block_out_channels"] = listed(SIZE, range(1, 9))


def ae_from_diffusers_config(
    config: dict | str | Path, where: str = "config.json"
) -> AutoEncoderParams:
    """Read a diffusers `vae/config.json` (AutoencoderKL) as a dict (from `where`) or a path."""
    config, ours, where = _read_config(config, AE_CONFIG_KEYS, AE_DIFFUSERS_RULES, where)
    if config.get("use_quant_conv", True) or config.get("use_post_quant_conv", True):
        raise ValueError(f"{where}: the FLUX VAE has no quant_conv/post_quant_conv: set both false")
    if not config.get("mid_block_add_attention", True) or config.get("act_fn", "silu") != "silu":
        raise ValueError(f"{where}: the FLUX VAE has a mid-block attention and silu activations")
    widths = check_json(config, {}, where, required=("block_out_channels",))["block_out_channels"]
    if any(w % widths[0] for w in widths):
        raise ValueError(f"{where}: block_out_channels {widths} are not multiples of the first")
    ours.setdefault("shift_factor", 0.0)  # diffusers' default, unlike FLUX's
    ch_mult = [w // widths[0] for w in widths]
    return checked(AutoEncoderParams, {**ours, "ch": widths[0], "ch_mult": ch_mult}, where)


def ae_from_shapes(
    shapes: dict[str, tuple[int, ...]], norm_num_groups: int = 32, where: str = "the checkpoint"
) -> AutoEncoderParams:
    """Infer the config from BFL-named shapes (of `where`); scale/shift (not stored) are FLUX's."""
    try:
        ch, in_channels = _dims(shapes, "encoder.conv_in.weight", 4)[:2]
        levels = range(_count(shapes, "encoder.down."))
        widths = [_dims(shapes, f"encoder.down.{i}.block.0.conv1.weight", 4)[0] for i in levels]
        params = dict(
            in_channels=in_channels,
            ch=ch,
            out_ch=_dims(shapes, "decoder.conv_out.weight", 4)[0],
            ch_mult=[int(_ratio(w, ch)) for w in widths],
            num_res_blocks=_count(shapes, "encoder.down.0.block."),
            z_channels=_dims(shapes, "decoder.conv_in.weight", 4)[1],
            norm_num_groups=norm_num_groups,
        )
    except ValueError as e:
        raise ValueError(f"{where}: not a FLUX autoencoder: {e}") from None
    return checked(AutoEncoderParams, params, f"{where} (its shapes)")
