"""Multi-process training under torchrun: each rank takes its share of every global batch.

One process (no torchrun) is world size 1 and every helper here is then a no-op, so the
trainer has a single code path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: torch.device) -> World:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) when launched by torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def shard_bounds(count: int, world: World) -> tuple[int, int]:
    """[start, end) of this rank's share of `count` items: contiguous, sizes differ by at most one."""
    base, extra = divmod(count, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (1 if world.rank < extra else 0)


def all_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    """Sum of a tensor over ranks (a copy; the input is left alone)."""
    value = value.detach().clone()
    if world.size > 1:
        dist.all_reduce(value)
    return value


def rank_0_failed(world: World, failed: bool) -> bool:
    """Rank 0's `failed` on every rank (the others pass False): whether its checks before the run refused it.
    Over gloo, which works beside NCCL and before a rank has chosen its GPU."""
    if world.size == 1:
        return failed
    group = dist.new_group(backend="gloo")
    flag = torch.tensor([int(failed and world.is_main)])
    dist.broadcast(flag, src=0, group=group)
    dist.destroy_process_group(group)
    return bool(flag.item())


def lost_peer(err: BaseException) -> bool:
    """Whether `err` is a collective call's report that another process of the run has gone."""
    return isinstance(err, RuntimeError) and any(
        words in str(err) for words in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
