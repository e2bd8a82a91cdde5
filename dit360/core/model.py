"""The FLUX MMDiT with the parameter names of the BFL checkpoint (`flux1-dev.safetensors`).
Reference: black-forest-labs/flux `src/flux/model.py`."""

import torch
from torch import Tensor, nn

from .layers import DoubleStreamBlock, LastLayer, SingleStreamBlock, embedder, timestep_embedding
from .params import FluxParams
from .rope import embed_ids


class Flux(nn.Module):
    """FLUX.1 transformer: 19 double-stream then 38 single-stream blocks (for flux-dev)."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = p = params
        d = p.hidden_size
        self.img_in = nn.Linear(p.in_channels, d)
        self.time_in = embedder(256, d)
        self.vector_in = embedder(p.vec_in_dim, d)
        self.guidance_in = embedder(256, d) if p.guidance_embed else None
        self.txt_in = nn.Linear(p.context_in_dim, d)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(d, p.num_heads, p.mlp_hidden, p.qkv_bias) for _ in range(p.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, p.num_heads, p.mlp_hidden) for _ in range(p.depth_single_blocks)
        )
        self.final_layer = LastLayer(d, p.out_channels)

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
        """Velocity (B, L_img, C_out) of tokens img (B, L_img, C_in), ids (B, L, 3), txt (B, L_txt,
        4096), timesteps (B,) in [0, 1], pooled CLIP y, guidance (B,), or their `mods` (ahead)."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(
                f"img and txt must be (B, L, C), got {tuple(img.shape)}, {tuple(txt.shape)}"
            )
        vec = None if mods else self.conditioning_vector(timesteps, y, guidance, img.dtype)
        mods = mods or [None] * (2 * len(self.double_blocks) + len(self.single_blocks) + 1)
        img, txt = self.img_in(img), self.txt_in(txt)  # (B, L, D)
        p = self.params
        pe = embed_ids(torch.cat((txt_ids, img_ids), dim=1), p.axes_dim, p.theta)  # (B,1,L,d/2,2)
        n = len(self.double_blocks)
        for i, block in enumerate(self.double_blocks):
            img, txt = block(img, txt, vec, pe, mods[2 * i : 2 * i + 2])
        x = torch.cat((txt, img), dim=1)  # (B, L_txt + L_img, D)
        del img
        for block, mod in zip(self.single_blocks, mods[2 * n : -1], strict=True):
            x = block(x, vec, pe, mod)
        return self.final_layer(x[:, txt.shape[1] :], vec, mods[-1])  # (B, L_img, out_channels)
