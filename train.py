"""Train a DiT360 panorama LoRA on FLUX.1-dev: one process or many (torchrun + FSDP2), GPU or CPU.

torchrun --nproc_per_node 8 train.py --pano pano.jsonl --persp persp.jsonl --out runs/dit360

--recipe pano (the default with --pano alone) and --recipe hybrid (the default with --persp) are
DiT360's two training scripts: train.sh + src/dit360.py and train_mix_staged_lora_dynamic.sh +
src/dit360_mix_staged.py (RECIPES; the settings they pass and what their code does with them).
Both: LoRA r 64, alpha 64, dropout 0.05 on attn to_q/k/v/out; AdamW lr 5e-5, betas (0.9, 0.999),
eps 1e-6, weight decay 1e-5; batch 1 per rank; 25 epochs; guidance 1.0; no gradient clipping;
the VAE encoder zero-pads; each sample's mean loss, / batch x accumulation x world per step.
pano: 1 wrap column; yaw and cube losses 0.5 each from epoch 2; 4 micro-batches a step; linear
warm-up over the first 5% of steps, then constant. hybrid: no wrap column; yaw and cube weights 0
(in epochs 0-2); 5 micro-batches a step; the learning rate x 0.2 + 0.8 * epoch / max(1, epochs //
10) until that reaches 1. Any flag given overrides its recipe's value; the run prints the settings
it resolved and args.json records them. bf16 on GPU (the reference: fp16 mixed precision), fp32 on
CPU; the LoRA and its optimizer state are fp32.

The model is always FSDP-sharded, also in a single process (a world of one): one code path, the
same dtypes and numerics, and checkpoints that resume on any number of ranks. With a float8 base
(--base-dtype fp8) or its blocks streamed from CPU memory (--offload blocks), for one GPU, FSDP
shards the LoRA only and the base stays whole on the one process, out of FSDP.

Loss (--loss-norm): "sample", DiT360's: each micro-batch's sum of its rows' losses (a panorama
row's mean squared error; the perspective rows' mean pooled over all their supervised elements
x 0.5, once per perspective row), divided by the nominal rows of a step, --batch-size x
--grad-accum x world: Lightning divides each training_step by accumulate_grad_batches, also
in an epoch's last, short window, and DDP averages the ranks; "token", the sum of squared
errors over supervised tokens divided by their number (torchtitan's global token count),
all-reduced before backward.
Each rank backpropagates its sum / the denominator, and FSDP sums the ranks' gradients (its
divide factor is 1, `distributed.shard`): the gradient of the global loss, however the step is
split over ranks and micro-batches.

Randomness follows the counters, never hidden state: a sample's latents, noise and sigma come from
a generator seeded with (seed, epoch, its index in the epoch's global order), the yaw angle from
(seed, epoch, batch), LoRA dropout from (seed, step, micro-batch, rank). So a checkpoint's
(step, epoch, batch) is all the RNG state a resume needs, and a global batch gives the same loss
however it is split over ranks.

Every argument is checked before anything slow; a bad one is one line `error: ...` (exit 2).

--out holds one run. out/.lock (the pid and host of the run writing there, flocked while it runs)
is taken first, before any other check, so a second run cannot start there meanwhile; a lock left
by a dead process is taken over, with a warning. Once every check passed, the run marks --out as
its own (out/.dit360-run). A new run needs an empty --out (or one whose run stopped before its first
step); --resume continues a marked run; --overwrite deletes a marked run's own files first (the
table in dit360/train/checkpoints.py), not its cache/ nor anything else; a folder that is not
marked is never touched. It receives checkpoints/step-N/ (state.safetensors + lora/), lora/ (the
final LoRA in the peft format that `sample.py --lora` and diffusers read), args.json, log.jsonl (one
line a step), loss.png (with matplotlib), tensorboard/ (--log tensorboard), samples/step-N/
(previews with --sample-every), cache/ (the default --cache-dir of --base-dtype fp8 and
--offload blocks).

--resume continues the latest readable checkpoint (an unreadable one is skipped, with a warning)
or the one named; with unchanged arguments, bit-identical to a run never stopped. What fixes the
state's meaning must be as it was trained: --lora-rank, --alpha, --targets, --dropout,
--height, --wrap-pad, --supervise-pad, --circular-encoder, --pano, --persp, --seed (one error
lists every difference; a recipe's values count as given, so the same flags resolve the same).
The rest may change: steps, learning rate and schedule, loss weights and normalisation,
clipping, batch size, accumulation and world size (the place in the epoch is kept in samples,
rounded up to a whole batch: no sample twice), checkpoint interval and count, workers, device,
the base's dtype and offloading (memory modes), previews, logs.

Non-finite guard: a step whose loss or gradient norm is not finite updates nothing (its log line
has a `skipped` field); --max-nonfinite of them in a row stop the run (exit 1). A checkpoint or
LoRA holding a non-finite value is never written, so every checkpoint kept is a finite one.
"""

from dit360.app.cli import handle_signals, run_main, starting, torchrun

if __name__ == "__main__":  # before torch loads: Ctrl-C or SIGTERM while importing is one line
    handle_signals()
    starting("train.py")


import argparse
import copy
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import torch

from dit360.app.options import require_torch

