"""GPU speed and memory at 1024x2048, 28 steps, bf16, on full-size random FLUX.1-dev weights
(transformer, T5-XXL, CLIP-L, VAE) written in the real folder layout: dit360's `generate` in each
offload mode, compiled (`--compile`), in fp8 (`--fp8`; with `--t5-fp8`), with FlashAttention-3 if
installed (`--attention fa3`), diffusers' FluxPipeline (on the GPU, and with
`enable_model_cpu_offload`), one dit360 edit, with the achieved TFLOP/s; and train.py
micro-batches (LoRA r 64, FSDP over NCCL with a world of one) in each memory mode of training.

    python benchmarks/gpu.py --out gpu-bench                # the first plan (below), ~8 minutes
    python benchmarks/gpu.py --plan later --out gpu-later   # the rest, for a later session
    python benchmarks/gpu.py --only none,diffusers --steps 10
    python benchmarks/gpu.py --tiny                         # tiny models, 64x128, 2 steps, CPU

Rows run in the order given (PLANS: the most wanted numbers first), each in a fresh process, so
its peak memory is its own and an OOM ends only that row. Each row's numbers are printed, appended
to results.jsonl, and results.json and table.md rewritten, the moment it ends: a run cut by a time
limit still returns every finished row. A row that would start with less than its minimum time
left in --budget is skipped ("out of time"), as is a row that cannot fit the GPU (ROWS' GiB).

The weights (33.7 GB in bf16; 25.3 GB with a 2-layer T5) go to the first folder with room
(WORK_CANDIDATES: /dev/shm while host memory stays, then the temp folders), reused by later runs.
When no folder holds them whole, T5 shrinks to 2 layers of the same width and vocabulary: the
transformer, the VAE and the peaks of denoising stay exact, T5's columns (text s, the text peak,
diffusers' load) do not, and the table says so. Per row: seconds per step, seconds and peak memory
per stage (GPU: allocated / reserved; CPU: peak RSS / RSS), the image against diffusers' and
against dit360's offload none. dit360 rows run plain FLUX (no LoRA, --wrap-pad 0, comparable with
diffusers) except "wrap1" (DiT360's pad). Rows needing diffusers are skipped without it.
"""

import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import train_step
from random_flux import FULL, TINY, folder_bytes, short_t5
from runs import spawn

from dit360.app.options import Parser
from dit360.load.config import FluxParams


class Row(NamedTuple):
    """A benchmark row: its label, its kind (runs.py's dit360, diffusers, edit; or train), the
    arguments of its run, the GPU memory it needs at full size (GiB, estimated from the weights:
    rows past the card's are skipped) and, for training, its target."""

    label: str
    kind: str
    args: dict
    gib: float
    target: str = ""


