"""One training micro-batch of train.py, measured in a fresh process: the LoRA-injected model built
by `train.build_model` (FSDP over a world of one: NCCL on a GPU, gloo on the CPU) from a random
FLUX.1-dev folder, in one memory mode (--base-dtype, --offload, recompute), then forward and
backward of `flow_loss` at height x 2 height on random latents and text. Seconds per micro-batch
(after a warm-up one) and peak memory.

`spawn(**args)` runs `python benchmarks/train_step.py '{...}'` and returns the JSON of its
`RESULT ...` line, or {"error": ...} (an OOM, a timeout), as runs.spawn does for the other kinds.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from runs import MARK, Stages, environment, run_script, sync

from dit360.load.config import FluxParams


def train_tflop(p: FluxParams, img_tokens: int, recompute: bool, txt_tokens: int = 512) -> float:
    """TFLOP of a micro-batch: the forward (GEMMs G, attention A), again with recompute, and the
    backward of a LoRA over a frozen base: the inputs' gradients only (G) and attention's (2 A)."""
    d, n, blocks = p.hidden_size, img_tokens + txt_tokens, p.depth + p.depth_single_blocks
    gemm = 2 * (3 * d * d + d * d + 2 * d * p.mlp_hidden) * n * blocks / 1e12
    attn = 4 * n * n * d * blocks / 1e12
    return (gemm + attn) * (2 if recompute else 1) + gemm + 2 * attn


def run_train(
    base: str,
    height: int,
    device: str,
    dtype: str,
    base_dtype: str = "bf16",
    offload: str = "none",
    recompute: bool = True,
    lora_rank: int = 64,
    repeats: int = 3,
) -> dict:
    """Build the model as train.py does, then time `repeats` micro-batches after a warm-up."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import train
    from dit360.app.options import DTYPES
    from dit360.app.panorama import Grid
    from dit360.core.lora import inject
    from dit360.core.loss import flow_loss
    from dit360.core.sampling import Conditioning
    from dit360.load.lora_formats import target_rows
    from dit360.load.weights import read_flux
    from dit360.memory.ahead import ahead
    from dit360.train import distributed

    dev = train.check_device(device)
    rank, world = distributed.init(dev)
    dt, stages = DTYPES[dtype], Stages(str(dev))
    stages.begin("load")
    tfile, plan, model = read_flux(base)
    model.to(dt)
    inject(model, target_rows(model), lora_rank, lora_rank, dropout=0.0)
    args = argparse.Namespace(
        compile=False, no_recompute=not recompute, base_dtype=base_dtype, offload=offload, seed=0
    )
    train.build_model(model, tfile, plan, args, train.Env(rank, world, dev, dt))
    p, grid = model.params, Grid.for_image(height, 2 * height, 1)
    g = torch.Generator().manual_seed(0)
    z, noise = (torch.randn(1, 16, height // 8, height // 4, generator=g) for _ in range(2))
    cond = Conditioning(
        torch.randn(1, 512, p.context_in_dim, generator=g),
        torch.zeros(1, 512, 3),
        torch.randn(1, p.vec_in_dim, generator=g),
    )
    mask = torch.ones(1, grid.h * grid.w, dtype=torch.bool)
    guidance = 1.0 if p.guidance_embed else None

    def micro_batch() -> float:
        start, sigmas = time.perf_counter(), torch.tensor([0.5])
        # As train.py: streamed blocks leave their adaLN weights home, the modulations computed
        # ahead, one layer lent at a time.
        c = ahead(model, cond, [sigmas], guidance) if offload == "blocks" else cond
        loss, n, _ = flow_loss(
            model, z.to(dev), noise.to(dev), sigmas, c, mask, grid, guidance, dtype=dt
        )
        (loss / n).backward()
        model.zero_grad(set_to_none=True)
        sync(str(dev))
        return time.perf_counter() - start

    stages.begin("warm-up")
    micro_batch()
    stages.begin("micro-batches")
    seconds = [micro_batch() for _ in range(repeats)]
    stages.end()
    distributed.cleanup()
    tflop = train_tflop(p, grid.tokens, recompute)
    return dict(stages=stages.out, micro_s=seconds, tflop=tflop, tokens=grid.tokens + 512)


def spawn(timeout: float | None = None, **args) -> dict:
    """run_train(**args) in a fresh process: its result with `process_s`, or {"error": ...}."""
    return run_script(Path(__file__), args, timeout)


if __name__ == "__main__":
    try:
        result = run_train(**json.loads(sys.argv[1]))
    except torch.OutOfMemoryError as e:
        result = dict(error="out of memory: " + str(e).splitlines()[0][:200])
    result["environment"] = environment()
    print(MARK + json.dumps(result), flush=True)