# Before any import that needs it. FSDP2 as dit360.train.distributed uses it: fully_shard 2.6,
# ignored_params and src_data_rank 2.7, set_gradient_divide_factor,
# set_force_sum_reduction_for_comms and set_reshard_after_forward 2.8.
require_torch((2, 8), "train.py", "FSDP2's fully_shard and its settings")

from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from dit360.app.options import (
    COUNT,
    FRACTION,
    GUIDANCE,
    NATURAL,
    NONNEG,
    POSITIVE,
    STEPS,
    Parser,
    bounded,
    check_height,
    fail,
    no_gpu,
)
from dit360.app.panorama import Grid
from dit360.app.report import (
    LOGS_EXTRA,
    free,
    has_matplotlib,
    open_log,
    peak_memory_gb,
    plot_losses,
    summary_writer,
    write_scalars,
)
from dit360.core.autoencoder import scale_latents
from dit360.core.lora import Adapter, inject
from dit360.core.loss import NORMS, HybridSchedule, LossConfig, draw_yaw, flow_loss, sample_sigmas
from dit360.core.sampling import Conditioning
from dit360.load import sources
from dit360.load.config import FLUX_DEV, AutoEncoderParams
from dit360.load.files import TensorFile, atomic_path, unwritable
from dit360.load.lora_formats import DIT360_TARGETS, target_rows
from dit360.load.sources import Sources, resolve_sources
from dit360.load.weights import KeyPlan, build, load_autoencoder, read_flux
from dit360.memory.ahead import ahead, modulation_layers
from dit360.memory.fp8 import quantize_block
from dit360.memory.offload import park, stream
from dit360.speed.compiling import compile_blocks
from dit360.train import checkpoints, distributed
from dit360.train.checkpoints import (
    Checkpoint,
    check_out,
    claim,
    export_lora,
    find_checkpoint,
    nonfinite,
    prune,
    release,
    save_checkpoint,
    start_run,
    steps,
)
from dit360.train.data import (
    Batch,
    Encode,
    EncodeText,
    Source,
    build_cache,
    encoded,
    epoch_loader,
    epoch_order,
    read_rows,
    seeded,
)
from dit360.train.distributed import print0, warn0
from dit360.train.previews import preview_options, read_prompts, render

# Streams of seeded generators; data.py uses 0 (data.AUGMENT_STREAM, panorama augmentation).
SAMPLE_STREAM, YAW_STREAM, DROPOUT = 10, 11, 12
PARTS = ("flow", "yaw", "cube")  # the loss components flow_loss reports
INPUT_ERRORS = (ValueError, FileNotFoundError, PermissionError)  # one line, no traceback

# --- config -----------------------------------------------------------------------------------

# DiT360's two scripts as they run (train.sh / train_mix_staged_lora_dynamic.sh, their code where
# it overrides a setting). Each key is a flag's dest; a flag given on the command line wins.
COMMON = dict(
    lora_rank=64, alpha=64.0, dropout=0.05, targets=list(DIT360_TARGETS), lr=5e-5,
    weight_decay=1e-5, max_grad_norm=0.0, batch_size=1, epochs=25, guidance=1.0,
    loss_norm="sample", circular_encoder=False,
)  # fmt: skip
RECIPES = {
    "pano": COMMON | dict(
        wrap_pad=1, lambda_yaw=0.5, lambda_cube=0.5, aux_epochs="2:", grad_accum=4,
        warmup="linear:0.05",
    ),  # src/dit360.py:239-242 (epoch >= 2), :270-276 (int(0.05 * steps), then constant)
    "hybrid": COMMON | dict(
        wrap_pad=0, lambda_yaw=0.0, lambda_cube=0.0, aux_epochs="0:3", grad_accum=5,
        warmup="epochs:0.1",
    ),  # src/dit360_mix_staged.py:244 (epoch < 3), :285-290 (per epoch, max(1, epochs // 10))
}  # fmt: skip
WARMUPS = ("linear", "epochs")


def recipe_help(key: str) -> str:
    """What the recipes set a flag to, for --help."""
    values = {r: " ".join(v) if isinstance(v := RECIPES[r][key], list) else v for r in RECIPES}
    if len(set(values.values())) == 1:
        return f"both {values['pano']}"
    return ", ".join(f"{r} {v}" for r, v in values.items())


def aux_epochs(text: str) -> str:
    """--aux-epochs START:STOP, STOP optional (START: to the end), START < STOP."""
    start, _, stop = text.partition(":")
    ok = start.isdigit() and (stop.isdigit() or stop == "") and ":" in text
    if not ok or (stop and int(stop) <= int(start)):
        raise argparse.ArgumentTypeError(
            f"needs START:STOP epochs, STOP > START or none, got {text!r}"
        )
    return f"{int(start)}:{int(stop) if stop else ''}"


def warmup(text: str) -> str:
    """--warmup linear:FRACTION or epochs:FRACTION (a bare FRACTION: linear)."""
    form, _, value = text.rpartition(":")
    if (form or "linear") not in WARMUPS:
        raise argparse.ArgumentTypeError(f"needs linear:FRACTION or epochs:FRACTION, got {text!r}")
    try:
        return f"{form or 'linear'}:{FRACTION(value)!r}"
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (linear:FRACTION or epochs:FRACTION)") from None


