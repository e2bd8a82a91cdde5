"""Train a DiT360 panorama LoRA on FLUX.1-dev: one process or many (torchrun + FSDP2), GPU or CPU.

torchrun --nproc_per_node 8 train.py --pano pano.jsonl --persp persp.jsonl --out runs/dit360

Defaults are DiT360's (train.sh, src/dit360.py): LoRA r 64, alpha 64, dropout 0.05 on attn
to_q/k/v/out; AdamW lr 5e-5, betas (0.9, 0.999), eps 1e-6, weight decay 1e-5; linear warm-up over
the first 5% of steps, then constant; batch 1 x 4 accumulated per rank; 25 epochs; 1 wrap column;
yaw and cube losses 0.5 each from epoch 2; guidance 1.0; no gradient clipping. bf16 on GPU (the
reference: fp16 mixed precision), fp32 on CPU; the LoRA and its optimizer state are fp32.
Ours, not the reference's: the VAE encoder wraps the width (--no-circular-encoder to zero-pad).

The model is always FSDP-sharded, also in a single process (a world of one): one code path, the
same dtypes and numerics, and DCP checkpoints that resume on any number of ranks.

Loss: sum of squared errors over supervised tokens / their number over all micro-batches of the
step and all ranks (all-reduced before backward), torchtitan's normalisation by the global token
count. Each rank backpropagates its sum / the global count, and FSDP sums the ranks' gradients
(its divide factor is 1, `distributed.shard`): the gradient of the global loss.

Randomness follows the counters, never hidden state: a sample's latents, noise and sigma come from
a generator seeded with (seed, epoch, its index in the epoch's global order), the yaw angle from
(seed, epoch, batch), LoRA dropout from (seed, step, micro-batch, rank). So a checkpoint's
(step, epoch, batch) is all the RNG state a resume needs, and a global batch gives the same loss
however it is split over ranks.

Writes to --out: checkpoints/step-N/ (DCP state + lora/), lora/ (the final LoRA in the peft format
that `sample.py --lora` and diffusers read), log.jsonl (one line a step), loss.png.
"""

import argparse
import copy
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from dit360 import distributed
from dit360.autoencoder import scale_latents
from dit360.config import AutoEncoderParams
from dit360.data import (
    Batch,
    Encode,
    EncodeText,
    Source,
    build_cache,
    conditioning,
    epoch_loader,
    epoch_order,
    posterior,
    read_rows,
    seeded,
)
from dit360.distributed import print0
from dit360.lora import DIT360_TARGETS, Adapter, inject
from dit360.lora_formats import export_peft
from dit360.loss import aux_active, draw_yaw, flow_loss, sample_sigmas
from dit360.panorama import Grid
from dit360.report import free, open_log, peak_memory_gb, plot_losses
from dit360.text import encode_prompt, load_text_encoders
from dit360.weights import build, load_autoencoder, read_flux

# Streams of seeded generators; data.py uses 0 (data.AUGMENT_STREAM, panorama augmentation).
SAMPLE_STREAM, YAW_STREAM, DROPOUT = 10, 11, 12
PARTS = ("flow", "yaw", "cube")  # the loss components flow_loss reports
INPUT_ERRORS = (ValueError, FileNotFoundError, PermissionError)  # one line, no traceback

