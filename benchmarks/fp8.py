"""What --fp8 costs in accuracy, on the CPU: float8 (e4m3) block weights with per-channel scales
against the bf16 and float32 models on the same random weights. Prints figures; asserts nothing.

    python benchmarks/fp8.py            # medium model, forward at 1024x2048 (minutes, 2 cores)
    python benchmarks/fp8.py --small    # tiny model at 64x128 (a smoke run, seconds)

1. One transformer forward of a random "medium" FLUX (4 double + 8 single blocks, hidden 256,
   weights std 1/sqrt(fan_in)) at 8,320 image + 512 text tokens: the relative error
   |out - ref| / |ref| of fp8 against bf16 and float32 references. fp8 runs weight-only (as on
   the CPU and older GPUs) with bf16 and float32 activations, and W8A8 as on fp8 GPUs (tokens
   quantized too, through torch._scaled_mm, which the CPU runs from torch 2.12 on), once with
   fast accumulation (fp8.FAST_ACCUM, the default) and once precise, each timed. On the CPU the
   flag changes nothing (the outputs print as equal or not, whichever they are); on Hopper the
   fast mode is about twice the fp8 throughput.
2. `generate` end to end (random medium FLUX.1-dev folder, bf16 weights, float32 compute on the
   CPU, fixed prompt and seed) with --fp8 and without: the PSNR of the two images.
"""

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent)]  # random_flux, gpu
from gpu import compare  # noqa: E402
from random_flux import TINY, medium, values, write_flux_folder  # noqa: E402

from dit360.app.options import Parser, SampleOptions  # noqa: E402
from dit360.app.panorama import Grid  # noqa: E402
from dit360.core.model import Flux  # noqa: E402
from dit360.memory import fp8  # noqa: E402

PROMPT, SEED, GUIDANCE = "A panorama of a mountain lake at dawn, pine forests, mist.", 0, 2.8
W8A8 = "fp8 W8A8 (torch._scaled_mm)"


def random_flux(sizes, dtype: torch.dtype) -> Flux:
    """The model with random_flux's seeded values (std 1/sqrt(fan_in)), frozen."""
    model = Flux(sizes.flux)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.copy_(values(name, tuple(t.shape), SEED, "cpu", torch.float32))
    return model.to(dtype).eval().requires_grad_(False)


def inputs(sizes, height: int, width: int) -> tuple:
    """Random forward inputs at the tokens of height x width (wrap pad 1) + 512 text tokens."""
    p, grid, g = sizes.flux, Grid.for_image(height, width, 1), torch.Generator().manual_seed(SEED)
    img = torch.randn(1, grid.tokens, p.in_channels, generator=g)  # (B, L_img, 64)
    txt = torch.randn(1, 512, p.context_in_dim, generator=g)  # (B, L_txt, 4096)
    y = torch.randn(1, p.vec_in_dim, generator=g)  # (B, 768)
    img_ids, txt_ids = grid.ids(1).float(), torch.zeros(1, 512, 3)
    return img, img_ids, txt, txt_ids, torch.tensor([0.7]), y, torch.tensor([GUIDANCE])


def forward(
    model: Flux, xs: tuple, dtype: torch.dtype, w8a8: bool = False, fast: bool = True
) -> torch.Tensor:
    """One forward in `dtype` (times and guidance stay float32), float32 out; `w8a8`: take the
    torch._scaled_mm path as on an fp8 GPU, with fast accumulation or not."""
    img, img_ids, txt, txt_ids, t, y, guidance = xs
    cores, accum = fp8._fp8_cores, fp8.FAST_ACCUM
    fp8._fp8_cores = (lambda device: True) if w8a8 else cores
    fp8.FAST_ACCUM = fast
    try:
        with torch.no_grad():
            out = model(img.to(dtype), img_ids, txt.to(dtype), txt_ids, t, y.to(dtype), guidance)
    finally:
        fp8._fp8_cores, fp8.FAST_ACCUM = cores, accum
    return out.float()