def settings(args: argparse.Namespace) -> str:
    """The resolved recipe settings, one block; a value the command line changed says so."""
    recipe, lines = RECIPES[args.recipe], [f"recipe {args.recipe}:"]
    for key, value in recipe.items():
        now = getattr(args, key)
        lines.append(
            f"  --{key.replace('_', '-')} {now}" + (f" (recipe: {value})" if now != value else "")
        )
    return "\n".join(lines)


def schedule(args: argparse.Namespace) -> HybridSchedule:
    """The epochs' perspective mixing and auxiliary-loss window of the resolved arguments."""
    start, stop = args.aux_epochs.split(":")
    return HybridSchedule(aux_start=int(start), aux_stop=int(stop) if stop else None)


# More loader processes than cores slows a run (4 on 2 cores: a tiny run 3x slower).
WORKERS = min(4, max(0, (os.cpu_count() or 1) - 1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(__doc__)
    p.add_argument("--base", help=f"FLUX.1-dev repo id or folder, ComfyUI files (None: {FLUX_DEV})")
    for part in sources.PARTS:
        what, example = sources.WHAT[part], sources.EXAMPLE[part]
        p.add_argument(f"--{part}", help=f"the {what}'s own file or folder, e.g. {example}")
    p.add_argument("--pano", required=True, help="jsonl of panoramas {image, caption[, mask]}")
    p.add_argument("--persp", help="jsonl of perspective photos on the canvas, with masks")
    p.add_argument("--out", default="runs/dit360", help="the run: checkpoints, LoRA, log")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out first")
    p.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        help="DiT360's settings: pano = train.sh (src/dit360.py), hybrid = "
        "train_mix_staged_lora_dynamic.sh (src/dit360_mix_staged.py); default pano, hybrid with "
        "--persp. A flag given overrides its value",
    )
    p.add_argument(  # --resolution: the reference's name; args.json keeps the key "resolution"
        "--height", "--resolution", dest="resolution", type=COUNT, default=1024,
        help="the panoramas' height (width = 2 x height; --resolution is the same flag)",
    )  # fmt: skip

    def tuned(flag: str, help: str, **kw) -> None:
        """A flag whose default is the recipe's."""
        key = flag.removeprefix("--").replace("-", "_")
        p.add_argument(flag, help=f"{help} (recipe: {recipe_help(key)})", **kw)

    tuned("--epochs", "passes over the panoramas", type=COUNT)
    p.add_argument("--max-steps", type=COUNT, help="optimizer steps (overrides --epochs)")
    tuned("--batch-size", "per rank and micro-batch", type=COUNT)
    tuned("--grad-accum", "micro-batches per step", type=COUNT)
    tuned("--lr", "AdamW learning rate", type=POSITIVE)
    tuned(
        "--warmup",
        "learning-rate warm-up. linear:F: from 0 over the first F of the steps (counted as "
        "DiT360 does: the epochs' batches // --grad-accum, or --max-steps), then constant; "
        "epochs:F: x 0.2 + 0.8 * epoch / E in epochs below E = max(1, int(F * --epochs)), then 1",
        type=warmup,
    )
    tuned("--weight-decay", "AdamW weight decay", type=NONNEG)
    tuned("--max-grad-norm", "clip gradients (0: off)", type=NONNEG)
    tuned("--lora-rank", "LoRA rank", type=COUNT)
    tuned("--alpha", "LoRA alpha", type=POSITIVE)
    tuned("--dropout", "LoRA dropout", type=FRACTION)
    tuned("--targets", "diffusers names", nargs="+")
    tuned("--wrap-pad", "columns a side", type=int, choices=(0, 1, 2))
    p.add_argument(
        "--supervise-pad",
        action="store_true",
        help="supervise the wrapped pad columns too (the maintainers' seam fix, with --wrap-pad 2)",
    )
    tuned(
        "--loss-norm",
        "sample: each row's mean (a batch's perspective rows pooled, x 0.5), / --batch-size x "
        "--grad-accum x world, also in a short last step (DiT360's, Lightning's division); "
        "token: the step's squared errors / its supervised tokens (a perspective row weighs by "
        "its coverage)",
        choices=NORMS,
    )
    tuned("--lambda-yaw", "weight of the yaw loss", type=NONNEG)
    tuned("--lambda-cube", "weight of the cube loss", type=NONNEG)
    tuned(
        "--aux-epochs",
        "epochs START:STOP of the yaw and cube losses (START: to the end)",
        type=aux_epochs,
    )
    tuned("--guidance", "guidance input while training", type=bounded(float, 0, GUIDANCE))
    tuned(
        "--circular-encoder",
        "VAE encoder wraps the width: a roll of the image rolls its latents exactly, so the "
        "cache is exact (--no-circular-encoder: the reference's zero padding)",
        action=argparse.BooleanOptionalAction,
    )
    p.add_argument("--resume", nargs="?", const="latest", help="checkpoint folder (default latest)")
    p.add_argument("--save-every", type=COUNT, default=500, help="steps between checkpoints")
    p.add_argument("--keep", type=NATURAL, default=2, help="checkpoints kept (0: all)")
    p.add_argument("--max-nonfinite", type=COUNT, default=3, help="skipped steps in a row: stop")
    p.add_argument(
        "--cache-dir",
        help="encode every image and caption once, into this folder; no step runs T5 or the VAE "
        "(default with --base-dtype fp8 or --offload blocks: OUT/cache)",
    )
    p.add_argument("--seed", type=NATURAL, default=0, help="data order, noise, yaw, dropout")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument(
        "--no-recompute",
        action="store_true",
        help="activation checkpointing off: keep every block's activations (more memory)",
    )
    p.add_argument(
        "--base-dtype",
        choices=("bf16", "fp8"),
        default="bf16",
        help="the frozen base's block linears: bf16 (fp32 on the CPU), or float8 with per-channel "
        "scales (half the memory; one process); the LoRA and its optimizer stay fp32",
    )
    p.add_argument(
        "--offload",
        choices=("none", "blocks"),
        default="none",
        help="blocks: the frozen base blocks wait in pinned CPU memory and stream through the GPU "
        "in forward and in backward's recomputation (least GPU memory; one process)",
    )
    p.add_argument(
        "--sample-every",
        type=NATURAL,
        default=0,
        help="previews with the current LoRA every N steps, to OUT/samples/step-N/ (0: none)",
    )
    p.add_argument(
        "--sample-prompts", help="preview prompts, read as sample.py --prompts (.txt or .jsonl)"
    )
    p.add_argument(
        "--sample-steps",
        type=bounded(int, 1, STEPS),
        default=28,
        help="sampling steps of a preview",
    )
    p.add_argument(  # not --log: torchrun takes it for its --log-dir (an ambiguous prefix)
        "--logger", "--log", dest="log", choices=("jsonl", "tensorboard"), default="jsonl",
        help="tensorboard: event files in OUT/tensorboard too (pip install tensorboard)",
    )  # fmt: skip
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the transformer blocks (torch.compile): faster after a one-time compile",
    )
    p.add_argument(
        "--workers",
        type=NATURAL,
        default=WORKERS,
        help="data loader processes per rank (by default the cores beside the main one, up to 4)",
    )
    args = p.parse_args(argv)
    args.recipe = args.recipe or ("hybrid" if args.persp else "pano")
    for key, value in RECIPES[args.recipe].items():  # what the command line left unset
        if getattr(args, key) is None:
            setattr(args, key, copy.copy(value))
    try:  # before anything is written: a huge size would fail only after args.json and the log
        check_height("--height", args.resolution)
    except ValueError as e:
        fail(e)
    for flag in ("pano", "persp"):  # recorded resolved: a resume compares them
        if (path := getattr(args, flag)) is not None and not os.path.isfile(path):  # no OSError
            fail(f"--{flag} {path}: no such file")
        setattr(args, flag, path and str(Path(path).resolve()))
    if args.resume and args.overwrite:
        fail("--resume continues the run in --out, --overwrite deletes it: pass one")
    # A loader process passes each batch's tensors as descriptors: too few, and one is dropped,
    # the run waits for it for ever (2 workers: hung at 40, ran at 50; none: ran at 12)
    import resource  # POSIX only: main refused Windows before

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if args.workers and -1 < soft < (need := 32 + 16 * args.workers):  # -1: RLIM_INFINITY
        if -1 < hard < need:
            fail(f"--workers {args.workers}: needs {need} open files, ulimit -n allows {hard}: "
                 "raise it, or give fewer --workers")  # fmt: skip
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    if args.offload == "blocks" and args.no_recompute:
        fail(
            "--offload blocks streams each block again for backward's recomputation: "
            "drop --no-recompute"
        )
    if bool(args.sample_every) != bool(args.sample_prompts):
        fail("previews need both --sample-every N and --sample-prompts FILE")
    try:
        args.prompts = read_prompts(args.sample_prompts) if args.sample_prompts else []
        if args.log == "tensorboard":
            summary_writer()  # installed? Now, not after minutes of loading
    except (OSError, ValueError) as e:
        fail(e)
    if local_base(args) and not args.cache_dir:  # T5-XXL beside the base would not fit 24 GB
        args.cache_dir = str(Path(args.out) / "cache")
    if args.cache_dir and (near := unwritable(args.cache_dir)):  # before the run is marked
        fail(f"--cache-dir {args.cache_dir}: {near} is not a folder this user can write")
    return args


