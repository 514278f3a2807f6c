"""Multi-process training under torchrun: each rank takes its share of every global batch.

One process (no torchrun) is world size 1 and every helper here is then a no-op, so the
trainer has a single code path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from satic.errors import SaticError, library_reason


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


UNSET_OUTSIDE_TORCHRUN = ("torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE for each process it "
                          "starts; outside torchrun unset them")


def launch_number(name: str, default: int, least: int) -> int:
    """The whole number torchrun set in the environment variable `name` (`default` where it is unset)."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise SaticError(f"environment variable {name}={text!r} is not a whole number >= {least}; "
                         f"{UNSET_OUTSIDE_TORCHRUN}")
    return value


def launch_world() -> World:
    """This process's place among torchrun's, as its environment says (rank 0 of 1 outside torchrun), checked: a stray
    RANK would make a lone process skip the checks of its run folder that rank 0 makes."""
    size, rank = launch_number("WORLD_SIZE", 1, 1), launch_number("RANK", 0, 0)
    local_size, local_rank = launch_number("LOCAL_WORLD_SIZE", size, 1), launch_number("LOCAL_RANK", 0, 0)
    for name, value, bound, limit in (("RANK", rank, "WORLD_SIZE", size),
                                      ("LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_size)):
        if value >= limit:
            raise SaticError(f"environment variable {name}={value} is not below {bound}={limit}; "
                             f"{UNSET_OUTSIDE_TORCHRUN}")
    return World(rank, size, local_rank)


def init_world(device: torch.device) -> World:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) when launched by torchrun."""
    launched = launch_world()
    if launched.size == 1:
        return World()
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except ValueError as err:  # a variable of torch's rendezvous missing: not started by torchrun
            raise SaticError(f"WORLD_SIZE={launched.size} in the environment, but this process cannot join the "
                             f"others ({library_reason(err, 240)}); start the run with torchrun, or unset WORLD_SIZE, "
                             f"RANK, LOCAL_RANK and LOCAL_WORLD_SIZE to train in one process") from None
    return World(dist.get_rank(), dist.get_world_size(), launched.local_rank)


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
