"""Generation speed and memory: dit360 vs diffusers' FluxPipeline on the same random weights.

    python benchmarks/sample_speed.py              # full size: 1024x2048, 28 steps, bf16, GPU
    python benchmarks/sample_speed.py --tiny       # a small smoke run (CPU is fine)

FLUX.1-dev-shaped random weights are built in memory (nothing downloads), and the text
conditioning is random (T5 and CLIP are the same transformers code in both, so they are left
out). Timed: denoising and VAE decode, for dit360 with DiT360's wrap (1 pad column, 8,320 tokens),
dit360 as plain FLUX (8,192 tokens), and FluxPipeline (plain FLUX). The full-size run needs a GPU
with about 60 GB (both transformers are in memory while the weights are copied).
"""

import argparse
import time

import torch

from dit360.autoencoder import AutoEncoder
from dit360.config import AE_PRESETS, PRESETS, AutoEncoderParams, FluxParams, to_diffusers_config
from dit360.generate import generate_latents
from dit360.model import Flux
from dit360.options import SampleOptions
from dit360.sampling import Conditioning
from dit360.weights import AE_DIFFUSERS, FLUX_DIFFUSERS, split, their_keys

TINY = FluxParams(
    vec_in_dim=24, context_in_dim=32, hidden_size=32, num_heads=2, depth=2,
    depth_single_blocks=2, axes_dim=(4, 6, 6),
)  # fmt: skip
TINY_AE = AutoEncoderParams(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_num_groups=8)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded normal weights (std 0.02), generated on the model's device."""
    gen = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=gen)
    return model


def on_device(make, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A model built on the meta device, then materialised once (uninitialised) on `device`."""
    with torch.device("meta"):
        model = make()
    return model.to(dtype).to_empty(device=device).eval().requires_grad_(False)


def copy_to_diffusers(ours: torch.nn.Module, theirs: torch.nn.Module, table, hidden: int) -> None:
    """Copy our weights into a diffusers model through the key table (strict: every key)."""
    target, done = theirs.state_dict(), set()
    with torch.no_grad():
        for name, t in ours.state_dict().items():
            op, keys = their_keys(name, table)
            for k, part in zip(keys, split(op, t, len(keys), hidden), strict=True):
                target[k].copy_(part)
                done.add(k)
    assert done == set(target), sorted(set(target) - done)[:5]


def diffusers_vae_config(p: AutoEncoderParams) -> dict:
    """AutoencoderKL arguments for our VAE parameters."""
    return dict(
        block_out_channels=[p.ch * m for m in p.ch_mult],
        down_block_types=["DownEncoderBlock2D"] * len(p.ch_mult),
        up_block_types=["UpDecoderBlock2D"] * len(p.ch_mult),
        layers_per_block=p.num_res_blocks,
        latent_channels=p.z_channels,
        norm_num_groups=p.norm_num_groups,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=p.scale_factor,
        shift_factor=p.shift_factor,
    )


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gb(reset: bool = False) -> float:
    """Peak GPU memory allocated since the last reset (0 on CPU)."""
    if not torch.cuda.is_available():
        return 0.0
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated() / 2**30


def run_ours(model: Flux, vae: AutoEncoder, cond: Conditioning, opts: SampleOptions) -> dict:
    """Seconds for denoising and decoding, and the peak memory, of dit360's sampling path."""
    peak_gb(reset=True)
    sync()
    t0 = time.perf_counter()
    latents = generate_latents(model, cond, opts)
    sync()
    t1 = time.perf_counter()
    with torch.no_grad():
        vae.decode(latents.to(opts.dtype))
    sync()
    t2 = time.perf_counter()
    return dict(step=(t1 - t0) / opts.steps, denoise=t1 - t0, decode=t2 - t1, peak=peak_gb())


def run_diffusers(transformer, vae, cond: Conditioning, opts: SampleOptions) -> dict:
    """The same for diffusers' FluxPipeline, given the prompt embeddings."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip FLUX.1-dev's scheduler_config.json
    none = dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"], None)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer, **none)
    pipe.set_progress_bar_config(disable=True)
    marks = []

    def mark(*_):
        sync()
        marks.append(time.perf_counter())
        return {}

    peak_gb(reset=True)
    sync()
    t0 = time.perf_counter()
    pipe(
        prompt_embeds=cond.txt,
        pooled_prompt_embeds=cond.vec,
        height=opts.height,
        width=opts.width,
        num_inference_steps=opts.steps,
        guidance_scale=opts.guidance,
        generator=torch.Generator("cpu").manual_seed(opts.seed),
        callback_on_step_end=mark,
    )
    sync()
    t2 = time.perf_counter()
    denoise = marks[-1] - t0
    return dict(step=denoise / opts.steps, denoise=denoise, decode=t2 - marks[-1], peak=peak_gb())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="small model and image (smoke run)")
    parser.add_argument("--steps", type=int, help="default: 28 (2 with --tiny)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    dev = args.device
    dtype = torch.float32 if args.tiny else torch.bfloat16
    params, ae_params = (TINY, TINY_AE) if args.tiny else (PRESETS["flux-dev"], AE_PRESETS["flux"])
    height, width = (64, 128) if args.tiny else (1024, 2048)
    steps = args.steps or (2 if args.tiny else 28)
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(
        (torch.randn(1, 512, params.context_in_dim, generator=g)).to(dev, dtype),
        torch.zeros(1, 512, 3, device=dev, dtype=dtype),
        (torch.randn(1, params.vec_in_dim, generator=g)).to(dev, dtype),
    )
    base = dict(base="", lora=None, height=height, width=width, steps=steps, device=dev)
    model = randomize(on_device(lambda: Flux(params), dev, dtype))
    vae = randomize(on_device(lambda: AutoEncoder(ae_params), dev, dtype))
    results = {}
    for pad in (1, 0):
        opts = SampleOptions(**base, wrap_pad=pad, dtype=dtype)
        run_ours(model, vae, cond, opts)  # warm-up (kernels, allocator)
        results[f"dit360, wrap pad {pad}"] = run_ours(model, vae, cond, opts)

    theirs = on_device(lambda: FluxTransformer2DModel(**to_diffusers_config(params)), dev, dtype)
    copy_to_diffusers(model, theirs, FLUX_DIFFUSERS, params.hidden_size)
    their_vae = on_device(lambda: AutoencoderKL(**diffusers_vae_config(ae_params)), dev, dtype)
    copy_to_diffusers(vae, their_vae, AE_DIFFUSERS, params.hidden_size)
    del model, vae
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    opts = SampleOptions(**base, wrap_pad=0, dtype=dtype)
    run_diffusers(theirs, their_vae, cond, opts)  # warm-up
    results["diffusers FluxPipeline"] = run_diffusers(theirs, their_vae, cond, opts)

    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "CPU"
    print(f"{name}, {height}x{width}, {steps} steps, {dtype}; random weights")
    print("| run | s/step | denoise s | decode s | total s | peak GPU GB |")
    print("|---|---|---|---|---|---|")
    for k, r in results.items():
        total = r["denoise"] + r["decode"]
        print(
            f"| {k} | {r['step']:.3f} | {r['denoise']:.2f} | {r['decode']:.2f} | {total:.2f} "
            f"| {r['peak']:.1f} |"
        )


if __name__ == "__main__":
    main()