# --- config -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", default="black-forest-labs/FLUX.1-dev", help="repo id or folder")
    p.add_argument("--pano", required=True, help="jsonl of panoramas {image, caption[, mask]}")
    p.add_argument("--persp", help="jsonl of perspective photos on the canvas, with masks")
    p.add_argument("--out", default="runs/dit360", help="checkpoints, LoRA, log, loss curve")
    p.add_argument("--resolution", type=int, default=1024, help="height; width = 2 x height")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=1, help="per rank and micro-batch")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps warming up")
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="clip gradients (0: off)")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=64, help="LoRA alpha")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--targets", nargs="+", default=list(DIT360_TARGETS), help="diffusers names")
    p.add_argument("--wrap-pad", type=int, default=1, choices=(0, 1, 2), help="columns a side")
    p.add_argument(
        "--supervise-pad",
        action="store_true",
        help="supervise the wrapped pad columns too (the maintainers' seam fix, with --wrap-pad 2)",
    )
    p.add_argument("--lambda-yaw", type=float, default=0.5)
    p.add_argument("--lambda-cube", type=float, default=0.5)
    p.add_argument("--aux-from-epoch", type=int, default=2, help="first epoch with yaw / cube")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance input while training")
    p.add_argument(
        "--circular-encoder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="VAE encoder wraps the width: a roll of the image rolls its latents exactly, so the\n"
        "cache is exact (--no-circular-encoder: the reference's zero padding)",
    )
    p.add_argument("--resume", nargs="?", const="latest", help="checkpoint folder (default latest)")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept (0: all)")
    p.add_argument("--cache-dir", help="encode every image and caption once, into this folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument(
        "--no-recompute",
        action="store_true",
        help="activation checkpointing off: keep every block's activations (more memory)",
    )
    p.add_argument("--workers", type=int, default=4, help="data loader processes per rank")
    return p.parse_args(argv)


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


def load_encoders(args: argparse.Namespace, env: Env) -> Encoders:
    """The frozen VAE and text encoders, on every rank."""
    try:
        text = load_text_encoders(args.base, env.device, env.dtype)
        vae = load_autoencoder(args.base, env.device, torch.float32)  # fp32, as the reference
    except INPUT_ERRORS as e:
        sys.exit(f"error: {e}")
    vae.set_circular(False, encoder=args.circular_encoder)
    encode = torch.no_grad()(lambda x: vae.posterior(x.to(env.device)))
    return Encoders(vae.params, encode, partial(encode_prompt, text))


def cache_rows(source: Source, enc: Encoders, args: argparse.Namespace, env: Env) -> Source:
    """Encode every row once into --cache-dir (each rank its share) -> the source reading it."""
    base = Path(args.base).resolve() if Path(args.base).exists() else args.base
    model_id = f"{base}|circular encoder {args.circular_encoder}|text {env.dtype}"
    every = source.pano + source.persp
    made = build_cache(
        every, args.cache_dir, args.resolution, model_id, enc.encode, enc.encode_text,
        env.rank, env.world,
    )  # fmt: skip
    torch.distributed.barrier()
    print0(f"cache {args.cache_dir}: {len(every)} rows, {made} new on rank 0")
    return replace(source, cache_dir=Path(args.cache_dir), model_id=model_id)


