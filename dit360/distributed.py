"""Distribution for training: the process group, FSDP2 sharding with mixed precision, recompute
(activation checkpointing), loading full weights into shards, and atomic DCP checkpoints.

torchtitan's recipe (github.com/pytorch/torchtitan, `distributed/`). Without torchrun the script
is a world of one (an in-memory store), still sharded: one code path, so dtypes, numerics and
checkpoints do not depend on the launch.
"""

import os
import re
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from .files import commit, remove, temp_path

STEP_DIR = re.compile(r"step-(\d+)")  # a complete checkpoint; ".step-N.tmp" is one being written
TRAINABLE = StateDictOptions(ignore_frozen_params=True)  # the LoRA, never the frozen base


def init(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group (torchrun's, else a world of one) -> (rank, world, device)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), dev


def cleanup() -> None:
    """Leave the process group (if joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Rank 0, or no process group at all."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def all_sum(x: Tensor) -> Tensor:
    """The sum of x over all ranks (a new tensor)."""
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def recompute_blocks(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations in backward (activation checkpointing). Wrapping the
    instance's `forward` keeps parameter names, and FSDP's hooks still gather for the recompute."""
    for block in blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def shard(
    model: nn.Module, blocks: Iterable[nn.Module], device: torch.device, dtype: torch.dtype | None
) -> nn.Module:
    """FSDP2 `fully_shard` on each block, then on the root: parameters gathered in `dtype` (None:
    as stored), inputs not cast (RoPE stays fp32), gradients reduced in fp32 and summed over
    ranks, not averaged: the caller normalises its loss by the global token count."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(
        param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    for module in [*blocks, model]:
        fully_shard(module, mesh=mesh, mp_policy=mp)
        module.set_gradient_divide_factor(1.0)
        # A plain SUM: a factor other than the world size would otherwise be NCCL's PREMUL_SUM,
        # which gloo lacks; with factor 1 there is nothing to scale before or after.
        module.set_force_sum_reduction_for_comms(True)
    return model


@torch.no_grad()
def copy_full_(model: nn.Module, tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Copy full tensors into parameters by name; each rank keeps its own shard of each."""
    params = dict(model.named_parameters())
    for name, full in tensors:
        p = params[name]
        full = full.to(p.device, p.dtype)
        if isinstance(p, DTensor):  # no communication: every rank holds the full tensor
            full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            full, p = full.to_local(), p.to_local()
        p.copy_(full)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, train: dict[str, int]) -> dict:
    """What a checkpoint holds: trainable parameters and optimizer state (sharded), counters."""
    return {
        "model": get_model_state_dict(model, options=TRAINABLE),
        "optim": get_optimizer_state_dict(model, optimizer, options=TRAINABLE),
        "train": dict(train),
    }


def _complete(folder: Path) -> dict[int, Path]:
    """The complete checkpoints in a folder by step (`step-N` holding DCP's `.metadata`)."""
    found = ((STEP_DIR.fullmatch(p.name), p) for p in folder.glob("step-*"))
    return {int(m[1]): p for m, p in found if m and (p / ".metadata").is_file()}


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The complete checkpoint of the highest step, or None."""
    done = _complete(Path(folder))
    return done[max(done)] if done else None


def save_checkpoint(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: dict[str, int],
    extra: Callable[[Path], None],
    keep: int = 2,
) -> Path:
    """Write `folder/step-N` atomically (all ranks call this); keep the newest `keep` (0: all).

    Written to `.step-N.tmp` (`extra(tmp)` adds files), then renamed. Later steps' checkpoints,
    of the run this one branched off from by resuming, are removed. All nodes must share `folder`.
    """
    folder, step = Path(folder), train["step"]
    final = folder / f"step-{step:08d}"
    tmp = temp_path(final)  # the same name on every rank
    if is_main():
        remove(tmp)  # left by a run killed while writing it
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(model, optimizer, train), checkpoint_id=tmp)
    extra(tmp)
    dist.barrier()
    if is_main():
        for s, path in _complete(folder).items():
            if s >= step:
                remove(path)
        commit(tmp, final)  # atomic: the checkpoint exists complete, or not at all
        done = sorted(_complete(folder).items())
        for _, old in done[:-keep] if keep else []:
            remove(old)
        for stale in folder.glob(".step-*.tmp*"):
            remove(stale)
    dist.barrier()
    return final


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, train: dict[str, int]
) -> dict[str, int]:
    """Load a checkpoint into the sharded model and optimizer (any world size) -> its counters."""
    state = _state(model, optimizer, train)
    dcp.load(state, checkpoint_id=Path(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"], options=TRAINABLE)
    return state["train"]


def full_trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters gathered on CPU: rank 0 gets them, the others {} (all call)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)