ROWS = {
    "none": Row("dit360, offload none", "dit360", dict(offload="none", wrap_pad=0), 26),
    "diffusers": Row("diffusers FluxPipeline, all on the device", "diffusers", {}, 36),
    "blocks": Row("dit360, offload blocks", "dit360", dict(offload="blocks", wrap_pad=0), 10),
    "t5-fp8": Row(
        "dit360, fp8 transformer and T5, eager", "dit360",
        dict(offload="none", wrap_pad=0, fp8=True, t5_fp8=True), 15,
    ),
    "compile": Row(
        "dit360, offload none, compiled", "dit360",
        dict(offload="none", wrap_pad=0, compile=True), 26,
    ),
    "fp8": Row(
        "dit360, fp8, compiled", "dit360",
        dict(offload="none", wrap_pad=0, compile=True, fp8=True), 16,
    ),
    "train-fp8-blocks": Row(
        "train fp8 base, blocks streamed", "train",
        dict(base_dtype="fp8", offload="blocks", recompute=True), 14,
        "<= 12 GB peak, <= 1.5 x train bf16",
    ),
    "model": Row("dit360, offload model", "dit360", dict(offload="model", wrap_pad=0), 26),
    "edit": Row("dit360 edit, half mask", "edit", {}, 30),
    "train-bf16": Row(
        "train bf16, recompute", "train",
        dict(base_dtype="bf16", offload="none", recompute=True), 32, "<= 1.0 s",
    ),
    "train-fp8": Row(
        "train fp8 base, recompute", "train",
        dict(base_dtype="fp8", offload="none", recompute=True), 24, "<= 22 GB peak",
    ),
    "fa3": Row(
        "dit360, FlashAttention-3, compiled", "dit360",
        dict(offload="none", wrap_pad=0, compile=True, attention="fa3"), 26,
    ),
    "wrap1": Row(
        "dit360, offload none, wrap pad 1", "dit360", dict(offload="none", wrap_pad=1), 26
    ),
    "diffusers-offload": Row("diffusers, model CPU offload", "diffusers", dict(offload=True), 26),
    "train-bf16-keep": Row(
        "train bf16, no recompute", "train",
        dict(base_dtype="bf16", offload="none", recompute=False), 100,
    ),
}  # fmt: skip
# The first plan fits one device call of <= 9.5 minutes on an H100 (gpu_session.sh); the rest is
# for a later session.
PLANS = {
    "first": ["none", "diffusers", "blocks", "t5-fp8", "compile", "fp8", "train-fp8-blocks"],
    "later": [
        "model", "edit", "train-bf16", "train-fp8", "fa3", "wrap1", "diffusers-offload",
        "train-bf16-keep",
    ],
}  # fmt: skip
PLANS["all"] = PLANS["first"] + PLANS["later"]
MIN_S = 45  # a full-size row needs at least this long (load, 28 steps, decode): else skipped
# Table columns from stages: generate's, edit_image's and run_diffusers' names.
COLUMNS = {
    "text": ("text encoders",),
    "load": ("load transformer", "load", "encode image"),
    "denoise": ("denoise", "invert", "edit"),
    "decode": ("decode",),
}
SDPA_SHAPE = (1, 24, 8832, 128)  # FLUX.1-dev at 1024x2048 with 1 pad column: 8,320 + 512 tokens
NAME = "dit360-gpu-bench"
# Where the weights may go, in order of preference: memory first (no disk writes), then disks.
WORK_CANDIDATES = ("/dev/shm", os.environ.get("TMPDIR") or tempfile.gettempdir(), "/var/tmp")
HOST_RESERVE = (
    48 * 2**30
)  # host memory the rows need besides weights in /dev/shm (diffusers: 34 GB)