def local_base(args: argparse.Namespace) -> bool:
    """Whether the frozen base stays out of FSDP, whole on this one rank: float8 or streamed."""
    return args.base_dtype == "fp8" or args.offload == "blocks"


def check_device(name: str | None) -> torch.device:
    """--device as a torch.device here (default: cuda if any, else cpu; cuda: cuda:LOCAL_RANK)."""
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        fail(f"--device {name}: not a device (cpu, cuda, cuda:1)")
    if dev.type not in ("cpu", "cuda"):
        fail(f"--device {name}: train.py runs on cpu or cuda (torch.distributed has no mps)")
    if name is None and dev.type == "cpu":
        warn0(no_gpu("training", "days"))
    index = torchrun()[2] if dev.index is None else dev.index
    if dev.type == "cuda" and index >= torch.cuda.device_count():
        fail(f"--device {name}: {torch.cuda.device_count()} CUDA devices here; try --device cpu")
    return torch.device("cuda", index) if dev.type == "cuda" else dev


class Env(NamedTuple):
    """Where this process runs: its rank, the world size, its device and compute dtype."""

    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class Encoders:
    """How a batch becomes model inputs: the VAE's latent scale and shift, its posterior and the
    text encoders (both None once --cache-dir has encoded every row)."""

    ae_params: AutoEncoderParams
    encode: Encode | None  # pixels -> posterior mean, std
    encode_text: EncodeText | None  # captions -> txt, txt_ids, vec


