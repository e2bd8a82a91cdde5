"""GPU speed and memory at 1024x2048, 28 steps, bf16, on full-size random FLUX.1-dev weights
(transformer, T5-XXL, CLIP-L, VAE) written in the real folder layout: dit360's `generate` in each
offload mode, compiled (`--compile`), in fp8 (`--fp8`, compiled; with `--t5-fp8`), with
FlashAttention-3 if installed (`--attention fa3`), diffusers' FluxPipeline (all
on the GPU, and with `enable_model_cpu_offload`), and one dit360 edit, with the achieved TFLOP/s;
and one train.py micro-batch (LoRA r 64, FSDP over NCCL with a world of one) in each memory mode
of training, seconds and peak memory against the targets of a 24 GB card (TRAIN_ROWS).
One command, at most 8 minutes on an H100/H200 (--budget):

    pip install --no-deps .whl/diffusers-*.whl      # the diffusers rows (a GPU machine is offline)
    python benchmarks/gpu.py --out gpu-bench        # results.json, table.md; the table printed
    python benchmarks/gpu.py --only none,diffusers --steps 10
    python benchmarks/gpu.py --only train-bf16,train-bf16-keep,train-fp8,train-fp8-blocks
    python benchmarks/gpu.py --tiny                 # tiny models, 64x128, 2 steps, fp32, CPU

The weights (~34 GB in bf16) are generated on the GPU and written to --work (default: in
/dev/shm when it has room, else the temp folder), and reused by the next run. Each row runs in
a fresh process, so its peak memory is its own and an OOM ends only that row. Per row: seconds
per step, seconds and peak memory per stage (GPU: allocated / reserved, reset per stage; CPU:
peak RSS / RSS), and the image against diffusers' and against dit360's offload none. dit360 rows
run plain FLUX (no LoRA, --wrap-pad 0, comparable with diffusers) except "wrap1" (DiT360's
default pad, for its time). Rows needing diffusers are skipped, with the reason, without it.
"""

import importlib.util
import json
import math
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import train_step
from random_flux import FULL, TINY
from runs import spawn

from dit360.config import FluxParams
from dit360.options import Parser

# key: (label, child kind, its arguments), in the order they run (the most wanted first).
ROWS = {
    "none": ("dit360, offload none", "dit360", dict(offload="none", wrap_pad=0)),
    "diffusers": ("diffusers FluxPipeline, all on the device", "diffusers", dict(offload=False)),
    "model": ("dit360, offload model", "dit360", dict(offload="model", wrap_pad=0)),
    "blocks": ("dit360, offload blocks", "dit360", dict(offload="blocks", wrap_pad=0)),
    "compile": (
        "dit360, offload none, compiled",
        "dit360",
        dict(offload="none", wrap_pad=0, compile=True),
    ),
    "fp8": (
        "dit360, fp8, compiled",
        "dit360",
        dict(offload="none", wrap_pad=0, compile=True, fp8=True),
    ),
    "fa3": (
        "dit360, FlashAttention-3, compiled",
        "dit360",
        dict(offload="none", wrap_pad=0, compile=True, attention="fa3"),
    ),
    "wrap1": ("dit360, offload none, wrap pad 1", "dit360", dict(offload="none", wrap_pad=1)),
    "diffusers-offload": ("diffusers, model CPU offload", "diffusers", dict(offload=True)),
    "edit": ("dit360 edit, half mask", "edit", {}),
    "t5-fp8": (
        "dit360, fp8 transformer and T5",
        "dit360",
        dict(offload="none", wrap_pad=0, fp8=True, t5_fp8=True),
    ),
}
# Training micro-batches: key -> (label, train.py's memory mode, the target on one H100/H200).
TRAIN_ROWS = {
    "train-bf16": (
        "train bf16, recompute",
        dict(base_dtype="bf16", offload="none", recompute=True),
        "<= 1.0 s",
    ),
    "train-bf16-keep": (
        "train bf16, no recompute",
        dict(base_dtype="bf16", offload="none", recompute=False),
        "",
    ),
    "train-fp8": (
        "train fp8 base, recompute",
        dict(base_dtype="fp8", offload="none", recompute=True),
        "<= 22 GB peak",
    ),
    "train-fp8-blocks": (
        "train fp8 base, blocks streamed",
        dict(base_dtype="fp8", offload="blocks", recompute=True),
        "<= 12 GB peak, <= 1.5 x train bf16",
    ),
}
# Table columns from stages: generate's, edit_image's and run_diffusers' names.
COLUMNS = {
    "text": ("text encoders",),
    "load": ("load transformer", "load", "encode image"),
    "denoise": ("denoise", "invert", "edit"),
    "decode": ("decode",),
}
SDPA_SHAPE = (1, 24, 8832, 128)  # FLUX.1-dev at 1024x2048 with 1 pad column: 8,320 + 512 tokens


