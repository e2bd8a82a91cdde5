"""The hyperparameters of the transformer (`FluxParams`) and the VAE (`AutoEncoderParams`), names
as BFL's (black-forest-labs/flux `src/flux/model.py`, `modules/autoencoder.py`), and presets."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FluxParams:
    """Hyperparameters of the FLUX MMDiT (names follow BFL's `FluxParams`)."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = field(default=(16, 56, 56))
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))
        p = self  # short: the messages fit a line
        if p.hidden_size % p.num_heads:
            raise ValueError(f"hidden_size {p.hidden_size} not divisible by {p.num_heads} heads")
        if sum(p.axes_dim) != p.head_dim or any(d % 2 for d in p.axes_dim):
            raise ValueError(
                f"RoPE axes {p.axes_dim} must be even and sum to head dim {p.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


PRESETS: dict[str, FluxParams] = {
    "flux-dev": FluxParams(),
    "flux-schnell": FluxParams(guidance_embed=False),
}


@dataclass(frozen=True)
class AutoEncoderParams:
    """Hyperparameters of the FLUX VAE (names follow BFL's `AutoEncoderParams`)."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        if bad := [c for c in self.channels if c % self.norm_num_groups]:
            raise ValueError(
                f"channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}"
            )

    @property
    def channels(self) -> list[int]:
        """Channel width of each resolution level, finest first."""
        return [self.ch * m for m in self.ch_mult]

    @property
    def factor(self) -> int:
        """Down-sampling factor between image and latent (8 for FLUX)."""
        return 2 ** (len(self.ch_mult) - 1)


AE_PRESETS: dict[str, AutoEncoderParams] = {"flux": AutoEncoderParams()}
