"""Panorama inpainting and outpainting: RF-Inversion with Personalize-Anything token replacement.

References: DiT360 (github.com/Insta360-Research-Team/DiT360) `editing.py`, `pa_src/pipeline.py`
(`invert` and `__call__` of the RF-inversion pipeline), `pa_src/attn_processor.py` (the token
replacement), `pa_src/utils.py` (`create_mask`); Rout et al. 2024, "Semantic Image Inversion and
Editing using Rectified Stochastic Differential Equations" (arXiv:2410.10792), Algorithms 1 and 2;
Feng et al., "Personalize Anything for Free with Diffusion Transformer" (AAAI 2026).

Time convention as in sampling.py: t = 1 noise, t = 0 data, the model predicts v = noise - data.
Masks: True = keep the source, False = generate. All latents here are padded tokens (B, L, C).

1. `invert`: the source latents x0 move toward noise y1 along the controlled forward ODE
   u = u_model + gamma * ((y1 - Y) / (1 - t) - u_model), empty prompt, guidance 0.
2. `edit`: a batch [source, target]. The source runs the controlled reverse ODE from the inverted
   latents back toward x0 (v + eta * ((X - x0) / t - v) while the step is in [start, stop)); the
   target runs plain Euler from fresh noise with the new prompt. While t > tau the target's image
   tokens at the mask take the source's before attention in every block; while t >= blend_until
   the target's latents at the mask are replaced by the source's after each step.

Reference behaviour kept on purpose: the inversion's model time and conditional field use
t_i = i / (steps + 1) while its step sizes are the reverse schedule's; the schedule shift comes
from the unpadded token count (generation uses the padded one); the mask's pad columns are
[first | mask | last] while the latents' are [last | grid | first] (`mask_pad="wrap"` fixes it);
the eta window is [int(start * steps), int(stop * steps)).

Cost: with gamma = 1 the inversion calls no model. With eta = 1 the source branch's own velocity
is multiplied by zero, so the source is only run where its attention tokens are needed (t > tau)
or its velocity is (eta != 1), and it is dropped once no later step reads it.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .generate import (
    Options,
    Report,
    _free,
    _stage,
    check_size,
    finish_report,
    load_model,
    start_report,
)
from .image import from_pil, to_pil
from .layers import QKVHook
from .model import Flux
from .panorama import pack, unpack, wrap_crop, wrap_pad
from .sampling import Conditioning, Grid, noise, predict, schedule

STEPS = 50  # the reference's editing.py; pass Options(steps=STEPS)
MASK_PADS = ("reference", "wrap")


@dataclass(frozen=True)
class EditOptions:
    """What an edit needs besides `generate.Options`; defaults are the reference's."""

    gamma: float = 1.0  # inversion controller: 1 = straight toward the noise, no model calls
    eta: float = 1.0  # source controller: 1 = straight back to the source latents
    start: float = 0.0  # eta acts on steps [int(start * steps), int(stop * steps))
    stop: float = 0.99
    tau: float = 0.5  # token replacement while t > tau
    blend_until: float = 0.5  # latent blending of the kept region while t >= blend_until
    inversion_guidance: float = 0.0
    mask_pad: str = "reference"  # "reference": [first | mask | last]; "wrap": as the latents
    source_prompt: str | None = None  # the source branch's prompt; None = the target prompt
    inpaint: bool = False  # invert the mask: regenerate the white region
    paste_back: bool = False  # composite the kept source pixels back, feathered
    feather: int | None = None  # paste-back feather in pixels; None = height // 32

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.stop <= 1:
            raise ValueError(f"need 0 <= start <= stop <= 1, got {self.start}, {self.stop}")
        if self.mask_pad not in MASK_PADS:
            raise ValueError(f"mask_pad must be one of {MASK_PADS}, got {self.mask_pad!r}")


# --- masks ----------------------------------------------------------------------------------------


def read_mask(mask: Image.Image, h: int, w: int, invert: bool = False) -> Tensor:
    """Keep mask (h, w) bool of a mask image resized with nearest; white (>= 0.5) keeps."""
    # Resize first, then to grey, in the order of the reference's create_mask.
    gray = mask.resize((w, h), Image.Resampling.NEAREST).convert("L")
    keep = torch.from_numpy(np.asarray(gray) >= 128)
    return ~keep if invert else keep