# --- data -------------------------------------------------------------------------------------


def weights(args: argparse.Namespace) -> Sources:
    """Where the weights of every model are (--base and the part flags; resolved once)."""
    return resolve_sources(args.base, args.transformer, args.t5, args.clip, args.vae)


def load_encoders(args: argparse.Namespace, env: Env) -> Encoders:
    """The frozen VAE and text encoders, on every rank."""
    from dit360.app.text import (  # transformers: 3 s, imported late
        encode_prompt,
        load_text_encoders,
    )

    try:
        text = load_text_encoders(weights(args), env.device, env.dtype)
        vae = load_autoencoder(weights(args).vae, env.device, torch.float32)  # fp32, as the ref.
    except INPUT_ERRORS as e:
        fail(e)
    vae.set_circular(False, encoder=args.circular_encoder)
    encode = torch.no_grad()(lambda x: vae.posterior(x.to(env.device)))
    return Encoders(vae.params, encode, partial(encode_prompt, text))


def cache_rows(source: Source, enc: Encoders, args: argparse.Namespace, env: Env) -> Source:
    """Encode every row once into --cache-dir (each rank its share) -> the source reading it."""
    src = weights(args)
    parts = "|".join(f"{Path(p.path).resolve()}{p.prefix}" for p in (src.t5, src.clip, src.vae))
    model_id = f"{parts}|circular encoder {args.circular_encoder}|text {env.dtype}"
    every = source.pano + source.persp
    made = build_cache(
        every[env.rank :: env.world], args.cache_dir, args.resolution, model_id, enc.encode,
        enc.encode_text,
    )  # fmt: skip
    torch.distributed.barrier()
    print0(f"cache {args.cache_dir}: {len(every)} rows, {made} new on rank 0")
    return replace(source, cache_dir=Path(args.cache_dir), model_id=model_id)