def default_work(tiny: bool) -> Path:
    """Where the weights go: /dev/shm when it holds them (no disk writes), else the temp folder."""
    name, shm = "dit360-gpu-bench" + ("-tiny" if tiny else ""), Path("/dev/shm")
    if (shm / name / "random-weights.json").is_file():
        return shm / name
    if not tiny and shm.is_dir() and shutil.disk_usage(shm).free > 40e9:
        return shm / name
    return Path(tempfile.gettempdir()) / name


def step_tflop(p: FluxParams, img_tokens: int, txt_tokens: int = 512) -> float:
    """TFLOP of one transformer call: the blocks' GEMMs (a double block's stream and a single
    block hold the same weights) and attention (QK^T and AV); 168.7 for flux-dev at 8,320 + 512."""
    d, n, blocks = p.hidden_size, img_tokens + txt_tokens, p.depth + p.depth_single_blocks
    weights = 3 * d * d + d * d + 2 * d * p.mlp_hidden  # qkv, proj, MLP in + out
    return (2 * weights * n + 4 * n * n * d) * blocks / 1e12


def compare(a: str, b: str) -> dict:
    """Mean absolute pixel difference (0-255) and PSNR (dB) of two images of the same size."""
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (a, b))
    mse = float(((x - y) ** 2).mean())
    psnr = 10 * math.log10(255**2 / mse) if mse else math.inf
    return dict(mean_abs=float(np.abs(x - y).mean()), psnr=psnr)


def columns(result: dict) -> dict:
    """Seconds, peak and reserved (or RSS) GB per table column, from a run's stages."""
    out = {}
    for col, names in COLUMNS.items():
        stages = [result["stages"][n] for n in names if n in result["stages"]]
        if stages:
            out[col] = dict(
                s=sum(s["s"] for s in stages),
                peak=max(s["peak"] for s in stages),
                held=max(s["held"] for s in stages),
            )
    return out


def table(rows: dict, steps: int, edit_steps: int, gpu: bool, tflop: dict) -> str:
    """The markdown table of all rows (skipped and failed ones included); tflop: a step's, by
    wrap pad (the generation rows)."""
    mem = "peak GiB (allocated / reserved)" if gpu else "peak RSS GiB (peak / RSS at end)"
    lines = [
        f"| run | s/step | TFLOP/s | text s | load s | denoise s | decode s | process s | {mem}: "
        "text | load | denoise | decode | vs diffusers | vs dit360 none |",
        "|---|" + "---|" * 14,
    ]
    for key, row in rows.items():
        r, label = row["result"], row["label"]
        if "error" in r or "skipped" in r:
            lines.append(
                f"| {label} | {r.get('error') or 'skipped: ' + r['skipped']} |" + " |" * 13
            )
            continue
        c = columns(r)
        n = edit_steps if key == "edit" else steps
        per_step = c["denoise"]["s"] / n if "denoise" in c else None
        cells = [f"{per_step:.3f}" if per_step else ""]
        pad = row["args"].get("wrap_pad")
        cells += [f"{tflop[pad] / per_step:.0f}" if per_step and pad in tflop else ""]
        cells += [f"{c[k]['s']:.2f}" if k in c else "" for k in COLUMNS]
        cells += [f"{r['process_s']:.1f}"]
        cells += [f"{c[k]['peak']:.2f} / {c[k]['held']:.2f}" if k in c else "" for k in COLUMNS]
        for ref in ("vs_diffusers", "vs_none"):
            d = row.get(ref)
            cells.append(f"{d['mean_abs']:.3g} / {d['psnr']:.1f} dB" if d else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"s/step: denoise seconds / steps ({steps}; the edit: {edit_steps}, inversion + edit); "
        f"compiled rows include the compile in their first step. TFLOP/s: a step's "
        f"{tflop.get(0, 0):.1f} TFLOP (wrap pad 0; pad 1: {tflop.get(1, 0):.1f}) / s a step. "
        "load: dit360 loads the transformer (an edit also encodes the image), diffusers the whole "
        "pipeline. Image columns: mean absolute pixel difference (0-255) / PSNR.",
    ]
    return "\n".join(lines)


