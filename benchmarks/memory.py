"""CPU memory and time: dit360 against diffusers on the same random weights, and what the
modulation vectors of full-size FLUX.1-dev weigh. Prints figures; asserts nothing.

    python benchmarks/memory.py            # medium model at 1024x2048 (a few minutes, 2 cores)
    python benchmarks/memory.py --small    # tiny model at 64x128 (a smoke run, seconds)
    python benchmarks/memory.py --only 2 --repeats 3   # the forward alone: time ratio, fastest of 3

The model is a random "medium" FLUX (4 double + 8 single blocks, hidden 256: 2 heads of 128 with
RoPE axes (16, 56, 56), T5 width 4096, CLIP width 768; one-layer T5/CLIP, a 32-channel VAE),
written once in the FLUX.1-dev folder layout, which both dit360 and diffusers read.

1. sample.py's work at 1024x2048, 1 step: dit360's `generate` (--wrap-pad 0, no LoRA) against
   diffusers' FluxPipeline, each in a fresh process: wall seconds and peak RSS per stage.
2. One transformer forward at 8,320 image + 512 text tokens (float32, no grad), ours against
   diffusers' FluxTransformer2DModel, each in a fresh process: the peak RSS the forward adds
   (with large allocations mmapped, so that RSS follows the live tensors; see EXACT_RSS).
3. Full-size FLUX.1-dev on the meta device: the bytes (bf16) of the adaLN modulation layers and
   the time/guidance/vector embedders that feed them, against the whole transformer; and the
   bytes of their outputs, which can be computed for every step ahead of denoising.
"""

import math
import tempfile
from pathlib import Path

from runs import spawn
from torch import nn

from dit360.app.options import Parser
from dit360.load.config import PRESETS
from dit360.load.weights import meta_flux

GiB, MiB = 2**30, 2**20
# glibc's malloc keeps freed blocks for reuse and moves its mmap threshold as it goes, so a peak RSS
# can hold dead tensors or not from one run to the next (we saw +0.17 to +0.28 GiB for the same
# forward). Blocks over 128 KiB mmapped, and unmapped when freed: RSS follows the live tensors.
EXACT_RSS = {"MALLOC_MMAP_THRESHOLD_": "131072"}
# The modules whose only input is the time/guidance/pooled-text vector: known before denoising.
MODULATION = ("img_mod", "txt_mod", "modulation", "adaLN_modulation")
EMBEDDERS = ("time_in", "guidance_in", "vector_in")


def modulation_bytes(steps: int = 28, batch: int = 1, itemsize: int = 2) -> dict:
    """Bytes of the modulation weights and embedders of full-size FLUX.1-dev, of the whole model,
    and of the modulation outputs per step (bf16)."""
    model = meta_flux(PRESETS["flux-dev"])
    mods = {n: m for n, m in model.named_modules() if n.split(".")[-1] in MODULATION}
    embedders = {n: m for n, m in model.named_modules() if n in EMBEDDERS}

    def size(modules: dict) -> int:
        return sum(p.numel() for m in modules.values() for p in m.parameters()) * itemsize

    outputs = sum(
        l.out_features for m in mods.values() for l in m.modules() if isinstance(l, nn.Linear)
    )
    return dict(
        layers=len(mods),
        modulation=size(mods),
        embedders=size(embedders),
        total=sum(p.numel() for p in model.parameters()) * itemsize,
        per_step=outputs * batch * itemsize,
        steps=steps,
    )


def peak(run: dict) -> float:
    """The whole run's peak RSS: the largest of its stages' peaks."""
    return max((s["peak"] for s in run["stages"].values()), default=math.nan)


