"""The one distributed context: rank, world size, devices, barrier, reductions, sharding.

Jobs are launched by `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) or run as a
single process (rank 0 of 1). Collectives go through `torch.distributed`: gloo on the CPU, NCCL
on CUDA. Every helper here is a no-op in a single process, so callers never branch on the world
size themselves. Sharding is strided: rank r of W gets items r, r + W, r + 2W, ... (disjoint,
covering, no padding). Reductions sum on every rank, so every rank ends with identical values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pcb_analysis.errors import ApiMisuseError, PcbkitError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; `owned`: this process created the group (and destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def group_initialized() -> bool:
    """A default process group exists (this process joined a multi-process job)."""
    return dist.is_available() and dist.is_initialized()


def context_from_env(env: Mapping[str, str] | None = None) -> DistContext:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; absent: a single process."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise PcbkitError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({err})") from err
    if world < 1 or not 0 <= rank < world:
        raise PcbkitError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return DistContext(rank, world, local)


def resolve_device(name: str, local_rank: int = 0, option: str = "--device") -> torch.device:
    """`cpu`, `cuda` (this process's local GPU; an error without CUDA) or `auto` (CUDA when present).

    `option` names the setting in error messages (`--device` on the CLI, `device` in a config)."""
    if name not in DEVICES:
        raise PcbkitError(f"{option}: unknown device {name!r}; expected cpu, cuda or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PcbkitError(f"{option} cuda: no CUDA device is available (use {option} cpu or auto)")
    index = local_rank % max(torch.cuda.device_count(), 1)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(ctx: DistContext, device: torch.device) -> DistContext:
    """Join the default process group of a multi-process job (NCCL on CUDA, gloo on the CPU).

    An existing group is joined as it is (it must agree with `ctx`); the returned context says
    whether this call created the group (`owned`), in which case `shutdown` destroys it."""
    if not ctx.distributed:
        return ctx
    if not dist.is_available():
        raise PcbkitError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dist.is_initialized():
        if dist.get_world_size() != ctx.world_size or dist.get_rank() != ctx.rank:
            raise PcbkitError(
                f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees "
                f"with RANK={ctx.rank} / WORLD_SIZE={ctx.world_size}"
            )
        return DistContext(ctx.rank, ctx.world_size, ctx.local_rank, owned=False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size)
    return DistContext(ctx.rank, ctx.world_size, ctx.local_rank, owned=True)


def current_context() -> DistContext:
    """The context of an already initialised group, else the one the environment describes."""
    if group_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistContext(dist.get_rank(), dist.get_world_size(), local)
    return context_from_env()


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if this process created it."""
    if ctx.owned and group_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (no-op in a single process); returns it."""
    if group_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over all ranks in place (no-op in a single process); returns it."""
    if group_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def reduce_means(means: dict[str, float], ctx: DistContext, device: torch.device) -> dict[str, float]:
    """The average over ranks of each rank's scalar means (same keys on every rank)."""
    if not ctx.distributed or not means:
        return means
    keys = sorted(means)
    t = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=device)
    all_reduce_sum_(t)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's `obj` in rank order on rank 0, None on the others (a list of one alone)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size if ctx.is_main else []
    dist.gather_object(obj, out if ctx.is_main else None, dst=0)
    return out if ctx.is_main else None


def shard_indices(num_items: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Rank r of W gets items r, r + W, r + 2W, ... (every item on exactly one rank, no padding)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ApiMisuseError(f"shard_indices: bad rank={rank} / world_size={world_size}")
    return list(range(rank, num_items, world_size))