def w8a8(model: Flux, xs: tuple, outs: dict, seconds: dict) -> None:
    """The W8A8 rows, fast and precise accumulation, timed; one line instead where this torch's
    CPU has no row-wise _scaled_mm (before 2.12)."""
    for fast, mode in ((True, "fast"), (False, "precise")):
        name = f"{W8A8}, {mode} accumulation"
        start = time.perf_counter()
        try:
            outs[name] = forward(model, xs, torch.bfloat16, w8a8=True, fast=fast)
        except RuntimeError as e:  # "_scaled_mm only supports per-tensor scaling for CPU backend"
            print(f"{name}: not measured, torch {torch.__version__}: {str(e).splitlines()[0]}\n")
            return
        seconds[name] = time.perf_counter() - start


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def forward_errors(sizes, height: int, width: int) -> None:
    """Section 1: relative errors of one forward."""
    xs, bf16, f32 = inputs(sizes, height, width), torch.bfloat16, torch.float32
    ref32 = random_flux(sizes, f32)
    ref16 = copy.deepcopy(ref32).to(bf16)  # FLUX.1-dev's weights are bf16: fp8 is made from them
    q16 = fp8.quantize_fp8(copy.deepcopy(ref16))
    q32 = fp8.quantize_fp8(copy.deepcopy(ref32))
    runs = {
        "float32": (ref32, f32),
        "bf16": (ref16, bf16),
        "fp8 weight-only, bf16 activations": (q16, bf16),
        "fp8 weight-only, float32 activations": (q32, f32),
    }
    outs, seconds = {}, {}
    for name, (model, dtype) in runs.items():
        start = time.perf_counter()
        outs[name] = forward(model, xs, dtype)
        seconds[name] = time.perf_counter() - start
    w8a8(q16, xs, outs, seconds)
    tokens = xs[0].shape[1]
    print(f"## 1. one forward, {tokens} image + 512 text tokens, on the CPU\n")
    print("| model | rel. error vs bf16 | rel. error vs float32 | seconds |")
    print("|---|---|---|---|")
    for name, out in outs.items():
        errs = f"{rel(out, outs['bf16']):.2e} | {rel(out, outs['float32']):.2e}"
        print(f"| {name} | {errs} | {seconds[name]:.2f} |")
    fast, precise = (outs.get(f"{W8A8}, {mode} accumulation") for mode in ("fast", "precise"))
    if fast is not None and precise is not None:
        same = "equal" if torch.equal(fast, precise) else f"differ by {rel(fast, precise):.2e}"
        print(f"\nW8A8 fast vs precise accumulation on torch {torch.__version__}: outputs {same}")
    nbytes = [sum(t.nbytes for t in m.state_dict().values()) for m in (ref16, q16)]
    print(f"\ntransformer bytes: bf16 {nbytes[0] / 2**20:.1f} MiB, fp8 {nbytes[1] / 2**20:.1f} MiB")


def image_psnr(sizes, height: int, width: int, steps: int, work: Path) -> None:
    """Section 2: generate with and without --fp8, the PSNR between the two images."""
    from dit360.app.generate import generate

    base = work / "flux"
    write_flux_folder(base, sizes, "cpu", torch.bfloat16, SEED)
    paths = {}
    for on in (False, True):
        opts = SampleOptions(
            base=str(base), lora=None, height=height, width=width, steps=steps, device="cpu",
            dtype="fp32", seed=SEED, guidance=GUIDANCE, fp8=on, offload="none",
        )  # fmt: skip
        start = time.perf_counter()
        image, _ = generate(PROMPT, opts, log=lambda _: None)
        paths[on] = str(work / f"fp8-{on}.png")
        image.save(paths[on])
        print(f"generate, fp8 {on}: {time.perf_counter() - start:.1f} s")
    d = compare(paths[False], paths[True])
    print(
        f"\n## 2. generate at {height}x{width}, {steps} steps, float32 compute: fp8 on vs off: "
        f"mean abs {d['mean_abs']:.3g} (0-255), PSNR {d['psnr']:.1f} dB"
    )


def main() -> None:
    parser = Parser(__doc__)
    parser.add_argument("--small", action="store_true", help="tiny model at 64x128 (smoke run)")
    parser.add_argument("--size", default="512x1024", help="generate's image size (HxW)")
    parser.add_argument("--steps", type=int, default=2, help="generate's steps")
    parser.add_argument("--workdir", type=Path, help="where the weights go (None: a temp folder)")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    sizes = TINY if args.small else medium()
    forward_errors(sizes, *((64, 128) if args.small else (1024, 2048)))
    height, width = (32, 64) if args.small else map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        print()
        image_psnr(sizes, height, width, args.steps, Path(tmp))


if __name__ == "__main__":
    main()
