"""The FLUX MMDiT with the parameter names of the BFL checkpoint (`flux1-dev.safetensors`).

Reference: black-forest-labs/flux `src/flux/model.py`. Distribution and LoRA are applied from
outside; this module knows neither.
"""

import torch
from torch import Tensor, nn

from .layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding
from .params import FluxParams
from .rope import embed_ids


class Flux(nn.Module):
    """FLUX.1 transformer: 19 double-stream then 38 single-stream blocks (for flux-dev)."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = p = params
        d = p.hidden_size
        self.img_in = nn.Linear(p.in_channels, d)
        self.time_in = MLPEmbedder(256, d)
        self.vector_in = MLPEmbedder(p.vec_in_dim, d)
        self.guidance_in = MLPEmbedder(256, d) if p.guidance_embed else None
        self.txt_in = nn.Linear(p.context_in_dim, d)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(d, p.num_heads, p.mlp_hidden, p.qkv_bias) for _ in range(p.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, p.num_heads, p.mlp_hidden) for _ in range(p.depth_single_blocks)
        )
        self.final_layer = LastLayer(d, p.out_channels)

    def init_weights(self) -> None:
        """Initialise every parameter (used after meta-device construction + `to_empty`)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif hasattr(m, "scale") and isinstance(m.scale, nn.Parameter):
                nn.init.ones_(m.scale)
        # adaLN-Zero: every block starts as the identity and the output as zero.
        mods = [m for layer in self.modulation_layers() for m in layer.modules()]
        for lin in [m for m in mods if isinstance(m, nn.Linear)] + [self.final_layer.linear]:
            nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)

    def modulation_layers(self) -> list[nn.Module]:
        """The adaLN layers vec (B, D) -> raw modulation, in the order `forward` reads them."""
        double = [m for b in self.double_blocks for m in (b.img_mod, b.txt_mod)]
        return [
            *double,
            *(b.modulation for b in self.single_blocks),
            self.final_layer.adaLN_modulation,
        ]

    def embedders(self) -> list[nn.Module]:
        """The layers of the conditioning vector: with `modulation_layers`, all that depends only
        on (timesteps, y, guidance), 27 % of flux-dev's weights."""
        return [m for m in (self.time_in, self.guidance_in, self.vector_in) if m is not None]

    def conditioning_vector(
        self, timesteps: Tensor, y: Tensor, guidance: Tensor | None, dtype: torch.dtype
    ) -> Tensor:
        """vec (B, D) from timesteps (B,) sigma in [0, 1], pooled CLIP y and guidance (B,)."""
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))  # (B, D)
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this model is guidance-distilled (flux-dev): pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        return vec + self.vector_in(y)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor | None,
        y: Tensor | None,
        guidance: Tensor | None = None,
        mods: list[Tensor] | None = None,
    ) -> Tensor:
        """Velocity (B, L_img, out_channels) for packed latents img (B, L_img, in_channels);
        img_ids (B, L_img, 3), txt (B, L_txt, context_in_dim), txt_ids (B, L_txt, 3), timesteps
        (B,) sigma in [0, 1], y (B, vec_in_dim) pooled CLIP, guidance (B,) for flux-dev. Or,
        instead of those three, `mods`: what `modulation_layers` make of them, computed ahead."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(
                f"img and txt must be (B, L, C), got {tuple(img.shape)}, {tuple(txt.shape)}"
            )
        vec = None if mods else self.conditioning_vector(timesteps, y, guidance, img.dtype)
        mods = mods or [None] * (2 * len(self.double_blocks) + len(self.single_blocks) + 1)
        img, txt = self.img_in(img), self.txt_in(txt)  # (B, L, D)
        pe = embed_ids(
            torch.cat((txt_ids, img_ids), dim=1), self.params.axes_dim, self.params.theta
        )
        n = len(self.double_blocks)
        for i, block in enumerate(self.double_blocks):
            img, txt = block(img, txt, vec, pe, mods[2 * i : 2 * i + 2])
        x = torch.cat((txt, img), dim=1)  # (B, L_txt + L_img, D)
        del img
        for block, mod in zip(self.single_blocks, mods[2 * n : -1], strict=True):
            x = block(x, vec, pe, mod)
        return self.final_layer(x[:, txt.shape[1] :], vec, mods[-1])  # (B, L_img, out_channels)