def total_steps(source: Source, args: argparse.Namespace, rank: int, world: int) -> tuple[int, int]:
    """Optimizer steps of the run (--max-steps, or those of --epochs epochs; an epoch's last,
    partial accumulation still makes a step) and the count a linear warm-up takes a fraction of:
    DiT360's, the run's micro-batches // --grad-accum (its train.py:267), or --max-steps."""
    orders = (epoch_order(source, e, rank, world) for e in range(args.epochs))
    batches = [len(order) // args.batch_size for order in orders]  # the persp share varies
    if batches[0] == 0:
        fail(f"{len(source.pano)} panoramas: no batch of {args.batch_size} x {world}")
    steps = sum(math.ceil(n / args.grad_accum) for n in batches)
    return args.max_steps or steps, args.max_steps or sum(batches) // args.grad_accum


def micro_batches(
    source: Source, args: argparse.Namespace, epoch: int, batch: int, rank: int, world: int
) -> Iterator[tuple[int, int, list[Batch]]]:
    """Each step's (epoch, first batch, micro-batches) from batch `batch` of `epoch` on, forever."""
    while True:
        loader = iter(
            epoch_loader(source, epoch, args.batch_size, rank, world, args.workers, batch)
        )
        try:
            while micro := list(islice(loader, args.grad_accum)):
                yield epoch, batch, micro
                batch += len(micro)
        finally:  # its processes stop here, where a Ctrl-C is heard: in the iterator's __del__
            # (as main's frame goes), Python would print the KeyboardInterrupt and go on
            getattr(loader, "_shutdown_workers", lambda: None)()
        epoch, batch = epoch + 1, 0


# --- model ------------------------------------------------------------------------------------


def build_model(
    model: nn.Module, tfile: TensorFile, plan: KeyPlan, args: argparse.Namespace, env: Env
) -> nn.Module:
    """The LoRA-injected meta model -> recompute, FSDP, the base weights, the LoRA initialised
    (the same on any number of ranks). Returns a meta copy that receives the LoRA for export."""
    shell = copy.deepcopy(model)  # stays on meta
    blocks = [*model.double_blocks, *model.single_blocks]
    if args.compile:  # first: recompute wraps the compiled forward, FSDP's hooks stay outside
        compile_blocks(model)
    if not args.no_recompute and args.offload == "none":  # streaming recomputes on its own
        distributed.recompute_blocks(blocks)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen = tqdm(frozen, desc="loading base", unit="tensor", disable=env.rank != 0 or None)
    weights = ((n, build(tfile, *plan.sources[n])) for n in frozen)
    if local_base(args):  # the base outside FSDP, on this rank: FSDP shards the LoRA only
        base = load_local_base(model, blocks, weights, args, env)
        distributed.shard(model, blocks, env.device, env.dtype, ignored=base)
        if args.offload == "blocks":
            lora = [m for m in model.modules() if isinstance(m, Adapter)]
            for block in blocks:  # again: FSDP moved the float8 scales to the device
                park(block, skip=lora)
            # Not the adaLN layers: train_step computes the modulations ahead (they wait home).
            stream(blocks, env.device, 1, [*lora, *modulation_layers(model)], recompute=True)
    else:
        distributed.shard(model, blocks, env.device, env.dtype)
        model.to_empty(device=env.device)
        distributed.copy_full_(model, weights)
    torch.manual_seed(args.seed)  # the LoRA init, on CPU: the same for any number of ranks
    for m in shell.modules():
        if isinstance(m, Adapter):
            m.to_empty(device="cpu").reset_parameters()
    init = ((n, p) for n, p in shell.named_parameters() if p.requires_grad)
    distributed.copy_full_(model, init)  # the LoRA's initial values, into their shards
    model.train()
    return shell


def load_local_base(
    model: nn.Module,
    blocks: list[nn.Module],
    weights: Iterable[tuple[str, Tensor]],
    args: argparse.Namespace,
    env: Env,
) -> set[nn.Parameter]:
    """--base-dtype fp8 or --offload blocks: the frozen base whole on this rank, out of FSDP (which
    would gather float8 in bf16 and own the tensors a stream swaps). Returns its parameters."""
    model.to_empty(device="cpu")  # the LoRA too: FSDP moves it to the device
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, full in weights:
            params[name].copy_(full)
    for block in blocks:
        if args.base_dtype == "fp8":  # one block in bf16 on the device at a time
            quantize_block(block.to(env.device), modulation_layers(model))  # adaLN stays bf16
        if args.offload == "blocks":  # (pinned) CPU memory, block by block
            park(block, skip=[m for m in block.modules() if isinstance(m, Adapter)])
        else:
            block.to(env.device)
    for child in model.children():
        if child not in (model.double_blocks, model.single_blocks):
            child.to(env.device)
    return {p for p in model.parameters() if not p.requires_grad}


def place(
    ckpt: Checkpoint | None, source: Source, total: int, args: argparse.Namespace, world: int
) -> tuple[int, int, int]:
    """(step, epoch, batch) to start at: zeros, or the checkpoint's, within this run and data."""
    if ckpt is None:
        return 0, 0, 0
    c = ckpt.counters  # the samples consumed in the epoch, whatever the world and batch then
    done, held = c["batch"] * c["batch_size"] * c["world"], len(epoch_order(source, c["epoch"]))
    if c["step"] > total:
        fail(
            f"--resume {ckpt.path} is at step {c['step']}, past this run's {total}: raise "
            "--max-steps or --epochs, or --resume an earlier checkpoint"
        )
    if done > held:
        fail(
            f"--resume {ckpt.path} took {done} samples of epoch {c['epoch']}, which --pano and "
            f"--persp now make {held}: restore the rows it was trained on, or start a new run"
        )
    return c["step"], c["epoch"], -(-done // (args.batch_size * world))  # up: no sample twice


# --- training step ----------------------------------------------------------------------------


def lr_at(step: int, epoch: int, counted: int, args: argparse.Namespace) -> float:
    """--lr times the warm-up factor: linear:F, step / W below W = int(F * counted) steps (as
    transformers' constant schedule with warm-up), or epochs:F, 0.2 + 0.8 * epoch / E below
    E = max(1, int(F * --epochs)) epochs (DiT360's LambdaLR); then 1."""
    form, fraction = args.warmup.split(":")
    if form == "linear":
        warm = int(float(fraction) * counted)
        return args.lr * (step / warm if step < warm else 1.0)
    warm = max(1, int(float(fraction) * args.epochs))
    return args.lr * (0.2 + 0.8 * (epoch / warm) if epoch < warm else 1.0)  # parity: its rounding


def draw(
    ae_params: AutoEncoderParams,
    mean: Tensor,
    std: Tensor,
    seed: int,
    epoch: int,
    first: int,
    stride: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Latents z, noise (B, 16, H/8, W/8) and sigmas (B,) from one generator per sample, seeded
    by the sample's index in the epoch's global order: first, first + stride, ..."""
    z, noise, sigmas = [], [], []
    for j in range(mean.shape[0]):
        gen = seeded(seed, epoch, SAMPLE_STREAM, first + j * stride)
        one = slice(j, j + 1)
        z.append(scale_latents(ae_params, mean[one], std[one], gen))  # (1, 16, H/8, W/8)
        noise.append(torch.randn(z[-1].shape, generator=gen))
        sigmas.append(sample_sigmas(1, gen))
    return torch.cat(z), torch.cat(noise).to(mean.device), torch.cat(sigmas)


def supervised(mask: Tensor, grid: Grid, pad: bool, norm: str) -> Tensor:
    """What a token mask (B, h*w) counts: its rows (norm "sample") or supervised tokens ("token";
    with `pad` the wrapped columns count too)."""
    if norm == "sample":
        return torch.tensor(mask.shape[0])
    return (grid.wrap_mask(mask) if pad else mask).sum()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro: list[Batch],
    at: tuple[int, int, int],
    lr: float,
    args: argparse.Namespace,
    grid: Grid,
    enc: Encoders,
    env: Env,
) -> dict[str, float]:
    """One optimizer step on the micro-batches of `at` = (step, epoch, first batch) -> metrics;
    with a non-finite loss or gradient norm no update, and a `skipped` entry saying why."""
    (step, epoch, batch), (rank, world, device, dtype) = at, env
    hybrid = schedule(args)
    t0, aux = time.perf_counter(), hybrid.aux_active(epoch)
    guidance = args.guidance if model.params.guidance_embed else None
    for group in optimizer.param_groups:
        group["lr"] = lr
    count = sum(supervised(b.token_mask, grid, args.supervise_pad, args.loss_norm) for b in micro)
    count = distributed.all_sum(count.to(device))  # rows or tokens of the step, all ranks
    # "sample": the nominal rows, as Lightning divides each micro-batch by accumulate_grad_batches
    # also in an epoch's last, short window (its rows weigh len(micro) / --grad-accum).
    nominal = args.batch_size * args.grad_accum * world
    denom = count.clamp(min=1) if args.loss_norm == "token" else count.new_tensor(nominal)
    sums = torch.zeros(5, device=device)  # loss, flow, yaw, cube sums; rows or tokens
    config = LossConfig(
        norm=args.loss_norm, persp_weight=hybrid.persp_weight, supervise_pad=args.supervise_pad,
        lambda_yaw=args.lambda_yaw * aux, lambda_cube=args.lambda_cube * aux,
    )  # fmt: skip
    for i, b in enumerate(micro):
        b = b.to(device)
        first = (batch + i) * args.batch_size * world + rank  # in the epoch's global order
        mean, std, cond = encoded(b, enc.encode, enc.encode_text)
        z, noise, sigmas = draw(enc.ae_params, mean, std, args.seed, epoch, first, world)
        yaw = draw_yaw(seeded(args.seed, epoch, YAW_STREAM, batch + i))
        torch.manual_seed(seeded(args.seed, step, DROPOUT, i, rank).initial_seed())
        if args.offload == "blocks":  # the adaLN weights stay in CPU memory, as at inference
            cond = ahead(model, cond, [sigmas], guidance)
        loss, n, parts = flow_loss(
            model, z, noise, sigmas, cond, b.token_mask, grid, guidance, config,
            persp=b.persp, yaw=yaw, dtype=dtype,
        )  # fmt: skip
        (loss / denom).backward()  # FSDP sums it over ranks: the global loss's gradient
        sums += torch.stack([loss.detach(), *(parts[k] for k in PARTS), n.to(sums)])
    *sums, n = distributed.all_sum(sums).tolist()
    assert n == count.item(), f"the loss counted {n}, the step {count.item()}"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or math.inf)
    norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()  # all ranks'
    bad = [name for name, v in (("loss", sums[0]), ("gradient norm", norm)) if not math.isfinite(v)]
    if not bad:  # every rank sees the same global loss and norm: all skip, or none
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    dt = time.perf_counter() - t0
    tokens = world * len(micro) * args.batch_size * grid.tokens
    metrics = {k: v / denom.item() for k, v in zip(("loss", *PARTS), sums, strict=True)}
    metrics |= dict(lr=lr, grad_norm=norm, steps_per_s=1 / dt, tokens_per_s=tokens / dt)
    metrics |= dict(skipped="non-finite " + " and ".join(bad)) if bad else {}
    return metrics | dict(peak_gb=peak_memory_gb(device))


def main(argv: list[str] | None = None) -> None:
    # --- config: check every input before anything slow, and before writing anything
    if checkpoints.fcntl is None:  # out/.lock is a flock (one run a folder); GPUs train over NCCL
        fail(
            "train.py needs POSIX file locks (fcntl) and, to train on GPUs, NCCL, which Windows "
            "lacks: run it in WSL2 (Windows Subsystem for Linux) or on Linux"
        )
    args = parse_args(argv)
    out, rank0 = Path(args.out), distributed.is_main()
    print0(settings(args))
    device = check_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if rank0:
        check_out(out, args)  # refused early, nothing written; decided again under the lock

    # --- the run folder: rank 0 locks it first, so that nothing changes it while we check
    made = rank0 and not out.exists()
    lock = claim(out, args, made) if rank0 else None
    bar = None  # the progress bar, closed before a late error's line
    try:
        try:
            grid = Grid.for_image(args.resolution, 2 * args.resolution, args.wrap_pad)
            rows = read_rows(args.pano, args.persp)  # one error naming every bad row
            tfile, plan, model = read_flux(weights(args).transformer)  # headers; model on meta
            model.to(dtype)  # meta: no memory yet
            targets = target_rows(model, tuple(args.targets))
            inject(model, targets, args.lora_rank, args.alpha, args.dropout)  # fp32 LoRA
        except INPUT_ERRORS as e:
            fail(e)
        ckpt = find_checkpoint(out, args, model)  # read and checked against our arguments
        warnings.filterwarnings("ignore", message=".*returned a view tensor")  # FSDP: not in place
        torch.manual_seed(args.seed)
        rank, world = distributed.init(device)
        env = Env(rank, world, device, dtype)
        if world > 1 and local_base(args):
            fail(
                "--base-dtype fp8 and --offload blocks are for one process: on several, FSDP "
                "shards the bf16 base over the ranks (README, Training on one GPU)"
            )
        source = Source(
            rows["pano"], rows["persp"], args.resolution, args.seed, schedule=schedule(args)
        )
        total, counted = total_steps(source, args, rank, world)
        start, epoch, batch = place(ckpt, source, total, args, world)  # before writing
        enc = load_encoders(args, env)
        if rank == 0:  # every check passed: the run is ours to write
            start_run(out, args, start)
        base = "float8" if args.base_dtype == "fp8" else str(dtype).removeprefix("torch.")
        print0(f"{world} x {device.type}, {env.dtype}, base {base}, offload "
               f"{args.offload}; writing to {out}")  # fmt: skip

        # --- data: with --cache-dir every row encoded once, then the encoders freed
        conds = [Conditioning(*enc.encode_text([p])) for p in args.prompts]  # the previews'
        if args.cache_dir:
            source = cache_rows(source, enc, args, env)
            enc = replace(enc, encode=None, encode_text=None)
            free(device)

        # --- model: recompute, FSDP, weights; the optimizer on the LoRA only; resume; log
        shell = build_model(model, tfile, plan, args, env)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=args.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=args.weight_decay
        )
        if ckpt is not None:
            distributed.load_state(model, optimizer, ckpt.state)
            ckpt.state.clear()  # the full tensors, on every rank: free them
            print0(f"resumed from {ckpt.path}: step {start}, epoch {epoch}, batch {batch}")
        print0(
            f"{sum(p.numel() for p in params) / 1e6:.2f}M LoRA parameters; {total} steps of "
            f"{world} x {args.batch_size} x {args.grad_accum} samples of {grid.tokens} tokens"
        )
        if rank == 0:
            with atomic_path(out / "args.json") as tmp:
                tmp.write_text(json.dumps(vars(args), indent=2) + "\n", encoding="utf-8")
            log = open_log(out / "log.jsonl", start)
            board = (
                summary_writer()(str(out / "tensorboard")) if args.log == "tensorboard" else None
            )
            if not has_matplotlib():
                warn0(f"no loss.png: matplotlib is not installed ({LOGS_EXTRA})")
        parts = {k: getattr(args, k) for k in ("base", "transformer", "t5", "clip", "vae")}
        view = preview_options(
            parts, args.resolution, args.wrap_pad, args.sample_steps, args.seed, device
        )
        sizes = dict(world=world, batch_size=args.batch_size)  # a checkpoint's batch is in these

        # --- loop
        bar = tqdm(total=total, initial=start, desc="train", disable=rank != 0 or None)
        batches = micro_batches(source, args, epoch, batch, rank, world)
        skipped = 0  # non-finite steps in a row
        for step, (epoch, batch, micro) in zip(range(start, total), batches, strict=False):
            lr, at = lr_at(step, epoch, counted, args), (step, epoch, batch)
            metrics = train_step(model, optimizer, micro, at, lr, args, grid, enc, env)
            step, batch = step + 1, batch + len(micro)  # the counters a checkpoint resumes from
            skipped = skipped + 1 if "skipped" in metrics else 0
            if rank == 0:
                log.write(json.dumps(dict(step=step, epoch=epoch, **metrics)) + "\n")
                log.flush()
                if board:
                    write_scalars(board, metrics, step)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k != "skipped"})
                bar.update()
            if args.sample_every and step % args.sample_every == 0:  # rank 0 draws, all gather
                render(model, conds, view, out / "samples" / f"step-{step:08d}", rank == 0)
            if step % args.save_every == 0 or step == total:
                state = distributed.gather_state(model, optimizer)  # all ranks; rank 0 gets it
                counters = dict(sizes, step=step, epoch=epoch, batch=batch)
                if rank == 0:
                    save_checkpoint(out / "checkpoints", state, counters, args, shell)
                    plot_losses(out / "log.jsonl", out / "loss.png")  # what a user watches
            if skipped >= args.max_nonfinite:
                bar.close()
                last = max(steps(out / "checkpoints").items(), default=(0, "none"))[1]
                fail(
                    f"step {step}: loss or gradient norm not finite {skipped} steps in a row; "
                    f"the last checkpoint is {last}: --resume with a lower --lr?",
                    code=1,
                )

        # --- cleanup: the final LoRA (if finite), the loss curve
        bar.close()
        batches.close()  # the loader's processes stop now (see micro_batches)
        lora = distributed.gather_state(model)
        if rank == 0:
            if bad := nonfinite(lora):
                fail(f"the LoRA holds non-finite values ({bad[0]}, ...): not exported", code=1)
            prune(out / "checkpoints", args.keep, total)  # a crash before a save's prune
            export_lora(lora, shell, out / "lora")
            log.close()
            if board:
                board.close()
            drew = plot_losses(out / "log.jsonl", out / "loss.png")
            print0(
                f"wrote {out / 'lora'} (peft LoRA)" + (f" and {out / 'loss.png'}" if drew else "")
            )
    except OSError as e:  # a full disk, a folder made read-only: one line, no temporary left
        if bar is not None:
            bar.close()
        fail(f"the run in {out} stopped: {e}", code=1)
    finally:
        distributed.cleanup()
        if lock:
            release(lock, made)


if __name__ == "__main__":
    run_main(main)