def steps_in_epoch(
    source: Source, epoch: int, args: argparse.Namespace, rank: int, world: int
) -> int:
    """Optimizer steps in an epoch on every rank (the perspective share changes with the epoch);
    a last, partial accumulation still makes a step."""
    n = len(epoch_order(len(source.pano), len(source.persp), epoch, source.seed, rank, world))
    return math.ceil(n // args.batch_size / args.grad_accum)


def total_steps(source: Source, args: argparse.Namespace, rank: int, world: int) -> int:
    """Optimizer steps of the run: --max-steps, or those of --epochs epochs."""
    if steps_in_epoch(source, 0, args, rank, world) == 0:
        sys.exit(f"error: {len(source.pano)} panoramas: no batch of {args.batch_size} x {world}")
    epochs = range(args.epochs)
    return args.max_steps or sum(steps_in_epoch(source, e, args, rank, world) for e in epochs)


def micro_batches(
    source: Source, args: argparse.Namespace, epoch: int, batch: int, rank: int, world: int
) -> Iterator[tuple[int, int, list[Batch]]]:
    """Each step's (epoch, first batch, micro-batches) from batch `batch` of `epoch` on, forever."""
    while True:
        loader = epoch_loader(source, epoch, args.batch_size, rank, world, args.workers, batch)
        loader = iter(loader)
        while micro := list(islice(loader, args.grad_accum)):
            yield epoch, batch, micro
            batch += len(micro)
        epoch, batch = epoch + 1, 0


# --- model ------------------------------------------------------------------------------------


def export(model: nn.Module, shell: nn.Module, folder: Path) -> None:
    """Gather the LoRA from all shards (all ranks call); rank 0 writes it in the peft format."""
    lora = distributed.full_trainable_state(model)
    if distributed.is_main():
        shell.load_state_dict(lora, strict=False, assign=True)  # the meta base stays meta
        export_peft(shell, folder)


def resume(
    args: argparse.Namespace,
    out: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    world: int,
) -> tuple[int, int, int]:
    """(step, epoch, batch) to start from: zeros, or those of the checkpoint --resume names (the
    latest by default), loaded into the model and optimizer."""
    path = args.resume
    if path == "latest":
        path = distributed.latest_checkpoint(out / "checkpoints")
        if path is None:
            print0(f"no checkpoint in {out / 'checkpoints'}: starting from scratch")
    if not path:
        return 0, 0, 0
    if not (Path(path) / ".metadata").is_file():
        sys.exit(f"error: {path} is not a complete checkpoint (no .metadata)")
    state = dict(step=0, epoch=0, batch=0, world=world, batch_size=args.batch_size)
    state = distributed.load_checkpoint(path, model, optimizer, state)
    # Samples consumed in the epoch, whatever the world and batch size were then.
    batch = state["batch"] * state["batch_size"] * state["world"] // (args.batch_size * world)
    print0(f"resumed from {path}: step {state['step']}, epoch {state['epoch']}, batch {batch}")
    return state["step"], state["epoch"], batch


# --- training step ----------------------------------------------------------------------------


def lr_at(step: int, total: int, args: argparse.Namespace) -> float:
    """Linear warm-up from 0 over the first `warmup` fraction of the steps, then constant."""
    warm = int(args.warmup * total)
    return args.lr * (step / warm if step < warm else 1.0)


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


def supervised(mask: Tensor, grid: Grid, pad: bool) -> Tensor:
    """Supervised tokens of a token mask (B, h*w); with `pad` the wrapped columns count too."""
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
    """One optimizer step on the micro-batches of `at` = (step, epoch, first batch) -> metrics."""
    (step, epoch, batch), (rank, world, device, dtype) = at, env
    t0, aux = time.perf_counter(), aux_active(epoch, args.aux_from_epoch)
    guidance = args.guidance if model.params.guidance_embed else None
    for group in optimizer.param_groups:
        group["lr"] = lr
    count = sum(supervised(b.token_mask, grid, args.supervise_pad) for b in micro)
    count = distributed.all_sum(count.to(device))  # supervised tokens of the step, all ranks
    sums = torch.zeros(5, device=device)  # loss, flow, yaw, cube sums; token count
    for i, b in enumerate(micro):
        b = b.to(device)
        first = (batch + i) * args.batch_size * world + rank  # in the epoch's global order
        z, noise, sigmas = draw(
            enc.ae_params, *posterior(b, enc.encode), args.seed, epoch, first, world
        )  # (B, 16, H/8, W/8) twice, (B,)
        yaw = draw_yaw(seeded(args.seed, epoch, YAW_STREAM, batch + i))
        torch.manual_seed(seeded(args.seed, step, DROPOUT, i, rank).initial_seed())
        loss, n, parts = flow_loss(
            model, z, noise, sigmas, conditioning(b, enc.encode_text), b.token_mask, grid,
            guidance, persp=b.persp, supervise_pad=args.supervise_pad,
            lambda_yaw=args.lambda_yaw * aux, lambda_cube=args.lambda_cube * aux, yaw=yaw,
            dtype=dtype,
        )  # fmt: skip
        (loss / count.clamp(min=1)).backward()  # FSDP sums it over ranks: the global mean's
        sums += torch.stack([loss.detach(), *(parts[k] for k in PARTS), n.to(sums)])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    *sums, n = distributed.all_sum(sums).tolist()
    assert n == count.item(), f"the loss counted {n} tokens, the step {count.item()}"
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    dt = time.perf_counter() - t0
    tokens = world * len(micro) * args.batch_size * grid.tokens
    metrics = {k: v / max(n, 1) for k, v in zip(("loss", *PARTS), sums, strict=True)}
    metrics |= dict(lr=lr, grad_norm=norm.item(), steps_per_s=1 / dt, tokens_per_s=tokens / dt)
    return metrics | dict(peak_gb=peak_memory_gb(device))


def main(argv: list[str] | None = None) -> None:
    # --- config: check every input before anything slow
    args = parse_args(argv)
    out = Path(args.out)
    try:
        grid = Grid.for_image(args.resolution, 2 * args.resolution, args.wrap_pad)
        rows = read_rows(args.pano, args.persp)  # one error naming every bad row
        tfile, plan, model = read_flux(args.base)  # headers only; the model on the meta device
    except INPUT_ERRORS as e:
        sys.exit(f"error: {e}")
    warnings.filterwarnings("ignore", message=".*returned a view tensor")  # FSDP; never in place
    torch.manual_seed(args.seed)

    # --- distributed
    rank, world, device = distributed.init(args.device)
    env = Env(rank, world, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        print0(f"{world} x {device.type}, {env.dtype}; writing to {out}")

        # --- data: the rows; the VAE and text encoders, with --cache-dir used once and freed
        source = Source(rows["pano"], rows["persp"], args.resolution, args.seed)
        enc = load_encoders(args, env)
        if args.cache_dir:
            source = cache_rows(source, enc, args, env)
            enc = replace(enc, encode=None, encode_text=None)
            free(device)
        total = total_steps(source, args, rank, world)

        # --- model: on meta, LoRA injected (base frozen), recompute, FSDP, weights
        model.to(env.dtype)  # meta: no memory yet
        inject(model, args.lora_rank, args.alpha, tuple(args.targets), args.dropout)  # fp32 LoRA
        shell = copy.deepcopy(model)  # stays on meta; receives the gathered LoRA for export
        blocks = [*model.double_blocks, *model.single_blocks]
        if not args.no_recompute:
            distributed.recompute_blocks(blocks)
        distributed.shard(model, blocks, device, env.dtype)
        model.to_empty(device=device)
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen = tqdm(frozen, desc="loading base", unit="tensor", disable=rank != 0)
        distributed.copy_full_(model, ((n, build(tfile, *plan.sources[n])) for n in frozen))
        torch.manual_seed(args.seed)  # the LoRA init, on CPU: the same for any number of ranks
        for m in shell.modules():
            if isinstance(m, Adapter):
                m.to_empty(device="cpu").reset_parameters()
        init = ((n, p) for n, p in shell.named_parameters() if p.requires_grad)
        distributed.copy_full_(model, init)  # the LoRA's initial values, into their shards
        model.train()

        # --- optimizer on the LoRA only; resume; log
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=args.lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=args.weight_decay
        )
        start, epoch, batch = resume(args, out, model, optimizer, world)
        print0(
            f"{sum(p.numel() for p in params) / 1e6:.2f}M LoRA parameters; {total} steps of "
            f"{world} x {args.batch_size} x {args.grad_accum} samples of {grid.tokens} tokens"
        )
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
            log = open_log(out / "log.jsonl", start)
        save = partial(
            distributed.save_checkpoint, out / "checkpoints", model, optimizer, keep=args.keep,
            extra=lambda folder: export(model, shell, folder / "lora"),
        )  # fmt: skip
        sizes = dict(world=world, batch_size=args.batch_size)  # a checkpoint's batch is in these

        # --- loop
        bar = tqdm(total=total, initial=start, desc="train", disable=rank != 0)
        batches = micro_batches(source, args, epoch, batch, rank, world)
        for step, (epoch, batch, micro) in zip(range(start, total), batches, strict=False):
            lr, at = lr_at(step, total, args), (step, epoch, batch)
            metrics = train_step(model, optimizer, micro, at, lr, args, grid, enc, env)
            step, batch = step + 1, batch + len(micro)  # the counters a checkpoint resumes from
            if rank == 0:
                log.write(json.dumps(dict(step=step, epoch=epoch, **metrics)) + "\n")
                log.flush()
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
                bar.update()
            if step % args.save_every == 0 or step == total:
                save(dict(sizes, step=step, epoch=epoch, batch=batch))

        # --- cleanup: the final LoRA, the loss curve
        bar.close()
        export(model, shell, out / "lora")
        if rank == 0:
            log.close()
            plot_losses(out / "log.jsonl", out / "loss.png")
            print0(f"wrote {out / 'lora'} (peft LoRA) and {out / 'loss.png'}")
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
