"""The FLUX MMDiT with the parameter names of the BFL checkpoint (`flux1-dev.safetensors`).

Reference: black-forest-labs/flux `src/flux/model.py`. Distribution and LoRA are applied from
outside; this module knows neither.
"""

import torch
from torch import Tensor, nn

from .config import FluxParams
from .layers import DoubleStreamBlock, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding
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
        for block in self.double_blocks:
            for lin in (block.img_mod.lin, block.txt_mod.lin):
                nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
        for block in self.single_blocks:
            nn.init.zeros_(block.modulation.lin.weight), nn.init.zeros_(block.modulation.lin.bias)
        for lin in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Velocity (B, L_img, out_channels) for packed latents img (B, L_img, in_channels);
        img_ids (B, L_img, 3), txt (B, L_txt, context_in_dim), txt_ids (B, L_txt, 3), timesteps
        (B,) sigma in [0, 1], y (B, vec_in_dim) pooled CLIP, guidance (B,) for flux-dev."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(
                f"img and txt must be (B, L, C), got {tuple(img.shape)}, {tuple(txt.shape)}"
            )
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))  # (B, D)
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this model is guidance-distilled (flux-dev): pass guidance")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)  # (B, L, D)
        pe = embed_ids(
            torch.cat((txt_ids, img_ids), dim=1), self.params.axes_dim, self.params.theta
        )

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)  # (B, L_txt + L_img, D)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)  # (B, L_img, out_channels)
