"""Distribution for training: the process group, FSDP2 sharding with mixed precision, recompute
(activation checkpointing), loading full weights into shards, and the trainable state gathered
from the shards (for a checkpoint) and spread back into them (on resume).

torchtitan's recipe (github.com/pytorch/torchtitan, `distributed/`). Without torchrun the script
is a world of one (an in-memory store), still sharded: one code path, so dtypes, numerics and
checkpoints do not depend on the launch.
"""

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint


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
    """Rank 0 (before the process group exists: torchrun's RANK; no torchrun: rank 0)."""
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))) == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def warn0(message: str) -> None:
    """One line `warning: ...` on stderr, from rank 0."""
    if is_main():
        print(f"warning: {message}", file=sys.stderr, flush=True)


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
    model: nn.Module,
    blocks: Iterable[nn.Module],
    device: torch.device,
    dtype: torch.dtype | None,
    ignored: set[nn.Parameter] | None = None,
) -> nn.Module:
    """FSDP2 `fully_shard` on each block, then on the root: parameters gathered in `dtype` (None:
    as stored), inputs not cast (RoPE stays fp32), gradients reduced in fp32 and summed over
    ranks, not averaged: the caller normalises its loss by the global token count. FSDP leaves
    the `ignored` parameters where they are (a float8 or streamed frozen base)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(
        param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    for module in [*blocks, model]:
        fully_shard(module, mesh=mesh, mp_policy=mp, ignored_params=ignored)
        module.set_gradient_divide_factor(1.0)
        # A plain SUM: a factor other than the world size would otherwise be NCCL's PREMUL_SUM,
        # which gloo lacks; with factor 1 there is nothing to scale before or after.
        module.set_force_sum_reduction_for_comms(True)
    return model


@contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Every FSDP module's parameters gathered whole inside the with-block (all ranks call it),
    so layers can also be called outside the model's forward (sampling computes modulations
    ahead), and kept whole after each forward: a forward on one rank alone (a preview) then
    gathers nothing, which would wait forever for the other ranks. Sharded again after."""
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # shard()'s defaults


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


def gather_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Tensor]:
    """The trainable parameters (`model/{name}`) and, with `optimizer`, their optimizer state
    (`optim/{name}/{key}`) gathered as full CPU tensors: rank 0 gets them, the others {} (all
    call). Small: the LoRA, never the frozen base."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = {f"model/{k}": v for k, v in get_model_state_dict(model, options=full).items()}
    osd = get_optimizer_state_dict(model, optimizer, options=full) if optimizer else {}
    moments = osd.get("state", {}).items()
    return state | {f"optim/{k}/{key}": v for k, d in moments for key, v in d.items()}


def load_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Tensor]
) -> None:
    """Load a gathered state (every rank holds all of it) into the sharded model and optimizer,
    on any number of ranks; the optimizer's hyperparameters stay those it was built with."""
    params, moments = {}, {}
    for key, t in state.items():
        kind, name = key.split("/", 1)
        if kind == "model":
            params[name] = t
        else:
            name, key = name.rsplit("/", 1)
            moments.setdefault(name, {})[key] = t
    names = {p: n for n, p in model.named_parameters()}
    groups = [{**g, "params": [names[p] for p in g["params"]]} for g in optimizer.param_groups]
    full = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
    set_model_state_dict(model, params, options=replace(full, strict=False))
    osd = {"state": moments, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, osd, options=full)