def print_generation(runs: dict[str, dict]) -> None:
    """Stage table and totals of the generate runs."""
    print("| run | stage | seconds | peak RSS GiB | RSS after GiB |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        if "error" in r:
            print(f"| {name} | error: {r['error']} | | | |")
            continue
        for stage, s in r["stages"].items():
            print(f"| {name} | {stage} | {s['s']:.2f} | {s['peak']:.2f} | {s['held']:.2f} |")
    for name, r in runs.items():
        if "error" not in r:
            print(
                f"{name}: {r['process_s']:.1f} s wall (process), {r['seconds']:.1f} s in the call; "
                f"peak RSS {peak(r):.2f} GiB (after imports: {r['base_gb']:.2f} GiB)"
            )


def generation(base: str, height: int, width: int) -> None:
    """Section 1: generate against FluxPipeline, each in its own process."""
    common = dict(base=base, height=height, width=width, steps=1, device="cpu", dtype="fp32")
    runs = {
        "dit360 generate": spawn("dit360", **common, wrap_pad=0),
        "diffusers FluxPipeline": spawn("diffusers", **common),
    }
    print(f"## 1. generation at {height}x{width}, 1 step (dit360: --wrap-pad 0, no LoRA)\n")
    print_generation(runs)
    ours, theirs = runs.values()
    if "error" not in ours and "error" not in theirs:
        print(
            f"ratio dit360 / diffusers: wall {ours['process_s'] / theirs['process_s']:.2f}, "
            f"peak RSS {peak(ours) / peak(theirs):.2f}"
        )


def forward(base: str, tmp: str, height: int, width: int, repeats: int) -> None:
    """Section 2: one transformer forward's added peak memory, and its seconds."""
    runs = {
        impl: spawn("forward", env=EXACT_RSS, base=base, impl=impl, height=height, width=width,
                    out=str(Path(tmp) / f"{impl}.safetensors"), repeats=repeats)
        for impl in ("dit360", "diffusers")
    }  # fmt: skip
    tokens = next((r["tokens"] for r in runs.values() if "tokens" in r), "?")
    print(f"\n## 2. one transformer forward: {tokens} image + 512 text tokens, float32\n")
    print("| model | RSS before GiB | peak RSS GiB | added GiB | first s | fastest s |")
    print("|---|---|---|---|---|---|")
    for impl, r in runs.items():
        if "error" in r:
            print(f"| {impl} | error: {r['error']} | | | | |")
        else:
            print(
                f"| {impl} | {r['before_gb']:.3f} | {r['peak_gb']:.3f} | {r['added_gb']:.3f} "
                f"| {r['seconds']:.2f} | {r['best_s']:.2f} |"
            )
    ours, theirs = runs.values()
    if "error" not in ours and "error" not in theirs:
        from safetensors.torch import load_file

        a, b = (load_file(r["out"])["out"] for r in (ours, theirs))
        rel = float((a - b).norm() / b.norm())
        print(
            f"dit360 / diffusers: added peak {ours['added_gb'] / theirs['added_gb']:.2f}, "
            f"time {ours['best_s'] / theirs['best_s']:.2f} (fastest of {repeats}); "
            f"outputs agree to {rel:.1e} relative (same weights)"
        )


def modulation() -> None:
    """Section 3: the modulation of full-size FLUX.1-dev."""
    m = modulation_bytes()
    weights = m["modulation"] + m["embedders"]
    print("\n## 3. full-size FLUX.1-dev modulation (meta device, bf16)\n")
    print(
        f"modulation weights ({m['layers']} adaLN layers: 19 x img/txt_mod, 38 x modulation, "
        f"final_layer.adaLN_modulation): {m['modulation'] / GiB:.2f} GiB"
    )
    print(f"time/guidance/vector embedders: {m['embedders'] / GiB:.3f} GiB")
    print(
        f"together {weights / GiB:.2f} GiB of the transformer's {m['total'] / GiB:.2f} GiB "
        f"({m['total'] / 1e9:.2f} GB) = {100 * weights / m['total']:.1f}%"
    )
    print(
        f"their outputs, computed ahead: {m['per_step'] / MiB:.2f} MiB per step (batch 1); "
        f"{m['steps']} steps: {m['steps'] * m['per_step'] / MiB:.1f} MiB; "
        f"an edit (batch up to 2, 50 steps): {100 * m['per_step'] / MiB:.1f} MiB"
    )


def main() -> None:
    parser = Parser(__doc__)
    parser.add_argument("--small", action="store_true", help="tiny model at 64x128 (smoke run)")
    parser.add_argument("--hidden", type=int, default=256, help="medium model width (heads of 128)")
    parser.add_argument("--workdir", type=Path, help="where the weights go (None: a temp folder)")
    parser.add_argument("--only", default="1,2,3", help="sections to run, comma-separated")
    parser.add_argument(
        "--repeats", type=int, default=1, help="section 2: forwards timed per model (the fastest)"
    )
    args = parser.parse_args()
    sections = set(args.only.split(","))
    height, width = (64, 128) if args.small else (1024, 2048)
    if sections & {"1", "2"}:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            base = str(Path(tmp) / "flux")
            sizes = "tiny" if args.small else "medium"
            wrote = spawn(
                "prepare", folder=base, sizes=sizes, device="cpu", dtype="fp32", hidden=args.hidden
            )
            if "error" in wrote:
                raise SystemExit(f"writing the weights failed: {wrote['error']}")
            what = "tiny" if args.small else f"medium (hidden {args.hidden})"
            print(f"random {what} FLUX.1-dev folder written in {wrote['s']:.1f} s; float32, CPU\n")
            if "1" in sections:
                generation(base, height, width)
            if "2" in sections:
                forward(base, tmp, height, width, args.repeats)
    if "3" in sections:
        modulation()


if __name__ == "__main__":
    main()