def pad_mask(keep: Tensor, pad: int, mode: str = "reference") -> Tensor:
    """Token mask (h, w) -> (h * (w + 2 * pad),) over the wrap-padded grid.

    "reference" pads [first cols | mask | last cols] as DiT360's editing.py, so a pad token gets the
    mask of the column beside it, not of the column it copies; "wrap" pads like the latents.
    """
    h, w = keep.shape
    if mode == "wrap":
        return wrap_pad(keep.reshape(1, h * w, 1), h, w, pad).flatten()
    if mode != "reference":
        raise ValueError(f"mask_pad must be one of {MASK_PADS}, got {mode!r}")
    return torch.cat([keep[:, :pad], keep, keep[:, w - pad :]], dim=1).flatten()


def check_mask(keep: Tensor) -> None:
    """A mask must keep something and generate something on the token grid."""
    h, w = keep.shape
    if keep.all():
        raise ValueError("the mask keeps everything (all white): nothing to generate")
    if not keep.any():
        raise ValueError(
            f"the mask keeps nothing on the {h}x{w} token grid (16x16 pixels a token): "
            "nothing to keep; use sample.py to generate from scratch"
        )


# --- token replacement ----------------------------------------------------------------------------


def replace_tokens(keep: Tensor) -> QKVHook:
    """A qkv hook for a batch [source, target]: the target's image tokens at `keep` (L_img,)
    take the source's queries, keys and values.

    The reference replaces the modulated hidden states before the q/k/v projections; projections
    and QK norm act token by token and a replaced token keeps its position (RoPE), so replacing
    their outputs is the same, and the MLP half of the single blocks' fused `linear1` keeps the
    unreplaced input, as in diffusers where the MLP reads it before the attention processor.
    """
    n = keep.numel()

    def hook(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rows = torch.cat([keep.new_zeros(q.shape[2] - n), keep.to(q.device)])  # (L,) [txt | img]
        sel = torch.stack([torch.zeros_like(rows), rows])[:, None, :, None]  # (2, 1, L, 1)
        return tuple(torch.where(sel, x[:1], x) for x in (q, k, v))

    return hook


@contextmanager
def hooked(model: Flux, hook: QKVHook | None) -> Iterator[None]:
    """Set `hook` on every double and single block for the duration of a block."""
    blocks = [*model.double_blocks, *model.single_blocks]
    for b in blocks:
        b.qkv_hook = hook
    try:
        yield
    finally:
        for b in blocks:
            b.qkv_hook = None


# --- the two ODEs ---------------------------------------------------------------------------------


def model_time(t: float | Tensor, dtype: torch.dtype) -> float:
    """t as the model sees it (t * 1000 rounded to its dtype, / 1000): what tau is compared with."""
    return float((torch.as_tensor(t, dtype=torch.float32) * 1000).to(dtype)) / 1000


def rows(cond: Conditioning, sl: slice) -> Conditioning:
    """The conditioning of some batch rows."""
    return Conditioning(cond.txt[sl], cond.txt_ids[sl], cond.vec[sl])


def invert(
    model: Flux,
    x0: Tensor,
    y1: Tensor,
    grid: Grid,
    cond: Conditioning,
    sigmas: Tensor,
    gamma: float = 1.0,
    guidance: float = 0.0,
    progress: bool = True,
) -> Tensor:
    """Controlled forward ODE (Algorithm 1) from source latents x0 toward noise y1, (1, L, C).

    As the reference: len(sigmas) - 1 steps of size sigmas[i] - sigmas[i + 1], while the model and
    the conditional field (y1 - Y) / (1 - t_i) take t_i = i / len(sigmas) in the latent dtype.
    """
    g = guidance if model.params.guidance_embed else None
    n, x, sigmas = len(sigmas), x0, sigmas.to(x0.device)
    for i in tqdm(range(n - 1), desc="invert", disable=not progress):
        t = float(torch.tensor(i / n, dtype=x.dtype))
        u = (y1.float() - x.float()) / (1 - t)  # the conditional field: straight to y1
        if gamma != 1:  # at gamma = 1 the model's field has weight 0: skip the call
            u_model = predict(model, x, grid, cond, t, g).float()
            u = u_model + gamma * (u - u_model)
        x = (x.float() + (sigmas[i] - sigmas[i + 1]) * u).to(x.dtype)
    return x


def edit(
    model: Flux,
    inverted: Tensor,
    x0: Tensor,
    z: Tensor,
    keep: Tensor,
    grid: Grid,
    cond: Conditioning,
    sigmas: Tensor,
    guidance: float,
    opts: EditOptions = EditOptions(),
    keep_source: bool = False,
    progress: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The edit (Algorithm 2 + token replacement + blending): target latents (1, L, C) from noise
    z, and with `keep_source` the source branch's final latents, else None.

    inverted, x0: the source's inverted and encoded latents; keep (L,) the padded token mask;
    cond: 2 rows, [source, target].
    """
    steps, dtype = len(sigmas) - 1, z.dtype
    sigmas, keep = sigmas.to(z.device), keep.to(z.device)
    times = [model_time(s, dtype) for s in sigmas[:-1]]
    lo, hi = int(opts.start * steps), min(int(opts.stop * steps), steps)
    eta = [opts.eta if lo <= i < hi else 0.0 for i in range(steps)]
    swap = [t > opts.tau for t in times]
    blend = [t >= opts.blend_until for t in times]
    # The source latents are read as model input (at i) while swapping, after step i for blending,
    # and at the end if asked: track them up to the last index read, no further.
    reads = [i for i in range(steps) if swap[i]] + [i + 1 for i in range(steps) if blend[i]]
    last = max(reads + [steps if keep_source else 0])
    g = guidance if model.params.guidance_embed else None
    hook, src, tgt = replace_tokens(keep), inverted, z
    for i in tqdm(range(steps), desc="edit", disable=not progress):
        dt = sigmas[i + 1] - sigmas[i]
        if swap[i] or (i < last and eta[i] != 1):  # the source's tokens or velocity are needed
            with hooked(model, hook if swap[i] else None):
                v = predict(model, torch.cat([src, tgt]), grid, cond, sigmas[i], g).float()
            v_src, v_tgt = v[:1], v[1:]
        else:  # the target alone: nothing of the source is read at this step
            v_tgt = predict(model, tgt, grid, rows(cond, slice(1, 2)), sigmas[i], g).float()
        if i < last:
            v_cond = (src.float() - x0.float()) / sigmas[i]  # straight back to x0
            v_hat = v_cond if eta[i] == 1 else v_src + eta[i] * (v_cond - v_src)
            src = (src.float() + dt * v_hat).to(dtype)
        tgt = (tgt.float() + dt * v_tgt).to(dtype)
        if blend[i]:
            tgt = torch.where(keep[None, :, None], src, tgt)
    return tgt, (src if keep_source else None)


# --- pixels: paste-back ---------------------------------------------------------------------------


def feather(keep: Tensor, radius: int) -> Tensor:
    """Alpha (H, W) in [0, 1]: 1 on the kept pixels, falling to 0 over about `radius` pixels
    outside them; the box blur wraps around the left/right seam."""
    a = keep.float()[None, None]  # (1, 1, H, W)
    if radius <= 0:
        return a[0, 0]
    if radius >= keep.shape[1]:
        raise ValueError(f"feather {radius} px must be narrower than the image ({keep.shape[1]})")
    k = 2 * radius + 1
    b = F.pad(a, (radius, radius, 0, 0), mode="circular")  # columns wrap
    b = F.pad(b, (0, 0, radius, radius), mode="replicate")  # rows do not
    b = F.avg_pool2d(F.avg_pool2d(b, (1, k), stride=1), (k, 1), stride=1)  # separable box blur
    return torch.maximum(a, (2 * b).clamp(max=1))[0, 0]  # 2x: about 1 at the edge, 0 at radius


def paste_back(edited: Tensor, source: Tensor, keep: Tensor, radius: int) -> Tensor:
    """Images (3, H, W): the source where keep (H, W), the edit beyond the feather."""
    alpha = feather(keep, radius).to(edited)
    return alpha * source + (1 - alpha) * edited


# --- files in, panorama out -----------------------------------------------------------------------


def open_image(path: str | Path, height: int = 1024, resize: bool = False) -> Image.Image:
    """The source panorama as RGB at height x 2 height (bicubic, as the reference resizes to
    1024x2048); an image that is not 2:1 is an error unless `resize` stretches it."""
    with Image.open(path) as f:
        img = f.convert("RGB")
    w, h = img.size
    if w != 2 * h and not resize:
        raise ValueError(
            f"{path}: {w}x{h} is not 2:1 (equirectangular); pass --resize to stretch it to 2:1"
        )
    if img.size != (2 * height, height):
        img = img.resize((2 * height, height), Image.Resampling.BICUBIC)
    return img


def open_mask(path: str | Path) -> Image.Image:
    """A mask image, read fully (any size and mode)."""
    with Image.open(path) as f:
        f.load()
        return f.copy()


def edit_image(
    image: Image.Image,
    mask: Image.Image,
    prompt: str,
    opts: Options,
    edit_opts: EditOptions = EditOptions(),
    log: Callable[[str], None] = print,
) -> tuple[Image.Image, Report]:
    """Outpaint `image` where `mask` is black (with `inpaint`: where white), guided by `prompt`.

    The size is the image's; `opts.height`/`width` are not used.
    """
    from .text import encode
    from .weights import load_autoencoder

    e, (width, height) = edit_opts, image.size
    check_size(height, width)  # fail fast: sizes, then the mask, before any model loads
    grid = Grid.for_image(height, width, opts.wrap_pad)
    keep = read_mask(mask, grid.h, grid.w, e.inpaint)  # (h, w) on the token grid
    check_mask(keep)
    report, dev, dtype = start_report(opts.device), opts.device, opts.dtype

    source = e.source_prompt if e.source_prompt is not None else prompt
    with _stage(report, "text encoders", log):  # rows: inversion (""), source, target
        cond = Conditioning(*encode(opts.base, ["", source, prompt], dev, dtype))
    with _stage(report, "encode image", log):
        vae = load_autoencoder(opts.base, dev, dtype)
        vae.set_circular(decoder=opts.seamless_vae, encoder=opts.seamless_vae)
        pixels = from_pil(image)[None]  # (1, 3, H, W) float32, kept for the paste-back
        with torch.no_grad():  # the posterior mean (the reference samples it, unseeded)
            x0 = wrap_pad(pack(vae.encode(pixels.to(dev, dtype))), grid.h, grid.w, grid.pad)
        vae.to("cpu")  # parked: one model on the device at a time
    _free(dev)

    c = x0.shape[-1] // 4
    z, y1 = noise(opts.seed, 2, height, width, c)  # target noise, inversion noise (CPU float32)
    if opts.reference_noise:
        z = noise(opts.seed, 1, height, width, c, dev, dtype)[0]
    z, y1 = (wrap_pad(pack(n[None]).to(dev, dtype), grid.h, grid.w, grid.pad) for n in (z, y1))
    sigmas = schedule(opts.steps, grid.h * grid.w)  # the reference shifts by the unpadded count
    with _stage(report, "load transformer", log):
        model = load_model(opts)
    with _stage(report, "invert", log), torch.no_grad():
        inv_cond = rows(cond, slice(0, 1))
        inverted = invert(model, x0, y1, grid, inv_cond, sigmas, e.gamma, e.inversion_guidance)
    with _stage(report, "edit", log), torch.no_grad():
        tokens = pad_mask(keep, grid.pad, e.mask_pad)
        edit_cond = rows(cond, slice(1, 3))
        latents, _ = edit(model, inverted, x0, z, tokens, grid, edit_cond, sigmas, opts.guidance, e)
    del model, cond
    _free(dev)

    with _stage(report, "decode", log), torch.no_grad():
        vae.to(dev)
        latents = unpack(wrap_crop(latents, grid.h, grid.w, grid.pad), grid.h, grid.w)
        out = vae.decode(latents, tile=opts.vae_tile)[0].float().cpu()  # (3, H, W)
    del vae
    _free(dev)
    if e.paste_back:
        radius = height // 32 if e.feather is None else e.feather
        out = paste_back(out, pixels[0], read_mask(mask, height, width, e.inpaint), radius)
    return to_pil(out), finish_report(report, dev)