def train_table(rows: dict, gpu: bool) -> str:
    """The markdown table of the training rows: seconds and TFLOP/s a micro-batch, peak memory."""
    mem = "peak GiB (allocated / reserved)" if gpu else "peak RSS GiB (peak / RSS)"
    lines = [
        f"| training micro-batch | s | TFLOP/s | load s | {mem} | target |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        r = row["result"]
        if "error" in r or "skipped" in r:
            why = r.get("error") or "skipped: " + r["skipped"]
            lines.append(f"| {row['label']} | {why} | | | | {row['target']} |")
            continue
        s = sorted(r["micro_s"])[len(r["micro_s"]) // 2]  # the median
        peak = r["stages"]["micro-batches"]
        lines.append(
            f"| {row['label']} | {s:.3f} | {r['tflop'] / s:.0f} | {r['stages']['load']['s']:.1f} "
            f"| {peak['peak']:.2f} / {peak['held']:.2f} | {row['target']} |"
        )
    lines += [
        "",
        "s: the median of the timed micro-batches (after a warm-up one), forward and backward at "
        "1 pad column, LoRA r 64 on DiT360's targets, random latents and text. TFLOP: the "
        "forward (twice with recompute) and the backward of a frozen base (inputs' gradients "
        "and attention's).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = Parser(__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny models, 64x128, fp32, on the CPU")
    parser.add_argument("--only", help=f"comma-separated rows (None: all) of: {', '.join(ROWS)}")
    parser.add_argument("--steps", type=int, help="generation steps (None: 28, with --tiny 2)")
    parser.add_argument("--edit-steps", type=int, help="edit steps (None: 50, with --tiny 2)")
    parser.add_argument(
        "--work", type=Path, help="the weights folder (None: in /dev/shm or the temp folder)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("gpu-bench"), help="for results.json and table.md"
    )
    parser.add_argument("--budget", type=float, default=470, help="seconds for the whole run")
    parser.add_argument("--jobs", type=int, default=1, help="rows at once (smoke runs: overlaps)")
    args = parser.parse_args()
    start = time.perf_counter()
    keys = args.only.split(",") if args.only else [*ROWS, *TRAIN_ROWS]
    if bad := [k for k in keys if k not in ROWS and k not in TRAIN_ROWS]:
        parser.error(f"--only: unknown rows {bad}; choose from {', '.join([*ROWS, *TRAIN_ROWS])}")
    train_keys, keys = [k for k in keys if k in TRAIN_ROWS], [k for k in keys if k in ROWS]
    if args.tiny:
        sizes, device, dtype, height, width, default_steps = "tiny", "cpu", "fp32", 64, 128, 2
    else:
        sizes, device, dtype, height, width, default_steps = "full", "cuda", "bf16", 1024, 2048, 28
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here; --tiny runs every code path on the CPU")
    steps = args.steps or default_steps
    edit_steps = args.edit_steps or (2 if args.tiny else 50)
    work = args.work or default_work(args.tiny)

    def left() -> float:
        return args.budget - (time.perf_counter() - start)

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f} s] {text}", flush=True)

    # --- weights, environment, attention kernels
    folder, shape = str(work / "flux"), SDPA_SHAPE if not args.tiny else (1, 2, 552, 16)
    prep = dict(folder=folder, sizes=sizes, device=device, dtype=dtype, sdpa=shape)
    wrote = spawn("prepare", timeout=left(), **prep)
    if "error" in wrote:
        raise SystemExit(f"writing the weights failed: {wrote['error']}")
    how = "written" if wrote["written"] else "reused"
    say(f"weights {how} in {folder}: {wrote['s']:.1f} s")
    env, probe = wrote.pop("environment"), wrote.pop("sdpa")

    # --- the rows, each in a fresh process
    has_diffusers = importlib.util.find_spec("diffusers") is not None
    has_fa3 = importlib.util.find_spec("flash_attn_interface") is not None
    base = dict(base=folder, height=height, width=width, device=device, dtype=dtype)

    def run(key: str) -> dict:
        label, kind, extra = ROWS[key]
        if kind == "diffusers" and not has_diffusers:
            result = dict(skipped="diffusers is not installed (pip install diffusers)")
        elif extra.get("attention") == "fa3" and not (has_fa3 and not args.tiny):
            result = dict(skipped="FlashAttention-3 (flash_attn_interface) is not installed")
        elif left() < 30:
            result = dict(skipped=f"out of time (--budget {args.budget:.0f} s)")
        else:
            n = edit_steps if kind == "edit" else steps
            image = str(work / "images" / f"{key}.png")
            result = spawn(kind, timeout=left(), **base, steps=n, image=image, **extra)
        say(f"{label}: {result.get('error') or result.get('skipped') or 'done'}")
        return dict(label=label, kind=kind, args=extra, result=result)

    with ThreadPoolExecutor(args.jobs) as pool:  # more than 1: the rows' timings overlap
        rows = dict(zip(keys, pool.map(run, keys), strict=True))

    def run_train(key: str) -> dict:
        label, mode, target = TRAIN_ROWS[key]
        if left() < 30:
            result = dict(skipped=f"out of time (--budget {args.budget:.0f} s)")
        else:
            result = train_step.spawn(
                timeout=left(), base=folder, height=height, device=device, dtype=dtype,
                repeats=1 if args.tiny else 3, **mode,
            )  # fmt: skip
        say(f"{label}: {result.get('error') or result.get('skipped') or 'done'}")
        return dict(label=label, mode=mode, target=target, result=result)

    trains = {k: run_train(k) for k in train_keys}  # one at a time: each measures its own peak
    images = {k: r["result"].get("image") for k, r in rows.items()}
    for key, row in rows.items():
        if key in ("edit", "wrap1") or not images[key]:
            continue  # other inputs or sizes: nothing to compare with
        for ref, name in (("diffusers", "vs_diffusers"), ("none", "vs_none")):
            if ref != key and images.get(ref):
                row[name] = compare(images[key], images[ref])

    # --- report
    flux = (TINY if args.tiny else FULL).flux
    tflop = {pad: step_tflop(flux, (height // 16) * (width // 16 + 2 * pad)) for pad in (0, 1)}
    text = table(rows, steps, edit_steps, gpu=not args.tiny, tflop=tflop) if rows else ""
    args.out.mkdir(parents=True, exist_ok=True)
    settings = dict(height=height, width=width, steps=steps, edit_steps=edit_steps, dtype=dtype)
    summary = dict(settings=settings, environment=env, weights=wrote, sdpa=probe, rows=rows)
    summary["train"] = trains
    text += ("\n\n" if rows else "") + train_table(trains, gpu=not args.tiny) if trains else ""
    summary["seconds"] = time.perf_counter() - start
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    (args.out / "table.md").write_text(text + "\n")
    print()
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"{height}x{width}, {steps} steps ({edit_steps} for the edit), {dtype}, random weights")
    print()
    print(text)
    print()
    if "error" in probe:
        print(f"SDPA probe: {probe['error']}")
    else:
        print(f"SDPA on {tuple(probe['shape'])} {probe['dtype']}: picks {probe['chosen']}")
        for name, b in probe["backends"].items():
            print(
                f"  {name}: " + (f"{b['s'] * 1000:.2f} ms" if "s" in b else f"fails ({b['error']})")
            )
        print(f"  ops and kernels of a default call: {', '.join(probe['kernels']) or 'none seen'}")
    for row in rows.values():
        if notes := [line for line in row["result"].get("log", []) if not line.endswith("...")]:
            print(f"{row['label']} said: " + "; ".join(notes))
        if "skipped" in row["result"]:
            print(f"skipped: {row['label']}: {row['result']['skipped']}")
    say(f"results in {args.out}/results.json and {args.out}/table.md")


if __name__ == "__main__":
    main()
