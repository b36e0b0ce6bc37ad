"""Data-parallel bookkeeping: contiguous shards (the reference's InferenceSampler) and gathering."""

from typing import Any

import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(num_items: int, rank: int, world_size: int) -> range:
    """Contiguous shard of rank: sizes differ by at most one, the first num_items % world_size ranks
    get the extra item. Every item lands in exactly one shard (no drop_last)."""
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def gather_to_all(items: list[Any]) -> list[Any]:
    """Concatenate every rank's list, in rank order (all_gather_object, as the reference)."""
    rank, world_size = world()
    if world_size == 1:
        return list(items)
    gathered: list[list[Any]] = [None] * world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def broadcast_from_rank0(obj: Any) -> Any:
    rank, world_size = world()
    if world_size == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