def mem_available() -> int:
    """The host's available memory in bytes (Linux), else 0."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 0
    return next(int(line.split()[1]) * 1024 for line in text.splitlines() if "MemAvailable" in line)


def room(folder: Path) -> int:
    """Bytes the weights may take in `folder`: its free space; in memory (tmpfs), also leaving the
    host memory the rows need."""
    free = shutil.disk_usage(folder).free
    if str(folder).startswith("/dev/shm"):
        free = min(free, mem_available() - HOST_RESERVE)
    return free


def choose_work(
    candidates: list[Path], needs: dict[int, int], rooms: dict, name: str = NAME
) -> tuple[Path, int]:
    """The weights' folder and T5's layers (24, else 2): a folder holding complete weights already
    first, then the first with room for the full T5, then the first with room for the short one.
    needs: T5 layers -> bytes; rooms: folder -> free bytes. SystemExit names every folder."""
    for folder in candidates:
        made = folder / name / "flux" / "random-weights.json"
        if made.is_file():
            return folder / name, json.loads(made.read_text())["sizes"]["t5"]["num_layers"]
    for layers, need in sorted(needs.items(), reverse=True):
        for folder in candidates:
            if rooms[folder] >= need * 1.05 + 2**30:
                return folder / name, layers
    where = ", ".join(f"{f}: {rooms[f] / 2**30:.1f} GiB" for f in candidates)
    raise SystemExit(
        f"no folder has room for the weights ({needs[min(needs)] / 2**30:.1f} GiB "
        f"with a 2-layer T5); room: {where}; name one with --work"
    )


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


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` whole (a cut run never leaves half a results file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    parser = Parser(__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny models, 64x128, fp32, on the CPU")
    parser.add_argument("--plan", choices=PLANS, default="first", help="which rows, in order")
    parser.add_argument(
        "--only", help=f"comma-separated rows, in order, instead of --plan: {', '.join(ROWS)}"
    )
    parser.add_argument("--steps", type=int, help="generation steps (None: 28, with --tiny 2)")
    parser.add_argument("--edit-steps", type=int, help="edit steps (None: 50, with --tiny 2)")
    parser.add_argument("--work", type=Path, help="the weights folder (None: WORK_CANDIDATES)")
    parser.add_argument(
        "--t5-layers", type=int, help="T5 blocks (None: 24 if there is room, else 2)"
    )
    parser.add_argument("--out", type=Path, default=Path("gpu-bench"), help="for the results")
    parser.add_argument("--budget", type=float, default=470, help="seconds for the whole run")
    parser.add_argument("--prepare-only", action="store_true", help="write the weights, no rows")
    parser.add_argument("--jobs", type=int, default=1, help="rows at once (smoke runs: overlaps)")
    args = parser.parse_args()
    start = time.perf_counter()
    keys = args.only.split(",") if args.only else PLANS[args.plan]
    if bad := [k for k in keys if k not in ROWS]:
        parser.error(f"--only: unknown rows {bad}; choose from {', '.join(ROWS)}")
    if args.tiny:
        sizes, device, dtype, height, width, default_steps = TINY, "cpu", "fp32", 64, 128, 2
    else:
        sizes, device, dtype, height, width, default_steps = FULL, "cuda", "bf16", 1024, 2048, 28
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here; --tiny runs every code path on the CPU")
    steps = args.steps or default_steps
    edit_steps = args.edit_steps or (2 if args.tiny else 50)
    min_s = 0 if args.tiny else MIN_S

    def left() -> float:
        return args.budget - (time.perf_counter() - start)

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f} s] {text}", flush=True)

    # --- where the weights go: room checked first, T5 shortened when no folder holds it whole
    needs = {n: folder_bytes(short_t5(sizes, n)) for n in (sizes.t5["num_layers"], 2)}
    name = NAME + ("-tiny" if args.tiny else "")
    if args.t5_layers:
        needs = {args.t5_layers: folder_bytes(short_t5(sizes, args.t5_layers))}
    candidates = (
        [args.work] if args.work else [Path(c) for c in WORK_CANDIDATES if Path(c).is_dir()]
    )
    rooms = {c: room(c) if c.exists() else shutil.disk_usage(c.parent).free for c in candidates}
    for c in candidates:
        say(f"room for weights in {c}: {rooms[c] / 2**30:.1f} GiB")
    work, t5_layers = (
        (args.work, next(iter(needs))) if args.work and args.t5_layers
        else choose_work(candidates, needs, rooms, "" if args.work else name)
    )  # fmt: skip
    short = t5_layers != FULL.t5["num_layers"] and not args.tiny
    sizes = short_t5(sizes, t5_layers)

    # --- weights, environment, attention kernels
    folder, shape = str(work / "flux"), SDPA_SHAPE if not args.tiny else (1, 2, 552, 16)
    prep = dict(folder=folder, sizes="tiny" if args.tiny else "full", device=device, dtype=dtype)
    wrote = spawn("prepare", **prep, t5_layers=t5_layers, sdpa=shape)
    if "error" in wrote:
        raise SystemExit(f"writing the weights failed: {wrote['error']}")
    how = "written" if wrote["written"] else "reused"
    say(f"weights {how} in {folder} (T5 of {t5_layers} layers): {wrote['s']:.1f} s")
    env, probe = wrote.pop("environment"), wrote.pop("sdpa")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.prepare_only:
        write_atomic(args.out / "weights.json", json.dumps(dict(wrote, environment=env), indent=2))
        return

    # --- the rows, each in a fresh process, saved as each ends
    has_diffusers = importlib.util.find_spec("diffusers") is not None
    has_fa3 = importlib.util.find_spec("flash_attn_interface") is not None
    gpu_gib = env.get("gpu_total_gib")
    base = dict(base=folder, height=height, width=width, device=device, dtype=dtype)
    flux = sizes.flux
    tflop = {pad: step_tflop(flux, (height // 16) * (width // 16 + 2 * pad)) for pad in (0, 1)}
    settings = dict(height=height, width=width, steps=steps, edit_steps=edit_steps, dtype=dtype)
    settings.update(t5_layers=t5_layers, budget=args.budget, rows=keys)
    summary = dict(settings=settings, environment=env, weights=wrote, sdpa=probe, rows={})
    summary["train"] = {}
    note = (
        f"T5 has {t5_layers} of its 24 layers (no folder had room for the full one): the text "
        "columns, the text peak and diffusers' load are not FLUX.1-dev's; the rest is."
        if short
        else ""
    )

    def skip_reason(row: Row) -> str | None:
        if row.kind == "diffusers" and not has_diffusers:
            return "diffusers is not installed (pip install diffusers)"
        if row.args.get("attention") == "fa3" and not (has_fa3 and not args.tiny):
            return "FlashAttention-3 (flash_attn_interface) is not installed"
        if gpu_gib and row.gib > gpu_gib:
            return f"needs about {row.gib:.0f} GiB, the GPU has {gpu_gib:.0f} GiB"
        if left() < max(min_s, 1):
            return f"out of time (--budget {args.budget:.0f} s)"
        return None

    def run(key: str) -> dict:
        row = ROWS[key]
        if why := skip_reason(row):
            result = dict(skipped=why)
        elif row.kind == "train":
            result = train_step.spawn(
                timeout=left(), base=folder, height=height, device=device, dtype=dtype,
                repeats=1 if args.tiny else 3, **row.args,
            )  # fmt: skip
        else:
            n = edit_steps if row.kind == "edit" else steps
            image = str(work / "images" / f"{key}.png")
            result = spawn(row.kind, timeout=left(), **base, steps=n, image=image, **row.args)
        done = dict(label=row.label, kind=row.kind, args=row.args, target=row.target)
        done["result"] = result
        save(key, done)
        return done

    def save(key: str, done: dict) -> None:
        """Record a finished row: results.jsonl, then results.json and table.md anew, printed."""
        part = "train" if done["kind"] == "train" else "rows"
        summary[part][key] = done  # in the plan's order, whichever row ended first
        summary[part] = {k: summary[part][k] for k in keys if k in summary[part]}
        rows = summary["rows"]
        images = {k: r["result"].get("image") for k, r in rows.items()}
        for k, r in rows.items():
            if k in ("edit", "wrap1") or not images[k]:
                continue  # other inputs or sizes: nothing to compare with
            for ref, field in (("diffusers", "vs_diffusers"), ("none", "vs_none")):
                if ref != k and images.get(ref):
                    r[field] = compare(images[k], images[ref])
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps(dict(key=key, seconds=time.perf_counter() - start, **done)) + "\n")
        summary["seconds"] = time.perf_counter() - start
        text = report(summary, steps, edit_steps, not args.tiny, tflop, note)
        write_atomic(args.out / "results.json", json.dumps(summary, indent=2))
        write_atomic(args.out / "table.md", text + "\n")
        r = done["result"]
        how = r.get("error") or ("skipped: " + r["skipped"] if "skipped" in r else "done")
        say(f"{done['label']}: {how}")
        line = next((x for x in text.splitlines() if x.startswith(f"| {done['label']} |")), "")
        print(line, flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:  # more than 1: the rows' timings overlap
        list(pool.map(run, keys))

    # --- report
    print()
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"{height}x{width}, {steps} steps ({edit_steps} for the edit), {dtype}, random weights")
    print()
    print(report(summary, steps, edit_steps, not args.tiny, tflop, note))
    print()
    if "error" in probe:
        print(f"SDPA probe: {probe['error']}")
    else:
        print(f"SDPA on {tuple(probe['shape'])} {probe['dtype']}: picks {probe['chosen']}")
        for name_, b in probe["backends"].items():
            print(
                f"  {name_}: "
                + (f"{b['s'] * 1000:.2f} ms" if "s" in b else f"fails ({b['error']})")
            )
        print(f"  ops and kernels of a default call: {', '.join(probe['kernels']) or 'none seen'}")
    for row in summary["rows"].values():
        if notes := [line for line in row["result"].get("log", []) if not line.endswith("...")]:
            print(f"{row['label']} said: " + "; ".join(notes))
    say(f"results in {args.out}/results.json, table.md and results.jsonl")


def report(summary: dict, steps: int, edit_steps: int, gpu: bool, tflop: dict, note: str) -> str:
    """Both tables of what has run so far, in the rows' order, and the T5 note."""
    parts = []
    if summary["rows"]:
        parts.append(table(summary["rows"], steps, edit_steps, gpu, tflop))
    if summary["train"]:
        parts.append(train_table(summary["train"], gpu))
    if note:
        parts.append(note)
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
