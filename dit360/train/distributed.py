"""Distribution for training, torchtitan's recipe (github.com/pytorch/torchtitan, `distributed/`):
the process group, FSDP2 with mixed precision, recompute, full weights into shards, the trainable
state gathered for a checkpoint and spread back on resume. Without torchrun a world of one, still
sharded: one code path, so dtypes, numerics and checkpoints do not depend on the launch.
"""

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint import state_dict as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from ..app.cli import fail, one_line, torchrun

JOIN = timedelta(minutes=10)  # as torchrun's own rendezvous (its join_timeout)


def init(dev: torch.device) -> tuple[int, int]:
    """Join the process group on `dev` (a CUDA one with its index) -> (rank, world)."""
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        try:  # the others join within JOIN (a missing one was a hang of 30 minutes, a traceback)
            store, rank, world = next(dist.rendezvous("env://", timeout=JOIN))
        except dist.DistError as e:
            fail(f"the other processes did not join ({e}): launch all with torchrun", 1)
        device = dev if dev.type == "cuda" else None
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, device_id=device)
    else:  # a world of one: an in-memory store
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def cleanup() -> None:
    """Leave the process group (if joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Rank 0 (before the process group exists: torchrun's RANK; no torchrun: rank 0)."""
    return (dist.get_rank() if dist.is_initialized() else torchrun()[0]) == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only, each argument `one_line` (a name's line break made two)."""
    if is_main():
        print(*map(one_line, args), **kwargs, flush=True)


def warn0(message: str) -> None:
    """One line `warning: ...` on stderr, from rank 0."""
    print0(f"warning: {message}", file=sys.stderr)


def all_sum(x: Tensor) -> Tensor:
    """The sum of x over all ranks (a new tensor)."""
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def recompute_blocks(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations in backward; wrapping `forward` keeps parameter names."""
    for block in blocks:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def shard(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    device: torch.device,
    dtype: torch.dtype | None,
    ignored: set[nn.Parameter] | None = None,
) -> None:
    """FSDP2 on each block, then the root: gathered in `dtype` (None: as stored), inputs not cast
    (RoPE stays fp32), gradients summed over ranks in fp32; `ignored` stay out (a local base)."""
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


@contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Parameters whole inside the block (all ranks call it), also after each forward: a forward on
    one rank alone (a preview) must gather nothing, or it waits forever. Sharded again after."""
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


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """The LoRA (`model/{name}`), its AdamW state (`optim/{name}/{key}`): whole, on rank 0."""
    full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = {f"model/{k}": v for k, v in dcp.get_model_state_dict(model, options=full).items()}
    osd = dcp.get_optimizer_state_dict(model, optimizer, options=full) if optimizer else {}
    moments = osd.get("state", {}).items()
    return state | {f"optim/{k}/{key}": v for k, d in moments for key, v in d.items()}


def load_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Tensor]
) -> None:
    """Load a gathered state (on every rank) into the sharded model and optimizer (any world)."""
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
    full = dict(full_state_dict=True, ignore_frozen_params=True)
    dcp.set_model_state_dict(model, params, options=dcp.StateDictOptions(**full, strict=False))
    osd = {"state": moments, "param_groups": groups}
    dcp.set_optimizer_state_dict(model, optimizer, osd, options=dcp.StateDictOptions(**full))
